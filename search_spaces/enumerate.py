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

from collections.abc import Callable
from typing import Any

from .arch import ArchConfig, BlockConfig, StageConfig
from .lowering import Carry, get_family, resolve_setup
from .setup import LoweringSetup
from .space import SearchSpace, StageChoices
from .specs import BlockSpec

__all__ = ["cheapest", "enumerate_specs", "probe_stages", "probe_count"]


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


def cheapest(space: SearchSpace, setup: LoweringSetup, cost: Callable[[BlockSpec], float]
             ) -> tuple[float, ArchConfig]:
    """The config of ``space`` whose lowered specs have the least total ``cost``, and that total.

    Exact for any cost that adds up over a network's specs (a LUT's calibrated milliseconds, a
    parameter count): a dynamic programme over the stages, in the order :func:`enumerate_specs`
    walks them. Within a stage, a block's spec depends only on the carry before it, the stage's
    width, the block itself and whether it opens the stage (see
    :class:`~search_spaces.lowering.Family`), so the cheapest way to fill a stage is found block
    by block, keeping only the cheapest prefix per carry and attention count (a count above zero
    also says that only attention blocks may follow). The
    first stage's width is tied to the stem's (the stem lowers from it). Every rule of
    :meth:`SearchSpace.why_not` holds for the result: allowed widths, depths and expansions,
    attention blocks last and as many as :meth:`StageChoices.attn_range` allows.

    >>> from search_spaces import count_params, get_space, lower
    >>> space = get_space("efficientformer_v2_demo")
    >>> setup = LoweringSetup(resolution=32, num_classes=10, in_chans=1, distillation=False)
    >>> params, arch = cheapest(space, setup, lambda spec: count_params([spec]))
    >>> params == count_params(lower(arch, setup)) and space.contains(arch)
    True
    """
    family = get_family(space.family)
    base = space.smallest()
    # states between stages: carry -> (cost so far, the config whose stages so far reached it)
    states: dict[Carry, tuple[float, ArchConfig]] = {}
    stage_memo: dict[tuple[Any, ...], Any] = {}
    for w0 in space.stages[0].widths:
        arch = base.replace_stage(0, StageConfig(w0, base.stages[0].blocks))
        family.check(arch)
        specs, carry = family.stem(arch, setup)
        done = _cheapest_stage(family, space, setup, cost, arch, 0, w0, carry, stage_memo)
        for out, (c, stage) in done.items():
            _keep(states, out, sum(cost(s) for s in specs) + c, arch.replace_stage(0, stage))
    for si in range(1, len(space.stages)):
        after: dict[Carry, tuple[float, ArchConfig]] = {}
        for carry, (so_far, arch) in states.items():
            for w in space.stages[si].widths:
                done = _cheapest_stage(family, space, setup, cost, arch, si, w, carry, stage_memo)
                for out, (c, stage) in done.items():
                    _keep(after, out, so_far + c, arch.replace_stage(si, stage))
        states = after
    best: tuple[float, ArchConfig] | None = None
    for carry, (total, arch) in states.items():
        if setup.task == "classify":
            total += sum(cost(s) for s in family.head(arch, carry, setup))
        if best is None or total < best[0]:
            best = (total, arch)
    assert best is not None  # every space has at least one config
    return best


def _keep(table: dict, key: Any, value: float, payload: Any) -> None:
    """``table[key] = (value, payload)`` unless it holds a lower value already."""
    old = table.get(key)
    if old is None or value < old[0]:
        table[key] = (value, payload)


def _cheapest_stage(family: Any, space: SearchSpace, setup: LoweringSetup, cost: Callable[[BlockSpec], float],
                    arch: ArchConfig, si: int, width: int, carry: Carry, memo: dict[tuple[Any, ...], Any]
                    ) -> dict[Carry, tuple[float, StageConfig]]:
    """The cheapest allowed stage ``si`` of ``width`` from ``carry``, per carry it hands on: ``{out: (cost, stage)}``."""
    probe = arch.replace_stage(si, StageConfig(width, arch.stages[si].blocks))
    entry, after_entry = family.entry(probe, si, carry, setup)
    start = sum(cost(s) for s in entry)
    key = (si, width, after_entry)  # the blocks depend on the carry into the stage only through the entry's
    if key not in memo:
        memo[key] = _cheapest_blocks(family, space.stages[si], setup, cost, probe, si, width, after_entry)
    return {out: (start + c, stage) for out, (c, stage) in memo[key].items()}


def _cheapest_blocks(family: Any, ch: StageChoices, setup: LoweringSetup, cost: Callable[[BlockSpec], float],
                     arch: ArchConfig, si: int, width: int, carry: Carry) -> dict[Carry, tuple[float, StageConfig]]:
    """The cheapest allowed blocks of stage ``si`` after its entry, per carry they hand on."""
    plain = [BlockConfig(ch.plain_mixer, e) for e in ch.expansions]
    attn = [BlockConfig(m, e) for m in ch.attn_mixers for e in ch.expansions]
    # prefixes of blocks: (carry, attention blocks so far) -> (cost, blocks); once an attention block is
    # placed only attention blocks may follow, which the count says (attention blocks are the last ones)
    layer: dict[tuple[Carry, int], tuple[float, tuple[BlockConfig, ...]]] = {(carry, 0): (0.0, ())}
    ends: dict[Carry, tuple[float, StageConfig]] = {}
    for depth in range(ch.depths[-1] + 1):
        if depth in ch.depths:
            for (out, n_attn), (c, blocks) in layer.items():
                if n_attn in ch.attn_range(depth):
                    _keep(ends, out, c, StageConfig(width, blocks))
        if depth == ch.depths[-1]:
            break
        grown: dict[tuple[Carry, int], tuple[float, tuple[BlockConfig, ...]]] = {}
        for (before, n_attn), (c, blocks) in layer.items():
            options = ([] if n_attn else plain) + (attn if n_attn < ch.max_attn else [])
            for b in options:
                stage = StageConfig(width, (*blocks, b))
                spec, out = family.block(arch.replace_stage(si, stage), si, depth, before, setup)
                _keep(grown, (out, n_attn + (b.mixer != ch.plain_mixer)), c + cost(spec), stage.blocks)
        layer = grown
    return ends
