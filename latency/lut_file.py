"""The LUT file format as schema models (pydantic v2), and the reader of older files.

File format (``lut-<device>-<res>.json``, JSON, schema 2)::

    {"schema": 2, "format": "formslim-nas latency LUT",
     "device": "local-cpu", "backend": "onnxruntime", "profile": {...DeviceProfile...},
     "environment": {"host": {...}, "versions": {...}}, "threads": 1, "batch": 1,
     "precision": "fp32", "resolution": 224 | [512, 1024], "num_classes": 1000, "in_chans": 3,
     "distillation": true, "task": "classify" | "backbone",
     "space_name": "efficientformer_v2", "space_hash": "e048b67d0645",
     "space": {...SearchSpace.to_dict()...}, "date": "2026-...", "updated": "2026-...",
     "predicted": false, "predicted_entries": 0, "measurement": "in-process" | "bundle" | "predicted" | "merged",
     "statistic": "median" | "min",
     "complete": true, "expected_entries": 1239, "shard": null | "2/4",
     "calibration": {"method": "linear", "scale": 1.07, "offset_ms": 0.4, ...},
     "prior": null | {...LatencyPrior.to_dict()...},
     "validation": null | {"file": "...", "n": 100, "raw": {...}, "calibrated": {...}},
     "entries": {"ef2.ffn|cin=48|...": {"count": 30, "median_ms": 0.21, "mean_ms": ...,
                 "std_ms": ..., "p90_ms": ..., "iqr_ms": ..., "min_ms": ..., "noisy": false,
                 "source": "measured"}, ...}}

The resolution is an int for a square input and ``[height, width]`` otherwise. In memory an
entry is a :class:`LutEntry`. A predicted entry stores only ``{"median_ms": x, "count": 0, "source": "predicted"}``.

Schema 1 (every file written before the resolution could be non-square) is read and converted
on load: it has no ``task`` (it is ``classify``), and its keys are re-emitted through
:meth:`search_spaces.BlockSpec.from_key` (so keys whose spelling changed since, such as a
stage-3 attention stride, come out in today's spelling).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError, field_validator

from latency.profiles import BACKENDS, PRECISIONS
from search_spaces import TASKS, BlockSpec, parse_resolution, resolution_json
from search_spaces.errors import FileFormatError, NasUserError
from latency.stats import LatencyStats
from search_spaces.schema import Schema, format_validation_error, validate

__all__ = ["LUT_SCHEMA", "FORMAT", "SOURCES", "MEASUREMENTS", "CALIBRATION_METHODS", "STATISTICS",
           "Figure", "MeasuredEntry", "PredictedEntry", "Entry", "LutEntry", "CalibrationModel", "LutHeader", "LutFile", "upgrade"]

LUT_SCHEMA = 2
FORMAT = "formslim-nas latency LUT"
SOURCES: tuple[str, ...] = ("measured", "predicted")
MEASUREMENTS: tuple[str, ...] = ("in-process", "bundle", "predicted", "merged")
CALIBRATION_METHODS: tuple[str, ...] = ("none", "linear", "blocks", "per_kind", "prior")
#: Which statistic of a measured entry predictions sum: the median, or the fastest run (robust when
#: other processes share the machine: interference only ever adds time).
STATISTICS: tuple[str, ...] = ("median", "min")

Ms = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1)]


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


class Figure(Schema):
    """One latency figure (ms)."""

    median_ms: Ms


class MeasuredEntry(Schema):
    """A measured entry: every statistic of its timed runs (ms). ``noisy`` is derived and ignored."""

    source: Literal["measured"]
    count: int = Field(ge=1)
    median_ms: Ms
    mean_ms: Ms
    std_ms: Ms
    p90_ms: Ms
    iqr_ms: Ms
    min_ms: Ms
    noisy: bool | None = None


class PredictedEntry(Schema):
    """A predicted entry: one figure from an analytical prior, no runs."""

    source: Literal["predicted"]
    median_ms: Ms
    count: Literal[0] = 0


Entry = Annotated[Union[MeasuredEntry, PredictedEntry], Field(discriminator="source")]


class CalibrationModel(Schema):
    """A calibration as stored (see :class:`latency.lut.Calibration` for the meaning of each field)."""

    method: Literal[CALIBRATION_METHODS] = "none"
    scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    offset_ms: Finite = 0.0
    per_block_ms: Finite = 0.0
    kind_scales: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(default_factory=dict)
    n: int = Field(0, ge=0)
    loo_mape: Finite | None = None
    fitted: str | None = None
    note: str = ""


class LutHeader(Schema):
    """Everything a LUT says about what was measured, and how (see :class:`latency.lut.LatencyTable`)."""

    device: Name
    backend: Literal[BACKENDS]
    resolution: Union[int, list[int]]
    num_classes: int = Field(ge=1)
    in_chans: int = Field(ge=1)
    distillation: bool
    task: Literal[TASKS] = "classify"
    space_name: Name
    space_hash: Name
    space: dict[str, Any] | None = None
    profile: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)
    threads: int = Field(ge=1)
    batch: int = Field(ge=1)
    precision: Literal[PRECISIONS] = "fp32"
    measurement: Literal[MEASUREMENTS]
    statistic: Literal[STATISTICS] = "median"
    expected_entries: int | None = Field(None, ge=0)
    shard: str | None = Field(None, pattern=r"^[1-9][0-9]*/[1-9][0-9]*$")
    calibration: CalibrationModel = Field(default_factory=CalibrationModel)
    prior: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    date: str = Field(default_factory=now_utc)
    updated: str | None = None

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: Any) -> int | list[int]:
        try:
            return resolution_json(parse_resolution(value))
        except NasUserError as exc:
            raise ValueError(str(exc)) from None


class LutFile(LutHeader):
    """A whole LUT file, schema 2."""

    schema_version: Literal[2] = Field(alias="schema")
    format: Literal[FORMAT]
    predicted: bool
    predicted_entries: int = Field(ge=0)
    complete: bool
    entries: dict[str, Entry]

    @field_validator("entries")
    @classmethod
    def _keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            try:
                BlockSpec.from_key(key)
            except NasUserError as exc:
                raise ValueError(f"entry {key!r}: {exc}") from None
        return value


def upgrade(data: dict[str, Any], *, where: str) -> dict[str, Any]:
    """A schema-1 LUT (as written before schema 2) as a schema-2 document; newer ones unchanged.

    Raises:
        FileFormatError: an unknown schema, or a schema-1 key that no longer parses.
    """
    schema = data.get("schema")
    if schema == LUT_SCHEMA:
        return data
    if schema != 1:
        raise FileFormatError(f"{where} has schema {schema!r}; this version reads schemas 1 and {LUT_SCHEMA} "
                              f"(rebuild it with nas-build-lut)")
    out = dict(data, schema=LUT_SCHEMA)
    out.setdefault("task", "classify")
    profile = out.get("profile") if isinstance(out.get("profile"), dict) else {}
    out.setdefault("precision", profile.get("precision", "fp32"))
    entries = data.get("entries")
    if isinstance(entries, dict):
        renamed = {}
        for key, value in entries.items():
            try:
                new_key = BlockSpec.from_key(key).key
            except NasUserError as exc:
                raise FileFormatError(f"{where}: entry {key!r}: {exc}") from None
            if isinstance(value, dict):
                value = {"source": "measured", **value}
            renamed[new_key] = value
        out["entries"] = renamed
        n_pred = sum(1 for v in renamed.values() if isinstance(v, dict) and v.get("source") == "predicted")
        out.setdefault("predicted_entries", n_pred)
        expected = out.get("expected_entries")
        out.setdefault("complete", expected is None or len(renamed) >= expected)
    return out


@dataclass(frozen=True)
class LutEntry:
    """The latency of one block spec.

    Attributes:
        median_ms: the figure every prediction uses (ms).
        source: ``"measured"`` or ``"predicted"``.
        stats: the full statistics of a measured entry (None for a predicted one).

    Raises:
        NasUserError: a bad value, a measured entry without stats, or a predicted one with stats.
    """

    median_ms: float
    source: str = "measured"
    stats: LatencyStats | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise NasUserError(f"`source` must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "measured" and self.stats is None:
            raise NasUserError("a measured LUT entry needs its stats (count, median, mean, std, p90)")
        if self.source == "predicted" and self.stats is not None:
            raise NasUserError("a predicted LUT entry has no measurement stats")
        figure = validate(Figure, {"median_ms": self.median_ms}, source="LUT entry", error=NasUserError)
        object.__setattr__(self, "median_ms", figure.median_ms)

    @property
    def measured(self) -> bool:
        return self.source == "measured"

    def value(self, statistic: str = "median") -> float:
        """The figure predictions use: the median or the fastest run of a measured entry; a predicted figure."""
        if self.stats is None or statistic == "median":
            return self.median_ms
        if statistic == "min":
            return self.stats.min_ms
        raise NasUserError(f"`statistic` must be one of {', '.join(STATISTICS)}, got {statistic!r}")

    def to_dict(self) -> dict[str, Any]:
        """The entry as the file stores it."""
        if self.stats is not None:
            return {**self.stats.to_dict(), "source": self.source}
        return {"median_ms": self.median_ms, "count": 0, "source": self.source}

    @classmethod
    def from_model(cls, model: MeasuredEntry | PredictedEntry) -> LutEntry:
        """From a validated file entry (:mod:`latency.lut_file`).

        Raises:
            NasUserError: inconsistent order statistics (``min <= median <= p90``).
        """
        if isinstance(model, PredictedEntry):
            return cls(model.median_ms, "predicted")
        stats = LatencyStats(**model.model_dump(exclude={"source", "noisy"}))
        return cls(stats.median_ms, "measured", stats)

    @classmethod
    def from_dict(cls, data: Any) -> LutEntry:
        """Inverse of :meth:`to_dict`.

        Raises:
            NasUserError: not an entry (the message names the field and the allowed values).
        """
        try:
            model = TypeAdapter(Entry).validate_python(data, strict=True)
        except ValidationError as exc:
            raise NasUserError(format_validation_error(exc, source="LUT entry")) from None
        return cls.from_model(model)
