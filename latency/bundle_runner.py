#!/usr/bin/env python3
# One file on purpose, over the house limit of 500 lines: it is copied into every bundle and run
# on phones and Macs with only numpy plus onnxruntime or coremltools, so it cannot import helpers
# from elsewhere. It holds manifest validation, host information, the two runtimes, the timing
# loop, the results file and the command line; every function stays under 80 lines.
"""Time the models of a latency bundle on this device and write ``results.json``.

This file is copied into every bundle as ``runner.py`` and runs on the target
device. It needs only the standard library, numpy and ONNX Runtime (or, for
CoreML bundles, coremltools on macOS); it never imports torch or the toolkit.
The toolkit imports its timing helpers (:func:`time_runs`,
:func:`make_ort_session`, :func:`ort_run_fn`) so that local and remote
measurements share one timing loop.

Manifest (``manifest.json`` in the bundle)::

    {"schema": 1, "device": "snapdragon855", "backend": "onnxruntime",
     "format": "onnx", "threads": 1, "batch": 1, "warmup": 10, "repeats": 50,
     "entries": [{"key": "<block key>", "file": "blocks/0001.onnx",
                  "input_shape": [1, 48, 56, 56]}, ...],
     "models": [{"name": "subnet-0", "file": "models/subnet-0.onnx",
                 "input_shape": [1, 3, 224, 224]}]}

``models`` (whole networks, timed end to end for validation) is optional.
Optional keys: ``providers`` (ONNX Runtime execution providers, default
``["CPUExecutionProvider"]``), ``graph_optimization`` (disabled, basic,
extended or all; default all), ``compute_units`` (CoreML, default ALL),
``seed`` (input data, default 0).

Results (``results.json``)::

    {"schema": 1, "manifest_sha256": "<sha256 of manifest.json bytes>",
     "device": ..., "backend": ..., "host": {"platform", "machine", "python",
     "versions": {...}, ...}, "threads": 1, "warmup": 10, "repeats": 50,
     "complete": true, "results": {"<key>": {"samples_ms": [...]}, ...},
     "models": {"<name>": {"samples_ms": [...]}}, "runs": [...]}

How it times: inputs are fixed random float32 arrays (``numpy`` Generator,
seed 0); each model is loaded once per group; a group of up to ``--chunk``
models is warmed up, then timed round-robin (one run of each model per round,
the starting model rotating), so slow drift (thermal, background load) spreads
over all models of a group instead of biasing a few, and no model is timed
with caches kept warm by its own previous run. Every timed run is recorded
(``time.perf_counter_ns``, garbage collection paused while timing). Whole
models are timed one at a time, spread evenly between the block groups.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:  # types only: the runner imports numpy and its runtime when it needs them
    import numpy
    import onnxruntime

__all__ = [
    "SCHEMA",
    "BundleError",
    "RunFailure",
    "manifest_sha256",
    "load_manifest",
    "host_info",
    "random_input",
    "make_ort_session",
    "ort_run_fn",
    "coreml_run_fn",
    "time_runs",
    "plan_groups",
    "main",
]

T = TypeVar("T")

SCHEMA = 1
MANIFEST_NAME = "manifest.json"
RESULTS_NAME = "results.json"
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
BACKEND_FORMATS = {"onnxruntime": "onnx", "coreml": "mlpackage"}
GRAPH_OPTIMIZATION_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
_PROG = "runner.py"


class BundleError(ValueError):
    """Bad input: a missing or invalid manifest, bundle file, argument or results file (exit 2)."""


class RunFailure(RuntimeError):
    """A model failed to load or run on this device (exit 1)."""


# --------------------------------------------------------------------------- manifest


def manifest_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of the exact bytes of a manifest file.

    Args:
        path: ``manifest.json``, or the bundle folder that holds it.

    Returns:
        64 lowercase hex digits; ``results.json`` stores it to say which
        manifest it measured.

    Raises:
        BundleError: the file does not exist.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError as exc:
        raise BundleError(f"cannot read manifest {str(p)!r}: {exc.strerror or exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shape(value: Any, where: str, batch: int | None) -> tuple[int, ...]:
    if (not isinstance(value, list) or not 1 <= len(value) <= 6
            or not all(_is_int(d) and d >= 1 for d in value)):
        raise BundleError(f"{where}.input_shape must be a list of 1-6 positive integers, got {value!r}")
    if batch is not None and value[0] != batch:
        raise BundleError(
            f"{where}.input_shape {value} starts with batch {value[0]}, but the manifest batch is {batch}")
    return tuple(value)


def _check_file(bundle: Path, value: Any, where: str, fmt: str) -> Path:
    if not isinstance(value, str) or not value:
        raise BundleError(f"{where}.file must be a path relative to the bundle, got {value!r}")
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts:
        raise BundleError(f"{where}.file {value!r} must be a relative path inside the bundle (no '..')")
    path = bundle / rel
    suffix = "." + fmt
    if not value.endswith(suffix):
        raise BundleError(f"{where}.file {value!r} must end in {suffix} for format {fmt!r}")
    exists = path.is_dir() if fmt == "mlpackage" else path.is_file()
    if not exists:
        raise BundleError(f"{where}.file {value!r} is missing from the bundle {str(bundle)!r} (copy the whole folder)")
    return path


def _check_items(bundle: Path, items: Any, where: str, id_field: str, fmt: str,
                 batch: int | None) -> list[dict[str, Any]]:
    """Validate a manifest's ``entries`` or ``models`` list; each item gains ``path``."""
    if not isinstance(items, list):
        raise BundleError(f"{where} must be a list, got {type(items).__name__}")
    seen = set()
    clean = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise BundleError(f"{at} must be an object with {id_field}, file and input_shape")
        ident = item.get(id_field)
        if not isinstance(ident, str) or not ident:
            raise BundleError(f"{at}.{id_field} must be a non-empty string, got {ident!r}")
        if ident in seen:
            raise BundleError(f"{at}.{id_field} {ident!r} appears twice; each must be unique")
        seen.add(ident)
        clean.append({
            id_field: ident,
            "file": item.get("file"),
            "path": _check_file(bundle, item.get("file"), at, fmt),
            "input_shape": _check_shape(item.get("input_shape"), at, batch),
        })
    return clean


