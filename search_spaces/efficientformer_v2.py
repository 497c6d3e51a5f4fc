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
from .kinds import BlockKind, register_kind
from .lowering import Carry, Family, register_family
from .ops import OpTrace, out_hw
from .registry import register_preset, register_space
from .setup import LoweringSetup
from .space import SearchSpace, StageChoices
from .specs import BlockSpec

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


# ============================================================================ block kinds
def _trace_stem(s: BlockSpec, t: OpTrace) -> None:
    """Two conv3x3 + BN + activation, stride 2 each (the second stride 1 for a stem of stride 2)."""
    half = s.cout // 2
    hw1 = out_hw(s.hw, 2)
    hw2 = out_hw(hw1, 2 if s.stride == 4 else 1)
    t.conv(s.cin, half, hw1, k=3, bn=True)
    t.elem(half * hw1[0] * hw1[1])
    t.conv(half, s.cout, hw2, k=3, bn=True)
    t.elem(s.cout * hw2[0] * hw2[1])


def _trace_down(s: BlockSpec, t: OpTrace) -> None:
    t.conv(s.cin, s.cout, s.out_hw, k=3, bn=True)


def _trace_ffn(s: BlockSpec, t: OpTrace) -> None:
    t.conv_ffn(s.cin, s.hidden, s.hw)


def _trace_attn_ffn(s: BlockSpec, t: OpTrace) -> None:
    """Attention4D (on the ``attn_stride``-subsampled grid) + ``ls1``, then the FFN."""
    c, heads = s.cin, s.heads
    r = s.attn_hw
    m = r[0] * r[1]
    n = s.h * s.w
    kh, dh = heads * s.key_dim, heads * s.value_dim
    if s.attn_stride > 1:
        t.conv(c, c, r, k=3, groups=c, bn=True)  # stride conv
    t.conv(c, kh, r, bn=True)  # q
    t.conv(c, kh, r, bn=True)  # k
    t.conv(c, dh, r, bn=True)  # v
    t.conv(dh, dh, r, k=3, groups=dh, bn=True)  # v_local
    t.param(heads * m)  # attention biases
    t.matmul(heads * m * m * s.key_dim, heads * m * m)  # q @ k
    t.elem(heads * m * m)  # + bias
    t.param(2 * (heads * heads + heads))  # talking heads (1x1 convs over the heads)
    t.matmul(heads * heads * m * m, heads * m * m)  # talking head 1
    t.elem(heads * m * m)  # softmax
    t.matmul(heads * heads * m * m, heads * m * m)  # talking head 2
    t.matmul(heads * m * m * s.value_dim, dh * m)  # attn @ v
    t.elem(dh * m)  # + v_local
    if s.attn_stride > 1:
        t.elem(dh * n)  # bilinear upsample
    t.elem(dh * n)  # GELU
    t.conv(dh, c, s.hw, bn=True)  # proj
    t.elem(c * n)  # residual
    t.param(c)  # ls1
    t.conv_ffn(c, s.hidden, s.hw)


def _trace_down_attn(s: BlockSpec, t: OpTrace) -> None:
    """Conv3x3 s2 + BN, plus attention with local-global stride-2 queries over the full-grid keys."""
    c, heads = s.cin, s.heads
    r2 = s.out_hw
    n, n2 = s.h * s.w, r2[0] * r2[1]
    kh, dh = heads * s.key_dim, heads * s.value_dim
    t.conv(c, c, r2, k=3, groups=c)  # local query conv (bias, no BN)
    t.elem(c * n2, 2)  # subsample, add
    t.conv(c, kh, r2, bn=True)  # query proj
    t.conv(c, kh, s.hw, bn=True)  # k
    t.conv(c, dh, s.hw, bn=True)  # v
    t.param(heads * n)  # attention biases over the input grid
    t.matmul(heads * n2 * n * s.key_dim, heads * n2 * n)
    t.elem(heads * n2 * n, 2)  # bias, softmax
    t.matmul(heads * n2 * n * s.value_dim, dh * n2)
    t.conv(dh, dh, r2, k=3, groups=dh, bn=True)  # v_local (stride 2)
    t.elem(dh * n2, 2)  # add, GELU
    t.conv(dh, s.cout, r2, bn=True)  # proj
    t.conv(c, s.cout, r2, k=3, bn=True)  # the conv branch
    t.elem(s.cout * n2)  # sum of the branches


def _trace_lite_ffn(s: BlockSpec, t: OpTrace) -> None:
    t.lite_mla(s.cin, s.heads, s.value_dim, s.hw)
    t.param(s.cin)  # ls1
    t.conv_ffn(s.cin, s.hidden, s.hw)


def _trace_head(s: BlockSpec, t: OpTrace) -> None:
    """BN, global pool, ``head`` (+ ``head_dist``)."""
    c = s.cin
    t.norm(c)
    t.elem(c * s.h * s.w + c)  # BN, pool
    for _ in range(2 if s.distillation else 1):
        t.linear(c, s.num_classes)


