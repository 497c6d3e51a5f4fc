"""Search reports: ``pareto.csv``, ``path.csv``, ``pareto.png``, an interactive ``pareto.html`` and a console table.

Tables go through pandas; the interactive page is drawn with plotly (the library behind
``optuna.visualization``) as one self-contained file that works offline: plotly.js is inlined.
"""
from __future__ import annotations

import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from search_spaces.fileio import atomic_write_bytes, atomic_write_text

from .search import Candidate, pareto_front

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["write_csv", "write_pareto_csv", "plot_pareto_png", "write_pareto_html", "summary_table"]


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """Rows as CSV (columns in first-seen order; a missing value is an empty field), written atomically."""
    import pandas as pd

    if not rows:
        return atomic_write_text(path, "")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return atomic_write_text(path, pd.DataFrame(list(rows), columns=columns, dtype=object).to_csv(index=False, lineterminator="\r\n"))


def _frame(cands: Sequence[Candidate], primary: str, best: Candidate | None = None) -> pd.DataFrame:
    """One row per candidate (:meth:`Candidate.row`), plus ``pareto`` and ``chosen``, sorted by primary latency."""
    import pandas as pd

    front = {c.arch.hash for c in pareto_front(cands, primary)}
    chosen = best.arch.hash if best is not None else None
    rows = [{**c.row(), "pareto": c.arch.hash in front, "chosen": c.arch.hash == chosen}
            for c in sorted(cands, key=lambda c: c.latency_ms[primary])]
    return pd.DataFrame(rows)


def write_pareto_csv(path: Path, cands: Sequence[Candidate], primary: str) -> Path:
    """Every evaluated candidate, with a ``pareto`` column, sorted by primary-device latency."""
    if not cands:
        return atomic_write_text(path, "")
    frame = _frame(cands, primary).drop(columns=["chosen"])
    return atomic_write_text(path, frame.to_csv(index=False, lineterminator="\r\n"))


