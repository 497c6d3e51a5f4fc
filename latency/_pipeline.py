"""Exporting models ahead of the timing loop of an in-process build, in worker processes.

:class:`ExportPipeline` keeps exports in flight in worker processes, in the order the timing loop
needs them: all workers while the main process waits or opens sessions, and at most
``quiet_limit`` while it times (0 by default: an export on another core slows the timed runs and
makes them noisy, see :func:`latency.measure._export_workers`), so that a timed run never shares
its core with our own exports. Exported files are deleted after their last use.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from typing import Any
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from latency._private import Item, materialize, worker_init
from search_spaces.errors import NasUserError

logger = logging.getLogger(__name__)


def _ready() -> None:
    """A no-op job: submitting it spawns the workers (each imports torch) without waiting for them."""


def start_workers(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` spawned export workers, starting now (they import torch while the caller goes on)."""
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=worker_init)
    for _ in range(jobs):
        pool.submit(_ready)
    return pool


class ExportPipeline:
    """Model files for the timing groups, exported ahead in ``jobs`` worker processes (or inline).

    Args:
        groups: the timing groups, in timing order.
        fmt: ``onnx`` or ``mlpackage``.
        coreml: CoreML conversion options (``mlpackage`` only).
        folder: where the files go (a temporary folder).
        jobs: worker processes; 0 exports inline, in the calling process, just before use.
        quiet_limit: exports allowed in flight while the caller times (see :meth:`quiet`).
        lookahead: most files exported and not yet used at once.
    """

    def __init__(self, groups: Sequence[Sequence[Item]], *, fmt: str, coreml: dict[str, str] | None, folder: str,
                 jobs: int, quiet_limit: int, lookahead: int = 128, optimize: dict[str, Any] | None = None,
                 pool: ProcessPoolExecutor | None = None) -> None:
        self.fmt, self.coreml, self.folder, self.optimize = fmt, coreml, folder, optimize
        self.jobs, self.quiet_limit, self.lookahead = jobs, quiet_limit, lookahead
        self.order: list[Item] = []
        self.uses_left: dict[str, int] = {}
        for g in groups:
            for item in g:
                if item.file_key not in self.uses_left:
                    self.order.append(item)
                self.uses_left[item.file_key] = self.uses_left.get(item.file_key, 0) + 1
        self.paths = {item.file_key: os.path.join(folder, f"m{i}.{fmt}") for i, item in enumerate(self.order)}
        self.next = 0
        self.ready: set[str] = set()
        self.inflight: dict[Future[tuple[str, str, float]], Item] = {}
        self.pool: ProcessPoolExecutor | None = None
        if jobs > 0:
            self.pool = pool if pool is not None else start_workers(jobs)
            self.top_up(jobs)

    # ----------------------------------------------------------------- exporting
    def _export_inline(self, item: Item) -> None:
        materialize(item, self.paths[item.file_key], self.fmt, self.coreml, check=False, optimize=self.optimize)
        self.ready.add(item.file_key)

    def top_up(self, limit: int) -> None:
        """Start exports in timing order until ``limit`` are in flight (or the lookahead is full)."""
        while self.pool is not None and len(self.inflight) < limit and self.next < len(self.order) \
                and len(self.ready) + len(self.inflight) < self.lookahead:
            item = self.order[self.next]
            try:
                future = self.pool.submit(materialize, item, self.paths[item.file_key], self.fmt, self.coreml,
                                          check=False, optimize=self.optimize)
            except BrokenProcessPool:
                self._fall_back()
                return
            self.inflight[future] = item
            self.next += 1

    def _wait_one(self) -> None:
        done, _ = wait(list(self.inflight), return_when=FIRST_COMPLETED)
        for future in done:
            item = self.inflight.pop(future)
            try:
                future.result()
            except BrokenProcessPool:
                self.inflight[future] = item
                self._fall_back()
                return
            except NasUserError:
                raise
            except Exception as exc:
                raise RuntimeError(f"exporting {item.ident!r} failed: {exc}") from exc
            self.ready.add(item.file_key)

    def _fall_back(self) -> None:
        """The workers died or could not start: export the rest in this process."""
        logger.warning("export worker processes failed to start or died (a script that calls this without "
                       "`if __name__ == '__main__':` cannot use them); exporting in this process")
        for item in self.inflight.values():
            self._export_inline(item)
        self.inflight.clear()
        self.close()

    def ensure(self, group: Sequence[Item]) -> None:
        """Return once every model of ``group`` is exported, with all workers busy meanwhile."""
        while any(item.file_key not in self.ready for item in group):
            if self.pool is None:
                self._export_inline(self.order[self.next])
                self.next += 1
                continue
            self.top_up(self.jobs)
            if not self.inflight:
                raise RuntimeError(f"export pipeline stalled before {group[0].ident!r} (lookahead {self.lookahead} "
                                   f"full of files not yet timed)")
            self._wait_one()
        self.top_up(self.jobs)

    def quiet(self) -> None:
        """Return once at most ``quiet_limit`` exports are in flight (call before timing)."""
        while self.pool is not None and len(self.inflight) > self.quiet_limit:
            self._wait_one()

    # ----------------------------------------------------------------- files
    def path(self, item: Item) -> str:
        return self.paths[item.file_key]

    def release(self, item: Item) -> None:
        """One use of ``item``'s file is over; delete it after its last."""
        self.uses_left[item.file_key] -= 1
        if self.uses_left[item.file_key] == 0:
            self.ready.discard(item.file_key)
            path = self.paths[item.file_key]
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)

    def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.shutdown(wait=True, cancel_futures=True)