_MODULE = "supernet.blocks:"
_FFN_SHARES = (("mlp.", "ef2.ffn"), ("ls2", "ef2.ffn"))
for _kind in (
    BlockKind("ef2.stem", "EfficientFormerV2 stem: 2x (conv3x3 s2, BN, GELU)", _MODULE + "EfStem", _trace_stem),
    BlockKind("ef2.down", "EfficientFormerV2 downsampling: conv3x3 s2 + BN", _MODULE + "Downsample", _trace_down),
    BlockKind("ef2.down_attn", "EfficientFormerV2 stage-4 downsampling: conv3x3 s2 + BN plus local-global attention",
              _MODULE + "AttnDownsample", _trace_down_attn),
    BlockKind("ef2.ffn", "EfficientFormerV2 FFN block: 1x1, dw3x3, 1x1 with BN and GELU, layer scale",
              _MODULE + "Ef2Block", _trace_ffn),
    BlockKind("ef2.attn_ffn", "EfficientFormerV2 Attention4D + FFN block (attention stride 2 in stage 3)",
              _MODULE + "Ef2Block", _trace_attn_ffn, shares=_FFN_SHARES),
    BlockKind("ef2.lite_ffn", "EfficientFormerV2 block with LiteMLA linear attention in place of Attention4D",
              _MODULE + "Ef2Block", _trace_lite_ffn, shares=_FFN_SHARES,
              slicers=(("token_mixer.proj.conv.weight", "lite_proj"),)),
    BlockKind("ef2.head", "EfficientFormerV2 head: BN, global pool, head + head_dist", _MODULE + "Ef2Head",
              _trace_head),
):
    register_kind(_kind)


# ============================================================================ lowering
def _check(arch: ArchConfig) -> None:
    if len(arch.stages) != 4:
        raise SpaceError(f"{FAMILY} needs 4 stages, got {len(arch.stages)}")
    if arch.stem_stride not in (2, 4):
        raise SpaceError(f"{FAMILY} stem_stride must be 2 or 4, got {arch.stem_stride}")
    if arch.head_widths or arch.head_dim:
        raise SpaceError(f"{FAMILY} has no head_widths/head_dim (those are EfficientViT fields)")


def _stem(arch: ArchConfig, setup: LoweringSetup) -> tuple[tuple[BlockSpec, ...], Carry]:
    w = arch.stages[0].width
    spec = BlockSpec("ef2.stem", setup.in_chans, w, *setup.resolution, stride=arch.stem_stride).at(0)
    return (spec,), Carry(out_hw(out_hw(setup.resolution, 2), arch.stem_stride // 2), w)


def _entry(arch: ArchConfig, si: int, carry: Carry, setup: LoweringSetup) -> tuple[tuple[BlockSpec, ...], Carry]:
    w, label, hw = arch.stages[si].width, si + 1, carry.hw
    if w < 2:
        raise SpaceError(f"stage {label} width must be at least 2, got {w}")
    if si == 3:
        spec = BlockSpec("ef2.down_attn", carry.channels, w, *hw, stride=2, heads=DOWN_HEADS, key_dim=DOWN_KEY_DIM,
                         value_dim=DOWN_KEY_DIM * DOWN_RATIO)
    elif si > 0:
        spec = BlockSpec("ef2.down", carry.channels, w, *hw, stride=2)
    else:
        return (), Carry(hw, w)
    return (spec.at(label),), Carry(spec.out_hw, w)


def _block(arch: ArchConfig, si: int, bi: int, carry: Carry, setup: LoweringSetup) -> tuple[BlockSpec, Carry]:
    w, b, hw = arch.stages[si].width, arch.stages[si].blocks[bi], carry.hw
    hidden = int(w * b.expansion)
    where = f"stage {si + 1} block {bi + 1}"
    if hidden < 1:
        raise SpaceError(f"{where}: expansion {b.expansion} leaves no hidden channels")
    if b.mixer == "ffn":
        spec = BlockSpec("ef2.ffn", w, w, *hw, hidden=hidden)
    elif b.mixer in ATTN_MIXERS and si < 2:
        raise SpaceError(f"{where}: mixer {b.mixer!r} is allowed only in stages 3 and 4")
    elif b.mixer == "attn":
        stride = 2 if si == 2 else 1
        if stride == 2 and (hw[0] % 2 or hw[1] % 2):
            raise SpaceError(
                f"{where}: the stride-2 attention of stage 3 needs an even map, but resolution "
                f"{setup.text} gives {hw[0]}x{hw[1]}; use sides divisible by {arch.stem_stride * 8}"
            )
        spec = BlockSpec("ef2.attn_ffn", w, w, *hw, hidden=hidden, heads=ATTN_HEADS, key_dim=ATTN_KEY_DIM,
                         value_dim=ATTN_KEY_DIM * ATTN_RATIO, attn_stride=stride)
    elif b.mixer == "lite":
        if w < LITE_HEAD_DIM:
            raise SpaceError(f"{where}: the lite mixer needs width >= {LITE_HEAD_DIM}, got {w}")
        spec = BlockSpec("ef2.lite_ffn", w, w, *hw, hidden=hidden, heads=w // LITE_HEAD_DIM, value_dim=LITE_HEAD_DIM)
    else:
        raise SpaceError(f"{where}: mixer {b.mixer!r} is not one of ['ffn', 'attn', 'lite']")
    return spec.at(si + 1, bi), carry


def _head(arch: ArchConfig, carry: Carry, setup: LoweringSetup) -> tuple[BlockSpec, ...]:
    spec = BlockSpec("ef2.head", carry.channels, carry.channels, *carry.hw, num_classes=setup.num_classes,
                     distillation=bool(setup.distillation))
    return (spec.at(len(arch.stages) + 1),)


register_family(Family(FAMILY, distillation=True, check=_check, stem=_stem, entry=_entry, block=_block,
                       head=_head))


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

    Its largest config is about the size of the CPU feasibility probe in docs/design.md ("Measured facts")
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
