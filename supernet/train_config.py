"""The settings of a supernet training run: :class:`TrainConfig` (each field is one ``nas-train`` flag)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from search_spaces.errors import NasUserError

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a supernet training run (each field is one ``nas-train`` flag).

    Args:
        space: registered search space (V1 or V2 family).
        dataset: ``fashion-mnist``, ``imagefolder:PATH`` or ``synthetic[:N]``.
        resolution: train and deployment input side in pixels.
        stem_stride: 0 = automatic (2 for resolutions up to 64, else the space's), or 2 / 4.
        epochs: passes over the training split.
        batch_size: global batch (split across ranks).
        lr: peak AdamW learning rate, reached after ``warmup_epochs``; cosine decay to ``min_lr``.
        num_random: random subnets per step besides the largest and the smallest.
        distill: train non-largest subnets on the largest's soft predictions.
        train_subset: keep this many training images (seeded), for quick runs.
        val_size: images carved from the training set for validation.
        calib_batches: batches used to recalibrate BN before each evaluation.
        save_every: also checkpoint every this many steps (0: epoch ends only).
        device: ``cpu`` or ``cuda``.
        channels_last: NHWC memory format.
        bf16: bfloat16 autocast (``None``: on for CUDA, off on CPU).
        compile: ``torch.compile`` the supernet forward (GPU; one graph per architecture).
        threads: torch intra-op threads (0: leave torch's default).
    """

    space: str = "efficientformer_v2_demo"
    dataset: str = "fashion-mnist"
    resolution: int = 32
    stem_stride: int = 0
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.1
    num_random: int = 1
    distill: bool = True
    seed: int = 0
    train_subset: int | None = None
    val_size: int | None = None
    calib_batches: int = 8
    save_every: int = 0
    device: str = "cpu"
    channels_last: bool = True
    bf16: bool | None = None
    compile: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        kinds = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
                 "bool": ((bool,), "true or false")}
        for f in fields(self):  # a --config file may hold anything: check the types before the values
            value, annotation = getattr(self, f.name), str(f.type)
            if value is None and annotation.endswith("| None"):
                continue
            types, what = kinds[annotation.removesuffix(" | None")]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise NasUserError(f"`{f.name}` must be {what}, got {value!r}")
        checks: list[tuple[str, bool, str]] = [
            ("resolution", self.resolution >= 16, ">= 16"),
            ("stem_stride", self.stem_stride in (0, 2, 4), "0 (auto), 2 or 4"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 2, ">= 2"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive finite number"),
            ("min_lr", math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr, "within [0, lr]"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
             "within [0, epochs]"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "within [0, 1)"),
            ("num_random", 0 <= self.num_random <= 16, "within [0, 16]"),
            ("calib_batches", self.calib_batches >= 1, ">= 1"),
            ("save_every", self.save_every >= 0, ">= 0"),
            ("device", self.device in ("cpu", "cuda") or self.device.startswith("cuda:"), "cpu or cuda"),
            ("threads", self.threads >= 0, ">= 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise NasUserError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(self, name)!r}")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise NasUserError(f"--train-subset must be at least --batch-size ({self.batch_size}), got {self.train_subset}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NasUserError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """The settings that must match for a run folder to be resumed (not device or threads)."""
        d = self.to_dict()
        for k in ("device", "threads", "save_every", "compile"):
            d.pop(k)
        return d
