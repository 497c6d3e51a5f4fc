"""Shared helpers of the tests that run the ``nas-*`` commands (a plain module; fixtures are in conftest).

Everything runs as users type it: real ``nas-*`` processes in a working folder, real files.
:func:`build_work` makes the working folder (``nas-train`` on ``synthetic:512`` at 32 px for one
epoch, then ``nas-build-lut --device local-cpu``); :func:`build_searched`, :func:`build_extracted`
and :func:`build_iphone` continue it in copies. conftest builds each once per session and hands
it out as a read-only :class:`Shared` folder: a test that runs a command takes a private copy
first (:func:`copy_folder`, :func:`copy_workdir`), and conftest fails any test that changes one.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from search_spaces.fileio import atomic_write_json

BIN = Path(sys.executable).parent
TRAIN_ARGS = ("--space", "efficientformer_v2_demo", "--dataset", "synthetic:512", "--resolution", "32",
              "--epochs", "1", "--batch-size", "64", "--threads", "1")
RUN = "runs/tiny"
DEVICE = "local-cpu"
RESOLUTION = 32
LUT_NAME = f"lut-{DEVICE}-{RESOLUTION}.json"


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


def cli_many(commands: list[tuple[str, tuple[str, ...], Path]], *, timeout: float = 600,
             workers: int = 2) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands ``(name, args, cwd)``, ``workers`` at a time; results in the given order.

    Each is one single-threaded process, so two at a time use the test machine's two cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(cli, name, *args, cwd=cwd, timeout=timeout) for name, args, cwd in commands]
        return [f.result() for f in futures]


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


def _stopped(pid: int) -> bool:
    """True once ``pid`` is stopped (or gone): its state in /proc is T, t, Z or X."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(")") + 2] in "TtZX"


