"""Device profiles: what to run on a device and how to time it.

A :class:`DeviceProfile` names a deployment target and fixes everything that
changes a latency figure: the runtime (ONNX Runtime or CoreML), thread count,
batch size, precision, execution providers or compute units, graph
optimisation level, and the number of warm-up and timed runs.

Three profiles are built in (see :func:`list_profiles`):

``local-cpu``
    ONNX Runtime on this machine's CPU, 1 thread, all graph optimisations,
    fp32. Measured here, directly.
``snapdragon855``
    ONNX Runtime on the arm64 CPU of a Snapdragon 855 phone (Pixel 4 class).
    **One thread**: a single big core is what mobile NAS papers
    (MnasNet, ProxylessNAS, Once-for-All, nn-Meter) report, and it is the most
    reproducible setting on a big.LITTLE chip, where more threads let the
    scheduler mix fast and slow cores. Pin the runner to the prime core
    (``taskset 80 python runner.py``) on the phone. Use
    ``get_profile("snapdragon855", threads=4)`` to profile the four big cores.
    Not local: measured through a bundle.
``iphone12``
    CoreML ``mlprogram``, fp16, compute units ALL (CPU, GPU and Neural
    Engine), minimum deployment target iOS16. Not local: converted here,
    timed on Apple hardware.

Users add devices without code through a TOML or JSON file whose keys are the
fields of :class:`DeviceProfile` (:func:`load_profile_file`). A file may start
from a built-in with ``base = "snapdragon855"`` and override some fields::

    name = "pixel7-4t"
    base = "snapdragon855"
    threads = 4
    description = "Tensor G2, ONNX Runtime, four threads"

>>> get_profile("local-cpu").backend
'onnxruntime'
>>> get_profile("snapdragon855", threads=4).threads
4
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.schema import Schema, validate

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "COMPUTE_UNITS",
    "DEPLOYMENT_TARGETS",
    "GRAPH_OPTIMIZATIONS",
    "DeviceProfile",
    "get_profile",
    "list_profiles",
    "load_profile_file",
]

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("onnxruntime", "coreml")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
COMPUTE_UNITS: tuple[str, ...] = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
DEPLOYMENT_TARGETS: tuple[str, ...] = (
    "iOS15", "iOS16", "iOS17", "iOS18", "iOS26", "macOS12", "macOS13", "macOS14", "macOS15", "macOS26",
)
GRAPH_OPTIMIZATIONS: tuple[str, ...] = ("disabled", "basic", "extended", "all")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MODEL_FORMATS = {"onnxruntime": "onnx", "coreml": "mlpackage"}


class DeviceProfile(Schema):
    """How to measure latency on one device: the schema of a profile file, and the value the toolkit passes around.

    Attributes:
        name: short identifier used in file names (``lut-<name>-<res>.json``);
            letters, digits, ``.``, ``_`` and ``-``.
        backend: ``"onnxruntime"`` or ``"coreml"``.
        is_local: True when this machine can measure it directly; otherwise
            measurement goes through a bundle run on the device.
        threads: intra-op threads of the runtime (ONNX Runtime); recorded, not
            applied, for CoreML.
        batch: batch size of every measured input (the leading dimension).
        precision: ``"fp32"`` or ``"fp16"`` (fp16 needs the coreml backend).
        compute_units: CoreML compute units: ALL, CPU_ONLY, CPU_AND_GPU or
            CPU_AND_NE.
        minimum_deployment_target: CoreML target, ``"iOS16"`` and so on.
        providers: ONNX Runtime execution providers, in priority order.
        graph_optimization: ONNX Runtime level: disabled, basic, extended or all.
        warmup: untimed runs before timing, per model.
        repeats: timed runs per model (each one a replicate in the stats).
        block_warmup: warm-up runs of each block when a LUT is built on this machine (None: ``warmup``);
            whole networks (validation, calibration, extracted models) keep ``warmup``.
        block_repeats: timed runs of each block in such a build (None: ``repeats``).
        description: free text shown in reports.

    Build one from user data with :meth:`from_dict` (or :func:`load_profile_file`), which
    raise :class:`~search_spaces.errors.NasUserError` naming the field, the bad value and the
    allowed values; direct construction raises pydantic's ``ValidationError``.
    """

    name: str
    backend: Literal[BACKENDS]
    is_local: bool = False
    threads: int = Field(1, ge=1)
    batch: int = Field(1, ge=1)
    precision: Literal[PRECISIONS] = "fp32"
    compute_units: Literal[COMPUTE_UNITS] = "ALL"
    minimum_deployment_target: Literal[DEPLOYMENT_TARGETS] = "iOS16"
    providers: tuple[str, ...] = Field(("CPUExecutionProvider",), strict=False)
    graph_optimization: Literal[GRAPH_OPTIMIZATIONS] = "all"
    warmup: int = Field(10, ge=0)
    repeats: int = Field(50, ge=1)
    block_warmup: int | None = Field(None, ge=0)
    block_repeats: int | None = Field(None, ge=1)
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("must start with a letter or digit and use only letters, digits, '.', '_' and '-' "
                             "(it becomes part of file names)")
        return value

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str, info: ValidationInfo) -> str:
        if value == "fp16" and info.data.get("backend", "coreml") != "coreml":
            raise ValueError("'fp16' needs backend 'coreml'; ONNX Runtime profiles measure fp32 models")
        return value

    @field_validator("providers", mode="before")
    @classmethod
    def _providers(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(p, str) and p.endswith("ExecutionProvider") for p in value):
            raise ValueError("must be a non-empty list of ONNX Runtime execution providers whose names end in "
                             "'ExecutionProvider', such as ['CPUExecutionProvider']")
        return value

    def runs(self, kind: str) -> tuple[int, int]:
        """``(warmup, repeats)`` for a block of a LUT build (``kind="entry"``) or a whole network (``"model"``)."""
        if kind == "entry":
            return (self.warmup if self.block_warmup is None else self.block_warmup,
                    self.repeats if self.block_repeats is None else self.block_repeats)
        return self.warmup, self.repeats

    @property
    def model_format(self) -> str:
        """File format of the models this device runs: ``"onnx"`` or ``"mlpackage"``."""
        return _MODEL_FORMATS[self.backend]

    def replace(self, **changes: Any) -> DeviceProfile:
        """A copy with some fields changed (validated again).

        Raises:
            NasUserError: a changed field outside its allowed values.
        """
        return validate(DeviceProfile, {**self.to_dict(), **changes}, source=f"device profile {self.name!r}",
                        error=NasUserError)

    def with_threads(self, threads: int) -> DeviceProfile:
        """Return a copy with another thread count (validated)."""
        return self.replace(threads=threads)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (``providers`` as a list)."""
        out = self.model_dump()
        out["providers"] = list(self.providers)
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "device profile",
                  error: type[NasUserError] = NasUserError) -> DeviceProfile:
        """Build a profile from a dict such as :meth:`to_dict` returns.

        ``name`` and ``backend`` are required; other fields take the class
        defaults, except ``precision``, which defaults to ``"fp16"`` for coreml
        and ``"fp32"`` for onnxruntime.

        Raises:
            NasUserError (or ``error``): not a dict, unknown or missing keys, or a bad value;
                the message names the field and the allowed values.
        """
        if isinstance(data, dict) and "precision" not in data and data.get("backend") == "coreml":
            data = {**data, "precision": "fp16"}
        return validate(cls, data, source=source, error=error)


