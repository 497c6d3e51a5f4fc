"""``nas-build-lut --device local-cpu`` calibrates by default: a few subnets end to end after the
blocks, ``--validate 0`` turns it off, and the same command on a finished LUT does nothing.

Real builds (ONNX Runtime) of a tiny space; no timing assertions.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from latency import LatencyTable
from nas.cli_build_lut import DEFAULT_VALIDATE, main
from test_cli_build_lut import make_run, tiny_v2

ARGS = ["--device", "local-cpu", "--jobs", "1", "--no-progress"]


def test_local_builds_validate_by_default_and_once(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path, tiny_v2())
    monkeypatch.chdir(tmp_path)
    assert main(ARGS) == 0
    captured = capsys.readouterr()
    assert f"using --validate {DEFAULT_VALIDATE} (default" in captured.err and "--validate 0 skips it" in captured.err
    assert f"raw LUT sums ({DEFAULT_VALIDATE} subnets)" in captured.out
    lut = LatencyTable.load("lut-local-cpu-32.json")
    assert lut.complete and lut.calibration.method != "none" and lut.validation["n"] == DEFAULT_VALIDATE
    assert Path("lut-local-cpu-32.validation.json").is_file()
    rows = pd.read_csv("lut-local-cpu-32.validation.csv")
    assert len(rows) == DEFAULT_VALIDATE and rows["arch_hash"].is_unique
    assert {"name", "arch", "measured_ms", "lut_sum_ms", "loo_ms", "calibrated_ms", "blocks"} <= set(rows.columns)
    assert (rows["measured_ms"] > 0).all() and (rows["lut_sum_ms"] > 0).all()
    stamp = Path("lut-local-cpu-32.json").stat().st_mtime_ns
    assert main(ARGS) == 0  # the same command again: nothing to measure, nothing rewritten
    assert f"already validated on these {DEFAULT_VALIDATE} subnets" in capsys.readouterr().out
    assert Path("lut-local-cpu-32.json").stat().st_mtime_ns == stamp


def test_validate_0_builds_blocks_only(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path, tiny_v2())
    monkeypatch.chdir(tmp_path)
    assert main([*ARGS, "--validate", "0"]) == 0
    captured = capsys.readouterr()
    assert "using --validate" not in captured.err and "raw LUT sums" not in captured.out
    lut = LatencyTable.load("lut-local-cpu-32.json")
    assert lut.complete and lut.calibration.method == "none" and lut.validation is None
    assert not Path("lut-local-cpu-32.validation.json").exists()
    # shards are never validated by default (--validate needs the whole LUT)
    assert main([*ARGS, "--shard", "1/2"]) == 0
    assert "using --validate" not in capsys.readouterr().err
