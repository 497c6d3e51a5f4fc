"""In-memory image datasets and a deterministic, resumable, shardable batch loader.

Three kinds of data, chosen by a spec string (:func:`load_dataset`):

* ``"fashion-mnist"``: the idx files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/``), 60,000 training and 10,000 test images.
* ``"imagefolder:PATH"``: ``PATH/train/<class>/*`` plus ``PATH/val/<class>/*`` (or
  ``PATH/test/<class>/*``), or a flat ``PATH/<class>/*`` tree.
* ``"synthetic"`` / ``"synthetic:N"``: seeded, learnable images for tests.

Images stay in memory as ``uint8`` tensors ``(N, C, H, W)`` and are normalised per batch by
the loader, so Fashion-MNIST at 32x32 takes about 72 MB. The validation split is a fixed,
seeded carve-out of the training set; the test split is the dataset's own held-out set and
must never be used for model selection.

:func:`make_loader` yields ``(images, labels)`` batches whose order depends only on
``(seed, epoch)``. Every rank of a distributed job builds the same global order and keeps its
own slice ``rank::world_size`` of each global batch; ``start_batch=k`` resumes an interrupted
epoch at exactly batch ``k``. Augmentation (random crop with reflect padding and horizontal
flip) draws its randomness from ``(seed, epoch, batch index)`` and is therefore reproducible
and resumable too. Nothing here touches the global ``torch`` or ``numpy`` RNG.
"""
from __future__ import annotations

import gzip
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from search_spaces.errors import NasUserError

