"""The latency lookup table (LUT): one latency figure per block spec, for one device.

A :class:`LatencyTable` maps block-spec keys (:attr:`search_spaces.BlockSpec.key`) to
:class:`LutEntry` values, under a header that says exactly what was measured: device, backend,
profile, environment (host and runtime versions), threads, batch, resolution, classes, input
channels, distillation head, the search space and its hash, the date, whether figures are
predicted, how they were measured, the calibration and the validation summary.

File format (``lut-<device>-<resolution>.json``, JSON, schema 1)::

    {"schema": 1, "format": "formslim-nas latency LUT",
     "device": "local-cpu", "backend": "onnxruntime", "profile": {...DeviceProfile...},
     "environment": {"host": {...}, "versions": {...}}, "threads": 1, "batch": 1,
     "precision": "fp32", "resolution": 224, "num_classes": 1000, "in_chans": 3,
     "distillation": true, "space_name": "efficientformer_v2", "space_hash": "e048b67d0645",
     "space": {...SearchSpace.to_dict()...}, "date": "2026-...", "updated": "2026-...",
     "predicted": false, "measurement": "in-process" | "bundle" | "predicted",
     "statistic": "median" | "min",
     "complete": true, "expected_entries": 1239, "shard": null | "2/4",
     "calibration": {"method": "linear", "scale": 1.07, "offset_ms": 0.4, ...},
     "prior": null | {...LatencyPrior.to_dict()...},
     "validation": null | {"file": "...", "n": 100, "raw": {...}, "calibrated": {...}},
     "entries": {"ef2.ffn|cin=48|...": {"count": 30, "median_ms": 0.21, "mean_ms": ...,
                 "std_ms": ..., "p90_ms": ..., "iqr_ms": ..., "min_ms": ..., "noisy": false,
                 "source": "measured"}, ...}}

A predicted entry (from an analytical prior, see :mod:`latency.prior`) stores only
``{"median_ms": x, "count": 0, "source": "predicted"}``. A measured entry always replaces a
predicted one, never the other way round. ``predicted`` in the header is true as long as any
entry is predicted.

>>> from latency.stats import LatencyStats
>>> lut = LatencyTable(device="demo", backend="onnxruntime", resolution=32, num_classes=10,
...                    in_chans=1, distillation=True, space_name="s", space_hash="abc123abc123")
>>> lut.set_measured("ef2.head|cin=8|cout=8|size=4|num_classes=10|distillation=1",
...                  LatencyStats.from_samples([0.1, 0.2, 0.3]))
>>> len(lut), lut.predicted
(1, False)
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latency.stats import LatencyStats
from search_spaces import BlockSpec, LoweringSetup, SearchSpace, format_resolution, parse_resolution
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.fileio import atomic_write_json, read_json

__all__ = ["LUT_SCHEMA", "SOURCES", "MEASUREMENTS", "CALIBRATION_METHODS", "STATISTICS", "LutEntry", "Calibration",
           "LatencyTable", "merge_tables", "default_lut_path"]

logger = logging.getLogger(__name__)

LUT_SCHEMA = 1
_FORMAT = "formslim-nas latency LUT"
SOURCES: tuple[str, ...] = ("measured", "predicted")
MEASUREMENTS: tuple[str, ...] = ("in-process", "bundle", "predicted", "merged")
CALIBRATION_METHODS: tuple[str, ...] = ("none", "linear", "blocks", "per_kind", "prior")
#: Which statistic of a measured entry predictions sum: the median, or the fastest run (robust when
#: other processes share the machine: interference only ever adds time).
STATISTICS: tuple[str, ...] = ("median", "min")
#: Header fields that must agree for two tables to describe the same measurement setup.
_SETUP_FIELDS = ("device", "backend", "threads", "batch", "precision", "resolution", "num_classes", "in_chans",
                 "distillation", "space_hash")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def default_lut_path(device: str, resolution: Any, folder: str | os.PathLike[str] = ".") -> Path:
    """Where ``nas-build-lut`` writes, and ``nas-search`` looks for, a device's LUT.

    Args:
        device: the profile name.
        resolution: ``224``, ``"512x1024"`` or ``(height, width)``; a square one names the
            file by its side.
        folder: the folder.

    >>> default_lut_path("iphone12", 32).name
    'lut-iphone12-32.json'
    >>> default_lut_path("iphone12", (512, 1024)).name
    'lut-iphone12-512x1024.json'
    """
    return Path(folder) / f"lut-{device}-{format_resolution(parse_resolution(resolution))}.json"


def _finite_ms(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise NasUserError(f"{what} must be a finite number of milliseconds >= 0, got {value!r}")
    return float(value)


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
        object.__setattr__(self, "median_ms", _finite_ms(self.median_ms, "`median_ms`"))
        if self.source not in SOURCES:
            raise NasUserError(f"`source` must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "measured" and self.stats is None:
            raise NasUserError("a measured LUT entry needs its stats (count, median, mean, std, p90)")
        if self.source == "predicted" and self.stats is not None:
            raise NasUserError("a predicted LUT entry has no measurement stats")

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
        if self.stats is not None:
            return {**self.stats.to_dict(), "source": self.source}
        return {"median_ms": self.median_ms, "count": 0, "source": self.source}

    @classmethod
    def from_dict(cls, data: Any) -> LutEntry:
        """Inverse of :meth:`to_dict`.

        Raises:
            NasUserError: not an object, an unknown source, or invalid stats.
        """
        if not isinstance(data, dict):
            raise NasUserError(f"an entry must be an object, got {type(data).__name__}")
        source = data.get("source", "measured")
        if source == "predicted":
            extra = sorted(set(data) - {"median_ms", "count", "source"})
            if extra or data.get("count", 0) != 0:
                raise NasUserError(f"a predicted entry holds only median_ms, count 0 and source; got {sorted(data)}")
            return cls(data.get("median_ms"), "predicted")  # type: ignore[arg-type]
        if source != "measured":
            raise NasUserError(f"entry source must be one of {', '.join(SOURCES)}, got {source!r}")
        stats = LatencyStats.from_dict({k: v for k, v in data.items() if k != "source"})
        return cls(stats.median_ms, "measured", stats)


@dataclass(frozen=True)
class Calibration:
    """Maps a sum of LUT entries to a whole-network latency.

    ``latency = offset_ms + sum_i(scale * kind_scales.get(kind_i, 1) * median_i + per_block_ms)``
    over the network's blocks. ``method`` says where it came from: ``none`` (identity),
    ``linear`` (``a * sum + b`` fitted to end-to-end runs), ``blocks`` (``a * sum + c * blocks
    + b``: a per-block constant absorbs the call overhead that every isolated block measurement
    pays once and a whole network pays once in all), ``per_kind`` (one scale per block kind, a
    per-block constant and an offset), ``prior`` (the per-inference overhead of an analytical
    prior). A richer method is kept only when it lowers the leave-one-out error.

    Attributes:
        method: one of :data:`CALIBRATION_METHODS`.
        scale: global multiplier (> 0).
        offset_ms: per-inference constant (ms; may be negative for a fitted line).
        kind_scales: per-block-kind multipliers (``per_kind``), each >= 0.
        per_block_ms: constant added per block (ms; usually negative: the call overhead).
        n: networks the fit used.
        loo_mape: leave-one-out mean absolute percentage error of the fit (a fraction).
        fitted: UTC date of the fit.
        note: free text (e.g. why per-kind corrections were rejected).
    """

    method: str = "none"
    scale: float = 1.0
    offset_ms: float = 0.0
    kind_scales: Mapping[str, float] = field(default_factory=dict)
    n: int = 0
    loo_mape: float | None = None
    fitted: str | None = None
    note: str = ""
    per_block_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise NasUserError(f"calibration `method` must be one of {', '.join(CALIBRATION_METHODS)}, "
                               f"got {self.method!r}")
        for name in ("scale", "offset_ms", "per_block_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise NasUserError(f"calibration `{name}` must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.scale <= 0:
            raise NasUserError(f"calibration `scale` must be > 0, got {self.scale}")
        if not isinstance(self.kind_scales, Mapping):
            raise NasUserError(f"calibration `kind_scales` must be an object, got {self.kind_scales!r}")
        clean = {}
        for k, v in self.kind_scales.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or not math.isfinite(v) or v < 0:
                raise NasUserError(f"calibration kind scale {k!r} must be a finite number >= 0, got {v!r}")
            clean[k] = float(v)
        object.__setattr__(self, "kind_scales", clean)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise NasUserError(f"calibration `n` must be an integer >= 0, got {self.n!r}")

    def weight(self, kind: str) -> float:
        """The factor one block of ``kind`` contributes per millisecond of its LUT median."""
        return self.scale * self.kind_scales.get(kind, 1.0)

    def block_ms(self, kind: str, lut_ms: float) -> float:
        """One block's calibrated share: ``weight(kind) * lut_ms + per_block_ms``."""
        return self.weight(kind) * lut_ms + self.per_block_ms

    def apply(self, sums_by_kind: Mapping[str, float], n_blocks: int = 0) -> float:
        """Calibrated latency (ms) from the sums of LUT figures per block kind and the block count.

        >>> Calibration("linear", 2.0, 0.5).apply({"ef2.ffn": 1.0, "ef2.head": 0.25})
        3.0
        """
        return (self.offset_ms + sum(self.weight(k) * v for k, v in sums_by_kind.items())
                + self.per_block_ms * n_blocks)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scale": self.scale, "offset_ms": self.offset_ms,
                "per_block_ms": self.per_block_ms, "kind_scales": dict(self.kind_scales), "n": self.n,
                "loo_mape": self.loo_mape, "fitted": self.fitted, "note": self.note}

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        if not isinstance(data, dict):
            raise NasUserError(f"calibration must be an object, got {type(data).__name__}")
        allowed = {"method", "scale", "offset_ms", "per_block_ms", "kind_scales", "n", "loo_mape", "fitted", "note"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise NasUserError(f"unknown calibration field(s) {unknown}; allowed: {sorted(allowed)}")
        loo = data.get("loo_mape")
        if loo is not None and (isinstance(loo, bool) or not isinstance(loo, (int, float)) or not math.isfinite(loo)):
            raise NasUserError(f"calibration `loo_mape` must be a number or null, got {loo!r}")
        return cls(data.get("method", "none"), data.get("scale", 1.0), data.get("offset_ms", 0.0),
                   data.get("kind_scales", {}), data.get("n", 0), loo, data.get("fitted"), data.get("note", ""),
                   data.get("per_block_ms", 0.0))


class LatencyTable:
    """A device's latency LUT: header plus one :class:`LutEntry` per block-spec key.

    Construct it with the header fields (keyword-only), add entries with
    :meth:`set_measured` / :meth:`set_predicted`, save with :meth:`save`, read with
    :meth:`load`. :func:`latency.predict_latency` turns it into network latencies.

    Args:
        device: profile name (e.g. ``"local-cpu"``).
        backend: ``"onnxruntime"`` or ``"coreml"``.
        resolution: input side in pixels the specs were lowered for.
        num_classes: classifier outputs of the head specs.
        in_chans: input channels of the stem specs.
        distillation: whether head specs carry ``head_dist``.
        space_name: the search space's registry name.
        space_hash: :attr:`search_spaces.SearchSpace.hash`.
        space: the space's :meth:`~search_spaces.SearchSpace.to_dict` (lets tools rebuild it).
        profile: the :class:`~latency.profiles.DeviceProfile` as a dict.
        environment: host and versions where the figures were measured.
        threads, batch, precision: copied from the profile when not given.
        measurement: ``in-process``, ``bundle``, ``predicted`` or ``merged``.
        statistic: which figure of a measured entry predictions sum, ``median`` (default) or
            ``min`` (the fastest run; see :data:`STATISTICS`). Every entry stores both.
        expected_entries: how many specs a complete table has (its shard's share for a shard).
        shard: ``"i/n"`` for one shard of a split build, else None.
        calibration: see :class:`Calibration`.
        prior: description of the analytical prior behind predicted entries.
        validation: summary of the last validation (see :mod:`latency.validate`).
        date: creation date (UTC, ISO 8601); now by default.

    Raises:
        NasUserError: a header value of the wrong type or out of range.
    """

    def __init__(
        self,
        *,
        device: str,
        backend: str,
        resolution: int,
        num_classes: int,
        in_chans: int,
        distillation: bool,
        space_name: str,
        space_hash: str,
        space: Mapping[str, Any] | None = None,
        profile: Mapping[str, Any] | None = None,
        environment: Mapping[str, Any] | None = None,
        threads: int | None = None,
        batch: int | None = None,
        precision: str | None = None,
        measurement: str = "in-process",
        statistic: str = "median",
        expected_entries: int | None = None,
        shard: str | None = None,
        calibration: Calibration | None = None,
        prior: Mapping[str, Any] | None = None,
        validation: Mapping[str, Any] | None = None,
        date: str | None = None,
    ) -> None:
        profile = dict(profile or {})
        for name, value in (("device", device), ("backend", backend), ("space_name", space_name),
                            ("space_hash", space_hash)):
            if not isinstance(value, str) or not value:
                raise NasUserError(f"LUT `{name}` must be a non-empty string, got {value!r}")
        for name, value, low in (("resolution", resolution, 1), ("num_classes", num_classes, 1),
                                 ("in_chans", in_chans, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise NasUserError(f"LUT `{name}` must be an integer >= {low}, got {value!r}")
        if not isinstance(distillation, bool):
            raise NasUserError(f"LUT `distillation` must be true or false, got {distillation!r}")
        if measurement not in MEASUREMENTS:
            raise NasUserError(f"LUT `measurement` must be one of {', '.join(MEASUREMENTS)}, got {measurement!r}")
        self.device, self.backend = device, backend
        self.resolution, self.num_classes, self.in_chans, self.distillation = resolution, num_classes, in_chans, \
            distillation
        self.space_name, self.space_hash = space_name, space_hash
        self.space = dict(space) if space is not None else None
        self.profile = profile
        self.environment = dict(environment or {})
        self.threads = threads if threads is not None else int(profile.get("threads", 1))
        self.batch = batch if batch is not None else int(profile.get("batch", 1))
        self.precision = precision if precision is not None else str(profile.get("precision", "fp32"))
        for name in ("threads", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NasUserError(f"LUT `{name}` must be an integer >= 1, got {v!r}")
        self.measurement = measurement
        if statistic not in STATISTICS:
            raise NasUserError(f"LUT `statistic` must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        self.statistic = statistic
        if expected_entries is not None and (isinstance(expected_entries, bool)
                                             or not isinstance(expected_entries, int) or expected_entries < 0):
            raise NasUserError(f"LUT `expected_entries` must be an integer >= 0 or null, got {expected_entries!r}")
        self.expected_entries = expected_entries
        if shard is not None and not isinstance(shard, str):
            raise NasUserError(f"LUT `shard` must be 'i/n' or null, got {shard!r}")
        self.shard = shard
        self.calibration = calibration if calibration is not None else Calibration()
        self.prior = dict(prior) if prior is not None else None
        self.validation = dict(validation) if validation is not None else None
        self.date = date or _now()
        self.updated = self.date
        self.path: Path | None = None
        self._entries: dict[str, LutEntry] = {}
        self._version = 0

    # ------------------------------------------------------------------ entries
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: str) -> LutEntry:
        return self._entries[key]

    def keys(self) -> list[str]:
        """Entry keys, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, LutEntry]]:
        return [(k, self._entries[k]) for k in self.keys()]

    @property
    def version(self) -> int:
        """Increases whenever entries or the calibration change (lets predictors drop caches)."""
        return self._version

    def _touch(self) -> None:
        self._version += 1
        self.updated = _now()

    def set_entry(self, key: str, entry: LutEntry) -> None:
        """Store an entry; a predicted entry never replaces a measured one (that call is ignored)."""
        if not isinstance(entry, LutEntry):
            raise TypeError(f"`entry` must be a LutEntry, got {type(entry).__name__}")
        old = self._entries.get(key)
        if old is not None and old.measured and not entry.measured:
            logger.debug("kept the measured entry of %s over a predicted one", key)
            return
        self._entries[key] = entry
        self._touch()

    def set_measured(self, key: str, stats: LatencyStats) -> None:
        """Store a measured entry (replacing any predicted one)."""
        self.set_entry(key, LutEntry(stats.median_ms, "measured", stats))

    def set_predicted(self, key: str, median_ms: float) -> None:
        """Store a predicted entry, unless the key already has a measured one."""
        self.set_entry(key, LutEntry(median_ms, "predicted"))

    def set_statistic(self, statistic: str) -> None:
        """Choose which figure of measured entries predictions sum (recalibrate afterwards)."""
        if statistic not in STATISTICS:
            raise NasUserError(f"`statistic` must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        if statistic != self.statistic:
            self.statistic = statistic
            self._touch()

    def set_calibration(self, calibration: Calibration) -> None:
        if not isinstance(calibration, Calibration):
            raise TypeError(f"`calibration` must be a Calibration, got {type(calibration).__name__}")
        self.calibration = calibration
        self._touch()

    @property
    def predicted(self) -> bool:
        """True when any entry is predicted (or the table is a predicted one still without entries)."""
        if not self._entries:
            return self.measurement == "predicted"
        return any(not e.measured for e in self._entries.values())

    @property
    def n_predicted(self) -> int:
        return sum(not e.measured for e in self._entries.values())

    @property
    def complete(self) -> bool:
        """True when every expected entry is present (unknown expectations count as complete)."""
        return self.expected_entries is None or len(self._entries) >= self.expected_entries

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The given keys that have no entry, in the given order."""
        return [k for k in keys if k not in self._entries]

    @property
    def setup(self) -> LoweringSetup:
        """The lowering setup the table's keys were lowered under."""
        return LoweringSetup(resolution=self.resolution, num_classes=self.num_classes, in_chans=self.in_chans,
                             distillation=self.distillation)

    def search_space(self) -> SearchSpace | None:
        """The recorded search space, or None when the table does not carry one."""
        return SearchSpace.from_dict(self.space) if self.space is not None else None

    # ------------------------------------------------------------------ compatibility
    def describe(self) -> str:
        """One line: device, resolution, space and what kind of figures the table holds."""
        kind = "PREDICTED" if self.predicted else "measured"
        if self.predicted and self.n_predicted < len(self):
            kind = f"{len(self) - self.n_predicted} measured + {self.n_predicted} PREDICTED"
        return (f"{self.device} @ {self.resolution}px, space {self.space_name} ({self.space_hash}), "
                f"{len(self)} entries ({kind}), statistic {self.statistic}, calibration {self.calibration.method}")

    def _where(self) -> str:
        return f"LUT {str(self.path)!r}" if self.path is not None else "the LUT"

    def check_compatible(self, *, device: str | None = None, resolution: int | None = None,
                         space_hash: str | None = None) -> None:
        """Refuse a table built for another device, resolution or search space.

        Args:
            device: the device the caller needs.
            resolution: the input side the caller needs.
            space_hash: the hash of the caller's search space.

        Raises:
            NasUserError: a mismatch; the message names both values and the command that
                builds the right table.

        >>> lut = LatencyTable(device="a", backend="onnxruntime", resolution=32, num_classes=10,
        ...                    in_chans=1, distillation=True, space_name="s", space_hash="h")
        >>> lut.check_compatible(device="a", resolution=32, space_hash="h")
        """
        where = self._where()
        if device is not None and device != self.device:
            raise NasUserError(f"{where} was built for device {self.device!r}, not {device!r}; build one with: "
                               f"nas-build-lut --device {device} --resolution {resolution or self.resolution}")
        if resolution is not None and resolution != self.resolution:
            raise NasUserError(f"{where} was built for resolution {self.resolution}, not {resolution}; build one "
                               f"with: nas-build-lut --device {self.device} --resolution {resolution}")
        if space_hash is not None and space_hash != self.space_hash:
            raise NasUserError(f"{where} was built for search space {self.space_name!r} (hash {self.space_hash}), "
                               f"not for a space with hash {space_hash}; rebuild it in the run's folder with: "
                               f"nas-build-lut --device {self.device}")

    def setup_fields(self) -> dict[str, Any]:
        """The header fields two tables must share to be merged or resumed."""
        return {name: getattr(self, name) for name in _SETUP_FIELDS}

    def check_same_setup(self, other: LatencyTable, *, action: str = "combine") -> None:
        """Raise :class:`NasUserError` unless ``other`` was measured under the same setup.

        The message names the differing fields with both values, e.g. ``refusing to resume
        'lut.json': it was built for device='iphone12' but this run is for device='local-cpu'``.
        """
        mine, theirs = self.setup_fields(), other.setup_fields()
        diff = [k for k in _SETUP_FIELDS if mine[k] != theirs[k]]
        if diff:
            name = repr(str(self.path)) if self.path is not None else "the first table"
            other_name = repr(str(other.path)) if other.path is not None else "this run"
            hint = ("merge only the shards of one build" if action == "merge"
                    else "pass another --out or delete the file")
            raise NasUserError(
                f"refusing to {action} {name}: it was built for {', '.join(f'{k}={mine[k]!r}' for k in diff)} but "
                f"{other_name} is for {', '.join(f'{k}={theirs[k]!r}' for k in diff)}; {hint}")

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": LUT_SCHEMA,
            "format": _FORMAT,
            "device": self.device,
            "backend": self.backend,
            "profile": self.profile,
            "environment": self.environment,
            "threads": self.threads,
            "batch": self.batch,
            "precision": self.precision,
            "resolution": self.resolution,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "distillation": self.distillation,
            "space_name": self.space_name,
            "space_hash": self.space_hash,
            "space": self.space,
            "date": self.date,
            "updated": self.updated,
            "predicted": self.predicted,
            "predicted_entries": self.n_predicted,
            "measurement": self.measurement,
            "statistic": self.statistic,
            "complete": self.complete,
            "expected_entries": self.expected_entries,
            "shard": self.shard,
            "calibration": self.calibration.to_dict(),
            "prior": self.prior,
            "validation": self.validation,
            "entries": {k: e.to_dict() for k, e in self.items()},
        }

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the table atomically (a reader never sees a half-written file).

        Args:
            path: destination; defaults to the path it was loaded from or last saved to.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise NasUserError("LatencyTable.save needs a path (the table was not loaded from a file)")
        atomic_write_json(target, self.to_dict())
        self.path = target
        return target

    def sha256(self) -> str | None:
        """SHA-256 of the file last loaded or saved (None when there is none)."""
        if self.path is None or not self.path.is_file():
            return None
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "LUT") -> LatencyTable:
        """Build a table from :meth:`to_dict` output, validating every field.

        Raises:
            FileFormatError: anything missing, of the wrong type or inconsistent; the message
                names the field (and the entry key).
        """
        if not isinstance(data, dict):
            raise FileFormatError(f"{where} must hold a JSON object, got {type(data).__name__}")
        if data.get("format") != _FORMAT or "entries" not in data:
            raise FileFormatError(f"{where} is not a latency LUT (no \"format\": {_FORMAT!r} and entries); "
                                  f"write one with nas-build-lut")
        if data.get("schema") != LUT_SCHEMA:
            raise FileFormatError(f"{where} has schema {data.get('schema')!r}; this version reads schema "
                                  f"{LUT_SCHEMA} (rebuild it with nas-build-lut)")
        required = ("device", "backend", "resolution", "num_classes", "in_chans", "distillation", "space_name",
                    "space_hash", "threads", "batch", "calibration", "predicted", "measurement")
        missing = [k for k in required if k not in data]
        if missing:
            raise FileFormatError(f"{where} is missing header field(s) {', '.join(missing)}")
        for name in ("profile", "environment"):
            if not isinstance(data.get(name, {}), dict):
                raise FileFormatError(f"{where}: `{name}` must be an object")
        for name in ("space", "prior", "validation"):
            if data.get(name) is not None and not isinstance(data.get(name), dict):
                raise FileFormatError(f"{where}: `{name}` must be an object or null")
        try:
            calibration = Calibration.from_dict(data["calibration"])
            table = cls(
                device=data["device"], backend=data["backend"], resolution=data["resolution"],
                num_classes=data["num_classes"], in_chans=data["in_chans"], distillation=data["distillation"],
                space_name=data["space_name"], space_hash=data["space_hash"], space=data.get("space"),
                profile=data.get("profile"), environment=data.get("environment"), threads=data["threads"],
                batch=data["batch"], precision=data.get("precision"), measurement=data["measurement"],
                statistic=data.get("statistic", "median"), expected_entries=data.get("expected_entries"), shard=data.get("shard"), calibration=calibration,
                prior=data.get("prior"), validation=data.get("validation"), date=data.get("date"),
            )
        except NasUserError as exc:
            raise FileFormatError(f"{where}: {exc}") from None
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise FileFormatError(f"{where}: `entries` must be an object of spec key -> entry")
        for key, value in entries.items():
            try:
                BlockSpec.from_key(key)
                table._entries[key] = LutEntry.from_dict(value)
            except NasUserError as exc:
                raise FileFormatError(f"{where}: entry {key!r}: {exc}") from None
        if bool(data["predicted"]) != table.predicted:
            raise FileFormatError(f"{where}: header says predicted={data['predicted']!r} but the entries say "
                                  f"{table.predicted} (edited by hand?); rebuild it with nas-build-lut")
        table.updated = data.get("updated", table.date)
        return table

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """Read and validate a LUT file.

        Raises:
            FileFormatError: missing, truncated, corrupt or not a LUT (the message names the file).
        """
        path = Path(path)
        data = read_json(path, what="LUT")
        table = cls.from_dict(data, where=f"LUT {str(path)!r}")
        table.path = path
        return table


def merge_tables(tables: Iterable[LatencyTable]) -> LatencyTable:
    """Join tables of one setup (e.g. the shards of a split build) into one.

    A measured entry beats a predicted one. When two tables both measured a key, the entry
    with more timed runs is kept (the first on a tie); the count of such overlaps is logged.

    Args:
        tables: two or more tables with the same device, backend, threads, batch,
            precision, resolution, classes, input channels, distillation and space hash.

    Returns:
        A new table (``measurement`` ``merged`` unless all inputs share one), with the
        first table's header, ``shard`` cleared and ``expected_entries`` taken from the
        space when the tables record it.

    Raises:
        NasUserError: fewer than one table, or tables of different setups (the message names
            the differing fields and files).
    """
    tables = list(tables)
    if not tables:
        raise NasUserError("nothing to merge: pass at least one LUT file")
    first = tables[0]
    for t in tables[1:]:
        first.check_same_setup(t, action="merge")
    measurements = {t.measurement for t in tables}
    out = LatencyTable(
        device=first.device, backend=first.backend, resolution=first.resolution, num_classes=first.num_classes,
        in_chans=first.in_chans, distillation=first.distillation, space_name=first.space_name,
        space_hash=first.space_hash, space=first.space, profile=first.profile, environment=first.environment,
        threads=first.threads, batch=first.batch, precision=first.precision,
        measurement=measurements.pop() if len(measurements) == 1 else "merged", statistic=first.statistic,
        expected_entries=None, shard=None, calibration=first.calibration, prior=first.prior,
    )
    hosts = {str(t.environment.get("host", {}).get("cpu")) for t in tables}
    if len(hosts) > 1:
        logger.warning("merging tables measured on different hosts (%s); their figures may not be comparable",
                       ", ".join(sorted(hosts)))
    out.environment = {**first.environment, "merged_from": [
        {"path": str(t.path) if t.path else None, "shard": t.shard, "entries": len(t),
         "host": t.environment.get("host", {}).get("cpu")} for t in tables]}
    overlaps = 0
    for t in tables:
        for key, entry in t.items():
            old = out._entries.get(key)
            if old is None or (entry.measured and not old.measured):
                out._entries[key] = entry
            elif entry.measured and old.measured:
                overlaps += 1
                if (entry.stats.count if entry.stats else 0) > (old.stats.count if old.stats else 0):
                    out._entries[key] = entry
    if overlaps:
        logger.info("%d keys were measured in more than one table; kept the entry with more runs", overlaps)
    if first.space is not None:
        from search_spaces.enumerate import enumerate_specs

        specs = enumerate_specs(SearchSpace.from_dict(first.space), resolution=first.resolution,
                                num_classes=first.num_classes, in_chans=first.in_chans,
                                distillation=first.distillation)
        out.expected_entries = len(specs)
    out._touch()
    return out
