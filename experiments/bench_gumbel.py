"""EfficientFormer (V1)'s latency-driven slimming (``--strategy gumbel``) against greedy ``slim`` at equal budgets.

On the V1 demo space (``efficientformer_demo``), in a work folder (default ``demo-v1/``):

1. Train a supernet with the CLI as users do (the demo recipe, V1 space: ``nas-train --space
   efficientformer_demo --dataset fashion-mnist --resolution 32 --epochs 3 --num-random 1
   --threads 2``) and build its local-cpu LUT (``nas-build-lut --device local-cpu --validate 10``).
   A finished supernet (its ``supernet.json``) and a complete, calibrated LUT are reused.
2. Three budgets, at 30%, 50% and 70% of the way from the space's smallest to its largest config:
   local-cpu latency by the LUT (``latency.predict_latency``) and, at the same fraction, parameters
   (exact counts of the configs lowered with the LUT's setup).
3. At each budget, ``nas-search --latency Xms --max-params N`` with ``--strategy slim`` and with
   ``--strategy gumbel``, each a separate process from a cold start (its output folder is removed
   first, so no cached accuracy is reused): wall time, real evaluations (``search.json``), proxy
   accuracy, LUT latency, params, feasibility.
4. Each pick is extracted with ``nas-extract --formats safetensors,onnx --finetune-epochs 0``
   (ONNX export, local-cpu latency measured with ONNX Runtime, inherited test accuracy). nas-extract
   has no seed flag, so fine-tuning happens here: the extracted model (``nas.extract.load_subnet``)
   is fine-tuned for ``--finetune-epochs`` with nas-extract's own recipe on seeds 0, 1, 2 (seed 0
   takes nas-extract's seeds: it is ``nas-extract --finetune-epochs 1``, up to floating-point
   reduction order) and scored on the test split. A subnet picked twice is extracted and
   fine-tuned once. The picks are also timed side by side in one process, round-robin (ORT,
   1 thread), as bench_search does.
5. Per budget a plain verdict: "gumbel beats slim by X points (spread Y)" only when the mean
   fine-tuned test accuracy of gumbel's pick exceeds slim's by more than the spread
   ``sqrt(std_gumbel^2 + std_slim^2)`` over the seeds; otherwise "gumbel does not beat slim: ...".
   Also whether each pick meets the latency budget when measured.

Writes ``experiments/results/gumbel.json`` (``--json``) and prints a compact table.

CPU time (2 cores): the full mode trains 3 Fashion-MNIST epochs (55,000 images; about 10 minutes
for the V2 demo space, see README), builds the LUT (about a minute), runs 6 searches on 2,000
validation images (a few minutes each for slim), and fine-tunes each distinct pick 3 times for an
epoch on 55,000 images: roughly an hour in all. ``--quick`` trains 1 epoch on a 6,000-image subset,
searches on 1,000 validation images with 60 Gumbel steps, fine-tunes on the same subset and tests on
5,000 images; it took 28 minutes on 2026-12-02 (on a machine shared with a test suite; the smoke
run below takes about 2 minutes on 1 thread). Every step's time is printed and kept in the JSON.

    python experiments/bench_gumbel.py [--quick] [--work demo-v1] [--json experiments/results/gumbel.json]
    python experiments/bench_gumbel.py --dataset synthetic:512 --quick --threads 1 --work /tmp/gb   # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments.bench_ranking import subset  # noqa: E402
from experiments.bench_search import measure_round_robin  # noqa: E402
from latency import LatencyTable, predict_latency  # noqa: E402
from latency.lut import default_lut_path  # noqa: E402
from nas.accuracy import load_run_splits  # noqa: E402
from nas.extract import load_subnet  # noqa: E402
from search_spaces import count_params, lower  # noqa: E402
from search_spaces.fileio import atomic_write_json  # noqa: E402
from search_spaces.subnet_file import SubnetFile  # noqa: E402
from supernet.bn import evaluate  # noqa: E402
from supernet.data import DatasetSplits, make_loader  # noqa: E402
from supernet.run import SupernetRun, load_run  # noqa: E402
from supernet.static_train import StaticRecipe, train_static  # noqa: E402

SPACE = "efficientformer_demo"
DEVICE = "local-cpu"
STRATEGIES = ("slim", "gumbel")
#: nas-extract's fine-tuning learning rate (its ``--finetune-lr`` default); the rest of its recipe is below.
FINETUNE_LR = 5e-4


@dataclass(frozen=True)
class Plan:
    """Every setting of one benchmark run (what the JSON records as ``settings``)."""

    quick: bool
    dataset: str
    epochs: int
    train_subset: int | None
    validate: int
    val_images: int | None       # None: nas-search's default
    gumbel_steps: int | None     # None: nas-search's default
    test_images: int | None      # None: the whole test split
    seeds: int
    finetune_epochs: int
    threads: int
    fractions: tuple[float, ...]
    rounds: int

    @property
    def run_dir(self) -> str:
        """The supernet's folder under the work folder: the demo's ``runs/fmnist``, or one per dataset and mode."""
        name = "fmnist" if self.dataset == "fashion-mnist" else re.sub(r"[^A-Za-z0-9]+", "-", self.dataset).strip("-")
        return f"runs/{name}" + ("-quick" if self.quick else "")

    def train_cmd(self) -> list[str]:
        cmd = ["nas-train", "--space", SPACE, "--dataset", self.dataset, "--resolution", "32", "--epochs",
               str(self.epochs), "--num-random", "1", "--threads", str(self.threads), "--out", self.run_dir]
        return cmd + (["--train-subset", str(self.train_subset)] if self.train_subset else [])

    def lut_cmd(self) -> list[str]:
        return ["nas-build-lut", "--device", DEVICE, "--validate", str(self.validate), "--supernet", self.run_dir,
                "--jobs", str(self.threads)]


# ----------------------------------------------------------------------------- processes

def cli(cmd: list[str], cwd: Path, *, log: Path | None = None) -> tuple[int, float]:
    """Run one command of the toolkit in ``cwd`` (its output to the console, or to ``log``): exit code, seconds."""
    print(f"\n$ {shlex.join(cmd)}" + (f"    (output: {log})" if log else ""), flush=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    if log is None:
        rc = subprocess.call(cmd, cwd=cwd, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            rc = subprocess.call(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return rc, time.perf_counter() - t0


def tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in lines[-n:])


def train_supernet(plan: Plan, work: Path) -> tuple[SupernetRun, dict[str, Any]]:
    """The supernet of ``plan``: reused when its ``supernet.json`` holds a run of the same recipe, else trained."""
    meta = work / plan.run_dir / "supernet.json"
    if meta.is_file():
        recipe = json.loads(meta.read_text()).get("recipe", {})
        same = (recipe.get("dataset") == plan.dataset and int(recipe.get("epochs", -1)) == plan.epochs
                and recipe.get("train_subset") == plan.train_subset)
        if same:
            print(f"(reusing the finished supernet {work / plan.run_dir})")
            return load_run(work / plan.run_dir), {"reused": True, "seconds": 0.0}
    rc, sec = cli(plan.train_cmd(), work)   # nas-train resumes a checkpoint and refuses a folder of another recipe
    if rc != 0:
        sys.exit(f"bench_gumbel: nas-train failed (exit code {rc}); if {work / plan.run_dir} holds a run of other "
                 f"settings, choose another --work or remove that folder")
    return load_run(work / plan.run_dir), {"reused": False, "seconds": sec}


def build_lut(plan: Plan, work: Path, run: SupernetRun) -> tuple[Path, LatencyTable, dict[str, Any]]:
    """The run's local-cpu LUT: reused when complete and calibrated, else built (nas-build-lut resumes)."""
    path = default_lut_path(DEVICE, run.resolution, work)
    if path.is_file():
        lut = LatencyTable.load(path)
        lut.check_compatible(device=DEVICE, resolution=run.setup.resolution, space_hash=run.space.hash)
        if lut.complete and (plan.validate == 0 or lut.calibration.method != "none"):
            print(f"(reusing the complete LUT {path}: {lut.describe()})")
            return path, lut, {"reused": True, "seconds": 0.0}
    rc, sec = cli(plan.lut_cmd(), work)
    if rc != 0:
        sys.exit(f"bench_gumbel: nas-build-lut failed (exit code {rc})")
    return path, LatencyTable.load(path), {"reused": False, "seconds": sec}


