"""Static models: a lowered architecture as a flat sequence of block modules.

``model.blocks[i]`` is built from ``model.specs[i]``; in a classifier the last block is the
head, in a backbone (``task="backbone"``) there is no head and the model returns one feature
map per stage. The supernet's :meth:`~supernet.elastic.Supernet.get_active_subnet` returns
this same class with copied weights.

The feature API follows timm's: ``forward_features(x, out_indices=(0, 1, 2, 3))`` returns the
output map of each requested body stage, and ``feature_info`` lists every stage's channels
and reduction (input pixels per output pixel).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from search_spaces import ArchConfig, BlockSpec, LoweringSetup, lower, parse_resolution
from search_spaces.errors import NasUserError
from search_spaces.kinds import get_kind
from search_spaces.lowering import get_family, resolve_setup

from .blocks import build_block

__all__ = ["StaticNet", "FeatureInfo", "build_model", "init_weights", "feature_info", "tokens_to_map", "load_extracted"]


def init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights with zero bias, as the reference models do."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class FeatureInfo:
    """One body stage's output as a feature map.

    Attributes:
        stage: the stage's position label (``BlockSpec.stage``).
        index: its index among the body stages (what ``out_indices`` counts).
        num_chs: channels of its output map.
        reduction: input pixels per output pixel (4, 8, 16, 32 for every preset).
        block: index in ``model.blocks`` of the stage's last block.
        hw: its output map ``(height, width)``.
    """

    stage: int
    index: int
    num_chs: int
    reduction: int
    block: int
    hw: tuple[int, int]

    def to_dict(self) -> dict[str, object]:
        """timm's ``feature_info`` entry (``num_chs``, ``reduction``, ``module``) plus our fields."""
        return {"num_chs": self.num_chs, "reduction": self.reduction, "module": f"blocks.{self.block}",
                "stage": self.stage, "index": self.index, "hw": list(self.hw)}


def feature_info(specs: Sequence[BlockSpec]) -> list[FeatureInfo]:
    """The body stages of a lowering, in order, as :class:`FeatureInfo` (stem and head excluded).

    The stem's own stage (0) is not a feature stage; for EfficientViT the first
    architecture stage belongs to the stem, as in the reference code.
    """
    last: dict[int, int] = {}
    reduction, reductions = 1, {}
    for i, spec in enumerate(specs):
        if spec.stage < 0:
            raise NasUserError(f"block {spec.key!r} carries no position; take specs from search_spaces.lower()")
        if get_kind(spec.kind).is_head:
            continue
        reduction *= spec.stride
        if spec.stage > 0:
            last[spec.stage] = i
            reductions[spec.stage] = reduction
    return [FeatureInfo(stage, k, specs[i].cout, reductions[stage], i, specs[i].out_hw)
            for k, (stage, i) in enumerate(sorted(last.items()))]


def tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``(B, h*w, C)`` tokens back to a ``(B, C, h, w)`` map (EfficientFormer V1's last stage)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])


class StaticNet(nn.Module):
    """A network of one fixed architecture.

    Args:
        arch: the architecture.
        specs: its lowering (``search_spaces.lower(arch, setup)``).
        resolution: the input ``(height, width)`` (or side) the specs were lowered for.
        out_indices: for a backbone (specs without a head), the stages ``forward`` returns.
        blocks: the modules of ``specs``, already built (a supernet's extraction); default: fresh ones.

    A classifier maps ``(B, in_chans, H, W)`` to ``(B, num_classes)`` logits; a backbone to a
    list of ``(B, C_i, H_i, W_i)`` maps, one per index of ``out_indices``.
    """

    def __init__(self, arch: ArchConfig, specs: tuple[BlockSpec, ...], *, resolution: int | tuple[int, int],
                 out_indices: Sequence[int] | None = None, blocks: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.specs = tuple(specs)
        self.hw = parse_resolution(resolution)
        #: the input side for a square input (as an int), else ``(height, width)``
        self.resolution: int | tuple[int, int] = self.hw[0] if self.hw[0] == self.hw[1] else self.hw
        self.in_chans = specs[0].cin
        self.has_head = get_kind(specs[-1].kind).is_head
        self.num_classes = specs[-1].num_classes if self.has_head else 0
        self._features = feature_info(self.specs)
        self.feature_info = [f.to_dict() for f in self._features]
        self.out_indices = self._check_indices(out_indices if out_indices is not None else range(len(self._features)))
        if blocks is not None and len(blocks) != len(self.specs):
            raise ValueError(f"{len(blocks)} blocks given for {len(self.specs)} specs")
        self.blocks = nn.ModuleList(blocks if blocks is not None else (build_block(s) for s in specs))

    def _check_indices(self, out_indices: Sequence[int]) -> tuple[int, ...]:
        n = len(self._features)
        idx = tuple(int(i) for i in out_indices)
        bad = [i for i in idx if not -n <= i < n]
        if bad or not idx:
            raise NasUserError(f"out_indices must be stage indices in [0, {n}), got {list(out_indices)}")
        return tuple(i % n for i in idx)

    def forward_features(self, x: torch.Tensor, out_indices: Sequence[int] | None = None
                         ) -> torch.Tensor | list[torch.Tensor]:
        """Without ``out_indices``: the last feature before the head (a map, or tokens after V1's
        Meta3D blocks). With ``out_indices``: a list with the output map ``(B, C, H, W)`` of each
        requested body stage (see :attr:`feature_info`)."""
        if out_indices is None:
            for block in self.blocks[:-1] if self.has_head else self.blocks:
                x = block(x)
            return x
        wanted = self._check_indices(out_indices)
        stops = {self._features[i].block: self._features[i] for i in wanted}
        out: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: max(stops) + 1]):
            x = block(x)
            info = stops.get(i)
            if info is not None:
                out[info.index] = tokens_to_map(x, info.hw) if x.dim() == 3 else x
        return [out[i] for i in wanted]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_head:
            raise NasUserError("this model is a backbone (features only): it has no head")
        return self.blocks[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not self.has_head:
            return self.forward_features(x, self.out_indices)
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exclude from weight decay (attention-bias tables, layer scales, norms)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or "attention_biases" in n}

    @property
    def has_dist_head(self) -> bool:
        """Whether the classifier has a ``head_dist`` (EfficientFormer V1 and V2 by default)."""
        return self.has_head and getattr(self.blocks[-1], "head_dist", None) is not None

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(head, head_dist)`` logits for hard distillation (see the heads)."""
        if enable and not self.has_dist_head:
            raise NasUserError("this model has no head_dist; hard distillation needs one (build it with "
                               "distillation=True)")
        self.blocks[-1].distilled_training = bool(enable)


def build_model(
    arch: ArchConfig,
    setup: LoweringSetup | None = None,
    *,
    num_classes: int | None = None,
    resolution: int | str | tuple[int, int] | None = None,
    in_chans: int | None = None,
    distillation: bool | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    pretrained: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
) -> StaticNet:
    """Build the static model of ``arch``.

    Args:
        arch: the architecture (a preset from :func:`search_spaces.get_preset` or any config).
        setup: the lowering setup; or give its fields as keywords (defaults: 224 px, 1000
            classes, 3 channels, the family's distillation default):
        num_classes: classifier outputs.
        resolution: input side in pixels, ``"HxW"`` or ``(height, width)`` (attention-bias
            tables depend on it).
        in_chans: input channels.
        distillation: add ``head_dist``; ``None`` takes the family default.
        features_only: a backbone without the classifier head; ``forward`` returns one map per
            index of ``out_indices``.
        out_indices: the stages a backbone returns (default: all four).
        pretrained: a checkpoint file (timm, snap, mit or our own layout) or state dict to load,
            see :func:`supernet.pretrained.load_pretrained`; ``None`` keeps the fresh initialisation.

    >>> from search_spaces import get_preset
    >>> model = build_model(get_preset("efficientformerv2_s0"))
    >>> sum(p.numel() for p in model.parameters())
    3600256
    >>> backbone = build_model(get_preset("efficientformerv2_s0"), resolution="64x128", features_only=True)
    >>> [tuple(f.shape) for f in backbone(torch.zeros(1, 3, 64, 128))]
    [(1, 32, 16, 32), (1, 48, 8, 16), (1, 96, 4, 8), (1, 176, 2, 4)]
    """
    setup = resolve_setup(get_family(arch.family), setup, num_classes=num_classes, resolution=resolution,
                          in_chans=in_chans, distillation=distillation)
    if features_only:
        setup = setup.replace(task="backbone")
    specs = lower(arch, setup)
    model = StaticNet(arch, specs, resolution=setup.resolution, out_indices=out_indices)
    init_weights(model)
    if pretrained is not None:
        from .pretrained import load_pretrained  # late import: pretrained.py builds on this module

        load_pretrained(model, pretrained)
    return model


def load_extracted(folder: str | os.PathLike[str], *, map_location: str = "cpu") -> StaticNet:
    """Rebuild a model written by ``nas-extract`` from its folder alone (``model.safetensors`` carries
    its ``subnet.json`` in the metadata; nothing is unpickled).

    Raises:
        FileFormatError: no such file, no config in it, or weights that do not fit the config.
    """
    from pathlib import Path

    from search_spaces.errors import FileFormatError
    from search_spaces.subnet_file import SubnetFile

    from .checkpoint import load_tensors

    path = Path(folder) / "model.safetensors"
    tensors, meta = load_tensors(path, what="model")
    if "subnet" not in meta:
        raise FileFormatError(f"{path} carries no subnet config in its metadata")
    sub = SubnetFile.from_dict(meta["subnet"], source=str(path))
    model = StaticNet(sub.arch, sub.specs(), resolution=sub.hw)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise FileFormatError(f"{path}: weights do not fit the config ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected tensors)")
    return model.to(map_location).eval()