def load_manifest(bundle: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """Read and validate a bundle's manifest.

    Args:
        bundle: the bundle folder.

    Returns:
        ``(manifest, sha256)``: the manifest with defaults filled in, each
        entry and model carrying ``path`` (absolute) and ``input_shape`` (a
        tuple); and the SHA-256 of the manifest bytes that were parsed.

    Raises:
        BundleError: the manifest is missing, not JSON, or has a bad field (the
            message names it), or a model file is missing.
    """
    bundle = Path(bundle)
    mpath = bundle / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"no {MANIFEST_NAME} in {str(bundle)!r}; pass the bundle folder with --bundle DIR")
    raw = mpath.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{str(mpath)!r} is not valid JSON (truncated or corrupt?): {exc}") from None
    if not isinstance(m, dict):
        raise BundleError(f"{str(mpath)!r} must hold a JSON object, got {type(m).__name__}")
    where = MANIFEST_NAME
    if m.get("schema") != SCHEMA:
        raise BundleError(f"{where}: schema must be {SCHEMA}, got {m.get('schema')!r} (bundle from another version?)")
    if not isinstance(m.get("device"), str) or not m["device"]:
        raise BundleError(f"{where}: device must be a non-empty string, got {m.get('device')!r}")
    backend = m.get("backend")
    if backend not in BACKEND_FORMATS:
        raise BundleError(f"{where}: backend must be one of {', '.join(BACKEND_FORMATS)}, got {backend!r}")
    fmt = m.get("format", BACKEND_FORMATS[backend])
    if fmt != BACKEND_FORMATS[backend]:
        raise BundleError(f"{where}: format must be {BACKEND_FORMATS[backend]!r} for backend {backend!r}, got {fmt!r}")
    m["format"] = fmt
    for name, minimum, default in (("threads", 1, 1), ("batch", 1, None), ("warmup", 0, 10),
                                   ("repeats", 1, 50), ("seed", 0, 0)):
        value = m.get(name, default)
        if value is not None and (not _is_int(value) or value < minimum):
            raise BundleError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
        m[name] = value
    providers = m.get("providers", ["CPUExecutionProvider"])
    if not isinstance(providers, list) or not providers or not all(isinstance(p, str) and p for p in providers):
        raise BundleError(f"{where}: providers must be a non-empty list of names, got {providers!r}")
    m["providers"] = providers
    level = m.get("graph_optimization", "all")
    if level not in GRAPH_OPTIMIZATION_LEVELS:
        raise BundleError(f"{where}: graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}, "
                          f"got {level!r}")
    m["graph_optimization"] = level
    units = m.get("compute_units", "ALL")
    if units not in COMPUTE_UNITS:
        raise BundleError(f"{where}: compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {units!r}")
    m["compute_units"] = units
    for list_name, id_field in (("entries", "key"), ("models", "name")):
        m[list_name] = _check_items(bundle, m.get(list_name, [] if list_name == "models" else None),
                                    f"{where}: {list_name}", id_field, fmt, m["batch"])
    if not m["entries"] and not m["models"]:
        raise BundleError(f"{where}: entries and models are both empty; nothing to measure")
    return m, digest


