"""Export torch modules and time them with ONNX Runtime or CoreML.

The measurement primitives behind the latency LUT. They take any
``torch.nn.Module`` plus an example input shape, ``(B, C, H, W)`` for images or
``(B, N, C)`` for tokens, taken exactly as given.

* :func:`export_onnx`: TorchScript exporter (never dynamo), eval mode,
  constant folding, input ``"input"``, output ``"output"``, checked with
  ``onnx.checker``; returns the model bytes, so nothing need touch the disk.
* :func:`ort_session` and :func:`measure_ort`: an ONNX Runtime session with
  pinned threads, and raw timings in milliseconds.
* :func:`measure_module`: export plus session plus timing for a local profile,
  summarised as :class:`~latency.stats.LatencyStats`.
* :func:`convert_coreml` and :func:`measure_coreml` (in :mod:`latency.coreml`,
  importable from here): ``mlprogram`` conversion (works everywhere) and timing
  (macOS only).

Timing uses the same loop as the bundle runner (:mod:`latency.bundle_runner`),
so a local measurement and a bundle measurement differ only in where they run.
Export, not timing, dominates the cost of a block measurement.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch

from latency import bundle_runner as _runner
from latency.profiles import DeviceProfile
from latency.stats import LatencyStats
from search_spaces.errors import NasUserError
from search_spaces.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

__all__ = [
    "torch_threads",
    "export_onnx",
    "ort_session",
    "measure_ort",
    "measure_module",
    "convert_coreml",
    "coreml_predict_available",
    "measure_coreml",
    "measurement_environment",
]

logger = logging.getLogger(__name__)

_INPUT_NAME = "input"
_OUTPUT_NAME = "output"


def _bundle_hint(device: str, *, where: str = "on the device") -> str:
    return (
        f"write a bundle with `nas-build-lut --device {device}` (model files, manifest.json and runner.py), "
        f"run `python runner.py` in it {where}, then `nas-build-lut --device {device} --import results.json`"
    )


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise NasUserError(f"`input_shape` must be a sequence of positive integers, got {input_shape!r}") from None
    if not 2 <= len(shape) <= 5 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise NasUserError(
            f"`input_shape` must hold 2-5 positive integers, e.g. (B, C, H, W) or (B, N, C); got {input_shape!r}"
        )
    return shape


def _check_count(name: str, value: Any, minimum: int) -> int:
    if type(value) is not int or value < minimum:
        raise NasUserError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(num_threads)``, restoring the old value afterwards.

    Args:
        num_threads: intra-op threads for torch inside the block (>= 1).

    Raises:
        NasUserError: ``num_threads`` is not an integer >= 1.

    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    _check_count("num_threads", num_threads, 1)
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _example_input(module: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros(shape, dtype=torch.float32, device=device)


def export_onnx(
    module: torch.nn.Module,
    input_shape: Sequence[int],
    path: str | os.PathLike[str] | None = None,
    *,
    opset: int = 17,
    check: bool = True,
    outputs: int = 1,
) -> bytes:
    """Export ``module`` to ONNX with the TorchScript exporter and check the result.

    The module is exported in eval mode under ``torch.no_grad()`` with
    constant folding and static shapes; its train/eval mode is restored
    afterwards. Torch runs on one thread meanwhile (restored afterwards): on a
    busy machine more torch threads make export several times slower, and an
    idle torch thread pool must not compete with the timing that follows. The
    graph has one input ``"input"``; its output is named ``"output"``, or, for a module
    returning ``outputs`` tensors (a backbone's stage maps), ``feature0``, ``feature1``, ....

    Args:
        module: the module to export.
        input_shape: example input shape, ``(B, C, H, W)`` or ``(B, N, C)``,
            used as given (the batch dimension included).
        path: where to write the ``.onnx`` file (atomically); None keeps it in
            memory only.
        opset: ONNX opset version (>= 11).
        check: run ``onnx.checker`` on the result (ONNX Runtime checks a model it loads
            anyway; builds that load at once skip it).
        outputs: how many tensors the module returns.

    Returns:
        The serialized model, ready for :func:`ort_session`.

    Raises:
        NasUserError: bad ``input_shape`` or ``opset``.
        TypeError: ``module`` is not a ``torch.nn.Module``.
        RuntimeError: the exporter failed (the message names the module and shape).

    >>> data = export_onnx(torch.nn.Conv2d(3, 8, 3), (1, 3, 16, 16))
    >>> onnx.load_model_from_string(data).graph.input[0].name
    'input'
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    shape = _check_shape(input_shape)
    _check_count("opset", opset, 11)
    was_training = module.training
    module.eval()
    buf = io.BytesIO()
    try:
        with torch.no_grad(), torch_threads(1), warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose (static graphs, fast export): hide its deprecation notices.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (_example_input(module, shape),),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=[_INPUT_NAME],
                output_names=[_OUTPUT_NAME] if outputs == 1 else [f"feature{i}" for i in range(outputs)],
                do_constant_folding=True,
                export_params=True,
            )
    except Exception as exc:
        raise RuntimeError(
            f"ONNX export of {type(module).__name__} at input shape {list(shape)} (opset {opset}) failed: {exc}"
        ) from exc
    finally:
        module.train(was_training)
    data = buf.getvalue()
    if check:
        onnx.checker.check_model(onnx.load_model_from_string(data))
    if path is not None:
        atomic_write_bytes(path, data)
    return data


