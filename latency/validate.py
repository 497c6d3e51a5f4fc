"""Validation and calibration: how well LUT sums predict whole-network latency.

Summing isolated blocks misses fusion across block boundaries and the per-inference overhead
(docs/design.md, section 5), so a LUT is checked against networks timed end to end: random subnets
of the space, each exported whole. :func:`validate_lut` compares their measured medians with
the LUT sums, fits a calibration and stores it in the table:

* ``linear``: ``latency = a * sum + b`` (least squares);
* ``blocks``: ``latency = a * sum + c * blocks + b``: every isolated block measurement pays
  the runtime's per-call overhead once, a whole network once in all, so a per-block constant
  (usually negative) matters for small maps and deep nets;
* ``per_kind``: one non-negative scale per block kind, plus the per-block constant and an
  offset.

A richer model is kept only when its leave-one-out MAPE is at least 5% (relative) and 0.1
percentage points below the current choice's, so noise cannot buy a bigger model.

Fidelity is reported raw (plain LUT sums) and calibrated. The calibrated figures are
**leave-one-out**: each subnet is predicted by a calibration fitted to the others, so they
show the error on networks the fit has not seen. Metrics: Spearman rank correlation, mean
absolute percentage error and the share of subnets within +-5% and +-10% (fractions).

>>> m = fidelity_metrics([1.0, 2.0, 3.1], [1.0, 2.0, 3.0])
>>> m["n"], m["spearman"], m["within_5"]
(3, 1.0, 1.0)
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latency.lut import Calibration, LatencyTable
from latency.predict import predict_breakdown
from latency.prior import nnls
from latency.stats import LatencyStats
from search_spaces import ArchConfig, SearchSpace, lower, resolution_json
from search_spaces.errors import NasUserError
from search_spaces.fileio import atomic_write_json, atomic_write_text

__all__ = [
    "ValidationReport",
    "validation_paths",
    "write_rows_csv",
    "sample_archs",
    "spearman",
    "fidelity_metrics",
    "fit_calibration",
    "validate_lut",
]

logger = logging.getLogger(__name__)

_MIN_GAIN = 0.05
_MIN_ABS_GAIN = 0.001


def validation_paths(lut_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The report and plot written next to a LUT: ``<lut stem>.validation.json`` and ``.png``.

    The rows go next to them as ``.csv`` (``json.with_suffix(".csv")``).

    >>> [p.name for p in validation_paths("lut-local-cpu-224.json")]
    ['lut-local-cpu-224.validation.json', 'lut-local-cpu-224.validation.png']
    """
    p = Path(lut_path)
    return p.with_name(p.stem + ".validation.json"), p.with_name(p.stem + ".validation.png")


