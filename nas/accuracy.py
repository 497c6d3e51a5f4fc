"""Proxy accuracy of candidate subnets: shared supernet weights, recalibrated BN, held-out validation split.

Results are cached by architecture hash in an append-only JSON-lines file in the search folder.
Each line is written with one ``write`` call in append mode, so concurrent workers and a killed
process never corrupt it (a torn last line is ignored when reading). A line records which images
were right (``correct``, packed bits), so the accuracy on any leading part of the validation
images can be read back; a line over fewer than all images (a successive-halving rung) carries its
image count in its ``setting``.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence, overload

import numpy as np
import torch

from search_spaces import ArchConfig
from supernet.bn import recalibrate_bn
from supernet.data import DatasetSplits, ImageSplit, calibration_batches, load_dataset, make_loader
from supernet.elastic import Supernet
from supernet.run import SupernetRun

from .prefix_eval import PrefixCachedRunner, Prepared

__all__ = ["AccuracyEvaluator", "load_run_splits"]

logger = logging.getLogger(__name__)


def load_run_splits(run: SupernetRun) -> DatasetSplits:
    """The run's dataset with exactly its training-time splits (same seed, validation size, subset)."""
    recipe = run.meta["recipe"]
    return load_dataset(recipe["dataset"], resolution=run.resolution, seed=recipe["seed"],
                        val_size=recipe.get("val_size"), train_subset=recipe.get("train_subset"))


class _ValBatches(Sequence[torch.Tensor]):
    """The validation image batches, normalised when read (never all held in memory at once)."""

    def __init__(self, split: ImageSplit, batch_size: int) -> None:
        self.split, self.batch_size = split, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, i: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        loader = make_loader(self.split, batch_size=self.batch_size, shuffle=False, seed=0, channels_last=True,
                             start_batch=i)
        return next(iter(loader))[0]


def _pack(correct: np.ndarray) -> str:
    return np.packbits(correct.astype(np.uint8)).tobytes().hex()


def _unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def _pack_losses(loss: np.ndarray) -> str:
    return base64.b64encode(loss.astype("<f4").tobytes()).decode("ascii")


def _unpack_losses(text: str, n: int) -> np.ndarray:
    """``n`` per-image losses (float32); ``ValueError`` unless there are exactly ``n``, all finite and >= 0."""
    loss = np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4").astype(np.float32)
    if len(loss) != n or not np.isfinite(loss).all() or (loss < 0).any():
        raise ValueError("malformed losses")
    return loss


