"""Tests of ``nas-extract``: a searched subnet becomes a standalone, exported model.

Runs ``nas-extract subnet.json`` as typed by a user in the shared working folder (after the
shared default search), then checks the files, the recorded parity figures, and that the
model rebuilt by :func:`nas.extract.load_subnet` computes what the exported ONNX file computes.
The measured latency is not compared with the budget here (that belongs to the benchmark).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> F.Work:
    return F.get_work(tmp_path_factory)


@pytest.fixture(scope="module")
def extracted(work: F.Work) -> Path:
    """``nas-extract subnet.json`` in the working folder; returns the folder it wrote."""
    F.default_search(work)
    r = F.cli("nas-extract", "subnet.json", cwd=work.path, timeout=600)
    assert r.returncode == 0, F.describe(r)
    assert "Traceback" not in r.stderr + r.stdout
    m = re.search(r"^extracted model: (\S+)$", r.stdout, flags=re.M)
    assert m, r.stdout
    folder = work.path / m.group(1)
    assert folder.is_dir()
    work.cache["extract_run"] = r
    return folder


def test_extract_writes_every_format_and_the_records(work: F.Work, extracted: Path) -> None:
    from search_spaces.subnet_file import SubnetFile

    r = work.cache["extract_run"]
    sub = SubnetFile.load(work.path / "subnet.json")
    assert extracted == work.path / "runs" / f"extract-{sub.arch.hash}"
    assert "writing the model to" in r.stderr and "from subnet.json's provenance" in r.stderr
    for name in ("model.safetensors", "model.onnx", "model.md", "subnet.json", "extract.json"):
        assert (extracted / name).is_file(), name
    assert (extracted / "model.mlpackage").is_dir()
    assert (extracted / "model.mlpackage" / "Manifest.json").is_file()

    rec = json.loads((extracted / "extract.json").read_text())
    m = rec["metrics"]
    assert m["supernet_parity_max_abs"] <= 1e-5
    assert m["onnx_max_abs"] <= 1e-4
    assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["val_accuracy_inherited"] <= 1.0
    lat = m["latency_ms"][F.DEVICE]
    assert lat["measured"] > 0 and lat["lut"] > 0
    assert lat["lut_source"] == "measured-lut"
    assert lat["lut"] == pytest.approx(sub.metrics["latency_ms"][F.DEVICE]["value"], rel=1e-9)
    assert m["params"] == sub.metrics["params"]
    assert set(rec["files"]) == {"model.safetensors", "model.onnx", "model.mlpackage", "model.md", "subnet.json"}

    out_sub = SubnetFile.load(extracted / "subnet.json")
    assert out_sub.arch == sub.arch
    assert out_sub.provenance["supernet_sha256"] == sub.provenance["supernet_sha256"]
    assert out_sub.metrics["test_accuracy"] == m["test_accuracy"]
    card = (extracted / "model.md").read_text()
    assert sub.arch.to_string() in card and "nas-extract subnet.json" in card
    F.check_folder_integrity(extracted)


def test_load_subnet_equals_the_onnx_export(extracted: Path) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    from nas.extract import load_subnet

    model = load_subnet(extracted)
    assert not model.training
    sess = ort.InferenceSession(str(extracted / "model.onnx"), providers=["CPUExecutionProvider"])
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


def test_load_subnet_holds_the_supernet_weights_for_that_arch(work: F.Work, extracted: Path) -> None:
    """Every weight equals the supernet's slice; only BN running statistics were recalibrated."""
    import torch

    from nas.extract import load_subnet
    from search_spaces.subnet_file import SubnetFile
    from supernet.run import load_supernet

    arch = SubnetFile.load(extracted / "subnet.json").arch
    net = load_supernet(work.run_dir)
    static = net.get_active_subnet(arch).eval()
    loaded = load_subnet(extracted)
    a, b = static.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for key in a:
        assert a[key].shape == b[key].shape, key
        if not key.endswith(stats):
            torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


def test_get_active_subnet_matches_the_supernet(work: F.Work, extracted: Path) -> None:
    import torch

    from search_spaces.subnet_file import SubnetFile
    from supernet.run import load_run, load_supernet

    run = load_run(work.run_dir)
    net = load_supernet(run)
    arch = SubnetFile.load(extracted / "subnet.json").arch
    x = torch.randn(4, 3, F.RESOLUTION, F.RESOLUTION, generator=torch.Generator().manual_seed(0))
    for a in (arch, run.space.smallest(), run.space.largest()):
        static = net.get_active_subnet(a).eval()
        with torch.no_grad():
            torch.testing.assert_close(static(x), net(x, a), atol=1e-5, rtol=0)


def test_formats_safetensors_writes_only_that_format(work: F.Work, extracted: Path) -> None:
    from nas.extract import load_subnet

    before = F.tree(work.path)
    r = F.cli("nas-extract", "subnet.json", "--formats", "safetensors", "--out", "runs/st-only", cwd=work.path)
    assert r.returncode == 0, F.describe(r)
    out = work.path / "runs" / "st-only"
    assert sorted(p.name for p in out.iterdir()) == ["extract.json", "model.md", "model.safetensors", "subnet.json"]
    rec = json.loads((out / "extract.json").read_text())
    assert set(rec["files"]) == {"model.safetensors", "model.md", "subnet.json"}
    assert "onnx_max_abs" not in rec["metrics"] and "coreml_prediction" not in rec["metrics"]
    new = set(F.tree(work.path)) - set(before)
    assert {p.split("/")[0] if not p.startswith("runs/") else "/".join(p.split("/")[:2]) for p in new} == \
        {"runs/st-only"}, sorted(new)
    load_subnet(out)
