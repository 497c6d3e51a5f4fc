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

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from search_spaces.errors import NasUserError

from ._readers import (
    FASHION_MNIST_CLASSES,
    _load_fashion_mnist,
    _load_image_folder,
    _make_synthetic,
)
from ._rng import _STREAM_SUBSET, _STREAM_VAL, _carve, _check_int, _count_from, _generator
from .loaders import BatchLoader, calibration_batches, make_loader

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
SYNTHETIC_DEFAULT_SIZE = 2048
MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024
ACCEPTED_SPECS = "'fashion-mnist', 'imagefolder:PATH', 'synthetic' or 'synthetic:N'"

# Independent random streams, all derived from the user's seed (see _generator).


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
