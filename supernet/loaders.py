"""The deterministic, resumable, rank-sharded batch loader of an in-memory split (see :mod:`supernet.data`).

:func:`make_loader` yields ``(images, labels)`` batches whose order depends only on
``(seed, epoch)``; :func:`calibration_batches` draws the fixed batches BN is recalibrated on.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from search_spaces.errors import NasUserError

from ._rng import _STREAM_AUGMENT, _STREAM_CALIB, _STREAM_ORDER, _check_int, _generator

if TYPE_CHECKING:
    from .data import ImageSplit

__all__ = ["BatchLoader", "make_loader", "calibration_batches"]


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
        from .data import ImageSplit  # noqa: F811 - the runtime class (supernet.data imports this module)

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
