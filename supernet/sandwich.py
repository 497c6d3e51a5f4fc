"""The sandwich rule: which subnets a training step trains, the losses of a step, the LR schedule.

Pure functions over torch and :mod:`search_spaces` (no file formats, no pydantic), shared by
the training loop (:mod:`supernet._train_loop`) and the GPU check (``experiments/gpu_check.py``),
so that the check times the very step that ``nas-train`` runs.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from search_spaces import ArchConfig, SearchSpace

__all__ = ["lr_at", "sandwich_archs", "sandwich_step"]


def lr_at(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``.

    >>> lr_at(0, total=100, warmup=10, lr=1.0, min_lr=0.0)
    0.1
    >>> round(lr_at(100, total=100, warmup=10, lr=1.0, min_lr=0.0), 6)
    0.0
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def sandwich_archs(space: SearchSpace, *, seed: int, step: int, num_random: int) -> list[ArchConfig]:
    """Largest, smallest, then ``num_random`` random configs; a pure function of ``(seed, step)``."""
    archs = [space.largest(), space.smallest()]
    archs += [space.sample(random.Random(f"sandwich:{seed}:{step}:{k}")) for k in range(num_random)]
    return archs


def sandwich_step(
    forward: Callable[[torch.Tensor, ArchConfig], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    archs: Sequence[ArchConfig],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    label_smoothing: float,
    distill: bool,
    bf16: bool,
    teacher_classes: torch.Tensor | None = None,
    distilled_head: Callable[[bool], None] | None = None,
) -> torch.Tensor:
    """Forward and backward of every config of one step; gradients accumulate, nothing is stepped.

    The first config (the largest) learns the labels (label-smoothed cross-entropy); the others
    learn its soft predictions when ``distill`` (in-place distillation), else the labels. With an
    external teacher's predicted classes, the largest also learns those by hard distillation, as
    the EfficientFormer recipe trains (DeiT's): its class head learns the labels and its
    distillation head the teacher's classes, half the loss each (``distilled_head(True)`` makes the
    forward return both heads; without a ``head_dist`` the one head learns both targets).

    Args:
        forward: ``forward(x, arch) -> logits (B, K)``: the supernet or a compiled version of it.
        archs: the step's configs, the largest first (:func:`sandwich_archs`).
        x: images ``(B, C, H, W)``.
        y: labels ``(B,)``.
        label_smoothing: of the label cross-entropy losses.
        distill: train the others on the largest's soft predictions.
        bf16: run the forwards under bfloat16 autocast (losses in float32).
        teacher_classes: an external teacher's predicted classes ``(B,)``, or None.
        distilled_head: switches the supernet's head between its two outputs and their average.

    Returns:
        The largest config's loss (a detached scalar tensor).
    """
    soft: torch.Tensor | None = None
    first: torch.Tensor | None = None
    for arch in archs:
        hard = soft is None and teacher_classes is not None
        if hard and distilled_head is not None:
            distilled_head(True)
        try:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = forward(x, arch)
        finally:
            if hard and distilled_head is not None:
                distilled_head(False)
        if soft is None:
            cls, dist = out if isinstance(out, tuple) else (out, out)
            loss = F.cross_entropy(cls.float(), y, label_smoothing=label_smoothing)
            if teacher_classes is not None:
                loss = 0.5 * loss + 0.5 * F.cross_entropy(dist.float(), teacher_classes)
            logits = (cls.float() + dist.float()) / 2 if isinstance(out, tuple) else cls.float()
            soft = logits.detach().softmax(dim=-1)
            first = loss.detach()
        elif distill:
            loss = torch.sum(-soft * F.log_softmax(out.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
        loss.backward()
    if first is None:
        raise ValueError("`archs` must hold at least one config, got none")
    return first
