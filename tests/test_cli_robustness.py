"""Robustness of the five command-line tools (issue 7).

1. Bad input: for each CLI, a table of bad inputs, each run as a real process in a fresh copy of
   the working folder (supernet run, LUT, a valid subnet.json), one test per case. The cases'
   processes run two at a time ahead of their tests, each under its own timeout, and each test
   waits only for its own case, so a case that hangs fails alone. Each must exit with code 2,
   print exactly one error line (``<prog>: error: ...``) that names the problem (a keyword
   per case), print no traceback, and leave the folder exactly as it was (no new files or
   folders, no file changed). The only other lines allowed on stderr are the tool's own
   ``<prog>: ...`` notices of the defaults it chose (DESIGN: defaults are announced); a log
   line, a warning or a traceback is a second line and fails the case.
2. SIGKILL: ``nas-train``, ``nas-build-lut`` and ``nas-search`` are killed mid-run (stopped first,
   and killed only once it is proven that they had not finished: :func:`_fixtures_search.interrupt`);
   the same command run again finishes with exit 0, and no output file is ever truncated (every
   JSON parses, every safetensors file opens, no temporary file remains).
3. No pickle: our own sources never unpickle (no pickle imports, ``torch.load`` only with
   ``weights_only=True``, no ``np.load(..., allow_pickle=True)``, no ``torch.save``).
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import signal
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ============================================================================ case set-up helpers
Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    keywords: tuple[str, ...]
    setup: Setup | None = None
    prog: str = ""

    def of(self, prog: str) -> Case:
        return Case(self.id, self.args, self.keywords, self.setup, prog)


def _write(name: str, text: str) -> Setup:
    def setup(d: Path) -> None:
        (d / name).write_text(text)
    return setup


def _mkdir(name: str) -> Setup:
    def setup(d: Path) -> None:
        (d / name).mkdir(parents=True, exist_ok=True)
    return setup


def _remove(name: str) -> Setup:
    def setup(d: Path) -> None:
        p = d / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return setup


def _truncated_lut(name: str = F.LUT_NAME) -> Setup:
    def setup(d: Path) -> None:
        text = (d / F.LUT_NAME).read_text()
        (d / name).unlink(missing_ok=True)
        (d / name).write_text(text[: len(text) // 3])
    return setup


def _edited_lut(name: str, edit: Callable[[dict], None]) -> Setup:
    def setup(d: Path) -> None:
        data = json.loads((d / F.LUT_NAME).read_text())
        edit(data)
        (d / name).write_text(json.dumps(data))
    return setup


def _drop_head_entries(data: dict) -> None:
    """An interrupted build: the head entries were never measured (every config needs one)."""
    for key in [k for k in data["entries"] if k.startswith("ef2.head")]:
        del data["entries"][key]


def _edited_subnet(edit: Callable[[dict], None], name: str = "subnet.json") -> Setup:
    def setup(d: Path) -> None:
        data = json.loads((d / "subnet.json").read_text())
        edit(data)
        (d / name).write_text(json.dumps(data))
    return setup


def _set(path: str, value) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


_DELETE = object()


def _truncated_subnet(d: Path) -> None:
    text = (d / "subnet.json").read_text()
    (d / "subnet.json").write_text(text[:200])


def _corrupt_weights(d: Path) -> None:
    p = d / F.RUN / "supernet.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _valid_subnet(d: Path) -> None:
    """A subnet.json as nas-search writes it, for this folder's supernet run (smallest config)."""
    from search_spaces.subnet_file import SubnetFile
    from supernet.run import load_run

    run = load_run(d / F.RUN, check_weights=False)
    dist = run.meta.get("distillation", True)
    sub = SubnetFile(run.space.smallest(), run.resolution, run.num_classes, run.in_chans,
                     dist if isinstance(dist, bool) else True, {"params": 1},
                     {"supernet_run": str((d / F.RUN).resolve()), "supernet_sha256": run.weights_sha256,
                      "space_name": run.space.name, "space_hash": run.space.hash})
    sub.save(d / "subnet.json")


