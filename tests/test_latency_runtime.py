"""Tests of the latency measurement primitives: profiles, stats, ONNX/CoreML runtime and the bundle runner.

Everything runs for real (ONNX Runtime sessions, CoreML conversion, the runner
as a subprocess); nothing is mocked and no test asserts on a timing.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from latency.bundle_runner import manifest_sha256
from latency.profiles import DeviceProfile, get_profile, list_profiles, load_profile_file
from latency.runtime import (
    convert_coreml,
    coreml_predict_available,
    export_onnx,
    measure_coreml,
    measure_module,
    measure_ort,
    measurement_environment,
    ort_session,
    torch_threads,
)
from latency.stats import LatencyStats
from search_spaces.errors import FileFormatError, NasUserError

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "latency" / "bundle_runner.py"
FAST = DeviceProfile(name="fast-cpu", backend="onnxruntime", is_local=True, threads=1, warmup=1, repeats=5)


class TinyBlock(torch.nn.Module):
    """Conv-BN-GELU-conv residual block, (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = torch.nn.Conv2d(channels, hidden, 1)
        self.bn = torch.nn.BatchNorm2d(hidden)
        self.act = torch.nn.GELU()
        self.dw = torch.nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = torch.nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.dw(self.act(self.bn(self.fc1(x)))))


