"""In-process LUT builds: profile every block spec on this machine, and time whole networks.

:func:`build_lut` (local profiles such as ``local-cpu``): every distinct spec of the space under
the setup (:func:`latency.specs.lut_specs`) is exported (TorchScript exporter, in worker
processes ahead of the timing: all of them between timed groups, one per core the timing leaves
free while it times; see :mod:`latency._pipeline`), loaded into ONNX Runtime with the profile's
threads and optimisation level, and timed with the bundle runner's own loop
(:func:`latency.bundle_runner.time_runs`): groups of ``chunk`` blocks are warmed up, then timed
round-robin, so slow drift spreads over a group instead of biasing a few blocks. A noisy
measurement (IQR above 10% of the median: another process took the CPU) is repeated once at
once, keeping the round with the lower median. Whole networks for validation can be
interleaved with the block groups, each timed in rounds far apart. The partial table is saved
atomically every few seconds; rerunning the same command skips finished keys. ``shard=(i, n)``
measures every n-th spec only; :func:`latency.lut.merge_tables` joins them.

:func:`measure_networks` times whole networks alone, with the same machinery.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latency import bundle_runner as _runner
from latency._pipeline import ExportPipeline, start_workers
from latency._private import (
    VALIDATION_ROUNDS,
    BuildProgress,
    Item,
    ProgressFn,
    best_rounds,
    coreml_options,
    default_jobs,
    entry_item,
    model_items,
    open_existing,
)
from latency.lut import LatencyTable
from latency.profiles import DeviceProfile
from latency.specs import ResolutionLike, lut_specs, new_table, resolve_setup
from latency.stats import LatencyStats
from search_spaces import ArchConfig, BlockSpec, LoweringSetup, SearchSpace
from search_spaces.errors import NasUserError

__all__ = ["BuildProgress", "BuildResult", "VALIDATION_ROUNDS", "build_lut", "measure_networks"]

logger = logging.getLogger(__name__)

OnGroup = Callable[[list[tuple[Item, list[float]]]], None]
_BIG_SPACE_PROBES = 2000  # stage lowerings of enumeration (search_spaces.enumerate.probe_count; the full V2 space: 30,144)


# --------------------------------------------------------------------------- timing on this machine
def _ort_options(profile: DeviceProfile) -> dict[str, Any] | None:
    """The session options export workers optimize graphs with (ONNX Runtime profiles), else None."""
    if profile.backend != "onnxruntime":
        return None
    return {"threads": profile.threads, "graph_optimization": profile.graph_optimization,
            "providers": tuple(profile.providers)}


def _run_fn(item: Item, path: str, profile: DeviceProfile) -> Callable[[], Any]:
    """Open ``item``'s model (its graph already optimized by the export worker) and return one run of it."""
    from latency.runtime import ort_session

    if profile.backend == "onnxruntime":
        session = ort_session(path, threads=profile.threads, graph_optimization="disabled",
                              providers=profile.providers)
        return _runner.ort_run_fn(session, item.input_shape)
    return _runner.coreml_run_fn(path, item.input_shape, compute_units=profile.compute_units)


def _time_group(fns: list[Callable[[], Any]], runs: tuple[int, int], retries: int) -> list[list[float]]:
    """Time a group round-robin with ``runs = (warmup, repeats)``; re-time its noisy members (IQR > 10% of the
    median) up to ``retries`` times.

    Another process that takes the CPU for a moment makes a measurement noisy and slow; a
    retry a moment later usually finds the CPU free. Each member keeps the timings of its
    round with the lowest median (every round has the same warm-up and repeats).
    """
    warmup, repeats = runs
    samples = _runner.time_runs(fns, warmup=warmup, repeats=repeats, interleave=True)
    best = [LatencyStats.from_samples(s) for s in samples]
    for _ in range(retries):
        noisy = [i for i, st in enumerate(best) if st.noisy]
        if not noisy:
            break
        again = _runner.time_runs([fns[i] for i in noisy], warmup=warmup, repeats=repeats, interleave=True)
        for i, s in zip(noisy, again):
            st = LatencyStats.from_samples(s)
            if st.median_ms < best[i].median_ms:
                best[i], samples[i] = st, s
    return samples