# ============================================================================ the check of one case
NOTICE_OK = "the tool's own notices"


CASE_TIMEOUT_S = 240


def _run_bad_input(case: Case, work: F.Shared, folder: Path) -> list[str]:
    """Run one case in a fresh copy of the working folder; return the problems found (none: pass)."""
    import subprocess

    prog = case.prog
    d = F.copy_workdir(work.path, folder)
    _valid_subnet(d)
    if case.setup is not None:
        case.setup(d)
    before = F.tree(d)
    try:
        r = F.cli(prog, *case.args, cwd=d, timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [f"did not finish within {CASE_TIMEOUT_S} s: {prog} {' '.join(case.args)}"]
    after = F.tree(d)

    problems = []
    if r.returncode != 2:
        problems.append(f"exit code {r.returncode}, expected 2")
    if "Traceback" in r.stderr or "Traceback" in r.stdout:
        problems.append("printed a traceback")
    err = F.lines(r.stderr)
    errors = [ln for ln in err if ln.startswith(f"{prog}: error:")]
    others = [ln for ln in err if not ln.startswith(f"{prog}: ")]
    if len(errors) != 1 or others:
        problems.append(f"stderr must hold exactly one '{prog}: error:' line and nothing but {NOTICE_OK}; "
                        f"got {len(errors)} error line(s) and {len(others)} other line(s)")
    if errors:
        missing = [k for k in case.keywords if k.lower() not in errors[0].lower()]
        if missing:
            problems.append(f"the error line does not name the problem (missing {missing})")
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    if new:
        problems.append(f"left new files/folders behind: {new}")
    if gone:
        problems.append(f"removed files/folders: {gone}")
    if changed:
        problems.append(f"modified files: {changed}")
    if problems:
        problems.append(f"command: {prog} {' '.join(case.args)}\n--- stderr\n{r.stderr[-3000:]}\n"
                        f"--- stdout\n{r.stdout[-1500:]}")
    return problems


@pytest.fixture(scope="module")
def bad_input_runs(request: pytest.FixtureRequest, work: F.Shared,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Future]]:
    """Start every selected bad-input case, two at a time, in the order their tests will run.

    Each case is one short-lived process with its own timeout; its test waits for that case
    alone, so a case that hangs or errors fails only its own test.
    """
    cases = []
    for item in request.session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if isinstance(case, Case) and case.prog and case not in cases:
            cases.append(case)
    root = tmp_path_factory.mktemp("bad-input")
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {(c.prog, c.id): pool.submit(_run_bad_input, c, work, root / f"{c.prog}-{c.id}") for c in cases}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check(case: Case, runs: dict[tuple[str, str], Future]) -> None:
    problems = runs[(case.prog, case.id)].result(timeout=2 * CASE_TIMEOUT_S)
    assert not problems, f"{case.prog} [{case.id}]:\n  - " + "\n  - ".join(problems)


def _ids(cases: list[Case]) -> list[str]:
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), ids
    return ids


# ============================================================================ nas-train
_T = ("--space", "efficientformer_v2_demo", "--dataset", "synthetic:512", "--resolution", "32", "--epochs", "1",
      "--batch-size", "64", "--threads", "1", "--no-progress", "--out", "runs/new")