def sample_archs(space: SearchSpace, n: int, *, seed: int = 0) -> list[ArchConfig]:
    """``n`` distinct random configs of ``space`` (uniform choices, from ``random.Random(seed)``).

    Raises:
        NasUserError: ``n`` below 1, or the space has fewer than ``n`` configs to draw.

    >>> from search_spaces import get_space
    >>> len(sample_archs(get_space("efficientformer_v2_demo"), 5, seed=1))
    5
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise NasUserError(f"the number of validation subnets must be an integer >= 1, got {n!r}")
    rng = random.Random(seed)
    out: dict[str, ArchConfig] = {}
    for _ in range(200 * n):
        arch = space.sample(rng)
        out.setdefault(arch.hash, arch)
        if len(out) == n:
            return list(out.values())
    raise NasUserError(f"space {space.name!r} gave only {len(out)} distinct configs in {200 * n} draws; "
                       f"ask for fewer validation subnets")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # average the ranks of ties
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); NaN for fewer than 2 points or a constant input.

    >>> spearman([1, 2, 3], [10, 30, 20])
    0.5
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise NasUserError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def fidelity_metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """Agreement of predictions with measurements.

    Args:
        predicted: predicted latencies (ms).
        measured: measured latencies (ms), same order.

    Returns:
        ``n``, ``spearman`` (None for fewer than 2 points), ``mape`` (mean absolute percentage error as a fraction),
        ``within_5`` and ``within_10`` (fractions of subnets within +-5% / +-10% of the
        measurement), ``max_ape`` and ``bias`` (median of predicted / measured - 1).
    """
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if len(p) != len(m) or len(p) == 0:
        raise NasUserError(f"need equally many predictions and measurements (>= 1), got {len(p)} and {len(m)}")
    if (m <= 0).any():
        raise NasUserError("measured latencies must be > 0 ms")
    ape = np.abs(p - m) / m
    rho = spearman(p, m)
    return {
        "n": int(len(p)),
        "spearman": None if math.isnan(rho) else rho,
        "mape": float(ape.mean()),
        "within_5": float((ape <= 0.05).mean()),
        "within_10": float((ape <= 0.10).mean()),
        "max_ape": float(ape.max()),
        "bias": float(np.median(p / m) - 1.0),
    }


def _fit_linear(raw: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(raw) < 3 or np.ptp(raw) == 0:
        return float(np.median(y / raw)), 0.0
    a, b = np.polyfit(raw, y, 1)
    if a <= 0:  # a line through the origin is the sane fallback
        return float(np.median(y / raw)), 0.0
    return float(a), float(b)


def _fit_blocks(raw: np.ndarray, k: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """``y = a * raw + c * blocks + b``; None when degenerate or ``a <= 0``."""
    design = np.stack([raw, k, np.ones_like(raw)], axis=1)
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    return coef if coef[0] > 0 else None


def _fit_per_kind(km: np.ndarray, k: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``y = sum_j a_j * kind_sum_j + c * blocks + b`` with every ``a_j >= 0`` (c and b free)."""
    ones = np.ones((len(y), 1))
    design = np.hstack([km, ones, -ones, k[:, None], -k[:, None]])
    return nnls(design, y)


def _per_kind_predict(coef: np.ndarray, km: np.ndarray, k: np.ndarray) -> np.ndarray:
    return km @ coef[:-4] + (coef[-4] - coef[-3]) + (coef[-2] - coef[-1]) * k


def _loo(fit_predict: Any, n: int) -> np.ndarray | None:
    out = np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        value = fit_predict(keep, i)
        if value is None:
            return None
        out[i] = value
    return out


class _Candidates:
    """The calibration candidates of one fit, compared by leave-one-out MAPE."""

    def __init__(self, x: np.ndarray, k: np.ndarray, y: np.ndarray, date: str) -> None:
        self.x, self.k, self.y, self.n, self.date = x, k, y, len(y), date
        a, b = _fit_linear(x, y)
        loo = _loo(lambda keep, i: _line_at(x[keep], y[keep], x[i]), self.n)
        if loo is None:  # pragma: no cover - the linear fit always predicts
            loo = a * x + b
        m = self.mape(loo)
        self.best: tuple[float, Calibration, np.ndarray, np.ndarray] = (
            m, Calibration("linear", a, b, {}, self.n, m, date), loo, a * x + b)
        self.notes = [f"linear LOO MAPE {m:.4f}"]

    def mape(self, pred: np.ndarray) -> float:
        return float(np.mean(np.abs(pred - self.y) / self.y))

    def consider(self, name: str, loo: np.ndarray | None, make: Any) -> None:
        """Keep ``make(mape)`` when its LOO MAPE beats the current choice by the margins."""
        if loo is None:
            self.notes.append(f"{name}: degenerate")
            return
        m = self.mape(loo)
        self.notes.append(f"{name} LOO MAPE {m:.4f}")
        if m < (1 - _MIN_GAIN) * self.best[0] and m < self.best[0] - _MIN_ABS_GAIN:
            cal, fitted = make(m)
            if cal is not None:
                self.best = (m, cal, loo, fitted)

    def blocks(self) -> None:
        x, k, y = self.x, self.k, self.y

        def blk(keep: np.ndarray, i: int) -> float | None:
            c = _fit_blocks(x[keep], k[keep], y[keep])
            return None if c is None else float(c[0] * x[i] + c[1] * k[i] + c[2])

        def make(m: float) -> tuple[Calibration | None, np.ndarray]:
            c = _fit_blocks(x, k, y)
            if c is None:
                return None, x
            return (Calibration("blocks", float(c[0]), float(c[2]), {}, self.n, m, self.date,
                                per_block_ms=float(c[1])), c[0] * x + c[1] * k + c[2])

        self.consider("blocks", _loo(blk, self.n), make)

    def per_kind(self, kinds: list[str], km: np.ndarray) -> None:
        k, y = self.k, self.y

        def pk(keep: np.ndarray, i: int) -> float:
            return float(_per_kind_predict(_fit_per_kind(km[keep], k[keep], y[keep]), km[i:i + 1], k[i:i + 1])[0])

        def make(m: float) -> tuple[Calibration, np.ndarray]:
            c = _fit_per_kind(km, k, y)
            return (Calibration("per_kind", 1.0, float(c[-4] - c[-3]), {kk: float(v) for kk, v in zip(kinds, c[:-4])},
                                self.n, m, self.date, per_block_ms=float(c[-2] - c[-1])), _per_kind_predict(c, km, k))

        self.consider("per_kind", _loo(pk, self.n), make)