def _export_workers(total_cost: int, jobs: int | None, overlap: bool,
                    profile: DeviceProfile) -> tuple[int, int]:
    """Export workers, and how many may export while the main process times.

    By default nothing else of ours runs while timing: every worker exports between timed
    groups. With ``overlap``, the cores the timing does not use keep exporting meanwhile. That
    paid while a block's export cost several times its timing; with blocks recorded from their
    forward (:mod:`latency.onnx_record`) it no longer does, and an export on the other core made
    the timings of the full V2 space at 224 15% slower and twice as often noisy (2026-12-03).
    Small builds export inline (spawning workers that import torch costs more than it saves).
    """
    cpus = os.cpu_count() or 1
    n_jobs = default_jobs(total_cost, jobs)
    if n_jobs == 1:
        return 0, 0  # inline
    return n_jobs, min(n_jobs, max(0, cpus - profile.threads)) if overlap else 0


def _measure(entries: list[Item], models: list[Item], profile: DeviceProfile, *, jobs: int | None, chunk: int,
             on_group: OnGroup, progress: ProgressFn | None, retries: int = 1, overlap: bool = False,
             pool: ProcessPoolExecutor | None = None) -> None:
    """Export and time items on this machine: block groups timed round-robin, whole networks spread between them.

    ``pool``: export workers started earlier (:func:`latency._pipeline.start_workers`); shut down here.
    """
    if not profile.is_local:
        raise NasUserError(f"device {profile.name!r} is not measured on this machine; write a bundle instead")
    groups = [[item for _, item in g] for g in _runner.plan_groups(entries, models, chunk)]
    total, total_cost = len(entries) + len(models), sum(i.cost for g in groups for i in g)
    n_jobs, quiet = _export_workers(total_cost, jobs, overlap, profile)
    if pool is not None and n_jobs == 0:
        pool.shutdown(wait=False, cancel_futures=True)  # started early, but the build turned out small
        pool = None
    logger.debug("measuring %d items in %d groups, %d export worker(s), %d while timing", total, len(groups),
                 n_jobs, quiet)
    t_start, done, done_cost = time.monotonic(), 0, 0
    with tempfile.TemporaryDirectory(prefix="nas-lut-") as tmp:
        pipe = ExportPipeline(groups, fmt=profile.model_format, coreml=coreml_options(profile), folder=tmp,
                              jobs=n_jobs, quiet_limit=quiet, lookahead=max(8 * chunk, 32),
                              optimize=_ort_options(profile), pool=pool)
        try:
            for g in groups:
                pipe.ensure(g)
                fns = [_run_fn(item, pipe.path(item), profile) for item in g]
                for item in g:
                    pipe.release(item)
                pipe.quiet()
                samples = _time_group(fns, profile.runs(g[0].kind), retries)
                del fns
                on_group(list(zip(g, samples)))
                done += len(g)
                done_cost += sum(i.cost for i in g)
                if progress is not None:
                    elapsed = time.monotonic() - t_start
                    progress(BuildProgress("measure", done, total, elapsed,
                                           elapsed / done_cost * (total_cost - done_cost), g[-1].ident))
        finally:
            pipe.close()


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


