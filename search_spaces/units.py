"""Human units for budgets: ``1.6ms``, ``1600us``, ``0.0016s``; ``5M``, ``500K``, ``5e6``.

>>> parse_latency_ms("1.6ms"), parse_latency_ms("1600us"), parse_latency_ms("0.0016s")
(1.6, 1.6, 1.6)
>>> parse_count("5M"), parse_count("500K"), parse_count("5e6"), parse_count("1.2G")
(5000000, 500000, 5000000, 1200000000)
"""
from __future__ import annotations

import math
import re

from .errors import NasUserError

__all__ = ["parse_latency_ms", "parse_count"]

_LATENCY_UNITS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3, "ns": 1e-6}
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"


def parse_latency_ms(text: str, *, what: str = "latency") -> float:
    """Parse a latency with a unit (``ms``, ``us``, ``s``, ``ns``) into milliseconds.

    A bare number is refused: the unit must be explicit, because a wrong guess
    is off by a factor of 1000.

    Raises:
        NasUserError: not a positive finite number with a known unit.
    """
    raw = str(text).strip()
    m = re.fullmatch(rf"({_NUMBER})\s*([a-zA-Zµ]+)", raw)
    if not m:
        raise NasUserError(
            f"{what} {raw!r} is not a latency with a unit: write e.g. 1.6ms, 1600us or 0.0016s"
        )
    unit = m.group(2).lower()
    if unit not in _LATENCY_UNITS:
        raise NasUserError(f"{what} {raw!r} has unknown unit {m.group(2)!r}: use one of ms, us, s, ns")
    value = float(m.group(1)) * _LATENCY_UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise NasUserError(f"{what} {raw!r} must be a positive, finite time")
    return value


def parse_count(text: str | int | float, *, what: str = "count") -> int:
    """Parse a count such as ``5M``, ``500K``, ``1.2G``, ``5e6`` or ``5000000`` into an int.

    Raises:
        NasUserError: not a positive finite number, or an unknown suffix.
    """
    raw = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(rf"({_NUMBER})\s*([a-zA-Z]?)", raw)
    if not m or m.group(2).lower() not in _COUNT_UNITS:
        raise NasUserError(f"{what} {str(text)!r} is not a count: write e.g. 5M, 500K, 5e6 or 5000000")
    value = float(m.group(1)) * _COUNT_UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise NasUserError(f"{what} {str(text)!r} must be a positive, finite number")
    return int(round(value))
