"""``nas-extract`` for dense tasks and with a teacher: backbones, other input sizes, distillation.

Each test works in its own folder next to the shared trained one (read only: its supernet run is
named in a subnet.json written by hand, a config of the demo space), so nothing here depends on
another test's search.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402

from search_spaces.subnet_file import SubnetFile  # noqa: E402


def _subnet(folder: Path, work: F.Shared, **changes: object) -> Path:
    """A subnet.json for a mid-sized demo config, tied to the shared supernet run."""
    from supernet.run import load_run

    run = load_run(work.run_dir)
    arch = run.space.sample(7)
    sub = SubnetFile(arch, resolution=run.resolution, num_classes=run.num_classes, in_chans=run.in_chans,
                     provenance={"supernet_run": str(work.run_dir.resolve()), "supernet_sha256": run.weights_sha256})
    from dataclasses import replace

    sub = replace(sub, **changes)
    return sub.save(folder / "subnet.json")


def _extract(folder: Path, *args: str, formats: str = "safetensors,onnx") -> tuple[Path, dict]:
    r = F.cli("nas-extract", "subnet.json", "--formats", formats, *args, cwd=folder, timeout=900)
    assert r.returncode == 0, F.describe(r)
    assert "Traceback" not in r.stderr
    out = folder / re.search(r"^extracted model: (\S+)", r.stdout, flags=re.M).group(1)
    return out, json.loads((out / "extract.json").read_text())["metrics"]


def test_features_only_writes_a_multi_output_backbone(work: F.Shared, tmp_path: Path) -> None:
    import onnxruntime as ort

    from nas.extract import load_subnet

    _subnet(tmp_path, work)
    out, metrics = _extract(tmp_path, "--features-only", "--no-measure", formats="safetensors,onnx,coreml")
    model = load_subnet(out)
    assert not model.has_head and len(model.feature_info) == 4
    x = torch.randn(1, model.in_chans, *model.hw)
    with torch.no_grad():
        feats = model(x)
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in model.feature_info]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert [o.name for o in sess.get_outputs()] == ["feature0", "feature1", "feature2", "feature3"]
    assert max(float(np.abs(g - f.numpy()).max()) for g, f in zip(got, feats)) <= 1e-4
    assert metrics["deployed_as"].startswith("backbone") and metrics["onnx_max_abs"] <= 1e-4
    import coremltools as ct  # the CoreML package holds one output per stage, of the maps' shapes

    spec = ct.models.MLModel(str(out / "model.mlpackage"), skip_model_load=True).get_spec()
    assert [(o.name, list(o.type.multiArrayType.shape)) for o in spec.description.output] == \
        [(f"feature{i}", list(f.shape)) for i, f in enumerate(feats)]
    # the supernet's stage maps for the same config have the same shapes (values differ: BN was recalibrated)
    from supernet.run import load_supernet

    net = load_supernet(work.run_dir)
    with torch.no_grad():
        ref = net.forward_features(x, SubnetFile.load(tmp_path / "subnet.json").arch)
    assert [tuple(r.shape) for r in ref] == [tuple(f.shape) for f in feats]


def test_a_backbone_deployed_at_another_input_size(work: F.Shared, tmp_path: Path) -> None:
    from nas.extract import load_subnet

    _subnet(tmp_path, work, resolution=(64, 96), task="backbone")
    out, metrics = _extract(tmp_path, "--no-measure")
    model = load_subnet(out)
    assert model.hw == (64, 96) and not model.has_head
    feats = model(torch.randn(1, model.in_chans, 64, 96))
    assert [tuple(f.shape[2:]) for f in feats] == [(32, 48), (16, 24), (8, 12), (4, 6)]
    saved = SubnetFile.load(out / "subnet.json")
    assert saved.task == "backbone" and saved.hw == (64, 96)
    assert json.loads((out / "subnet.json").read_text())["schema"] == 2
    assert 0 <= metrics["test_accuracy"] <= 1  # scored as a classifier at the supernet's size


def test_teacher_distillation_while_fine_tuning(work: F.Shared, tmp_path: Path) -> None:
    from supernet.run import load_run

    run = load_run(work.run_dir)
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    largest = SubnetFile(run.space.largest(), resolution=run.resolution, num_classes=run.num_classes,
                         in_chans=run.in_chans,
                         provenance={"supernet_run": str(work.run_dir.resolve()), "supernet_sha256": run.weights_sha256})
    largest.save(teacher_dir / "subnet.json")
    teacher, _ = _extract(teacher_dir, "--no-measure", "--out", "teacher-model")
    student_dir = tmp_path / "student"
    student_dir.mkdir()
    _subnet(student_dir, work)
    plain, m_plain = _extract(student_dir, "--no-measure", "--finetune-epochs", "1", "--out", "plain")
    taught, m_taught = _extract(student_dir, "--no-measure", "--finetune-epochs", "1", "--out", "taught",
                                "--teacher", str(teacher))
    assert m_taught["teacher"].startswith("hard distillation") and "teacher" not in m_plain
    from nas.extract import load_subnet

    a, b = load_subnet(plain).state_dict(), load_subnet(taught).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a), "the teacher changed nothing"
    r = F.cli("nas-extract", "subnet.json", "--teacher", str(teacher), "--no-measure", cwd=student_dir)
    assert r.returncode == 2 and "--finetune-epochs" in r.stderr and "Traceback" not in r.stderr
    r = F.cli("nas-extract", "subnet.json", "--finetune-epochs", "1", "--teacher", "nowhere", cwd=student_dir)
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_search_budgets_a_backbone_at_its_deployment_size(work: F.Shared, tmp_path: Path) -> None:
    """The card's lines with ``--resolution HxW --task backbone``: LUT, search and extraction of a headless net."""
    from latency import LatencyTable, predict_latency
    from search_spaces import count_params
    from supernet.run import load_run

    d = F.copy_workdir(work.path, tmp_path / "w")
    size = ["--resolution", "48x64", "--task", "backbone"]
    lut = F.cli("nas-build-lut", "--device", F.DEVICE, *size, "--validate", "4", "--no-progress", cwd=d, timeout=600)
    assert lut.returncode == 0, F.describe(lut)
    table = LatencyTable.load(d / "lut-local-cpu-48x64-backbone.json")
    assert table.setup.task == "backbone" and table.setup.resolution == (48, 64)
    space = load_run(d / F.RUN).space
    small, large = predict_latency(space.smallest(), table), predict_latency(space.largest(), table)
    budget_ms = small + 0.4 * (large - small)
    # without --task the classifier LUT of the run's input size is the one that counts: not this one
    r = F.cli("nas-search", *size, "--latency", f"{budget_ms:.4f}ms", "--val-images", "40", "--calib-batches", "1",
              "--threads", "1", cwd=d, timeout=600)
    assert r.returncode == 0, F.describe(r)
    assert "budgets apply to the deployment at 48x64 as a backbone" in r.stderr
    sub = SubnetFile.load(d / "subnet.json")
    assert sub.task == "backbone" and sub.hw == (48, 64)
    ms = predict_latency(sub.arch, table)
    assert ms <= budget_ms and sub.metrics["latency_ms"][F.DEVICE]["value"] == ms
    assert sub.metrics["params"] == count_params(sub.specs())   # the headless network's parameters
    assert sub.specs()[-1].kind != "ef2.head"
    out, rec = _extract(d, "--no-measure")
    model = out / "model.onnx"
    assert rec["params"] == sub.metrics["params"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 64)).astype(np.float32)
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    from nas.extract import load_subnet

    info = load_subnet(out).feature_info   # one map per stage, each at its reduction of 48x64
    assert [o.shape[1:] for o in outs] == [(i["num_chs"], 48 // i["reduction"], 64 // i["reduction"]) for i in info]


def test_search_without_a_lut_for_the_deployment_names_the_build_command(work: F.Shared, tmp_path: Path) -> None:
    d = F.copy_workdir(work.path, tmp_path / "w")
    r = F.cli("nas-search", "--resolution", "48x64", "--task", "backbone", "--latency", "1ms", cwd=d)
    assert r.returncode == 2 and "Traceback" not in r.stderr, F.describe(r)
    assert "nas-build-lut --device DEVICE --resolution 48x64 --task backbone" in r.stderr, r.stderr
    assert not (d / "runs" / "search").exists(), "nothing is written before the inputs are checked"
