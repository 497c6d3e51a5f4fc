"""Tests of supernet training: a real tiny run, exact resume after SIGKILL, and bad input via the CLI.

Everything runs for real on synthetic data (no mocks): the Python API in-process, ``nas-train``
as ``python -m nas.cli_train`` subprocesses with one thread each. No test asserts on a timing.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latency.runtime import torch_threads
from search_spaces import get_space
from supernet import Supernet
from supernet.checkpoint import load_tensors
from supernet.train import TrainConfig, TrainResult, train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CLI = [sys.executable, "-m", "nas.cli_train"]
RUN_TIMEOUT_S = 300

API_CFG = TrainConfig(space="efficientformer_v2_demo", dataset="synthetic:512", resolution=32, epochs=2,
                      batch_size=64, seed=1, threads=1)


def nas_train(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- (a) a real tiny run


@pytest.fixture(scope="module")
def api_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, dict[str, int]]:
    run_dir = tmp_path_factory.mktemp("api") / "run"
    steps: list[int] = []
    with torch_threads(2):  # not the run's 1 thread, so that a run that leaves 1 behind is caught
        threads_before = torch.get_num_threads()
        result = train(API_CFG, run_dir, on_step=steps.append)
        threads = {"before": threads_before, "after": torch.get_num_threads(), "steps": len(steps)}
    return result, threads


def test_api_run_writes_the_run_folder(api_run: tuple[TrainResult, dict[str, int]]) -> None:
    result, info = api_run
    run_dir = result.run_dir
    assert not result.already_complete and result.resumed_from_step == 0
    for name in ("supernet.safetensors", "supernet.json", "train_log.csv", "checkpoint.safetensors"):
        assert (run_dir / name).is_file(), f"{name} is missing"
    assert not tmp_files(run_dir)

    meta = json.loads((run_dir / "supernet.json").read_text())
    for key in ("schema", "space", "family", "resolution", "num_classes", "dataset", "recipe", "metrics", "complete"):
        assert key in meta, f"supernet.json lacks {key!r}"
    assert meta["complete"] is True
    assert meta["family"] == "efficientformer_v2" and meta["space_name"] == "efficientformer_v2_demo"
    assert meta["resolution"] == 32 and meta["num_classes"] == 10
    assert meta["recipe"] == API_CFG.to_dict()
    assert "synthetic:512" in json.dumps(meta["dataset"])
    assert meta["weights_sha256"] == hashlib.sha256((run_dir / "supernet.safetensors").read_bytes()).hexdigest()
    for key in ("val_acc_largest", "val_acc_smallest", "test_acc_largest", "test_acc_smallest"):
        assert 0.0 <= meta["metrics"][key] <= 1.0
        assert result.metrics[key] == meta["metrics"][key]

    with open(run_dir / "train_log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2], "one row per epoch"
    steps_per_epoch = (512 - 51) // 64
    assert [int(r["step"]) for r in rows] == [steps_per_epoch, 2 * steps_per_epoch]
    assert info["steps"] == 2 * steps_per_epoch
    for r in rows:
        for col in ("val_acc_largest", "val_acc_smallest"):
            assert 0.0 <= float(r[col]) <= 1.0
        assert float(r["train_loss"]) > 0
    assert len(result.log) == 2

    # The largest subnet learned something: 10 classes, chance is 0.1.
    assert result.metrics["val_acc_largest"] >= 0.3, result.metrics
    assert result.metrics["test_acc_largest"] >= 0.3, result.metrics

    # The weights load into a fresh supernet of the recorded space, strictly.
    tensors, _ = load_tensors(run_dir / "supernet.safetensors")
    space = get_space("efficientformer_v2_demo").with_stem_stride(2)
    net = Supernet(space, num_classes=10, resolution=32, in_chans=3)
    net.load_state_dict(tensors, strict=True)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_api_rerun_is_already_complete(api_run: tuple[TrainResult, dict[str, int]]) -> None:
    result, _ = api_run
    weights = (result.run_dir / "supernet.safetensors").read_bytes()
    steps: list[int] = []
    again = train(API_CFG, result.run_dir, on_step=steps.append)
    assert again.already_complete and steps == [], "a finished run must not be trained again"
    assert again.metrics == result.metrics
    assert (result.run_dir / "supernet.safetensors").read_bytes() == weights


def test_train_restores_thread_count(api_run: tuple[TrainResult, dict[str, int]]) -> None:
    """STYLE.md: global torch state (threads) is changed only inside a context that restores it."""
    _, info = api_run
    assert info["after"] == info["before"], (
        f"train(threads=1) left torch.get_num_threads() at {info['after']} (was {info['before']})")


# ----------------------------------------------------------------------------- (b) exact resume after SIGKILL


def _resume_args(out: Path, epochs: int) -> list[str]:
    return ["--dataset", "synthetic:512", "--epochs", str(epochs), "--batch-size", "32", "--save-every", "3",
            "--threads", "1", "--seed", "3", "--no-progress", "--out", str(out)]


def _kill_mid_run(out: Path, epochs: int) -> int | None:
    """Start a run, SIGKILL it once a checkpoint of step >= 6 exists; the checkpoint step, or None if it finished."""
    ckpt = out / "checkpoint.safetensors"
    proc = subprocess.Popen([*CLI, *_resume_args(out, epochs)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        last_mtime = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                stderr = proc.stderr.read() if proc.stderr else ""
                assert proc.returncode == 0, f"nas-train failed (rc {proc.returncode}): {stderr}"
                return None
            if ckpt.is_file() and ckpt.stat().st_mtime_ns != last_mtime:
                last_mtime = ckpt.stat().st_mtime_ns
                _, meta = load_tensors(ckpt)
                if meta["step"] >= 6 and not (out / "supernet.json").exists():
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=60)
                    assert proc.returncode == -signal.SIGKILL
                    if (out / "supernet.json").exists():
                        return None  # finished in the instant before the kill
                    _, meta = load_tensors(ckpt)  # it may have moved on before the kill landed
                    assert 6 <= meta["step"] < meta["total"]
                    return int(meta["step"])
            time.sleep(0.05)
        pytest.fail("no checkpoint of step >= 6 appeared in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture(scope="module")
def resumed_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Run A: SIGKILLed after a checkpoint of step >= 6, then rerun to completion. Run B: uninterrupted."""
    tmp_path = tmp_path_factory.mktemp("resume")
    killed_at = None
    for epochs in (2, 4, 8):  # if the run finishes before the kill, make it longer rather than skip
        a = tmp_path / f"A{epochs}"
        killed_at = _kill_mid_run(a, epochs)
        if killed_at is not None:
            break
    assert killed_at is not None, "could not interrupt the run before it finished"
    assert not (a / "supernet.safetensors").exists()
    resumed = nas_train(*_resume_args(a, epochs))
    assert resumed.returncode == 0, resumed.stderr
    b = tmp_path / "B"
    straight = nas_train(*_resume_args(b, epochs))
    assert straight.returncode == 0, straight.stderr
    return {"a": a, "b": b, "killed_at": killed_at, "resumed": resumed, "straight": straight}


