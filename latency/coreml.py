"""CoreML: convert torch modules to ``mlprogram`` packages (any OS) and time them (macOS only).

:func:`convert_coreml` writes the ``.mlpackage`` a CoreML bundle ships; :func:`measure_coreml`
times one on a Mac with the bundle runner's loop. Both stay importable from
:mod:`latency.runtime`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import itertools
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from latency import bundle_runner as _runner
from latency.profiles import COMPUTE_UNITS, DEPLOYMENT_TARGETS
from latency.runtime import _INPUT_NAME, _OUTPUT_NAME, _bundle_hint, _check_count, _check_shape, torch_threads
from search_spaces.errors import NasUserError

if TYPE_CHECKING:
    from coremltools.models import MLModel

__all__ = ["convert_coreml", "coreml_predict_available", "measure_coreml"]

logger = logging.getLogger(__name__)

_TQDM_LINE = re.compile(r"\d+%\|")

#: Passes of coremltools' default ``mlprogram`` pipeline that change no block model of any of our
#: search spaces: their patterns (transpose chains that cancel, tanh-approximated GELU, PReLU and
#: layer norm spelled out in elementary ops) never occur in a block's traced graph. Together they
#: took about 12% of a block's conversion (coremltools 9.0; 327 blocks of every space at 32 and 224
#: px). ``experiments/check_coreml_passes.py`` converts every block of a space both ways and checks
#: that the packages are byte for byte the same; ``tests/test_latency_runtime.py`` checks one block
#: of each kind. Only single blocks skip them (whole networks are converted with the full pipeline: a
#: transpose chain may cross block boundaries).
BLOCK_NOOP_PASSES = ("common::reduce_transposes", "common::fuse_gelu_tanh_approximation", "common::fuse_prelu",
                     "common::fuse_layernorm_or_instancenorm")
_FP16_IO_TARGETS = {"iOS16", "iOS17", "iOS18", "iOS26", "macOS13", "macOS14", "macOS15", "macOS26"}


def _import_coremltools() -> ModuleType:
    try:
        import coremltools as ct
    except ImportError:
        raise NasUserError("CoreML conversion needs coremltools: `pip install coremltools`") from None
    return ct


@contextlib.contextmanager
def _captured_stderr() -> Iterator[io.StringIO]:
    """Capture ``sys.stderr`` (coremltools' progress bars), restoring it in ``finally``."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield buf


def _check_coreml_args(module: torch.nn.Module, input_shape: Sequence[int], path: str | os.PathLike[str],
                       precision: str, compute_units: str, target: str) -> tuple[tuple[int, ...], Path]:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    shape = _check_shape(input_shape)
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise NasUserError(f"`path` must end in .mlpackage, got {str(path)!r}")
    if precision not in ("fp16", "fp32"):
        raise NasUserError(f"`precision` must be 'fp16' or 'fp32', got {precision!r}")
    if compute_units not in COMPUTE_UNITS:
        raise NasUserError(f"`compute_units` must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
    if target not in DEPLOYMENT_TARGETS:
        raise NasUserError(f"`target` must be one of {', '.join(DEPLOYMENT_TARGETS)}, got {target!r}")
    return shape, path


def output_names(n: int) -> list[str]:
    """``["output"]`` for one output; ``feature0``, ``feature1``, ... for a backbone's stage maps."""
    return [_OUTPUT_NAME] if n == 1 else [f"feature{i}" for i in range(n)]


def _trace(module: torch.nn.Module, shape: tuple[int, ...]) -> tuple[torch.jit.ScriptModule, int]:
    """``torch.jit.trace`` of ``module`` in eval mode on one thread (its train/eval mode restored), and
    its number of outputs (one tensor, or a list or tuple of tensors)."""
    was_training = module.training
    module.eval()
    try:
        example = torch.zeros(shape, dtype=torch.float32)
        with torch.no_grad(), torch_threads(1), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is what coremltools converts
            on_cpu = all(t.device.type == "cpu" for t in itertools.chain(module.parameters(), module.buffers()))
            cpu_module = module if on_cpu else copy.deepcopy(module).cpu()
            out = cpu_module(example)
            outs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (list, tuple)) else None
            if not outs or not all(isinstance(t, torch.Tensor) for t in outs):
                raise NasUserError(
                    f"CoreML conversion supports modules that return a tensor or a list of tensors; "
                    f"{type(module).__name__} returned {type(out).__name__}"
                )
            return torch.jit.trace(cpu_module, example, strict=False, check_trace=False), len(outs)
    except NasUserError:
        raise
    except Exception as exc:
        raise RuntimeError(f"tracing {type(module).__name__} at input shape {list(shape)} failed: {exc}") from exc
    finally:
        module.train(was_training)


def _has_constexpr(block: object) -> bool:
    """Whether a MIL block (or one nested in its ops) holds a ``constexpr_*`` op (compressed weights)."""
    return any(op.op_type.startswith("constexpr_") or any(_has_constexpr(b) for b in op.blocks)
               for op in block.operations)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _lean_passes(ct: ModuleType) -> Iterator[None]:
    """Skip two kinds of bookkeeping that coremltools repeats through a conversion, neither of which
    changes the program it writes.

    1. **Validation once per pipeline.** coremltools re-checks the whole MIL program after each of
       the ~110 passes of a pipeline (a third of a block's conversion time). The checks only
       assert. The calls that also check essential scopes (after dead-code elimination, and after
       the frontend) still run, so every pipeline's result is checked once.
    2. **No "non-replaceable" propagation without compressed weights.** On leaving every block
       context (about 120 times per conversion) coremltools recomputes, for every var, the set of
       ``constexpr_*`` outputs upstream of it, which only guards against replacing a var that
       depends on compressed weights. Our conversions make no ``constexpr_*`` op, so every set is
       empty; the propagation still runs for a block that holds one.
    """
    program, block = ct.converters.mil.mil.Program, ct.converters.mil.mil.Block
    full, propagate = program.validate, block._propagate_nonreplaceable_vars

    def validate(self: object, check_essential_scope: bool | None = False) -> None:
        if check_essential_scope:
            full(self, check_essential_scope=True)

    def lean_propagate(self: object) -> None:
        if _has_constexpr(self):
            propagate(self)

    program.validate, block._propagate_nonreplaceable_vars = validate, lean_propagate
    try:
        yield
    finally:
        program.validate, block._propagate_nonreplaceable_vars = full, propagate


def _pipeline(ct: ModuleType, skip: Sequence[str]) -> object:
    """coremltools' default pass pipeline without the passes ``skip`` (``None``, the default itself, if none;
    a name the pipeline lacks, as in another coremltools version, is nothing to skip)."""
    if not skip:
        return None
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes([p for p in skip if p in pipeline.passes])
    return pipeline


def package_files(path: Path) -> dict[str, bytes]:
    """The files of an ``.mlpackage`` by relative path, all but ``Manifest.json`` (which holds random item
    identifiers): two conversions that wrote the same model give equal dicts."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != "Manifest.json"}


def _save_mlpackage(mlmodel: MLModel, path: Path) -> None:
    """Save atomically: into a temporary folder next to ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".mlpackage", dir=path.parent))
    try:
        shutil.rmtree(tmp)
        mlmodel.save(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def convert_coreml(
    module: torch.nn.Module,
    input_shape: Sequence[int],
    path: str | os.PathLike[str],
    *,
    precision: str = "fp16",
    compute_units: str = "ALL",
    target: str = "iOS16",
    skip_passes: Sequence[str] = (),
) -> Path:
    """Convert ``module`` to a CoreML ``mlprogram`` and save it as an ``.mlpackage`` folder.

    The module is traced with ``torch.jit.trace`` (eval mode, no grad) and
    converted with ``coremltools.convert(convert_to="mlprogram")``. With fp16
    precision and an iOS16/macOS13 or later target, the input and output are
    fp16 too, so a block does not pay casts at its boundaries. The input is
    named ``"input"`` and the output ``"output"`` (several outputs, such as a backbone's stage
    maps: ``feature0``, ``feature1``, ...). Torch is pinned to one
    thread while tracing and converting (it is several times faster on a busy
    machine). Conversion works on any OS; only prediction needs macOS.
    coremltools' progress bars are kept off stderr (they go to the DEBUG log).

    Args:
        module: a module with one tensor input and a tensor (or a list of tensors) as output.
        input_shape: the input shape, used as given.
        path: destination ending in ``.mlpackage``; an existing one is replaced.
        precision: ``"fp16"`` or ``"fp32"`` compute precision.
        compute_units: ALL, CPU_ONLY, CPU_AND_GPU or CPU_AND_NE.
        target: minimum deployment target, e.g. ``"iOS16"``.
        skip_passes: passes of the default pipeline to leave out (:data:`BLOCK_NOOP_PASSES` for a block).

    Returns:
        The path of the saved ``.mlpackage``.

    Raises:
        NasUserError: a bad argument, coremltools missing, or a module whose output is not
            tensors.
        RuntimeError: tracing or conversion failed.
    """
    shape, path = _check_coreml_args(module, input_shape, path, precision, compute_units, target)
    ct = _import_coremltools()
    if not hasattr(ct.target, target):
        raise NasUserError(f"coremltools {ct.__version__} does not know target {target!r}; upgrade coremltools")
    import numpy as np

    io_dtype = np.float16 if precision == "fp16" and target in _FP16_IO_TARGETS else np.float32
    t0 = time.perf_counter()
    traced, n_out = _trace(module, shape)
    t1 = time.perf_counter()
    try:
        with _captured_stderr() as captured, torch_threads(1), _lean_passes(ct):
            mlmodel = ct.convert(
                traced,
                inputs=[ct.TensorType(name=_INPUT_NAME, shape=shape, dtype=io_dtype)],
                outputs=[ct.TensorType(name=name, dtype=io_dtype) for name in output_names(n_out)],
                convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, target),
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                compute_units=getattr(ct.ComputeUnit, compute_units),
                pass_pipeline=_pipeline(ct, skip_passes),
            )
    except Exception as exc:
        raise RuntimeError(
            f"CoreML conversion of {type(module).__name__} at input shape {list(shape)} ({precision}, {target}) "
            f"failed: {exc}"
        ) from exc
    said = [ln.strip() for ln in re.split(r"[\r\n]+", captured.getvalue()) if ln.strip() and not _TQDM_LINE.search(ln)]
    if said:
        logger.debug("coremltools said: %s", " | ".join(said)[-2000:])
    _save_mlpackage(mlmodel, path)
    logger.debug("CoreML %s %s: trace %.0f ms, convert+save %.0f ms", type(module).__name__, list(shape),
                 (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)
    return path


def _coreml_unavailable(device: str) -> NasUserError:
    if sys.platform == "darwin":
        return NasUserError("CoreML prediction needs coremltools on this Mac: `pip install coremltools`")
    return NasUserError(
        f"CoreML prediction needs macOS; this machine runs {platform.system()} {platform.machine()}. Conversion "
        f"works here: {_bundle_hint(device, where='on a Mac')}. A Mac times itself; for iPhone numbers use "
        f"Xcode's Core ML performance report on the phone"
    )


def coreml_predict_available() -> bool:
    """True when CoreML models can be run here: macOS with coremltools installed.

    >>> isinstance(coreml_predict_available(), bool)
    True
    """
    return sys.platform == "darwin" and importlib.util.find_spec("coremltools") is not None


def measure_coreml(
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    warmup: int,
    repeats: int,
    compute_units: str = "ALL",
    seed: int = 0,
) -> list[float]:
    """Time a CoreML ``.mlpackage`` on this Mac: raw latencies in milliseconds.

    Args:
        path: the ``.mlpackage`` folder.
        input_shape: its input shape.
        warmup: untimed runs (>= 0).
        repeats: timed runs (>= 1).
        compute_units: ALL, CPU_ONLY, CPU_AND_GPU or CPU_AND_NE.
        seed: input data seed.

    Returns:
        ``repeats`` latencies in milliseconds.

    Raises:
        NasUserError: not macOS (the message explains the bundle workflow),
            coremltools missing, or a bad argument.
    """
    if not coreml_predict_available():
        raise _coreml_unavailable("iphone12")
    shape = _check_shape(input_shape)
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    try:
        fn = _runner.coreml_run_fn(path, shape, compute_units=compute_units, seed=seed)
    except _runner.BundleError as exc:
        raise NasUserError(str(exc)) from None
    return _runner.time_runs([fn], warmup=warmup, repeats=repeats)[0]
