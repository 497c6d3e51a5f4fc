"""Success paths of the README's ``nas-train`` features, as users type them (real processes, tiny runs).

A base run (demo space, ``synthetic:96`` at 32 px, one epoch of 2 steps) and one run per flag
with everything else equal, two processes at a time. Training is deterministic (the restart test
proves it: the same command trains bit-identical weights again), so a flag that changes the
weights has reached the training loop. Each test checks the outcome a user would check: the
recorded recipe, the run's space, the data it trained on, the weights.

Flags: ``--stem-stride``, ``--num-random``, ``--distill``, ``--channels-last``, ``--restart``,
``--dataset imagefolder:PATH``, ``--dataset fashion-mnist``; and the GPU recipe (``--device
cuda --compile``), which runs only where a CUDA GPU is.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402

BASE = ("--space", "efficientformer_v2_demo", "--dataset", "synthetic:96", "--resolution", "32", "--epochs", "1",
        "--batch-size", "32", "--calib-batches", "1", "--seed", "0", "--threads", "1", "--no-progress")
VARIANTS = {
    "base": (),
    "stem4": ("--stem-stride", "4"),
    "random0": ("--num-random", "0"),
    "nodistill": ("--distill", "false"),
    "nhwc-off": ("--channels-last", "false"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-flags")
    results = F.cli_many([("nas-train", (*BASE, *extra, "--out", name), root) for name, extra in VARIANTS.items()])
    for name, r in zip(VARIANTS, results):
        assert r.returncode == 0, f"{name}: {F.describe(r)}"
    return {name: root / name for name in VARIANTS}


def _meta(run: Path) -> dict:
    return json.loads((run / "supernet.json").read_text())


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from supernet.checkpoint import load_tensors

    tensors, _ = load_tensors(run / "supernet.safetensors")
    return tensors


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _stem_width(run: Path) -> int:
    """Width in pixels of the stem's output map, from a forward pass of the saved supernet."""
    from supernet.run import load_run, load_supernet

    net = load_supernet(load_run(run)).eval()
    seen: list[int] = []
    handle = net.units["stem"].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    handle.remove()
    assert len(seen) == 1, seen
    return seen[0]


def test_flag_stem_stride_sets_the_runs_stem(runs: dict[str, Path]) -> None:
    from supernet.run import load_run

    assert load_run(runs["base"]).space.stem_stride == 2   # the default up to 64 px
    assert load_run(runs["stem4"]).space.stem_stride == 4 and _meta(runs["stem4"])["recipe"]["stem_stride"] == 4
    assert (_stem_width(runs["base"]), _stem_width(runs["stem4"])) == (16, 8)


def test_flag_num_random_changes_the_subnets_trained(runs: dict[str, Path]) -> None:
    assert _meta(runs["random0"])["recipe"]["num_random"] == 0 and _meta(runs["base"])["recipe"]["num_random"] == 1
    assert _differs(_weights(runs["random0"]), _weights(runs["base"])), "--num-random 0 trained the same weights"


def test_flag_distill_false_trains_on_labels(runs: dict[str, Path]) -> None:
    assert _meta(runs["nodistill"])["recipe"]["distill"] is False and _meta(runs["base"])["recipe"]["distill"] is True
    assert _differs(_weights(runs["nodistill"]), _weights(runs["base"])), "--distill false trained the same weights"


def test_flag_channels_last_false_trains_the_same_model(runs: dict[str, Path]) -> None:
    """Memory format changes only the order of float sums: the weights match the NHWC run's closely."""
    assert _meta(runs["nhwc-off"])["recipe"]["channels_last"] is False
    assert _meta(runs["base"])["recipe"]["channels_last"] is True
    a, b = _weights(runs["nhwc-off"]), _weights(runs["base"])
    torch.manual_seed(0)
    from search_spaces import get_space
    from supernet import Supernet

    init = Supernet(get_space("efficientformer_v2_demo").with_stem_stride(2), num_classes=10, resolution=32,
                    in_chans=3).state_dict()
    floats = [k for k in a if a[k].is_floating_point() and not k.endswith(("running_mean", "running_var"))]

    def dist(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float((x[k].double() - y[k].double()).square().sum()) for k in floats))

    moved = dist(b, init)   # how far two training steps moved the weights
    assert moved > 0
    assert dist(a, b) < 0.05 * moved, (dist(a, b), moved)


