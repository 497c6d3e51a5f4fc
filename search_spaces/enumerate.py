"""Every distinct block spec a search space can produce at one resolution (the LUT's keys).

A block's spec depends only on local choices: the widths before and at its stage, its own
mixer and expansion, and (for EfficientFormer V1) whether tokens were already flattened, for
EfficientViT whether it opens its stage. So instead of enumerating whole configs (far too many),
we lower small *probe* configs: for each stage and each pair of (previous width, width), one
config whose stage holds a block of every mixer and expansion, and whose other stages are the
smallest. The union of their specs is exactly the set the space can produce.

>>> from search_spaces import get_space
>>> specs = enumerate_specs(get_space("efficientformer_v2_demo"), resolution=32, num_classes=10, in_chans=1)
>>> len(specs) > 50, all(s.size > 0 for s in specs)
(True, True)
"""
from __future__ import annotations

from .arch import ArchConfig, BlockConfig, StageConfig
from .registry import lower
from .space import SearchSpace
from .specs import BlockSpec

__all__ = ["enumerate_specs", "probe_archs"]


def probe_archs(space: SearchSpace) -> list[ArchConfig]:
    """Configs whose lowerings together cover every spec of ``space`` (they need not be in the space)."""
    smallest = space.smallest()
    probes: list[ArchConfig] = []
    for si, ch in enumerate(space.stages):
        prev_widths = space.stages[si - 1].widths if si > 0 else (None,)
        attn_e = [BlockConfig(m, e) for m in ch.attn_mixers for e in ch.expansions]
        for prev in prev_widths:
            for w in ch.widths:
                for first_e in ch.expansions:
                    # The opening block takes every expansion; then every plain expansion, then every
                    # attention mixer x expansion twice (V1: a first Meta3D flattens, later ones take tokens).
                    blocks = [BlockConfig(ch.plain_mixer, first_e)]
                    blocks += [BlockConfig(ch.plain_mixer, e) for e in ch.expansions]
                    blocks += attn_e + attn_e
                    variants = [blocks]
                    if ch.attn_mixers:
                        opening = BlockConfig(ch.plain_mixer, first_e)
                        variants.append([opening])  # the stage ends without attention
                        variants += [[opening, a] for a in attn_e]  # each as the stage's first attention block
                    for bl in variants:
                        stages = list(smallest.stages)
                        if prev is not None:
                            stages[si - 1] = StageConfig(prev, stages[si - 1].blocks)
                        stages[si] = StageConfig(w, tuple(bl))
                        probes.append(ArchConfig(space.family, tuple(stages), space.stem_stride,
                                                 space.head_widths, space.head_dim))
    return probes


def enumerate_specs(
    space: SearchSpace,
    *,
    resolution: int,
    num_classes: int = 1000,
    in_chans: int = 3,
    distillation: bool | None = None,
) -> list[BlockSpec]:
    """All distinct block specs of ``space`` at ``resolution``, sorted by key.

    Raises:
        SpaceError: the space cannot be lowered at this resolution (e.g. an odd stage-3 map
            under V2's stride-2 attention).
    """
    seen: dict[str, BlockSpec] = {}
    for arch in probe_archs(space):
        for spec in lower(arch, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                          distillation=distillation):
            seen.setdefault(spec.key, spec)
    return [seen[k] for k in sorted(seen)]
