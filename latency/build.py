"""Building LUTs: profile every block spec here, or write a bundle for the device and import its results.

Two ways to fill a :class:`~latency.lut.LatencyTable`:

* **In process** (:func:`build_lut`, local profiles such as ``local-cpu``): every distinct spec
  of the space at the resolution (:func:`lut_specs`) is exported (TorchScript exporter, in
  ``jobs`` worker processes while nothing is being timed), loaded into ONNX Runtime with the
  profile's threads and optimisation level, and timed with the bundle runner's own loop
  (:func:`latency.bundle_runner.time_runs`): groups of ``chunk`` blocks are warmed up, then
  timed round-robin, so slow drift spreads over a group instead of biasing a few blocks.
  A noisy measurement (IQR above 10% of the median: another process took the CPU) is repeated
once at once, keeping the round with the lower median. Whole networks for validation can be
interleaved with the block groups, each timed in rounds far apart. The partial table
  is saved atomically every few seconds; rerunning the same command skips finished keys.
  ``shard=(i, n)`` measures every n-th spec only; :func:`latency.lut.merge_tables` joins them.
* **Through a bundle** (:func:`write_bundle`, any profile): the block models in the device's
  format (ONNX or ``.mlpackage``), ``manifest.json``, ``runner.py`` (a copy of
  :mod:`latency.bundle_runner`) and a README. The runner writes ``results.json`` on the
  device; :func:`import_results` checks it against the manifest and turns it into a table.

Cost on a busy 2-core machine: export 20-50 ms per block (halved by two workers), ONNX
Runtime session 2-7 ms, then ``warmup + repeats`` runs of the block.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latency import bundle_runner as _runner
from latency.lut import Calibration, LatencyTable
from latency.profiles import DeviceProfile
from latency.stats import LatencyStats
from search_spaces import ArchConfig, BlockSpec, SearchSpace, family_defaults
from search_spaces.enumerate import enumerate_specs
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.fileio import atomic_write_json, atomic_write_text, read_json

__all__ = [
    "BuildProgress",
    "BuildResult",
    "BundleInfo",
    "ImportResult",
    "parse_shard",
    "lut_specs",
    "new_table",
    "default_bundle_path",
    "build_lut",
    "measure_networks",
    "write_bundle",
    "import_results",
]

logger = logging.getLogger(__name__)

ProgressFn = Callable[["BuildProgress"], None]
_MODEL_COST = 25  # a whole network costs about as much as this many blocks to export and time
_EXPORT_BATCH_COST = 96
_TOOLKIT_KEY = "toolkit"
_ROUND_LAG = 8
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


# --------------------------------------------------------------------------- specs and shards
def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse ``"i/n"`` (1-based: ``1/4`` ... ``4/4``) into ``(i, n)``; None stays None.

    Raises:
        NasUserError: not of the form ``i/n`` with ``1 <= i <= n``.

    >>> parse_shard("2/4")
    (2, 4)
    """
    if text is None:
        return None
    try:
        i_text, n_text = str(text).split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise NasUserError(f"--shard must look like i/n, e.g. 1/4 (shards are numbered 1..n), got {text!r}") from None
    if n < 1 or not 1 <= i <= n:
        raise NasUserError(f"--shard {text!r}: need 1 <= i <= n (shards are numbered 1..n)")
    return i, n


def lut_specs(space: SearchSpace, *, resolution: int, num_classes: int = 1000, in_chans: int = 3,
              distillation: bool | None = None, shard: tuple[int, int] | None = None) -> list[BlockSpec]:
    """Every distinct spec of ``space`` at ``resolution`` (stem, blocks, downsampling, head), sorted by key.

    Args:
        space: the search space.
        resolution: input side in pixels.
        num_classes: classifier outputs.
        in_chans: input channels.
        distillation: distillation head; None takes the family default.
        shard: ``(i, n)`` keeps every n-th spec starting at the i-th (1-based).

    Raises:
        SpaceError: the space cannot be lowered at this resolution.

    >>> from search_spaces import get_space
    >>> len(lut_specs(get_space("efficientformer_v2_demo"), resolution=32, num_classes=10, in_chans=1))
    91
    """
    specs = enumerate_specs(space, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                            distillation=distillation)
    if shard is not None:
        i, n = shard
        specs = specs[i - 1::n]
    return specs


def default_bundle_path(device: str, resolution: int, folder: str | os.PathLike[str] = ".") -> Path:
    """``lut-<device>-<resolution>.bundle`` in ``folder``."""
    return Path(folder) / f"lut-{device}-{resolution}.bundle"


def new_table(space: SearchSpace, profile: DeviceProfile, *, resolution: int, num_classes: int, in_chans: int,
              distillation: bool | None, measurement: str, expected_entries: int | None,
              shard: tuple[int, int] | None = None, environment: dict[str, Any] | None = None,
              statistic: str = "median") -> LatencyTable:
    """An empty table whose header describes this space, setup and profile."""
    return LatencyTable(
        device=profile.name, backend=profile.backend, resolution=resolution, num_classes=num_classes,
        in_chans=in_chans, distillation=family_defaults(space.family) if distillation is None else bool(distillation),
        space_name=space.name, space_hash=space.hash, space=space.to_dict(), profile=profile.to_dict(),
        environment=environment, threads=profile.threads, batch=profile.batch, precision=profile.precision,
        measurement=measurement, statistic=statistic, expected_entries=expected_entries,
        shard=f"{shard[0]}/{shard[1]}" if shard else None,
    )


