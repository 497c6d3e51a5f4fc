"""``make bench``: run every benchmark, write ``experiments/results/*.json`` and the README's results table.

Order: the demo pipeline (reused when finished), the supernet step benchmark, the LUT build and
fidelity benchmark, the search benchmark, the preset check, and the evidence that the search pays:
rank fidelity (``ranking``), baselines at equal budgets with teacher distillation (``baselines``)
and V1 latency-driven slimming against greedy slimming (``gumbel``). Each writes its JSON; this
script then renders ``experiments/results/summary.md`` and copies it into README.md between the
``<!-- results:start -->`` and ``<!-- results:end -->`` markers.

``--quick`` passes ``--quick`` to the three evidence benchmarks (ranking <= 15 minutes, baselines
about 20, gumbel about 30 on 2 cores), and first trains ``demo-quick/`` (the demo's recipe for 1 epoch on
6,000 images, about a minute) for the quick ranking; their full modes take hours on CPU.

    python experiments/run_all.py [--quick] [--only NAME ...] [--skip NAME ...] [--summary-only]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search_spaces.fileio import atomic_write_json  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
BENCHES = {
    "demo": ["experiments/demo.py"],
    "supernet": ["experiments/bench_supernet.py", "--json", "experiments/results/supernet.json"],
    "lut": ["experiments/bench_lut.py"],
    "search": ["experiments/bench_search.py", "--work", "demo", "--json", "experiments/results/search.json"],
    "presets": ["experiments/check_presets.py", "--json", "experiments/results/presets.json"],
    "ranking": ["experiments/bench_ranking.py"],
    "baselines": ["experiments/bench_baselines.py"],
    "gumbel": ["experiments/bench_gumbel.py"],
}
#: the benchmarks that take --quick
QUICK = ("ranking", "baselines", "gumbel")
#: where --quick's rank-fidelity run finds a supernet trained as its standalone runs are (1 epoch, 6,000 images)
QUICK_WORK = ROOT / "demo-quick"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def quick_supernet() -> list[str]:
    """Train ``demo-quick/``'s supernet (the demo's recipe for 1 epoch on 6,000 images, as ``bench_ranking.py
    --quick`` trains its standalone subnets) and its local-cpu LUT, once; the arguments that point the quick
    ranking at it, so that it compares like with like."""
    from experiments.demo import TRAIN

    at = TRAIN.index("--epochs")
    train = [*TRAIN[:at], "--epochs", "1", "--train-subset", "6000", *TRAIN[at + 2:]]
    QUICK_WORK.mkdir(exist_ok=True)
    for cmd in (train, ["nas-build-lut", "--device", "local-cpu"]):   # both reuse finished work when run again
        print(f"\n=== demo-quick: {' '.join(cmd)}", flush=True)
        if subprocess.call([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], cwd=QUICK_WORK) != 0:
            sys.exit(f"demo-quick: `{' '.join(cmd)}` failed")
    return ["--supernet", str(QUICK_WORK / "runs" / "fmnist")]


def _ratio(row: dict, unit: str = "") -> str:
    """A bench_supernet ratio with its 95% interval, where the results file has one."""
    ci = row.get("ratio_ci95")
    return f"{row['ratio']:.3f}{unit}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def demo_figures() -> dict | None:
    """The demo run's figures (its supernet's accuracies, its extraction): read from ``demo/`` where `make demo`
    ran, and kept in ``results/demo.json`` so that a checkout without that folder renders them too."""
    demo = ROOT / "demo" / "runs" / "fmnist" / "supernet.json"
    if not demo.is_file():
        return _load("demo")
    figures: dict = {"date": time.strftime("%Y-%m-%d", time.localtime(demo.stat().st_mtime)),
                     "supernet": json.loads(demo.read_text())["metrics"], "extraction": None}
    extracts = sorted((ROOT / "demo" / "runs").glob("extract-*/extract.json"), key=lambda q: q.stat().st_mtime)
    if extracts:
        figures["extraction"] = {"folder": extracts[-1].parent.name,
                                 "metrics": json.loads(extracts[-1].read_text())["metrics"]}
    atomic_write_json(RESULTS / "demo.json", figures)
    return figures


def render() -> str:
    lines = [f"Measured with `make bench` on {platform.machine()} Linux, 2 cores, torch CPU. Absolute times vary 2x "
             f"between machines of this kind; ratios are measured side by side in one run.", ""]
    demo = demo_figures()
    results = {name: (demo if name == "demo" else _load(name)) for name in sorted(BENCHES)}
    known = ", ".join(f"{name} {r['date']}" for name, r in results.items() if r and r.get("date"))
    unknown = ", ".join(name for name, r in results.items() if r and not r.get("date"))
    lines += [f"Dates of the results below: {known}" + (f"; undated: {unknown}" if unknown else "") + ".",
              ""]
    if demo:
        m = demo["supernet"]
        lines += ["**Demo supernet** (`efficientformer_v2_demo`, Fashion-MNIST 32 px, 3 epochs, sandwich rule, 2 CPU "
                  "threads):", "",
                  "| subnet | val acc | test acc |", "|---|---|---|",
                  f"| largest | {100 * m['val_acc_largest']:.2f}% | {100 * m['test_acc_largest']:.2f}% |",
                  f"| smallest | {100 * m['val_acc_smallest']:.2f}% | {100 * m['test_acc_smallest']:.2f}% |",
                  "", f"Training time {m['train_seconds']:.0f} s.", ""]
    if demo and demo.get("extraction"):
        m = demo["extraction"]["metrics"]
        lat = m.get("latency_ms", {}).get("local-cpu", {})
        lines += [f"**Extraction** of the demo's searched subnet (`{demo['extraction']['folder']}`): output equals the "
                  f"supernet's within {m['supernet_parity_max_abs']:.2g} (max abs); ONNX Runtime within "
                  f"{m.get('onnx_max_abs', float('nan')):.2g} of torch; test accuracy {100 * m['test_accuracy']:.2f}%; "
                  f"{m['params']:,} params."]
        if "measured" in lat and "lut" in lat:
            lines.append(f"local-cpu latency measured {lat['measured']:.3f} ms vs LUT {lat['lut']:.3f} ms "
                         f"({lat['lut_source']}), ratio {lat['measured'] / lat['lut']:.2f}.")
        lines.append("")
    sn = _load("supernet")
    if sn:
        lines += ["**Supernet vs static training step** (same config, batch and threads, interleaved; target <= 1.10; "
                  "in brackets the 95% bootstrap interval over the rounds):",
                  "", "| space | config | params | static ms | supernet ms | step ratio | fwd+bwd ratio | "
                      "optimizer ms (static / supernet) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sn["rows"]:
            opt = (f"{r['static_optimizer_ms']:.1f} / {r['supernet_optimizer_ms']:.1f}"
                   if "supernet_optimizer_ms" in r else "n/a")
            lines.append(f"| {r['space']} | {r['config']} | {r['params']:,} | {r['static_ms']:.1f} | "
                         f"{r['supernet_ms']:.1f} | {_ratio(r)} | {r['ratio_fwd_bwd']:.3f} | {opt} |")
        for r in sn.get("sandwich", []):
            lines.append(f"\nA sandwich step of {r['space']} ({len(r['configs'])} configs, {r['resolution']} px, batch "
                         f"{r['batch']}) costs {_ratio(r, 'x')} the sum of its configs' static steps.")
        lines += ["", f"Sandwich-rule training throughput: {sn['train']['images_per_s']:.0f} images/s "
                      f"(about {sn['train']['fashion_mnist_epoch_s_estimate']:.0f} s per Fashion-MNIST epoch)."]
        if "train_full_v2" in sn:
            f = sn["train_full_v2"]
            lines.append(f"Full default V2 space ({f['supernet_params']:,} shared parameters), batch {f['batch']}, 32 px: "
                         f"{f['images_per_s']:.0f} images/s on CPU.")
        lines.append("")
    lut = _load("lut")
    if lut:
        lines += ["**Latency LUT** (local-cpu, ONNX Runtime, 1 thread):", "", "```",
                  *(str(x) for x in lut.get("summary_lines", [json.dumps(lut, indent=1)[:2000]])), "```", ""]
    se = _load("search")
    if se:
        lines += [f"**Search** on the demo supernet, local-cpu budget {se['budget_ms']:.3f} ms; latency measured "
                  f"end to end (ORT, 1 thread, round-robin):", "",
                  "| model | params | LUT ms | measured ms | val acc |", "|---|---|---|---|---|"]
        for r in se["rows"]:
            lines.append(f"| {r['name']} | {r['params']:,} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | "
                         f"{100 * r['accuracy']:.2f}% |")
        lines.append("")
        for s, v in se["verdicts"].items():
            c = se["strategies"][s]
            lines.append(f"- `{s}`: beats every uniform baseline at equal or higher measured latency: "
                         f"**{'yes' if v['beats_all_slower_or_equal_uniform'] else 'no'}**; measured "
                         f"{v['measured_ms']:.3f} ms {'within' if v['measured_within_budget'] else 'OVER'} the budget; "
                         f"{c['wall_s']:.0f} s, {c['candidates_per_min']:.1f} candidates/min.")
        fe = se.get("fast_vs_exhaustive")
        if fe:
            ok = fe["accuracy_ok"] and fe["latency_ok"]
            lines.append(
                f"- fast path vs exhaustive greedy slimming (target: within 0.3 points on the whole validation split "
                f"at equal or lower measured latency): **{'met' if ok else 'NOT met'}**: "
                f"{100 * fe['whole_val_accuracy_fast']:.2f}% vs {100 * fe['whole_val_accuracy_exhaustive']:.2f}% "
                f"(gap {fe['accuracy_gap_points']:+.2f} points), measured {fe['measured_ms_fast']:.3f} vs "
                f"{fe['measured_ms_exhaustive']:.3f} ms ("
                + (f"retest {fe['measured_ms_exhaustive_retest']:.3f}, " if "measured_ms_exhaustive_retest" in fe else "")
                + f"spread {fe['measurement_spread_ms']:.3f}), "
                f"{fe['evaluations_fast']} vs {fe['evaluations_exhaustive']} real evaluations, "
                f"{fe['wall_s_fast']:.0f} vs {fe['wall_s_exhaustive']:.0f} s.")
        lines.append("")
    lines += _evidence()
    pr = _load("presets")
    if pr:
        ok = all(r.get("match", False) for r in pr.get("rows", []))
        lines += [f"**Presets**: {len(pr.get('rows', []))} presets built at 224, exact parameter counts "
                  f"{'all match' if ok else 'MISMATCH'}; forward, ONNX parity and CoreML conversion checked by "
                  f"`experiments/check_presets.py`.", ""]
    return "\n".join(lines)


def _pm(mean: float, std: float | None) -> str:
    """A fraction's mean and spread as percentages: ``61.18 ± 0.98%``."""
    return f"{100 * mean:.2f} ± {100 * (std or 0):.2f}%"


