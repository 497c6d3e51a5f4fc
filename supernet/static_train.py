"""Training one static model with the supernet's recipe, optionally from a teacher.

Used to fine-tune extracted subnets (``nas-extract --finetune-epochs``), to train subnets
standalone for the rank-fidelity benchmark, and to compare baselines fairly: one loop, one
recipe (AdamW, linear warm-up then cosine decay, label smoothing, the loader's seeded
augmentation), the same as ``nas-train`` uses for the supernet.

With a teacher, training follows the EfficientFormer recipe's hard distillation (DeiT's): the
class head learns the labels and the distillation head (``head_dist``) learns the teacher's
predicted classes, each half of the loss; a model without ``head_dist`` learns both targets
with its one head. The teacher runs in eval mode under ``torch.no_grad``.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from search_spaces.errors import NasUserError

from .data import DatasetSplits, make_loader
from .train import lr_at

__all__ = ["StaticRecipe", "train_static", "distillation_loss"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaticRecipe:
    """How a static model trains (the fields of ``nas-train``'s recipe that apply to one model).

    Args:
        epochs: passes over the training split.
        batch_size: images per step.
        lr: peak AdamW learning rate, reached after ``warmup_epochs``; cosine decay to ``min_lr``.
        min_lr: final learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up, in epochs.
        label_smoothing: of the label cross-entropy.
        seed: seed of the initialisation-independent randomness (batch order, augmentation).
        augment: random crop and flip (the loader's).
        channels_last: NHWC memory format.
    """

    epochs: int
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.1
    seed: int = 0
    augment: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise NasUserError(f"epochs and batch size must be >= 1, got {self.epochs} and {self.batch_size}")
        for name in ("lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise NasUserError(f"`{name}` must be a finite number >= 0, got {value!r}")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise NasUserError(f"need 0 <= min_lr <= lr and lr > 0, got lr {self.lr} and min_lr {self.min_lr}")

    @classmethod
    def from_train_config(cls, cfg: object, *, epochs: int | None = None, seed: int | None = None) -> StaticRecipe:
        """The recipe of a supernet run (its ``TrainConfig`` or ``supernet.json``'s ``recipe`` dict)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        return cls(epochs=epochs if epochs is not None else int(get("epochs")), batch_size=int(get("batch_size")),
                   lr=float(get("lr")), min_lr=float(get("min_lr")), weight_decay=float(get("weight_decay")),
                   warmup_epochs=float(get("warmup_epochs")), label_smoothing=float(get("label_smoothing")),
                   seed=int(get("seed") if seed is None else seed), channels_last=bool(get("channels_last", True)))


def distillation_loss(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor], y: torch.Tensor,
                      teacher_classes: torch.Tensor | None, *, label_smoothing: float) -> torch.Tensor:
    """Label cross-entropy, or with a teacher half labels and half the teacher's classes (hard)."""
    if teacher_classes is None:
        logits = out[0] if isinstance(out, tuple) else out
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    cls, dist = out if isinstance(out, tuple) else (out, out)
    return 0.5 * F.cross_entropy(cls.float(), y, label_smoothing=label_smoothing) + \
        0.5 * F.cross_entropy(dist.float(), teacher_classes)


def train_static(model: nn.Module, splits: DatasetSplits, recipe: StaticRecipe, *, teacher: nn.Module | None = None,
                 progress: Callable[[str], None] | None = None, label: str = "train") -> list[dict[str, float]]:
    """Train ``model`` in place on ``splits.train``; returns one row per epoch (loss, seconds).

    Each epoch is reported as ``<label> epoch i/n: loss ...`` to ``progress`` (else to the log).

    Raises:
        NasUserError: a teacher whose classes differ from the model's.
    """
    device = next(model.parameters()).device
    use_dist = teacher is not None and getattr(model, "has_dist_head", False)
    if teacher is not None:
        teacher = teacher.eval()
        classes = getattr(teacher, "num_classes", None)
        if classes is not None and classes != splits.num_classes:
            raise NasUserError(f"the teacher predicts {classes} classes, the data has {splits.num_classes}; "
                               f"give a teacher trained on the same classes")
    if use_dist:
        model.set_distilled_training(True)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    spe = make_loader(splits.train, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed).batches_per_epoch
    total, warmup = recipe.epochs * spe, int(round(recipe.warmup_epochs * spe))
    rows, step = [], 0
    try:
        for epoch in range(recipe.epochs):
            model.train()
            t0, loss_sum = time.perf_counter(), 0.0
            for x, y in make_loader(splits.train, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed,
                                    epoch=epoch, augment=recipe.augment, channels_last=recipe.channels_last,
                                    device=device):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total=total, warmup=warmup, lr=recipe.lr, min_lr=recipe.min_lr)
                target = None
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(x).argmax(dim=-1)
                opt.zero_grad(set_to_none=True)
                loss = distillation_loss(model(x), y, target, label_smoothing=recipe.label_smoothing)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach())
                step += 1
            row = {"epoch": epoch + 1, "loss": loss_sum / max(spe, 1), "seconds": time.perf_counter() - t0}
            rows.append(row)
            msg = f"{label} epoch {epoch + 1}/{recipe.epochs}: loss {row['loss']:.4f} ({row['seconds']:.0f} s)"
            (progress or logger.info)(msg)
    finally:
        if use_dist:
            model.set_distilled_training(False)
    return rows
