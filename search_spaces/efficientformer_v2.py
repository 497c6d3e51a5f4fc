"""EfficientFormerV2 (Li et al., 2022): variant tables, lowering, search spaces and presets.

Layout follows the reference (snap-research/EfficientFormer, timm ``efficientformer_v2``):
a GELU stem of stride 4, four stages (stride-2 conv downsampling before stages 2 and 3,
attention downsampling before stage 4), FFN blocks with a depthwise mid conv, and
Attention4D+FFN blocks as the last blocks of stages 3 and 4 (with a stride-2 attention in
stage 3). The extended space adds EfficientViT's LiteMLA as a mixer choice in attention slots.
"""
from __future__ import annotations

from .arch import ArchConfig, BlockConfig, StageConfig
from .errors import SpaceError
from .registry import register_family, register_preset, register_space
from .space import SearchSpace, StageChoices
from .specs import BlockSpec, ceil_div

FAMILY = "efficientformer_v2"

WIDTHS = {
    "s0": (32, 48, 96, 176),
    "s1": (32, 48, 120, 224),
    "s2": (32, 64, 144, 288),
    "l": (40, 80, 192, 384),
}
DEPTHS = {
    "s0": (2, 2, 6, 4),
    "s1": (3, 3, 9, 6),
    "s2": (4, 4, 12, 8),
    "l": (5, 5, 15, 10),
}
#: Per-block expansion ratios of stages 3 and 4 (stages 1-2 use 4 throughout).
EXPANSIONS = {
    "s0": ((4, 3, 3, 3, 4, 4), (4, 3, 3, 4)),
    "s1": ((4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
    "s2": ((4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)),
    "l": ((4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)),
}
#: Attention blocks at the end of stages 3 and 4.
NUM_VIT = {"s0": 2, "s1": 2, "s2": 4, "l": 6}

# Attention4D (blocks) and the attention downsampling of stage 4.
ATTN_HEADS, ATTN_KEY_DIM, ATTN_RATIO = 8, 32, 4
DOWN_HEADS, DOWN_KEY_DIM, DOWN_RATIO = 8, 16, 4
#: LiteMLA head dimension when it replaces Attention4D.
LITE_HEAD_DIM = 16

PLAIN, ATTN_MIXERS = "ffn", ("lite", "attn")


@register_family(FAMILY, distillation=True)
def lower_efficientformer_v2(
    arch: ArchConfig, *, resolution: int, num_classes: int, in_chans: int, distillation: bool
) -> tuple[BlockSpec, ...]:
    if len(arch.stages) != 4:
        raise SpaceError(f"{FAMILY} needs 4 stages, got {len(arch.stages)}")
    if arch.stem_stride not in (2, 4):
        raise SpaceError(f"{FAMILY} stem_stride must be 2 or 4, got {arch.stem_stride}")
    if arch.head_widths or arch.head_dim:
        raise SpaceError(f"{FAMILY} has no head_widths/head_dim (those are EfficientViT fields)")
    specs = [BlockSpec("ef2.stem", in_chans, arch.stages[0].width, resolution, stride=arch.stem_stride)]
    size = ceil_div(ceil_div(resolution, 2), arch.stem_stride // 2)
    prev = arch.stages[0].width
    for si, st in enumerate(arch.stages):
        w = st.width
        if si == 3:
            specs.append(BlockSpec("ef2.down_attn", prev, w, size, stride=2, heads=DOWN_HEADS,
                                   key_dim=DOWN_KEY_DIM, value_dim=DOWN_KEY_DIM * DOWN_RATIO))
            size = ceil_div(size, 2)
        elif si > 0:
            specs.append(BlockSpec("ef2.down", prev, w, size, stride=2))
            size = ceil_div(size, 2)
        if w < 2:
            raise SpaceError(f"stage {si + 1} width must be at least 2, got {w}")
        for bi, b in enumerate(st.blocks):
            hidden = int(w * b.expansion)
            where = f"stage {si + 1} block {bi + 1}"
            if hidden < 1:
                raise SpaceError(f"{where}: expansion {b.expansion} leaves no hidden channels")
            if b.mixer == "ffn":
                specs.append(BlockSpec("ef2.ffn", w, w, size, hidden=hidden))
            elif b.mixer in ATTN_MIXERS and si < 2:
                raise SpaceError(f"{where}: mixer {b.mixer!r} is allowed only in stages 3 and 4")
            elif b.mixer == "attn":
                stride = 2 if si == 2 else 1
                if stride == 2 and size % 2:
                    raise SpaceError(
                        f"{where}: the stride-2 attention of stage 3 needs an even map, but resolution "
                        f"{resolution} gives {size}x{size}; use a resolution divisible by {arch.stem_stride * 8}"
                    )
                specs.append(BlockSpec("ef2.attn_ffn", w, w, size, stride=stride, hidden=hidden, heads=ATTN_HEADS,
                                       key_dim=ATTN_KEY_DIM, value_dim=ATTN_KEY_DIM * ATTN_RATIO))
            elif b.mixer == "lite":
                if w < LITE_HEAD_DIM:
                    raise SpaceError(f"{where}: the lite mixer needs width >= {LITE_HEAD_DIM}, got {w}")
                specs.append(BlockSpec("ef2.lite_ffn", w, w, size, hidden=hidden, heads=w // LITE_HEAD_DIM,
                                       value_dim=LITE_HEAD_DIM))
            else:
                raise SpaceError(f"{where}: mixer {b.mixer!r} is not one of ['ffn', 'attn', 'lite']")
        prev = w
    specs.append(BlockSpec("ef2.head", prev, prev, size, num_classes=num_classes, distillation=distillation))
    return tuple(specs)


def _preset(variant: str) -> ArchConfig:
    stages = []
    for si, (w, d) in enumerate(zip(WIDTHS[variant], DEPTHS[variant])):
        exps = (4,) * d if si < 2 else EXPANSIONS[variant][si - 2]
        n_attn = NUM_VIT[variant] if si >= 2 else 0
        mixers = ["ffn"] * (d - n_attn) + ["attn"] * n_attn
        stages.append(StageConfig(w, tuple(BlockConfig(m, e) for m, e in zip(mixers, exps))))
    return ArchConfig(FAMILY, tuple(stages), stem_stride=4)


def _steps(lo: int, hi: int, step: int = 8) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1, step))


@register_space
def efficientformer_v2_space() -> SearchSpace:
    """The default V2 space: contains S0, S1, S2 and L; LiteMLA as an extra attention mixer."""
    e = (2, 3, 4)
    return SearchSpace("efficientformer_v2", FAMILY, (
        StageChoices(_steps(16, 48), tuple(range(2, 6)), e, PLAIN),
        StageChoices(_steps(32, 80), tuple(range(2, 6)), e, PLAIN),
        StageChoices(_steps(64, 192), tuple(range(6, 16)), e, PLAIN, ATTN_MIXERS, max_attn=6),
        StageChoices(_steps(128, 384), tuple(range(4, 11)), e, PLAIN, ATTN_MIXERS, max_attn=6),
    ), stem_stride=4)


@register_space
def efficientformer_v2_demo_space() -> SearchSpace:
    """A small V2-shaped space for the CPU demo on 32x32 Fashion-MNIST (stem stride 2).

    Its largest config is about the size of the feasibility probe in DESIGN.md section 8
    (widths 16-64, 0.6M parameters), so a sandwich-rule supernet trains in minutes on 2 cores.
    """
    e = (2, 3, 4)
    return SearchSpace("efficientformer_v2_demo", FAMILY, (
        StageChoices((16,), (1,), e, PLAIN),
        StageChoices((16, 24, 32), (1, 2), e, PLAIN),
        StageChoices((32, 40, 48), (1, 2), e, PLAIN, ATTN_MIXERS, max_attn=1),
        StageChoices((48, 56, 64), (1, 2), e, PLAIN, ATTN_MIXERS, max_attn=1),
    ), stem_stride=2)


@register_preset
def efficientformerv2_s0() -> ArchConfig:
    return _preset("s0")


@register_preset
def efficientformerv2_s1() -> ArchConfig:
    return _preset("s1")


@register_preset
def efficientformerv2_s2() -> ArchConfig:
    return _preset("s2")


@register_preset
def efficientformerv2_l() -> ArchConfig:
    return _preset("l")