# --------------------------------------------------------------------------- work items and export workers
@dataclass(frozen=True)
class _Item:
    """One model to export and time: a block (``kind="entry"``) or a whole network (``"model"``)."""

    kind: str
    ident: str
    input_shape: tuple[int, ...]
    arch: dict[str, Any] | None = None
    lowering: tuple[int, int, int, bool] | None = None  # resolution, num_classes, in_chans, distillation
    network: str | None = None  # a whole network's name; ``ident`` adds the round, ``name#r``

    @property
    def cost(self) -> int:
        return _MODEL_COST if self.kind == "model" else 1

    @property
    def file_key(self) -> str:
        """Items with one file key share one exported model (the rounds of a network)."""
        return self.network or self.ident


def _entry_item(spec: BlockSpec, batch: int) -> _Item:
    return _Item("entry", spec.key, spec.input_shape(batch))


def _model_items(archs: Sequence[ArchConfig], *, batch: int, resolution: int, num_classes: int, in_chans: int,
                 distillation: bool, rounds: int = 1) -> list[_Item]:
    """Whole networks, each timed in ``rounds`` rounds (``subnet-<hash>#<r>``).

    Networks are taken in groups of :data:`_ROUND_LAG`; a group's first rounds come before its
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
    for start in range(0, len(names), _ROUND_LAG):
        for r in range(1, rounds + 1):
            for name in names[start:start + _ROUND_LAG]:
                items.append(_Item("model", f"{name}#{r}", (batch, in_chans, resolution, resolution),
                                   unique[name].to_dict(), (resolution, num_classes, in_chans, distillation), name))
    return items


def _best_rounds(samples: dict[str, list[list[float]]]) -> tuple[dict[str, LatencyStats], dict[str, list[LatencyStats]]]:
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


def _quiet_exporter() -> None:
    warnings.filterwarnings("ignore", message=r".*[Cc]onstant folding.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"coremltools.*")


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    _quiet_exporter()
    logging.getLogger("coremltools").setLevel(logging.ERROR)


def _materialize(item: _Item, path: str, fmt: str, coreml: dict[str, str] | None) -> tuple[str, str, float]:
    """Build ``item``'s torch module and write it to ``path`` as ONNX or ``.mlpackage`` (runs in workers too)."""
    from latency.runtime import convert_coreml, export_onnx
    from supernet.blocks import build_block
    from supernet.model import build_model

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        _quiet_exporter()
        if item.kind == "entry":
            module = build_block(BlockSpec.from_key(item.ident))
        else:
            assert item.arch is not None and item.lowering is not None
            res, classes, chans, dist = item.lowering
            module = build_model(ArchConfig.from_dict(item.arch), num_classes=classes, resolution=res,
                                 in_chans=chans, distillation=dist)
        module.eval()
        if fmt == "onnx":
            export_onnx(module, item.input_shape, path)
        else:
            assert coreml is not None
            convert_coreml(module, item.input_shape, path, precision=coreml["precision"],
                           compute_units=coreml["compute_units"], target=coreml["target"])
    return item.ident, path, time.perf_counter() - t0


class _Exporter:
    """Writes model files, in ``jobs`` spawned worker processes (or inline for ``jobs == 1``)."""

    def __init__(self, jobs: int, fmt: str, coreml: dict[str, str] | None, force_pool: bool = False) -> None:
        self.fmt, self.coreml = fmt, coreml
        self.pool: ProcessPoolExecutor | None = None
        if jobs > 1 or force_pool:
            self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init)

    def submit(self, jobs: list[tuple[_Item, str]]) -> list[Any]:
        """Start writing ``(item, path)`` jobs; returns handles for :meth:`wait`."""
        if self.pool is not None:
            try:
                return [[self.pool.submit(_materialize, item, path, self.fmt, self.coreml), item, path]
                        for item, path in jobs]
            except BrokenProcessPool:
                self.close()
        return [[None, item, path] for item, path in jobs]

    def wait(self, handles: list[Any]) -> None:
        """Finish the jobs of ``handles`` (inline ones run now). A broken pool falls back to inline export."""
        for h in handles:
            future, item, path = h
            if future == "done":
                continue
            if isinstance(future, Future):
                try:
                    future.result()
                except BrokenProcessPool:
                    logger.warning("export worker processes failed to start or died (a script that calls this "
                                   "without `if __name__ == '__main__':` cannot use them); exporting in this process")
                    self.close()
                    _materialize(item, path, self.fmt, self.coreml)
                except NasUserError:
                    raise
                except Exception as exc:
                    raise RuntimeError(f"exporting {item.ident!r} failed: {exc}") from exc
            else:
                _materialize(item, path, self.fmt, self.coreml)
            h[0] = "done"

    def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _exporter(jobs: int, fmt: str, coreml: dict[str, str] | None, force_pool: bool = False) -> Iterator[_Exporter]:
    ex = _Exporter(jobs, fmt, coreml, force_pool)
    try:
        yield ex
    finally:
        ex.close()