# ----------------------------------------------------------------------------- budgets and searches

def choose_budgets(run: SupernetRun, lut: LatencyTable, fractions: tuple[float, ...]
                   ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The space's latency and params ranges, and one (latency, params) budget per fraction of them.

    The latency budget is rounded to the 4 decimals passed on the command line, so that the
    feasibility checked here is the one nas-search checks.
    """
    space = run.space
    small, large = space.smallest(), space.largest()
    lo, hi = predict_latency(small, lut), predict_latency(large, lut)
    p_lo, p_hi = (count_params(lower(a, lut.setup)) for a in (small, large))
    ranges = {"latency_ms_smallest": lo, "latency_ms_largest": hi, "params_smallest": p_lo, "params_largest": p_hi}
    budgets = [{"fraction": f, "latency_ms": round(lo + f * (hi - lo), 4), "params": int(p_lo + f * (p_hi - p_lo))}
               for f in fractions]
    return ranges, budgets


def search(plan: Plan, work: Path, run: SupernetRun, lut: LatencyTable, strategy: str,
           budget: dict[str, Any]) -> dict[str, Any]:
    """One ``nas-search`` from a cold start; what it picked and what it cost."""
    out = Path("bench-gumbel") / f"{strategy}-{round(100 * budget['fraction'])}"
    shutil.rmtree(work / out, ignore_errors=True)
    cmd = ["nas-search", "--supernet", plan.run_dir, "--device", DEVICE, "--latency", f"{budget['latency_ms']:.4f}ms",
           "--max-params", str(budget["params"]), "--strategy", strategy, "--out", str(out),
           "--threads", str(plan.threads)]
    if plan.val_images is not None:
        cmd += ["--val-images", str(plan.val_images)]
    if strategy == "gumbel" and plan.gumbel_steps is not None:
        cmd += ["--gumbel-steps", str(plan.gumbel_steps)]
    log = work / out.with_suffix(".log")
    rc, wall = cli(cmd, work, log=log)
    row: dict[str, Any] = {"strategy": strategy, "command": shlex.join(cmd), "exit_code": rc, "wall_s": wall,
                           "out": str(out), "log": str(log)}
    summary = work / out / "search.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        row.update(search_s=s["seconds"], evaluated=s["evaluated"], evaluated_full=s.get("evaluated_full"),
                   evaluated_images=s.get("evaluated_images"), candidates=s["candidates"],
                   feasible_candidates=s["feasible"])
    if rc != 0 or not (work / out / "subnet.json").is_file():
        row["feasible"] = False
        row["failure"] = ("no subnet meets the budgets (exit code 3)" if rc == 3
                          else f"nas-search failed (exit code {rc})")
        print(f"  {strategy}: {row['failure']}; last lines of {log}:\n{tail(log)}")
        return row
    sub = SubnetFile.load(work / out / "subnet.json")
    lut_ms = predict_latency(sub.arch, lut)
    params = count_params(lower(sub.arch, lut.setup))
    row.update(arch=sub.arch.to_string(), arch_hash=sub.arch.hash, proxy_accuracy=sub.metrics["proxy_accuracy"],
               lut_ms=lut_ms, params=params, subnet=str(out / "subnet.json"),
               feasible=lut_ms <= budget["latency_ms"] and params <= budget["params"])
    print(f"  {strategy}: {wall:.1f} s, {row.get('evaluated')} real evaluations, "
          f"proxy {100 * row['proxy_accuracy']:.2f}%, LUT {lut_ms:.4f} ms, {params:,} params, "
          f"{'feasible' if row['feasible'] else 'INFEASIBLE'}")
    return row


# ----------------------------------------------------------------------------- extraction and fine-tuning

def extract(work: Path, row: dict[str, Any], done: dict[str, dict[str, Any]]) -> float:
    """``nas-extract`` of a pick (once per distinct subnet); adds the extracted folder and its metrics to ``row``."""
    h = row["arch_hash"]
    sec = 0.0
    if h not in done:
        out = str(Path(row["out"]) / "extract")
        cmd = ["nas-extract", row["subnet"], "--finetune-epochs", "0", "--formats", "safetensors,onnx", "--out", out]
        rc, sec = cli(cmd, work, log=work / out / "extract.log")
        if rc != 0:
            sys.exit(f"bench_gumbel: nas-extract failed (exit code {rc}):\n{tail(work / out / 'extract.log')}")
        m = json.loads((work / out / "extract.json").read_text())["metrics"]
        lat = m.get("latency_ms", {}).get(DEVICE, {})
        done[h] = {"folder": out, "val_accuracy_inherited": m["val_accuracy_inherited"],
                   "test_accuracy_inherited": m["test_accuracy"], "extract_params": m["params"],
                   "measured_ms_extract": lat.get("measured"), "measured_statistic": lat.get("statistic"),
                   "extract_s": sec}
    row.update({k: v for k, v in done[h].items() if k != "extract_s"})
    return sec


def finetune(work: Path, folder: str, splits: DatasetSplits, plan: Plan) -> dict[str, Any]:
    """Test accuracy of the extracted model fine-tuned with nas-extract's recipe, one run per seed.

    Seed ``s`` sets ``torch.manual_seed(s)`` and the data order seed ``1000 + s``; seed 0 is what
    ``nas-extract --finetune-epochs N`` itself runs.
    """
    test = make_loader(splits.test, batch_size=256, shuffle=False, seed=0)
    acc = []
    for seed in range(plan.seeds):
        model = load_subnet(work / folder)
        recipe = StaticRecipe(epochs=plan.finetune_epochs, lr=FINETUNE_LR, min_lr=FINETUNE_LR / 100,
                              warmup_epochs=0.25, seed=1000 + seed, channels_last=False)
        torch.manual_seed(seed)
        train_static(model, splits, recipe, label="fine-tune")
        acc.append(evaluate(model.eval(), test))
    std = statistics.stdev(acc) if len(acc) > 1 else None   # one seed: no spread (JSON has no NaN)
    return {"test_accuracy_finetuned": acc, "test_mean": statistics.fmean(acc), "test_std": std}


# ----------------------------------------------------------------------------- verdicts and output

def verdict(slim: dict[str, Any], gumbel: dict[str, Any]) -> str:
    """The plain-word comparison of one budget's two picks on fine-tuned test accuracy."""
    missing = [r["strategy"] for r in (slim, gumbel) if "test_mean" not in r]
    if missing:
        why = "; ".join(f"{r['strategy']}: {r.get('failure', 'infeasible pick')}" for r in (slim, gumbel)
                        if "test_mean" not in r)
        return f"gumbel does not beat slim: no comparison ({why})"
    if slim["arch_hash"] == gumbel["arch_hash"]:
        return "gumbel does not beat slim: both picked the same subnet"
    diff = 100 * (gumbel["test_mean"] - slim["test_mean"])
    if gumbel["test_std"] is None or slim["test_std"] is None:
        return (f"gumbel does not beat slim: {diff:+.2f} points, and a single seed gives no spread to judge "
                f"it against")
    spread = 100 * math.sqrt(gumbel["test_std"] ** 2 + slim["test_std"] ** 2)
    if diff > spread:
        return f"gumbel beats slim by {diff:.2f} points (spread {spread:.2f})"
    if diff < -spread:
        return f"gumbel does not beat slim: slim is ahead by {-diff:.2f} points (spread {spread:.2f})"
    return f"gumbel does not beat slim: the difference, {diff:+.2f} points, is within the spread {spread:.2f}"


def latency_verdict(budget: dict[str, Any], r: dict[str, Any]) -> str:
    if "measured_ms_rr" not in r:
        return f"{r['strategy']}: no pick"
    ok = [r[k] <= budget["latency_ms"] for k in ("measured_ms_extract", "measured_ms_rr") if r.get(k) is not None]
    r["meets_latency_budget_measured"] = all(ok)
    return (f"{r['strategy']} measured {r.get('measured_ms_extract') or math.nan:.4f} ms (nas-extract), "
            f"{r['measured_ms_rr']:.4f} ms (side by side) vs budget {budget['latency_ms']:.4f} ms: "
            + ("within" if all(ok) else "OVER" if not any(ok) else "within by one measurement, OVER by the other"))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def print_table(rows: list[dict[str, Any]], plan: Plan) -> None:
    print(f"\n{'budget':<22} {'strategy':<7} {'wall s':>7} {'evals':>6} {'proxy':>7} {'LUT ms':>7} {'meas ms':>8} "
          f"{'params':>8} {'feas':>5} {'inherit':>8} {'fine-tuned test (' + str(plan.seeds) + ' seeds)':>24}")
    for row in rows:
        b = row["budget"]
        label = f"{round(100 * b['fraction'])}%: {b['latency_ms']:.3f}ms {b['params'] / 1e3:.0f}K"
        for s in STRATEGIES:
            r = row[s]
            if "arch" not in r:
                print(f"{label:<22} {s:<7} {r['wall_s']:>7.1f} {str(r.get('evaluated', '-')):>6}  {r['failure']}")
                continue
            ft = "-" if "test_mean" not in r else f"{100 * r['test_mean']:.2f} +- {_pct(r['test_std'])}"
            print(f"{label:<22} {s:<7} {r['wall_s']:>7.1f} {r.get('evaluated', '-'):>6} "
                  f"{100 * r['proxy_accuracy']:>6.2f}% {r['lut_ms']:>7.4f} {r.get('measured_ms_rr', math.nan):>8.4f} "
                  f"{r['params']:>8,} {'yes' if r['feasible'] else 'NO':>5} "
                  f"{100 * r.get('test_accuracy_inherited', math.nan):>7.2f}% {ft:>24}")
            label = ""
        for line in row["verdicts"]:
            print(f"    {line}")


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    subset_default = 6000 if quick and args.dataset == "fashion-mnist" else None
    return Plan(quick=quick, dataset=args.dataset, epochs=args.epochs or (1 if quick else 3),
                train_subset=(args.train_subset or None) if args.train_subset is not None else subset_default,
                validate=args.validate,
                val_images=args.val_images if args.val_images is not None else (1000 if quick else None),
                gumbel_steps=args.gumbel_steps if args.gumbel_steps is not None else (60 if quick else None),
                test_images=(args.test_images or None) if args.test_images is not None else (5000 if quick else None),
                seeds=args.seeds, finetune_epochs=args.finetune_epochs, threads=args.threads,
                fractions=tuple(float(f) / 100 for f in args.budgets.split(",")), rounds=args.rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "demo-v1"), help="work folder (default: demo-v1/ in the repository)")
    p.add_argument("--json", default=str(ROOT / "experiments" / "results" / "gumbel.json"))
    p.add_argument("--quick", action="store_true", help="1 epoch on 6,000 images, 1,000 validation images per "
                                                        "estimate, 60 Gumbel steps, 5,000 test images")
    p.add_argument("--dataset", default="fashion-mnist", help="nas-train --dataset (default fashion-mnist; "
                                                              "synthetic:512 for a smoke test)")
    p.add_argument("--epochs", type=int, help="supernet epochs (default 3; --quick: 1)")
    p.add_argument("--train-subset", type=int, help="nas-train --train-subset (default all; --quick on Fashion-MNIST: "
                                                    "6000; 0: all)")
    p.add_argument("--validate", type=int, default=10, help="nas-build-lut --validate (default 10)")
    p.add_argument("--val-images", type=int, help="nas-search --val-images (default nas-search's; --quick: 1000)")
    p.add_argument("--gumbel-steps", type=int, help="nas-search --gumbel-steps (default nas-search's; --quick: 60)")
    p.add_argument("--test-images", type=int, help="test images for the fine-tuned accuracy (default all; --quick: "
                                                   "5000; 0: all)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per pick (default 3)")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--budgets", default="30,50,70", help="budgets as percent of the way from the smallest to the "
                                                         "largest config (default 30,50,70)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds of the side-by-side latency measurement")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every step (and LUT export workers)")
    args = p.parse_args()
    plan = make_plan(args)
    torch.set_num_threads(plan.threads)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}

    run, train_info = train_supernet(plan, work)
    seconds["train"] = train_info["seconds"]
    lut_path, lut, lut_info = build_lut(plan, work, run)
    seconds["lut"] = lut_info["seconds"]
    ranges, budgets = choose_budgets(run, lut, plan.fractions)
    print(f"\nsupernet {run.path} ({run.space.name}); LUT {lut_path.name}: {lut.describe()}")
    print(f"range: {ranges['latency_ms_smallest']:.4f} to {ranges['latency_ms_largest']:.4f} ms (LUT), "
          f"{ranges['params_smallest']:,} to {ranges['params_largest']:,} params")

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for b in budgets:
        print(f"\n== budget {round(100 * b['fraction'])}%: {DEVICE} <= {b['latency_ms']:.4f} ms, "
              f"params <= {b['params']:,}")
        rows.append({"budget": b, **{s: search(plan, work, run, lut, s, b) for s in STRATEGIES}})
    seconds["search"] = time.perf_counter() - t0

    t0, extracted = time.perf_counter(), {}
    picks = [row[s] for row in rows for s in STRATEGIES if row[s].get("feasible")]
    for r in picks:
        extract(work, r, extracted)
    seconds["extract"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    splits = load_run_splits(run)
    if plan.test_images:
        splits = replace(splits, test=subset(splits.test, plan.test_images, 2))
    tuned: dict[str, dict[str, Any]] = {}
    for r in picks:
        if r["arch_hash"] not in tuned:
            t1 = time.perf_counter()
            tuned[r["arch_hash"]] = finetune(work, r["folder"], splits, plan)
            tuned[r["arch_hash"]]["finetune_s"] = time.perf_counter() - t1
            ft = tuned[r["arch_hash"]]
            print(f"fine-tuned {r['arch_hash']} ({r['strategy']}, {r['params']:,} params) on {plan.seeds} seeds: "
                  f"test {100 * ft['test_mean']:.2f} +- {_pct(ft['test_std'])} ({ft['finetune_s']:.0f} s)",
                  flush=True)
        r.update(tuned[r["arch_hash"]])
    seconds["finetune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if extracted:
        models = {h: load_subnet(work / e["folder"]) for h, e in extracted.items()}
        measured = measure_round_robin(models, (1, run.in_chans, run.resolution, run.resolution),
                                       rounds=plan.rounds, statistic=lut.statistic)
        for r in picks:
            r["measured_ms_rr"], r["measured_iqr_ms_rr"] = measured[r["arch_hash"]]
    seconds["measure"] = time.perf_counter() - t0

    for row in rows:
        b = row["budget"]
        row["verdict"] = verdict(row["slim"], row["gumbel"])
        row["verdicts"] = [row["verdict"], *(latency_verdict(b, row[s]) for s in STRATEGIES)]
    print_table(rows, plan)
    seconds["total"] = time.perf_counter() - t_all
    out = Path(args.json)
    sup = run.meta.get("metrics", {})
    atomic_write_json(out, {
        "settings": {**asdict(plan), "space": SPACE, "device": DEVICE, "train_command": shlex.join(plan.train_cmd()),
                     "lut_command": shlex.join(plan.lut_cmd()), "work": str(work),
                     "finetune_recipe": "nas-extract's: AdamW lr 5e-4 cosine to 5e-6, warm-up 0.25 epoch, "
                                        "data order seed 1000+s, torch.manual_seed(s)",
                     "test_images": len(splits.test)},
        "supernet": {"path": str(run.path), "reused": train_info["reused"],
                     **{k: sup[k] for k in ("val_acc_largest", "val_acc_smallest", "test_acc_largest",
                                            "train_seconds") if k in sup}},
        "lut": {"path": str(lut_path), "reused": lut_info["reused"], "describe": lut.describe(),
                "statistic": lut.statistic},
        "ranges": ranges, "rows": rows, "verdicts": [r["verdict"] for r in rows], "seconds": seconds,
        "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
    })
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f"\nwrote {out}")


if __name__ == "__main__":
    main()
