"""EfficientViT (MIT, classification B series): variant tables, lowering, search space and presets.

Five stages: an input conv plus ``depth[0]`` residual DSConv blocks (stage "0"), two stages of
MBConv blocks whose first block has stride 2, and two stages that open with a stride-2
fewer-norm MBConv followed by EfficientViT blocks (LiteMLA + MBConv). Hardswish throughout.
"""
from __future__ import annotations

from .arch import ArchConfig, BlockConfig, StageConfig
from .errors import SpaceError
from .registry import register_family, register_preset, register_space
from .space import SearchSpace, StageChoices
from .specs import BlockSpec, ceil_div

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


@register_family(FAMILY, distillation=False)
def lower_efficientvit(
    arch: ArchConfig, *, resolution: int, num_classes: int, in_chans: int, distillation: bool
) -> tuple[BlockSpec, ...]:
    if len(arch.stages) != 5:
        raise SpaceError(f"{FAMILY} needs 5 stages (stem + 4), got {len(arch.stages)}")
    if arch.stem_stride not in (1, 2):
        raise SpaceError(f"{FAMILY} stem_stride must be 1 or 2, got {arch.stem_stride}")
    if len(arch.head_widths) != 2 or arch.head_dim <= 0:
        raise SpaceError(f"{FAMILY} needs head_widths (w0, w1) and head_dim > 0, got "
                         f"{list(arch.head_widths)} and {arch.head_dim}")
    if distillation:
        raise SpaceError(f"{FAMILY} has no distillation head")
    w0 = arch.stages[0].width
    specs = [BlockSpec("evit.stem", in_chans, w0, resolution, stride=arch.stem_stride)]
    size = ceil_div(resolution, arch.stem_stride)
    for bi, b in enumerate(arch.stages[0].blocks):
        if b.mixer != "conv" or b.expansion != 1:
            raise SpaceError(f"stage 1 block {bi + 1}: stem blocks are DSConv ('conv', expansion 1), "
                             f"got {b.mixer!r} with expansion {b.expansion}")
        specs.append(BlockSpec("evit.dsconv", w0, w0, size))
    prev = w0
    for si in range(1, 5):
        st = arch.stages[si]
        w = st.width
        if si <= 2:
            if not st.blocks:
                raise SpaceError(f"stage {si + 1} needs at least one block (its first block downsamples)")
            for bi, b in enumerate(st.blocks):
                if b.mixer != "conv":
                    raise SpaceError(f"stage {si + 1} block {bi + 1}: mixer must be 'conv', got {b.mixer!r}")
                cin = prev if bi == 0 else w
                specs.append(BlockSpec("evit.mbconv", cin, w, size, stride=2 if bi == 0 else 1,
                                       hidden=round(cin * b.expansion)))
                if bi == 0:
                    size = ceil_div(size, 2)
        else:
            if w < arch.head_dim:
                raise SpaceError(f"stage {si + 1} width {w} is smaller than head_dim {arch.head_dim}")
            specs.append(BlockSpec("evit.down_fn", prev, w, size, stride=2, hidden=round(prev * EXPAND)))
            size = ceil_div(size, 2)
            for bi, b in enumerate(st.blocks):
                if b.mixer != "lite":
                    raise SpaceError(f"stage {si + 1} block {bi + 1}: mixer must be 'lite', got {b.mixer!r}")
                specs.append(BlockSpec("evit.block", w, w, size, hidden=round(w * b.expansion),
                                       heads=w // arch.head_dim, value_dim=arch.head_dim))
        prev = w
    specs.append(BlockSpec("evit.head", prev, num_classes, size, num_classes=num_classes,
                           head_hidden=arch.head_widths))
    return tuple(specs)


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
