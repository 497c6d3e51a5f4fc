"""``subnet.json``: a searched (or hand-written) architecture with its deployment settings.

Format (schema 1)::

    {"schema": 1, "family": "efficientformer_v2", "resolution": 224, "num_classes": 1000,
     "in_chans": 3, "distillation": true, "stem_stride": 4,
     "stages": [{"width": 32, "blocks": [{"mixer": "ffn", "expansion": 4}, ...]}, ...],
     "metrics": {...}, "provenance": {...}}

EfficientViT files add ``head_widths`` and ``head_dim``. Loading validates every field and
names the bad one; files are written atomically.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .arch import ArchConfig
from .errors import FileFormatError, SpaceError
from .fileio import atomic_write_json, read_json
from .registry import family_defaults, list_families, lower
from .specs import BlockSpec

__all__ = ["SubnetFile", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_ARCH_KEYS = ("family", "stem_stride", "stages", "head_widths", "head_dim")
_KNOWN = {"schema", "resolution", "num_classes", "in_chans", "distillation", "metrics", "provenance", *_ARCH_KEYS}


@dataclass(frozen=True)
class SubnetFile:
    """An architecture plus the settings it is deployed with.

    Args:
        arch: the architecture.
        resolution: input side in pixels.
        num_classes: classifier outputs.
        in_chans: input channels.
        distillation: whether the model has ``head_dist``.
        metrics: free-form numbers (params, MACs, latency per device, accuracy, ...).
        provenance: where it came from (supernet and LUT hashes, command, versions).
    """

    arch: ArchConfig
    resolution: int = 224
    num_classes: int = 1000
    in_chans: int = 3
    distillation: bool = True
    metrics: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def specs(self) -> tuple[BlockSpec, ...]:
        """The lowering of this subnet at its resolution and class count."""
        return lower(self.arch, resolution=self.resolution, num_classes=self.num_classes,
                     in_chans=self.in_chans, distillation=self.distillation)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": SCHEMA_VERSION}
        arch = self.arch.to_dict()
        d["family"] = arch.pop("family")
        d.update(resolution=self.resolution, num_classes=self.num_classes, in_chans=self.in_chans,
                 distillation=self.distillation)
        d.update(arch)
        d["metrics"] = dict(self.metrics)
        d["provenance"] = dict(self.provenance)
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "subnet.json") -> SubnetFile:
        """Validate and parse; every error names ``source`` and the bad field."""
        def bad(msg: str) -> FileFormatError:
            return FileFormatError(f"{source}: {msg}")

        if not isinstance(d, Mapping):
            raise bad(f"expected a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA_VERSION:
            raise bad(f"field 'schema' must be {SCHEMA_VERSION}, got {d.get('schema')!r}")
        unknown = sorted(set(d) - _KNOWN)
        if unknown:
            raise bad(f"unknown field(s) {unknown}; allowed: {sorted(_KNOWN)}")
        family = d.get("family")
        if family not in list_families():
            raise bad(f"field 'family' must be one of {list_families()}, got {family!r}")
        ints = {}
        for name, default, low in (("resolution", 224, 8), ("num_classes", 1000, 1), ("in_chans", 3, 1)):
            v = d.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(f"field {name!r} must be an integer >= {low}, got {v!r}")
            ints[name] = v
        dist = d.get("distillation", family_defaults(family))
        if not isinstance(dist, bool):
            raise bad(f"field 'distillation' must be true or false, got {dist!r}")
        for name in ("metrics", "provenance"):
            if not isinstance(d.get(name, {}), Mapping):
                raise bad(f"field {name!r} must be a JSON object")
        try:
            arch = ArchConfig.from_dict({k: d[k] for k in _ARCH_KEYS if k in d}, where="")
        except SpaceError as exc:
            raise bad(str(exc)) from None
        sub = cls(arch, ints["resolution"], ints["num_classes"], ints["in_chans"], dist,
                  dict(d.get("metrics", {})), dict(d.get("provenance", {})))
        try:
            sub.specs()
        except SpaceError as exc:
            raise bad(f"invalid architecture: {exc}") from None
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