def _default_jobs(n_cost: int, jobs: int | None) -> int:
    if jobs is not None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise NasUserError(f"`jobs` must be an integer >= 1, got {jobs!r}")
        return jobs
    if n_cost < 48:  # spawning workers (importing torch) costs more than it saves
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _batches(groups: list[list[_Item]], max_cost: int) -> list[list[list[_Item]]]:
    out: list[list[list[_Item]]] = []
    cost = 0
    for g in groups:
        c = sum(i.cost for i in g)
        if not out or cost + c > max_cost:
            out.append([])
            cost = 0
        out[-1].append(g)
        cost += c
    return out


def _coreml_options(profile: DeviceProfile) -> dict[str, str] | None:
    if profile.backend != "coreml":
        return None
    return {"precision": profile.precision, "compute_units": profile.compute_units,
            "target": profile.minimum_deployment_target}


def _run_fn(item: _Item, path: str, profile: DeviceProfile) -> Callable[[], Any]:
    from latency.runtime import ort_session

    if profile.backend == "onnxruntime":
        session = ort_session(path, threads=profile.threads, graph_optimization=profile.graph_optimization,
                              providers=profile.providers)
        return _runner.ort_run_fn(session, item.input_shape)
    return _runner.coreml_run_fn(path, item.input_shape, compute_units=profile.compute_units)


def _time_group(fns: list[Callable[[], Any]], profile: DeviceProfile, retries: int) -> list[list[float]]:
    """Time a group round-robin; re-time its noisy members (IQR > 10% of the median) up to ``retries`` times.

    Another process that takes the CPU for a moment makes a measurement noisy and slow; a
    retry a moment later usually finds the CPU free. Each member keeps the timings of its
    round with the lowest median (every round has the profile's warm-up and repeats).
    """
    samples = _runner.time_runs(fns, warmup=profile.warmup, repeats=profile.repeats, interleave=True)
    best = [LatencyStats.from_samples(s) for s in samples]
    for _ in range(retries):
        noisy = [i for i, st in enumerate(best) if st.noisy]
        if not noisy:
            break
        again = _runner.time_runs([fns[i] for i in noisy], warmup=profile.warmup, repeats=profile.repeats,
                                  interleave=True)
        for i, s in zip(noisy, again):
            st = LatencyStats.from_samples(s)
            if st.median_ms < best[i].median_ms:
                best[i], samples[i] = st, s
    return samples


def _measure(items_entries: list[_Item], items_models: list[_Item], profile: DeviceProfile, *, jobs: int | None,
             chunk: int, on_group: Callable[[list[tuple[_Item, list[float]]]], None],
             progress: ProgressFn | None, retries: int = 1, overlap: bool | None = None) -> None:
    """Export and time items on this machine: block groups timed round-robin, whole networks spread between them.

    Without ``overlap`` nothing else of ours runs while timing: exports of the next batch
    happen while the current batch's sessions load, then wait. With ``overlap`` (default when
    the machine has a spare core for it) one worker keeps exporting ahead on that spare core
    while the main process times, with ``profile.threads`` on the others.
    """
    if not profile.is_local:
        raise NasUserError(f"device {profile.name!r} is not measured on this machine; write a bundle instead")
    plan = [[item for _, item in group] for group in _runner._plan(items_entries, items_models, chunk)]
    total = len(items_entries) + len(items_models)
    total_cost = sum(i.cost for i in items_entries) + sum(i.cost for i in items_models)
    cpus = os.cpu_count() or 1
    if overlap is None:
        overlap = jobs is None and cpus > profile.threads
    overlap = overlap and total_cost >= 48  # small builds export inline
    if overlap:
        n_jobs = jobs if jobs is not None else max(1, min(cpus - profile.threads, 8))
    else:
        n_jobs = _default_jobs(total_cost, jobs)
    fmt = profile.model_format
    t_start = time.monotonic()
    done = done_cost = 0
    # With workers, export a few groups at a time (fewer pauses); inline, one group at a time (smooth progress).
    if overlap:
        batches = _batches(plan, 2 * chunk)
    else:
        batches = _batches(plan, _EXPORT_BATCH_COST if n_jobs > 1 else 1)
    logger.debug("measuring %d items in %d groups, %d export batches, %d export worker(s)", total, len(plan),
                  len(batches), n_jobs)
    uses_left: dict[str, int] = {}
    for g in plan:
        for item in g:
            uses_left[item.file_key] = uses_left.get(item.file_key, 0) + 1
    paths: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="nas-lut-") as tmp, \
            _exporter(n_jobs, fmt, _coreml_options(profile), force_pool=overlap) as ex:
        def jobs_of(batch: list[list[_Item]], bi: int) -> list[tuple[_Item, str]]:
            out = []
            for gi, g in enumerate(batch):
                for ii, item in enumerate(g):
                    if item.file_key not in paths:
                        paths[item.file_key] = os.path.join(tmp, f"b{bi}-{gi}-{ii}.{fmt}")
                        out.append((item, paths[item.file_key]))
            return out

        pending = ex.submit(jobs_of(batches[0], 0)) if batches else []
        for bi, batch in enumerate(batches):
            ex.wait(pending)
            # export the next batch while this one's sessions load
            pending = ex.submit(jobs_of(batches[bi + 1], bi + 1)) if bi + 1 < len(batches) else []
            fns_per_group = []
            for g in batch:
                fns = []
                for item in g:
                    path = paths[item.file_key]
                    fns.append(_run_fn(item, path, profile))
                    uses_left[item.file_key] -= 1
                    if uses_left[item.file_key] == 0:
                        with contextlib.suppress(OSError):
                            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
                fns_per_group.append(fns)
            if ex.pool is not None and not overlap:
                ex.wait(pending)  # nothing else runs while timing
            for g, fns in zip(batch, fns_per_group):
                samples = _time_group(fns, profile, retries)
                on_group(list(zip(g, samples)))
                done += len(g)
                done_cost += sum(i.cost for i in g)
                if progress is not None:
                    elapsed = time.monotonic() - t_start
                    eta = elapsed / done_cost * (total_cost - done_cost) if done_cost else None
                    progress(BuildProgress("measure", done, total, elapsed, eta, g[-1].ident))
            del fns_per_group


