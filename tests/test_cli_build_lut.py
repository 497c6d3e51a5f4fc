"""Tests of ``nas-build-lut``: defaults from a run, local builds, resume after SIGKILL, shards,
the bundle protocol end to end, iPhone bundles with a predicted LUT, validation, and bad input.

Everything is real (ONNX Runtime, CoreML conversion, the runner and the CLI as subprocesses)
on tiny spaces; no test asserts on a timing.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _fixtures_search as F
from latency import LatencyTable
from nas.cli_build_lut import main
from search_spaces import SearchSpace, StageChoices
from test_lut import tiny_v1_space

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--space", "efficientformer_v2_demo", "--resolution", "32", "--num-classes", "10", "--in-chans", "1"]


def tiny_v2() -> SearchSpace:
    mixers = ("lite", "attn")
    return SearchSpace("tiny_v2", "efficientformer_v2", (
        StageChoices((16,), (1,), (2,), "ffn"),
        StageChoices((16,), (1,), (2,), "ffn"),
        StageChoices((32,), (1, 2), (2,), "ffn", mixers, max_attn=1),
        StageChoices((32, 48), (1, 2), (2,), "ffn", mixers, max_attn=1),
    ), stem_stride=2)


def make_run(folder: Path, space: SearchSpace, *, resolution: int = 32) -> Path:
    """A finished nas-train run folder (metadata only; the LUT needs no weights)."""
    run = folder / "runs" / "tiny"
    run.mkdir(parents=True)
    weights = run / "supernet.safetensors"
    weights.write_bytes(b"placeholder weights")
    meta = {"schema": 1, "complete": True, "space": space.to_dict(), "space_name": space.name,
            "space_hash": space.hash, "family": space.family, "resolution": resolution, "num_classes": 10,
            "in_chans": 1, "distillation": None, "recipe": {"dataset": "synthetic"},
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    (run / "supernet.json").write_text(json.dumps(meta))
    return run


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nas.cli_build_lut", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_help_has_examples() -> None:
    proc = subprocess.run([sys.executable, "-m", "nas.cli_build_lut", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for text in ("--device iphone12", "--device snapdragon855", "--import", "--shard 1/2", "--merge",
                 "--validate", "--device-file", "taskset"):
        assert text in proc.stdout, text


def test_iphone12_defaults_from_run_bundle_and_predicted_lut(tmp_path: Path) -> None:
    space = tiny_v1_space()
    run = make_run(tmp_path, space)
    proc = cli("--device", "iphone12", "--no-progress", "--jobs", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"using supernet run {run.relative_to(tmp_path)}" in proc.stderr and "resolution 32" in proc.stderr
    lut = LatencyTable.load(tmp_path / "lut-iphone12-32.json")
    data = json.loads((tmp_path / "lut-iphone12-32.json").read_text())
    assert lut.predicted and data["predicted"] is True and data["measurement"] == "predicted"
    assert all(e["source"] == "predicted" for e in data["entries"].values())
    assert data["prior"]["loo_mape"] > 0 and "PREDICTED" in proc.stdout
    lut.check_compatible(device="iphone12", resolution=32, space_hash=space.hash)
    bundle = tmp_path / "lut-iphone12-32.bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "mlpackage" and len(manifest["entries"]) == len(lut)
    assert all((bundle / e["file"]).is_dir() for e in manifest["entries"])
    assert (bundle / "runner.py").is_file() and "Mac" in (bundle / "README.md").read_text()
    assert (tmp_path / "command-nas-build-lut.json").is_file()


def test_no_run_and_no_space_says_run_nas_train(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--device", "local-cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "run nas-train first" in err and "--space" in err and len(err.splitlines()) == 1


def test_resume_after_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "lut-local-cpu-32.json"
    args = [*DEMO, "--device", "local-cpu", "--jobs", "1", "--no-progress", "--checkpoint-every", "0.2"]
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli_build_lut", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def partial() -> bool:
        if not out.is_file():
            return False
        data = json.loads(out.read_text())
        return 16 <= len(data["entries"]) and not data["complete"]

    try:
        F.wait_for(partial, proc=proc, what="a partial LUT of at least 16 entries")
        F.interrupt(proc, unfinished=lambda: not json.loads(out.read_text())["complete"])
    finally:
        F.kill_group(proc)
    saved = json.loads(out.read_text())["entries"]  # the file on disk after the kill
    assert 16 <= len(saved) < 91
    assert LatencyTable.load(out).complete is False
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"{len(saved)} of 91 entries already measured" in again.stderr
    assert f"({91 - len(saved)} measured now, {len(saved)} from an earlier run)" in again.stdout
    final = json.loads(out.read_text())
    assert final["complete"] and len(final["entries"]) == 91
    assert all(final["entries"][k] == v for k, v in saved.items())  # finished entries were kept, not re-measured


def test_shards_merge_and_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    space = tiny_v2()
    make_run(tmp_path, space)
    monkeypatch.chdir(tmp_path)
    for i in (1, 2):
        assert main(["--device", "local-cpu", "--shard", f"{i}/2", "--jobs", "1", "--no-progress"]) == 0
    files = ["lut-local-cpu-32.shard-1of2.json", "lut-local-cpu-32.shard-2of2.json"]
    assert main(["--merge", *files]) == 0
    assert "complete" in capsys.readouterr().out
    merged = LatencyTable.load("lut-local-cpu-32.json")
    assert merged.complete and merged.space_hash == space.hash
    keys_before = merged.keys()
    assert main(["--device", "local-cpu", "--validate", "4", "--jobs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 measured now" in out and "raw LUT sums (4 subnets)" in out
    lut = LatencyTable.load("lut-local-cpu-32.json")
    assert lut.keys() == keys_before and lut.calibration.method != "none" and lut.validation["n"] == 4
    report = json.loads(Path("lut-local-cpu-32.validation.json").read_text())
    for key in ("n", "spearman", "mape", "within_5", "within_10"):
        assert key in report and key in report["raw"] and key in report["calibrated"]
    assert Path("lut-local-cpu-32.validation.png").stat().st_size > 1000

    # the same command again: nothing to measure, nothing rewritten (make demo's second run)
    stamp = Path("lut-local-cpu-32.json").stat().st_mtime_ns
    assert main(["--device", "local-cpu", "--validate", "4", "--jobs", "1", "--no-progress"]) == 0
    assert "already validated on these 4 subnets" in capsys.readouterr().out
    assert Path("lut-local-cpu-32.json").stat().st_mtime_ns == stamp
    # other subnets (another seed) are measured and validated again
    assert main(["--device", "local-cpu", "--validate", "4", "--seed", "1", "--jobs", "1", "--no-progress"]) == 0
    assert "raw LUT sums (4 subnets)" in capsys.readouterr().out


def test_local_bundle_protocol_end_to_end(tmp_path: Path) -> None:
    space = tiny_v2()
    make_run(tmp_path, space)
    made = cli("--device", "local-cpu", "--bundle", "b", "--validate", "3", "--jobs", "1", "--no-progress",
               cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert not (tmp_path / "lut-local-cpu-32.json").exists()  # a bundle, no measurement yet
    ran = subprocess.run([sys.executable, "runner.py", "-q", "--repeats", "5", "--warmup", "1"], cwd=tmp_path / "b",
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    imported = cli("--import", "b/results.json", "--no-progress", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    lut = LatencyTable.load(tmp_path / "lut-local-cpu-32.json")
    assert lut.measurement == "bundle" and not lut.predicted and lut.complete
    assert lut.validation["n"] == 3 and (tmp_path / "lut-local-cpu-32.validation.json").is_file()
    assert "imported" in imported.stdout and "calibrated" in imported.stdout


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("nas-build-lut: using")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["--space", "efficientformer_v2_demo", "--resolution", "32", "--num-classes", "10", "--in-chans", "1",
            "--jobs", "1", "--no-progress"]
    # a LUT to refuse: the predicted iPhone LUT of the demo space (bundle of a tiny V1 space elsewhere)
    run_dir = tmp_path / "v1"
    run_dir.mkdir()
    make_run(run_dir, tiny_v1_space())
    monkeypatch.chdir(run_dir)
    assert main(["--device", "iphone12", "--jobs", "1", "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    ios = str(run_dir / "lut-iphone12-32.json")

    def check(argv: list[str], *fragments: str) -> None:
        rc = main(argv)
        line = _one_line_error(rc, capsys.readouterr().err)
        for f in fragments:
            assert f in line, (f, line)

    check(["--device", "pixel-9000"], "unknown device profile 'pixel-9000'", "iphone12, local-cpu, snapdragon855")
    check(["--device", "local-cpu", *base, "--out", ios], "refusing to resume", "device='iphone12'",
          "device='local-cpu'")
    # another resolution and another space hash for the same file
    Path("small.json").write_text(Path(ios).read_text())
    lut = LatencyTable.load("small.json")
    check(["--device", "iphone12", "--space", "efficientformer_v2_demo", "--resolution", "64", "--num-classes", "10",
           "--in-chans", "1", "--out", "small.json", "--bundle", "b64", "--no-progress"],
          "resolution=32", "resolution=64")
    check(["--device", "iphone12", *base, "--out", "small.json", "--bundle", "b32"], "space_hash=", lut.space_hash)
    other = LatencyTable(device="local-cpu", backend="onnxruntime", resolution=32, num_classes=10, in_chans=1,
                         distillation=lut.distillation, space_name=lut.space_name, space_hash=lut.space_hash)
    other.save("local.json")
    check(["--merge", ios, "local.json", "--out", "m.json"], "refusing to merge", "device='local-cpu'")
    # truncated and corrupt files
    Path("trunc.json").write_text(Path(ios).read_text()[:300])
    check(["--merge", "trunc.json"], "trunc.json", "not valid JSON (truncated or corrupt?)")
    check(["--device", "local-cpu", *base, "--out", "trunc.json"], "trunc.json", "truncated or corrupt")
    Path("results.json").write_text('{"schema": 1, "results": ')
    check(["--import", "results.json"], "results file", "truncated or corrupt")
    Path("other.json").write_text(json.dumps({"hello": 1}))
    check(["--merge", "other.json"], "is not a latency LUT")
    check(["--device", "local-cpu", *base, "--shard", "3/2"], "--shard", "1 <= i <= n")
    check(["--device", "local-cpu", "--space", "nope"], "unknown space 'nope'", "efficientformer_v2_demo")


def test_results_that_do_not_match_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, tiny_v2())
    assert main(["--device", "snapdragon855", "--jobs", "1", "--no-progress"]) == 0
    bundle = tmp_path / "lut-snapdragon855-32.bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["threads"] == 1
    assert not Path("lut-snapdragon855-32.json").exists()  # no prior for this device: nothing predicted
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    key = manifest["entries"][0]["key"]
    good = {"schema": 1, "manifest_sha256": digest, "device": "snapdragon855", "backend": "onnxruntime",
            "complete": True, "results": {key: {"samples_ms": [1.0, 1.1]}}, "models": {}}
    capsys.readouterr()
    for mutate, fragment in [
        (lambda d: d.update(manifest_sha256="f" * 64), "does not match the bundle's manifest"),
        (lambda d: d["results"].update({"ef2.ffn|cin=7|cout=7|size=3|hidden=9": {"samples_ms": [1.0]}}),
         "not in it"),
        (lambda d: d["results"][key].update(samples_ms=[-1.0]), "samples_ms"),
        (lambda d: d.update(device="iphone12"), "is for device 'iphone12'"),
    ]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        (bundle / "results.json").write_text(json.dumps(bad))
        rc = main(["--device", "snapdragon855", "--import", str(bundle / "results.json")])
        line = _one_line_error(rc, capsys.readouterr().err)
        assert fragment in line, (fragment, line)
    (bundle / "results.json").write_text(json.dumps(good))
    assert main(["--device", "snapdragon855", "--import", str(bundle / "results.json")]) == 0
    lut = LatencyTable.load("lut-snapdragon855-32.json")
    assert len(lut) == 1 and not lut.complete and lut.measurement == "bundle"
