"""Shared fixtures of the search, extraction and CLI-robustness tests (a plain module, not a conftest).

Everything runs as users type it: real ``nas-*`` processes in a working folder, real files.
The working folder is built once per test session (memoised here, so every test module that
imports it shares one): ``nas-train`` on ``synthetic:512`` at 32 px for one epoch, then
``nas-build-lut --device local-cpu``. The default ``nas-search`` of that folder is also run once
and shared, because the extraction tests need its ``subnet.json``.

Subprocesses get ``OMP_NUM_THREADS=1`` (and ``--threads 1`` where the CLI has it): the test
machine has two cores and other jobs run beside the tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

BIN = Path(sys.executable).parent
TRAIN_ARGS = ("--space", "efficientformer_v2_demo", "--dataset", "synthetic:512", "--resolution", "32",
              "--epochs", "1", "--batch-size", "64", "--threads", "1")
RUN = "runs/tiny"
DEVICE = "local-cpu"
RESOLUTION = 32
LUT_NAME = f"lut-{DEVICE}-{RESOLUTION}.json"

_STATE: dict[str, Any] = {}


# ----------------------------------------------------------------------------- processes
def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONDONTWRITEBYTECODE="1")
    e.pop("PYTHONWARNINGS", None)
    return e


def exe(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"console script {name} is not installed in {BIN} (pip install -e .)")
    return str(path)


def cli(name: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a console script as a user would (``name args...`` in ``cwd``)."""
    return subprocess.run([exe(name), *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def popen(name: str, *args: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start a console script in its own process group, stdout and stderr to ``log``.(out|err)."""
    out = open(f"{log}.out", "wb")
    err = open(f"{log}.err", "wb")
    try:
        return subprocess.Popen([exe(name), *args], cwd=cwd, env=env(), stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()
        err.close()


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started by :func:`popen` and everything it started (its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(cond: Callable[[], bool], *, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            if cond():
                return
            pytest.fail(f"the process exited with {proc.returncode} before {what}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def describe(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"


# ----------------------------------------------------------------------------- files
def tree(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``folder`` (relative) -> (size, mtime_ns) for files, None for folders; no __pycache__."""
    out: dict[str, tuple[int, int] | None] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        base = Path(dirpath)
        for d in dirnames:
            out[str((base / d).relative_to(folder))] = None
        for f in filenames:
            st = (base / f).stat()
            out[str((base / f).relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


def copy_workdir(src: Path, dst: Path, *, with_run: bool = True, with_lut: bool = True) -> Path:
    """A fresh working folder: the supernet run (weights hard-linked, never written in place) and the LUT."""
    dst.mkdir(parents=True, exist_ok=True)
    if with_run:
        def link_or_copy(a: str, b: str) -> None:
            if a.endswith(".safetensors"):
                os.link(a, b)
            else:
                shutil.copy2(a, b)
        shutil.copytree(src / RUN, dst / RUN, copy_function=link_or_copy)
    if with_lut:
        shutil.copy2(src / LUT_NAME, dst / LUT_NAME)
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_folder_integrity(folder: Path) -> None:
    """No truncated output: every JSON parses, every safetensors opens, no temporary files remain."""
    from supernet.checkpoint import load_tensors

    problems = []
    for path in sorted(folder.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        if path.name.endswith(".tmp") or path.name.startswith(".") and ".tmp" in path.name:
            problems.append(f"temporary file left behind: {path.relative_to(folder)}")
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                problems.append(f"{path.relative_to(folder)} does not parse: {exc}")
        elif path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                try:
                    json.loads(line)
                except ValueError as exc:
                    problems.append(f"{path.relative_to(folder)} line {i + 1} does not parse: {exc}")
        elif path.suffix == ".safetensors":
            try:
                load_tensors(path)
            except Exception as exc:  # noqa: BLE001 - report every kind of failure
                problems.append(f"{path.relative_to(folder)} does not open: {exc}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- the shared working folder
@dataclass
class Work:
    """The shared working folder (cwd of every command), with what was built in it."""

    path: Path
    train: subprocess.CompletedProcess[str]
    lut: subprocess.CompletedProcess[str]
    seconds: float
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.path / RUN

    @property
    def lut_path(self) -> Path:
        return self.path / LUT_NAME


def get_work(factory: pytest.TempPathFactory) -> Work:
    """The shared working folder, built on first use (nas-train + nas-build-lut, real processes)."""
    if "work" in _STATE:
        return _STATE["work"]
    if "work_error" in _STATE:
        pytest.fail(_STATE["work_error"])
    root = factory.mktemp("nas-work")
    t0 = time.monotonic()
    train = cli("nas-train", *TRAIN_ARGS, "--out", RUN, "--no-progress", cwd=root, timeout=300)
    if train.returncode != 0:
        _STATE["work_error"] = f"nas-train failed: {describe(train)}"
        pytest.fail(_STATE["work_error"])
    lut = cli("nas-build-lut", "--device", DEVICE, "--no-progress", cwd=root, timeout=300)
    if lut.returncode != 0 or not (root / LUT_NAME).is_file():
        _STATE["work_error"] = f"nas-build-lut failed: {describe(lut)}"
        pytest.fail(_STATE["work_error"])
    _STATE["work"] = Work(root, train, lut, time.monotonic() - t0)
    return _STATE["work"]


@dataclass
class Budget:
    """A latency and parameter budget between the space's smallest and largest configs."""

    latency_ms: float
    params: int
    latency_text: str
    params_text: str
    smallest_ms: float
    largest_ms: float
    smallest_params: int
    largest_params: int


def space_extremes(work: Work) -> dict[str, Any]:
    """Predicted latency (from the LUT, with latency.predict_latency) and exact params of the extremes."""
    if "extremes" in work.cache:
        return work.cache["extremes"]
    from latency import LatencyTable, predict_latency
    from search_spaces import count_params, lower
    from supernet.run import load_run

    run = load_run(work.run_dir)
    lut = LatencyTable.load(work.lut_path)
    out = {}
    for tag, arch in (("smallest", run.space.smallest()), ("largest", run.space.largest())):
        specs = lower(arch, resolution=run.resolution, num_classes=run.num_classes, in_chans=run.in_chans,
                      distillation=lut.distillation)
        out[tag] = (arch, predict_latency(arch, lut), count_params(specs))
    work.cache["extremes"] = out
    return out


def budget(work: Work) -> Budget:
    """X strictly between the smallest and largest predicted latency (near the top, so slimming is short).

    The slim search always continues 3 steps after the budgets are met and evaluates every
    action per step, so a budget near the largest config keeps the typed command short.
    """
    ex = space_extremes(work)
    (_, s_ms, s_p), (_, l_ms, l_p) = ex["smallest"], ex["largest"]
    assert s_ms < l_ms and s_p < l_p, ex
    x = float(f"{s_ms + 0.995 * (l_ms - s_ms):.4f}")
    y_k = (l_p - 1) // 1000
    assert s_ms < x < l_ms and s_p < y_k * 1000 < l_p
    return Budget(x, y_k * 1000, f"{x:.4f}ms", f"{y_k}K", s_ms, l_ms, s_p, l_p)


def default_search(work: Work) -> tuple[Budget, subprocess.CompletedProcess[str]]:
    """``nas-search --latency <X>ms --max-params <Y>K`` typed exactly like that, once per session."""
    if "search" not in work.cache:
        b = budget(work)
        r = cli("nas-search", "--latency", b.latency_text, "--max-params", b.params_text, cwd=work.path,
                timeout=600)
        work.cache["search"] = (b, r)
    b, r = work.cache["search"]
    if r.returncode != 0:
        pytest.fail(f"the default nas-search failed: {describe(r)}")
    return b, r


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]
