"""Summary statistics of latency replicates.

Runners return raw timings (one float per timed run, in milliseconds); this
module summarises them. The median and the interquartile range are the robust
figures; the mean, standard deviation and 90th percentile are kept for the LUT.
A result whose IQR is more than 10% of its median is flagged ``noisy``, as
``torch.utils.benchmark`` does.

>>> s = LatencyStats.from_samples([1.0, 1.1, 0.9, 1.0, 1.05])
>>> s.count, s.median_ms, s.noisy
(5, 1.0, False)
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from search_spaces.errors import NasUserError

__all__ = ["LatencyStats", "NOISY_IQR_FRACTION"]

#: A result is noisy when its IQR exceeds this fraction of its median.
NOISY_IQR_FRACTION = 0.10

_FLOAT_FIELDS = ("median_ms", "mean_ms", "std_ms", "p90_ms", "iqr_ms", "min_ms")
_REL_TOL = 1e-9


@dataclass(frozen=True, kw_only=True)
class LatencyStats:
    """Summary of ``count`` latency replicates, all in milliseconds.

    Attributes:
        count: number of timed runs (>= 1).
        median_ms: median.
        mean_ms: arithmetic mean.
        std_ms: sample standard deviation (``ddof=1``; 0 for one sample).
        p90_ms: 90th percentile (linear interpolation).
        iqr_ms: interquartile range, 75th minus 25th percentile.
        min_ms: fastest run.

    Raises:
        NasUserError: on construction, for a count below 1, a value that is
            negative, NaN or infinite, or inconsistent order statistics
            (``min_ms <= median_ms <= p90_ms`` must hold).
    """

    count: int
    median_ms: float
    mean_ms: float
    std_ms: float
    p90_ms: float
    iqr_ms: float
    min_ms: float

    def __post_init__(self) -> None:
        if type(self.count) is not int or self.count < 1:
            raise NasUserError(f"`count` must be an integer >= 1, got {self.count!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise NasUserError(f"`{name}` must be a number of milliseconds, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise NasUserError(f"`{name}` must be finite and >= 0 ms, got {value!r}")
            object.__setattr__(self, name, float(value))
        tol = _REL_TOL * max(1.0, self.p90_ms)
        if not (self.min_ms <= self.median_ms + tol and self.median_ms <= self.p90_ms + tol):
            raise NasUserError(
                f"inconsistent latency stats: need min_ms <= median_ms <= p90_ms, got "
                f"{self.min_ms} / {self.median_ms} / {self.p90_ms}"
            )

    @property
    def noisy(self) -> bool:
        """True when the IQR is more than 10% of the median: re-measure or use more repeats."""
        return self.iqr_ms > NOISY_IQR_FRACTION * self.median_ms

    @classmethod
    def from_samples(cls, samples_ms: Iterable[float]) -> LatencyStats:
        """Summarise raw timings.

        Args:
            samples_ms: one latency per timed run, in milliseconds.

        Returns:
            The summary.

        Raises:
            NasUserError: no samples, or a sample that is negative, NaN or infinite.

        >>> LatencyStats.from_samples([2.0, 1.0, 3.0]).median_ms
        2.0
        """
        try:
            arr = np.asarray(list(samples_ms), dtype=np.float64)
        except (TypeError, ValueError):
            raise NasUserError("`samples_ms` must be a sequence of numbers (milliseconds)") from None
        if arr.ndim != 1 or arr.size == 0:
            raise NasUserError(f"`samples_ms` must be a non-empty flat sequence of milliseconds, got shape {arr.shape}")
        bad = ~np.isfinite(arr) | (arr < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise NasUserError(
                f"`samples_ms` must be finite and >= 0; sample {i} is {arr[i]!r} ({int(bad.sum())} bad in all)"
            )
        q25, q50, q75, q90 = np.percentile(arr, [25.0, 50.0, 75.0, 90.0])
        return cls(
            count=int(arr.size),
            median_ms=float(q50),
            mean_ms=float(arr.mean()),
            std_ms=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            p90_ms=float(max(q90, q50)),
            iqr_ms=float(max(q75 - q25, 0.0)),
            min_ms=float(arr.min()),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields, plus the derived ``noisy`` flag."""
        out: dict[str, Any] = {"count": self.count}
        out.update({name: getattr(self, name) for name in _FLOAT_FIELDS})
        out["noisy"] = self.noisy
        return out

    @classmethod
    def from_dict(cls, data: Any) -> LatencyStats:
        """Rebuild from :meth:`to_dict` output (``noisy`` is derived and ignored).

        Raises:
            NasUserError: not a dict, missing or unknown keys, or invalid values.
        """
        if not isinstance(data, dict):
            raise NasUserError(f"latency stats must be an object, got {type(data).__name__}")
        fields = ("count",) + _FLOAT_FIELDS
        missing = [k for k in fields if k not in data]
        if missing:
            raise NasUserError(f"latency stats are missing {', '.join(missing)} (have {', '.join(sorted(data))})")
        unknown = sorted(set(data) - set(fields) - {"noisy"})
        if unknown:
            raise NasUserError(f"unknown latency stats field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
        return cls(**{k: data[k] for k in fields})
