"""Registries of named search spaces and presets (families register in :mod:`search_spaces.lowering`).

>>> from search_spaces import get_preset, list_presets
>>> get_preset("efficientformer_l1").widths
(48, 96, 224, 448)
>>> get_preset("nope")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
SpaceError: unknown preset 'nope'; known presets: ...
"""
from __future__ import annotations

from typing import Callable

from .arch import ArchConfig
from .errors import SpaceError
from .lowering import family_defaults, list_families, lower, register_family
from .space import SearchSpace

__all__ = [
    "register_family", "register_space", "register_preset",
    "get_space", "get_preset", "list_spaces", "list_presets", "list_families",
    "lower", "family_defaults", "PUBLISHED_PARAMS",
]


_SPACES: dict[str, Callable[[], SearchSpace]] = {}
_PRESETS: dict[str, Callable[[], ArchConfig]] = {}


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


#: The published parameter counts, exact ``sum(p.numel())`` of the reference models at 224 px with
#: 1000 classes (docs/design.md, "Presets"): what every preset must reproduce.
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
