"""Seeded random streams, splits and integer checks shared by the datasets, readers and loaders."""
from __future__ import annotations

import math

import numpy as np
import torch

from search_spaces.errors import NasUserError

# Independent random streams, all derived from the user's seed (see _generator).
_STREAM_VAL, _STREAM_TEST, _STREAM_SUBSET, _STREAM_SYNTH = 1, 2, 3, 4
_STREAM_ORDER, _STREAM_AUGMENT, _STREAM_CALIB = 5, 6, 7


def _generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the independent stream ``(seed, *stream)``."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=stream).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise NasUserError(f"`{name}` must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"within [{low}, {high}]"
        raise NasUserError(f"`{name}` must be {allowed}, got {value}")
    return int(value)


def _count_from(name: str, value: int | float, total: int) -> int:
    """Resolve a count-or-fraction argument against ``total`` items (result in [1, total-1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise NasUserError(f"`{name}` must be an image count or a fraction in (0, 1), got {value!r}")
    if isinstance(value, (float, np.floating)):
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise NasUserError(f"`{name}` as a fraction must be within (0, 1), got {value}")
        count = int(round(value * total))
    else:
        count = int(value)
    if not 1 <= count <= total - 1:
        raise NasUserError(
            f"`{name}`={value!r} gives {count} images out of {total}; it must leave at least one image "
            f"on each side (use a count in [1, {total - 1}] or a smaller fraction)"
        )
    return count


def _carve(n: int, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into a seeded random subset of ``count`` and the rest, both sorted."""
    perm = torch.randperm(n, generator=gen)
    return perm[:count].sort().values, perm[count:].sort().values
