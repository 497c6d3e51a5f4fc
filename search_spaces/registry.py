"""Registries of families (lowering functions), named search spaces and presets.

>>> from search_spaces import get_preset, list_presets
>>> get_preset("efficientformer_l1").widths
(48, 96, 224, 448)
>>> get_preset("nope")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
SpaceError: unknown preset 'nope'; known presets: ...
"""
from __future__ import annotations

from typing import Callable, Protocol

from .arch import ArchConfig
from .errors import NasUserError, SpaceError
from .setup import LoweringSetup
from .space import SearchSpace
from .specs import BlockSpec

__all__ = [
    "register_family", "register_space", "register_preset",
    "get_space", "get_preset", "list_spaces", "list_presets", "list_families",
    "lower", "family_defaults", "PUBLISHED_PARAMS",
]


class LowerFn(Protocol):
    def __call__(
        self, arch: ArchConfig, *, resolution: int, num_classes: int, in_chans: int, distillation: bool
    ) -> tuple[BlockSpec, ...]: ...


_FAMILIES: dict[str, tuple[LowerFn, bool]] = {}
_SPACES: dict[str, Callable[[], SearchSpace]] = {}
_PRESETS: dict[str, Callable[[], ArchConfig]] = {}


def register_family(name: str, *, distillation: bool) -> Callable[[LowerFn], LowerFn]:
    """Register a family's lowering function; ``distillation`` is the family's default head."""

    def deco(fn: LowerFn) -> LowerFn:
        _FAMILIES[name] = (fn, distillation)
        return fn

    return deco


def register_space(fn: Callable[[], SearchSpace]) -> Callable[[], SearchSpace]:
    """Register a space factory; its name is the function name minus ``_space``."""
    _SPACES[fn.__name__.removesuffix("_space")] = fn
    return fn


def register_preset(fn: Callable[[], ArchConfig]) -> Callable[[], ArchConfig]:
    """Register a preset factory under its function name."""
    _PRESETS[fn.__name__] = fn
    return fn


def _unknown(what: str, name: object, known: list[str]) -> SpaceError:
    return SpaceError(f"unknown {what} {name!r}; known {what}s: {', '.join(known)}")


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def list_spaces() -> list[str]:
    return sorted(_SPACES)


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_space(name: str) -> SearchSpace:
    """The registered search space ``name``."""
    if name not in _SPACES:
        raise _unknown("space", name, list_spaces())
    return _SPACES[name]()


def get_preset(name: str) -> ArchConfig:
    """The registered preset ``name`` (an exact published architecture)."""
    if name not in _PRESETS:
        raise _unknown("preset", name, list_presets())
    return _PRESETS[name]()


def family_defaults(family: str) -> bool:
    """Whether the family's models carry a distillation head by default."""
    if family not in _FAMILIES:
        raise _unknown("family", family, list_families())
    return _FAMILIES[family][1]


def lower(
    arch: ArchConfig,
    setup: LoweringSetup | None = None,
    *,
    resolution: int | str | tuple[int, int] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    distillation: bool | None = None,
) -> tuple[BlockSpec, ...]:
    """Lower a config to its block specs, in forward order (stem first, head last).

    Args:
        arch: the architecture.
        setup: the lowering setup (input size, classes, input channels, distillation head,
            task); or give its fields as keywords (defaults: 224, 1000 classes, 3 channels,
            the family's distillation default), not both.
        resolution: input side in pixels, or ``(height, width)``.
        num_classes: classifier outputs.
        in_chans: input channels (3 for RGB, 1 for Fashion-MNIST).
        distillation: add ``head_dist``; ``None`` takes the family default
            (EfficientFormer V1/V2: yes, EfficientViT: no).

    Raises:
        SpaceError: the config is not valid for its family at this resolution.
    """
    if arch.family not in _FAMILIES:
        raise _unknown("family", arch.family, list_families())
    setup = _setup(setup, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                   distillation=distillation)
    fn, default_dist = _FAMILIES[arch.family]
    h, w = setup.resolution
    if h != w:
        raise SpaceError(f"{arch.family} lowering takes square inputs only, got {setup.text}")
    return fn(
        arch,
        resolution=h,
        num_classes=setup.num_classes,
        in_chans=setup.in_chans,
        distillation=default_dist if setup.distillation is None else setup.distillation,
    )


def _setup(setup: LoweringSetup | None, **keywords: object) -> LoweringSetup:
    given = {k: v for k, v in keywords.items() if v is not None}
    if setup is not None:
        if given:
            raise TypeError(f"give either a LoweringSetup or its fields as keywords, not both (got {sorted(given)})")
        if not isinstance(setup, LoweringSetup):
            raise TypeError(f"`setup` must be a LoweringSetup, got {type(setup).__name__}")
        return setup
    try:
        return LoweringSetup(**given)  # type: ignore[arg-type]
    except NasUserError as exc:
        raise SpaceError(str(exc)) from None


#: The published parameter counts, exact ``sum(p.numel())`` of the reference models at 224 px with
#: 1000 classes (DESIGN.md section 3): what every preset must reproduce.
PUBLISHED_PARAMS = {
    "efficientformer_l1": 12_289_928,
    "efficientformer_l3": 31_406_000,
    "efficientformer_l7": 82_229_328,
    "efficientformerv2_s0": 3_600_256,
    "efficientformerv2_s1": 6_185_560,
    "efficientformerv2_s2": 12_710_112,
    "efficientformerv2_l": 26_322_288,
    "efficientvit_b0": 3_410_008,
    "efficientvit_b1": 9_102_024,
    "efficientvit_b2": 24_330_712,
    "efficientvit_b3": 48_646_056,
}