@pytest.mark.timeout(900)
def test_resume_after_sigkill_is_exact(resumed_pair: dict[str, object]) -> None:
    a, b, killed_at = resumed_pair["a"], resumed_pair["b"], resumed_pair["killed_at"]
    resumed, straight = resumed_pair["resumed"], resumed_pair["straight"]
    m = re.search(r"resuming .* at step (\d+)", resumed.stderr)
    assert m and int(m.group(1)) == killed_at, f"expected a resume at step {killed_at}:\n{resumed.stderr}"
    assert "resuming" not in straight.stderr

    for name in ("supernet.safetensors", "checkpoint.safetensors"):
        ta, _ = load_tensors(a / name)
        tb, _ = load_tensors(b / name)
        assert ta.keys() == tb.keys(), name
        different = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not different, f"{name}: {len(different)} tensors differ after resume, e.g. {different[:5]}"
    ja = json.loads((a / "supernet.json").read_text())
    jb = json.loads((b / "supernet.json").read_text())
    assert ja["weights_sha256"] == jb["weights_sha256"]
    for key in ("val_acc_largest", "val_acc_smallest", "test_acc_largest", "test_acc_smallest"):
        assert ja["metrics"][key] == jb["metrics"][key], key
    assert [r["step"] for r in ja["log"]] == [r["step"] for r in jb["log"]]
    assert [r["val_acc_largest"] for r in ja["log"]] == [r["val_acc_largest"] for r in jb["log"]]
    assert tmp_files(a) == [] and tmp_files(b) == [], "temporary files were left behind"