def test_flag_restart_trains_again_from_scratch(runs: dict[str, Path], tmp_path: Path) -> None:
    run = F.copy_folder(runs["base"], tmp_path / "run")
    before = (run / "supernet.json").stat().st_mtime_ns
    again = F.cli("nas-train", *BASE, "--out", str(run), cwd=tmp_path)
    assert again.returncode == 0, F.describe(again)
    assert "already trained with these settings" in again.stderr, again.stderr
    assert (run / "supernet.json").stat().st_mtime_ns == before
    restarted = F.cli("nas-train", *BASE, "--restart", "--out", str(run), cwd=tmp_path)
    assert restarted.returncode == 0, F.describe(restarted)
    assert "already trained" not in restarted.stderr and "resuming" not in restarted.stderr
    assert (run / "supernet.json").stat().st_mtime_ns != before
    assert not _differs(_weights(run), _weights(runs["base"])), "the same command must train the same weights"
    assert _meta(run)["weights_sha256"] == _meta(runs["base"])["weights_sha256"]


def test_dataset_imagefolder_trains_on_the_folders_classes(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    classes = {"cat": (200, 60, 60), "dog": (60, 200, 60), "fox": (60, 60, 200)}
    for name, colour in classes.items():
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(16):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    r = F.cli("nas-train", "--dataset", "imagefolder:imgs", "--space", "efficientformer_v2_demo", "--resolution", "32",
              "--epochs", "1", "--batch-size", "16", "--calib-batches", "1", "--threads", "1", "--no-progress",
              "--out", "runs/folder", cwd=tmp_path)
    assert r.returncode == 0, F.describe(r)
    meta = _meta(tmp_path / "runs" / "folder")
    assert meta["complete"] and meta["num_classes"] == 3 and meta["in_chans"] == 3
    assert meta["dataset"]["class_names"] == sorted(classes), meta["dataset"]
    sizes = meta["dataset"]["sizes"]
    assert sizes["train"] + sizes["val"] + sizes["test"] == 48, sizes
    from supernet.run import load_run, load_supernet

    net = load_supernet(load_run(tmp_path / "runs" / "folder"))
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_dataset_fashion_mnist_trains(tmp_path: Path) -> None:
    """The README's dataset (installed by ``make test``), on a small seeded subset."""
    r = F.cli("nas-train", "--dataset", "fashion-mnist", "--train-subset", "64", "--val-size", "32",
              "--space", "efficientformer_v2_demo", "--resolution", "32", "--epochs", "1", "--batch-size", "32",
              "--calib-batches", "1", "--threads", "1", "--no-progress", "--out", "runs/fm", cwd=tmp_path)
    assert r.returncode == 0, F.describe(r)
    meta = _meta(tmp_path / "runs" / "fm")
    assert meta["complete"] and meta["num_classes"] == 10 and meta["in_chans"] == 1
    assert meta["dataset"]["class_names"][9] == "Ankle boot"
    assert meta["dataset"]["sizes"] == {"train": 64, "val": 32, "test": 10_000}


@pytest.mark.cuda_only
def test_gpu_recipe_trains_on_cuda(tmp_path: Path) -> None:
    """``--device cuda`` with bf16 autocast and ``--compile``: the GPU recipe of the README."""
    r = F.cli("nas-train", *BASE, "--device", "cuda", "--compile", "--out", "runs/gpu", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, F.describe(r)
    meta = _meta(tmp_path / "runs" / "gpu")
    assert meta["complete"] and meta["recipe"]["device"] == "cuda" and meta["recipe"]["compile"] is True
    assert all(0.0 <= meta["metrics"][k] <= 1.0 for k in ("val_acc_largest", "test_acc_largest"))