class AccuracyEvaluator:
    """Validation accuracy of any architecture of a supernet, cached by architecture hash.

    Args:
        net: the trained supernet.
        splits: the run's data splits (only ``train``, for BN calibration, and ``val`` are used).
        val_images: evaluate on the first this many validation images (fixed subset).
        calib_batches: BN recalibration batches of ``calib_batch_size`` training images.
        seed: seed of the calibration subset.
        cache_path: JSON-lines cache file (``None``: in memory only). Each row records the
            evaluation setting (``identity``, images, calibration, seed); rows of another setting
            are ignored, so changing ``--val-images`` or retraining never reuses stale figures.
        batch_size: validation batch size; partial evaluations use whole batches.
        identity: what identifies the weights, e.g. the supernet's SHA-256.
        prefix_cache_bytes: with a value, :meth:`correct` reuses the block inputs of an anchor
            subnet (:meth:`set_anchor`) and runs only the blocks where a candidate differs
            (:mod:`nas.prefix_eval`), keeping at most this many bytes.
    """

    def __init__(self, net: Supernet, splits: DatasetSplits, *, val_images: int = 2000, calib_batches: int = 8,
                 calib_batch_size: int = 128, seed: int = 0, cache_path: str | os.PathLike[str] | None = None,
                 batch_size: int = 256, identity: str = "", prefix_cache_bytes: int | None = None) -> None:
        self.net = net.eval()
        self.splits = splits
        n = min(val_images, len(splits.val))
        self.val = ImageSplit(splits.val.images[:n], splits.val.labels[:n], splits.val.mean, splits.val.std)
        nb = max(1, min(calib_batches, len(splits.train) // calib_batch_size))
        self.calib = calibration_batches(splits.train, batch_size=calib_batch_size, num_batches=nb, seed=seed,
                                         channels_last=True)
        self.batch_size = batch_size
        self.n_images = n
        self._labels = self.val.labels
        # cached figures count only under the same weights, images and calibration
        self.setting = f"{identity}|val={n}|calib={nb}x{calib_batch_size}|seed={seed}"
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._correct: dict[str, np.ndarray] = {}   # hash -> right/wrong per image, over the first k images
        self._full: dict[str, float] = {}           # hash -> accuracy over all images
        # hash -> cross-entropy loss per image, over the first k images (cached with the right/wrong bits)
        self._loss: dict[str, np.ndarray] = {}
        self.evaluated = 0          # real evaluations (each on some or all of the images)
        self.evaluated_full = 0     # of them, on every image
        self.evaluated_images = 0
        self.runner = (PrefixCachedRunner(net, self.calib, _ValBatches(self.val, batch_size), val_images=n,
                                          cache_bytes=prefix_cache_bytes) if prefix_cache_bytes is not None else None)
        self._anchor: ArchConfig | None = None
        self._prepared: dict[str, Prepared] = {}   # recalibrated suffixes of this step's candidates, oldest first
        self._prepared_bytes = (prefix_cache_bytes or 0) // 4
        self._read_cache()

    def _read_cache(self) -> None:
        if self.cache_path is None or not self.cache_path.is_file():
            return
        for line in self.cache_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                setting, images = row.get("setting"), self.n_images
                if isinstance(setting, str) and setting.startswith(self.setting + "|images="):
                    images = int(setting[len(self.setting) + len("|images="):])
                elif setting != self.setting:
                    continue
                if images == self.n_images:
                    self._full[row["hash"]] = float(row["accuracy"])
                if "correct" in row and images > len(self._correct.get(row["hash"], ())):
                    self._correct[row["hash"]] = _unpack(row["correct"], images)
                if "loss" in row and images > len(self._loss.get(row["hash"], ())):
                    self._loss[row["hash"]] = _unpack_losses(row["loss"], images)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn line from an interrupted write

    def __len__(self) -> int:
        return len(set(self._full) | set(self._correct))

    def cached(self, arch: ArchConfig) -> float | None:
        """The accuracy over all images, if known."""
        return self._full.get(arch.hash)

    def rung_images(self, images: int) -> int:
        """The images an evaluation on at least ``images`` images uses (whole batches, at most all)."""
        return min(self.n_images, math.ceil(max(images, 1) / self.batch_size) * self.batch_size)

    # ------------------------------------------------------------------ evaluations
    @torch.no_grad()
    def __call__(self, arch: ArchConfig) -> float:
        """Top-1 validation accuracy (fraction) of ``arch`` with recalibrated BN (the full subnet, every image)."""
        hit = self._full.get(arch.hash)
        if hit is not None:
            return hit
        model = self.net.get_active_subnet(arch).to(memory_format=torch.channels_last)
        model = recalibrate_bn(model, None, self.calib)
        loader = make_loader(self.val, batch_size=self.batch_size, shuffle=False, seed=0, channels_last=True)
        logits = torch.cat([model(x) for x, _ in loader])
        self._keep_loss(arch, logits, 0)
        return self._record(arch, (logits.argmax(dim=-1) == self._labels).numpy())

    def correct(self, arch: ArchConfig, images: int, *, keep: bool = False) -> np.ndarray:
        """Which of the first :meth:`rung_images` ``(images)`` validation images ``arch`` gets right.

        A cached evaluation over at least as many images is reused. Otherwise, with the prefix cache,
        only the blocks after the anchor's shared prefix are recalibrated and run, and a subnet
        evaluated on fewer images earlier in this step is extended with the next images only (its
        recalibrated blocks are kept until the anchor changes). ``keep`` makes ``arch`` the next
        anchor (an evaluation over every image).
        """
        n = self.rung_images(images)
        hit = self._correct.get(arch.hash)
        if hit is not None and len(hit) >= n:
            return hit[:n]
        if self.runner is None:
            self(arch)
            return self._correct[arch.hash][:n]
        if not keep:   # an evaluation that keeps its inputs becomes the anchor: no need to build another first
            self._ensure_anchor()
        with torch.no_grad():
            if keep:
                n = self.n_images
                logits = self.runner.logits(arch, keep=True)
                first = 0
            else:
                prepared = self._prepared.pop(arch.hash, None)
                first = len(hit) // self.batch_size if prepared is not None and hit is not None else 0
                prepared = prepared or self.runner.prepare(arch)
                logits = self.runner.run(prepared, first, math.ceil(n / self.batch_size))
                self._prepared[arch.hash] = prepared
                while len(self._prepared) > 1 and sum(p.nbytes for p in self._prepared.values()) > self._prepared_bytes:
                    self._prepared.pop(next(iter(self._prepared)))
        new = (logits.argmax(dim=-1) == self._labels[first * self.batch_size:n]).numpy()
        right = np.concatenate([hit[:first * self.batch_size], new]) if first else new
        self._keep_loss(arch, logits, first * self.batch_size)
        self._record(arch, right)
        return right

    def accuracy(self, arch: ArchConfig, images: int) -> float:
        """Accuracy over the first :meth:`rung_images` ``(images)`` images (see :meth:`correct`)."""
        return float(self.correct(arch, images).mean())

    def loss(self, arch: ArchConfig, images: int) -> float | None:
        """The mean cross-entropy loss over the first :meth:`rung_images` ``(images)`` images, if ``arch`` has
        been evaluated on them (``None`` otherwise, e.g. for a cache row written before losses were kept).

        It moves with every image's confidence, not only with the few images whose top class flips, so on a
        few hundred images it ranks close subnets by their accuracy on every image far better than their
        accuracy on those few hundred does (the fast slimming path's predictor learns it).
        """
        n = self.rung_images(images)
        loss = self._loss.get(arch.hash)
        return float(loss[:n].mean()) if loss is not None and len(loss) >= n else None

    def _keep_loss(self, arch: ArchConfig, logits: torch.Tensor, first: int) -> None:
        """Record the losses of images ``first ...`` (those before it are already recorded)."""
        labels = self._labels[first:first + len(logits)]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none").numpy().astype(np.float32)
        old = self._loss.get(arch.hash)
        if first and old is not None and len(old) >= first:
            loss = np.concatenate([old[:first], loss])
        elif first:
            return   # the earlier images' losses are unknown (a cached evaluation): keep none
        if old is None or len(loss) > len(old):
            self._loss[arch.hash] = loss

    def set_anchor(self, arch: ArchConfig) -> None:
        """Reuse ``arch``'s block inputs in later evaluations (its activations are computed when first needed)."""
        if arch != self._anchor:
            self._prepared.clear()
        self._anchor = arch

    def _ensure_anchor(self) -> None:
        if self.runner is None or self._anchor is None or self.runner.anchor == self._anchor:
            return
        with torch.no_grad():
            logits = self.runner.logits(self._anchor, keep=True)
        right = (logits.argmax(dim=-1) == self._labels).numpy()
        self._keep_loss(self._anchor, logits, 0)
        known = self._correct.get(self._anchor.hash)
        if known is None or len(known) < len(right):
            self._record(self._anchor, right)
        elif not np.array_equal(known, right):
            logger.warning("the anchor %s evaluates differently from its cached evaluation (%d of %d images)",
                           self._anchor.to_string(), int((known != right).sum()), len(right))

    def _record(self, arch: ArchConfig, right: np.ndarray) -> float:
        n = len(right)
        acc = float(right.mean()) if n else 0.0
        if len(self._correct.get(arch.hash, ())) < n:
            self._correct[arch.hash] = right
        if n == self.n_images:
            self._full[arch.hash] = acc
        self.evaluated += 1
        self.evaluated_full += n == self.n_images
        self.evaluated_images += n
        if self.cache_path is not None:
            setting = self.setting if n == self.n_images else f"{self.setting}|images={n}"
            row = {"hash": arch.hash, "arch": arch.to_string(), "accuracy": acc, "setting": setting,
                   "correct": _pack(right)}
            loss = self._loss.get(arch.hash)
            if loss is not None and len(loss) >= n:   # a rerun's predictor learns exactly what this one did
                row["loss"] = _pack_losses(loss[:n])
            line = json.dumps(row) + "\n"
            fd = os.open(self.cache_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        logger.debug("accuracy %.4f on %d images for %s", acc, n, arch.to_string())
        return acc
