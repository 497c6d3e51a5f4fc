"""Joining LUTs of one setup, e.g. the shards of a split build (``nas-build-lut --merge``)."""
from __future__ import annotations

import logging
from collections.abc import Iterable

from latency.lut import LatencyTable
from search_spaces import SearchSpace
from search_spaces.errors import NasUserError

__all__ = ["merge_tables"]

logger = logging.getLogger(__name__)


def merge_tables(tables: Iterable[LatencyTable]) -> LatencyTable:
    """Join tables of one setup (e.g. the shards of a split build) into one.

    A measured entry beats a predicted one. When two tables both measured a key, the entry
    with more timed runs is kept (the first on a tie); the count of such overlaps is logged.

    Args:
        tables: two or more tables with the same device, backend, threads, batch,
            precision, resolution, classes, input channels, distillation and space hash.

    Returns:
        A new table (``measurement`` ``merged`` unless all inputs share one), with the
        first table's header, ``shard`` cleared and ``expected_entries`` taken from the
        space when the tables record it.

    Raises:
        NasUserError: fewer than one table, or tables of different setups (the message names
            the differing fields and files).
    """
    tables = list(tables)
    if not tables:
        raise NasUserError("nothing to merge: pass at least one LUT file")
    first = tables[0]
    for t in tables[1:]:
        first.check_same_setup(t, action="merge")
    measurements = {t.measurement for t in tables}
    out = LatencyTable(
        device=first.device, backend=first.backend, setup=first.setup, space_name=first.space_name,
        space_hash=first.space_hash, space=first.space, profile=first.profile, environment=first.environment,
        threads=first.threads, batch=first.batch, precision=first.precision,
        measurement=measurements.pop() if len(measurements) == 1 else "merged", statistic=first.statistic,
        expected_entries=None, shard=None, calibration=first.calibration, prior=first.prior,
    )
    hosts = {str(t.environment.get("host", {}).get("cpu")) for t in tables}
    if len(hosts) > 1:
        logger.warning("merging tables measured on different hosts (%s); their figures may not be comparable",
                       ", ".join(sorted(hosts)))
    out.environment = {**first.environment, "merged_from": [
        {"path": str(t.path) if t.path else None, "shard": t.shard, "entries": len(t),
         "host": t.environment.get("host", {}).get("cpu")} for t in tables]}
    overlaps = 0
    for t in tables:
        for key, entry in t.items():
            old = out._entries.get(key)
            if old is None or (entry.measured and not old.measured):
                out._entries[key] = entry
            elif entry.measured and old.measured:
                overlaps += 1
                if (entry.stats.count if entry.stats else 0) > (old.stats.count if old.stats else 0):
                    out._entries[key] = entry
    if overlaps:
        logger.info("%d keys were measured in more than one table; kept the entry with more runs", overlaps)
    if first.space is not None:
        from latency.specs import lut_specs

        out.expected_entries = len(lut_specs(SearchSpace.from_dict(first.space), first.setup))
    out._touch()
    return out
