"""``subnet.json``: a searched (or hand-written) architecture with its deployment settings.

Format (schema 1 for square classifiers, schema 2 otherwise)::

    {"schema": 1, "family": "efficientformer_v2", "resolution": 224, "num_classes": 1000,
     "in_chans": 3, "distillation": true, "stem_stride": 4,
     "stages": [{"width": 32, "blocks": [{"mixer": "ffn", "expansion": 4}, ...]}, ...],
     "metrics": {...}, "provenance": {...}}

Schema 2 stores the input as ``"resolution": [height, width]`` and adds ``"task"``
(``classify`` or ``backbone``: a model without its classifier head, as detection and
segmentation use it). A file is written in the oldest schema that can express it, so square
classifiers stay readable by older versions. EfficientViT files add ``head_widths`` and
``head_dim``. Loading validates every field (:mod:`search_spaces.schema`) and names the bad
one; files are written atomically.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Union

from pydantic import Field, field_validator

from .arch import ArchConfig
from .errors import FileFormatError, SpaceError
from .fileio import atomic_write_json, read_json
from .lowering import family_defaults, list_families, lower
from .schema import Schema, validate
from .setup import LoweringSetup, parse_resolution, resolution_json
from .specs import BlockSpec

__all__ = ["SubnetFile", "SCHEMA_VERSION", "SCHEMAS"]

#: The newest schema; :data:`SCHEMAS` lists every one this version reads.
SCHEMA_VERSION = 2
SCHEMAS = (1, 2)


class _Block(Schema):
    mixer: str
    expansion: Union[int, float] = Field(gt=0)


class _Stage(Schema):
    width: int = Field(gt=0)
    blocks: list[_Block]


class _SubnetBase(Schema):
    family: str
    num_classes: int = Field(1000, ge=1)
    in_chans: int = Field(3, ge=1)
    distillation: bool | None = None
    stem_stride: int = 4
    stages: list[_Stage]
    head_widths: list[int] = []
    head_dim: int = 0
    metrics: dict[str, Any] = {}
    provenance: dict[str, Any] = {}

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in list_families():
            raise ValueError(f"must be one of {list_families()}")
        return value


class _SubnetV1(_SubnetBase):
    schema_: Literal[1] = Field(alias="schema")
    resolution: int = Field(224, ge=8)


class _SubnetV2(_SubnetBase):
    schema_: Literal[2] = Field(alias="schema")
    resolution: list[int] = Field(min_length=2, max_length=2)
    task: Literal["classify", "backbone"] = "classify"


_MODELS: dict[int, type[_SubnetBase]] = {1: _SubnetV1, 2: _SubnetV2}


@dataclass(frozen=True)
class SubnetFile:
    """An architecture plus the settings it is deployed with.

    Args:
        arch: the architecture.
        resolution: input side in pixels, or ``(height, width)``.
        num_classes: classifier outputs.
        in_chans: input channels.
        distillation: whether the model has ``head_dist``.
        metrics: free-form numbers (params, MACs, latency per device, accuracy, ...).
        provenance: where it came from (supernet and LUT hashes, command, versions).
        task: ``classify`` or ``backbone`` (no classifier head).
    """

    arch: ArchConfig
    resolution: int | tuple[int, int] = 224
    num_classes: int = 1000
    in_chans: int = 3
    distillation: bool = True
    metrics: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    task: str = "classify"

    def __post_init__(self) -> None:
        h, w = parse_resolution(self.resolution)
        object.__setattr__(self, "resolution", h if h == w else (h, w))

    @property
    def setup(self) -> LoweringSetup:
        """The lowering setup this subnet is deployed with."""
        return LoweringSetup(resolution=self.resolution, num_classes=self.num_classes, in_chans=self.in_chans,
                             distillation=self.distillation, task=self.task)

    @property
    def hw(self) -> tuple[int, int]:
        """The input ``(height, width)``."""
        return self.setup.resolution

    def specs(self) -> tuple[BlockSpec, ...]:
        """The lowering of this subnet at its setup."""
        return lower(self.arch, self.setup)

    @property
    def schema(self) -> int:
        """The oldest schema that can hold this file (1 for a square classifier)."""
        return 1 if isinstance(self.resolution, int) and self.task == "classify" else 2

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": self.schema}
        arch = self.arch.to_dict()
        d["family"] = arch.pop("family")
        d["resolution"] = resolution_json(self.hw) if self.schema == 1 else list(self.hw)
        if self.schema == 2:
            d["task"] = self.task
        d.update(num_classes=self.num_classes, in_chans=self.in_chans, distillation=self.distillation)
        d.update(arch)
        d["metrics"] = dict(self.metrics)
        d["provenance"] = dict(self.provenance)
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "subnet.json") -> SubnetFile:
        """Validate and parse (schema 1 or 2); every error names ``source`` and the bad field."""
        if not isinstance(d, Mapping):
            raise FileFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        version = d.get("schema")
        if version not in _MODELS or isinstance(version, bool):
            raise FileFormatError(f"{source}: field 'schema' must be one of {list(SCHEMAS)}, got {version!r}"
                                  if "schema" in d else f"{source}: field 'schema' is missing")
        if version == 2 and not isinstance(d.get("resolution"), list):
            raise FileFormatError(f"{source}: field 'schema' is 2, which stores 'resolution' as [height, width], "
                                  f"got {d.get('resolution')!r} (schema 1 stores the side of a square input)")
        model = validate(_MODELS[version], dict(d), source=source)
        arch_keys = ("family", "stem_stride", "stages", "head_widths", "head_dim")
        raw = {k: d[k] for k in arch_keys if k in d}
        try:
            arch = ArchConfig.from_dict(raw, where="")
        except SpaceError as exc:
            raise FileFormatError(f"{source}: {exc}") from None
        dist = model.distillation if model.distillation is not None else family_defaults(model.family)
        res = model.resolution if isinstance(model.resolution, int) else tuple(model.resolution)
        try:
            sub = cls(arch, res, model.num_classes, model.in_chans, dist, dict(model.metrics),
                      dict(model.provenance), getattr(model, "task", "classify"))
            sub.specs()
        except SpaceError as exc:
            raise FileFormatError(f"{source}: invalid architecture: {exc}") from None
        _check_finite(sub.metrics, f"{source}: metrics")
        return sub

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SubnetFile:
        return cls.from_dict(read_json(path, what="subnet file"), source=str(path))

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_dict())


def _check_finite(obj: Any, where: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise FileFormatError(f"{where} holds a non-finite number")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")
