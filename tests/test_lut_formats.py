"""Tests of the LUT file format (schema 2, pydantic models), reading schema-1 files, non-square and
backbone setups, and non-square bundles through the real runner.

No timing assertions; the runner runs for real as a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latency import LatencyStats, LatencyTable, default_lut_path, get_profile
from latency.bundle import default_bundle_path
from latency.profiles import DeviceProfile
from latency.runtime import export_onnx
from latency.specs import new_table
from search_spaces import BlockSpec, LoweringSetup, get_space
from search_spaces.errors import FileFormatError, NasUserError

REPO = Path(__file__).resolve().parents[1]

#: A schema-1 LUT exactly as the code before schema 2 wrote it (one stage-3 attention block with
#: ``stride=2``, whose key spelling may change: it must come out as ``BlockSpec.from_key(key).key``).
SCHEMA1_LUT = {
    "schema": 1, "format": "formslim-nas latency LUT", "device": "local-cpu", "backend": "onnxruntime",
    "profile": {"name": "local-cpu", "backend": "onnxruntime", "is_local": True, "threads": 1, "batch": 1,
                "precision": "fp32", "compute_units": "ALL", "minimum_deployment_target": "iOS16",
                "providers": ["CPUExecutionProvider"], "graph_optimization": "all", "warmup": 5, "repeats": 30,
                "description": "ONNX Runtime on this machine's CPU, fp32, all graph optimisations"},
    "environment": {"host": {"cpu": "x86_64", "system": "Linux"}}, "threads": 1, "batch": 1, "precision": "fp32",
    "resolution": 32, "num_classes": 10, "in_chans": 1, "distillation": True,
    "space_name": "efficientformer_v2_demo", "space_hash": "0123456789ab", "space": None,
    "date": "2026-12-01T10:00:00+00:00", "updated": "2026-12-01T10:05:00+00:00", "predicted": False,
    "predicted_entries": 0, "measurement": "in-process", "statistic": "min", "complete": True,
    "expected_entries": 3, "shard": None,
    "calibration": {"method": "linear", "scale": 1.05, "offset_ms": 0.01, "per_block_ms": 0.0, "kind_scales": {},
                    "n": 20, "loo_mape": 0.03, "fitted": "2026-12-01T10:05:00+00:00",
                    "note": "linear LOO MAPE 0.03"},
    "prior": None, "validation": {"file": "lut-local-cpu-32.validation.json", "n": 20},
    "entries": {
        "ef2.attn_ffn|cin=32|cout=32|size=4|stride=2|hidden=64|heads=8|key_dim=32|value_dim=128": {
            "count": 3, "median_ms": 0.3, "mean_ms": 0.3, "std_ms": 0.010000000000000009, "p90_ms": 0.308,
            "iqr_ms": 0.010000000000000009, "min_ms": 0.29, "noisy": False, "source": "measured"},
        "ef2.head|cin=32|cout=32|size=1|num_classes=10|distillation=1": {
            "count": 2, "median_ms": 0.010499999999999999, "mean_ms": 0.010499999999999999,
            "std_ms": 0.000707106781186547, "p90_ms": 0.0109, "iqr_ms": 0.0004999999999999987, "min_ms": 0.01,
            "noisy": False, "source": "measured"},
        "ef2.stem|cin=1|cout=16|size=32": {
            "count": 4, "median_ms": 0.02, "mean_ms": 0.02, "std_ms": 0.0008164965809277268, "p90_ms": 0.0207,
            "iqr_ms": 0.0005000000000000004, "min_ms": 0.019, "noisy": False, "source": "measured"},
    },
}


def _table(**header: object) -> LatencyTable:
    fields = dict(device="iphone12", backend="coreml", num_classes=10, in_chans=3, distillation=True,
                  space_name="s", space_hash="abcdefabcdef")
    fields.update(header)
    return LatencyTable(**fields)  # type: ignore[arg-type]


def test_schema1_lut_loads_converted_and_saves_as_schema2(tmp_path: Path) -> None:
    path = tmp_path / "lut-local-cpu-32.json"
    path.write_text(json.dumps(SCHEMA1_LUT, indent=1))
    lut = LatencyTable.load(path)
    assert set(lut.keys()) == {BlockSpec.from_key(k).key for k in SCHEMA1_LUT["entries"]}
    assert lut.setup == LoweringSetup(resolution=32, num_classes=10, in_chans=1, distillation=True)
    assert lut.task == "classify" and lut.statistic == "min" and lut.complete and not lut.predicted
    assert lut.calibration.method == "linear" and lut.calibration.scale == 1.05 and lut.calibration.n == 20
    assert lut.validation == {"file": "lut-local-cpu-32.validation.json", "n": 20}
    old_key = "ef2.stem|cin=1|cout=16|size=32"
    assert lut[BlockSpec.from_key(old_key).key].stats == LatencyStats(
        count=4, median_ms=0.02, mean_ms=0.02, std_ms=0.0008164965809277268, p90_ms=0.0207,
        iqr_ms=0.0005000000000000004, min_ms=0.019)
    lut.save()
    data = json.loads(path.read_text())
    assert data["schema"] == 2 and data["task"] == "classify" and data["resolution"] == 32
    again = LatencyTable.load(path)
    assert again.items() == lut.items() and again.calibration == lut.calibration and again.setup == lut.setup


def test_schema1_lut_with_a_bad_key_names_it(tmp_path: Path) -> None:
    data = json.loads(json.dumps(SCHEMA1_LUT))
    data["entries"]["ef2.nope|cin=1|cout=1|size=1"] = data["entries"]["ef2.stem|cin=1|cout=16|size=32"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match=r"old\.json.*entry 'ef2\.nope\|cin=1\|cout=1\|size=1'"):
        LatencyTable.load(tmp_path / "old.json")


def test_non_square_header_file_name_and_compatibility(tmp_path: Path) -> None:
    lut = _table(resolution="512x1024")
    assert lut.setup.resolution == (512, 1024) and lut.resolution == (512, 1024)
    path = default_lut_path("iphone12", lut.setup.resolution, tmp_path)
    assert path.name == "lut-iphone12-512x1024.json"
    assert default_lut_path("iphone12", 224).name == "lut-iphone12-224.json"  # square names unchanged
    assert default_bundle_path("iphone12", "512x1024").name == "lut-iphone12-512x1024.bundle"
    lut.save(path)
    assert json.loads(path.read_text())["resolution"] == [512, 1024]
    back = LatencyTable.load(path)
    assert back.setup == lut.setup and "512x1024px" in back.describe()
    back.check_compatible(device="iphone12", resolution=(512, 1024))
    back.check_compatible(resolution="512x1024")
    with pytest.raises(NasUserError, match="built for resolution 512x1024, not 1024x512.*--resolution 1024x512"):
        back.check_compatible(resolution=(1024, 512))
    square = _table(resolution=[224, 224])
    assert square.resolution == 224 and square.to_dict()["resolution"] == 224


def test_task_is_part_of_the_header_and_the_setup(tmp_path: Path) -> None:
    backbone = _table(resolution=224, task="backbone")
    backbone.save(tmp_path / "b.json")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["task"] == "backbone"
    assert LatencyTable.load(tmp_path / "b.json").setup.task == "backbone"
    with pytest.raises(NasUserError, match="refusing to merge.*task='backbone'.*task='classify'"):
        backbone.check_same_setup(_table(resolution=224), action="merge")
    data["task"] = "segment"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match="field 'task': Input should be 'classify' or 'backbone', got 'segment'"):
        LatencyTable.load(tmp_path / "bad.json")


def test_new_table_header_from_a_setup() -> None:
    space = get_space("efficientformer_v2_demo")
    table = new_table(space, get_profile("iphone12"), LoweringSetup(resolution=(64, 32), num_classes=10,
                                                                    in_chans=1, task="backbone"),
                      measurement="predicted", expected_entries=None)
    head = table.to_dict()
    assert head["resolution"] == [64, 32] and head["task"] == "backbone" and head["distillation"] is True
    assert head["precision"] == "fp16" and head["backend"] == "coreml" and head["schema"] == 2


@pytest.mark.parametrize("change, fragment", [
    ({"resolution": 4}, "resolution sides must be integers >= 8, got 4"),
    ({"threads": 0}, "field 'threads': Input should be greater than or equal to 1, got 0"),
    ({"backend": "tflite"}, "field 'backend': Input should be 'onnxruntime' or 'coreml', got 'tflite'"),
    ({"statistic": "mean"}, "field 'statistic': Input should be 'median' or 'min', got 'mean'"),
    ({"shard": "0/2"}, "field 'shard'"),
])
def test_bad_header_values_are_one_line(change: dict, fragment: str) -> None:
    with pytest.raises(NasUserError, match=fragment) as info:
        _table(**{"resolution": 32, **change})
    assert "\n" not in str(info.value)


def test_profile_schema_round_trip() -> None:
    prof = DeviceProfile.from_dict({"name": "m2", "backend": "coreml", "repeats": 3})
    assert prof.precision == "fp16" and prof.providers == ("CPUExecutionProvider",)
    again = DeviceProfile.from_dict(prof.to_dict())
    assert again == prof and hash(again) == hash(prof)
    assert prof.replace(batch=4).batch == 4 and prof.batch == 1
    with pytest.raises(NasUserError, match="field 'batch'"):
        prof.replace(batch=0)


class _Wide(torch.nn.Module):
    """A conv block on a non-square map, (B, 4, 12, 20) -> (B, 4, 12, 20)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_runner_times_non_square_inputs(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    (bundle / "blocks").mkdir(parents=True)
    export_onnx(_Wide(), (1, 4, 12, 20), bundle / "blocks" / "wide.onnx")
    manifest = {"schema": 1, "device": "local-cpu", "backend": "onnxruntime", "format": "onnx", "threads": 1,
                "batch": 1, "warmup": 1, "repeats": 3,
                "entries": [{"key": "wide", "file": "blocks/wide.onnx", "input_shape": [1, 4, 12, 20]}]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runner = REPO / "latency" / "bundle_runner.py"
    ok = subprocess.run([sys.executable, str(runner), "--bundle", str(bundle), "-q"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads((bundle / "results.json").read_text())["results"]["wide"]["samples_ms"]) == 3
    manifest["entries"][0]["input_shape"] = [1, 4, 20, 12]  # height and width swapped: refused, one line
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    bad = subprocess.run([sys.executable, str(runner), "--bundle", str(bundle), "--fresh", "-q"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "does not match the model's input" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_passes_hxw_and_task_to_the_lowering(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI carries the setup through whole: the predicted LUT and the bundle say HxW and the task.

    One run covers both (a non-square backbone); the square classifier's defaults are covered by
    test_cli_build_lut.py::test_iphone12_defaults_from_run_bundle_and_predicted_lut.
    """
    from nas.cli_build_lut import main

    monkeypatch.chdir(tmp_path)
    argv = ["--device", "iphone12", "--space", "efficientformer_v2_demo", "--num-classes", "10", "--in-chans", "1",
            "--no-progress", "--jobs", "2", "--resolution", "64x32", "--task", "backbone"]
    rc = main(argv)
    err = capsys.readouterr().err
    lut = tmp_path / "lut-iphone12-64x32-backbone.json"
    assert rc == 0, err
    data = json.loads(lut.read_text())
    assert data["task"] == "backbone" and LoweringSetup(resolution=data["resolution"]).text == "64x32"
    manifest = json.loads((tmp_path / "lut-iphone12-64x32-backbone.bundle" / "manifest.json").read_text())
    shapes = {tuple(e["input_shape"][2:]) for e in manifest["entries"]}
    assert (64, 32) in shapes and (32, 64) not in shapes, sorted(shapes)[:5]  # the stem sees H x W, not W x H
    assert not [k for k in data["entries"] if k.split("|")[0].endswith(".head")]


def test_cli_refuses_a_bad_resolution(capsys: pytest.CaptureFixture[str]) -> None:
    from nas.cli_build_lut import main

    with pytest.raises(SystemExit) as info:
        main(["--device", "local-cpu", "--space", "efficientformer_v2_demo", "--resolution", "12x"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'12x' is not a resolution" in err and "512x1024" in err


def _mac_results(bundle: Path) -> dict:
    """``results.json`` as runner.py writes it on a Mac (host record included), for every model of ``bundle``."""
    from latency.bundle_runner import manifest_sha256

    manifest = json.loads((bundle / "manifest.json").read_text())
    host = {"platform": "macOS-14.5-arm64-arm-64bit", "system": "Darwin", "machine": "arm64", "cpu": "Apple M2",
            "cpu_count": 8, "python": "3.11.9", "versions": {"numpy": "2.1.0", "coremltools": "8.3"},
            "macos": "14.5", "chip": "Apple M2", "model": "Mac14,3"}
    return {"schema": 1, "manifest_sha256": manifest_sha256(bundle), "device": manifest["device"],
            "backend": "coreml", "format": "mlpackage", "host": host, "threads": 1, "batch": 1, "warmup": 10,
            "repeats": 50, "interleave": True, "compute_units": "ALL", "seed": 0,
            "updated_utc": "2026-12-02T09:00:00+00:00", "complete": True,
            "results": {e["key"]: {"samples_ms": [0.05, 0.051, 0.049]} for e in manifest["entries"]},
            "models": {}, "runs": [{"host": {k: host[k] for k in ("platform", "machine", "cpu")}}]}


def test_coreml_results_from_a_mac_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from latency import import_results, predicted_table, write_bundle
    from nas.cli_build_lut import main
    from test_lut import SETUP, tiny_v1_space

    space = tiny_v1_space()
    bundle = tmp_path / "lut-iphone12-32.bundle"
    write_bundle(space, get_profile("iphone12"), folder=bundle, jobs=1, **SETUP)  # type: ignore[arg-type]
    (bundle / "results.json").write_text(json.dumps(_mac_results(bundle)))
    predicted = predicted_table(space, get_profile("iphone12"), **SETUP)  # type: ignore[arg-type]
    assert predicted.source_label == "predicted" and predicted.stand_in_host is None
    res = import_results(bundle / "results.json", out=tmp_path / "lut.json", device="iphone12")
    lut = LatencyTable.load(res.path)
    assert lut.source_label == "measured-lut (macOS host, not iphone12)"
    assert lut.stand_in_host == "macOS 14.5, Apple M2 (Mac14,3)"
    assert "on a macOS host (macOS 14.5, Apple M2 (Mac14,3)), not on the iphone12 itself" in lut.describe()
    # the same results for a profile that targets macOS measure the device itself
    mac = LatencyTable.load(res.path)
    mac.profile = {**mac.profile, "minimum_deployment_target": "macOS14"}
    assert mac.source_label == "measured-lut" and mac.stand_in_host is None
    # and the command says so
    monkeypatch.chdir(tmp_path)
    assert main(["--device", "iphone12", "--import", str(bundle / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "latency source: measured-lut (macOS host, not iphone12)" in out
    assert "time the Mac that ran the bundle (macOS 14.5, Apple M2 (Mac14,3))" in out


def test_runner_host_record_names_the_os() -> None:
    from latency.bundle_runner import host_info

    info = host_info("onnxruntime")
    assert info["system"] and info["machine"] and info["cpu"] is not None
    if sys.platform == "darwin":
        assert info["macos"] and "chip" in info and "model" in info
    else:
        assert "macos" not in info and "chip" not in info