def _resume_or_new(out: Path, fresh: LatencyTable, statistic: str) -> LatencyTable:
    """The partial table at ``out`` to finish (same setup, shard and profile), else ``fresh``."""
    table = open_existing(out, fresh, action="resume")
    if table is None:
        return fresh
    if table.shard != fresh.shard:
        raise NasUserError(f"{str(out)!r} holds shard {table.shard or 'none'}, this run is shard "
                           f"{fresh.shard or 'none'}; pass another --out")
    if {k: v for k, v in table.profile.items() if k != "description"} != \
            {k: v for k, v in fresh.profile.items() if k != "description"}:
        raise NasUserError(f"{str(out)!r} was measured with another profile ({table.profile}); pass another "
                           f"--out or delete it")
    table.expected_entries = fresh.expected_entries
    table.measurement = "in-process"
    table.set_statistic(statistic)
    return table


def _early_workers(space: SearchSpace, jobs: int | None) -> ProcessPoolExecutor | None:
    """Export workers started before the specs are enumerated, for builds of a big space with default ``jobs``.

    They import torch while this process enumerates the specs (the same number of workers
    :func:`latency._private.default_jobs` picks for a big build).
    """
    from search_spaces.enumerate import probe_count

    cpus = os.cpu_count() or 1
    if jobs is not None or cpus < 2 or probe_count(space) < _BIG_SPACE_PROBES:
        return None
    return start_workers(min(cpus, 8))


def _prepare(space: SearchSpace, profile: DeviceProfile, setup: LoweringSetup, *, out: Path,
             shard: tuple[int, int] | None, statistic: str,
             pool: ProcessPoolExecutor | None) -> tuple[LatencyTable, list[BlockSpec], int]:
    """The table to fill (resumed or new), the specs still to measure, and how many were kept.

    ``pool`` (workers started early) is shut down when this fails.
    """
    from latency.runtime import measurement_environment

    try:
        specs = lut_specs(space, setup, shard=shard)
        fresh = new_table(space, profile, setup, measurement="in-process", expected_entries=len(specs), shard=shard,
                          environment=measurement_environment(profile), statistic=statistic)
        table = _resume_or_new(out, fresh, statistic)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    done_keys = {k for k, e in table.items() if e.measured}
    todo = [s for s in specs if s.key not in done_keys]
    resumed = len(specs) - len(todo)
    if resumed:
        logger.info("resuming %s: %d of %d entries already measured, %d to go", out, resumed, len(specs), len(todo))
    return table, todo, resumed


class _Recorder:
    """Stores timed groups in the table (saving it every ``every_s`` seconds) and network samples apart."""

    def __init__(self, table: LatencyTable, out: Path, every_s: float) -> None:
        self.table, self.out, self.every_s = table, out, every_s
        self.net_samples: dict[str, list[list[float]]] = {}
        self.measured = self.saved = 0
        self.last_save = time.monotonic()

    def __call__(self, results: list[tuple[Item, list[float]]]) -> None:
        for item, samples in results:
            if item.kind == "entry":
                self.table.set_measured(item.ident, LatencyStats.from_samples(samples))
                self.measured += 1
            else:
                self.net_samples.setdefault(item.file_key, []).append(samples)
        # save only new entries (a group that held a whole network leaves nothing to resume)
        if self.measured > self.saved and time.monotonic() - self.last_save >= self.every_s:
            self.table.save(self.out)
            self.last_save, self.saved = time.monotonic(), self.measured