def interrupt(proc: subprocess.Popen[bytes], *, unfinished: Callable[[], bool]) -> None:
    """SIGKILL a run started by :func:`popen` that is provably mid-run, or fail the test.

    The process group is stopped first (SIGSTOP, then wait until the kernel reports it
    stopped); only then is ``unfinished()`` checked (e.g. "the final output file does not exist
    yet") and the group killed. A run that finished before the stop fails the test with that
    message, instead of passing or failing by winning a race.
    """
    try:
        os.killpg(proc.pid, signal.SIGSTOP)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while proc.poll() is None and not _stopped(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    mid_run = proc.poll() is None and _stopped(proc.pid) and unfinished()
    kill_group(proc)
    if not mid_run:
        pytest.fail("the run had already finished (or could not be stopped) when it was to be killed; "
                    "make the run longer")


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
    """A fresh working folder: a copy of the supernet run and of the local-cpu LUT (files copied, never linked)."""
    dst.mkdir(parents=True, exist_ok=True)
    if with_run:
        shutil.copytree(src / RUN, dst / RUN, copy_function=shutil.copy2)
    if with_lut:
        shutil.copy2(src / LUT_NAME, dst / LUT_NAME)
    return dst


def copy_folder(src: Path, dst: Path) -> Path:
    """A private copy of a whole shared folder (every file copied: nothing is shared with the original)."""
    shutil.copytree(src, dst, copy_function=shutil.copy2, symlinks=False, dirs_exist_ok=True)
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



# ----------------------------------------------------------------------------- the shared, read-only folders
def fingerprint(folder: Path) -> dict[str, str | None]:
    """Every path under ``folder`` (relative) -> SHA-256 of the file, None for folders; no __pycache__."""
    return {rel: (None if meta is None else sha256(folder / rel)) for rel, meta in tree(folder).items()}


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    return f"new {new[:8]}, removed {gone[:8]}, changed {changed[:8]}"


@dataclass
class Shared:
    """A working folder built once per session and then only read (conftest checks that).

    Attributes:
        path: the folder (the cwd of the commands that built it).
        procs: the commands that built it, by name (``train``, ``lut``, ``search``, ...).
        info: what the build chose (e.g. the search ``budget``).
        snapshot: :func:`tree` of the folder when it was built (paths, sizes, mtimes).
        digests: :func:`fingerprint` of the folder when it was built.
        cache: pure functions of the folder's files, computed once (e.g. :func:`space_extremes`).
    """

    path: Path
    procs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    snapshot: dict[str, Any] = field(default_factory=dict)
    digests: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.path / RUN

    @property
    def lut_path(self) -> Path:
        return self.path / LUT_NAME

    def seal(self) -> Shared:
        """Record the folder as built: from now on it must not change."""
        self.snapshot, self.digests = tree(self.path), fingerprint(self.path)
        return self

    def save(self, record: Path) -> None:
        """Write everything but ``cache`` to ``record`` (JSON), for another worker's :meth:`load`."""
        def encode(v: Any) -> Any:
            if isinstance(v, Budget):
                return {"budget": asdict(v)}
            if isinstance(v, Path):
                return {"path": str(v)}
            raise TypeError(f"cannot record {type(v).__name__} in a shared folder's info")
        procs = {k: {"args": [str(a) for a in p.args], "returncode": p.returncode, "stdout": p.stdout,
                     "stderr": p.stderr} for k, p in self.procs.items()}
        data = {"path": str(self.path), "procs": procs, "info": {k: encode(v) for k, v in self.info.items()},
                "snapshot": self.snapshot, "digests": self.digests}
        atomic_write_json(record, data)

    @classmethod
    def load(cls, record: Path) -> Shared:
        """The folder another worker built and recorded with :meth:`save`."""
        data = json.loads(record.read_text(encoding="utf-8"))
        procs = {k: subprocess.CompletedProcess(p["args"], p["returncode"], p["stdout"], p["stderr"])
                 for k, p in data["procs"].items()}
        info = {k: Budget(**v["budget"]) if "budget" in v else Path(v["path"]) for k, v in data["info"].items()}
        snapshot = {k: None if v is None else tuple(v) for k, v in data["snapshot"].items()}
        return cls(Path(data["path"]), procs, info, snapshot, data["digests"])

    def check_unchanged(self, *, deep: bool = False) -> None:
        """Fail when anything under the folder changed since :meth:`seal` (``deep``: compare SHA-256s)."""
        now = tree(self.path)
        if now != self.snapshot:
            before, self.snapshot = self.snapshot, now   # later tests answer only for their own writes
            pytest.fail(f"the shared folder {self.path} was written to (tests must work in a copy): "
                        f"{_diff(before, now)}")
        if deep:
            digests = fingerprint(self.path)
            if digests != self.digests:
                pytest.fail(f"a file of the shared folder {self.path} was rewritten: {_diff(self.digests, digests)}")


def _must(r: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    if r.returncode != 0 or "Traceback" in r.stderr + r.stdout:
        pytest.fail(f"{what} failed: {describe(r)}")
    return r


def build_work(root: Path) -> Shared:
    """nas-train + nas-build-lut --device local-cpu in ``root`` (real processes)."""
    train = _must(cli("nas-train", *TRAIN_ARGS, "--out", RUN, "--no-progress", cwd=root, timeout=300), "nas-train")
    lut = _must(cli("nas-build-lut", "--device", DEVICE, "--no-progress", cwd=root, timeout=300), "nas-build-lut")
    if not (root / LUT_NAME).is_file():
        pytest.fail(f"nas-build-lut wrote no {LUT_NAME}: {describe(lut)}")
    return Shared(root, {"train": train, "lut": lut}).seal()


def build_searched(work: Shared, root: Path) -> Shared:
    """``nas-search --latency <X>ms --max-params <Y>K`` typed exactly like that, in a copy of ``work``."""
    copy_folder(work.path, root)
    b = budget(work)
    r = _must(cli("nas-search", "--latency", b.latency_text, "--max-params", b.params_text, cwd=root, timeout=600),
              "the default nas-search")
    return Shared(root, {"search": r}, {"budget": b}).seal()


def build_extracted(searched: Shared, root: Path) -> Shared:
    """``nas-extract subnet.json`` as typed, in a copy of ``searched``; ``info["folder"]`` is what it wrote."""
    import re

    copy_folder(searched.path, root)
    r = _must(cli("nas-extract", "subnet.json", cwd=root, timeout=600), "nas-extract subnet.json")
    m = re.search(r"^extracted model: (\S+)$", r.stdout, flags=re.M)
    if not m or not (root / m.group(1)).is_dir():
        pytest.fail(f"nas-extract did not name the folder it wrote: {describe(r)}")
    return Shared(root, {"extract": r}, {"folder": root / m.group(1)}).seal()


def build_iphone(work: Shared, root: Path) -> Shared:
    """``nas-build-lut --device iphone12`` as typed (bundle + predicted LUT), in a copy of ``work``."""
    copy_workdir(work.path, root)   # the run and a local-cpu LUT, like after make demo
    r = _must(cli("nas-build-lut", "--device", "iphone12", cwd=root, timeout=900), "nas-build-lut --device iphone12")
    return Shared(root, {"lut": r}).seal()


# ----------------------------------------------------------------------------- budgets
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


def space_extremes(work: Shared) -> dict[str, Any]:
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


def budget(work: Shared) -> Budget:
    """X strictly between the smallest and largest predicted latency (near the top, so slimming is short).

    The default slim search evaluates every action per step and continues 3 steps after the
    budgets are met, so a budget near the largest config keeps the typed command short. The
    largest config still violates both (params: largest - 1000). Budgets that bind hard are
    in test_search_budgets.py.
    """
    ex = space_extremes(work)
    (_, s_ms, s_p), (_, l_ms, l_p) = ex["smallest"], ex["largest"]
    assert s_ms < l_ms and s_p < l_p, ex
    x = float(f"{s_ms + 0.995 * (l_ms - s_ms):.4f}")
    y_k = (l_p - 1) // 1000
    assert s_ms < x < l_ms and s_p < y_k * 1000 < l_p
    return Budget(x, y_k * 1000, f"{x:.4f}ms", f"{y_k}K", s_ms, l_ms, s_p, l_p)


def binding_budget(work: Shared, *, way: float = 0.4, params_fraction: float = 0.5) -> Budget:
    """A budget that binds: latency ``way`` of the way from the smallest to the largest config, params a fraction of the largest's.

    Not 40% of the largest config's latency: at 32 px fixed per-block costs dominate, and the
    smallest config alone takes 35-40% of the largest's time (README: 0.142 vs 0.381 ms), so
    that budget would leave the smallest config or nothing. 40% of the way leaves about half
    of the space's random configs feasible (checked by the tests that use it).
    """
    ex = space_extremes(work)
    (_, s_ms, s_p), (_, l_ms, l_p) = ex["smallest"], ex["largest"]
    x = float(f"{s_ms + way * (l_ms - s_ms):.4f}")
    y_k = int(params_fraction * l_p) // 1000
    assert s_ms < x < l_ms and s_p < y_k * 1000 < l_p, ex
    return Budget(x, y_k * 1000, f"{x:.4f}ms", f"{y_k}K", s_ms, l_ms, s_p, l_p)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]