# --------------------------------------------------------------------------- in-process builds
@dataclass
class BuildResult:
    """What :func:`build_lut` did.

    Attributes:
        table: the table (saved at ``path``).
        path: where it was saved.
        measured: entries measured in this run.
        resumed: entries kept from an earlier, interrupted run.
        seconds: wall time of this run.
        networks: whole-network stats by name (``subnet-<arch hash>``), if any were
            interleaved: those of each network's best round (lowest median).
        network_rounds: the stats of every round, by name.
    """

    table: LatencyTable
    path: Path
    measured: int
    resumed: int
    seconds: float
    networks: dict[str, LatencyStats] = field(default_factory=dict)
    network_rounds: dict[str, list[LatencyStats]] = field(default_factory=dict)


def _open_existing(out: Path, fresh: LatencyTable, *, action: str) -> LatencyTable | None:
    if not out.exists():
        return None
    try:
        old = LatencyTable.load(out)
    except FileFormatError as exc:
        raise NasUserError(f"{exc}; it cannot be {action}d: delete it or pass another --out") from None
    old.check_same_setup(fresh, action=action)
    return old


def build_lut(
    space: SearchSpace,
    profile: DeviceProfile,
    *,
    resolution: int,
    out: str | os.PathLike[str],
    num_classes: int = 1000,
    in_chans: int = 3,
    distillation: bool | None = None,
    shard: tuple[int, int] | None = None,
    validation_archs: Sequence[ArchConfig] = (),
    rounds: int = VALIDATION_ROUNDS,
    statistic: str = "median",
    jobs: int | None = None,
    chunk: int = 16,
    retries: int = 1,
    overlap: bool | None = None,
    checkpoint_every_s: float = 5.0,
    progress: ProgressFn | None = None,
) -> BuildResult:
    """Measure every spec of ``space`` at ``resolution`` on this machine and save the table at ``out``.

    Resumable: if ``out`` holds a partial table of the same setup, its measured keys are kept
    and only the rest is measured. The partial table is saved atomically at least every
    ``checkpoint_every_s`` seconds, and when the build is interrupted.

    Args:
        space: the search space.
        profile: a local profile (``profile.is_local``), e.g. ``get_profile("local-cpu")``.
        resolution: input side in pixels.
        out: the LUT file.
        num_classes: classifier outputs of the head specs.
        in_chans: input channels of the stem specs.
        distillation: distillation head; None takes the family default.
        shard: ``(i, n)``: measure only this shard's share (see :func:`lut_specs`).
        validation_archs: whole networks to time end to end, interleaved with the block
            groups (their stats come back in :attr:`BuildResult.networks`).
        rounds: rounds in which each validation network is timed, far apart in time; the
            best round counts (robust against other processes that take the CPU a while).
        statistic: which figure predictions sum, ``median`` or ``min`` (both are stored).
        jobs: export worker processes (default: CPU count, capped at 8; 1 for small builds).
        chunk: blocks timed round-robin together.
        retries: times a noisy measurement (IQR > 10% of the median) is repeated at once; the
            round with the lowest median is kept.
        overlap: export on a spare core while timing (default: when the machine has one and
            ``jobs`` is not given); False keeps the machine quiet while timing.
        checkpoint_every_s: seconds between saves of the partial table.
        progress: called after every timed group.

    Returns:
        A :class:`BuildResult`.

    Raises:
        NasUserError: a profile that is not local, or ``out`` holding another setup's table
            or a file that is not a LUT.
    """
    if not profile.is_local:
        raise NasUserError(f"device {profile.name!r} is not measured on this machine; write a bundle with "
                           f"`nas-build-lut --device {profile.name}` and run it on the device")
    if chunk < 1:
        raise NasUserError(f"`chunk` must be >= 1, got {chunk}")
    out = Path(out)
    t0 = time.monotonic()
    specs = lut_specs(space, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                      distillation=distillation, shard=shard)
    from latency.runtime import measurement_environment

    fresh = new_table(space, profile, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                      distillation=distillation, measurement="in-process", expected_entries=len(specs), shard=shard,
                      environment=measurement_environment(profile), statistic=statistic)
    table = _open_existing(out, fresh, action="resume")
    if table is not None:
        if table.shard != fresh.shard:
            raise NasUserError(f"{str(out)!r} holds shard {table.shard or 'none'}, this run is shard "
                               f"{fresh.shard or 'none'}; pass another --out")
        if {k: v for k, v in table.profile.items() if k != "description"} != \
                {k: v for k, v in fresh.profile.items() if k != "description"}:
            raise NasUserError(f"{str(out)!r} was measured with another profile ({table.profile}); pass another "
                               f"--out or delete it")
        table.expected_entries = len(specs)
        table.measurement = "in-process"
        table.set_statistic(statistic)
    else:
        table = fresh
    done_keys = {k for k, e in table.items() if e.measured}
    todo = [s for s in specs if s.key not in done_keys]
    resumed = len(specs) - len(todo)
    if resumed:
        logger.info("resuming %s: %d of %d entries already measured, %d to go", out, resumed, len(specs), len(todo))
    model_items = _model_items(validation_archs, batch=profile.batch, resolution=resolution,
                               num_classes=num_classes, in_chans=in_chans, distillation=table.distillation,
                               rounds=rounds)
    net_samples: dict[str, list[list[float]]] = {}
    last_save = time.monotonic()
    measured = 0

    def on_group(results: list[tuple[_Item, list[float]]]) -> None:
        nonlocal last_save, measured
        for item, samples in results:
            if item.kind == "entry":
                stats = LatencyStats.from_samples(samples)
                table.set_measured(item.ident, stats)
                measured += 1
            else:
                net_samples.setdefault(item.file_key, []).append(samples)
        if time.monotonic() - last_save >= checkpoint_every_s:
            table.save(out)
            last_save = time.monotonic()

    try:
        _measure([_entry_item(s, profile.batch) for s in todo], model_items, profile, jobs=jobs, chunk=chunk,
                 on_group=on_group, progress=progress, retries=retries, overlap=overlap)
    except BaseException:
        if measured:
            table.save(out)
            logger.info("saved %d finished entries to %s; run the same command again to resume", len(table), out)
        raise
    table.save(out)
    best, every = _best_rounds(net_samples)
    return BuildResult(table, out, measured, resumed, time.monotonic() - t0, best, every)


