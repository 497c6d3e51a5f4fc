"""Tests of ``nas-extract``: a searched subnet becomes a standalone, exported model.

``nas-extract subnet.json`` runs once, as a user types it, in a copy of the searched folder
(conftest's read-only ``extracted``). The tests check the files and the records, and then check
the model against computations made here, not against figures the tool reports about itself:
the supernet's own forward pass, ONNX Runtime, the CoreML program's operations and an
independent BN recalibration. The measured latency is not compared with the budget here (that
belongs to the benchmark).
"""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402


def test_extract_writes_every_format_and_the_records(extracted: F.Shared) -> None:
    from search_spaces.subnet_file import SubnetFile

    r, folder = extracted.procs["extract"], extracted.info["folder"]
    sub = SubnetFile.load(extracted.path / "subnet.json")
    assert folder == extracted.path / "runs" / f"extract-{sub.arch.hash}"
    assert "writing the model to" in r.stderr and "from subnet.json's provenance" in r.stderr
    for name in ("model.safetensors", "model.onnx", "model.md", "subnet.json", "extract.json"):
        assert (folder / name).is_file(), name
    assert (folder / "model.mlpackage").is_dir()
    assert (folder / "model.mlpackage" / "Manifest.json").is_file()

    rec = json.loads((folder / "extract.json").read_text())
    m = rec["metrics"]
    # the tool's own parity figures are within the documented limits (checked independently below)
    assert m["supernet_parity_max_abs"] <= 1e-5
    assert m["onnx_max_abs"] <= 1e-4
    assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["val_accuracy_inherited"] <= 1.0
    lat = m["latency_ms"][F.DEVICE]
    assert lat["measured"] > 0 and lat["lut"] > 0
    assert lat["lut_source"] == "measured-lut"
    assert lat["lut"] == pytest.approx(sub.metrics["latency_ms"][F.DEVICE]["value"], rel=1e-9)
    assert m["params"] == sub.metrics["params"]
    assert set(rec["files"]) == {"model.safetensors", "model.onnx", "model.mlpackage", "model.md", "subnet.json"}

    out_sub = SubnetFile.load(folder / "subnet.json")
    assert out_sub.arch == sub.arch
    assert out_sub.provenance["supernet_sha256"] == sub.provenance["supernet_sha256"]
    assert out_sub.metrics["test_accuracy"] == m["test_accuracy"]
    card = (folder / "model.md").read_text()
    assert sub.arch.to_string() in card and "nas-extract subnet.json" in card
    assert "CoreML prediction needs macOS" in card or sys.platform == "darwin"
    F.check_folder_integrity(folder)


def test_load_subnet_equals_the_onnx_export(extracted: F.Shared) -> None:
    """ONNX Runtime, run here, against the torch model rebuilt from the folder."""
    import numpy as np
    import onnxruntime as ort

    from nas.extract import load_subnet

    folder = extracted.info["folder"]
    model = load_subnet(folder)
    assert not model.training
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    assert shape == [1, 3, F.RESOLUTION, F.RESOLUTION]
    gen = torch.Generator().manual_seed(1234)
    for _ in range(3):
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            want = model(x).numpy()
        got = sess.run(None, {inp.name: x.numpy()})[0]
        assert got.shape == want.shape == (1, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_loaded_model_computes_what_the_supernet_computes_for_that_arch(extracted: F.Shared) -> None:
    """The weights in model.safetensors are the supernet's for that arch, checked through the supernet's forward.

    BN statistics were recalibrated by the extraction, so the two are compared in training
    mode, where BN normalises with the batch's own statistics and the running statistics play
    no part: then only the weights decide the output. The comparison does not use
    ``get_active_subnet``, which the extraction itself uses.
    """
    from nas.extract import load_subnet
    from search_spaces import count_params
    from search_spaces.subnet_file import SubnetFile
    from supernet.run import load_run, load_supernet

    folder = extracted.info["folder"]
    sub = SubnetFile.load(folder / "subnet.json")
    net = load_supernet(load_run(extracted.run_dir))
    loaded = load_subnet(folder)
    assert sum(p.numel() for p in loaded.parameters()) == count_params(sub.specs()) == sub.metrics["params"]
    x = torch.randn(16, 3, F.RESOLUTION, F.RESOLUTION, generator=torch.Generator().manual_seed(7))
    net.train()
    loaded.train()
    with torch.no_grad():
        want = net(x, sub.arch)
        got = loaded(x)
    assert got.shape == (16, 10)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and eval mode differs only through BN: the recalibrated statistics are not the supernet's
    net.eval()
    loaded.eval()
    with torch.no_grad():
        assert not torch.allclose(loaded(x), net(x, sub.arch), atol=1e-5)


def test_loaded_bn_statistics_are_those_of_the_calibration_images(extracted: F.Shared) -> None:
    """Recalibrating the loaded model here, on the extraction's calibration images, gives back its statistics."""
    from nas.accuracy import load_run_splits
    from nas.extract import load_subnet
    from supernet.data import calibration_batches
    from supernet.run import load_run

    folder = extracted.info["folder"]
    loaded = load_subnet(folder)
    splits = load_run_splits(load_run(extracted.run_dir))
    batches = calibration_batches(splits.train, batch_size=128, num_batches=max(1, min(16, len(splits.train) // 128)),
                                  seed=0)
    saved = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in loaded.named_modules()
             if isinstance(m, torch.nn.BatchNorm2d)}
    assert saved
    _recalibrate(loaded, batches)
    for name, m in loaded.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, saved[name][0], atol=1e-5, rtol=1e-4, msg=name)
            torch.testing.assert_close(m.running_var, saved[name][1], atol=1e-5, rtol=1e-4, msg=name)


def _recalibrate(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """BN statistics as the mean over batches of each batch's mean and unbiased variance (written here)."""
    sums: dict[torch.nn.Module, list] = {}

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].double()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=True)
        acc = sums.setdefault(module, [0.0, 0.0, 0])
        acc[0], acc[1], acc[2] = acc[0] + mean, acc[1] + var, acc[2] + 1

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(record) for m in bns]
    model.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    for m in bns:
        s_mean, s_var, n = sums[m]
        m.running_mean.copy_((s_mean / n).float())
        m.running_var.copy_((s_var / n).float())
    model.eval()


