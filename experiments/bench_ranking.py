"""Rank fidelity: does the supernet's inherited accuracy rank subnets the way standalone training does?

On the demo supernet (``make demo``'s run, or ``--supernet``):

1. 2,000 random configs of its space are sorted by LUT latency and cut into ``--subnets`` strata
   of equal count; one config is drawn at random from each (seeded), so the sample spans the
   latency range and nobody picks it.
2. Proxy accuracy: the supernet's shared weights, BN recalibrated, on the validation split (what
   ``nas-search`` ranks by).
3. Standalone accuracy: each config trained from scratch with the supernet's own recipe and
   epochs (``supernet.static_train``), on ``--seeds`` seeds; the mean over seeds.
4. Fine-tuned accuracy: each config's inherited weights fine-tuned for ``--finetune-epochs``.

It reports Kendall's tau and Spearman's rho of proxy vs standalone and of fine-tuned vs
standalone, each with a bootstrap 95% interval over the subnets, and the same between the two
standalone seeds (how well standalone training agrees with itself: the ceiling any proxy can
reach). Writes ``experiments/results/ranking.json`` and a scatter plot ``ranking.png``.

CPU time (2 cores): the full run trains 12 x 2 subnets for the supernet's 3 epochs on 55,000
Fashion-MNIST images plus 12 fine-tunings, about 2 hours; ``--quick`` trains 1 epoch on a
6,000-image subset and scores on 2,000 validation images, well under 15 minutes.

    python experiments/bench_ranking.py [--quick] [--supernet demo/runs/fmnist] [--subnets 12] [--seeds 2]
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latency import LatencyTable, predict_latency  # noqa: E402
from latency.lut import default_lut_path  # noqa: E402
from latency.validate import spearman  # noqa: E402
from nas.accuracy import AccuracyEvaluator, load_run_splits  # noqa: E402
from search_spaces import ArchConfig, count_params  # noqa: E402
from search_spaces.fileio import atomic_write_json  # noqa: E402
from supernet import build_model  # noqa: E402
from supernet.bn import evaluate, recalibrate_bn  # noqa: E402
from supernet.data import ImageSplit, calibration_batches, make_loader  # noqa: E402
from supernet.run import load_run, load_supernet  # noqa: E402
from supernet.static_train import StaticRecipe, train_static  # noqa: E402


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two samples (ties counted as neither concordant nor discordant)."""
    n = len(a)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else math.nan


def bootstrap(a: np.ndarray, b: np.ndarray, fn, *, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``fn(a, b)`` and its bootstrap 95% interval (resampling pairs with replacement)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(a), len(a))
        v = fn(a[idx], b[idx])
        if math.isfinite(v):
            values.append(v)
    lo, hi = (np.percentile(values, [2.5, 97.5]) if values else (math.nan, math.nan))
    return float(fn(a, b)), float(lo), float(hi)


def stratified(space, lut: LatencyTable, k: int, *, seed: int, pool: int = 2000) -> list[tuple[ArchConfig, float]]:
    """``k`` configs, one drawn at random from each of ``k`` equal-count latency strata of ``pool`` samples."""
    rng = random.Random(f"ranking:{seed}")
    seen: dict[str, tuple[ArchConfig, float]] = {}
    for i in range(pool):
        arch = space.sample(rng)
        seen.setdefault(arch.hash, (arch, predict_latency(arch, lut)))
    ordered = sorted(seen.values(), key=lambda t: t[1])
    edges = np.linspace(0, len(ordered), k + 1).astype(int)
    return [ordered[rng.randrange(edges[i], edges[i + 1])] for i in range(k)]


