"""Searched subnets vs uniformly scaled baselines on the demo supernet, and the cost of each strategy.

Run in a folder where the demo has run (``make demo``; default ``demo/``). For a local-cpu budget
halfway between the space's smallest and largest subnets it:

1. runs ``slim`` and ``nsga2`` searches (wall time, candidates per minute);
2. evaluates the uniformly scaled configs of the same space (every choice at the same relative
   position, 0 = smallest ... 1 = largest) the same way: inherited weights, recalibrated BN,
   the same validation images;
3. measures the end-to-end latency of every model (searched and baselines) with ONNX Runtime on
   1 thread, round-robin in one process, and checks that each searched subnet beats every baseline
   that is at least as slow, and that it meets its latency budget when measured.

    python experiments/bench_search.py [--work demo] [--json experiments/results/search.json]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from latency import LatencyTable, predict_latency
from latency.lut import default_lut_path
from latency.profiles import get_profile
from latency.runtime import measure_module
from nas.objectives import MesWeights
from nas.search import SearchSettings
from nas.search_run import SearchRunConfig, run_search
from search_spaces import count_params, lower
from search_spaces.fileio import atomic_write_json
from supernet.run import find_latest_run, load_run, load_supernet
from nas.accuracy import AccuracyEvaluator, load_run_splits


def measure_round_robin(models: dict[str, torch.nn.Module], shape: tuple[int, ...], *, rounds: int,
                        statistic: str) -> dict[str, float]:
    """Each model timed as nas-extract and the LUT validation time it (local-cpu profile: ORT, 1 thread),
    in ``rounds`` round-robin rounds; a model's quietest round (lowest median) counts, in the LUT's statistic."""
    profile = get_profile("local-cpu")
    best: dict[str, Any] = {}
    for _ in range(rounds):
        for k, m in models.items():
            st = measure_module(m, shape, profile)
            if k not in best or st.median_ms < best[k].median_ms:
                best[k] = st
    return {k: (st.min_ms if statistic == "min" else st.median_ms) for k, st in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="demo")
    p.add_argument("--json", default=str(Path("experiments/results/search.json").resolve()))
    p.add_argument("--n-trials", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.chdir(args.work)
    run = load_run(find_latest_run("."))
    lut_path = default_lut_path("local-cpu", run.resolution)
    lut = LatencyTable.load(lut_path)
    space = run.space
    lo, hi = predict_latency(space.smallest(), lut), predict_latency(space.largest(), lut)
    budget = lo + 0.5 * (hi - lo)
    print(f"supernet {run.path}, space {space.name}, LUT {lut_path} ({lut.describe()})")
    print(f"latency budget {budget:.3f} ms (smallest {lo:.3f}, largest {hi:.3f} ms predicted)")

    results = {}
    for strategy in ("slim", "nsga2"):
        out = Path(f"runs/bench-search-{strategy}")
        shutil.rmtree(out, ignore_errors=True)  # a cold start: the search cost is what a user pays the first time
        settings = SearchSettings(strategy=strategy, n_trials=args.n_trials, population_size=12)
        cfg = SearchRunConfig(latency=(f"local-cpu={budget:.4f}ms",), device="local-cpu", out=str(out),
                              supernet=str(run.path), settings=settings, mes=MesWeights())
        t0 = time.perf_counter()
        r = run_search(cfg)
        wall = time.perf_counter() - t0
        results[strategy] = {"wall_s": wall, "candidates": len(r.outcome.candidates), "evaluated": r.outcome.evaluated,
                             "candidates_per_min": 60 * len(r.outcome.candidates) / wall, "arch": r.best.arch,
                             "accuracy": r.best.accuracy, "predicted_ms": r.best.latency_ms["local-cpu"],
                             "params": r.best.params}
        print(f"{strategy}: {wall:.1f} s, {len(r.outcome.candidates)} candidates "
              f"({r.outcome.evaluated} newly evaluated), {results[strategy]['candidates_per_min']:.1f} candidates/min")

    net = load_supernet(run)
    splits = load_run_splits(run)
    same = SearchRunConfig()  # the searches' evaluation setting, so baselines are judged the same way
    evaluator = AccuracyEvaluator(net, splits, val_images=same.val_images, calib_batches=same.calib_batches,
                                  seed=same.settings.seed, identity=run.weights_sha256,
                                  cache_path=Path("runs/bench-search-slim/accuracy_cache.jsonl"))
    rows = []
    models = {}
    seen = set()
    for f in [i / 8 for i in range(9)]:
        arch = space.uniform(f)
        if arch.hash in seen:  # neighbouring fractions can round to the same config
            continue
        seen.add(arch.hash)
        key = f"uniform {f:.3f}"
        rows.append({"name": key, "arch": arch, "accuracy": evaluator(arch)})
    for strategy, res in results.items():
        rows.append({"name": f"searched ({strategy})", "arch": res["arch"], "accuracy": evaluator(res["arch"])})
    for r in rows:  # timed as nas-extract exports them: the static subnet in the default memory format
        models[r["name"]] = net.get_active_subnet(r["arch"]).eval()
    shape = (1, run.in_chans, run.resolution, run.resolution)
    measured = measure_round_robin(models, shape, rounds=args.rounds, statistic=lut.statistic)
    for r in rows:
        r["params"] = count_params(lower(r["arch"], resolution=run.resolution, num_classes=run.num_classes,
                                         in_chans=run.in_chans))
        r["predicted_ms"] = predict_latency(r["arch"], lut)
        r["measured_ms"] = measured[r["name"]]

    print(f"\n{'model':<18} {'params':>9} {'LUT ms':>8} {'measured ms':>12} {'val acc':>8}  arch")
    for r in rows:
        print(f"{r['name']:<18} {r['params']:>9,} {r['predicted_ms']:>8.3f} {r['measured_ms']:>12.3f} "
              f"{100 * r['accuracy']:>7.2f}%  {r['arch'].to_string()}")
    verdicts = {}
    for strategy in results:
        s = next(r for r in rows if r["name"] == f"searched ({strategy})")
        rivals = [r for r in rows if r["name"].startswith("uniform") and r["measured_ms"] >= s["measured_ms"]]
        beaten = all(s["accuracy"] > r["accuracy"] for r in rivals)
        within = s["measured_ms"] <= budget
        verdicts[strategy] = {"beats_all_slower_or_equal_uniform": beaten, "rivals": len(rivals),
                              "measured_within_budget": within, "measured_ms": s["measured_ms"]}
        print(f"{strategy}: beats all {len(rivals)} uniform baselines at equal or higher measured latency: "
              f"{'YES' if beaten else 'NO'}; measured {s['measured_ms']:.3f} ms vs budget {budget:.3f} ms: "
              f"{'within' if within else 'OVER'}")
    for res in results.values():
        res["arch"] = res["arch"].to_string()
    atomic_write_json(Path(args.json), {
        "budget_ms": budget, "strategies": results, "verdicts": verdicts,
        "rows": [{**r, "arch": r["arch"].to_string()} for r in rows], "date": time.strftime("%Y-%m-%d"),
        "lut": lut.describe(),
    })


if __name__ == "__main__":
    sys.exit(main())