def ort_session(
    model: str | os.PathLike[str] | bytes,
    *,
    threads: int,
    graph_optimization: str = "all",
    providers: Sequence[str] = ("CPUExecutionProvider",),
    save_optimized: str | os.PathLike[str] | None = None,
) -> InferenceSession:
    """Open an ONNX Runtime session with pinned threads.

    ``intra_op_num_threads = threads``, ``inter_op_num_threads = 1`` and
    sequential execution, exactly as the bundle runner does.

    Args:
        model: an ``.onnx`` path or serialized model bytes (from :func:`export_onnx`).
        threads: intra-op threads (>= 1).
        graph_optimization: disabled, basic, extended or all.
        providers: execution providers in priority order.
        save_optimized: also write the graph as optimized at ``graph_optimization`` there;
            it is valid on this machine only, opened with ``graph_optimization="disabled"``.

    Returns:
        An ``onnxruntime.InferenceSession``.

    Raises:
        NasUserError: bad ``threads`` or ``graph_optimization``, or a provider
            this onnxruntime build lacks (the message lists those it has).
        RuntimeError: ONNX Runtime cannot load the model.

    >>> sess = ort_session(export_onnx(torch.nn.ReLU(), (1, 4)), threads=1)
    >>> sess.get_inputs()[0].name
    'input'
    """
    _check_count("threads", threads, 1)
    try:
        return _runner.make_ort_session(
            model if isinstance(model, (bytes, bytearray)) else os.fspath(model),
            threads=threads,
            graph_optimization=graph_optimization,
            providers=tuple(providers),
            save_optimized=save_optimized,
        )
    except _runner.BundleError as exc:
        raise NasUserError(str(exc)) from None


def measure_ort(
    session_or_path: InferenceSession | str | os.PathLike[str] | bytes,
    input_shape: Sequence[int],
    *,
    warmup: int,
    repeats: int,
    threads: int | None = None,
    seed: int = 0,
) -> list[float]:
    """Time an ONNX model: ``warmup`` untimed runs, then ``repeats`` timed runs.

    The input is a fixed random float32 array from
    ``numpy.random.default_rng(seed)``. Each run is timed with
    ``time.perf_counter_ns``, with garbage collection paused.

    Args:
        session_or_path: an ``onnxruntime.InferenceSession``, an ``.onnx``
            path, or model bytes.
        input_shape: the model's input shape, e.g. ``(B, C, H, W)``.
        warmup: untimed runs (>= 0).
        repeats: timed runs (>= 1).
        threads: intra-op threads when a path or bytes are given (default 1).
            With a session, if given, it must match the session's setting.
        seed: input data seed.

    Returns:
        ``repeats`` latencies in milliseconds, in run order.

    Raises:
        NasUserError: bad counts or shape, or ``threads`` that disagrees with
            the session.

    >>> ms = measure_ort(export_onnx(torch.nn.ReLU(), (1, 4)), (1, 4), warmup=1, repeats=3)
    >>> len(ms)
    3
    """
    shape = _check_shape(input_shape)
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    if threads is not None:
        _check_count("threads", threads, 1)
    if hasattr(session_or_path, "get_inputs"):
        session = session_or_path
        configured = session.get_session_options().intra_op_num_threads
        if threads is not None and configured not in (0, threads):
            raise NasUserError(
                f"`threads`={threads} but the session was opened with intra_op_num_threads={configured}; "
                f"open it with ort_session(..., threads={threads}) or leave `threads` out"
            )
    else:
        session = ort_session(session_or_path, threads=threads if threads is not None else 1)
    try:
        fn = _runner.ort_run_fn(session, shape, seed=seed)
    except _runner.BundleError as exc:
        raise NasUserError(str(exc)) from None
    return _runner.time_runs([fn], warmup=warmup, repeats=repeats)[0]


