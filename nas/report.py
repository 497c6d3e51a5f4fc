"""Search reports: ``pareto.csv``, ``pareto.png``, an interactive ``pareto.html`` and a console table."""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from search_spaces.fileio import atomic_write_bytes, atomic_write_text

from .search import Candidate, pareto_front

__all__ = ["write_csv", "write_pareto_csv", "plot_pareto_png", "write_pareto_html", "summary_table"]


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def write_pareto_csv(path: Path, cands: Sequence[Candidate], primary: str) -> Path:
    """Every evaluated candidate, with a ``pareto`` column, sorted by primary-device latency."""
    front = {c.arch.hash for c in pareto_front(cands, primary)}
    rows = [{**c.row(), "pareto": c.arch.hash in front} for c in sorted(cands, key=lambda c: c.latency_ms[primary])]
    return write_csv(path, rows)


def plot_pareto_png(path: Path, cands: Sequence[Candidate], primary: str, *, budget_ms: float | None,
                    source: str, best: Candidate | None) -> Path:
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


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>nas-search: Pareto front</title>
<style>body{font-family:sans-serif;margin:20px}#tip{position:absolute;background:#fff;border:1px solid #999;
padding:4px 6px;font-size:12px;pointer-events:none;display:none;max-width:520px}text{font-size:11px}</style></head>
<body><h3>Candidates: validation accuracy vs __DEVICE__ latency (__SOURCE__)</h3>
<p>__BUDGETS__. Hover a point for its architecture; click to copy it.</p>
<svg id="plot" width="820" height="480"></svg><div id="tip"></div>
<script>
const data = __DATA__; const budget = __BUDGET__; const W = 820, H = 480, L = 60, R = 20, T = 20, B = 45;
const svg = document.getElementById('plot'), tip = document.getElementById('tip'), ns = 'http://www.w3.org/2000/svg';
const xs = data.map(d => d.lat).concat(budget === null ? [] : [budget]), ys = data.map(d => d.acc);
const x0 = Math.min(...xs) * 0.95, x1 = Math.max(...xs) * 1.05, y0 = Math.min(...ys) - 0.5, y1 = Math.max(...ys) + 0.5;
const sx = v => L + (v - x0) / (x1 - x0) * (W - L - R), sy = v => H - B - (v - y0) / (y1 - y0) * (H - T - B);
function el(tag, attrs, text) { const e = document.createElementNS(ns, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; svg.appendChild(e); return e; }
el('line', {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: '#333'}); el('line', {x1: L, y1: T, x2: L, y2: H - B, stroke: '#333'});
for (let i = 0; i <= 5; i++) { const xv = x0 + i * (x1 - x0) / 5, yv = y0 + i * (y1 - y0) / 5;
  el('text', {x: sx(xv) - 12, y: H - B + 16}, xv.toFixed(2)); el('text', {x: 8, y: sy(yv) + 4}, yv.toFixed(1)); }
el('text', {x: W / 2 - 60, y: H - 8}, 'latency, ms'); el('text', {x: 8, y: 12}, 'accuracy, %');
if (budget !== null) el('line', {x1: sx(budget), y1: T, x2: sx(budget), y2: H - B, stroke: '#d62728', 'stroke-dasharray': '5,4'});
const front = data.filter(d => d.pareto).sort((a, b) => a.lat - b.lat);
if (front.length) el('polyline', {points: front.map(d => sx(d.lat) + ',' + sy(d.acc)).join(' '), fill: 'none', stroke: '#ff7f0e'});
for (const d of data) { const c = el('circle', {cx: sx(d.lat), cy: sy(d.acc), r: d.best ? 7 : 4,
    fill: d.best ? '#d62728' : (d.feasible ? '#1f77b4' : '#bbbbbb'), opacity: 0.85});
  c.addEventListener('mousemove', e => { tip.style.display = 'block'; tip.style.left = (e.pageX + 12) + 'px';
    tip.style.top = (e.pageY + 12) + 'px'; tip.innerHTML = '<b>' + d.acc.toFixed(2) + '% / ' + d.lat.toFixed(3) +
    ' ms / ' + (d.params / 1e6).toFixed(3) + 'M params</b>' + (d.feasible ? ' (feasible)' : '') + '<br>' + d.arch; });
  c.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
  c.addEventListener('click', () => navigator.clipboard && navigator.clipboard.writeText(d.arch)); }
</script></body></html>
"""


def write_pareto_html(path: Path, cands: Sequence[Candidate], primary: str, *, budget_ms: float | None,
                      budgets_text: str, source: str, best: Candidate | None) -> Path:
    front = {c.arch.hash for c in pareto_front(cands, primary)}
    data = [{"lat": c.latency_ms[primary], "acc": 100 * c.accuracy, "params": c.params, "feasible": c.feasible,
             "pareto": c.arch.hash in front, "best": best is not None and c.arch.hash == best.arch.hash,
             "arch": html.escape(c.arch.to_string())} for c in cands]
    page = (_HTML.replace("__DATA__", json.dumps(data)).replace("__BUDGET__", json.dumps(budget_ms))
            .replace("__DEVICE__", html.escape(primary)).replace("__SOURCE__", html.escape(source))
            .replace("__BUDGETS__", html.escape(budgets_text)))
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
