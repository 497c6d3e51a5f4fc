"""Batch-norm recalibration and accuracy evaluation.

A subnet sliced out of a supernet inherits running statistics that were accumulated over
many different subnets. Before it is evaluated, its BN statistics are re-estimated on a
fixed set of training batches (the Once-for-All way).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from search_spaces import ArchConfig

from .model import StaticNet

__all__ = ["recalibrate_bn", "evaluate"]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    arch: ArchConfig | None = None,
    loader: Iterable[torch.Tensor | tuple[torch.Tensor, ...]] = (),
    batches: int | None = None,
) -> StaticNet | nn.Module:
    """Re-estimate BN running statistics of ``arch`` on ``loader`` and return a model ready for eval.

    Args:
        model: a :class:`~supernet.elastic.Supernet` (the subnet ``arch`` is extracted first)
            or a static model (recalibrated in place).
        arch: the architecture, when ``model`` is a supernet (default: its active one).
        loader: batches of images ``(B, C, H, W)``, or ``(images, labels)`` tuples.
        batches: use at most this many batches (default: all).

    Returns:
        The static model in eval mode, with exact (cumulative-average) BN statistics.
    """
    from .elastic import Supernet

    net = model.get_active_subnet(arch) if isinstance(model, Supernet) else model
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the calibration batches
    net.train()
    device = next(net.parameters()).device
    try:
        for i, batch in enumerate(loader):
            if batches is not None and i >= batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            net(x.to(device))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
    return net.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             autocast_dtype: torch.dtype | None = None) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` in eval mode over ``loader``."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(x)
        correct += int((logits.argmax(dim=-1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)