def subset(split: ImageSplit, n: int, seed: int) -> ImageSplit:
    if n >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return ImageSplit(split.images[idx], split.labels[idx], split.mean, split.std)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--supernet", default=str(ROOT / "demo" / "runs" / "fmnist"))
    p.add_argument("--lut", help="LUT for the latency strata (default: the run's local-cpu LUT next to it)")
    p.add_argument("--subnets", type=int, default=12)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, help="standalone epochs (default: the supernet's)")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1 epoch on a 6,000-image subset, 2,000 validation images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "experiments" / "results" / "ranking.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    run = load_run(args.supernet)
    lut_path = Path(args.lut) if args.lut else default_lut_path("local-cpu", run.resolution, Path(args.supernet).parents[1])
    lut = LatencyTable.load(lut_path)
    net = load_supernet(run)
    splits = load_run_splits(run)
    val_images = 2000 if args.quick else len(splits.val)
    train_images = 6000 if args.quick else len(splits.train)
    splits = replace(splits, train=subset(splits.train, train_images, 0), val=subset(splits.val, val_images, 1))
    epochs = 1 if args.quick else (args.epochs or int(run.meta["recipe"]["epochs"]))
    picked = stratified(run.space, lut, args.subnets, seed=0)
    print(f"{len(picked)} subnets from {lut_path.name}: {picked[0][1]:.3f} to {picked[-1][1]:.3f} ms; "
          f"standalone {epochs} epoch(s) x {args.seeds} seeds on {len(splits.train)} images; val {len(splits.val)}")

    n_calib = max(1, min(8, len(splits.train) // 128))
    evaluator = AccuracyEvaluator(net, splits, val_images=len(splits.val), calib_batches=n_calib)
    calib = calibration_batches(splits.train, batch_size=128, num_batches=n_calib, seed=0)
    val = make_loader(splits.val, batch_size=256, shuffle=False, seed=0)
    test = make_loader(splits.test, batch_size=256, shuffle=False, seed=0)
    rows = []
    for i, (arch, ms) in enumerate(picked):
        t0 = time.perf_counter()
        row = {"arch": arch.to_string(), "lut_ms": ms, "params": count_params(net.lower(arch)),
               "proxy": evaluator(arch)}
        standalone = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = build_model(arch, net.setup)
            recipe = StaticRecipe.from_train_config(run.meta["recipe"], epochs=epochs, seed=seed)
            train_static(model, splits, recipe)
            standalone.append({"seed": seed, "val": evaluate(model.eval(), val), "test": evaluate(model, test)})
        row["standalone"] = standalone
        row["standalone_val"] = float(np.mean([s["val"] for s in standalone]))
        tuned = recalibrate_bn(net.get_active_subnet(arch), None, calib)
        train_static(tuned, splits, StaticRecipe(epochs=args.finetune_epochs, lr=5e-4, min_lr=5e-6,
                                                 warmup_epochs=0.25, seed=1000))
        row["finetuned"] = evaluate(tuned.eval(), val)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"[{i + 1}/{len(picked)}] {ms:.3f} ms {row['params']:>8,} params: proxy {100 * row['proxy']:.2f}%, "
              f"standalone {100 * row['standalone_val']:.2f}%, fine-tuned {100 * row['finetuned']:.2f}% "
              f"({row['seconds']:.0f} s)", flush=True)

    proxy = np.array([r["proxy"] for r in rows])
    alone = np.array([r["standalone_val"] for r in rows])
    tuned = np.array([r["finetuned"] for r in rows])
    stats = {}
    for name, x in (("proxy_vs_standalone", proxy), ("finetuned_vs_standalone", tuned)):
        stats[name] = {"kendall": bootstrap(x, alone, kendall_tau), "spearman": bootstrap(x, alone, spearman)}
    if args.seeds >= 2:
        s0 = np.array([r["standalone"][0]["val"] for r in rows])
        s1 = np.array([r["standalone"][1]["val"] for r in rows])
        stats["standalone_seed0_vs_seed1"] = {"kendall": bootstrap(s0, s1, kendall_tau),
                                              "spearman": bootstrap(s0, s1, spearman)}
    for name, st in stats.items():
        k, s = st["kendall"], st["spearman"]
        print(f"{name}: Kendall {k[0]:.3f} [{k[1]:.3f}, {k[2]:.3f}], Spearman {s[0]:.3f} [{s[1]:.3f}, {s[2]:.3f}]")
    out = Path(args.json)
    plot = out.with_suffix(".png")
    _plot(plot, rows)
    atomic_write_json(out, {"quick": args.quick, "epochs": epochs, "seeds": args.seeds, "train_images": len(splits.train),
                            "val_images": len(splits.val), "supernet": str(run.path), "lut": str(lut_path),
                            "rows": rows, "stats": stats, "seconds": time.perf_counter() - t_all, "plot": plot.name,
                            "machine": platform.platform(), "date": time.strftime("%Y-%m-%d")})
    print(f"wrote {out} and {plot} ({time.perf_counter() - t_all:.0f} s)")


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alone = [100 * r["standalone_val"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter(alone, [100 * r["proxy"] for r in rows], label="proxy (inherited, BN recalibrated)")
    ax.scatter(alone, [100 * r["finetuned"] for r in rows], marker="^", label="inherited + fine-tuned")
    ax.set_xlabel("standalone validation accuracy, % (mean of seeds)")
    ax.set_ylabel("supernet-based accuracy, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