TRAIN_CASES = [
    Case("unknown-space", (*_T, "--space", "nope"), ("nope", "efficientformer_v2_demo")),
    Case("empty-imagefolder", (*_T, "--dataset", "imagefolder:EMPTY"), ("EMPTY", "empty"), _mkdir("EMPTY")),
    Case("negative-epochs", (*_T, "--epochs", "-1"), ("--epochs",)),
    Case("zero-batch", (*_T, "--batch-size", "0"), ("--batch-size",)),
    Case("nan-lr", (*_T, "--lr", "nan"), ("--lr",)),
    Case("unknown-device", (*_T, "--device", "tpu"), ("tpu",)),
    Case("truncated-config", (*_T, "--config", "cfg.json"), ("cfg.json", "JSON"), _write("cfg.json", '{"epochs": 1, "l')),
    Case("config-unknown-key", (*_T, "--config", "cfg.json"), ("bogus_key",), _write("cfg.json", '{"bogus_key": 1}')),
    # flags override --config, so this case gives every setting in the file
    Case("config-wrong-type", ("--config", "cfg.json", "--out", "runs/new", "--no-progress"), ("epochs", "two"),
         _write("cfg.json", json.dumps({"space": "efficientformer_v2_demo", "dataset": "synthetic:512",
                                        "resolution": 32, "epochs": "two", "batch_size": 64, "threads": 1}))),
    Case("resume-without-checkpoint", (*_T, "--resume"), ("--resume", "checkpoint")),
    Case("batch-larger-than-dataset", (*_T, "--dataset", "synthetic:64"), ("batch",)),
    Case("odd-resolution", (*_T, "--resolution", "33"), ("resolution 33",)),
    Case("other-settings-in-run-folder", (*_T, "--out", F.RUN, "--epochs", "2"), ("different training settings",)),
]


TRAIN_CASES = [c.of("nas-train") for c in TRAIN_CASES]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=_ids(TRAIN_CASES))
def test_nas_train_bad_input(case: Case, bad_input_runs: dict) -> None:
    _check(case, bad_input_runs)


# ============================================================================ nas-build-lut
_L = ("--device", "local-cpu", "--no-progress")

LUT_CASES = [
    Case("no-device", ("--no-progress",), ("--device", "local-cpu")),
    Case("unknown-device", ("--device", "pixel9"), ("pixel9", "local-cpu", "iphone12", "snapdragon855")),
    Case("shard-3-of-2", (*_L, "--shard", "3/2"), ("--shard", "3/2")),
    Case("odd-resolution", (*_L, "--resolution", "33"), ("resolution 33",)),
    Case("validate-with-shard", (*_L, "--validate", "2", "--shard", "1/2"), ("--validate",)),
    Case("unknown-space", (*_L, "--space", "nope"), ("nope", "efficientformer_v2_demo")),
    Case("missing-supernet", (*_L, "--supernet", "nowhere"), ("nowhere",)),
    Case("no-run-here", _L, ("nas-train",), _remove("runs")),
    Case("merge-truncated", ("--merge", "trunc.json"), ("trunc.json", "JSON"), _truncated_lut("trunc.json")),
    Case("out-truncated", (*_L, "--out", "trunc.json"), ("trunc.json",), _truncated_lut("trunc.json")),
    Case("default-lut-truncated", _L, (F.LUT_NAME,), _truncated_lut()),
    Case("out-other-resolution", (*_L, "--out", "lut-64.json"), ("resolution",),
         _edited_lut("lut-64.json", _set("resolution", 64))),
    Case("device-file-corrupt", ("--device-file", "pixel.json"), ("pixel.json",), _write("pixel.json", '{"name": ')),
]


LUT_CASES = [c.of("nas-build-lut") for c in LUT_CASES]


@pytest.mark.parametrize("case", LUT_CASES, ids=_ids(LUT_CASES))
def test_nas_build_lut_bad_input(case: Case, bad_input_runs: dict) -> None:
    _check(case, bad_input_runs)