__all__ = [
    "FASHION_MNIST_DIR",
    "ImageSplit",
    "DatasetSplits",
    "BatchLoader",
    "load_dataset",
    "make_loader",
    "calibration_batches",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNTHETIC_DEFAULT_SIZE = 2048
SYNTHETIC_NUM_CLASSES = 10
MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024
ACCEPTED_SPECS = "'fashion-mnist', 'imagefolder:PATH', 'synthetic' or 'synthetic:N'"

# Independent random streams, all derived from the user's seed (see _generator).
_STREAM_VAL, _STREAM_TEST, _STREAM_SUBSET, _STREAM_SYNTH = 1, 2, 3, 4
_STREAM_ORDER, _STREAM_AUGMENT, _STREAM_CALIB = 5, 6, 7


# ----------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split of a dataset, held in memory (a ``TensorDataset``-like object).

    Attributes:
        images: ``(N, C, H, W)`` tensor, ``uint8`` in [0, 255] or ``float32`` in [0, 1].
        labels: ``(N,)`` ``int64`` class indices.
        mean: per-channel mean on the [0, 1] scale, computed on the training split.
        std: per-channel standard deviation on the [0, 1] scale.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype not in (torch.uint8, torch.float32):
            raise NasUserError(
                f"`images` must be a uint8 or float32 tensor of shape (N, C, H, W), "
                f"got {self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise NasUserError(
                f"`labels` must be an int64 tensor of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        chans = self.images.shape[1]
        if len(self.mean) != chans or len(self.std) != chans:
            raise NasUserError(
                f"`mean` and `std` need {chans} values (one per channel), got {self.mean} and {self.std}"
            )
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise NasUserError(f"`std` values must be finite and above 0, got {self.std}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the raw (unnormalised) image ``(C, H, W)`` and its label."""
        return self.images[index], self.labels[index]

    @property
    def in_chans(self) -> int:
        """Number of image channels C."""
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        """Image height in pixels (images are square)."""
        return int(self.images.shape[2])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Turn a raw batch ``(B, C, H, W)`` of this split into normalised ``float32``.

        ``uint8`` input is divided by 255 first; ``float32`` input is taken as already in [0, 1].
        """
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        x = images.float()
        if images.dtype == torch.uint8:
            x = x.div_(255.0)
        return x.sub_(mean).div_(std)


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """The three splits of a dataset and what a model needs to know about it.

    Attributes:
        train: images to train on (after the validation carve-out and ``train_subset``).
        val: fixed, seeded carve-out of the original training set, for model selection.
        test: the dataset's own held-out set; report it, never select on it.
        num_classes: number of classes K (labels are in ``[0, K)``).
        in_chans: image channels C.
        mean: per-channel mean on the [0, 1] scale (from the training images).
        std: per-channel standard deviation on the [0, 1] scale.
        name: the normalised spec, e.g. ``"fashion-mnist"`` or ``"synthetic:2048"``.
        class_names: one name per class index.
        resolution: image side length in pixels.
    """

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    num_classes: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    class_names: tuple[str, ...]
    resolution: int

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise NasUserError(f"`class_names` has {len(self.class_names)} names for {self.num_classes} classes")
        for split_name in ("train", "val", "test"):
            split: ImageSplit = getattr(self, split_name)
            if split.in_chans != self.in_chans or split.resolution != self.resolution:
                raise NasUserError(
                    f"{split_name} images are {split.in_chans}x{split.resolution}, "
                    f"expected {self.in_chans}x{self.resolution}"
                )

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary (name, sizes, shape, normalisation) for run metadata."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "resolution": self.resolution,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
        }


# ----------------------------------------------------------------------------- helpers


def _generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the independent stream ``(seed, *stream)``."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=stream).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise NasUserError(f"`{name}` must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"within [{low}, {high}]"
        raise NasUserError(f"`{name}` must be {allowed}, got {value}")
    return int(value)


def _count_from(name: str, value: int | float, total: int) -> int:
    """Resolve a count-or-fraction argument against ``total`` items (result in [1, total-1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise NasUserError(f"`{name}` must be an image count or a fraction in (0, 1), got {value!r}")
    if isinstance(value, (float, np.floating)):
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise NasUserError(f"`{name}` as a fraction must be within (0, 1), got {value}")
        count = int(round(value * total))
    else:
        count = int(value)
    if not 1 <= count <= total - 1:
        raise NasUserError(
            f"`{name}`={value!r} gives {count} images out of {total}; it must leave at least one image "
            f"on each side (use a count in [1, {total - 1}] or a smaller fraction)"
        )
    return count


def _carve(n: int, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into a seeded random subset of ``count`` and the rest, both sorted."""
    perm = torch.randperm(n, generator=gen)
    return perm[:count].sort().values, perm[count:].sort().values


def _channel_stats(images: torch.Tensor, *, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``images`` on the [0, 1] scale (exact, via a histogram for uint8)."""
    chans = images.shape[1]
    if images.dtype == torch.uint8:
        hist = torch.zeros(chans, 256, dtype=torch.float64)
        for c in range(chans):
            hist[c] = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        levels = torch.arange(256, dtype=torch.float64) / 255.0
        count = hist.sum(dim=1)
        mean = (hist * levels).sum(dim=1) / count
        var = (hist * levels**2).sum(dim=1) / count - mean**2
    else:
        total = torch.zeros(chans, dtype=torch.float64)
        total_sq = torch.zeros(chans, dtype=torch.float64)
        for start in range(0, images.shape[0], chunk):
            x = images[start : start + chunk].to(torch.float64)
            total += x.sum(dim=(0, 2, 3))
            total_sq += (x * x).sum(dim=(0, 2, 3))
        count_px = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / count_px
        var = total_sq / count_px - mean**2
    std = var.clamp_min(0.0).sqrt()
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)


def _finish(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    class_names: tuple[str, ...],
    seed: int,
    val_size: int | float,
    train_subset: int | None,
) -> DatasetSplits:
    """Carve the validation split, apply ``train_subset``, compute normalisation, build splits."""
    n_val = _count_from("val_size", val_size, train_x.shape[0])
    val_idx, rest_idx = _carve(train_x.shape[0], n_val, _generator(seed, _STREAM_VAL))
    rest_x, rest_y = train_x[rest_idx], train_y[rest_idx]
    mean, std = _channel_stats(rest_x)  # on all training images, so `train_subset` does not change it
    if train_subset is not None:
        train_subset = _check_int("train_subset", train_subset, low=1)
        if train_subset > rest_idx.numel():
            raise NasUserError(
                f"`train_subset`={train_subset} exceeds the {rest_idx.numel()} training images left after "
                f"the validation carve-out; pass at most {rest_idx.numel()} or leave it unset"
            )
        keep, _ = _carve(rest_idx.numel(), train_subset, _generator(seed, _STREAM_SUBSET))
        rest_x, rest_y = rest_x[keep], rest_y[keep]

    def split(x: torch.Tensor, y: torch.Tensor) -> ImageSplit:
        return ImageSplit(images=x.contiguous(), labels=y.to(torch.int64).contiguous(), mean=mean, std=std)

    return DatasetSplits(
        train=split(rest_x, rest_y),
        val=split(train_x[val_idx], train_y[val_idx]),
        test=split(test_x, test_y),
        num_classes=len(class_names),
        in_chans=int(train_x.shape[1]),
        mean=mean,
        std=std,
        name=name,
        class_names=class_names,
        resolution=int(train_x.shape[2]),
    )


# ----------------------------------------------------------------------------- fashion-mnist


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Parse an idx file (optionally gzip-compressed) of unsigned bytes into a numpy array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise NasUserError(f"cannot read Fashion-MNIST file {str(path)!r} ({exc}); reinstall it with "
                           f"`sudo apt-get install --reinstall -y dataset-fashion-mnist`") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise NasUserError(
            f"{str(path)!r} is not an idx file of {ndim}-D unsigned bytes (bad magic number "
            f"{raw[:4].hex() if len(raw) >= 4 else 'missing'}, expected 000008{ndim:02x})"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise NasUserError(
            f"{str(path)!r} holds {len(raw) - header} data bytes, but its header promises {dims} = "
            f"{int(np.prod(dims))}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise NasUserError(
        f"Fashion-MNIST file {stem}[.gz] is missing from {str(folder)!r}; reinstall it with "
        f"`sudo apt-get install --reinstall -y dataset-fashion-mnist`"
    )


def _fit_fashion_mnist(images: torch.Tensor, resolution: int, *, chunk: int = 2048) -> torch.Tensor:
    """Bring 28x28 images to ``resolution``: pad at 32, bilinear resize otherwise (uint8 out)."""
    if resolution == 28:
        return images
    if resolution == 32:
        # Pad 2 raw pixels of value 0 on each side: 0 is the Fashion-MNIST background, so the
        # padding looks like more background (it normalises to -mean/std, as the background does).
        return F.pad(images, (2, 2, 2, 2), value=0)
    out = torch.empty(images.shape[0], images.shape[1], resolution, resolution, dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float()
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=resolution < 28)
        out[start : start + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _load_fashion_mnist(folder: Path, resolution: int) -> tuple[torch.Tensor, ...]:
    if not folder.is_dir():
        raise NasUserError(
            f"Fashion-MNIST not found at {str(folder)!r}; install it with "
            f"`sudo apt-get install -y dataset-fashion-mnist` (or run `make demo`, which installs it)"
        )
    arrays = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = _read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
            raise NasUserError(
                f"Fashion-MNIST {prefix} files in {str(folder)!r} disagree: images {images.shape}, "
                f"labels {labels.shape}; expected (N, 28, 28) and (N,)"
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise NasUserError(
                f"Fashion-MNIST {prefix} labels in {str(folder)!r} go up to {int(labels.max())}, expected 0-9"
            )
        x = torch.from_numpy(images.copy()).unsqueeze(1)
        arrays += [_fit_fashion_mnist(x, resolution), torch.from_numpy(labels.astype(np.int64))]
    return tuple(arrays)


# ----------------------------------------------------------------------------- image folders


def _load_image(path: Path, resolution: int) -> np.ndarray:
    """Decode one image as RGB, resize its shorter side to ``resolution``, center-crop a square."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale >= target
            img = img.convert("RGBA" if img.mode == "P" else img.mode).convert("RGB")
            width, height = img.size
            scale = resolution / min(width, height)
            new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
            return np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise NasUserError(f"cannot decode image {str(path)!r}: {exc}; remove or replace the file") from None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_classes(folder: Path, *, expected: str) -> dict[str, list[Path]]:
    """Map class name -> image files for ``folder/<class>/*``, with errors that say what is expected."""
    if not folder.is_dir():
        raise NasUserError(f"image folder {str(folder)!r} does not exist or is not a folder; expected {expected}")
    classes = _class_dirs(folder)
    if not classes:
        loose = _image_files(folder)
        what = f"holds {len(loose)} images but no class sub-folders" if loose else "is empty"
        raise NasUserError(f"image folder {str(folder)!r} {what}; expected {expected}")
    loose = [p.name for p in _image_files(folder)]
    if loose:
        logger.warning("ignoring %d images outside class folders in %r (e.g. %s)", len(loose), str(folder), loose[0])
    found = {c.name: _image_files(c) for c in classes}
    if sum(len(v) for v in found.values()) == 0:
        raise NasUserError(
            f"image folder {str(folder)!r} has class folders but no images with extension "
            f"{', '.join(IMAGE_EXTENSIONS)}; expected {expected}"
        )
    return found


def _decode_all(files: list[tuple[Path, int]], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.empty((len(files), resolution, resolution, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        images[i] = _load_image(path, resolution)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def _load_image_folder(
    root: Path, resolution: int, *, seed: int, test_size: int | float | None
) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...]]:
    expected = "one sub-folder per class holding .jpg/.jpeg/.png/.bmp/.webp images"
    layout = "PATH/train/<class>/*.png with PATH/val/<class>/*.png, or PATH/<class>/*.png"
    if not root.exists():
        raise NasUserError(f"image folder {str(root)!r} does not exist; expected {layout}")
    held_out = [root / name for name in ("val", "test") if (root / name).is_dir()]
    if (root / "train").is_dir():
        if not held_out:
            raise NasUserError(f"image folder {str(root)!r} has train/ but no val/ or test/ beside it; "
                               f"add one, or put the class folders directly in {str(root)!r}")
        if len(held_out) == 2:
            raise NasUserError(f"image folder {str(root)!r} has both val/ and test/; keep one held-out folder "
                               f"(it becomes the test split; validation is carved from train/)")
        if test_size is not None:
            raise NasUserError(f"`test_size` applies only to flat image folders; {str(root)!r} has its own "
                               f"{held_out[0].name}/ folder, which is the test split")
        train_found = _scan_classes(root / "train", expected=expected)
        test_found = _scan_classes(held_out[0], expected=expected)
        unknown = sorted(set(test_found) - set(train_found))
        if unknown:
            raise NasUserError(f"{str(held_out[0])!r} has classes missing from train/: {unknown}")
    else:
        train_found = _scan_classes(root, expected=f"{expected}, or train/ and val/ folders")
        test_found = None
    class_names = tuple(sorted(train_found))
    if len(class_names) < 2:
        raise NasUserError(f"image folder {str(root)!r} has only one class ({class_names[0]!r}); "
                           f"classification needs at least two class sub-folders")
    empty = [c for c in class_names if not train_found[c]]
    if empty:
        raise NasUserError(f"class folders without images in {str(root)!r}: {empty}; add images or remove them")
    label_of = {c: i for i, c in enumerate(class_names)}
    train_files = [(p, label_of[c]) for c in class_names for p in train_found[c]]
    train_x, train_y = _decode_all(train_files, resolution)
    if test_found is not None:
        test_x, test_y = _decode_all([(p, label_of[c]) for c in sorted(test_found) for p in test_found[c]], resolution)
    else:
        n_test = _count_from("test_size", 0.1 if test_size is None else test_size, len(train_files))
        test_idx, rest_idx = _carve(len(train_files), n_test, _generator(seed, _STREAM_TEST))
        test_x, test_y = train_x[test_idx], train_y[test_idx]
        train_x, train_y = train_x[rest_idx], train_y[rest_idx]
    return (train_x, train_y, test_x, test_y), class_names


# ----------------------------------------------------------------------------- synthetic


def _make_synthetic(n_train: int, resolution: int, *, seed: int) -> tuple[torch.Tensor, ...]:
    """Learnable images: a smooth random template per class plus brightness and pixel noise."""
    gen = _generator(seed, _STREAM_SYNTH)
    coarse = torch.randn(SYNTHETIC_NUM_CLASSES, 3, 6, 6, generator=gen)
    templates = F.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    out = []
    for n in (n_train, max(n_train // 5, SYNTHETIC_NUM_CLASSES)):
        labels = torch.randint(0, SYNTHETIC_NUM_CLASSES, (n,), generator=gen)
        x = templates[labels] + 0.8 * torch.randn(n, 3, resolution, resolution, generator=gen)
        x = x + 0.3 * torch.randn(n, 1, 1, 1, generator=gen)
        out += [(128.0 + 32.0 * x).round_().clamp_(0, 255).to(torch.uint8), labels]
    return tuple(out)


# ----------------------------------------------------------------------------- public loading


def load_dataset(
    spec: str,
    *,
    resolution: int,
    seed: int = 0,
    val_size: int | float | None = None,
    train_subset: int | None = None,
    test_size: int | float | None = None,
    root: str | os.PathLike[str] | None = None,
) -> DatasetSplits:
    """Load a dataset into memory and split it into train, validation and test.

    Args:
        spec: ``"fashion-mnist"``, ``"imagefolder:PATH"``, ``"synthetic"`` (2048 images) or
            ``"synthetic:N"`` (N training images before the validation carve-out, plus an
            independent test set of ``max(N // 5, 10)`` images; 10 classes, 3 channels).
        resolution: side length in pixels of the square images, within [8, 1024].
            Fashion-MNIST (28x28, 1 channel) is padded by 2 background pixels at 32 and resized
            bilinearly otherwise; folder images are resized (shorter side) and center-cropped.
        seed: seed of every random choice (validation carve-out, subset, synthetic data).
        val_size: validation images carved from the training set, as a count or a fraction in
            (0, 1). Default: 5000 for Fashion-MNIST, 0.1 otherwise.
        train_subset: keep only this many (seeded random) training images after the carve-out.
        test_size: for a flat ``imagefolder`` tree only, images held out as the test split
            (count or fraction, default 0.1). Other datasets have their own test set.
        root: folder holding the Fashion-MNIST idx files (default ``/usr/share/datasets/fashion-mnist``);
            for ``imagefolder`` a relative PATH is taken relative to it.

    Returns:
        The splits; images are ``uint8`` ``(N, C, resolution, resolution)``, labels ``int64``.

    Raises:
        NasUserError: unknown spec, bad argument, or missing, empty or malformed data.

    Example:
        >>> data = load_dataset("synthetic:200", resolution=16, seed=0)
        >>> len(data.train), len(data.val), len(data.test), data.num_classes
        (180, 20, 40, 10)
    """
    if not isinstance(spec, str):
        raise NasUserError(f"dataset `spec` must be a string, one of {ACCEPTED_SPECS}; got {spec!r}")
    resolution = _check_int("resolution", resolution, low=MIN_RESOLUTION, high=MAX_RESOLUTION)
    seed = _check_int("seed", seed, low=0)
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    started = time.perf_counter()
    if kind in ("fashion-mnist", "fashion_mnist", "fashionmnist") and not arg:
        if test_size is not None:
            raise NasUserError("`test_size` applies only to flat image folders; Fashion-MNIST has its own test set")
        arrays = _load_fashion_mnist(Path(root) if root is not None else Path(FASHION_MNIST_DIR), resolution)
        name, class_names, default_val = "fashion-mnist", FASHION_MNIST_CLASSES, 5000
    elif kind == "imagefolder" and arg.strip():
        path = Path(arg.strip()).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        arrays, class_names = _load_image_folder(path, resolution, seed=seed, test_size=test_size)
        name, default_val = f"imagefolder:{path}", 0.1
    elif kind == "synthetic":
        if root is not None or test_size is not None:
            raise NasUserError("`root` and `test_size` do not apply to synthetic data; leave them unset")
        try:
            n = int(arg) if arg.strip() else SYNTHETIC_DEFAULT_SIZE
        except ValueError:
            raise NasUserError(f"synthetic size must be an integer, as in 'synthetic:2048'; got {spec!r}") from None
        _check_int("synthetic image count N", n, low=20)
        arrays = _make_synthetic(n, resolution, seed=seed)
        name, class_names, default_val = f"synthetic:{n}", tuple(f"class{i}" for i in range(10)), 0.1
    else:
        raise NasUserError(f"unknown dataset spec {spec!r}; expected {ACCEPTED_SPECS}")
    data = _finish(name, *arrays, class_names=class_names, seed=seed,
                   val_size=default_val if val_size is None else val_size, train_subset=train_subset)
    logger.info(
        "%s: %d train / %d val / %d test images, %dx%dx%d, %d classes, loaded in %.2f s",
        name, len(data.train), len(data.val), len(data.test), data.in_chans, resolution, resolution,
        data.num_classes, time.perf_counter() - started,
    )
    return data


# ----------------------------------------------------------------------------- batches


class BatchLoader:
    """Deterministic, resumable, rank-sharded batches of one split (see :func:`make_loader`)."""

    def __init__(
        self,
        split: ImageSplit,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int = 0,
        augment: bool = False,
        crop_pad_px: int = 4,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        start_batch: int = 0,
        channels_last: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(split, ImageSplit):
            raise NasUserError(
                f"`split` must be an ImageSplit (e.g. `load_dataset(...).train`), got {type(split).__name__}"
            )
        self.split = split
        self.batch_size = _check_int("batch_size", batch_size, low=1)
        self.world_size = _check_int("world_size", world_size, low=1)
        self.rank = _check_int("rank", rank, low=0, high=self.world_size - 1)
        if self.batch_size % self.world_size:
            raise NasUserError(
                f"`batch_size`={batch_size} is the global batch and must be divisible by `world_size`="
                f"{world_size}; use a multiple such as {self.world_size * max(1, batch_size // self.world_size)}"
            )
        self.seed = _check_int("seed", seed, low=0)
        self.epoch = _check_int("epoch", epoch, low=0)
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.crop_pad_px = _check_int("crop_pad_px", crop_pad_px, low=0, high=max(0, split.resolution - 1))
        self.drop_last = self.shuffle if drop_last is None else bool(drop_last)
        n = len(split)
        self.batches_per_epoch = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        self.start_batch = _check_int("start_batch", start_batch, low=0, high=self.batches_per_epoch)
        self.channels_last = bool(channels_last)
        self.device = torch.device(device)

    def __len__(self) -> int:
        """Batches this loader yields: ``batches_per_epoch - start_batch``."""
        return self.batches_per_epoch - self.start_batch

    def global_order(self) -> torch.Tensor:
        """The epoch's global sample order ``(N,)``, a function of ``(seed, epoch)`` only."""
        if not self.shuffle:
            return torch.arange(len(self.split))
        return torch.randperm(len(self.split), generator=_generator(self.seed, _STREAM_ORDER, self.epoch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.global_order()
        for b in range(self.start_batch, self.batches_per_epoch):
            global_idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            idx = global_idx[self.rank :: self.world_size]
            images = self.split.images.index_select(0, idx).to(self.device, non_blocking=True)
            labels = self.split.labels.index_select(0, idx).to(self.device, non_blocking=True)
            x = self.split.normalize(images)
            if self.augment:
                x = self._augment(x, batch_index=b, global_size=global_idx.numel())
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels

    def _augment(self, x: torch.Tensor, *, batch_index: int, global_size: int) -> torch.Tensor:
        """Random crop (reflect padding) and horizontal flip, drawn for the whole global batch.

        Parameters are drawn for all ``global_size`` samples and this rank keeps its slice, so a
        sample's augmentation does not depend on ``world_size``.
        """
        gen = _generator(self.seed, _STREAM_AUGMENT, self.epoch, batch_index)
        pad = self.crop_pad_px
        offsets = torch.randint(0, 2 * pad + 1, (global_size, 2), generator=gen)[self.rank :: self.world_size]
        flips = (torch.rand(global_size, generator=gen) < 0.5)[self.rank :: self.world_size]
        if x.shape[0] == 0:
            return x
        if pad:
            bsz, chans, height, width = x.shape
            offsets = offsets.to(x.device)
            padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
            rows = offsets[:, 0:1] + torch.arange(height, device=x.device)  # (B, H)
            cols = offsets[:, 1:2] + torch.arange(width, device=x.device)  # (B, W)
            rows = rows.view(bsz, 1, height, 1).expand(bsz, chans, height, width + 2 * pad)
            x = padded.gather(2, rows)
            x = x.gather(3, cols.view(bsz, 1, 1, width).expand(bsz, chans, height, width))
        return torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def make_loader(
    split: ImageSplit,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    augment: bool = False,
    crop_pad_px: int = 4,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool | None = None,
    start_batch: int = 0,
    channels_last: bool = False,
    device: str | torch.device = "cpu",
) -> BatchLoader:
    """Batches of normalised images whose order depends only on ``(seed, epoch)``.

    Every rank computes the same global order (a ``torch.randperm`` from a generator seeded with
    ``(seed, epoch)``) and keeps ``global_batch[rank::world_size]``, so the ranks' shards are
    disjoint and together form the global batch. With ``drop_last=False`` the final partial batch
    is still yielded on every rank (possibly empty on some), so all ranks see the same number of
    batches and an evaluation covers every image exactly once. Build a new loader per epoch.

    Args:
        split: the split to iterate, e.g. ``data.train``.
        batch_size: global batch size B (all ranks together); must be divisible by ``world_size``.
        shuffle: draw a fresh order per ``(seed, epoch)``; ``False`` keeps dataset order.
        seed: seed of the order and of the augmentation.
        epoch: epoch number, mixed into the seed.
        augment: random crop with ``crop_pad_px`` reflect padding plus horizontal flip; its
            randomness comes from ``(seed, epoch, batch index)``, so it is resumable.
        crop_pad_px: padding of the random crop in pixels (2-4 is usual; 0 disables cropping).
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes sharing each global batch.
        drop_last: drop the final incomplete batch; default ``True`` when shuffling, else ``False``.
        start_batch: resume mid-epoch: yield batches ``start_batch, start_batch + 1, ...`` of the
            uninterrupted order.
        channels_last: return images in ``torch.channels_last`` memory format.
        device: device the batches are moved to (augmentation runs there).

    Returns:
        An iterable with ``len()`` (batches still to come) yielding ``(images, labels)``:
        ``float32`` ``(B / world_size, C, H, W)`` normalised with the split's mean and std, and
        ``int64`` ``(B / world_size,)``.

    Raises:
        NasUserError: an argument is out of range.

    Example:
        >>> data = load_dataset("synthetic:200", resolution=16, seed=0)
        >>> loader = make_loader(data.train, batch_size=32, shuffle=True, seed=0, augment=True)
        >>> len(loader), next(iter(loader))[0].shape
        (5, torch.Size([32, 3, 16, 16]))
    """
    return BatchLoader(
        split, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch, augment=augment,
        crop_pad_px=crop_pad_px, rank=rank, world_size=world_size, drop_last=drop_last,
        start_batch=start_batch, channels_last=channels_last, device=device,
    )


def calibration_batches(
    split: ImageSplit,
    *,
    batch_size: int,
    num_batches: int,
    seed: int,
    channels_last: bool = False,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """A fixed list of normalised, unaugmented image batches for BN recalibration.

    The ``batch_size * num_batches`` images are a seeded random sample without replacement, so
    every subnet is recalibrated on exactly the same images.

    Args:
        split: where to draw from (usually ``data.train``).
        batch_size: images per batch.
        num_batches: number of batches.
        seed: seed of the sample.
        channels_last: return images in ``torch.channels_last`` memory format.
        device: device of the returned tensors.

    Returns:
        ``num_batches`` ``float32`` tensors of shape ``(batch_size, C, H, W)``.

    Raises:
        NasUserError: an argument is out of range, or the split holds fewer images than needed.

    Example:
        >>> data = load_dataset("synthetic:200", resolution=16, seed=0)
        >>> [b.shape[0] for b in calibration_batches(data.train, batch_size=50, num_batches=3, seed=0)]
        [50, 50, 50]
    """
    batch_size = _check_int("batch_size", batch_size, low=1)
    num_batches = _check_int("num_batches", num_batches, low=1)
    seed = _check_int("seed", seed, low=0)
    needed = batch_size * num_batches
    if needed > len(split):
        fix = (f"lower `num_batches` to at most {len(split) // batch_size}" if len(split) >= batch_size
               else f"use a `batch_size` of at most {len(split)}")
        raise NasUserError(
            f"calibration needs `batch_size` x `num_batches` = {needed} images but the split holds {len(split)}; {fix}"
        )
    idx = torch.randperm(len(split), generator=_generator(seed, _STREAM_CALIB))[:needed]
    batches = []
    for chunk in idx.split(batch_size):
        x = split.normalize(split.images.index_select(0, chunk).to(torch.device(device)))
        batches.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return batches
