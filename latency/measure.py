"""In-process LUT builds: profile every block spec on this machine, and time whole networks.

:func:`build_lut` (local profiles such as ``local-cpu``): every distinct spec of the space under
the setup (:func:`latency.specs.lut_specs`) is exported (TorchScript exporter, in ``jobs``
worker processes while nothing is being timed), loaded into ONNX Runtime with the profile's
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

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latency import bundle_runner as _runner
from latency._private import (
    EXPORT_BATCH_COST,
    VALIDATION_ROUNDS,
    BuildProgress,
    Exporter,
    Item,
    ProgressFn,
    best_rounds,
    coreml_options,
    default_jobs,
    entry_item,
    exporter,
    model_items,
    open_existing,
)
from latency.lut import LatencyTable
from latency.profiles import DeviceProfile
from latency.specs import lut_specs, new_table, resolve_setup
from latency.stats import LatencyStats
from search_spaces import ArchConfig, BlockSpec, LoweringSetup, SearchSpace
from search_spaces.errors import NasUserError

__all__ = ["BuildProgress", "BuildResult", "VALIDATION_ROUNDS", "build_lut", "measure_networks"]

logger = logging.getLogger(__name__)

OnGroup = Callable[[list[tuple[Item, list[float]]]], None]


# --------------------------------------------------------------------------- timing on this machine
def _run_fn(item: Item, path: str, profile: DeviceProfile) -> Callable[[], Any]:
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


def _batches(groups: list[list[Item]], max_cost: int) -> list[list[list[Item]]]:
    out: list[list[list[Item]]] = []
    cost = 0
    for g in groups:
        c = sum(i.cost for i in g)
        if not out or cost + c > max_cost:
            out.append([])
            cost = 0
        out[-1].append(g)
        cost += c
    return out


@dataclass
class _Schedule:
    """Timing groups, export batches and workers of one measurement run."""

    groups: list[list[Item]]
    batches: list[list[list[Item]]]
    jobs: int
    overlap: bool
    total: int
    total_cost: int


def _schedule(entries: list[Item], models: list[Item], profile: DeviceProfile, *, jobs: int | None, chunk: int,
              overlap: bool | None) -> _Schedule:
    """Group items for timing and batch the groups for export.

    Without ``overlap`` nothing else of ours runs while timing: exports of the next batch
    happen while the current batch's sessions load, then wait. With ``overlap`` (default when
    the machine has a spare core for it) one worker keeps exporting ahead on that spare core
    while the main process times, with ``profile.threads`` on the others.
    """
    groups = [[item for _, item in g] for g in _runner.plan_groups(entries, models, chunk)]
    total_cost = sum(i.cost for i in entries) + sum(i.cost for i in models)
    cpus = os.cpu_count() or 1
    if overlap is None:
        overlap = jobs is None and cpus > profile.threads
    overlap = overlap and total_cost >= 48  # small builds export inline
    if overlap:
        n_jobs = jobs if jobs is not None else max(1, min(cpus - profile.threads, 8))
        batches = _batches(groups, 2 * chunk)  # with workers, a few groups at a time (fewer pauses)
    else:
        n_jobs = default_jobs(total_cost, jobs)
        batches = _batches(groups, EXPORT_BATCH_COST if n_jobs > 1 else 1)  # inline: smooth progress
    return _Schedule(groups, batches, n_jobs, overlap, len(entries) + len(models), total_cost)


class _Session:
    """One measurement run: exported files in a temporary folder, removed once loaded."""

    def __init__(self, sched: _Schedule, profile: DeviceProfile, tmp: str, ex: Exporter, retries: int,
                 progress: ProgressFn | None) -> None:
        self.sched, self.profile, self.tmp, self.ex, self.retries = sched, profile, tmp, ex, retries
        self.progress = progress
        self.paths: dict[str, str] = {}
        self.uses_left: dict[str, int] = {}
        for g in sched.groups:
            for item in g:
                self.uses_left[item.file_key] = self.uses_left.get(item.file_key, 0) + 1
        self.t_start = time.monotonic()
        self.done = self.done_cost = 0

    def export(self, bi: int) -> list[list[Any]]:
        """Start exporting batch ``bi`` (nothing past the last batch)."""
        if bi >= len(self.sched.batches):
            return []
        jobs = []
        fmt = self.profile.model_format
        for gi, g in enumerate(self.sched.batches[bi]):
            for ii, item in enumerate(g):
                if item.file_key not in self.paths:
                    self.paths[item.file_key] = os.path.join(self.tmp, f"b{bi}-{gi}-{ii}.{fmt}")
                    jobs.append((item, self.paths[item.file_key]))
        return self.ex.submit(jobs)

    def load(self, batch: list[list[Item]]) -> list[list[Callable[[], Any]]]:
        """Open every model of ``batch``; delete each file after its last use."""
        fns_per_group = []
        for g in batch:
            fns = []
            for item in g:
                path = self.paths[item.file_key]
                fns.append(_run_fn(item, path, self.profile))
                self.uses_left[item.file_key] -= 1
                if self.uses_left[item.file_key] == 0:
                    with contextlib.suppress(OSError):
                        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            fns_per_group.append(fns)
        return fns_per_group

    def time(self, batch: list[list[Item]], fns_per_group: list[list[Callable[[], Any]]], on_group: OnGroup) -> None:
        for g, fns in zip(batch, fns_per_group):
            samples = _time_group(fns, self.profile, self.retries)
            on_group(list(zip(g, samples)))
            self.done += len(g)
            self.done_cost += sum(i.cost for i in g)
            if self.progress is not None:
                elapsed = time.monotonic() - self.t_start
                left = self.sched.total_cost - self.done_cost
                eta = elapsed / self.done_cost * left if self.done_cost else None
                self.progress(BuildProgress("measure", self.done, self.sched.total, elapsed, eta, g[-1].ident))


def _measure(entries: list[Item], models: list[Item], profile: DeviceProfile, *, jobs: int | None, chunk: int,
             on_group: OnGroup, progress: ProgressFn | None, retries: int = 1, overlap: bool | None = None) -> None:
    """Export and time items on this machine: block groups timed round-robin, whole networks spread between them."""
    if not profile.is_local:
        raise NasUserError(f"device {profile.name!r} is not measured on this machine; write a bundle instead")
    sched = _schedule(entries, models, profile, jobs=jobs, chunk=chunk, overlap=overlap)
    logger.debug("measuring %d items in %d groups, %d export batches, %d export worker(s)", sched.total,
                 len(sched.groups), len(sched.batches), sched.jobs)
    with tempfile.TemporaryDirectory(prefix="nas-lut-") as tmp, \
            exporter(sched.jobs, profile.model_format, coreml_options(profile), force_pool=sched.overlap) as ex:
        run = _Session(sched, profile, tmp, ex, retries, progress)
        pending = run.export(0)
        for bi, batch in enumerate(sched.batches):
            ex.wait(pending)
            pending = run.export(bi + 1)  # export the next batch while this one's sessions load
            fns_per_group = run.load(batch)
            if ex.pool is not None and not sched.overlap:
                ex.wait(pending)  # nothing else runs while timing
            run.time(batch, fns_per_group, on_group)
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


def _prepare(space: SearchSpace, profile: DeviceProfile, setup: LoweringSetup, *, out: Path,
             shard: tuple[int, int] | None, statistic: str) -> tuple[LatencyTable, list[BlockSpec], int]:
    """The table to fill (resumed or new), the specs still to measure, and how many were kept."""
    from latency.runtime import measurement_environment

    specs = lut_specs(space, setup, shard=shard)
    fresh = new_table(space, profile, setup, measurement="in-process", expected_entries=len(specs), shard=shard,
                      environment=measurement_environment(profile), statistic=statistic)
    table = _resume_or_new(out, fresh, statistic)
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
        self.measured = 0
        self.last_save = time.monotonic()

    def __call__(self, results: list[tuple[Item, list[float]]]) -> None:
        for item, samples in results:
            if item.kind == "entry":
                self.table.set_measured(item.ident, LatencyStats.from_samples(samples))
                self.measured += 1
            else:
                self.net_samples.setdefault(item.file_key, []).append(samples)
        if time.monotonic() - self.last_save >= self.every_s:
            self.table.save(self.out)
            self.last_save = time.monotonic()


def build_lut(
    space: SearchSpace,
    profile: DeviceProfile,
    *,
    out: str | os.PathLike[str],
    setup: LoweringSetup | None = None,
    resolution: Any = None,
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
    overlap: bool | None = None,
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
        setup: the lowering setup; or give its fields (``resolution``, ``num_classes``,
            ``in_chans``, ``distillation``, ``task``) as keywords (see
            :func:`latency.specs.resolve_setup`).
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
    out, t0 = Path(out), time.monotonic()
    setup = resolve_setup(space, setup, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                          distillation=distillation, task=task)
    table, todo, resumed = _prepare(space, profile, setup, out=out, shard=shard, statistic=statistic)
    record = _Recorder(table, out, checkpoint_every_s)
    try:
        _measure([entry_item(s, profile.batch) for s in todo],
                 model_items(validation_archs, batch=profile.batch, setup=setup, rounds=rounds), profile,
                 jobs=jobs, chunk=chunk, on_group=record, progress=progress, retries=retries, overlap=overlap)
    except BaseException:
        if record.measured:
            table.save(out)
            logger.info("saved %d finished entries to %s; run the same command again to resume", len(table), out)
        raise
    table.save(out)
    best, every = best_rounds(record.net_samples)
    return BuildResult(table, out, record.measured, resumed, time.monotonic() - t0, best, every)


def measure_networks(archs: Sequence[ArchConfig], profile: DeviceProfile, *, setup: LoweringSetup | None = None,
                     resolution: Any = None, num_classes: int | None = None, in_chans: int | None = None,
                     distillation: bool | None = None, rounds: int = VALIDATION_ROUNDS, jobs: int | None = None,
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
