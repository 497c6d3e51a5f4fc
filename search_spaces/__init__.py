"""Search spaces: architecture configs, search spaces, presets, block specs and exact counting.

Pure Python: importing this package never imports torch.
"""
from __future__ import annotations

from .arch import MIXERS, ArchConfig, BlockConfig, StageConfig
from .counting import block_macs, block_params, count_macs, count_params
from .errors import FileFormatError, NasUserError, SpaceError
from .registry import (
    family_defaults,
    get_preset,
    get_space,
    list_families,
    list_presets,
    list_spaces,
    lower,
    register_family,
    register_preset,
    register_space,
)
from .setup import TASKS, LoweringSetup, format_resolution, parse_resolution, resolution_json
from .space import SearchSpace, SlimAction, StageChoices
from .kinds import BlockKind, get_kind, list_kinds
from .lowering import Carry, Family, get_family
from .ops import OpTrace
from .specs import BlockSpec, block_kinds

# Family modules register their lowering, spaces and presets on import.
from . import efficientformer as _efficientformer  # noqa: E402,F401
from . import efficientformer_v2 as _efficientformer_v2  # noqa: E402,F401
from . import efficientvit as _efficientvit  # noqa: E402,F401

__all__ = [
    "MIXERS", "ArchConfig", "BlockConfig", "StageConfig",
    "BlockSpec", "block_kinds", "BlockKind", "get_kind", "list_kinds", "OpTrace", "Carry", "Family", "get_family",
    "SearchSpace", "SlimAction", "StageChoices",
    "TASKS", "LoweringSetup", "format_resolution", "parse_resolution", "resolution_json",
    "NasUserError", "SpaceError", "FileFormatError",
    "block_macs", "block_params", "count_macs", "count_params",
    "family_defaults", "get_preset", "get_space", "list_families", "list_presets", "list_spaces", "lower",
    "register_family", "register_preset", "register_space",
]
