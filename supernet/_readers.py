"""Readers of the datasets :func:`supernet.data.load_dataset` knows: Fashion-MNIST's idx files,
image folders, and seeded synthetic images. Each returns uint8 ``(N, C, H, W)`` tensors and labels.
"""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from search_spaces.errors import NasUserError

from ._rng import _STREAM_SYNTH, _STREAM_TEST, _carve, _count_from, _generator

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNTHETIC_NUM_CLASSES = 10


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
