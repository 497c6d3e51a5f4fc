"""Static models: a lowered architecture as a flat sequence of block modules.

``model.blocks[i]`` is built from ``model.specs[i]``; the last block is the head. The
supernet's :meth:`get_active_subnet` returns this same class with copied weights.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn

from search_spaces import ArchConfig, BlockSpec, lower

from .blocks import build_block

__all__ = ["StaticNet", "build_model", "init_weights"]


def init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights with zero bias, as the reference models do."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class StaticNet(nn.Module):
    """A network of one fixed architecture.

    Args:
        arch: the architecture.
        specs: its lowering (``search_spaces.lower(arch, ...)``).
        resolution: input side in pixels the specs were lowered for.

    Input ``(B, in_chans, resolution, resolution)``, output ``(B, num_classes)`` logits.
    """

    def __init__(self, arch: ArchConfig, specs: tuple[BlockSpec, ...], *, resolution: int) -> None:
        super().__init__()
        self.arch = arch
        self.specs = tuple(specs)
        self.resolution = resolution
        self.in_chans = specs[0].cin
        self.num_classes = specs[-1].num_classes
        self.blocks = nn.ModuleList(build_block(s) for s in specs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[:-1]:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exclude from weight decay (attention-bias tables, layer scales, norms)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or "attention_biases" in n}


def build_model(
    arch: ArchConfig,
    *,
    num_classes: int = 1000,
    resolution: int = 224,
    in_chans: int = 3,
    distillation: bool | None = None,
    pretrained: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
) -> StaticNet:
    """Build the static model of ``arch``.

    Args:
        arch: the architecture (a preset from :func:`search_spaces.get_preset` or any config).
        num_classes: classifier outputs.
        resolution: input side in pixels (attention-bias tables depend on it).
        in_chans: input channels.
        distillation: add ``head_dist``; ``None`` takes the family default.
        pretrained: a checkpoint file (timm, snap, mit or our own layout) or state dict to load,
            see :func:`supernet.pretrained.load_pretrained`; ``None`` keeps the fresh initialisation.

    >>> from search_spaces import get_preset
    >>> model = build_model(get_preset("efficientformerv2_s0"))
    >>> sum(p.numel() for p in model.parameters())
    3600256
    """
    specs = lower(arch, resolution=resolution, num_classes=num_classes, in_chans=in_chans, distillation=distillation)
    model = StaticNet(arch, specs, resolution=resolution)
    init_weights(model)
    if pretrained is not None:
        from .pretrained import load_pretrained  # late import: pretrained.py builds on this module

        load_pretrained(model, pretrained)
    return model