def test_coreml_package_holds_the_model(extracted: F.Shared, tmp_path: Path) -> None:
    """The .mlpackage is the model: its inputs, outputs and operations, read from its spec with coremltools.

    Read from a copy: coremltools rewrites the package's Manifest.json when it opens one.
    """
    import shutil

    import coremltools as ct

    from nas.extract import load_subnet

    folder = extracted.info["folder"]
    model = load_subnet(folder)
    package = shutil.copytree(folder / "model.mlpackage", tmp_path / "model.mlpackage")
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    (inp,), (out,) = spec.description.input, spec.description.output
    assert (inp.name, list(inp.type.multiArrayType.shape)) == ("input", [1, 3, F.RESOLUTION, F.RESOLUTION])
    assert (out.name, list(out.type.multiArrayType.shape)) == ("output", [1, 10])
    main = spec.mlProgram.functions["main"]
    ops = collections.Counter(op.type for op in main.block_specializations[main.opset].operations)
    modules = collections.Counter(type(m).__name__ for m in model.modules())
    assert ops["conv"] == modules["Conv2d"] > 0, (ops, modules)
    assert ops["linear"] == modules["Linear"] > 0, (ops, modules)


def test_get_active_subnet_matches_the_supernet(extracted: F.Shared) -> None:
    from search_spaces.subnet_file import SubnetFile
    from supernet.run import load_run, load_supernet

    run = load_run(extracted.run_dir)
    net = load_supernet(run)
    arch = SubnetFile.load(extracted.info["folder"] / "subnet.json").arch
    x = torch.randn(4, 3, F.RESOLUTION, F.RESOLUTION, generator=torch.Generator().manual_seed(0))
    for a in (arch, run.space.smallest(), run.space.largest()):
        static = net.get_active_subnet(a).eval()
        with torch.no_grad():
            torch.testing.assert_close(static(x), net(x, a), atol=1e-5, rtol=0)


def test_formats_safetensors_writes_only_that_format(searched: F.Shared, tmp_path: Path) -> None:
    from nas.extract import load_subnet

    d = F.copy_folder(searched.path, tmp_path / "w")
    before = F.tree(d)
    r = F.cli("nas-extract", "subnet.json", "--formats", "safetensors", "--out", "runs/st-only", cwd=d)
    assert r.returncode == 0, F.describe(r)
    out = d / "runs" / "st-only"
    assert sorted(p.name for p in out.iterdir()) == ["extract.json", "model.md", "model.safetensors", "subnet.json"]
    rec = json.loads((out / "extract.json").read_text())
    assert set(rec["files"]) == {"model.safetensors", "model.md", "subnet.json"}
    assert "onnx_max_abs" not in rec["metrics"] and "coreml_prediction" not in rec["metrics"]
    new = set(F.tree(d)) - set(before)
    assert {p.split("/")[0] if not p.startswith("runs/") else "/".join(p.split("/")[:2]) for p in new} == \
        {"runs/st-only"}, sorted(new)
    load_subnet(out)