def _line_at(x: np.ndarray, y: np.ndarray, at: float) -> float:
    a, b = _fit_linear(x, y)
    return a * at + b


def fit_calibration(raw: Sequence[float], kind_sums: Sequence[Mapping[str, float]], measured: Sequence[float], *,
                    n_blocks: Sequence[int] | None = None,
                    per_kind: bool = True) -> tuple[Calibration, np.ndarray, np.ndarray]:
    """Fit the calibration of a LUT to end-to-end measurements.

    Candidates, from the simplest: ``linear`` (``a * sum + b``), ``blocks`` (``+ c * blocks``,
    when ``n_blocks`` is given) and ``per_kind`` (one non-negative scale per block kind). A
    richer candidate replaces the current choice only when its leave-one-out MAPE is at least
    5% (relative) and 0.1 percentage points lower.

    Args:
        raw: plain LUT sums per network (ms).
        kind_sums: per network, the LUT sums per block kind (ms); they add up to ``raw``.
        measured: measured network latencies (ms).
        n_blocks: blocks per network (enables the ``blocks`` and ``per_kind`` candidates'
            per-block constant).
        per_kind: also try per-kind scales.

    Returns:
        ``(calibration, loo, fitted)``: the chosen calibration, the leave-one-out predictions
        of every network (in-sample when fewer than 3 networks) and the in-sample predictions.

    Raises:
        NasUserError: no networks, or inputs of different lengths.
    """
    x, y = np.asarray(raw, dtype=float), np.asarray(measured, dtype=float)
    n = len(y)
    k = np.asarray(n_blocks if n_blocks is not None else np.zeros(n), dtype=float)
    if n == 0 or len(x) != n or len(kind_sums) != n or len(k) != n:
        raise NasUserError(f"calibration needs equally many sums, block counts and measurements (>= 1), got "
                           f"{len(x)}, {len(k)} and {n}")
    date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    if n < 3:
        a, _ = _fit_linear(x, y)
        cal = Calibration("linear", a, 0.0, {}, n, None, date, "fewer than 3 networks: scale only, no LOO error")
        return cal, a * x, a * x
    cands = _Candidates(x, k, y, date)
    if n_blocks is not None and n >= 6 and np.ptp(k) > 0:
        cands.blocks()
    kinds = sorted({kk for d in kind_sums for kk in d})
    if per_kind and n >= 3 * (len(kinds) + 3):
        cands.per_kind(kinds, np.array([[d.get(kk, 0.0) for kk in kinds] for d in kind_sums]))
    _, cal, loo_best, fitted = cands.best
    cal = dataclasses.replace(cal, note="; ".join(cands.notes) + f"; chose {cal.method}")
    return cal, loo_best, fitted


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_lut`.

    Attributes:
        n: networks compared.
        raw: :func:`fidelity_metrics` of the plain LUT sums.
        calibrated: of the calibrated predictions, leave-one-out.
        calibration: the calibration stored in the table.
        json_path: the report file (None when not written).
        png_path: the scatter plot (None when not written).
        rows: one dict per network (name, arch, measured, sums, predictions).
    """

    n: int
    raw: dict[str, Any]
    calibrated: dict[str, Any]
    calibration: Calibration
    json_path: Path | None
    png_path: Path | None
    rows: list[dict[str, Any]]

    def summary(self) -> str:
        """Two lines for the terminal."""
        def line(tag: str, m: dict[str, Any]) -> str:
            rho = "n/a" if m["spearman"] is None else f"{m['spearman']:.4f}"
            return (f"{tag}: Spearman {rho}, MAPE {100 * m['mape']:.2f}%, within 5% "
                    f"{100 * m['within_5']:.1f}%, within 10% {100 * m['within_10']:.1f}%")
        return (line(f"raw LUT sums ({self.n} subnets)", self.raw) + "\n"
                + line(f"calibrated ({self.calibration.method}, leave-one-out)", self.calibrated))


def _plot(path: Path, rows: list[dict[str, Any]], raw: dict[str, Any], cal: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = np.array([r["measured_ms"] for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    ax.scatter(meas, [r["lut_sum_ms"] for r in rows], s=14, c="0.6", label=f"raw LUT sum (MAPE {100 * raw['mape']:.1f}%)")
    ax.scatter(meas, [r["loo_ms"] for r in rows], s=14, c="tab:blue",
               label=f"calibrated, LOO (MAPE {100 * cal['mape']:.1f}%)")
    lo, hi = float(meas.min()) * 0.85, float(meas.max()) * 1.15
    xs = np.array([lo, hi])
    ax.plot(xs, xs, "k-", lw=0.8)
    for f in (0.9, 1.1):
        ax.plot(xs, xs * f, "k--", lw=0.5)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("measured end to end, ms")
    ax.set_ylabel("predicted from the LUT, ms")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_rows_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write validation rows (one per network, as in :attr:`ValidationReport.rows`) as CSV, atomically."""
    import pandas as pd

    return atomic_write_text(path, pd.DataFrame(list(rows)).to_csv(index=False, float_format="%.6g"))


def _compare(lut: LatencyTable, named: Sequence[tuple[str, ArchConfig]], networks: Mapping[str, LatencyStats]) -> tuple[
        list[float], list[dict[str, float]], list[float], list[int], list[dict[str, Any]]]:
    """Per network: the LUT sum, its sums per block kind, the measured figure, the block count and a report row."""
    raw, kind_sums, meas, counts, rows = [], [], [], [], []
    for name, arch in named:
        bd = predict_breakdown(arch, lut, specs=lower(arch, lut.setup))
        by_kind: dict[str, float] = {}
        for b in bd.blocks:
            by_kind[b.kind] = by_kind.get(b.kind, 0.0) + b.lut_ms
        raw.append(bd.raw_sum_ms)
        kind_sums.append(by_kind)
        counts.append(len(bd.blocks))
        st = networks[name]
        measured = st.min_ms if lut.statistic == "min" else st.median_ms
        meas.append(measured)
        rows.append({"name": name, "arch": arch.to_string(), "arch_hash": arch.hash,
                     "measured_ms": measured, "measured_median_ms": st.median_ms, "measured_min_ms": st.min_ms,
                     "measured_iqr_ms": st.iqr_ms, "measured_count": st.count, "lut_sum_ms": bd.raw_sum_ms,
                     "blocks": len(bd.blocks), "lut_entries_predicted": sum(b.source != "measured" for b in bd.blocks)})
    return raw, kind_sums, meas, counts, rows


def _report(lut: LatencyTable, cal: Calibration, raw_m: dict[str, Any], cal_m: dict[str, Any], fit_m: dict[str, Any],
            rows: list[dict[str, Any]], context: Mapping[str, Any] | None) -> dict[str, Any]:
    """The validation report file (``<lut stem>.validation.json``)."""
    return {
        "schema": 1,
        "device": lut.device,
        "lut": str(lut.path) if lut.path else None,
        "resolution": resolution_json(lut.setup.resolution),
        "space_name": lut.space_name,
        "space_hash": lut.space_hash,
        "statistic": lut.statistic,
        "date": cal.fitted,
        "n": len(rows),
        "spearman": cal_m["spearman"],
        "mape": cal_m["mape"],
        "within_5": cal_m["within_5"],
        "within_10": cal_m["within_10"],
        "raw": raw_m,
        "calibrated": {**cal_m, "how": "leave-one-out: each subnet predicted by a calibration fitted to the others"},
        "calibrated_in_sample": fit_m,
        "calibration": cal.to_dict(),
        "lut_predicted": lut.predicted,
        "measurement": dict(context or {}),
        "subnets": rows,
    }


def validate_lut(
    lut: LatencyTable,
    archs: Mapping[str, ArchConfig] | Sequence[ArchConfig],
    networks: Mapping[str, LatencyStats],
    *,
    json_path: str | os.PathLike[str] | None = None,
    png_path: str | os.PathLike[str] | None = None,
    csv_path: str | os.PathLike[str] | None = None,
    per_kind: bool = True,
    context: Mapping[str, Any] | None = None,
) -> ValidationReport:
    """Compare LUT sums with end-to-end measurements, fit and store the calibration.

    The calibration and a summary go into ``lut`` (``lut.calibration``, ``lut.validation``);
    the caller saves the table.

    Args:
        lut: the table; it must cover every block of every network.
        archs: the networks, by name (``subnet-<arch hash>``) or as a list.
        networks: measured stats by name (from :func:`latency.measure.build_lut`,
            :func:`latency.measure.measure_networks` or an imported bundle).
        json_path: where to write the report (None: do not write).
        png_path: where to write the scatter plot (None: do not plot).
        csv_path: where to write one row per network (name, architecture, measured and
            predicted figures; None: do not write).
        per_kind: allow per-kind scales.
        context: extra facts for the report (how the networks were measured).

    Returns:
        A :class:`ValidationReport`.

    Raises:
        NasUserError: no measured networks, or a network with a block missing from the table.
    """
    named = archs if isinstance(archs, Mapping) else {f"subnet-{a.hash}": a for a in archs}
    names = [n for n in named if n in networks]
    if not names:
        raise NasUserError("no end-to-end measurements to validate against (0 networks measured)")
    raw, kind_sums, meas, counts, rows = _compare(lut, [(n, named[n]) for n in names], networks)
    cal, loo, fitted = fit_calibration(raw, kind_sums, meas, n_blocks=counts, per_kind=per_kind)
    for row, lo, fi in zip(rows, loo, fitted):
        row["loo_ms"] = float(lo)
        row["calibrated_ms"] = float(fi)
    raw_m, cal_m = fidelity_metrics(raw, meas), fidelity_metrics(loo, meas)
    lut.set_calibration(cal)
    jp = Path(json_path) if json_path is not None else None
    pp = Path(png_path) if png_path is not None else None
    lut.validation = {"file": jp.name if jp else None, "n": len(names), "raw": raw_m, "calibrated": cal_m,
                      "date": cal.fitted}
    if jp is not None:
        atomic_write_json(jp, _report(lut, cal, raw_m, cal_m, fidelity_metrics(fitted, meas), rows, context))
    if csv_path is not None:
        write_rows_csv(csv_path, rows)
    if pp is not None:
        rho = "n/a" if cal_m["spearman"] is None else f"{cal_m['spearman']:.3f}"
        title = (f"{lut.device} @ {lut.setup.text}px, {len(names)} subnets: Spearman {rho}, "
                 f"within 10% {100 * cal_m['within_10']:.0f}%")
        _plot(pp, rows, raw_m, cal_m, title)
    return ValidationReport(len(names), raw_m, cal_m, cal, jp, pp, rows)