_BUILTIN: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="local-cpu",
            backend="onnxruntime",
            is_local=True,
            threads=1,
            warmup=5,
            repeats=30,
            # Blocks of a LUT build: one warm-up run (only a session's first run is slow, by 5% on the
            # median) and 10 timed runs. LUTs of the full V2 space at 224 built with 10 and with 30 runs
            # per block matched the same end-to-end measurements equally well, and 30 took 2.7x as long
            # (`experiments/bench_lut.py --compare-runs 30`, 2026-12-03).
            block_warmup=1,
            block_repeats=10,
            description="ONNX Runtime on this machine's CPU, fp32, all graph optimisations",
        ),
        DeviceProfile(
            name="snapdragon855",
            backend="onnxruntime",
            is_local=False,
            threads=1,
            description=(
                "ONNX Runtime on a Snapdragon 855 (arm64, Cortex-A76 big cores), fp32, one thread on a big "
                "core; run the bundle with `taskset 80` to pin it to the prime core"
            ),
        ),
        DeviceProfile(
            name="iphone12",
            backend="coreml",
            is_local=False,
            precision="fp16",
            compute_units="ALL",
            minimum_deployment_target="iOS16",
            description="iPhone 12 (A14), CoreML mlprogram, fp16, compute units ALL, iOS16",
        ),
    )
}


