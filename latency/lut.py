"""The latency lookup table (LUT): one latency figure per block spec, for one device.

A :class:`LatencyTable` maps block-spec keys (:attr:`search_spaces.BlockSpec.key`) to
:class:`LutEntry` values, under a header that says exactly what was measured: device, backend,
profile, environment (host and runtime versions), threads, batch, resolution, classes, input
channels, distillation head, the search space and its hash, the date, whether figures are
predicted, how they were measured, the calibration and the validation summary.

The file format (schema 2) is defined by the schema models of :mod:`latency.lut_file`;
schema-1 files written by earlier versions are read and converted on load.

>>> from latency.stats import LatencyStats
>>> lut = LatencyTable(device="demo", backend="onnxruntime", resolution=32, num_classes=10,
...                    in_chans=1, distillation=True, space_name="s", space_hash="abc123abc123")
>>> lut.set_measured("ef2.head|cin=8|cout=8|size=4|num_classes=10|distillation=1",
...                  LatencyStats.from_samples([0.1, 0.2, 0.3]))
>>> len(lut), lut.predicted
(1, False)
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from latency.calibration import Calibration
from latency.lut_file import (
    CALIBRATION_METHODS,
    FORMAT,
    LUT_SCHEMA,
    MEASUREMENTS,
    SOURCES,
    STATISTICS,
    LutEntry,
    LutFile,
    LutHeader,
    now_utc,
    upgrade,
)
from latency.specs import ResolutionLike
from latency.stats import LatencyStats
from search_spaces import LoweringSetup, SearchSpace, format_resolution, parse_resolution, resolution_json
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.fileio import atomic_write_json, read_json
from search_spaces.schema import validate

__all__ = ["LUT_SCHEMA", "SOURCES", "MEASUREMENTS", "CALIBRATION_METHODS", "STATISTICS", "LutEntry", "Calibration",
           "LatencyTable", "merge_tables", "default_lut_path"]

logger = logging.getLogger(__name__)

#: Header fields that must agree for two tables to describe the same measurement setup.
_SETUP_FIELDS = ("device", "backend", "threads", "batch", "precision", "resolution", "num_classes", "in_chans",
                 "distillation", "task", "space_hash")


def default_lut_path(device: str, resolution: ResolutionLike, folder: str | os.PathLike[str] = ".", *,
                     task: str = "classify") -> Path:
    """Where ``nas-build-lut`` writes, and ``nas-search`` looks for, a device's LUT.

    Args:
        device: the profile name.
        resolution: ``224``, ``"512x1024"`` or ``(height, width)``; a square one names the
            file by its side.
        folder: the folder.
        task: ``classify``, or ``backbone`` (profiled without the head: ``-backbone`` in the name).

    >>> default_lut_path("iphone12", 32).name
    'lut-iphone12-32.json'
    >>> default_lut_path("iphone12", (512, 1024)).name
    'lut-iphone12-512x1024.json'
    >>> default_lut_path("iphone12", (512, 1024), task="backbone").name
    'lut-iphone12-512x1024-backbone.json'
    """
    suffix = "" if task == "classify" else f"-{task}"
    return Path(folder) / f"lut-{device}-{format_resolution(parse_resolution(resolution))}{suffix}.json"


class LatencyTable:
    """A device's latency LUT: header plus one :class:`LutEntry` per block-spec key.

    Construct it with the header fields (keyword-only), add entries with
    :meth:`set_measured` / :meth:`set_predicted`, save with :meth:`save`, read with
    :meth:`load`. :func:`latency.predict_latency` turns it into network latencies. The header
    is validated by :class:`latency.lut_file.LutHeader`, the file on save and load by
    :class:`latency.lut_file.LutFile`.

    Args:
        device: profile name (e.g. ``"local-cpu"``).
        backend: ``"onnxruntime"`` or ``"coreml"``.
        setup: the :class:`~search_spaces.LoweringSetup` the keys were lowered under (its
            ``distillation`` decided); or give its fields ``resolution`` (``224``, ``"HxW"`` or
            ``(h, w)``), ``num_classes``, ``in_chans``, ``distillation`` and ``task``.
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
        NasUserError: a header value of the wrong type or out of range (the message names the
            field and the allowed values).
    """

    def __init__(self, *, device: str, backend: str, space_name: str, space_hash: str,
                 setup: LoweringSetup | None = None, resolution: ResolutionLike | None = None,
                 num_classes: int | None = None, in_chans: int | None = None, distillation: bool | None = None,
                 task: str | None = None,
                 space: Mapping[str, Any] | None = None, profile: Mapping[str, Any] | None = None,
                 environment: Mapping[str, Any] | None = None, threads: int | None = None, batch: int | None = None,
                 precision: str | None = None, measurement: str = "in-process", statistic: str = "median",
                 expected_entries: int | None = None, shard: str | None = None,
                 calibration: Calibration | None = None, prior: Mapping[str, Any] | None = None,
                 validation: Mapping[str, Any] | None = None, date: str | None = None) -> None:
        if setup is None:
            fields = {"resolution": resolution, "num_classes": num_classes, "in_chans": in_chans,
                      "distillation": distillation, "task": task}
            setup = LoweringSetup(**{k: v for k, v in fields.items() if v is not None})
        if setup.distillation is None:
            raise NasUserError("LUT `distillation` must be true or false, got None")
        profile = dict(profile or {})
        header = validate(LutHeader, {
            "device": device, "backend": backend, "resolution": resolution_json(setup.resolution),
            "num_classes": setup.num_classes, "in_chans": setup.in_chans, "distillation": setup.distillation,
            "task": setup.task, "space_name": space_name, "space_hash": space_hash,
            "space": dict(space) if space is not None else None, "profile": profile,
            "environment": dict(environment or {}),
            "threads": threads if threads is not None else profile.get("threads", 1),
            "batch": batch if batch is not None else profile.get("batch", 1),
            "precision": precision if precision is not None else profile.get("precision", "fp32"),
            "measurement": measurement, "statistic": statistic, "expected_entries": expected_entries, "shard": shard,
            "prior": dict(prior) if prior is not None else None,
            "validation": dict(validation) if validation is not None else None, "date": date or now_utc(),
        }, source="LUT header", error=NasUserError)
        self.setup = setup
        self.device, self.backend = header.device, header.backend
        self.space_name, self.space_hash, self.space = header.space_name, header.space_hash, header.space
        self.profile, self.environment = header.profile, header.environment
        self.threads, self.batch, self.precision = header.threads, header.batch, header.precision
        self.measurement, self.statistic = header.measurement, header.statistic
        self.expected_entries, self.shard = header.expected_entries, header.shard
        self.calibration = calibration if calibration is not None else Calibration()
        self.prior, self.validation = header.prior, header.validation
        self.date = header.date
        self.updated = self.date
        self.path: Path | None = None
        self._entries: dict[str, LutEntry] = {}
        self._version = 0

    # ------------------------------------------------------------------ the lowering setup
    @property
    def resolution(self) -> int | tuple[int, int]:
        """The input side for a square setup, else ``(height, width)``; :attr:`setup` has both always."""
        return self.setup.height if self.setup.square else self.setup.resolution

    @property
    def num_classes(self) -> int:
        return self.setup.num_classes

    @property
    def in_chans(self) -> int:
        return self.setup.in_chans

    @property
    def distillation(self) -> bool:
        return bool(self.setup.distillation)

    @property
    def task(self) -> str:
        return self.setup.task

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
        self.updated = now_utc()

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

    def search_space(self) -> SearchSpace | None:
        """The recorded search space, or None when the table does not carry one."""
        return SearchSpace.from_dict(self.space) if self.space is not None else None

    # ------------------------------------------------------------------ compatibility
    @property
    def stand_in_host(self) -> str | None:
        """The host that measured in the device's place, described, or None when the figures are the device's own.

        A CoreML bundle runs only on macOS, so results imported for a device whose profile targets
        iOS (``iphone12``) time the Mac that ran them, not the phone. Their ``results.json``
        records the host: ``"macOS 14.5, Apple M2 (Mac14,3)"``.
        """
        host = self.environment.get("host")
        if not isinstance(host, dict) or self.backend != "coreml" or self.measurement == "predicted":
            return None
        target = str(self.profile.get("minimum_deployment_target", "iOS"))
        if host.get("system") != "Darwin" or not target.startswith("iOS"):
            return None
        chip = host.get("chip") or host.get("cpu") or host.get("machine") or "unknown chip"
        model = f" ({host['model']})" if host.get("model") else ""
        return f"macOS {host.get('macos') or '?'}, {chip}{model}"

    @property
    def source_label(self) -> str:
        """What the table's figures are, for every place that shows them.

        ``"predicted"`` (any entry from an analytical prior), ``"measured-lut"``, or
        ``"measured-lut (macOS host, not iphone12)"`` when a Mac measured in the device's place
        (see :attr:`stand_in_host`).

        >>> LatencyTable(device="d", backend="onnxruntime", resolution=32, num_classes=10, in_chans=1,
        ...              distillation=True, space_name="s", space_hash="h").source_label
        'measured-lut'
        """
        if self.predicted:
            return "predicted"
        if self.stand_in_host is not None:
            return f"measured-lut (macOS host, not {self.device})"
        return "measured-lut"

    def describe(self) -> str:
        """One line: device, resolution, space and what kind of figures the table holds."""
        kind = "PREDICTED" if self.predicted else "measured"
        if self.predicted and self.n_predicted < len(self):
            kind = f"{len(self) - self.n_predicted} measured + {self.n_predicted} PREDICTED"
        host = self.stand_in_host
        if host is not None:
            kind += f" on a macOS host ({host}), not on the {self.device} itself"
        return (f"{self.device} @ {self.setup.text}px, space {self.space_name} ({self.space_hash}), "
                f"{len(self)} entries ({kind}), statistic {self.statistic}, calibration {self.calibration.method}")

    def _where(self) -> str:
        return f"LUT {str(self.path)!r}" if self.path is not None else "the LUT"

    def check_compatible(self, *, device: str | None = None, resolution: ResolutionLike | None = None,
                         space_hash: str | None = None, task: str | None = None) -> None:
        """Refuse a table built for another device, resolution or search space.

        Args:
            device: the device the caller needs.
            resolution: the input size the caller needs (``224``, ``"HxW"`` or ``(h, w)``).
            space_hash: the hash of the caller's search space.
            task: ``classify`` or ``backbone``, the deployment the caller needs.

        Raises:
            NasUserError: a mismatch; the message names both values and the command that
                builds the right table.

        >>> lut = LatencyTable(device="a", backend="onnxruntime", resolution=32, num_classes=10,
        ...                    in_chans=1, distillation=True, space_name="s", space_hash="h")
        >>> lut.check_compatible(device="a", resolution=32, space_hash="h")
        """
        where = self._where()
        wanted = format_resolution(parse_resolution(resolution)) if resolution is not None else None
        if device is not None and device != self.device:
            raise NasUserError(f"{where} was built for device {self.device!r}, not {device!r}; build one with: "
                               f"nas-build-lut --device {device} --resolution {wanted or self.setup.text}")
        if wanted is not None and wanted != self.setup.text:
            raise NasUserError(f"{where} was built for resolution {self.setup.text}, not {wanted}; build one "
                               f"with: nas-build-lut --device {self.device} --resolution {wanted}")
        if task is not None and task != self.setup.task:
            raise NasUserError(f"{where} was built for task {self.setup.task!r}, not {task!r}; build one with: "
                               f"nas-build-lut --device {self.device} --resolution {self.setup.text} --task {task}")
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
        """The file document (schema 2; see :mod:`latency.lut_file`)."""
        return {
            "schema": LUT_SCHEMA, "format": FORMAT,
            "device": self.device, "backend": self.backend, "profile": self.profile,
            "environment": self.environment, "threads": self.threads, "batch": self.batch,
            "precision": self.precision, "resolution": resolution_json(self.setup.resolution),
            "num_classes": self.num_classes, "in_chans": self.in_chans, "distillation": self.distillation,
            "task": self.task, "space_name": self.space_name, "space_hash": self.space_hash, "space": self.space,
            "date": self.date, "updated": self.updated, "predicted": self.predicted,
            "predicted_entries": self.n_predicted, "measurement": self.measurement, "statistic": self.statistic,
            "complete": self.complete, "expected_entries": self.expected_entries, "shard": self.shard,
            "calibration": self.calibration.to_dict(), "prior": self.prior, "validation": self.validation,
            "entries": {k: e.to_dict() for k, e in self.items()},
        }

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Validate and write the table atomically (a reader never sees a half-written file).

        Args:
            path: destination; defaults to the path it was loaded from or last saved to.

        Raises:
            NasUserError: no path, or a header field set to a value the format refuses.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise NasUserError("LatencyTable.save needs a path (the table was not loaded from a file)")
        data = self.to_dict()
        validate(LutFile, data, source=f"LUT {str(target)!r} (not written)", error=NasUserError)
        atomic_write_json(target, data)
        self.path = target
        return target

    def sha256(self) -> str | None:
        """SHA-256 of the file last loaded or saved (None when there is none)."""
        if self.path is None or not self.path.is_file():
            return None
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "LUT") -> LatencyTable:
        """Build a table from a file document (schema 2, or schema 1 converted), validating every field.

        Raises:
            FileFormatError: anything missing, of the wrong type or inconsistent; the message
                names the field path (and the entry key), the bad value and the allowed values.
        """
        if not isinstance(data, dict):
            raise FileFormatError(f"{where} must hold a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT or "entries" not in data:
            raise FileFormatError(f"{where} is not a latency LUT (no \"format\": {FORMAT!r} and entries); "
                                  f"write one with nas-build-lut")
        model = validate(LutFile, upgrade(data, where=where), source=where)
        header = model.model_dump(include=set(LutHeader.model_fields) - {"calibration", "updated", "resolution",
                                                                          "num_classes", "in_chans", "distillation",
                                                                          "task"})
        setup = LoweringSetup(resolution=model.resolution, num_classes=model.num_classes, in_chans=model.in_chans,
                              distillation=model.distillation, task=model.task)
        table = cls(setup=setup, calibration=Calibration.from_model(model.calibration), **header)
        for key, entry in model.entries.items():
            try:
                table._entries[key] = LutEntry.from_model(entry)
            except NasUserError as exc:
                raise FileFormatError(f"{where}: entry {key!r}: {exc}") from None
        if model.predicted != table.predicted:
            raise FileFormatError(f"{where}: header says predicted={model.predicted!r} but the entries say "
                                  f"{table.predicted} (edited by hand?); rebuild it with nas-build-lut")
        table.updated = model.updated or table.date
        return table

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """Read and validate a LUT file (schema 2, or schema 1, converted).

        Raises:
            FileFormatError: missing, truncated, corrupt or not a LUT (the message names the file).
        """
        path = Path(path)
        data = read_json(path, what="LUT")
        table = cls.from_dict(data, where=f"LUT {str(path)!r}")
        table.path = path
        return table


def __getattr__(name: str) -> Any:
    """``merge_tables`` lives in :mod:`latency.merge`; it stays importable from here."""
    if name == "merge_tables":
        from latency.merge import merge_tables

        return merge_tables
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