def measure_networks(archs: Sequence[ArchConfig], profile: DeviceProfile, *, resolution: int, num_classes: int,
                     in_chans: int, distillation: bool, rounds: int = VALIDATION_ROUNDS, jobs: int | None = None,
                     progress: ProgressFn | None = None) -> dict[str, LatencyStats]:
    """Time whole networks end to end on this machine: each exported once, then timed alone in ``rounds`` rounds.

    Returns:
        Stats by network name, ``subnet-<arch hash>``: those of each network's best round
        (lowest median).
    """
    items = _model_items(archs, batch=profile.batch, resolution=resolution, num_classes=num_classes,
                         in_chans=in_chans, distillation=distillation, rounds=rounds)
    samples: dict[str, list[list[float]]] = {}

    def on_group(results: list[tuple[_Item, list[float]]]) -> None:
        for item, s in results:
            samples.setdefault(item.file_key, []).append(s)

    _measure([], items, profile, jobs=jobs, chunk=1, on_group=on_group, progress=progress)
    return _best_rounds(samples)[0]


# --------------------------------------------------------------------------- bundles
@dataclass(frozen=True)
class BundleInfo:
    """A written bundle: its folder, manifest and what it holds."""

    folder: Path
    manifest: Path
    entries: int
    models: int
    reused: int
    sha256: str


def _file_name(ident: str, fmt: str, kind: str) -> str:
    if kind == "model":
        return f"models/{ident}.{fmt}"
    return f"blocks/{hashlib.sha1(ident.encode()).hexdigest()[:16]}.{fmt}"


_README = """# Latency bundle: {device} ({backend}, {fmt})

Made by `nas-build-lut` for the search space `{space}` (hash `{space_hash}`) at {resolution}x{resolution}
px, batch {batch}: {n_entries} block models{models_line}. `runner.py` times every model with the
settings in `manifest.json` ({threads} thread(s), {warmup} warm-up runs, {repeats} timed runs) and
writes `results.json`. It needs only Python 3.9+, numpy and {runtime}; not torch, not this toolkit.
Runs are resumable: after an interruption, run the same command again.

## On a Mac (CoreML bundles; ONNX bundles work too)

```
cd {folder_name}
python3 -m pip install numpy {pip_runtime}
python3 runner.py
```

A CoreML bundle run on a Mac times that Mac (its CPU, GPU and Neural Engine), not an iPhone;
`results.json` records the host. For the phone itself use Xcode's Core ML performance report
on the `.mlpackage` files, or an app that loads them with the same compute units
({compute_units}).

## On an Android phone (Termux) or an Arm board (ONNX bundles)

```
# copy the folder over, e.g.: adb push {folder_name} /data/local/tmp/  (or scp to the board)
pkg install python python-numpy      # Termux; on a board: apt install python3-numpy
python3 -m pip install onnxruntime
cd {folder_name}
taskset 80 python3 runner.py --threads {threads}   # pin to one big core (CPU 7 on a Snapdragon 855)
```

Close other apps, keep the device plugged in and cool; `python3 runner.py --check` validates
the bundle without measuring.

## Back on the machine that made the bundle

```
nas-build-lut --device {device} --import {folder_name}/results.json
```

This checks `results.json` against `manifest.json` (its SHA-256, device and keys) and writes
`lut-{device}-{resolution}.json`{import_validation}. Measured figures replace any predicted ones.
"""