def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted.

    >>> list_profiles()
    ['iphone12', 'local-cpu', 'snapdragon855']
    """
    return sorted(_BUILTIN)


def get_profile(name: str | os.PathLike[str], *, threads: int | None = None) -> DeviceProfile:
    """Look up a built-in profile by name, or load one from a ``.toml``/``.json`` file.

    Args:
        name: a built-in name (see :func:`list_profiles`) or the path of a
            profile file.
        threads: override the profile's thread count.

    Returns:
        The profile.

    Raises:
        NasUserError: unknown name (the message lists the known names), or a
            bad ``threads``.
        FileFormatError: the profile file is missing or invalid.

    >>> get_profile("iphone12").precision
    'fp16'
    """
    text = os.fspath(name)
    if text in _BUILTIN:
        profile = _BUILTIN[text]
    elif text.lower().endswith((".toml", ".json")):
        profile = load_profile_file(text)
    else:
        raise NasUserError(
            f"unknown device profile {text!r}; known profiles: {', '.join(list_profiles())} "
            f"(or pass the path of a .toml/.json profile file)"
        )
    if threads is not None:
        profile = profile.with_threads(threads)
    return profile


def _read_profile_mapping(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise FileFormatError(f"profile file {str(path)!r} must end in .toml or .json")
    if not path.is_file():
        raise FileFormatError(f"profile file {str(path)!r} does not exist or is not a file")
    raw = path.read_bytes()
    if suffix == ".json":
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FileFormatError(f"profile file {str(path)!r} is not valid JSON: {exc}") from None
    else:
        try:
            import tomllib  # Python 3.11+
        except ModuleNotFoundError:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise FileFormatError(
                    f"reading TOML profile {str(path)!r} needs Python 3.11+ or `pip install tomli`; "
                    f"or write the profile as JSON"
                ) from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise FileFormatError(f"profile file {str(path)!r} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"profile file {str(path)!r} must hold one object of profile fields")
    return data


def load_profile_file(path: str | os.PathLike[str]) -> DeviceProfile:
    """Read a device profile from a TOML or JSON file.

    The keys are the fields of :class:`DeviceProfile`. ``name`` is required;
    ``backend`` is required unless ``base`` names a built-in profile whose
    fields the file then overrides.

    Args:
        path: a ``.toml`` or ``.json`` file.

    Returns:
        The validated profile.

    Raises:
        FileFormatError: the file is missing or unreadable, or a field is
            unknown, missing or invalid (the message names the file and the
            field).
    """
    path = Path(path)
    data = _read_profile_mapping(path)
    base_name = data.pop("base", None)
    if base_name is not None:
        if base_name not in _BUILTIN:
            raise FileFormatError(
                f"profile file {str(path)!r}: `base` must be one of {', '.join(list_profiles())}; "
                f"got {base_name!r}"
            )
        if "name" not in data:
            raise FileFormatError(f"profile file {str(path)!r}: `name` is required (a profile based on "
                                  f"{base_name!r} needs its own name)")
        merged = _BUILTIN[base_name].to_dict()
        merged.update(data)
        data = merged
    profile = DeviceProfile.from_dict(data, source=f"profile file {str(path)!r}", error=FileFormatError)
    logger.debug("loaded device profile %s from %s", profile.name, path)
    return profile

