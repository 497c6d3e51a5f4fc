"""``nas-train --init PRESET=WEIGHTS`` (warm start from published weights) and ``--teacher`` (hard
distillation), as users type them: real processes on tiny synthetic runs, real checkpoint files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402

from search_spaces import get_preset, get_space  # noqa: E402
from search_spaces.subnet_file import SubnetFile  # noqa: E402
from supernet import build_model, init_supernet_from, Supernet  # noqa: E402
from supernet.checkpoint import load_tensors, save_tensors  # noqa: E402
from supernet.pretrained import export_state_dict  # noqa: E402

TINY = ("--dataset", "synthetic:64", "--resolution", "32", "--epochs", "1", "--batch-size", "32",
        "--calib-batches", "1", "--threads", "1", "--no-progress")


def _timm_checkpoint(folder: Path, name: str) -> Path:
    """A checkpoint of a preset in timm's layout, seeded (as a published file would be)."""
    torch.manual_seed(3)
    model = build_model(get_preset(name))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = folder / f"{name}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in export_state_dict(model, "timm").items()}, str(path))
    return path


def test_init_warm_starts_the_supernet_from_a_published_preset(tmp_path: Path) -> None:
    ckpt = _timm_checkpoint(tmp_path, "efficientformer_l1")
    r = F.cli("nas-train", "--space", "efficientformer", *TINY, "--num-random", "0", "--out", "run",
              "--init", f"efficientformer_l1={ckpt}", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, F.describe(r)
    assert "warm start" in r.stderr and "efficientformer" in r.stderr
    meta = json.loads((tmp_path / "run" / "supernet.json").read_text())
    assert meta["recipe"]["init"] == [f"efficientformer_l1={ckpt}"]
    # the same warm start in the library: the preset extracted before training is the checkpoint's model
    space = get_space("efficientformer").with_stem_stride(2)
    net = Supernet(space, num_classes=10, resolution=32, in_chans=3)
    from dataclasses import replace

    arch = replace(get_preset("efficientformer_l1"), stem_stride=2)
    init_supernet_from(net, arch, ckpt)
    ref = build_model(arch, num_classes=10, resolution=32, pretrained=ckpt).eval()
    sub = net.get_active_subnet(arch).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_ref, out_sub = ref(x), sub(x)
    # the classifier was re-initialised in both (1000 -> 10 classes): compare the features
    with torch.no_grad():
        torch.testing.assert_close(sub.forward_features(x, (0, 1, 2, 3)), ref.forward_features(x, (0, 1, 2, 3)),
                                   rtol=0, atol=1e-5)
    assert out_ref.shape == out_sub.shape == (2, 10)


@pytest.mark.parametrize("init, message", [
    ("nopreset=x.pth", "not a preset"),
    ("efficientformer_l1=missing.pth", "no weights file"),
    ("efficientformerv2_s0=CKPT", "not in the space"),
    ("justtext", "PRESET=WEIGHTS"),
])
def test_init_mistakes_are_one_line_and_exit_2(tmp_path: Path, init: str, message: str) -> None:
    ckpt = _timm_checkpoint(tmp_path, "efficientformerv2_s0")
    r = F.cli("nas-train", "--space", "efficientformer_demo", *TINY, "--out", "run",
              "--init", init.replace("CKPT", str(ckpt)), cwd=tmp_path, timeout=300)
    assert r.returncode == 2, F.describe(r)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def _extracted_teacher(folder: Path) -> Path:
    """A trained-looking model folder as nas-extract writes it (model.safetensors with its subnet.json)."""
    arch = get_space("efficientformer_v2_demo").with_stem_stride(2).largest()
    torch.manual_seed(5)
    model = build_model(arch, num_classes=10, resolution=32, in_chans=3)
    sub = SubnetFile(arch, resolution=32, num_classes=10, in_chans=3)
    folder.mkdir()
    save_tensors(folder / "model.safetensors", dict(model.state_dict()), {"subnet": sub.to_dict()})
    return folder


def test_teacher_distils_into_the_largest_subnet(tmp_path: Path) -> None:
    teacher = _extracted_teacher(tmp_path / "teacher")
    base = ("--space", "efficientformer_v2_demo", *TINY)
    results = F.cli_many([("nas-train", (*base, "--out", "plain"), tmp_path),
                          ("nas-train", (*base, "--out", "taught", "--teacher", str(teacher)), tmp_path)])
    for r in results:
        assert r.returncode == 0, F.describe(r)
    a, _ = load_tensors(tmp_path / "plain" / "supernet.safetensors")
    b, _ = load_tensors(tmp_path / "taught" / "supernet.safetensors")
    heads = [k for k in a if ".head_dist." in k]
    assert heads and any(not torch.equal(a[k], b[k]) for k in heads), "the teacher did not reach head_dist"
    assert json.loads((tmp_path / "taught" / "supernet.json").read_text())["recipe"]["teacher"] == str(teacher)


def test_teacher_of_other_classes_is_refused(tmp_path: Path) -> None:
    arch = get_space("efficientformer_v2_demo").with_stem_stride(2).largest()
    folder = tmp_path / "teacher"
    folder.mkdir()
    model = build_model(arch, num_classes=7, resolution=32, in_chans=3)
    save_tensors(folder / "model.safetensors", dict(model.state_dict()),
                 {"subnet": SubnetFile(arch, resolution=32, num_classes=7, in_chans=3).to_dict()})
    r = F.cli("nas-train", "--space", "efficientformer_v2_demo", *TINY, "--out", "run", "--teacher", str(folder),
              cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "7 classes" in r.stderr and "Traceback" not in r.stderr, F.describe(r)
    assert not (tmp_path / "run").exists()
