"""EfficientViT (MIT, classification B series): variant tables, lowering, search space and presets.

Five stages: an input conv plus ``depth[0]`` residual DSConv blocks (stage "0"), two stages of
MBConv blocks whose first block has stride 2, and two stages that open with a stride-2
fewer-norm MBConv followed by EfficientViT blocks (LiteMLA + MBConv). Hardswish throughout.
"""
from __future__ import annotations

from .arch import ArchConfig, BlockConfig, StageConfig
from .errors import SpaceError
from .kinds import BlockKind, register_kind
from .lowering import Carry, Family, register_family
from .ops import OpTrace
from .registry import register_preset, register_space
from .setup import LoweringSetup
from .space import SearchSpace, StageChoices
from .specs import BlockSpec

FAMILY = "efficientvit"

WIDTHS = {
    "b0": (8, 16, 32, 64, 128),
    "b1": (16, 32, 64, 128, 256),
    "b2": (24, 48, 96, 192, 384),
    "b3": (32, 64, 128, 256, 512),
}
DEPTHS = {
    "b0": (1, 2, 2, 2, 2),
    "b1": (1, 2, 3, 3, 4),
    "b2": (1, 3, 4, 4, 6),
    "b3": (1, 4, 6, 6, 9),
}
HEAD_DIM = {"b0": 16, "b1": 16, "b2": 32, "b3": 32}
HEAD_WIDTHS = {"b0": (1024, 1280), "b1": (1536, 1600), "b2": (2304, 2560), "b3": (2304, 2560)}
EXPAND = 4  # expansion of every MBConv in the presets, and of the stage-3/4 entry MBConv


# ============================================================================ block kinds
def _trace_stem(s: BlockSpec, t: OpTrace) -> None:
    hw = s.out_hw
    t.conv(s.cin, s.cout, hw, k=3, bias=False, bn=True)
    t.elem(s.cout * hw[0] * hw[1])  # Hardswish


def _trace_dsconv(s: BlockSpec, t: OpTrace) -> None:
    c, n = s.cin, s.h * s.w
    t.conv(c, c, s.hw, k=3, groups=c, bias=False, bn=True)
    t.elem(c * n)  # Hardswish
    t.conv(c, s.cout, s.hw, bias=False, bn=True)
    t.elem(s.cout * n)  # residual


def _trace_mbconv(s: BlockSpec, t: OpTrace) -> None:
    t.mbconv(s.cin, s.cout, s.hidden, s.hw, s.stride, fewer_norm=False)


def _trace_down_fn(s: BlockSpec, t: OpTrace) -> None:
    t.mbconv(s.cin, s.cout, s.hidden, s.hw, s.stride, fewer_norm=True)


def _trace_block(s: BlockSpec, t: OpTrace) -> None:
    t.lite_mla(s.cin, s.heads, s.value_dim, s.hw)
    t.mbconv(s.cin, s.cin, s.hidden, s.hw, 1, fewer_norm=True)


def _trace_head(s: BlockSpec, t: OpTrace) -> None:
    """1x1 conv + BN + Hardswish, pool, Linear (no bias), LN, Hardswish, Linear."""
    w0, w1 = s.head_hidden
    t.conv(s.cin, w0, s.hw, bias=False, bn=True)
    t.elem(w0 * s.h * s.w + w0)  # Hardswish, pool
    t.linear(w0, w1, bias=False)
    t.norm(w1, w1)  # LN
    t.elem(w1)  # Hardswish
    t.linear(w1, s.num_classes)


_MODULE = "supernet.blocks:"
for _kind in (
    BlockKind("evit.stem", "EfficientViT input conv: conv3x3 s2 (no bias), BN, Hardswish", _MODULE + "EvitStem",
              _trace_stem),
    BlockKind("evit.dsconv", "EfficientViT residual DSConv: dw3x3, BN, Hardswish, 1x1, BN", _MODULE + "DSConv",
              _trace_dsconv),
    BlockKind("evit.mbconv", "EfficientViT MBConv: 1x1, dw3x3, 1x1, BN after each (residual when shapes allow)",
              _MODULE + "build_mbconv", _trace_mbconv),
    BlockKind("evit.down_fn", "EfficientViT stride-2 MBConv with fewer norms (stages 3-4 entry)",
              _MODULE + "build_mbconv", _trace_down_fn),
    BlockKind("evit.block", "EfficientViT block: LiteMLA + fewer-norm MBConv, both residual", _MODULE + "EvitBlock",
              _trace_block),
    BlockKind("evit.head", "EfficientViT head: 1x1 conv, BN, Hardswish, pool, Linear, LN, Hardswish, Linear",
              _MODULE + "EvitHead", _trace_head),
):
    register_kind(_kind)


# ============================================================================ lowering
def _check(arch: ArchConfig) -> None:
    if len(arch.stages) != 5:
        raise SpaceError(f"{FAMILY} needs 5 stages (stem + 4), got {len(arch.stages)}")
    if arch.stem_stride not in (1, 2):
        raise SpaceError(f"{FAMILY} stem_stride must be 1 or 2, got {arch.stem_stride}")
    if len(arch.head_widths) != 2 or arch.head_dim <= 0:
        raise SpaceError(f"{FAMILY} needs head_widths (w0, w1) and head_dim > 0, got "
                         f"{list(arch.head_widths)} and {arch.head_dim}")
    for si in (1, 2):
        if not arch.stages[si].blocks:
            raise SpaceError(f"stage {si + 1} needs at least one block (its first block downsamples)")