def test_resume_keeps_the_epoch_train_loss(resumed_pair: dict[str, object]) -> None:
    """The interrupted epoch's ``train_loss`` must average the whole epoch, not only the steps after the resume."""
    a, b = resumed_pair["a"], resumed_pair["b"]
    with open(a / "train_log.csv", newline="") as fa, open(b / "train_log.csv", newline="") as fb:
        rows_a, rows_b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-6), (
            f"epoch {ra['epoch']}: train_loss {ra['train_loss']} after resume, {rb['train_loss']} uninterrupted")


# ----------------------------------------------------------------------------- (c) bad input via the CLI


BAD_INPUT = {
    "epochs 0": (["--epochs", "0"], r"--epochs"),
    "space without supernet": (["--space", "efficientvit"], r"efficientvit"),
    "unknown space": (["--space", "nope"], r"'nope'"),
    "unknown dataset": (["--dataset", "nope"], r"'nope'"),
    "missing image folder": (["--dataset", "imagefolder:/nonexistent"], r"/nonexistent"),
    "batch size 1": (["--batch-size", "1"], r"--batch-size"),
    "negative lr": (["--lr", "-1"], r"--lr"),
    "corrupt config": (["--config", "{bad_json}"], r"not valid JSON"),
    "resume without checkpoint": (["--resume"], r"--resume"),
    "checkpoint of other settings": ([], r"different training settings"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case: str, tmp_path: Path,
                                         api_run: tuple[TrainResult, dict[str, int]]) -> None:
    args, pattern = BAD_INPUT[case]
    bad_json = tmp_path / "run.json"
    bad_json.write_text('{"epochs": 2,\n')
    out = tmp_path / "run"
    before: dict[str, bytes] = {}
    if case == "checkpoint of other settings":
        out.mkdir()
        shutil.copy(api_run[0].run_dir / "checkpoint.safetensors", out / "checkpoint.safetensors")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = [a.replace("{bad_json}", str(bad_json)) for a in args]
    proc = nas_train("--dataset", "synthetic:512", "--batch-size", "32", "--seed", "3", "--threads", "1",
                     "--no-progress", "--out", str(out), *args, timeout=120)
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    # One error line, last; INFO log lines (e.g. the dataset summary) may precede it.
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("nas-train: error: "), proc.stderr
    assert re.search(pattern, errors[0]), errors[0]
    if before:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the run folder was modified"
    else:
        assert not out.exists(), "a run folder was created for a failed run"


# ----------------------------------------------------------------------------- the GPU recipe's switches, on CPU
def test_bf16_autocast_trains_on_cpu(tmp_path: Path) -> None:
    """The GPU recipe trains under bf16 autocast; the same code path runs on CPU when asked (--bf16 true)."""
    cfg = TrainConfig(space="efficientformer_v2_demo", dataset="synthetic:256", resolution=32, epochs=1,
                      batch_size=64, seed=0, threads=1, bf16=True)
    result = train(cfg, tmp_path / "run")
    assert result.log and all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result.log), result.log
    meta = json.loads((tmp_path / "run" / "supernet.json").read_text())
    assert meta["recipe"]["bf16"] is True
    assert 0.0 <= result.metrics["val_acc_largest"] <= 1.0
