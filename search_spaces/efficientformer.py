"""EfficientFormer V1 (Li et al., 2022): variant tables, lowering, search space and presets.

A ReLU stem of stride 4, four stages of Meta4D blocks (pool mixer + conv MLP) with
stride-2 conv downsampling, and the last ``vit_num`` blocks of stage 4 as Meta3D blocks
(LayerNorm + multi-head self-attention on tokens).
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


# ============================================================================ block kinds
def _trace_down(s: BlockSpec, t: OpTrace) -> None:
    t.conv(s.cin, s.cout, s.out_hw, k=3, bn=True)


def _trace_stem(s: BlockSpec, t: OpTrace) -> None:
    """Two conv3x3 + BN + ReLU, stride 2 each (the second stride 1 for a stem of stride 2)."""
    half = s.cout // 2
    hw1 = out_hw(s.hw, 2)
    hw2 = out_hw(hw1, 2 if s.stride == 4 else 1)
    t.conv(s.cin, half, hw1, k=3, bn=True)
    t.elem(half * hw1[0] * hw1[1])
    t.conv(half, s.cout, hw2, k=3, bn=True)
    t.elem(s.cout * hw2[0] * hw2[1])


def _trace_meta4d(s: BlockSpec, t: OpTrace) -> None:
    """``x + ls1 * (pool(x) - x)``, then ``x + ls2 * MLP(x)`` with a 1x1 conv MLP."""
    c, h, n = s.cin, s.hidden, s.h * s.w
    t.param(c)  # ls1
    t.elem(c * n, 3)  # pool, subtract, layer scale + residual
    t.conv(c, h, s.hw, bn=True)
    t.elem(h * n)  # GELU
    t.conv(h, c, s.hw, bn=True)
    t.elem(c * n)  # layer scale + residual
    t.param(c)  # ls2


def _trace_meta3d(s: BlockSpec, t: OpTrace) -> None:
    """LN + multi-head self-attention with learned relative biases, LN + linear MLP, layer scales."""
    c, h, n, heads = s.cin, s.hidden, s.h * s.w, s.heads
    qkv = heads * (2 * s.key_dim + s.value_dim)
    hv = heads * s.value_dim
    t.norm(c, c * n)  # norm1
    t.linear(c, qkv, tokens=n)
    t.param(heads * n)  # attention biases
    t.matmul(heads * n * n * s.key_dim, heads * n * n)
    t.elem(heads * n * n, 2)  # bias add, softmax
    t.matmul(heads * n * n * s.value_dim, hv * n)
    t.linear(hv, c, tokens=n)  # proj
    t.param(c)  # ls1
    t.elem(c * n)  # residual
    t.norm(c, c * n)  # norm2
    t.linear(c, h, tokens=n)
    t.elem(h * n)  # GELU
    t.linear(h, c, tokens=n)
    t.elem(c * n)  # layer scale + residual
    t.param(c)  # ls2


def _trace_head(s: BlockSpec, t: OpTrace) -> None:
    """LN, mean over tokens, ``head`` (+ ``head_dist``)."""
    c = s.cin
    t.norm(c)
    t.elem(c * s.h * s.w + c)  # LN, mean
    for _ in range(2 if s.distillation else 1):
        t.linear(c, s.num_classes)


_MODULE = "supernet.blocks:"
for _kind in (
    BlockKind("ef1.stem", "EfficientFormer stem: 2x (conv3x3 s2, BN, ReLU)", _MODULE + "EfStem", _trace_stem),
    BlockKind("ef1.down", "EfficientFormer downsampling: conv3x3 s2 + BN", _MODULE + "Downsample", _trace_down),
    BlockKind("ef1.meta4d", "EfficientFormer Meta4D: pool mixer + conv MLP, layer scales", _MODULE + "Meta4D",
              _trace_meta4d),
    BlockKind("ef1.meta3d", "EfficientFormer Meta3D: LN + MHSA (8 heads, kd 32, vd 128) + LN + MLP, layer scales",
              _MODULE + "Meta3D", _trace_meta3d),
    BlockKind("ef1.head", "EfficientFormer head: LN, token mean, head + head_dist", _MODULE + "Ef1Head", _trace_head),
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
    spec = BlockSpec("ef1.stem", setup.in_chans, w, *setup.resolution, stride=arch.stem_stride).at(0)
    return (spec,), Carry(out_hw(out_hw(setup.resolution, 2), arch.stem_stride // 2), w)


def _entry(arch: ArchConfig, si: int, carry: Carry, setup: LoweringSetup) -> tuple[tuple[BlockSpec, ...], Carry]:
    w, hw = arch.stages[si].width, carry.hw
    if w < 2:
        raise SpaceError(f"stage {si + 1} width must be at least 2, got {w}")
    if si == 0:
        return (), Carry(hw, w, carry.tokens)
    spec = BlockSpec("ef1.down", carry.channels, w, *hw, stride=2)
    return (spec.at(si + 1),), Carry(spec.out_hw, w, carry.tokens)


def _block(arch: ArchConfig, si: int, bi: int, carry: Carry, setup: LoweringSetup) -> tuple[BlockSpec, Carry]:
    w, b, hw, tokens = arch.stages[si].width, arch.stages[si].blocks[bi], carry.hw, carry.tokens
    hidden = int(w * b.expansion)
    where = f"stage {si + 1} block {bi + 1}"
    if hidden < 1:
        raise SpaceError(f"{where}: expansion {b.expansion} leaves no hidden channels")
    if b.mixer == "pool":
        if tokens:
            raise SpaceError(f"{where}: a 'pool' block cannot follow an 'attn' block (Meta3D blocks come last)")
        spec = BlockSpec("ef1.meta4d", w, w, *hw, hidden=hidden)
    elif b.mixer == "attn":
        if si != 3:
            raise SpaceError(f"{where}: 'attn' (Meta3D) blocks are allowed only in stage 4")
        spec = BlockSpec("ef1.meta3d", w, w, *hw, hidden=hidden, heads=ATTN_HEADS, key_dim=ATTN_KEY_DIM,
                         value_dim=ATTN_KEY_DIM * ATTN_RATIO, tokens_in=tokens)
        carry = Carry(hw, w, True)
    else:
        raise SpaceError(f"{where}: mixer {b.mixer!r} is not one of ['pool', 'attn']")
    return spec.at(si + 1, bi), carry


def _head(arch: ArchConfig, carry: Carry, setup: LoweringSetup) -> tuple[BlockSpec, ...]:
    spec = BlockSpec("ef1.head", carry.channels, carry.channels, *carry.hw, tokens_in=carry.tokens,
                     num_classes=setup.num_classes, distillation=bool(setup.distillation))
    return (spec.at(len(arch.stages) + 1),)


register_family(Family(FAMILY, distillation=True, check=_check, stem=_stem, entry=_entry, block=_block,
                       head=_head))


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
