"""EfficientFormer V1 (Li et al., 2022): variant tables, lowering, search space and presets.

A ReLU stem of stride 4, four stages of Meta4D blocks (pool mixer + conv MLP) with
stride-2 conv downsampling, and the last ``vit_num`` blocks of stage 4 as Meta3D blocks
(LayerNorm + multi-head self-attention on tokens).
"""
from __future__ import annotations

from .arch import ArchConfig, BlockConfig, StageConfig
from .errors import SpaceError
from .registry import register_family, register_preset, register_space
from .space import SearchSpace, StageChoices
from .specs import BlockSpec, ceil_div

FAMILY = "efficientformer"

WIDTHS = {
    "l1": (48, 96, 224, 448),
    "l3": (64, 128, 320, 512),
    "l7": (96, 192, 384, 768),
}
DEPTHS = {
    "l1": (3, 2, 6, 4),
    "l3": (4, 4, 12, 6),
    "l7": (6, 6, 18, 8),
}
NUM_VIT = {"l1": 1, "l3": 4, "l7": 8}
MLP_RATIO = 4
ATTN_HEADS, ATTN_KEY_DIM, ATTN_RATIO = 8, 32, 4


@register_family(FAMILY, distillation=True)
def lower_efficientformer(
    arch: ArchConfig, *, resolution: int, num_classes: int, in_chans: int, distillation: bool
) -> tuple[BlockSpec, ...]:
    if len(arch.stages) != 4:
        raise SpaceError(f"{FAMILY} needs 4 stages, got {len(arch.stages)}")
    if arch.stem_stride not in (2, 4):
        raise SpaceError(f"{FAMILY} stem_stride must be 2 or 4, got {arch.stem_stride}")
    if arch.head_widths or arch.head_dim:
        raise SpaceError(f"{FAMILY} has no head_widths/head_dim (those are EfficientViT fields)")
    specs = [BlockSpec("ef1.stem", in_chans, arch.stages[0].width, resolution, stride=arch.stem_stride)]
    size = ceil_div(ceil_div(resolution, 2), arch.stem_stride // 2)
    prev = arch.stages[0].width
    tokens = False
    for si, st in enumerate(arch.stages):
        w = st.width
        if si > 0:
            specs.append(BlockSpec("ef1.down", prev, w, size, stride=2))
            size = ceil_div(size, 2)
        if w < 2:
            raise SpaceError(f"stage {si + 1} width must be at least 2, got {w}")
        for bi, b in enumerate(st.blocks):
            hidden = int(w * b.expansion)
            where = f"stage {si + 1} block {bi + 1}"
            if hidden < 1:
                raise SpaceError(f"{where}: expansion {b.expansion} leaves no hidden channels")
            if b.mixer == "pool":
                if tokens:
                    raise SpaceError(f"{where}: a 'pool' block cannot follow an 'attn' block (Meta3D blocks come last)")
                specs.append(BlockSpec("ef1.meta4d", w, w, size, hidden=hidden))
            elif b.mixer == "attn":
                if si != 3:
                    raise SpaceError(f"{where}: 'attn' (Meta3D) blocks are allowed only in stage 4")
                specs.append(BlockSpec("ef1.meta3d", w, w, size, hidden=hidden, heads=ATTN_HEADS,
                                       key_dim=ATTN_KEY_DIM, value_dim=ATTN_KEY_DIM * ATTN_RATIO, tokens_in=tokens))
                tokens = True
            else:
                raise SpaceError(f"{where}: mixer {b.mixer!r} is not one of ['pool', 'attn']")
        prev = w
    specs.append(BlockSpec("ef1.head", prev, prev, size, tokens_in=tokens, num_classes=num_classes,
                           distillation=distillation))
    return tuple(specs)


def _preset(variant: str) -> ArchConfig:
    stages = []
    for si, (w, d) in enumerate(zip(WIDTHS[variant], DEPTHS[variant])):
        n_attn = NUM_VIT[variant] if si == 3 else 0
        mixers = ["pool"] * (d - n_attn) + ["attn"] * n_attn
        stages.append(StageConfig(w, tuple(BlockConfig(m, MLP_RATIO) for m in mixers)))
    return ArchConfig(FAMILY, tuple(stages), stem_stride=4)


def _steps(lo: int, hi: int, step: int = 8) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1, step))


@register_space
def efficientformer_space() -> SearchSpace:
    """The default V1 space: contains L1, L3 and L7 (Meta3D blocks: 0 to the stage-4 depth)."""
    e = (2, 3, 4)
    return SearchSpace("efficientformer", FAMILY, (
        StageChoices(_steps(48, 96), tuple(range(3, 7)), e, "pool"),
        StageChoices(_steps(96, 192), tuple(range(2, 7)), e, "pool"),
        StageChoices(_steps(224, 384), tuple(range(6, 19)), e, "pool"),
        StageChoices(_steps(448, 768), tuple(range(4, 9)), e, "pool", ("attn",), max_attn=8),
    ), stem_stride=4)


@register_space
def efficientformer_demo_space() -> SearchSpace:
    """A small V1-shaped space for CPU tests and demos on small images (stem stride 2)."""
    e = (2, 3, 4)
    return SearchSpace("efficientformer_demo", FAMILY, (
        StageChoices((16,), (1,), e, "pool"),
        StageChoices((16, 24, 32), (1, 2), e, "pool"),
        StageChoices((32, 40, 48), (1, 2), e, "pool"),
        StageChoices((48, 56, 64), (1, 2), e, "pool", ("attn",), max_attn=2),
    ), stem_stride=2)


@register_preset
def efficientformer_l1() -> ArchConfig:
    return _preset("l1")


@register_preset
def efficientformer_l3() -> ArchConfig:
    return _preset("l3")


@register_preset
def efficientformer_l7() -> ArchConfig:
    return _preset("l7")