class TokenBlock(torch.nn.Module):
    """LayerNorm-MLP residual block on tokens, (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


# --------------------------------------------------------------------------- stats


def test_stats_from_samples_values() -> None:
    s = LatencyStats.from_samples([float(x) for x in range(1, 11)])
    assert s.count == 10
    assert s.median_ms == pytest.approx(5.5)
    assert s.mean_ms == pytest.approx(5.5)
    assert s.min_ms == 1.0
    assert s.p90_ms == pytest.approx(9.1)
    assert s.iqr_ms == pytest.approx(4.5)
    assert s.std_ms == pytest.approx(math.sqrt(sum((x - 5.5) ** 2 for x in range(1, 11)) / 9))
    assert s.noisy


def test_stats_single_sample_and_noise_boundary() -> None:
    one = LatencyStats.from_samples([2.5])
    assert (one.count, one.median_ms, one.std_ms, one.iqr_ms, one.noisy) == (1, 2.5, 0.0, 0.0, False)
    base = dict(count=3, median_ms=10.0, mean_ms=10.0, std_ms=0.5, p90_ms=10.5, min_ms=9.5)
    assert not LatencyStats(iqr_ms=1.0, **base).noisy  # exactly 10%: not noisy
    assert LatencyStats(iqr_ms=1.0001, **base).noisy


@pytest.mark.parametrize("samples", [[], [1.0, float("nan")], [1.0, float("inf")], [1.0, -0.1], ["x"]])
def test_stats_from_samples_rejects_bad_input(samples: list) -> None:
    with pytest.raises(NasUserError, match="samples_ms"):
        LatencyStats.from_samples(samples)


def test_stats_dict_round_trip() -> None:
    s = LatencyStats.from_samples([1.0, 1.2, 0.9, 1.1, 1.05])
    d = json.loads(json.dumps(s.to_dict()))
    assert d["noisy"] is s.noisy
    assert LatencyStats.from_dict(d) == s


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"count": 0}, "count"),
        ({"count": True}, "count"),
        ({"count": 2.0}, "count"),
        ({"median_ms": float("nan")}, "median_ms"),
        ({"std_ms": float("inf")}, "std_ms"),
        ({"iqr_ms": -1.0}, "iqr_ms"),
        ({"mean_ms": "1.0"}, "mean_ms"),
        ({"min_ms": 5.0}, "min_ms <= median_ms"),
        ({"extra": 1}, "unknown"),
    ],
)
def test_stats_from_dict_validation(change: dict, fragment: str) -> None:
    d = LatencyStats.from_samples([1.0, 2.0, 3.0]).to_dict()
    d.update(change)
    with pytest.raises(NasUserError, match=fragment):
        LatencyStats.from_dict(d)


def test_stats_from_dict_missing_key() -> None:
    d = LatencyStats.from_samples([1.0]).to_dict()
    del d["p90_ms"]
    with pytest.raises(NasUserError, match="missing p90_ms"):
        LatencyStats.from_dict(d)


# --------------------------------------------------------------------------- profiles


def test_builtin_profiles() -> None:
    assert list_profiles() == ["iphone12", "local-cpu", "snapdragon855"]
    local = get_profile("local-cpu")
    assert (local.backend, local.is_local, local.threads, local.precision, local.model_format) == (
        "onnxruntime", True, 1, "fp32", "onnx")
    assert local.graph_optimization == "all" and local.providers == ("CPUExecutionProvider",)
    sd = get_profile("snapdragon855")
    assert (sd.backend, sd.is_local, sd.precision) == ("onnxruntime", False, "fp32")
    ip = get_profile("iphone12")
    assert (ip.backend, ip.is_local, ip.precision, ip.compute_units, ip.minimum_deployment_target) == (
        "coreml", False, "fp16", "ALL", "iOS16")
    assert ip.model_format == "mlpackage"
    assert get_profile("snapdragon855", threads=4).threads == 4
    with pytest.raises(NasUserError, match="field 'threads': Input should be greater than or equal to 1, got 0"):
        get_profile("local-cpu", threads=0)


def test_unknown_profile_lists_known_names() -> None:
    with pytest.raises(NasUserError, match="unknown device profile 'pixel9'.*iphone12, local-cpu, snapdragon855"):
        get_profile("pixel9")


def test_profile_json_round_trip(tmp_path: Path) -> None:
    prof = DeviceProfile(name="my-board", backend="onnxruntime", threads=2, warmup=3, repeats=7,
                         graph_optimization="extended", description="an arm64 board")
    path = tmp_path / "board.json"
    path.write_text(json.dumps(prof.to_dict()))
    assert load_profile_file(path) == prof
    assert get_profile(path) == prof
    assert get_profile(str(path), threads=3).threads == 3


def test_profile_toml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mac.toml"
    path.write_text(
        'name = "m2-mac"\nbackend = "coreml"\nis_local = true\ncompute_units = "CPU_AND_NE"\n'
        'minimum_deployment_target = "macOS13"\nrepeats = 20\ndescription = "Mac mini M2"\n'
    )
    prof = load_profile_file(path)
    assert prof == DeviceProfile(name="m2-mac", backend="coreml", is_local=True, precision="fp16",
                                 compute_units="CPU_AND_NE", minimum_deployment_target="macOS13", repeats=20,
                                 description="Mac mini M2")
    again = tmp_path / "again.json"
    again.write_text(json.dumps(prof.to_dict()))
    assert load_profile_file(again) == prof


def test_profile_file_with_base(tmp_path: Path) -> None:
    path = tmp_path / "pixel.toml"
    path.write_text('name = "pixel4-4t"\nbase = "snapdragon855"\nthreads = 4\n')
    prof = load_profile_file(path)
    assert prof.name == "pixel4-4t" and prof.threads == 4 and prof.backend == "onnxruntime" and not prof.is_local


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("backend", "tflite", "field 'backend': Input should be 'onnxruntime' or 'coreml', got 'tflite'"),
        ("threads", 0, "field 'threads': Input should be greater than or equal to 1, got 0"),
        ("threads", True, "field 'threads': Input should be a valid integer, got True"),
        ("threads", 1.5, "field 'threads': Input should be a valid integer, got 1.5"),
        ("batch", 0, "field 'batch': Input should be greater than or equal to 1"),
        ("is_local", "yes", "field 'is_local': Input should be a valid boolean"),
        ("precision", "int8", "field 'precision': Input should be 'fp32' or 'fp16'"),
        ("precision", "fp16", "needs backend 'coreml'"),
        ("compute_units", "GPU", "field 'compute_units': Input should be 'ALL'"),
        ("minimum_deployment_target", "iOS14", "field 'minimum_deployment_target': Input should be 'iOS15'"),
        ("providers", [], "field 'providers': Value error, must be a non-empty list"),
        ("providers", "CPUExecutionProvider", "field 'providers': Value error, must be a non-empty list"),
        ("graph_optimization", "max", "field 'graph_optimization': Input should be 'disabled', 'basic', 'extended' or 'all'"),
        ("warmup", -1, "field 'warmup': Input should be greater than or equal to 0"),
        ("repeats", 0, "field 'repeats': Input should be greater than or equal to 1"),
        ("name", "my board", "field 'name': Value error, must start with a letter or digit"),
        ("thread", 2, "field 'thread': unknown field"),
        ("base", "pixel", "`base` must be one of iphone12, local-cpu, snapdragon855"),
    ],
)
def test_profile_file_validation(tmp_path: Path, field: str, value: object, fragment: str) -> None:
    data = {"name": "dev", "backend": "onnxruntime", field: value}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match=fragment) as info:
        load_profile_file(path)
    assert "dev.json" in str(info.value)


def test_profile_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="does not exist"):
        load_profile_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(FileFormatError, match="not valid TOML"):
        load_profile_file(bad)
    yaml = tmp_path / "dev.yaml"
    yaml.write_text("name: dev\n")
    with pytest.raises(FileFormatError, match=r"must end in \.toml or \.json"):
        load_profile_file(yaml)
    nobackend = tmp_path / "nb.json"
    nobackend.write_text('{"name": "x"}')
    with pytest.raises(FileFormatError, match="field 'backend': is missing"):
        load_profile_file(nobackend)


# --------------------------------------------------------------------------- ONNX Runtime


def test_torch_threads_restores_even_on_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with pytest.raises(NasUserError, match="num_threads"):
        with torch_threads(0):
            pass


def test_export_onnx_image_and_tokens(tmp_path: Path) -> None:
    block = TinyBlock().train()
    data = export_onnx(block, (1, 8, 12, 12), tmp_path / "block.onnx")
    assert block.training, "export must restore the module's mode"
    assert (tmp_path / "block.onnx").read_bytes() == data
    model = onnx.load_model_from_string(data)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 8, 12, 12]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node), "BN should be folded"
    tokens = export_onnx(TokenBlock(), (2, 10, 16))
    tdims = [d.dim_value for d in onnx.load_model_from_string(tokens).graph.input[0].type.tensor_type.shape.dim]
    assert tdims == [2, 10, 16]
    with pytest.raises(NasUserError, match="input_shape"):
        export_onnx(TinyBlock(), (1, 0, 8, 8))
    with pytest.raises(NasUserError, match="input_shape"):
        export_onnx(TinyBlock(), (8,))


def test_measure_ort_structure(tmp_path: Path) -> None:
    path = tmp_path / "block.onnx"
    export_onnx(TinyBlock(), (1, 8, 12, 12), path)
    from_path = measure_ort(path, (1, 8, 12, 12), warmup=1, repeats=4, threads=1)
    assert len(from_path) == 4 and all(isinstance(x, float) and x > 0 for x in from_path)
    session = ort_session(path.read_bytes(), threads=1, graph_optimization="basic")
    assert len(measure_ort(session, (1, 8, 12, 12), warmup=0, repeats=2)) == 2
    with pytest.raises(NasUserError, match="intra_op_num_threads=1"):
        measure_ort(session, (1, 8, 12, 12), warmup=0, repeats=2, threads=2)
    with pytest.raises(NasUserError, match="does not match the model's input"):
        measure_ort(session, (1, 8, 16, 16), warmup=0, repeats=2)
    with pytest.raises(NasUserError, match="`repeats` must be an integer >= 1"):
        measure_ort(session, (1, 8, 12, 12), warmup=0, repeats=0)


def test_ort_session_bad_provider_lists_available(tmp_path: Path) -> None:
    data = export_onnx(TinyBlock(), (1, 8, 8, 8))
    with pytest.raises(NasUserError, match="NopeExecutionProvider.*available: .*CPUExecutionProvider"):
        ort_session(data, threads=1, providers=["NopeExecutionProvider"])
    with pytest.raises(NasUserError, match="graph_optimization"):
        ort_session(data, threads=1, graph_optimization="max")


def test_measure_module_local(tmp_path: Path) -> None:
    stats = measure_module(TinyBlock(), (1, 8, 12, 12), FAST, workdir=tmp_path)
    assert isinstance(stats, LatencyStats) and stats.count == FAST.repeats
    assert stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert (tmp_path / "model.onnx").is_file()
    tokens = measure_module(TokenBlock(), (1, 10, 16), FAST)
    assert tokens.count == FAST.repeats


def test_measure_module_refuses_remote_and_wrong_batch() -> None:
    with pytest.raises(NasUserError, match="'snapdragon855'.*not measured on this machine.*nas-build-lut"):
        measure_module(TinyBlock(), (1, 8, 8, 8), get_profile("snapdragon855"))
    with pytest.raises(NasUserError, match="batch 2 but profile 'fast-cpu' measures batch 1"):
        measure_module(TinyBlock(), (2, 8, 8, 8), FAST)


def test_measurement_environment() -> None:
    env = measurement_environment(get_profile("local-cpu"))
    assert env["profile"]["name"] == "local-cpu"
    assert {"platform", "machine", "python", "versions"} <= set(env["host"])
    assert {"onnxruntime", "torch", "numpy", "onnx"} <= set(env["host"]["versions"])


# --------------------------------------------------------------------------- CoreML


def test_convert_coreml_writes_mlpackage(tmp_path: Path) -> None:
    out = convert_coreml(TinyBlock(), (1, 8, 12, 12), tmp_path / "sub" / "block.mlpackage")
    assert out == tmp_path / "sub" / "block.mlpackage"
    assert out.is_dir() and (out / "Manifest.json").is_file()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["block.mlpackage"], "no temp folders left behind"
    again = convert_coreml(TinyBlock(), (1, 8, 12, 12), out, precision="fp32")  # replaces the old one
    assert again.is_dir()
    with pytest.raises(NasUserError, match=r"must end in \.mlpackage"):
        convert_coreml(TinyBlock(), (1, 8, 12, 12), tmp_path / "block.mlmodel")
    with pytest.raises(NasUserError, match="`target` must be one of"):
        convert_coreml(TinyBlock(), (1, 8, 12, 12), tmp_path / "x.mlpackage", target="iOS12")


@pytest.mark.parametrize("space_name,kind", [
    ("efficientformer_v2_demo", "ef2.attn_ffn"), ("efficientformer_v2_demo", "ef2.ffn"),
    ("efficientformer_v2_demo", "ef2.down_attn"), ("efficientformer_v2_demo", "ef2.head"),
    ("efficientformer_v2_demo", "ef2.lite_ffn"), ("efficientformer_demo", "ef1.meta3d"),
    ("efficientformer_demo", "ef1.meta4d"), ("efficientvit", "evit.block"), ("efficientvit", "evit.mbconv")])
def test_convert_coreml_lean_passes_write_the_same_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            space_name: str, kind: str) -> None:
    """Skipping coremltools' re-validation after every pass and its non-replaceable-var propagation (about half
    of a conversion), and the passes that change no block (``BLOCK_NOOP_PASSES``, as the bundle converts
    blocks), changes no byte of the package."""
    import contextlib

    import coremltools as ct

    from latency import coreml
    from search_spaces import get_space
    from search_spaces.lowering import lower
    from supernet.blocks import build_block

    space = get_space(space_name)
    largest = space.largest()
    if kind == "ef2.lite_ffn":   # the largest config has softmax attention only
        largest = next(a.arch for a in space.slimming_actions(largest) if "lite" in a.name)
    spec = next(s for s in lower(largest, resolution=64, num_classes=10) if s.kind == kind)
    block = build_block(spec).eval()
    shape = spec.input_shape(1)
    lean = coreml._pipeline(ct, coreml.BLOCK_NOOP_PASSES)
    assert not set(coreml.BLOCK_NOOP_PASSES) & set(lean.passes) and "common::add_fp16_cast" in lean.passes
    fast = convert_coreml(block, shape, tmp_path / "fast.mlpackage", skip_passes=coreml.BLOCK_NOOP_PASSES)
    mil = ct.converters.mil.mil
    own = mil.Program.validate, mil.Block._propagate_nonreplaceable_vars
    assert all(m.__module__.startswith("coremltools") for m in own), "the library's own methods outside a conversion"
    monkeypatch.setattr(coreml, "_lean_passes", lambda ct: contextlib.nullcontext())
    full = convert_coreml(block, shape, tmp_path / "full.mlpackage")
    assert (mil.Program.validate, mil.Block._propagate_nonreplaceable_vars) == own, "the library's methods are restored"

    a, b = coreml.package_files(fast), coreml.package_files(full)
    assert a.keys() == b.keys() and a == b


def test_measure_coreml_off_macos_explains_bundle(tmp_path: Path) -> None:
    if sys.platform == "darwin":   # CoreML runs here: nothing to explain
        assert coreml_predict_available() is True
        return
    assert coreml_predict_available() is False
    with pytest.raises(NasUserError, match="CoreML prediction needs macOS.*bundle.*runner.py"):
        measure_coreml(tmp_path / "block.mlpackage", (1, 8, 12, 12), warmup=1, repeats=2)
    with pytest.raises(NasUserError, match="CoreML prediction needs macOS"):
        measure_module(TinyBlock(), (1, 8, 8, 8), DeviceProfile(name="mac", backend="coreml", is_local=True))


# --------------------------------------------------------------------------- bundle runner


def _make_bundle(root: Path) -> Path:
    bundle = root / "bundle"
    (bundle / "blocks").mkdir(parents=True)
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    export_onnx(TinyBlock(8, 16), (1, 8, 12, 12), bundle / "blocks" / "a.onnx")
    export_onnx(TinyBlock(8, 32), (1, 8, 12, 12), bundle / "blocks" / "b.onnx")
    export_onnx(torch.nn.Sequential(TinyBlock(8, 16), TinyBlock(8, 32)), (1, 8, 12, 12),
                bundle / "models" / "net.onnx")
    manifest = {
        "schema": 1, "device": "local-cpu", "backend": "onnxruntime", "format": "onnx", "threads": 1, "batch": 1,
        "warmup": 1, "repeats": 5,
        "entries": [
            {"key": "block-a", "file": "blocks/a.onnx", "input_shape": [1, 8, 12, 12]},
            {"key": "block-b", "file": "blocks/b.onnx", "input_shape": [1, 8, 12, 12]},
        ],
        "models": [{"name": "net", "file": "models/net.onnx", "input_shape": [1, 8, 12, 12]}],
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return bundle


@pytest.fixture(scope="module")
def bundle_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_bundle(tmp_path_factory.mktemp("template"))


@pytest.fixture()
def bundle(bundle_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_template, tmp_path / "bundle"))


def _run(*args: str, cwd: Path = REPO, script: Path = RUNNER) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_runner_imports_no_torch_or_repo_code() -> None:
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "coremltools"}
    tree = ast.parse(RUNNER.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports in the standalone runner"
            imported.add(node.module.split(".")[0])
    assert imported <= allowed, imported - allowed


def test_runner_measures_bundle(bundle: Path) -> None:
    proc = _run("--bundle", str(bundle))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((bundle / "results.json").read_text())
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert res["manifest_sha256"] == digest == manifest_sha256(bundle) == manifest_sha256(bundle / "manifest.json")
    assert res["schema"] == 1 and res["device"] == "local-cpu" and res["threads"] == 1 and res["complete"] is True
    assert {"platform", "machine", "python", "versions"} <= set(res["host"])
    assert "onnxruntime" in res["host"]["versions"]
    assert list(res["results"]) == ["block-a", "block-b"]
    assert list(res["models"]) == ["net"]
    for rec in [*res["results"].values(), *res["models"].values()]:
        assert len(rec["samples_ms"]) == 5 and all(x >= 0 for x in rec["samples_ms"])
    assert LatencyStats.from_samples(res["models"]["net"]["samples_ms"]).count == 5
    assert "[3/3]" in proc.stderr


def test_runner_standalone_copy_with_overrides(bundle: Path) -> None:
    shutil.copy(RUNNER, bundle / "runner.py")
    proc = _run("--repeats", "3", "--warmup", "0", "--no-interleave", "--out", "r.json", "-q", cwd=bundle,
                script=bundle / "runner.py")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    res = json.loads((bundle / "r.json").read_text())
    assert res["repeats"] == 3 and res["interleave"] is False
    assert all(len(r["samples_ms"]) == 3 for r in res["results"].values())


def test_runner_resume_skips_finished_keys(bundle: Path) -> None:
    assert _run("--bundle", str(bundle)).returncode == 0
    out = bundle / "results.json"
    first = json.loads(out.read_text())
    partial = dict(first, complete=False, results={"block-a": first["results"]["block-a"]}, models={})
    out.write_text(json.dumps(partial))
    proc = _run("--bundle", str(bundle), "--repeats", "4")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr and "2 to measure, 1 already done" in proc.stderr
    second = json.loads(out.read_text())
    assert second["results"]["block-a"] == first["results"]["block-a"], "finished key must be kept, not re-run"
    assert len(second["results"]["block-b"]["samples_ms"]) == 4
    assert len(second["models"]["net"]["samples_ms"]) == 4
    assert second["complete"] is True and len(second["runs"]) == 2
    nothing = _run("--bundle", str(bundle), "--only-missing")
    assert nothing.returncode == 0 and "0 to measure" in nothing.stderr
    assert json.loads(out.read_text())["results"] == second["results"]
    fresh = _run("--bundle", str(bundle), "--fresh", "--repeats", "2")
    assert fresh.returncode == 0, fresh.stderr
    assert all(len(r["samples_ms"]) == 2 for r in json.loads(out.read_text())["results"].values())


def test_runner_other_manifest_needs_only_missing(bundle: Path) -> None:
    assert _run("--bundle", str(bundle)).returncode == 0
    old = json.loads((bundle / "results.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["entries"].append({"key": "block-c", "file": "blocks/a.onnx", "input_shape": [1, 8, 12, 12]})
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    refused = _run("--bundle", str(bundle))
    assert refused.returncode == 2
    assert "another manifest" in refused.stderr and "--only-missing" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    proc = _run("--bundle", str(bundle), "--only-missing")
    assert proc.returncode == 0, proc.stderr
    new = json.loads((bundle / "results.json").read_text())
    assert new["manifest_sha256"] == manifest_sha256(bundle)
    assert new["results"]["block-a"] == old["results"]["block-a"]
    assert list(new["results"]) == ["block-a", "block-b", "block-c"]
    other_threads = _run("--bundle", str(bundle), "--threads", "2")
    assert other_threads.returncode == 2 and "threads=1" in other_threads.stderr


@pytest.mark.parametrize(
    "corrupt, fragment",
    [
        (lambda m: '{"schema": 1, "device": ', "not valid JSON"),
        (lambda m: json.dumps(dict(m, schema=7)), "schema must be 1"),
        (lambda m: json.dumps(dict(m, backend="tflite")), "backend must be one of"),
        (lambda m: json.dumps(dict(m, entries=[dict(m["entries"][0], file="blocks/zz.onnx")])), "missing from"),
        (lambda m: json.dumps(dict(m, entries=[dict(m["entries"][0], file="../a.onnx")])), "inside the bundle"),
        (lambda m: json.dumps(dict(m, entries=[dict(m["entries"][0], input_shape=[2, 8, 12, 12])])), "batch"),
        (lambda m: json.dumps(dict(m, entries=m["entries"] * 2)), "appears twice"),
        (lambda m: json.dumps(dict(m, repeats=0)), "repeats must be an integer >= 1"),
        (lambda m: json.dumps(dict(m, entries=[dict(m["entries"][0], input_shape=[1, 8, 9, 9])])),
         "does not match"),
    ],
)
def test_runner_bad_manifest_one_line_error(bundle: Path, corrupt, fragment: str) -> None:
    path = bundle / "manifest.json"
    path.write_text(corrupt(json.loads(path.read_text())))
    proc = _run("--bundle", str(bundle))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("runner.py:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    if fragment != "does not match":  # that one is found when the block is loaded, after progress lines
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (bundle / "results.json").exists()


def test_runner_bad_arguments_and_help(tmp_path: Path) -> None:
    missing = _run("--bundle", str(tmp_path))
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr
    bad = _run("--threads", "0")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--threads" in bad.stderr
    helped = _run("--help")
    assert helped.returncode == 0
    for flag in ("--bundle", "--threads", "--warmup", "--repeats", "--out", "--only-missing", "--fresh"):
        assert flag in helped.stdout
