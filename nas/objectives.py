"""Search objectives: budgets in human units, and EfficientFormerV2's joint metric MES.

``MES = score * prod_i (M_i / U_i) ** (-a_i)`` over latency and parameters. The paper's
units and exponents were not confirmed in its source; our documented defaults are
``U_latency = 1 ms``, ``U_params = 3M``, ``a_latency = 1.0``, ``a_params = 0.5``, ``score = 100``.
They give EfficientFormerV2-S0 (0.9 ms on iPhone 12, 3.5M) about 103 and L (2.7 ms, 26.1M) about 12.6:

>>> round(mes(0.9, 3.5e6), 1), round(mes(2.7, 26.1e6), 1)
(102.9, 12.6)
>>> b = Budgets.parse(["1.6ms", "local-cpu=20ms"], default_device="iphone12", max_params="5M")
>>> b.latency_ms, b.max_params
({'iphone12': 1.6, 'local-cpu': 20.0}, 5000000)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from search_spaces.errors import NasUserError
from search_spaces.units import parse_count, parse_latency_ms

__all__ = ["MesWeights", "mes", "Budgets"]


@dataclass(frozen=True)
class MesWeights:
    """Units and exponents of MES (documented defaults; every one configurable)."""

    score: float = 100.0
    u_latency_ms: float = 1.0
    u_params: float = 3e6
    a_latency: float = 1.0
    a_params: float = 0.5

    def __post_init__(self) -> None:
        for name in ("score", "u_latency_ms", "u_params"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise NasUserError(f"MES {name} must be a positive finite number, got {v!r}")
        for name in ("a_latency", "a_params"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise NasUserError(f"MES exponent {name} must be a finite number >= 0, got {v!r}")


def mes(latency_ms: float, params: float, weights: MesWeights = MesWeights()) -> float:
    """EfficientFormerV2's joint latency-and-size metric (higher is better)."""
    return (weights.score * (latency_ms / weights.u_latency_ms) ** (-weights.a_latency)
            * (params / weights.u_params) ** (-weights.a_params))


@dataclass(frozen=True)
class Budgets:
    """Constraints of a search: latency per device (ms), parameters, MACs. ``None`` = unconstrained."""

    latency_ms: Mapping[str, float] = field(default_factory=dict)
    max_params: int | None = None
    max_macs: int | None = None

    @classmethod
    def parse(cls, latency: Iterable[str] = (), *, default_device: str | None = None,
              max_params: str | int | None = None, max_macs: str | int | None = None) -> Budgets:
        """Parse ``--latency`` values (``1.6ms`` or ``DEVICE=1.6ms``, repeatable) and count limits."""
        lat: dict[str, float] = {}
        for item in latency:
            if "=" in item:
                device, value = item.split("=", 1)
                device = device.strip()
                if not device:
                    raise NasUserError(f"--latency {item!r}: the device name before '=' is empty")
            else:
                if default_device is None:
                    raise NasUserError(f"--latency {item!r} names no device: write DEVICE={item} or give --device")
                device, value = default_device, item
            if device in lat:
                raise NasUserError(f"--latency gives device {device!r} twice")
            lat[device] = parse_latency_ms(value, what="--latency" if value is item else f"--latency for {device}")
        return cls(
            latency_ms=lat,
            max_params=None if max_params is None else parse_count(max_params, what="--max-params"),
            max_macs=None if max_macs is None else parse_count(max_macs, what="--max-macs"),
        )

    def violations(self, *, latency_ms: Mapping[str, float], params: int, macs: int) -> dict[str, float]:
        """Relative excess per constraint (``> 0`` means over budget), for optuna's ``constraints_func``."""
        out = {f"latency:{d}": latency_ms[d] / b - 1.0 for d, b in self.latency_ms.items()}
        if self.max_params is not None:
            out["params"] = params / self.max_params - 1.0
        if self.max_macs is not None:
            out["macs"] = macs / self.max_macs - 1.0
        return out

    def to_dict(self) -> dict[str, dict[str, float] | int | None]:
        return {"latency_ms": dict(self.latency_ms), "max_params": self.max_params, "max_macs": self.max_macs}
