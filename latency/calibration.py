"""The calibration of a LUT: how a sum of block figures becomes a whole-network latency.

Fitted by :func:`latency.validate.fit_calibration` against networks timed end to end, stored
in the LUT (validated by :class:`latency.lut_file.CalibrationModel`) and applied by
:func:`latency.predict_latency`.

>>> Calibration("linear", 2.0, 0.5).apply({"ef2.ffn": 1.0})
2.5
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from latency.lut_file import CalibrationModel
from search_spaces.errors import NasUserError
from search_spaces.schema import validate

__all__ = ["Calibration"]


@dataclass(frozen=True)
class Calibration:
    """Maps a sum of LUT entries to a whole-network latency.

    ``latency = offset_ms + sum_i(scale * kind_scales.get(kind_i, 1) * median_i + per_block_ms)``
    over the network's blocks. ``method`` says where it came from: ``none`` (identity),
    ``linear`` (``a * sum + b`` fitted to end-to-end runs), ``blocks`` (``a * sum + c * blocks
    + b``: a per-block constant absorbs the call overhead that every isolated block measurement
    pays once and a whole network pays once in all), ``per_kind`` (one scale per block kind, a
    per-block constant and an offset), ``prior`` (the per-inference overhead of an analytical
    prior). A richer method is kept only when it lowers the leave-one-out error.

    Attributes:
        method: one of :data:`CALIBRATION_METHODS`.
        scale: global multiplier (> 0).
        offset_ms: per-inference constant (ms; may be negative for a fitted line).
        kind_scales: per-block-kind multipliers (``per_kind``), each >= 0.
        per_block_ms: constant added per block (ms; usually negative: the call overhead).
        n: networks the fit used.
        loo_mape: leave-one-out mean absolute percentage error of the fit (a fraction).
        fitted: UTC date of the fit.
        note: free text (e.g. why per-kind corrections were rejected).
    """

    method: str = "none"
    scale: float = 1.0
    offset_ms: float = 0.0
    kind_scales: Mapping[str, float] = field(default_factory=dict)
    n: int = 0
    loo_mape: float | None = None
    fitted: str | None = None
    note: str = ""
    per_block_ms: float = 0.0

    def __post_init__(self) -> None:
        m = validate(CalibrationModel, asdict(self), source="calibration", error=NasUserError)
        for name in ("scale", "offset_ms", "per_block_ms", "kind_scales"):
            object.__setattr__(self, name, getattr(m, name))

    def weight(self, kind: str) -> float:
        """The factor one block of ``kind`` contributes per millisecond of its LUT median."""
        return self.scale * self.kind_scales.get(kind, 1.0)

    def block_ms(self, kind: str, lut_ms: float) -> float:
        """One block's calibrated share: ``weight(kind) * lut_ms + per_block_ms``."""
        return self.weight(kind) * lut_ms + self.per_block_ms

    def apply(self, sums_by_kind: Mapping[str, float], n_blocks: int = 0) -> float:
        """Calibrated latency (ms) from the sums of LUT figures per block kind and the block count.

        >>> Calibration("linear", 2.0, 0.5).apply({"ef2.ffn": 1.0, "ef2.head": 0.25})
        3.0
        """
        return (self.offset_ms + sum(self.weight(k) * v for k, v in sums_by_kind.items())
                + self.per_block_ms * n_blocks)

    def to_dict(self) -> dict[str, Any]:
        """The calibration as the LUT stores it."""
        return {"method": self.method, "scale": self.scale, "offset_ms": self.offset_ms,
                "per_block_ms": self.per_block_ms, "kind_scales": dict(self.kind_scales), "n": self.n,
                "loo_mape": self.loo_mape, "fitted": self.fitted, "note": self.note}

    @classmethod
    def from_model(cls, model: CalibrationModel) -> Calibration:
        return cls(**model.model_dump())

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Inverse of :meth:`to_dict`.

        Raises:
            NasUserError: a field that is unknown or out of range (the message names it).
        """
        return cls.from_model(validate(CalibrationModel, data, source="calibration", error=NasUserError))
