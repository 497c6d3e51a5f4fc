"""Tests of supernet.data: datasets, splits, the deterministic loader and calibration batches."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from search_spaces.errors import NasUserError
from supernet.data import (
    FASHION_MNIST_DIR,
    DatasetSplits,
    ImageSplit,
    calibration_batches,
    load_dataset,
    make_loader,
)


@pytest.fixture(scope="module")
def synth() -> DatasetSplits:
    return load_dataset("synthetic:400", resolution=16, seed=3)


def _rows(images: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in images}


def _collect(loader) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_shapes_dtypes_and_sizes(synth: DatasetSplits) -> None:
    assert (len(synth.train), len(synth.val), len(synth.test)) == (360, 40, 80)
    assert synth.num_classes == 10 and synth.in_chans == 3 and synth.resolution == 16
    assert synth.name == "synthetic:400" and len(synth.class_names) == 10
    for split in (synth.train, synth.val, synth.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 16, 16)
        assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split),)
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < 10
        assert split.mean == synth.mean and split.std == synth.std
    assert len(synth.mean) == 3 and all(0 < s for s in synth.std)
    assert load_dataset("synthetic", resolution=8).name == "synthetic:2048"
    assert synth.describe()["sizes"] == {"train": 360, "val": 40, "test": 80}


def test_normalisation_gives_zero_mean_unit_std(synth: DatasetSplits) -> None:
    (x, _), = list(make_loader(synth.train, batch_size=len(synth.train), shuffle=False, seed=0))
    assert x.dtype == torch.float32 and x.shape == (360, 3, 16, 16)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_synthetic_is_seeded() -> None:
    a = load_dataset("synthetic:100", resolution=8, seed=1)
    b = load_dataset("synthetic:100", resolution=8, seed=1)
    c = load_dataset("synthetic:100", resolution=8, seed=2)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)


def test_synthetic_is_learnable() -> None:
    data = load_dataset("synthetic:1000", resolution=8, seed=0)
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3 * 8 * 8, 10)
    with torch.no_grad():
        model.weight.copy_(0.01 * torch.randn(model.weight.shape, generator=gen))
        model.bias.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in make_loader(data.train, batch_size=64, shuffle=True, seed=0):
        loss = torch.nn.functional.cross_entropy(model(x.flatten(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    (x, y), = list(make_loader(data.val, batch_size=len(data.val), shuffle=False, seed=0))
    accuracy = (model(x.flatten(1)).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


# ----------------------------------------------------------------------------- splits


def test_val_split_is_fixed_and_disjoint_from_train() -> None:
    a = load_dataset("synthetic:300", resolution=8, seed=5)
    b = load_dataset("synthetic:300", resolution=8, seed=5)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    train, val, test = _rows(a.train.images), _rows(a.val.images), _rows(a.test.images)
    assert len(train) == 270 and len(val) == 30  # all distinct images
    assert not train & val and not train & test and not val & test
    other = load_dataset("synthetic:300", resolution=8, seed=6)
    assert _rows(other.val.images) != val


def test_val_size_count_fraction_and_train_subset() -> None:
    full = load_dataset("synthetic:200", resolution=8, seed=0, val_size=50)
    assert (len(full.train), len(full.val)) == (150, 50)
    frac = load_dataset("synthetic:200", resolution=8, seed=0, val_size=0.25)
    assert len(frac.val) == 50 and torch.equal(frac.val.images, full.val.images)
    sub = load_dataset("synthetic:200", resolution=8, seed=0, val_size=50, train_subset=40)
    assert len(sub.train) == 40
    assert torch.equal(sub.val.images, full.val.images)  # the carve-out ignores train_subset
    assert _rows(sub.train.images) <= _rows(full.train.images)
    assert sub.mean == full.mean and sub.std == full.std


@pytest.mark.parametrize("val_size", [0, 200, 0.0, 1.0, -0.5, 1.1, math.nan, math.inf, True, "10"])
def test_bad_val_size_is_rejected(val_size: object) -> None:
    with pytest.raises(NasUserError, match="val_size"):
        load_dataset("synthetic:200", resolution=8, val_size=val_size)  # type: ignore[arg-type]


def test_val_size_boundaries_are_accepted() -> None:
    assert len(load_dataset("synthetic:200", resolution=8, val_size=1).val) == 1
    assert len(load_dataset("synthetic:200", resolution=8, val_size=199).train) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_subset": 0}, "train_subset"),
        ({"train_subset": 10_000}, "train_subset"),
        ({"resolution": 7}, "resolution"),
        ({"resolution": 1025}, "resolution"),
        ({"resolution": 16.0}, "resolution"),
        ({"seed": -1}, "seed"),
        ({"root": "/tmp"}, "root"),
        ({"test_size": 0.2}, "test_size"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, match: str) -> None:
    args = {"resolution": 8, **kwargs}
    with pytest.raises(NasUserError, match=match):
        load_dataset("synthetic:200", **args)


@pytest.mark.parametrize("spec", ["mnist", "cifar10", "imagefolder:", "synthetic:abc", "fashion-mnist:x", ""])
def test_unknown_spec_lists_the_accepted_forms(spec: str) -> None:
    with pytest.raises(NasUserError) as info:
        load_dataset(spec, resolution=16)
    message = str(info.value)
    if spec != "synthetic:abc":
        for form in ("fashion-mnist", "imagefolder:PATH", "synthetic:N"):
            assert form in message
    else:
        assert "synthetic:2048" in message


def test_synthetic_too_small_is_rejected() -> None:
    with pytest.raises(NasUserError, match="synthetic"):
        load_dataset("synthetic:5", resolution=8)


def test_image_split_validates_its_tensors() -> None:
    with pytest.raises(NasUserError, match="images"):
        ImageSplit(images=torch.zeros(4, 8, 8), labels=torch.zeros(4, dtype=torch.int64), mean=(0.5,), std=(0.2,))
    with pytest.raises(NasUserError, match="labels"):
        ImageSplit(images=torch.zeros(4, 1, 8, 8), labels=torch.zeros(3, dtype=torch.int64), mean=(0.5,), std=(0.2,))
    with pytest.raises(NasUserError, match="std"):
        ImageSplit(images=torch.zeros(4, 1, 8, 8), labels=torch.zeros(4, dtype=torch.int64), mean=(0.5,), std=(0.0,))


# ----------------------------------------------------------------------------- loader


def test_loader_is_deterministic_and_leaves_global_rng_alone(synth: DatasetSplits) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = _collect(make_loader(synth.train, batch_size=32, shuffle=True, seed=7, epoch=2, augment=True))
    assert torch.equal(torch.rand(3), expected_next)
    b = _collect(make_loader(synth.train, batch_size=32, shuffle=True, seed=7, epoch=2, augment=True))
    for xa, xb in zip(a[0], b[0]):
        assert torch.equal(xa, xb)
    other_epoch = _collect(make_loader(synth.train, batch_size=32, shuffle=True, seed=7, epoch=3))
    assert not torch.equal(torch.cat(a[1]), torch.cat(other_epoch[1]))


def test_loader_length_and_drop_last(synth: DatasetSplits) -> None:
    train = make_loader(synth.train, batch_size=32, shuffle=True, seed=0)  # drop_last defaults to True
    assert len(train) == 360 // 32 == len(list(train))
    assert all(x.shape == (32, 3, 16, 16) for x, _ in train)
    evaluation = make_loader(synth.val, batch_size=16, shuffle=False, seed=0)  # keeps the last batch
    xs, ys = _collect(evaluation)
    assert len(evaluation) == 3 and [len(y) for y in ys] == [16, 16, 8]
    assert torch.equal(torch.cat(ys), synth.val.labels)


def test_resume_yields_the_tail_of_the_full_order(synth: DatasetSplits) -> None:
    kwargs = dict(batch_size=24, shuffle=True, seed=11, epoch=4, augment=True)
    full_x, full_y = _collect(make_loader(synth.train, **kwargs))
    resumed = make_loader(synth.train, start_batch=5, **kwargs)
    assert len(resumed) == len(full_x) - 5
    tail_x, tail_y = _collect(resumed)
    assert len(tail_x) == len(full_x) - 5
    for a, b in zip(tail_x, full_x[5:]):
        assert torch.equal(a, b)
    for a, b in zip(tail_y, full_y[5:]):
        assert torch.equal(a, b)
    assert len(make_loader(synth.train, start_batch=len(full_x), **kwargs)) == 0


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("augment", [False, True])
def test_rank_shards_are_disjoint_and_form_the_global_batch(
    synth: DatasetSplits, world_size: int, augment: bool
) -> None:
    kwargs = dict(batch_size=32, shuffle=True, seed=9, epoch=1, augment=augment)
    global_batches = _collect(make_loader(synth.train, **kwargs))
    shards = [_collect(make_loader(synth.train, rank=r, world_size=world_size, **kwargs)) for r in range(world_size)]
    for b, (gx, gy) in enumerate(zip(*global_batches)):
        rebuilt_x, rebuilt_y = torch.empty_like(gx), torch.empty_like(gy)
        seen: set[bytes] = set()
        for r in range(world_size):
            x, y = shards[r][0][b], shards[r][1][b]
            assert x.shape[0] == 32 // world_size
            rows = _rows(x)
            assert not rows & seen
            seen |= rows
            rebuilt_x[r::world_size], rebuilt_y[r::world_size] = x, y
        assert torch.equal(rebuilt_x, gx) and torch.equal(rebuilt_y, gy)


def test_sharded_evaluation_covers_every_image_once(synth: DatasetSplits) -> None:
    labels = []
    for r in range(3):
        loader = make_loader(synth.val, batch_size=9, shuffle=False, seed=0, rank=r, world_size=3)
        assert len(loader) == 5  # every rank sees the same number of batches
        labels.append(torch.cat([y for _, y in loader]))
    assert sum(len(y) for y in labels) == len(synth.val)


def test_augmentation_is_reproducible_and_changes_images(synth: DatasetSplits) -> None:
    plain = next(iter(make_loader(synth.train, batch_size=64, shuffle=True, seed=2)))[0]
    aug1 = next(iter(make_loader(synth.train, batch_size=64, shuffle=True, seed=2, augment=True)))[0]
    aug2 = next(iter(make_loader(synth.train, batch_size=64, shuffle=True, seed=2, augment=True)))[0]
    assert torch.equal(aug1, aug2) and aug1.shape == plain.shape
    assert not torch.equal(aug1, plain)
    # Without cropping, each image is either itself or its mirror image.
    flip_loader = make_loader(synth.train, batch_size=64, shuffle=True, seed=2, augment=True, crop_pad_px=0)
    flip_only = next(iter(flip_loader))[0]
    same = (flip_only == plain).flatten(1).all(1)
    mirrored = (flip_only == plain.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 64
    other_epoch = next(iter(make_loader(synth.train, batch_size=64, shuffle=False, seed=2, epoch=1, augment=True)))[0]
    first_epoch = next(iter(make_loader(synth.train, batch_size=64, shuffle=False, seed=2, epoch=0, augment=True)))[0]
    assert not torch.equal(other_epoch, first_epoch)


def test_channels_last_output(synth: DatasetSplits) -> None:
    x, _ = next(iter(make_loader(synth.train, batch_size=8, shuffle=False, seed=0, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 30, "world_size": 4}, "divisible"),
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1}, "rank"),
        ({"start_batch": 12}, "start_batch"),
        ({"epoch": -1}, "epoch"),
        ({"crop_pad_px": 16, "augment": True}, "crop_pad_px"),
    ],
)
def test_bad_loader_arguments_are_rejected(synth: DatasetSplits, kwargs: dict, match: str) -> None:
    args = {"batch_size": 32, "shuffle": True, "seed": 0, **kwargs}
    with pytest.raises(NasUserError, match=match):
        make_loader(synth.train, **args)


def test_start_batch_boundary_is_accepted(synth: DatasetSplits) -> None:
    assert len(make_loader(synth.train, batch_size=32, shuffle=True, seed=0, start_batch=11)) == 0


# ----------------------------------------------------------------------------- calibration


def test_calibration_batches_are_fixed(synth: DatasetSplits) -> None:
    a = calibration_batches(synth.train, batch_size=50, num_batches=4, seed=1)
    b = calibration_batches(synth.train, batch_size=50, num_batches=4, seed=1)
    c = calibration_batches(synth.train, batch_size=50, num_batches=4, seed=2)
    assert len(a) == 4 and all(x.shape == (50, 3, 16, 16) and x.dtype == torch.float32 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    assert len(_rows(torch.cat(a))) == 200  # sampled without replacement
    with pytest.raises(NasUserError, match="num_batches` to at most 3"):
        calibration_batches(synth.train, batch_size=100, num_batches=4, seed=0)
    with pytest.raises(NasUserError, match="batch_size` of at most 360"):
        calibration_batches(synth.train, batch_size=400, num_batches=1, seed=0)


# ----------------------------------------------------------------------------- image folders


COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


def _write_images(folder: Path, classes: dict[str, int], *, size: tuple[int, int] = (20, 12)) -> None:
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            img[:, :] = COLOURS[name]
            img[:, :2] = 7  # dark stripes on the left and right edges, removed by the center crop
            img[:, -2:] = 7
            img[0, 0] = i  # makes every image distinct
            ext = (".png", ".bmp", ".PNG")[i % 3]
            Image.fromarray(img).save(folder / name / f"{i}{ext}")


def test_flat_image_folder(tmp_path: Path) -> None:
    _write_images(tmp_path, {"cat": 10, "dog": 10, "emu": 10})
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    data = load_dataset(f"imagefolder:{tmp_path}", resolution=8, seed=0, val_size=3, test_size=6)
    assert data.class_names == ("cat", "dog", "emu") and data.num_classes == 3 and data.in_chans == 3
    assert (len(data.train), len(data.val), len(data.test)) == (21, 3, 6)
    assert data.train.images.shape[1:] == (3, 8, 8) and data.train.images.dtype == torch.uint8
    for split in (data.train, data.val, data.test):
        for img, label in zip(split.images, split.labels):
            expected = torch.tensor(COLOURS[data.class_names[int(label)]], dtype=torch.uint8)
            # resize of 20x12 to 13x8, then center crop 8x8: the edge stripes are gone
            assert torch.equal(img[:, 4, 4], expected) and torch.equal(img[:, 4, 0], expected)
    again = load_dataset("imagefolder:" + tmp_path.name, root=str(tmp_path.parent), resolution=8, seed=0,
                         val_size=3, test_size=6)
    assert torch.equal(again.test.images, data.test.images)


def test_train_val_image_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"cat": 6, "dog": 6})
    _write_images(tmp_path / "val", {"cat": 2, "dog": 3})
    data = load_dataset(f"imagefolder:{tmp_path}", resolution=10, seed=0, val_size=2)
    assert (len(data.train), len(data.val), len(data.test)) == (10, 2, 5)
    assert data.test.labels.tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(NasUserError, match="test_size"):
        load_dataset(f"imagefolder:{tmp_path}", resolution=10, test_size=0.2)


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("loose", "no class sub-folders"),
        ("single", "only one class"),
        ("no_images", "no images"),
        ("empty_class", "without images"),
        ("train_only", "no val/ or test/"),
        ("val_and_test", "both val/ and test/"),
        ("unknown_val_class", "missing from train/"),
        ("corrupt", "cannot decode"),
    ],
)
def test_image_folder_errors_name_the_path(tmp_path: Path, layout: str, match: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "loose":
        Image.new("RGB", (8, 8)).save(root / "a.png")
    elif layout == "single":
        _write_images(root, {"cat": 3})
    elif layout == "no_images":
        (root / "cat").mkdir()
        (root / "dog").mkdir()
        (root / "dog" / "readme.txt").write_text("no images here")
    elif layout == "empty_class":
        _write_images(root, {"cat": 3, "dog": 3})
        (root / "emu").mkdir()
    elif layout == "train_only":
        _write_images(root / "train", {"cat": 3, "dog": 3})
    elif layout == "val_and_test":
        for sub in ("train", "val", "test"):
            _write_images(root / sub, {"cat": 3, "dog": 3})
    elif layout == "unknown_val_class":
        _write_images(root / "train", {"cat": 3, "dog": 3})
        _write_images(root / "val", {"emu": 2})
    elif layout == "corrupt":
        _write_images(root, {"cat": 3, "dog": 3})
        (root / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(NasUserError, match=match) as info:
        load_dataset(f"imagefolder:{root}", resolution=8)
    assert str(root) in str(info.value)


# ----------------------------------------------------------------------------- fashion-mnist


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(NasUserError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", resolution=32, root=str(tmp_path / "nowhere"))


def test_truncated_idx_file_is_reported(tmp_path: Path) -> None:
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes(5))
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / stem).write_bytes(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + bytes(8 + 10))
    with pytest.raises(NasUserError, match="truncated or corrupt"):
        load_dataset("fashion-mnist", resolution=28, root=str(tmp_path))


def _write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None) -> None:
    import gzip

    header = (magic or bytes([0, 0, 8, array.ndim])) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _write_fake_fashion_mnist(folder: Path, *, label_magic: bytes | None = None) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, magic=label_magic)


@pytest.mark.parametrize("resolution", [16, 28, 32, 40])
def test_idx_files_are_parsed_and_fitted(tmp_path: Path, resolution: int) -> None:
    _write_fake_fashion_mnist(tmp_path)
    data = load_dataset("fashion-mnist", resolution=resolution, root=str(tmp_path), val_size=4)
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 10)
    assert data.train.images.shape[1:] == (1, resolution, resolution)
    assert data.test.labels.tolist() == list(range(10))
    border = data.test.images[..., 0, :]
    assert (int(border.max()) == 0) == (resolution == 32)  # only 32 is padded (with background 0)


def test_bad_idx_magic_is_reported(tmp_path: Path) -> None:
    _write_fake_fashion_mnist(tmp_path, label_magic=bytes([0, 0, 9, 1]))
    with pytest.raises(NasUserError, match="bad magic number"):
        load_dataset("fashion-mnist", resolution=28, root=str(tmp_path))


def test_real_fashion_mnist() -> None:
    """The real dataset, which ``make test`` installs first (``make dataset``); missing, it fails, never skips."""
    assert Path(FASHION_MNIST_DIR).is_dir(), (f"{FASHION_MNIST_DIR} is missing: run `make dataset` (or `sudo apt-get "
                                              f"install -y dataset-fashion-mnist`), as `make test` does")
    data = load_dataset("fashion-mnist", resolution=32, seed=0)
    assert len(data.train) + len(data.val) == 60_000 and len(data.val) == 5000
    assert len(data.test) == 10_000
    assert data.num_classes == 10 and data.in_chans == 1 and data.class_names[9] == "Ankle boot"
    assert data.train.images.shape[1:] == (1, 32, 32) and data.train.images.dtype == torch.uint8
    for split in (data.train, data.val, data.test):
        assert int(split.labels.min()) == 0 and int(split.labels.max()) == 9
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    border = torch.cat([data.test.images[..., :2, :].flatten(), data.test.images[..., :, -2:].flatten()])
    assert int(border.max()) == 0  # the 2-pixel padding is background
    assert 0.2 < data.mean[0] < 0.3 and 0.3 < data.std[0] < 0.4


def test_order_is_the_same_in_another_process(synth: DatasetSplits) -> None:
    import subprocess
    import sys

    code = (
        "from supernet.data import load_dataset, make_loader;"
        "d = load_dataset('synthetic:400', resolution=16, seed=3);"
        "l = make_loader(d.train, batch_size=32, shuffle=True, seed=7, epoch=2, augment=True);"
        "print(l.global_order().tolist()); x, _ = next(iter(l)); print(float(x.double().sum()))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    order_line, sum_line = out.stdout.strip().splitlines()
    loader = make_loader(synth.train, batch_size=32, shuffle=True, seed=7, epoch=2, augment=True)
    assert order_line == str(loader.global_order().tolist())
    assert float(sum_line) == float(next(iter(loader))[0].double().sum())
