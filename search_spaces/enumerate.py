"""Every distinct block spec a search space can produce at one setup (the LUT's keys).

Lowering is positioned and per stage (:mod:`search_spaces.lowering`): a stage's specs depend
only on what the previous stage hands on (a :class:`~search_spaces.lowering.Carry`: map size,
channels, token layout), the architecture's family-wide constants, and the stage's own
config. So we walk the stages in order with the set of carries that can reach each one, and
lower each stage from each of those carries with a few *probe* stage configs: for every width,
one whose blocks take every plain expansion and every attention mixer and expansion twice
(a first and a later attention block), and short ones whose opening block takes each
expansion, alone or followed by one attention block. Their union is exactly the set of specs
the space can produce; no whole configs are enumerated.

>>> from search_spaces import get_space
>>> specs = enumerate_specs(get_space("efficientformer_v2_demo"), resolution=32, num_classes=10, in_chans=1)
>>> len(specs) > 50, all(s.h > 0 for s in specs)
(True, True)
"""
from __future__ import annotations

from .arch import ArchConfig, BlockConfig, StageConfig
from .lowering import Carry, get_family, resolve_setup
from .setup import LoweringSetup
from .space import SearchSpace, StageChoices
from .specs import BlockSpec

__all__ = ["enumerate_specs", "probe_stages", "probe_count"]


def probe_stages(ch: StageChoices, width: int) -> list[StageConfig]:
    """Stage configs of ``width`` whose blocks together show every block a stage of ``ch`` can hold.

    They need not be in the space (their depths may not be allowed); lowering does not care.
    """
    plain = [BlockConfig(ch.plain_mixer, e) for e in ch.expansions]
    attn = [BlockConfig(m, e) for m in ch.attn_mixers for e in ch.expansions]
    stages = [StageConfig(width, tuple([opening] + plain + attn + attn)) for opening in plain]
    for opening in plain:
        stages.append(StageConfig(width, (opening,)))  # the stage ends without attention
        stages += [StageConfig(width, (opening, a)) for a in attn]  # each as the stage's first attention block
    return stages


def probe_count(space: SearchSpace) -> int:
    """About how many stage lowerings :func:`enumerate_specs` does for ``space`` (a measure of its size)."""
    total, carries = 0, len(space.stages[0].widths)
    for ch in space.stages:
        n_exp, n_attn = len(ch.expansions), len(ch.attn_mixers) * len(ch.expansions)
        total += carries * len(ch.widths) * n_exp * (2 + n_attn)
        carries = len(ch.widths) * (2 if ch.attn_mixers else 1)
    return total


def enumerate_specs(
    space: SearchSpace,
    setup: LoweringSetup | None = None,
    *,
    resolution: int | str | tuple[int, int] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    distillation: bool | None = None,
    task: str | None = None,
) -> list[BlockSpec]:
    """All distinct block specs of ``space`` at ``setup`` (or its fields as keywords), sorted by key.

    Raises:
        SpaceError: the space cannot be lowered at this input size (e.g. an odd stage-3 map
            under V2's stride-2 attention).
    """
    family = get_family(space.family)
    setup = resolve_setup(family, setup, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                          distillation=distillation, task=task)
    smallest = space.smallest()
    seen: dict[str, BlockSpec] = {}

    def keep(specs: tuple[BlockSpec, ...]) -> None:
        for spec in specs:
            seen.setdefault(spec.key, spec)

    carries: dict[Carry, ArchConfig] = {}
    for w in space.stages[0].widths:
        arch = smallest.replace_stage(0, StageConfig(w, smallest.stages[0].blocks))
        family.check(arch)
        specs, carry = family.stem(arch, setup)
        keep(specs)
        carries.setdefault(carry, arch)
    for si, ch in enumerate(space.stages):
        after: dict[Carry, ArchConfig] = {}
        for carry, base in carries.items():
            for w in ch.widths:
                for stage in probe_stages(ch, w):
                    arch = base.replace_stage(si, stage)
                    specs, out = family.stage(arch, si, carry, setup)
                    keep(specs)
                    after.setdefault(out, arch)
        carries = after
    if setup.task == "classify":
        for carry, arch in carries.items():
            keep(family.head(arch, carry, setup))
    return [seen[k] for k in sorted(seen)]