# ============================================================================ nas-search
SEARCH_CASES = [
    Case("bare-number", ("--latency", "1.6", "--max-params", "5M"), ("--latency", "1.6", "unit")),
    Case("unknown-unit", ("--latency", "1.6xs"), ("1.6xs", "unit")),
    Case("negative-latency", ("--latency=-1ms",), ("-1ms", "positive")),
    Case("nan-latency", ("--latency", "nanms"), ("nanms",)),
    Case("negative-params", ("--latency", "1ms", "--max-params=-5M"), ("--max-params", "positive")),
    Case("duplicate-device", ("--latency", "1ms", "--latency", "local-cpu=2ms"), ("local-cpu", "twice")),
    Case("unknown-device", ("--latency", "pixel9=1ms"), ("pixel9", "nas-build-lut --device pixel9")),
    Case("truncated-lut", ("--latency", "1ms"), (F.LUT_NAME, "JSON"), _truncated_lut()),
    Case("lut-other-resolution", ("--latency", "1ms", "--lut", "lut-64.json"), ("resolution 64",),
         _edited_lut("lut-64.json", _set("resolution", 64))),
    Case("lut-other-space", ("--latency", "1ms"), ("search space",),
         _edited_lut(F.LUT_NAME, _set("space_hash", "0123456789ab"))),
    Case("incomplete-lut", ("--latency", "1ms"), ("incomplete",), _edited_lut(F.LUT_NAME, _drop_head_entries)),
    Case("no-run-here", ("--latency", "1ms"), ("nas-train",), _remove("runs")),
    # a bad value is named before any missing file
    Case("bad-value-no-run", ("--latency", "bogus", "--max-params", "5M"), ("bogus", "unit"), _remove("runs")),
    Case("bad-params-no-run", ("--latency", "1ms", "--max-params", "5Q"), ("--max-params", "5Q"), _remove("runs")),
    Case("corrupt-supernet-weights", ("--latency", "1ms"), ("supernet.safetensors",), _corrupt_weights),
    Case("bad-storage-url", ("--latency", "1ms", "--strategy", "nsga2", "--storage", "bogus://x"), ("storage",)),
]


SEARCH_CASES = [c.of("nas-search") for c in SEARCH_CASES]


@pytest.mark.parametrize("case", SEARCH_CASES, ids=_ids(SEARCH_CASES))
def test_nas_search_bad_input(case: Case, bad_input_runs: dict) -> None:
    _check(case, bad_input_runs)


# ============================================================================ nas-extract
EXTRACT_CASES = [
    Case("missing-file", ("a.json",), ("a.json", "does not exist")),
    Case("truncated", ("subnet.json",), ("subnet.json", "JSON"), _truncated_subnet),
    Case("not-an-object", ("subnet.json",), ("object",), _write("subnet.json", "[1]")),
    Case("other-supernet", ("subnet.json",), ("another supernet",),
         _edited_subnet(_set("provenance.supernet_sha256", "0" * 64))),
    Case("other-space", ("subnet.json",), ("200",), _edited_subnet(_set("stages.1.width", 200))),
    Case("bad-resolution", ("subnet.json",), ("resolution", "32x"), _edited_subnet(_set("resolution", "32x"))),
    Case("unknown-mixer", ("subnet.json",), ("mixer", "zzz"), _edited_subnet(_set("stages.0.blocks.0.mixer", "zzz"))),
    Case("nan-metric", ("subnet.json",), ("non-finite",), _edited_subnet(_set("metrics.params", float("nan")))),
    Case("no-supernet-named", ("subnet.json",), ("--supernet",),
         _edited_subnet(_set("provenance.supernet_run", _DELETE))),
    Case("bad-format", ("subnet.json", "--formats", "pdf"), ("--formats", "pdf")),
    Case("negative-finetune", ("subnet.json", "--finetune-epochs", "-1"), ("--finetune-epochs",)),
    Case("nan-finetune-lr", ("subnet.json", "--finetune-epochs", "1", "--finetune-lr", "nan"), ("--finetune-lr",)),
]


EXTRACT_CASES = [c.of("nas-extract") for c in EXTRACT_CASES]


@pytest.mark.parametrize("case", EXTRACT_CASES, ids=_ids(EXTRACT_CASES))
def test_nas_extract_bad_input(case: Case, bad_input_runs: dict) -> None:
    _check(case, bad_input_runs)


