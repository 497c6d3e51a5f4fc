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
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
# $(call apt_install,PACKAGE): install a Debian package; apt-get update only when the plain install fails
apt_install = $(APT_GET) install -y $(1) || { $(APT_GET) update && $(APT_GET) install -y $(1); }
# PostgreSQL's server programs (Debian keeps them off PATH); the tests start a throwaway server
PG_INITDB := /usr/lib/postgresql/*/bin/initdb

.PHONY: demo test bench bench-quick dataset postgresql install clean

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
		$(call apt_install,dataset-fashion-mnist); \
	fi

postgresql:
	@if ! ls $(PG_INITDB) >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
		echo "PostgreSQL is missing: installing the Debian package postgresql"; \
		$(call apt_install,postgresql); \
		ls $(PG_INITDB) >/dev/null 2>&1 || { echo "apt-get installed postgresql but no $(PG_INITDB) exists"; exit 1; }; \
	fi

# The suite runs test modules in TEST_WORKERS processes (pytest-xdist; a module stays on one
# worker, so its fixtures are built once), in random order (pytest-randomly prints the seed).
# `make test TEST_WORKERS=0` runs everything in one process.
TEST_WORKERS ?= 2
test: install dataset postgresql
	$(BIN)/python -m pytest -p randomly -n $(TEST_WORKERS) --dist loadfile tests; rc=$$?; if [ $$rc = 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

demo: install dataset
	$(BIN)/python experiments/demo.py

bench: install dataset
	$(BIN)/python experiments/run_all.py

bench-quick: install dataset
	$(BIN)/python experiments/run_all.py --quick

clean:
	rm -rf $(VENV) runs demo demo-v1 demo-quick