def _mode(d: dict) -> str:
    settings = d.get("settings", {})
    mode = settings.get("mode") or ("quick" if d.get("quick", settings.get("quick")) else "full")
    return "full" if mode == "full" else f"`--{mode}`"


def _rel(path: str) -> str:
    """``path`` relative to the repository where it lies inside it."""
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def _evidence() -> list[str]:
    """The evidence benchmarks: their tables and their verdicts, in plain words."""
    lines: list[str] = []
    rk = _load("ranking")
    if rk:
        lines += [f"**Rank fidelity** ({_mode(rk)} mode, supernet `{_rel(rk['supernet'])}`, {len(rk['rows'])} subnets "
                  f"stratified by LUT latency, {rk['seeds']} standalone seeds, {rk['epochs']} epoch(s) on "
                  f"{rk.get('train_images') or 'all'} training images, {rk['seconds'] / 60:.0f} min): "
                  f"bootstrap 95% intervals; scatter plot `experiments/results/{rk['plot']}`.", "",
                  "| against standalone accuracy | Kendall tau | Spearman |", "|---|---|---|"]
        for name, st in rk["stats"].items():
            k, s_ = st["kendall"], st["spearman"]
            lines.append(f"| {name.replace('_', ' ')} | {k[0]:.3f} [{k[1]:.3f}, {k[2]:.3f}] | "
                         f"{s_[0]:.3f} [{s_[1]:.3f}, {s_[2]:.3f}] |")
        lines += ["", f"![Rank fidelity: proxy and fine-tuned accuracy against standalone accuracy]"
                      f"(experiments/results/{rk['plot']})", ""]
    bl = _load("baselines")
    if bl:
        lines += [f"**Baselines at equal budgets** ({_mode(bl)} mode; supernet `{_rel(bl['supernet'])}`; fine-tuned test "
                  f"accuracy, mean ± std over seeds "
                  f"{bl['seeds'] if isinstance(bl['seeds'], list) else bl['settings'].get('seeds')}; "
                  f"measured latency: ORT, 1 thread; real evals: accuracy evaluations the method made, "
                  f"slim's partly on fewer images):", "",
                  "| budget | method | real evals | params | LUT ms | measured ms | proxy | fine-tuned test |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in bl["budgets"]:
            for name, pk in b["picks"].items():
                if not pk.get("arch"):
                    lines.append(f"| {b['label']} | {name} | {pk.get('evaluated', 0)} | - | - | - | - | nothing feasible |")
                    continue
                ft = pk.get("test_mean")
                lines.append(f"| {b['label']} | {name} | {pk.get('evaluated', 0)} | {pk['params']:,} | {pk['lut_ms']:.3f} | "
                             f"{pk.get('measured_ms', float('nan')):.3f} | {100 * pk['proxy']:.2f}% | "
                             + (f"{_pm(ft, pk.get('test_std'))} |" if ft is not None else "- |"))
        lines += ["", *(f"- {v}" for v in bl["verdicts"]), ""]
    te = _load("teacher")
    if te:
        w, wo = te["with_teacher"], te["without_teacher"]
        lines += [f"**Teacher distillation** ({_mode(te)} mode): student fine-tuned "
                  f"{_pm(wo['test_mean'], wo['test_std'])} without a teacher, "
                  f"{_pm(w['test_mean'], w['test_std'])} with one (test accuracy).", "",
                  *(f"- {v}" for v in te["verdicts"]), ""]
    gu = _load("gumbel")
    if gu:
        sn = gu.get("supernet", {})
        lines += [f"**Gumbel (V1 latency-driven slimming) vs slim** on `efficientformer_demo` ({_mode(gu)} mode; "
                  f"its supernet: {100 * sn.get('val_acc_largest', float('nan')):.1f}% validation accuracy for the "
                  f"largest subnet; fine-tuned test accuracy over seeds; measured latency: ORT, 1 thread):", "",
                  "| budget | strategy | real evals | params | LUT ms | measured ms | proxy | fine-tuned test |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in gu["rows"]:
            b = row["budget"]
            for name in ("slim", "gumbel"):
                r = row[name]
                if not r.get("arch"):
                    lines.append(f"| {100 * b['fraction']:.0f}% | {name} | - | - | - | - | - | nothing feasible |")
                    continue
                lines.append(f"| {100 * b['fraction']:.0f}% ({b['latency_ms']:.3f} ms, {b['params'] / 1e3:.0f}K) | "
                             f"{name} | {r['evaluated']} | {r['params']:,} | {r['lut_ms']:.3f} | "
                             f"{r.get('measured_ms_rr', float('nan')):.3f} | {100 * r['proxy_accuracy']:.2f}% | "
                             f"{_pm(r['test_mean'], r.get('test_std'))} |")
        lines += ["", *(f"- {v}" for v in gu["verdicts"]), ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", nargs="*", default=[], choices=sorted(BENCHES))
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these benchmarks")
    p.add_argument("--quick", action="store_true", help=f"quick modes of {', '.join(QUICK)} (15-30 min each on 2 cores)")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for name, cmd in BENCHES.items():
            if name in args.skip or (args.only and name not in args.only) or not (ROOT / cmd[0]).is_file():
                continue
            if args.quick and name in QUICK:
                cmd = [*cmd, "--quick", *(quick_supernet() if name == "ranking" else [])]
            print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
            rc = subprocess.call([sys.executable, *cmd], cwd=ROOT)
            if rc != 0:
                sys.exit(f"bench {name} failed with exit code {rc}")
    summary = render()
    (RESULTS / "summary.md").write_text(summary + "\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n{summary}\n{end}{tail}")
    print(summary)


if __name__ == "__main__":
    main()