# ============================================================================ nas-info
INFO_CASES = [
    Case("no-target", (), ("preset",)),
    Case("unknown-preset", ("nope",), ("nope", "efficientformerv2_s0")),
    Case("missing-file", ("a.json",), ("a.json", "does not exist")),
    Case("truncated", ("subnet.json",), ("subnet.json", "JSON"), _truncated_subnet),
    Case("not-an-object", ("subnet.json",), ("object",), _write("subnet.json", "[1]")),
    Case("unknown-mixer", ("subnet.json",), ("mixer",), _edited_subnet(_set("stages.0.blocks.0.mixer", "zzz"))),
    Case("nan-metric", ("subnet.json",), ("non-finite",), _edited_subnet(_set("metrics.params", float("nan")))),
    Case("zero-resolution", ("efficientformerv2_s0", "--resolution", "0"), ("resolution",)),
    Case("odd-resolution", ("efficientformerv2_s0", "--resolution", "33"), ("resolution 33",)),
    Case("zero-classes", ("efficientformerv2_s0", "--num-classes", "0"), ("--num-classes", "0")),
    Case("negative-channels", ("efficientformerv2_s0", "--in-chans", "-2"), ("--in-chans", "-2")),
    Case("missing-lut", ("subnet.json", "--lut", "a.json"), ("a.json",)),
    Case("truncated-lut", ("subnet.json", "--lut", "trunc.json"), ("trunc.json",), _truncated_lut("trunc.json")),
]


INFO_CASES = [c.of("nas-info") for c in INFO_CASES]


@pytest.mark.parametrize("case", INFO_CASES, ids=_ids(INFO_CASES))
def test_nas_info_bad_input(case: Case, bad_input_runs: dict) -> None:
    _check(case, bad_input_runs)


# ============================================================================ SIGKILL and rerun
def _check_not_truncated(folder: Path) -> None:
    """Right after a kill: JSON and safetensors files are whole (a temporary file may exist)."""
    from supernet.checkpoint import load_tensors

    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith(".tmp"):
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                load_tensors(path)


def test_kill_nas_train_then_rerun(tmp_path: Path) -> None:
    from supernet.run import load_run

    d = tmp_path / "w"
    d.mkdir()
    # 14 steps, a checkpoint after each: killed after the first, with 13 steps and two evaluations to go
    args = [*F.TRAIN_ARGS, "--dataset", "synthetic:256", "--batch-size", "32", "--epochs", "2", "--save-every", "1",
            "--out", "runs/k", "--no-progress"]
    ckpt = d / "runs" / "k" / "checkpoint.safetensors"
    final = d / "runs" / "k" / "supernet.json"
    p = F.popen("nas-train", *args, cwd=d, log=tmp_path / "train")
    try:
        F.wait_for(ckpt.is_file, proc=p, what="the first checkpoint")
        F.interrupt(p, unfinished=lambda: not final.exists())
    finally:
        F.kill_group(p)
    assert p.returncode == -signal.SIGKILL
    assert not final.exists()
    _check_not_truncated(d)

    r = F.cli("nas-train", *args, cwd=d)
    assert r.returncode == 0, F.describe(r)
    assert "resuming" in r.stderr, r.stderr
    run = load_run(d / "runs" / "k")          # complete, and the weights match the recorded checksum
    assert run.meta["complete"]
    F.check_folder_integrity(d)