# --------------------------------------------------------------------------- host and inputs


def _sysctl(name: str) -> str | None:
    """A macOS ``sysctl -n`` value (None when unavailable)."""
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_name() -> str:
    if sys.platform == "darwin":
        chip = _sysctl("machdep.cpu.brand_string")  # "Apple M2", or the Intel CPU's name
        if chip:
            return chip
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.lower().startswith(("model name", "hardware")):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return platform.processor()


def host_info(backend: str) -> dict[str, Any]:
    """Describe this machine and the runtime versions used for ``backend``.

    Returns:
        A JSON-ready dict: platform, system, machine, cpu, cpu_count, python,
        versions (numpy and the runtime), for ONNX Runtime the available
        execution providers, and on macOS ``macos`` (the version), ``chip``
        (e.g. "Apple M2") and ``model`` (e.g. "Mac14,3").
    """
    import numpy as np

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "system": platform.system(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {"numpy": np.__version__},
    }
    if backend == "onnxruntime":
        ort = _import_onnxruntime()
        info["versions"]["onnxruntime"] = ort.__version__
        info["providers"] = list(ort.get_available_providers())
    elif backend == "coreml":
        try:
            import coremltools as ct
            info["versions"]["coremltools"] = ct.__version__
        except ImportError:
            info["versions"]["coremltools"] = None
    if sys.platform == "darwin":  # a Mac times itself: say which one (a LUT imported from it says so too)
        info["macos"] = platform.mac_ver()[0]
        info["chip"] = info["cpu"]
        info["model"] = _sysctl("hw.model")
    return info


def random_input(shape: Sequence[int], dtype: str = "float32", *, seed: int = 0) -> numpy.ndarray:
    """Fixed random input: standard normal values from ``numpy.random.default_rng(seed)``.

    Args:
        shape: e.g. ``(B, C, H, W)`` or ``(B, N, C)``.
        dtype: numpy dtype of the array handed to the runtime.
        seed: generator seed; the same seed gives the same array everywhere.
    """
    import numpy as np

    data = np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)
    return np.ascontiguousarray(data.astype(dtype, copy=False))


# --------------------------------------------------------------------------- runtimes


def _import_onnxruntime() -> types.ModuleType:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError("onnxruntime is not installed: `python -m pip install numpy onnxruntime`") from None
    return ort


