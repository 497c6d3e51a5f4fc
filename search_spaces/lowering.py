"""Positioned lowering: an architecture plus a setup becomes block specs that know where they sit.

Each family registers a :class:`Family`: how its stem, each stage and its head lower. A stage
lowers from what the previous stage hands on (a :class:`Carry`: map size, channels, whether
the data are tokens) and the stage's own config, nothing else; so tools can lower, cache and
reason per stage (the latency predictor caches stage sums, enumeration probes stages).

Every spec comes out placed: ``spec.stage`` is 0 for the stem, 1..n for the body stages and
n + 1 for the head, and ``spec.slot`` is the index of the architecture's block it realises
(-1 for the stage's entry unit: stem conv, downsampling, head). See :mod:`search_spaces.specs`.

>>> from search_spaces import get_preset
>>> specs = lower(get_preset("efficientformerv2_s0"))
>>> [s.stage for s in specs][:6], specs[-1].stage
([0, 1, 1, 2, 2, 2], 5)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .arch import ArchConfig
from .errors import NasUserError, SpaceError
from .setup import LoweringSetup
from .specs import BlockSpec

__all__ = ["Carry", "Family", "register_family", "get_family", "list_families", "family_defaults", "lower",
           "resolve_setup"]


@dataclass(frozen=True)
class Carry:
    """What one stage hands the next: map ``(height, width)``, channels, and token layout."""

    hw: tuple[int, int]
    channels: int
    tokens: bool = False


StemFn = Callable[[ArchConfig, LoweringSetup], tuple[tuple[BlockSpec, ...], Carry]]
EntryFn = Callable[[ArchConfig, int, Carry, LoweringSetup], tuple[tuple[BlockSpec, ...], Carry]]
BlockFn = Callable[[ArchConfig, int, int, Carry, LoweringSetup], tuple[BlockSpec, Carry]]
HeadFn = Callable[[ArchConfig, Carry, LoweringSetup], tuple[BlockSpec, ...]]


@dataclass(frozen=True)
class Family:
    """How one architecture family lowers.

    Each function reads only what its arguments name, so that tools may lower and cache
    piece by piece: ``stem`` reads the family-wide fields (``stem_stride``, ``head_widths``,
    ``head_dim``) and ``arch.stages[0].width``; ``entry`` those fields and
    ``arch.stages[i].width``; ``block`` those fields, ``arch.stages[i].width`` and
    ``arch.stages[i].blocks[j]``, and ``j`` itself only through whether the block opens its
    stage (``j == 0``; ``j`` also sets the spec's ``slot``, which is not part of its identity);
    ``head`` the family-wide fields. Everything else a unit depends on travels in the
    :class:`Carry`.

    Args:
        name: the family name (``ArchConfig.family``).
        distillation: whether its classifier has ``head_dist`` by default.
        check: raises :class:`SpaceError` for configs the family cannot take at all (stage
            count, stem stride, head fields, empty stages where a stage needs blocks).
        stem: lowers the stem, returning its specs and the carry into stage 0.
        entry: lowers the entry units of ``arch.stages[i]`` (downsampling; may be none) from
            the carry into the stage.
        block: lowers block ``j`` of ``arch.stages[i]`` from the carry before it.
        head: lowers the classifier head from the last carry (``classify`` task only).
        first_stage: the position label of ``arch.stages[0]``: 1 when the stem is a separate
            unit (EfficientFormer), 0 when the first stage belongs to the stem (EfficientViT).
    """

    name: str
    distillation: bool
    check: Callable[[ArchConfig], None]
    stem: StemFn
    entry: EntryFn
    block: BlockFn
    head: HeadFn
    first_stage: int = 1

    def stage(self, arch: ArchConfig, index: int, carry: Carry, setup: LoweringSetup
              ) -> tuple[tuple[BlockSpec, ...], Carry]:
        """Lower ``arch.stages[index]`` (entry units, then every block) from ``carry``."""
        specs, carry = self.entry(arch, index, carry, setup)
        out = list(specs)
        for j in range(len(arch.stages[index].blocks)):
            spec, carry = self.block(arch, index, j, carry, setup)
            out.append(spec)
        return tuple(out), carry

    def label(self, index: int) -> int:
        """Position label of ``arch.stages[index]``."""
        return index + self.first_stage

    def head_label(self, arch: ArchConfig) -> int:
        return len(arch.stages) + self.first_stage


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise SpaceError(f"unknown family {name!r}; known families: {', '.join(list_families())}")
    return _FAMILIES[name]


def family_defaults(family: str) -> bool:
    """Whether the family's models carry a distillation head by default."""
    return get_family(family).distillation


def resolve_setup(family: Family, setup: LoweringSetup | None = None, **keywords: object) -> LoweringSetup:
    """``setup`` (or one built from keywords), with the family's distillation default filled in."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if setup is not None:
        if given:
            raise TypeError(f"give either a LoweringSetup or its fields as keywords, not both (got {sorted(given)})")
        if not isinstance(setup, LoweringSetup):
            raise TypeError(f"`setup` must be a LoweringSetup, got {type(setup).__name__}")
    else:
        try:
            setup = LoweringSetup(**given)  # type: ignore[arg-type]
        except NasUserError as exc:
            raise SpaceError(str(exc)) from None
    if setup.distillation is None:
        setup = setup.replace(distillation=family.distillation)
    return setup


def lower(
    arch: ArchConfig,
    setup: LoweringSetup | None = None,
    *,
    resolution: int | str | tuple[int, int] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    distillation: bool | None = None,
    task: str | None = None,
) -> tuple[BlockSpec, ...]:
    """Lower a config to its placed block specs, in forward order (stem first, head last).

    Args:
        arch: the architecture.
        setup: the lowering setup (input size, classes, input channels, distillation head,
            task); or give its fields as keywords (defaults: 224, 1000 classes, 3 channels,
            the family's distillation default, ``classify``), not both.
        resolution: input side in pixels, ``"HxW"`` or ``(height, width)``.
        num_classes: classifier outputs.
        in_chans: input channels (3 for RGB, 1 for Fashion-MNIST).
        distillation: add ``head_dist``; ``None`` takes the family default
            (EfficientFormer V1/V2: yes, EfficientViT: no).
        task: ``classify`` (ends with the head) or ``backbone`` (ends with the last stage).

    Raises:
        SpaceError: the config is not valid for its family at this input size.
    """
    family = get_family(arch.family) if isinstance(arch, ArchConfig) else None
    if family is None:
        raise TypeError(f"`arch` must be an ArchConfig, got {type(arch).__name__}")
    setup = resolve_setup(family, setup, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                          distillation=distillation, task=task)
    family.check(arch)
    specs, carry = family.stem(arch, setup)
    out = list(specs)
    for index in range(len(arch.stages)):
        specs, carry = family.stage(arch, index, carry, setup)
        out += specs
    if setup.task == "classify":
        out += family.head(arch, carry, setup)
    return tuple(out)