def build_lut(
    space: SearchSpace,
    profile: DeviceProfile,
    *,
    out: str | os.PathLike[str],
    setup: LoweringSetup | None = None,
    resolution: ResolutionLike | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    distillation: bool | None = None,
    task: str | None = None,
    shard: tuple[int, int] | None = None,
    validation_archs: Sequence[ArchConfig] = (),
    rounds: int = VALIDATION_ROUNDS,
    statistic: str = "median",
    jobs: int | None = None,
    chunk: int = 16,
    retries: int = 1,
    overlap: bool = False,
    checkpoint_every_s: float = 5.0,
    progress: ProgressFn | None = None,
) -> BuildResult:
    """Measure every spec of ``space`` under a setup on this machine and save the table at ``out``.

    Resumable: if ``out`` holds a partial table of the same setup, its measured keys are kept
    and only the rest is measured. The partial table is saved atomically at least every
    ``checkpoint_every_s`` seconds, and when the build is interrupted.

    Args:
        space: the search space.
        profile: a local profile (``profile.is_local``), e.g. ``get_profile("local-cpu")``.
        out: the LUT file.
        setup: the lowering setup; or its fields as keywords (:func:`latency.specs.resolve_setup`).
        shard: ``(i, n)``: measure only this shard's share (see :func:`latency.specs.lut_specs`).
        validation_archs: whole networks to time end to end, interleaved with the block
            groups (their stats come back in :attr:`BuildResult.networks`).
        rounds: rounds in which each validation network is timed, far apart in time; the
            best round counts (robust against other processes that take the CPU a while).
        statistic: which figure predictions sum, ``median`` or ``min`` (both are stored).
        jobs: export worker processes (default: CPU count, capped at 8; 1 for small builds).
        chunk: blocks timed round-robin together.
        retries: times a noisy measurement (IQR > 10% of the median) is repeated at once; the
            round with the lowest median is kept.
        overlap: export on the cores the timing does not use while it times (default: no; the
            machine stays quiet while timing, exports run between timed groups).
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
    out, t0 = Path(out), time.monotonic()
    setup = resolve_setup(space, setup, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                          distillation=distillation, task=task)
    pool = _early_workers(space, jobs)
    table, todo, resumed = _prepare(space, profile, setup, out=out, shard=shard, statistic=statistic, pool=pool)
    record = _Recorder(table, out, checkpoint_every_s)
    try:
        _measure([entry_item(s, profile.batch) for s in todo],
                 model_items(validation_archs, batch=profile.batch, setup=setup, rounds=rounds), profile,
                 jobs=jobs, chunk=chunk, on_group=record, progress=progress, retries=retries, overlap=overlap,
                 pool=pool)
    except BaseException:
        if record.measured:
            table.save(out)
            logger.info("saved %d finished entries to %s; run the same command again to resume", len(table), out)
        raise
    table.save(out)
    best, every = best_rounds(record.net_samples)
    return BuildResult(table, out, record.measured, resumed, time.monotonic() - t0, best, every)


def measure_networks(archs: Sequence[ArchConfig], profile: DeviceProfile, *, setup: LoweringSetup | None = None,
                     resolution: ResolutionLike | None = None, num_classes: int | None = None,
                     in_chans: int | None = None, distillation: bool | None = None, rounds: int = VALIDATION_ROUNDS, jobs: int | None = None,
                     progress: ProgressFn | None = None) -> dict[str, LatencyStats]:
    """Time whole networks end to end on this machine: each exported once, then timed alone in ``rounds`` rounds.

    Args:
        archs: the networks.
        profile: a local profile.
        setup: the lowering setup; or give its fields as keywords (``distillation`` None
            takes the first network's family default).
        rounds: rounds per network, far apart in time; the best round counts.
        jobs: export worker processes.
        progress: called after every timed network.

    Returns:
        Stats by network name, ``subnet-<arch hash>``: those of each network's best round
        (lowest median).
    """
    if setup is None:
        setup = LoweringSetup(**{k: v for k, v in (("resolution", resolution), ("num_classes", num_classes),
                                                   ("in_chans", in_chans), ("distillation", distillation))
                                 if v is not None})
    if setup.distillation is None and archs:
        from search_spaces import family_defaults

        setup = setup.replace(distillation=family_defaults(archs[0].family))
    items = model_items(archs, batch=profile.batch, setup=setup, rounds=rounds)
    samples: dict[str, list[list[float]]] = {}

    def on_group(results: list[tuple[Item, list[float]]]) -> None:
        for item, s in results:
            samples.setdefault(item.file_key, []).append(s)

    _measure([], items, profile, jobs=jobs, chunk=1, on_group=on_group, progress=progress)
    return best_rounds(samples)[0]