def make_ort_session(model: str | os.PathLike[str] | bytes, *, threads: int, graph_optimization: str = "all",
                     providers: Sequence[str] = ("CPUExecutionProvider",),
                     save_optimized: str | os.PathLike[str] | None = None) -> onnxruntime.InferenceSession:
    """Open an ONNX Runtime session with pinned threads.

    ``intra_op_num_threads = threads``, ``inter_op_num_threads = 1``,
    sequential execution, warnings-only logging.

    Args:
        model: a path to an ``.onnx`` file, or the model's serialized bytes.
        threads: intra-op threads (>= 1).
        graph_optimization: disabled, basic, extended or all.
        providers: execution providers in priority order; each must be
            available in this ONNX Runtime build.
        save_optimized: also write the optimized graph there (valid on this
            machine only; open it with ``graph_optimization="disabled"``).

    Returns:
        An ``onnxruntime.InferenceSession``.

    Raises:
        BundleError: bad ``threads``, ``graph_optimization`` or an unavailable
            provider (the message lists the available ones).
        RunFailure: ONNX Runtime cannot load the model.
    """
    ort = _import_onnxruntime()
    if not _is_int(threads) or threads < 1:
        raise BundleError(f"threads must be an integer >= 1, got {threads!r}")
    if graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
        raise BundleError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}, "
                          f"got {graph_optimization!r}")
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise BundleError(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                          f"{ort.__version__}; available: {', '.join(available)}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION_LEVELS[graph_optimization])
    opts.log_severity_level = 3
    if save_optimized is not None:
        opts.optimized_model_filepath = str(save_optimized)
    source = bytes(model) if isinstance(model, (bytes, bytearray, memoryview)) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=list(providers))
    except Exception as exc:  # ORT raises its own exception types
        what = "model bytes" if not isinstance(source, str) else repr(source)
        raise RunFailure(f"onnxruntime cannot load {what}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def ort_run_fn(session: onnxruntime.InferenceSession, input_shape: Sequence[int], *,
               seed: int = 0) -> Callable[[], Any]:
    """A zero-argument function that runs ``session`` once on a fixed random input.

    Args:
        session: an ``onnxruntime.InferenceSession`` with one floating-point input.
        input_shape: the input shape; must match the model's static dimensions.
        seed: input data seed.

    Raises:
        BundleError: the model has several inputs, a non-float input, or a
            shape that disagrees with ``input_shape``.
    """
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BundleError(f"model must have exactly one input, it has {len(inputs)}: {[i.name for i in inputs]}")
    inp = inputs[0]
    if inp.type not in _ORT_DTYPES:
        raise BundleError(f"model input {inp.name!r} has type {inp.type}; expected one of {', '.join(_ORT_DTYPES)}")
    shape = tuple(int(d) for d in input_shape)
    declared = list(inp.shape)
    if len(declared) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape)):
        raise BundleError(f"input_shape {list(shape)} does not match the model's input {inp.name!r} {declared}")
    feed = {inp.name: random_input(shape, _ORT_DTYPES[inp.type], seed=seed)}
    outputs = [o.name for o in session.get_outputs()]
    run = session.run

    def fn() -> Any:
        return run(outputs, feed)

    return fn


def coreml_run_fn(path: str | os.PathLike[str], input_shape: Sequence[int], *, compute_units: str = "ALL",
                  seed: int = 0) -> Callable[[], Any]:
    """A zero-argument function that runs a CoreML model once (macOS only).

    The input dtype (fp16 or fp32) is read from the model description.

    Raises:
        BundleError: not macOS, coremltools missing, bad ``compute_units``, or
            the model's input disagrees with ``input_shape``.
        RunFailure: CoreML cannot load the model.
    """
    if sys.platform != "darwin":
        raise BundleError(f"CoreML prediction needs macOS; this is {platform.system()} {platform.machine()}. "
                          f"Copy the bundle to a Mac and run runner.py there")
    try:
        import coremltools as ct
        from coremltools.proto import FeatureTypes_pb2
    except ImportError:
        raise BundleError("coremltools is not installed: `python -m pip install numpy coremltools`") from None
    if compute_units not in COMPUTE_UNITS:
        raise BundleError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
    try:
        model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
    except Exception as exc:
        raise RunFailure(f"CoreML cannot load {str(path)!r}: {exc}") from exc
    desc = model.get_spec().description
    if len(desc.input) != 1:
        raise BundleError(f"CoreML model {str(path)!r} must have exactly one input, it has {len(desc.input)}")
    inp = desc.input[0]
    array_type = FeatureTypes_pb2.ArrayFeatureType
    dtypes = {array_type.FLOAT16: "float16", array_type.FLOAT32: "float32", array_type.DOUBLE: "float64"}
    dtype = dtypes.get(inp.type.multiArrayType.dataType, "float32")
    declared = [int(d) for d in inp.type.multiArrayType.shape]
    shape = tuple(int(d) for d in input_shape)
    if declared and declared != list(shape):
        raise BundleError(f"input_shape {list(shape)} does not match the CoreML input {inp.name!r} {declared}")
    feed = {inp.name: random_input(shape, dtype, seed=seed)}
    predict = model.predict

    def fn() -> Any:
        return predict(feed)

    return fn


