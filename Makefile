# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install everything, run the whole pipeline on Fashion-MNIST
#   make test   - create .venv, install everything, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bench dataset install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

dataset:
	@if [ ! -d $(FMNIST_DIR) ]; then \
		echo "Fashion-MNIST is missing: installing the Debian package dataset-fashion-mnist"; \
		$(SUDO) apt-get install -y dataset-fashion-mnist || { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }; \
	fi

test: install dataset
	$(BIN)/python -m pytest -p randomly tests; rc=$$?; if [ $$rc = 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

demo: install dataset
	$(BIN)/python experiments/demo.py

bench: install dataset
	$(BIN)/python experiments/run_all.py

clean:
	rm -rf $(VENV) runs demo