def plot_pareto_png(path: Path, cands: Sequence[Candidate], primary: str, *, budget_ms: float | None,
                    source: str, best: Candidate | None) -> Path:
    """A static accuracy-vs-latency plot (feasible, infeasible, the Pareto front, the budget, the chosen subnet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    feas = [c for c in cands if c.feasible]
    infeas = [c for c in cands if not c.feasible]
    for group, color, label in ((infeas, "#bbbbbb", "infeasible"), (feas, "#1f77b4", "feasible")):
        if group:
            ax.scatter([c.latency_ms[primary] for c in group], [100 * c.accuracy for c in group], s=14, c=color,
                       label=label, alpha=0.8)
    front = sorted(pareto_front(cands, primary), key=lambda c: c.latency_ms[primary])
    if front:
        ax.plot([c.latency_ms[primary] for c in front], [100 * c.accuracy for c in front], color="#ff7f0e",
                lw=1.2, label="Pareto front")
    if best is not None:
        ax.scatter([best.latency_ms[primary]], [100 * best.accuracy], marker="*", s=160, c="#d62728", label="chosen")
    if budget_ms is not None:
        ax.axvline(budget_ms, color="#d62728", ls="--", lw=1, label=f"budget {budget_ms:g} ms")
    ax.set_xlabel(f"{primary} latency, ms ({source})")
    ax.set_ylabel("validation accuracy, % (proxy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _pareto_figure(cands: Sequence[Candidate], primary: str, *, budget_ms: float | None, budgets_text: str,
                   source: str, best: Candidate | None) -> go.Figure:
    import plotly.graph_objects as go

    frame = _frame(cands, primary, best)
    lat, hover = f"latency_ms[{primary}]", ("accuracy %{y:.2f}%<br>" + primary + " %{x:.3f} ms<br>"
                                             "%{customdata[0]:,} params<br>%{customdata[1]}<extra></extra>")
    fig = go.Figure()
    groups = (("infeasible", ~frame["feasible"], "#bbbbbb", 7, "circle"),
              ("feasible", frame["feasible"] & ~frame["chosen"], "#1f77b4", 7, "circle"),
              ("chosen", frame["chosen"], "#d62728", 16, "star"))
    for label, mask, color, size, symbol in groups:
        part = frame[mask]
        if len(part):
            # plain lists, not arrays: plotly would store arrays as base64, and the page should show its data
            fig.add_trace(go.Scatter(x=part[lat].tolist(), y=(100 * part["accuracy"]).tolist(), mode="markers",
                                     name=label, marker={"color": color, "size": size, "symbol": symbol},
                                     customdata=part[["params", "arch"]].values.tolist(), hovertemplate=hover))
    front = frame[frame["pareto"]]
    if len(front):
        fig.add_trace(go.Scatter(x=front[lat].tolist(), y=(100 * front["accuracy"]).tolist(), mode="lines",
                                 name="Pareto front",
                                 line={"color": "#ff7f0e", "width": 1.5}, hoverinfo="skip"))
    if budget_ms is not None:
        fig.add_vline(x=budget_ms, line={"color": "#d62728", "dash": "dash", "width": 1.5},
                      annotation_text=f"budget {budget_ms:g} ms", annotation_position="top left")
    fig.update_layout(xaxis_title=f"{primary} latency, ms ({source})", yaxis_title="validation accuracy, % (proxy)",
                      template="plotly_white", hovermode="closest", width=900, height=560)
    return fig


def write_pareto_html(path: Path, cands: Sequence[Candidate], primary: str, *, budget_ms: float | None,
                      budgets_text: str, source: str, best: Candidate | None) -> Path:
    """An interactive accuracy-vs-latency page: one self-contained, offline HTML file (plotly.js inlined).

    Hovering a point shows its accuracy, latency, parameters and architecture; the budget is a
    dashed line and the chosen subnet a star.
    """
    if not cands:
        return atomic_write_text(path, f"<!doctype html><html><body><p>No candidates ({html.escape(budgets_text)})."
                                       f"</p></body></html>\n")
    fig = _pareto_figure(cands, primary, budget_ms=budget_ms, budgets_text=budgets_text, source=source, best=best)
    plot = fig.to_html(full_html=False, include_plotlyjs=True, config={"displaylogo": False})
    chosen = ("no candidate meets every budget" if best is None else
              f"chosen: {100 * best.accuracy:.2f}% / {best.latency_ms[primary]:.3f} ms / {best.params:,} params "
              f"<code>{html.escape(best.arch.to_string())}</code>")
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>nas-search: Pareto front</title></head>\n"
            f"<body style=\"font-family:sans-serif;margin:20px\">\n"
            f"<h3>Candidates: validation accuracy vs {html.escape(primary)} latency ({html.escape(source)})</h3>\n"
            f"<p>{len(cands)} candidates; budgets: {html.escape(budgets_text)}. Hover a point for its figures and "
            f"architecture.</p>\n<p>{chosen}</p>\n{plot}\n</body></html>\n")
    return atomic_write_text(path, page)


def summary_table(cands: Sequence[Candidate], primary: str, *, best: Candidate | None, limit: int = 12) -> str:
    """Console table of the Pareto front (and the chosen subnet, marked with ``*``)."""
    front = sorted(pareto_front(cands, primary), key=lambda c: c.latency_ms[primary])[:limit]
    devices = list(front[0].latency_ms) if front else [primary]
    head = f"  {'':1} {'accuracy':>8} {'params':>9} {'MMACs':>8} " + " ".join(f"{d + ' ms':>14}" for d in devices)
    lines = [head + "  feasible"]
    for c in front:
        mark = "*" if best is not None and c.arch.hash == best.arch.hash else " "
        lats = " ".join(f"{c.latency_ms[d]:>14.3f}" for d in devices)
        lines.append(f"  {mark} {100 * c.accuracy:>7.2f}% {c.params / 1e6:>8.3f}M {c.macs / 1e6:>8.1f} {lats}  "
                     f"{'yes' if c.feasible else 'no'}")
    return "\n".join(lines)