# --------------------------------------------------------------------------- timing


def time_runs(fns: Sequence[Callable[[], Any]], *, warmup: int, repeats: int,
              interleave: bool = True) -> list[list[float]]:
    """Time zero-argument functions and return every replicate in milliseconds.

    With ``interleave`` (the default), all functions are warmed up, then timed
    round-robin: round ``r`` runs each function once, starting at function
    ``r % len(fns)``. Without it, each function is warmed up and timed on its
    own, back to back. Garbage collection is paused while timing.

    Args:
        fns: the functions, e.g. from :func:`ort_run_fn`.
        warmup: untimed runs of each function (>= 0).
        repeats: timed runs of each function (>= 1).
        interleave: round-robin (True) or one function at a time (False).

    Returns:
        ``samples[i]`` holds the ``repeats`` timings of ``fns[i]``, in ms.

    >>> samples = time_runs([lambda: None, lambda: sum(range(10))], warmup=1, repeats=3)
    >>> [len(s) for s in samples]
    [3, 3]
    """
    if not _is_int(warmup) or warmup < 0:
        raise BundleError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not _is_int(repeats) or repeats < 1:
        raise BundleError(f"repeats must be an integer >= 1, got {repeats!r}")
    n = len(fns)
    samples: list[list[float]] = [[] for _ in range(n)]
    if n == 0:
        return samples
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no gc.collect() first: in a process holding torch it is slow
    try:
        if interleave:
            for _ in range(warmup):
                for fn in fns:
                    fn()
            for r in range(repeats):
                for j in range(n):
                    i = (r + j) % n
                    fn = fns[i]
                    t0 = clock()
                    fn()
                    t1 = clock()
                    samples[i].append((t1 - t0) * 1e-6)
        else:
            for i, fn in enumerate(fns):
                for _ in range(warmup):
                    fn()
                out = samples[i]
                for _ in range(repeats):
                    t0 = clock()
                    fn()
                    t1 = clock()
                    out.append((t1 - t0) * 1e-6)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


# --------------------------------------------------------------------------- results file


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, str(path))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _valid_samples(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    samples = record.get("samples_ms")
    return (isinstance(samples, list) and len(samples) > 0 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in samples))


