"""Pieces shared by in-process builds (:mod:`latency.measure`), bundles (:mod:`latency.bundle`)
and imports (:mod:`latency.importing`): work items, export workers, progress records.

Nothing here is public API; the public modules re-export what users need
(:class:`BuildProgress`, :data:`VALIDATION_ROUNDS`).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latency.stats import LatencyStats
from search_spaces import ArchConfig, BlockSpec, LoweringSetup
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.fileio import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from latency.lut import LatencyTable
    from latency.profiles import DeviceProfile

logger = logging.getLogger(__name__)

MODEL_COST = 25  # a whole network costs about as much as this many blocks to export and time
TOOLKIT_KEY = "toolkit"
ROUND_LAG = 8
#: Default number of rounds in which each validation network is timed.
VALIDATION_ROUNDS = 3


@dataclass(frozen=True)
class BuildProgress:
    """Where a build stands, for progress bars.

    Attributes:
        phase: ``"measure"`` (export and time), ``"export"`` (bundle writing).
        done: items finished (blocks and whole networks).
        total: items to do in this run (finished keys of a resumed build excluded).
        elapsed_s: seconds since this run started.
        eta_s: estimated seconds left (None before the first item finishes).
        last: the key or network name finished last.
    """

    phase: str
    done: int
    total: int
    elapsed_s: float
    eta_s: float | None
    last: str = ""


ProgressFn = Callable[[BuildProgress], None]


# --------------------------------------------------------------------------- work items
@dataclass(frozen=True)
class Item:
    """One model to export and time: a block (``kind="entry"``) or a whole network (``"model"``)."""

    kind: str
    ident: str
    input_shape: tuple[int, ...]
    arch: dict[str, Any] | None = None
    setup: LoweringSetup | None = None  # a whole network's lowering setup
    network: str | None = None  # a whole network's name; ``ident`` adds the round, ``name#r``

    @property
    def cost(self) -> int:
        return MODEL_COST if self.kind == "model" else 1

    @property
    def file_key(self) -> str:
        """Items with one file key share one exported model (the rounds of a network)."""
        return self.network or self.ident


def entry_item(spec: BlockSpec, batch: int) -> Item:
    return Item("entry", spec.key, spec.input_shape(batch))


def model_items(archs: Sequence[ArchConfig], *, batch: int, setup: LoweringSetup, rounds: int = 1) -> list[Item]:
    """Whole networks, each timed in ``rounds`` rounds (``subnet-<hash>#<r>``).

    Networks are taken in groups of :data:`ROUND_LAG`; a group's first rounds come before its
    second rounds, so the rounds of one network lie apart in time (and few exported networks
    wait on disk at once).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise NasUserError(f"`rounds` must be an integer >= 1, got {rounds!r}")
    unique: dict[str, ArchConfig] = {}
    for arch in archs:
        unique.setdefault(f"subnet-{arch.hash}", arch)
    names = list(unique)
    items = []
    shape = setup.input_shape(batch)
    for start in range(0, len(names), ROUND_LAG):
        for r in range(1, rounds + 1):
            for name in names[start:start + ROUND_LAG]:
                items.append(Item("model", f"{name}#{r}", shape, unique[name].to_dict(), setup, name))
    return items


def best_rounds(samples: dict[str, list[list[float]]]) -> tuple[dict[str, LatencyStats], dict[str, list[LatencyStats]]]:
    """Per network: the stats of its round with the lowest median, and of every round.

    Another process that takes the CPU for a while slows every run of a round; a clean round
    shows the network's own latency, so the best round is the robust figure.
    """
    best, every = {}, {}
    for name, rounds in samples.items():
        stats = [LatencyStats.from_samples(s) for s in rounds]
        every[name] = stats
        best[name] = min(stats, key=lambda st: st.median_ms)
    return best, every


def open_existing(out: Path, fresh: LatencyTable, *, action: str) -> LatencyTable | None:
    """The table already at ``out`` if it has ``fresh``'s setup; None when there is none."""
    from latency.lut import LatencyTable

    if not out.exists():
        return None
    try:
        old = LatencyTable.load(out)
    except FileFormatError as exc:
        raise NasUserError(f"{exc}; it cannot be {action}d: delete it or pass another --out") from None
    old.check_same_setup(fresh, action=action)
    return old


# --------------------------------------------------------------------------- export workers
def quiet_exporter() -> None:
    warnings.filterwarnings("ignore", message=r".*[Cc]onstant folding.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"coremltools.*")


def worker_init(fmt: str = "onnx") -> None:
    """Set up an export worker: one torch thread, quiet exporters, and the imports frozen out of the GC.

    coremltools runs a full ``gc.collect()`` after each conversion; with torch and coremltools'
    objects frozen (``gc.freeze``) it only walks what the conversion made (a tenth of its time).
    """
    import torch

    if fmt == "mlpackage":
        with contextlib.suppress(ImportError):
            import coremltools.converters.mil.frontend.torch  # noqa: F401
    torch.set_num_threads(1)
    quiet_exporter()
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    gc.freeze()


def build_module(item: Item) -> torch.nn.Module:
    """The torch module of ``item`` in eval mode: one block, or a whole network."""
    from supernet.blocks import build_block
    from supernet.model import build_model

    if item.kind == "entry":
        module = build_block(BlockSpec.from_key(item.ident))
    else:
        if item.arch is None or item.setup is None:
            raise ValueError(f"model item {item.ident!r} needs its architecture and lowering setup")
        s = item.setup
        module = build_model(ArchConfig.from_dict(item.arch), num_classes=s.num_classes,
                             resolution=s.height if s.square else s.resolution,  # type: ignore[arg-type]
                             in_chans=s.in_chans, distillation=s.distillation)
    return module.eval()


def onnx_bytes(item: Item, module: torch.nn.Module, *, check: bool = True) -> bytes:
    """``item``'s ONNX model: a block's recorded from its forward (:mod:`latency.onnx_record`, several
    times faster), a whole network's, or a block the recorder cannot lower, from the TorchScript exporter."""
    from latency.onnx_record import Unsupported, record_onnx
    from latency.runtime import export_onnx

    if item.kind == "entry":
        try:
            data = record_onnx(module, item.input_shape)
        except Unsupported as exc:
            logger.debug("exporting %s with the TorchScript exporter: %s", item.ident, exc)
        else:
            if check:
                import onnx

                onnx.checker.check_model(onnx.load_model_from_string(data))
            return data
    return export_onnx(module, item.input_shape, check=check)


def materialize(item: Item, path: str, fmt: str, coreml: dict[str, str] | None, *, check: bool = True,
                optimize: dict[str, Any] | None = None) -> tuple[str, str, float]:
    """Build ``item``'s torch module and write it to ``path`` as ONNX or ``.mlpackage`` (runs in workers too).

    Args:
        item: what to build.
        path: the file to write.
        fmt: ``onnx`` or ``mlpackage``.
        coreml: CoreML conversion options (``mlpackage`` only).
        check: run ``onnx.checker`` (files ONNX Runtime loads at once skip it: it checks them anyway).
        optimize: ONNX Runtime session options (``threads``, ``graph_optimization``,
            ``providers``): write the graph as ONNX Runtime optimizes it with them, for this
            machine, to be opened with optimization disabled (which moves that work out of the
            timing process).
    """
    from latency.runtime import convert_coreml, ort_session

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        quiet_exporter()
        module = build_module(item)
        if fmt == "onnx":
            data = onnx_bytes(item, module, check=check)
            if optimize is not None:
                ort_session(data, save_optimized=path, **optimize)
            else:
                atomic_write_bytes(path, data)
        else:
            if coreml is None:
                raise ValueError("CoreML export needs the profile's CoreML options")
            from latency.coreml import BLOCK_NOOP_PASSES

            convert_coreml(module, item.input_shape, path, precision=coreml["precision"],
                           compute_units=coreml["compute_units"], target=coreml["target"],
                           skip_passes=BLOCK_NOOP_PASSES if item.kind == "entry" else ())
    return item.ident, path, time.perf_counter() - t0


class Exporter:
    """Writes model files, in ``jobs`` spawned worker processes (or inline for ``jobs == 1``)."""

    def __init__(self, jobs: int, fmt: str, coreml: dict[str, str] | None, force_pool: bool = False) -> None:
        self.fmt, self.coreml = fmt, coreml
        self.pool: ProcessPoolExecutor | None = None
        if jobs > 1 or force_pool:
            self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=worker_init, initargs=(fmt,))

    def submit(self, jobs: list[tuple[Item, str]]) -> list[list[Any]]:
        """Start writing ``(item, path)`` jobs; returns handles for :meth:`wait`."""
        if self.pool is not None:
            try:
                return [[self.pool.submit(materialize, item, path, self.fmt, self.coreml), item, path]
                        for item, path in jobs]
            except BrokenProcessPool:
                self.close()
        return [[None, item, path] for item, path in jobs]

    def wait(self, handles: list[list[Any]]) -> None:
        """Finish the jobs of ``handles`` (inline ones run now). A broken pool falls back to inline export."""
        for h in handles:
            future, item, path = h
            if future == "done":
                continue
            if isinstance(future, Future):
                try:
                    future.result()
                except BrokenProcessPool:
                    if self.pool is not None:  # say it once
                        logger.warning("export worker processes failed to start or died (a script that calls this "
                                       "without `if __name__ == '__main__':` cannot use them); exporting in this "
                                       "process")
                    self.close()
                    materialize(item, path, self.fmt, self.coreml)
                except NasUserError:
                    raise
                except Exception as exc:
                    raise RuntimeError(f"exporting {item.ident!r} failed: {exc}") from exc
            else:
                materialize(item, path, self.fmt, self.coreml)
            h[0] = "done"

    def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def exporter(jobs: int, fmt: str, coreml: dict[str, str] | None, force_pool: bool = False) -> Iterator[Exporter]:
    ex = Exporter(jobs, fmt, coreml, force_pool)
    try:
        yield ex
    finally:
        ex.close()


def default_jobs(n_cost: int, jobs: int | None) -> int:
    """Export workers for ``n_cost`` units of work: ``jobs`` if given, else 1 for small jobs, else the CPUs (max 8)."""
    if jobs is not None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise NasUserError(f"`jobs` must be an integer >= 1, got {jobs!r}")
        return jobs
    if n_cost < 48:  # spawning workers (importing torch) costs more than it saves
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def coreml_options(profile: DeviceProfile) -> dict[str, str] | None:
    if profile.backend != "coreml":
        return None
    return {"precision": profile.precision, "compute_units": profile.compute_units,
            "target": profile.minimum_deployment_target}