def test_kill_nas_build_lut_then_rerun(work: F.Shared, tmp_path: Path) -> None:
    from latency import LatencyTable

    d = F.copy_workdir(work.path, tmp_path / "w", with_lut=False)
    # --validate 0: resuming is what is tested here (the default calibration has its own tests)
    args = ["--device", "local-cpu", "--checkpoint-every", "0.2", "--no-progress", "--validate", "0"]
    lut = d / F.LUT_NAME
    p = F.popen("nas-build-lut", *args, cwd=d, log=tmp_path / "lut")
    try:
        F.wait_for(lut.is_file, proc=p, what="the partial LUT")
        F.interrupt(p, unfinished=lambda: not LatencyTable.load(lut).complete)
    finally:
        F.kill_group(p)
    assert p.returncode == -signal.SIGKILL
    _check_not_truncated(d)
    partial = LatencyTable.load(lut)
    assert 0 < len(partial) < partial.expected_entries and not partial.complete

    r = F.cli("nas-build-lut", *args, cwd=d)
    assert r.returncode == 0, F.describe(r)
    m = re.search(r"(\d+) from an earlier run", r.stdout)
    assert m and int(m.group(1)) >= len(partial), r.stdout
    table = LatencyTable.load(lut)
    assert table.complete and len(table) == table.expected_entries
    assert set(table.keys()) == set(LatencyTable.load(work.lut_path).keys())
    F.check_folder_integrity(d)


def test_kill_nas_search_then_rerun(work: F.Shared, tmp_path: Path) -> None:
    import optuna

    from search_spaces.subnet_file import SubnetFile

    d = F.copy_workdir(work.path, tmp_path / "w")
    ex = F.space_extremes(work)
    args = ["--latency", f"{ex['largest'][1] * 1.01:.4f}ms", "--strategy", "nsga2", "--n-trials", "8",
            "--population-size", "4", "--calib-batches", "1", "--threads", "1", "--out", "runs/k"]
    cache = d / "runs" / "k" / "accuracy_cache.jsonl"
    p = F.popen("nas-search", *args, cwd=d, log=tmp_path / "search")
    try:
        F.wait_for(cache.is_file, proc=p, what="the accuracy cache")
        F.interrupt(p, unfinished=lambda: not (d / "runs" / "k" / "search.json").exists())
    finally:
        F.kill_group(p)
    assert p.returncode == -signal.SIGKILL
    _check_not_truncated(d)

    r = F.cli("nas-search", *args, cwd=d)
    assert r.returncode == 0, F.describe(r)
    study = optuna.load_study(study_name="nas-search", storage=f"sqlite:///{d / 'runs' / 'k' / 'study.db'}")
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 8
    SubnetFile.load(d / "runs" / "k" / "subnet.json")
    F.check_folder_integrity(d)


# ============================================================================ no pickle
_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def test_no_pickle_in_our_sources() -> None:
    problems = []
    files = [p for pkg in ("search_spaces", "supernet", "latency", "nas") for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20
    for path in files:
        rel = path.relative_to(ROOT)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.split(".")[0] in _PICKLERS]
                if bad:
                    problems.append(f"{where}: import {bad}")
            elif isinstance(node, ast.ImportFrom):
                mod = (node.module or "").split(".")[0]
                if mod in _PICKLERS:
                    problems.append(f"{where}: from {node.module} import ...")
                if mod in ("torch", "numpy") and any(a.name in ("load", "save") for a in node.names):
                    problems.append(f"{where}: from {node.module} import load/save (use it qualified)")
            elif isinstance(node, ast.Name) and node.id in _PICKLERS:
                problems.append(f"{where}: uses {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr in ("read_pickle", "to_pickle"):
                problems.append(f"{where}: {node.attr}")
            elif isinstance(node, ast.Call):
                fn = _dotted(node.func)
                if fn == "torch.load" and not _kw_true(node, "weights_only"):
                    problems.append(f"{where}: torch.load without weights_only=True")
                if fn == "torch.save":
                    problems.append(f"{where}: torch.save writes a pickle; use safetensors")
                if fn in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" and not (
                        isinstance(k.value, ast.Constant) and k.value.value is False) for k in node.keywords):
                    problems.append(f"{where}: {fn}(..., allow_pickle=...)")
    assert not problems, "\n".join(problems)