def _manifest(profile: DeviceProfile, entries: list[dict[str, Any]], models: list[dict[str, Any]],
              toolkit: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = {
        "schema": _runner.SCHEMA, "device": profile.name, "backend": profile.backend,
        "format": profile.model_format, "threads": profile.threads, "batch": profile.batch,
        "warmup": profile.warmup, "repeats": profile.repeats, "seed": 0,
    }
    if profile.backend == "onnxruntime":
        m["providers"] = list(profile.providers)
        m["graph_optimization"] = profile.graph_optimization
    else:
        m["compute_units"] = profile.compute_units
    m["entries"] = entries
    m["models"] = models
    m[_TOOLKIT_KEY] = toolkit
    return m


def write_bundle(
    space: SearchSpace,
    profile: DeviceProfile,
    *,
    folder: str | os.PathLike[str],
    resolution: int,
    num_classes: int = 1000,
    in_chans: int = 3,
    distillation: bool | None = None,
    shard: tuple[int, int] | None = None,
    validation_archs: Sequence[ArchConfig] = (),
    rounds: int = VALIDATION_ROUNDS,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
) -> BundleInfo:
    """Write a bundle to be run on the device: models, ``manifest.json``, ``runner.py`` and ``README.md``.

    Model files that already exist (from an interrupted earlier call for the same setup) are
    reused, and the manifest holds no dates, so rewriting an unchanged bundle keeps its
    SHA-256 and any ``results.json`` measured for it stays valid.

    Args:
        space: the search space.
        profile: any profile; ONNX models for onnxruntime, ``.mlpackage`` for coreml.
        folder: the bundle folder (created).
        resolution, num_classes, in_chans, distillation: the lowering setup.
        shard: ``(i, n)``: only this shard's specs.
        validation_archs: whole networks to include for end-to-end validation.
        rounds: each network is listed this many times (one file), so the runner times it in
            rounds far apart; the import keeps the best round.
        jobs: export worker processes (see :func:`build_lut`).
        progress: called as models are written.

    Returns:
        A :class:`BundleInfo`.

    Raises:
        NasUserError: ``folder`` holds a bundle of another setup.
    """
    folder = Path(folder)
    specs = lut_specs(space, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                      distillation=distillation, shard=shard)
    dist = family_defaults(space.family) if distillation is None else bool(distillation)
    fmt = profile.model_format
    setup = {"device": profile.name, "profile": profile.to_dict(), "space_name": space.name,
             "space_hash": space.hash, "space": space.to_dict(), "resolution": resolution,
             "num_classes": num_classes, "in_chans": in_chans, "distillation": dist,
             "shard": f"{shard[0]}/{shard[1]}" if shard else None}
    marker = folder / ".bundle-setup.json"
    if marker.is_file():
        try:
            old = read_json(marker, what="bundle setup")
        except FileFormatError:
            old = None
        if old != setup:
            raise NasUserError(f"bundle folder {str(folder)!r} holds a bundle for another setup (device, profile, "
                               f"space, resolution or shard); pass another --bundle or delete it")
    elif folder.exists() and any(folder.iterdir()):
        raise NasUserError(f"{str(folder)!r} exists and is not a bundle made by nas-build-lut; pass another "
                           f"--bundle or delete it")
    atomic_write_json(marker, setup)
    items = [_entry_item(s, profile.batch) for s in specs]
    items += _model_items(validation_archs, batch=profile.batch, resolution=resolution, num_classes=num_classes,
                          in_chans=in_chans, distillation=dist, rounds=rounds)
    todo, reused, seen = [], 0, set()
    for item in items:
        if item.file_key in seen:
            continue
        seen.add(item.file_key)
        path = folder / _file_name(item.file_key, fmt, item.kind)
        if path.exists():
            reused += 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            todo.append((item, str(path)))
    if reused:
        logger.info("bundle %s: reusing %d model files written earlier", folder, reused)
    t0 = time.monotonic()
    total_cost = sum(i.cost for i, _ in todo)
    done_cost = done = 0
    n_jobs = _default_jobs(total_cost * (8 if fmt == "mlpackage" else 1), jobs)
    with _exporter(n_jobs, fmt, _coreml_options(profile)) as ex:
        step = max(1, n_jobs * 4)
        for start in range(0, len(todo), step):
            part = todo[start:start + step]
            ex.wait(ex.submit(part))
            done += len(part)
            done_cost += sum(i.cost for i, _ in part)
            if progress is not None:
                elapsed = time.monotonic() - t0
                progress(BuildProgress("export", done, len(todo), elapsed,
                                       elapsed / done_cost * (total_cost - done_cost), part[-1][0].ident))
    entries = [{"key": i.ident, "file": _file_name(i.ident, fmt, "entry"), "input_shape": list(i.input_shape)}
               for i in items if i.kind == "entry"]
    models = [{"name": i.ident, "file": _file_name(i.file_key, fmt, "model"), "input_shape": list(i.input_shape)}
              for i in items if i.kind == "model"]
    toolkit = {**setup, "networks": {i.file_key: i.arch for i in items if i.kind == "model"},
               "rounds": {i.ident: i.file_key for i in items if i.kind == "model"}}
    manifest = _manifest(profile, entries, models, toolkit)
    manifest_path = folder / _runner.MANIFEST_NAME
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    runner = folder / "runner.py"
    shutil.copyfile(Path(_runner.__file__), runner)
    runner.chmod(0o755)
    runtime = "coremltools (macOS)" if fmt == "mlpackage" else "onnxruntime"
    atomic_write_text(folder / "README.md", _README.format(
        device=profile.name, backend=profile.backend, fmt=fmt, space=space.name, space_hash=space.hash,
        resolution=resolution, batch=profile.batch, n_entries=len(entries),
        models_line=(f" and {len({m['file'] for m in models})} whole networks for validation (each timed in "
                     f"{rounds} rounds)" if models else ""),
        threads=profile.threads, warmup=profile.warmup, repeats=profile.repeats, runtime=runtime,
        pip_runtime="coremltools" if fmt == "mlpackage" else "onnxruntime", folder_name=folder.name,
        compute_units=profile.compute_units,
        import_validation=(", plus the validation report and calibration from the whole networks"
                           if models else ""),
    ))
    _runner.load_manifest(folder)  # the runner must accept what we wrote
    return BundleInfo(folder, manifest_path, len(entries), len(toolkit["networks"]), reused,
                      _runner.manifest_sha256(manifest_path))


# --------------------------------------------------------------------------- import
@dataclass
class ImportResult:
    """What :func:`import_results` produced.

    Attributes:
        table: the table (saved at ``path``).
        path: where it was saved.
        imported: entries taken from the results.
        replaced_predicted: predicted entries that measured ones replaced.
        complete: whether the runner finished every model of the manifest.
        networks: whole-network stats by name, with ``archs`` their architectures.
    """

    table: LatencyTable
    path: Path
    imported: int
    replaced_predicted: int
    complete: bool
    networks: dict[str, LatencyStats] = field(default_factory=dict)
    archs: dict[str, ArchConfig] = field(default_factory=dict)


def _load_bundle_manifest(bundle: Path) -> tuple[dict[str, Any], str]:
    mpath = bundle / _runner.MANIFEST_NAME
    manifest = read_json(mpath, what="bundle manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get(_TOOLKIT_KEY), dict) \
            or not isinstance(manifest.get("entries"), list):
        raise FileFormatError(f"{str(mpath)!r} is not a manifest written by nas-build-lut (no {_TOOLKIT_KEY!r} "
                              f"section); import results only into the bundle they were measured for")
    return manifest, _runner.manifest_sha256(mpath)


def _samples_stats(record: Any, where: str) -> LatencyStats:
    return LatencyStats.from_samples(_samples_stats_raw(record, where))


def _samples_stats_raw(record: Any, where: str) -> list[float]:
    if not isinstance(record, dict) or "samples_ms" not in record:
        raise FileFormatError(f"{where} must be an object with samples_ms")
    try:
        LatencyStats.from_samples(record["samples_ms"])
    except NasUserError as exc:
        raise FileFormatError(f"{where}: {exc}") from None
    return [float(x) for x in record["samples_ms"]]


def import_results(
    results: str | os.PathLike[str],
    *,
    bundle: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> ImportResult:
    """Turn a runner's ``results.json`` into a LUT, checking it against the bundle's manifest.

    Measured entries replace predicted ones in an existing table of the same setup at ``out``
    (e.g. the predicted iPhone LUT), and add to a partial measured one (e.g. other shards).

    Args:
        results: the runner's ``results.json``.
        bundle: the bundle folder (default: the folder holding ``results``).
        out: the LUT file (default ``lut-<device>-<resolution>.json`` in the working folder).
        device: the device the caller expects; refused if the results are for another.

    Returns:
        An :class:`ImportResult`.

    Raises:
        FileFormatError: a missing, truncated or corrupt results or manifest file.
        NasUserError: results for another manifest, device or keys; ``out`` of another setup.
    """
    from latency.lut import default_lut_path
    from latency.profiles import DeviceProfile as _Profile

    rpath = Path(results)
    bdir = Path(bundle) if bundle is not None else rpath.parent
    data = read_json(rpath, what="results file")
    if not isinstance(data, dict) or data.get("schema") != _runner.SCHEMA or not isinstance(data.get("results"), dict):
        raise FileFormatError(f"results file {str(rpath)!r} is not a schema-{_runner.SCHEMA} runner results file "
                              f"(need schema, manifest_sha256, device and results)")
    if not (bdir / _runner.MANIFEST_NAME).is_file():
        raise NasUserError(f"no {_runner.MANIFEST_NAME} next to {str(rpath)!r}; pass the bundle folder with --bundle DIR")
    manifest, digest = _load_bundle_manifest(bdir)
    if data.get("manifest_sha256") != digest:
        raise NasUserError(f"{str(rpath)!r} does not match the bundle's manifest: it was measured for manifest "
                           f"sha256 {str(data.get('manifest_sha256'))[:12]}..., {str(bdir / 'manifest.json')!r} has "
                           f"{digest[:12]}...; run runner.py on this bundle and import its results.json")
    if data.get("device") != manifest.get("device") or data.get("backend") != manifest.get("backend"):
        raise NasUserError(f"{str(rpath)!r} is for device {data.get('device')!r} ({data.get('backend')}), the "
                           f"manifest for {manifest.get('device')!r} ({manifest.get('backend')})")
    if device is not None and device != manifest["device"]:
        raise NasUserError(f"{str(rpath)!r} holds {manifest['device']!r} results, not {device!r}; pass "
                           f"--device {manifest['device']}")
    keys = [e.get("key") for e in manifest["entries"] if isinstance(e, dict)]
    names = [m.get("name") for m in manifest.get("models", []) if isinstance(m, dict)]
    stray = sorted(set(data["results"]) - set(keys))
    stray_models = sorted(set(data.get("models") or {}) - set(names))
    if stray or stray_models:
        example = (stray or stray_models)[0]
        raise NasUserError(f"{str(rpath)!r} does not match the bundle's manifest: {len(stray) + len(stray_models)} "
                           f"result key(s) are not in it (e.g. {example!r})")
    tk = manifest[_TOOLKIT_KEY]
    try:
        space = SearchSpace.from_dict(tk["space"])
        profile = _Profile.from_dict(tk["profile"])
        res, classes, chans, dist = int(tk["resolution"]), int(tk["num_classes"]), int(tk["in_chans"]), \
            bool(tk["distillation"])
    except (KeyError, TypeError, ValueError, NasUserError) as exc:
        raise FileFormatError(f"{str(bdir / 'manifest.json')!r}: bad {_TOOLKIT_KEY} section: {exc}") from None
    threads = data.get("threads", profile.threads)
    if threads != profile.threads:
        logger.warning("results were measured with %s thread(s), the profile says %d; the LUT records %s",
                       threads, profile.threads, threads)
        profile = profile.with_threads(int(threads))
    shard = parse_shard(tk.get("shard"))
    host = data.get("host") if isinstance(data.get("host"), dict) else {}
    env = {"host": host, "runner": {k: data.get(k) for k in ("threads", "warmup", "repeats", "interleave", "seed",
                                                             "updated_utc")},
           "runs": data.get("runs"), "manifest_sha256": digest}
    fresh = new_table(space, profile, resolution=res, num_classes=classes, in_chans=chans, distillation=dist,
                      measurement="bundle", expected_entries=len(keys), shard=shard, environment=env)
    stats = {k: _samples_stats(v, f"{str(rpath)!r}: results[{k!r}]") for k, v in data["results"].items()}
    round_of = tk.get("rounds") if isinstance(tk.get("rounds"), dict) else {}
    net_samples: dict[str, list[list[float]]] = {}
    for k, v in (data.get("models") or {}).items():
        net_samples.setdefault(round_of.get(k, k), []).append(
            list(_samples_stats_raw(v, f"{str(rpath)!r}: models[{k!r}]")))
    networks = _best_rounds(net_samples)[0]
    target = Path(out) if out is not None else default_lut_path(profile.name, res)
    table = _open_existing(target, fresh, action="import")
    replaced = 0
    if table is None:
        table = fresh
    else:
        replaced = sum(1 for k in stats if k in table and not table[k].measured)
        table.environment = env
        table.measurement = "bundle"
        if table.shard is None and table.expected_entries is None:
            table.expected_entries = len(keys)
        if replaced and table.calibration.method == "prior":
            table.set_calibration(Calibration())  # the prior's overhead does not belong to measured figures
    for key, st in stats.items():
        table.set_measured(key, st)
    if table.n_predicted == 0:
        table.prior = None
    complete = bool(data.get("complete")) and len(stats) == len(keys)
    if not complete:
        logger.warning("results are partial: %d of %d blocks measured; run runner.py again to finish them",
                       len(stats), len(keys))
    table.save(target)
    archs = {}
    for name, arch in (tk.get("networks") or {}).items():
        try:
            archs[name] = ArchConfig.from_dict(arch)
        except NasUserError as exc:
            raise FileFormatError(f"{str(bdir / 'manifest.json')!r}: network {name!r}: {exc}") from None
    return ImportResult(table, target, len(stats), replaced, complete, networks,
                        {k: v for k, v in archs.items() if k in networks})