def _stem(arch: ArchConfig, setup: LoweringSetup) -> tuple[tuple[BlockSpec, ...], Carry]:
    w0 = arch.stages[0].width
    spec = BlockSpec("evit.stem", setup.in_chans, w0, *setup.resolution, stride=arch.stem_stride).at(0)
    return (spec,), Carry(spec.out_hw, w0)


def _entry(arch: ArchConfig, si: int, carry: Carry, setup: LoweringSetup) -> tuple[tuple[BlockSpec, ...], Carry]:
    w = arch.stages[si].width
    if si <= 2:  # the stem's DSConv stage has no entry; in stages 2-3 the first MBConv downsamples
        return (), carry
    if w < arch.head_dim:
        raise SpaceError(f"stage {si + 1} width {w} is smaller than head_dim {arch.head_dim}")
    spec = BlockSpec("evit.down_fn", carry.channels, w, *carry.hw, stride=2, hidden=round(carry.channels * EXPAND))
    return (spec.at(si),), Carry(spec.out_hw, w)


def _block(arch: ArchConfig, si: int, bi: int, carry: Carry, setup: LoweringSetup) -> tuple[BlockSpec, Carry]:
    w, b, hw = arch.stages[si].width, arch.stages[si].blocks[bi], carry.hw
    if si == 0:
        if b.mixer != "conv" or b.expansion != 1:
            raise SpaceError(f"stage 1 block {bi + 1}: stem blocks are DSConv ('conv', expansion 1), "
                             f"got {b.mixer!r} with expansion {b.expansion}")
        spec = BlockSpec("evit.dsconv", w, w, *hw)
    elif si <= 2:
        if b.mixer != "conv":
            raise SpaceError(f"stage {si + 1} block {bi + 1}: mixer must be 'conv', got {b.mixer!r}")
        cin = carry.channels  # the previous stage's width before the first block, then this stage's
        spec = BlockSpec("evit.mbconv", cin, w, *hw, stride=2 if bi == 0 else 1, hidden=round(cin * b.expansion))
    else:
        if b.mixer != "lite":
            raise SpaceError(f"stage {si + 1} block {bi + 1}: mixer must be 'lite', got {b.mixer!r}")
        spec = BlockSpec("evit.block", w, w, *hw, hidden=round(w * b.expansion), heads=w // arch.head_dim,
                         value_dim=arch.head_dim)
    return spec.at(si, bi), Carry(spec.out_hw, w)


def _head(arch: ArchConfig, carry: Carry, setup: LoweringSetup) -> tuple[BlockSpec, ...]:
    if setup.distillation:
        raise SpaceError(f"{FAMILY} has no distillation head")
    spec = BlockSpec("evit.head", carry.channels, setup.num_classes, *carry.hw, num_classes=setup.num_classes,
                     head_hidden=arch.head_widths)
    return (spec.at(len(arch.stages)),)


register_family(Family(FAMILY, distillation=False, check=_check, stem=_stem, entry=_entry, block=_block,
                       head=_head, first_stage=0))


def _preset(variant: str) -> ArchConfig:
    widths, depths = WIDTHS[variant], DEPTHS[variant]
    stages = [StageConfig(widths[0], (BlockConfig("conv", 1),) * depths[0])]
    for si in range(1, 5):
        mixer = "conv" if si <= 2 else "lite"
        stages.append(StageConfig(widths[si], (BlockConfig(mixer, EXPAND),) * depths[si]))
    return ArchConfig(FAMILY, tuple(stages), stem_stride=2, head_widths=HEAD_WIDTHS[variant],
                      head_dim=HEAD_DIM[variant])


@register_space
def efficientvit_space() -> SearchSpace:
    """An EfficientViT space around B1 (head dim 16, head 1536x1600): contains B1."""
    e = (2, 3, 4)
    return SearchSpace("efficientvit", FAMILY, (
        StageChoices((8, 16, 24), (1, 2), (1,), "conv"),
        StageChoices((16, 24, 32), (1, 2, 3), e, "conv"),
        StageChoices((32, 48, 64), (1, 2, 3, 4), e, "conv"),
        StageChoices((64, 96, 128), (1, 2, 3, 4), e, "lite"),
        StageChoices((128, 192, 256), (1, 2, 3, 4, 5), e, "lite"),
    ), stem_stride=2, head_widths=HEAD_WIDTHS["b1"], head_dim=HEAD_DIM["b1"])


@register_preset
def efficientvit_b0() -> ArchConfig:
    return _preset("b0")


@register_preset
def efficientvit_b1() -> ArchConfig:
    return _preset("b1")


@register_preset
def efficientvit_b2() -> ArchConfig:
    return _preset("b2")


@register_preset
def efficientvit_b3() -> ArchConfig:
    return _preset("b3")