def _previous_results(out: Path, manifest: dict[str, Any], digest: str, threads: int,
                      only_missing: bool) -> tuple[dict[str, Any], dict[str, Any], list[Any], str]:
    """Finished results to keep from an existing results file: (results, models, runs, note)."""
    fix = "pass --fresh to measure everything again, or --out to write elsewhere"
    try:
        old = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"existing results file {str(out)!r} is unreadable ({exc}); {fix}") from None
    if not isinstance(old, dict) or old.get("schema") != SCHEMA or not isinstance(old.get("results", {}), dict) \
            or not isinstance(old.get("models", {}), dict):
        raise BundleError(f"existing file {str(out)!r} is not a schema-{SCHEMA} results file; {fix}")
    same = old.get("manifest_sha256") == digest
    if not same and not only_missing:
        raise BundleError(
            f"{str(out)!r} holds results for another manifest (sha256 {str(old.get('manifest_sha256'))[:12]}..., "
            f"this one {digest[:12]}...); pass --only-missing to keep its results for keys still in this "
            f"manifest, or {fix}")
    for field, value in (("device", manifest["device"]), ("backend", manifest["backend"]), ("threads", threads)):
        if old.get(field) != value:
            raise BundleError(f"{str(out)!r} was measured with {field}={old.get(field)!r} but this run uses "
                              f"{field}={value!r}; {fix}")
    keys = {e["key"] for e in manifest["entries"]}
    names = {m["name"] for m in manifest["models"]}
    results = {k: v for k, v in old.get("results", {}).items() if k in keys and _valid_samples(v)}
    models = {k: v for k, v in old.get("models", {}).items() if k in names and _valid_samples(v)}
    dropped = len(old.get("results", {})) + len(old.get("models", {})) - len(results) - len(models)
    runs: list[Any] = old["runs"] if isinstance(old.get("runs"), list) else []
    note = f"resuming {str(out)!r}: {len(results) + len(models)} finished"
    if dropped:
        note += f", {dropped} dropped (not in this manifest, or invalid)"
    return results, models, runs, note


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        sys.stderr.write(f"{_PROG}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _positive_int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


_EPILOG = """\
examples:
  python runner.py                          # bundle = this script's folder
  python runner.py --bundle lut-bundle --threads 1 --out results.json
  taskset 80 python runner.py               # Android/Linux: pin to one big core
  python runner.py --check                  # validate the bundle, measure nothing

how it times:
  ONNX Runtime sessions use --threads intra-op threads, 1 inter-op thread and
  sequential execution. Up to --chunk block models are loaded together, warmed
  up, then timed round-robin (one run of each per round), so drift spreads
  over all of them; whole models (manifest "models") are timed one at a time,
  spread between the block groups. Every run is recorded in milliseconds.

resuming:
  Results are written after every group of models. Run the same command
  again after an interruption and finished keys are skipped (the results
  file must belong to the same manifest: its manifest_sha256 must match).
  --only-missing also keeps finished keys from a results file written for
  another manifest (same device, backend and threads), e.g. after the bundle
  was rebuilt with more blocks. --fresh ignores an existing file.

requirements:
  onnx bundles:      python -m pip install numpy onnxruntime
  mlpackage bundles: macOS with python -m pip install numpy coremltools.
  Running a CoreML bundle on a Mac times that Mac, not an iPhone; host info
  in results.json records which machine ran it.

exit codes: 0 done, 1 a model failed to load or run, 2 bad input,
130 interrupted (finished results are kept; run again to resume).
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="Time every model of a latency bundle (manifest.json plus .onnx or .mlpackage files)\n"
                    "on this device and write the raw timings to results.json, for `nas-build-lut --import`.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    here = Path(__file__).resolve().parent
    parser.add_argument("--bundle", type=Path, default=here, metavar="DIR",
                        help="bundle folder holding manifest.json (default: this script's folder)")
    parser.add_argument("--threads", type=_positive_int(1), metavar="N",
                        help="intra-op threads (default: the manifest's threads)")
    parser.add_argument("--warmup", type=_positive_int(0), metavar="W",
                        help="untimed runs per model (default: the manifest's warmup)")
    parser.add_argument("--repeats", type=_positive_int(1), metavar="R",
                        help="timed runs per model (default: the manifest's repeats)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="results file (default: BUNDLE/results.json)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--only-missing", action="store_true",
                      help="measure only keys missing from --out, even if it was written for another manifest")
    mode.add_argument("--fresh", action="store_true", help="ignore an existing results file and measure everything")
    parser.add_argument("--chunk", type=_positive_int(1), default=16, metavar="K",
                        help="block models loaded and timed round-robin together (default: 16)")
    parser.add_argument("--no-interleave", action="store_true",
                        help="time each model back to back instead of round-robin within its group")
    parser.add_argument("--check", action="store_true", help="validate the bundle and exit without measuring")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def plan_groups(entries: Sequence[T], models: Sequence[T], chunk: int) -> list[list[tuple[str, T]]]:
    """The order of work: blocks in groups of ``chunk``, whole models one per group, spread evenly between them.

    The toolkit's in-process builds use the same plan, so local and bundle measurements time
    the same groups in the same order.

    Args:
        entries: block models (any objects).
        models: whole networks.
        chunk: blocks per group (>= 1).

    Returns:
        Groups of ``("entry", e)`` or ``("model", m)`` pairs.

    >>> plan_groups(["a", "b", "c"], ["M"], 2)
    [[('entry', 'a'), ('entry', 'b')], [('model', 'M')], [('entry', 'c')]]
    """
    if not _is_int(chunk) or chunk < 1:
        raise BundleError(f"chunk must be an integer >= 1, got {chunk!r}")
    groups: list[list[tuple[str, T]]] = [[("entry", e) for e in entries[i:i + chunk]]
                                         for i in range(0, len(entries), chunk)]
    if not models:
        return groups
    n = len(groups)
    out: list[list[tuple[str, T]]] = []
    slots = [int((j + 0.5) * n / len(models)) for j in range(len(models))]
    for i in range(n + 1):
        for j, slot in enumerate(slots):
            if slot == i:
                out.append([("model", models[j])])
        if i < n:
            out.append(groups[i])
    return out


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class _Run:
    """One run of the runner: settings, the results so far, and the results document."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.manifest, self.digest = load_manifest(args.bundle)
        m = self.manifest
        self.backend = m["backend"]
        self.threads = args.threads if args.threads is not None else m["threads"]
        self.warmup = args.warmup if args.warmup is not None else m["warmup"]
        self.repeats = args.repeats if args.repeats is not None else m["repeats"]
        self.interleave = not args.no_interleave
        self.out = args.out if args.out is not None else args.bundle / RESULTS_NAME
        self.say: Callable[[str], None] = (lambda msg: None) if args.quiet else \
            (lambda msg: sys.stderr.write(msg + "\n"))
        self.results: dict[str, Any] = {}
        self.models: dict[str, Any] = {}
        self.runs: list[Any] = []
        if self.out.exists() and not args.fresh:
            self.results, self.models, self.runs, note = _previous_results(self.out, m, self.digest, self.threads,
                                                                           args.only_missing)
            self.say(note)
        self.host: dict[str, Any] = {}
        self.record: dict[str, Any] = {}

    def check_host(self) -> None:
        """Refuse a host that cannot run this bundle (CoreML off macOS, a missing execution provider)."""
        if self.backend == "coreml" and sys.platform != "darwin":
            raise BundleError(f"CoreML prediction needs macOS; this is {platform.system()} {platform.machine()}. "
                              f"Copy the bundle to a Mac and run runner.py there")
        self.host = host_info(self.backend)
        if self.backend == "onnxruntime":
            missing = [p for p in self.manifest["providers"] if p not in self.host["providers"]]
            if missing:
                raise BundleError(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                                  f"{self.host['versions']['onnxruntime']}; available: "
                                  f"{', '.join(self.host['providers'])}")

    def start_record(self, chunk: int) -> None:
        """Append this run's record (settings and host) to the runs of the results file."""
        self.record = {"started_utc": _utc_now(), "finished_utc": None, "threads": self.threads,
                       "warmup": self.warmup, "repeats": self.repeats, "interleave": self.interleave,
                       "chunk": chunk, "measured": 0,
                       "host": {k: self.host.get(k) for k in ("platform", "machine", "cpu")}}
        earlier = {json.dumps(r.get("host"), sort_keys=True) for r in self.runs if isinstance(r, dict)}
        if earlier - {json.dumps(self.record["host"], sort_keys=True)}:
            self.say(f"warning: earlier results in {str(self.out)!r} came from another host or OS version; "
                     f"pass --fresh to measure everything on this one")
        self.runs = self.runs + [self.record]

    def document(self, complete: bool) -> dict[str, Any]:
        m, ort = self.manifest, self.backend == "onnxruntime"
        return {
            "schema": SCHEMA, "manifest_sha256": self.digest, "device": m["device"], "backend": self.backend,
            "format": m["format"], "host": self.host, "threads": self.threads, "batch": m["batch"],
            "warmup": self.warmup, "repeats": self.repeats, "interleave": self.interleave,
            "providers": m["providers"] if ort else None,
            "graph_optimization": m["graph_optimization"] if ort else None,
            "compute_units": m["compute_units"] if self.backend == "coreml" else None,
            "seed": m["seed"], "updated_utc": _utc_now(), "complete": complete,
            "results": {e["key"]: self.results[e["key"]] for e in m["entries"] if e["key"] in self.results},
            "models": {x["name"]: self.models[x["name"]] for x in m["models"] if x["name"] in self.models},
            "runs": self.runs,
        }

    def save(self, complete: bool, measured: int) -> None:
        self.record["measured"] = measured
        if complete:
            self.record["finished_utc"] = _utc_now()
        _write_json_atomic(self.out, self.document(complete=complete))

    def run_fns(self, group: list[tuple[str, dict[str, Any]]]) -> list[Callable[[], Any]]:
        """Load every model of ``group``; a failure names the model and its file."""
        m, fns = self.manifest, []
        for kind, item in group:
            try:
                if self.backend == "onnxruntime":
                    session = make_ort_session(item["path"], threads=self.threads,
                                               graph_optimization=m["graph_optimization"], providers=m["providers"])
                    fns.append(ort_run_fn(session, item["input_shape"], seed=m["seed"]))
                else:
                    fns.append(coreml_run_fn(item["path"], item["input_shape"], compute_units=m["compute_units"],
                                             seed=m["seed"]))
            except (BundleError, RunFailure) as exc:
                ident = item["key"] if kind == "entry" else item["name"]
                raise type(exc)(f"{kind} {ident!r} ({item['file']}): {exc}") from None
        return fns

    def time_group(self, group: list[tuple[str, dict[str, Any]]]) -> list[list[float]]:
        fns = self.run_fns(group)
        try:
            return time_runs(fns, warmup=self.warmup, repeats=self.repeats, interleave=self.interleave)
        except Exception as exc:
            names = ", ".join(repr(item.get("key", item.get("name"))) for _, item in group)
            raise RunFailure(f"running {names} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc


def _measure_all(run: _Run, chunk: int) -> int:
    """Time every model still to do, saving after each group; returns the exit code."""
    m = run.manifest
    todo_entries = [e for e in m["entries"] if e["key"] not in run.results]
    todo_models = [x for x in m["models"] if x["name"] not in run.models]
    total = len(todo_entries) + len(todo_models)
    run.say(f"{m['device']} ({run.backend}, {run.threads} thread(s), warmup {run.warmup}, repeats {run.repeats}): "
            f"{total} to measure, {len(run.results) + len(run.models)} already done -> {run.out}")
    done = 0
    t_start = time.monotonic()
    try:
        for group in plan_groups(todo_entries, todo_models, chunk):
            for (kind, item), s in zip(group, run.time_group(group)):
                record = {"samples_ms": [round(x, 5) for x in s]}
                if kind == "entry":
                    run.results[item["key"]] = record
                else:
                    run.models[item["name"]] = record
                done += 1
                eta = (time.monotonic() - t_start) / done * (total - done)
                ident = item["key"] if kind == "entry" else "model " + item["name"]
                run.say(f"[{done:>{len(str(total))}}/{total}] {ident}  median {sorted(s)[len(s) // 2]:.3f} ms  "
                        f"(eta {_format_eta(eta)})")
            run.save(complete=False, measured=done)
    except KeyboardInterrupt:
        run.save(complete=False, measured=done)
        sys.stderr.write(f"{_PROG}: interrupted after {done} of {total}; finished results are in {run.out}; "
                         f"run the same command to resume\n")
        return EXIT_INTERRUPTED
    run.save(complete=True, measured=done)
    run.say(f"done: {done} measured in {_format_eta(time.monotonic() - t_start)}; results in {run.out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    run = _Run(args)
    run.check_host()
    if args.check:
        run.say(f"bundle OK: {len(run.manifest['entries'])} entries, {len(run.manifest['models'])} models, "
                f"{len(run.results) + len(run.models)} already measured in {str(run.out)!r}")
        return 0
    run.start_record(args.chunk)
    if run.backend == "coreml":
        run.say("note: CoreML on macOS times this Mac, not an iPhone; results.json records the host")
    return _measure_all(run, args.chunk)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (see ``--help``)."""
    args = _build_parser().parse_args(argv)
    try:
        return _run(args)
    except BundleError as exc:
        sys.stderr.write(f"{_PROG}: error: {exc}\n")
        return EXIT_BAD_INPUT
    except RunFailure as exc:
        sys.stderr.write(f"{_PROG}: failed: {exc}\n")
        return EXIT_RUN_FAILED
    except OSError as exc:
        sys.stderr.write(f"{_PROG}: error: {exc}\n")
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