def measure_module(
    module: torch.nn.Module,
    input_shape: Sequence[int],
    profile: DeviceProfile,
    *,
    workdir: str | os.PathLike[str] | None = None,
) -> LatencyStats:
    """Export ``module`` and time it on this machine as ``profile`` says.

    For an onnxruntime profile the model goes from the exporter to ONNX
    Runtime in memory. A local coreml profile (a Mac) goes through
    :func:`convert_coreml` and :func:`measure_coreml`.

    Args:
        module: the module, e.g. one block.
        input_shape: its input shape; the batch dimension must equal ``profile.batch``.
        profile: a local profile (``profile.is_local``).
        workdir: if given, the exported model is kept there (``model.onnx`` or
            ``model.mlpackage``) for inspection.

    Returns:
        Statistics of ``profile.repeats`` timed runs.

    Raises:
        NasUserError: a profile that is not local (the message says how to
            measure it through a bundle), or a batch mismatch.

    >>> from latency.profiles import get_profile
    >>> stats = measure_module(torch.nn.Conv2d(8, 8, 1), (1, 8, 8, 8), get_profile("local-cpu"))
    >>> stats.count
    30
    """
    if not profile.is_local:
        raise NasUserError(
            f"device profile {profile.name!r} ({profile.backend}) is not measured on this machine; "
            f"{_bundle_hint(profile.name)}"
        )
    shape = _check_shape(input_shape)
    if shape[0] != profile.batch:
        raise NasUserError(
            f"`input_shape` {list(shape)} has batch {shape[0]} but profile {profile.name!r} measures batch "
            f"{profile.batch}; build the input shape with the profile's batch"
        )
    t0 = time.perf_counter()
    if profile.backend == "coreml":
        from latency.coreml import _coreml_unavailable, convert_coreml, coreml_predict_available, measure_coreml

        if not coreml_predict_available():
            raise _coreml_unavailable(profile.name)
        with contextlib.ExitStack() as stack:
            folder = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            path = convert_coreml(
                module, shape, folder / "model.mlpackage", precision=profile.precision,
                compute_units=profile.compute_units, target=profile.minimum_deployment_target,
            )
            samples = measure_coreml(
                path, shape, warmup=profile.warmup, repeats=profile.repeats, compute_units=profile.compute_units
            )
    else:
        data = export_onnx(module, shape, None if workdir is None else Path(workdir) / "model.onnx")
        t1 = time.perf_counter()
        session = ort_session(
            data, threads=profile.threads, graph_optimization=profile.graph_optimization, providers=profile.providers
        )
        t2 = time.perf_counter()
        samples = measure_ort(session, shape, warmup=profile.warmup, repeats=profile.repeats)
        logger.debug(
            "%s %s: export %.1f ms, session %.1f ms, timing %.1f ms",
            type(module).__name__, list(shape), (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3,
        )
    stats = LatencyStats.from_samples(samples)
    if stats.noisy:
        logger.debug("noisy measurement of %s %s: median %.3f ms, IQR %.3f ms",
                     type(module).__name__, list(shape), stats.median_ms, stats.iqr_ms)
    return stats


_COREML_NAMES = ("convert_coreml", "coreml_predict_available", "measure_coreml")


def __getattr__(name: str) -> Any:
    """The CoreML functions live in :mod:`latency.coreml`; they stay importable from here."""
    if name in _COREML_NAMES:
        from latency import coreml

        return getattr(coreml, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def measurement_environment(profile: DeviceProfile) -> dict[str, Any]:
    """The environment block a LUT stores for measurements made here with ``profile``.

    Returns:
        JSON-ready dict: the profile's fields, host information (OS, machine,
        CPU, Python) and the versions of numpy, the runtime and torch.
    """
    host = _runner.host_info(profile.backend)
    host["versions"]["torch"] = torch.__version__
    host["versions"]["onnx"] = onnx.__version__
    return {"profile": profile.to_dict(), "host": host}
