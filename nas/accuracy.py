"""Proxy accuracy of candidate subnets: shared supernet weights, recalibrated BN, held-out validation split.

Results are cached by architecture hash in an append-only JSON-lines file in the search folder.
Each line is written with one ``write`` call in append mode, so concurrent workers and a killed
process never corrupt it (a torn last line is ignored when reading).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from search_spaces import ArchConfig
from supernet.bn import evaluate, recalibrate_bn
from supernet.data import DatasetSplits, ImageSplit, calibration_batches, load_dataset, make_loader
from supernet.elastic import Supernet
from supernet.run import SupernetRun

__all__ = ["AccuracyEvaluator", "load_run_splits"]

logger = logging.getLogger(__name__)


def load_run_splits(run: SupernetRun) -> DatasetSplits:
    """The run's dataset with exactly its training-time splits (same seed, validation size, subset)."""
    recipe = run.meta["recipe"]
    return load_dataset(recipe["dataset"], resolution=run.resolution, seed=recipe["seed"],
                        val_size=recipe.get("val_size"), train_subset=recipe.get("train_subset"))


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
        identity: what identifies the weights, e.g. the supernet's SHA-256.
    """

    def __init__(self, net: Supernet, splits: DatasetSplits, *, val_images: int = 2000, calib_batches: int = 8,
                 calib_batch_size: int = 128, seed: int = 0, cache_path: str | os.PathLike[str] | None = None,
                 batch_size: int = 256, identity: str = "") -> None:
        self.net = net.eval()
        n = min(val_images, len(splits.val))
        self.val = ImageSplit(splits.val.images[:n], splits.val.labels[:n], splits.val.mean, splits.val.std)
        nb = max(1, min(calib_batches, len(splits.train) // calib_batch_size))
        self.calib = calibration_batches(splits.train, batch_size=calib_batch_size, num_batches=nb, seed=seed,
                                         channels_last=True)
        self.batch_size = batch_size
        # cached figures count only under the same weights, images and calibration
        self.setting = f"{identity}|val={n}|calib={nb}x{calib_batch_size}|seed={seed}"
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._cache: dict[str, float] = {}
        self.evaluated = 0
        if self.cache_path is not None and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    if row.get("setting") == self.setting:
                        self._cache[row["hash"]] = float(row["accuracy"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a torn line from an interrupted write

    def __len__(self) -> int:
        return len(self._cache)

    def cached(self, arch: ArchConfig) -> float | None:
        return self._cache.get(arch.hash)

    @torch.no_grad()
    def __call__(self, arch: ArchConfig) -> float:
        """Top-1 validation accuracy (fraction) of ``arch`` with recalibrated BN."""
        hit = self._cache.get(arch.hash)
        if hit is not None:
            return hit
        model = self.net.get_active_subnet(arch).to(memory_format=torch.channels_last)
        model = recalibrate_bn(model, None, self.calib)
        loader = make_loader(self.val, batch_size=self.batch_size, shuffle=False, seed=0, channels_last=True)
        acc = evaluate(model, loader)
        self._cache[arch.hash] = acc
        self.evaluated += 1
        if self.cache_path is not None:
            line = json.dumps({"hash": arch.hash, "arch": arch.to_string(), "accuracy": acc, "setting": self.setting}) + "\n"
            fd = os.open(self.cache_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        logger.debug("accuracy %.4f for %s", acc, arch.to_string())
        return acc
