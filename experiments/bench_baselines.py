"""Honest baselines: does the searched subnet beat what a user could pick without searching, once fine-tuned?

On the demo supernet (``make demo``'s folder, ``--work demo``: ``runs/fmnist`` and
``lut-local-cpu-32.json``), for three joint budgets at 30 %, 50 % and 70 % of the way from the
space's smallest to its largest config (local-cpu LUT latency, and exact parameters at the same
fraction of their range; a pick must meet both), five picks are made:

``slim``
    The library's default search (greedy joint slimming, fast path), run as ``nas-search`` runs it
    (:func:`nas.search_run.run_search`, output in ``<work>/bench-baselines/slim-<pct>``). Its
    number of real evaluations ``N`` (``outcome.evaluated``: every evaluation, on part or all of
    the validation images) is the budget the two other searching methods get.
``nsga2``
    optuna's NSGA-II through ``run_search`` too, ``n_trials = N`` (population ``min(16, N // 2)``,
    so at least 2 populations), SQLite study in its folder.
``random``
    Seeded ``space.sample`` configs; those over either budget are rejected without an evaluation
    (at most ``--random-tries`` draws); ``N`` distinct feasible ones are evaluated; the most accurate wins.
``uniform``
    Uniform scaling (:meth:`SearchSpace.uniform`, the baselines of ``bench_search.py``: every choice
    at the same relative position): the largest fraction, on a grid of 201, whose config meets both budgets.
``s0-shaped``
    EfficientFormerV2-S0 (``get_preset("efficientformerv2_s0")``: widths 32/48/96/176, depths
    2/2/6/4, expansions 4,4 / 4,4 / 4,3,3,3,4,4 / 4,3,3,4, Attention4D closing stages 3 and 4)
    mapped into the space and scaled by one factor ``s`` (1.00, 0.99, ... 0.01; the largest ``s``
    that meets both budgets wins):

    * width of stage i: the allowed width nearest ``s * W * w_i / w_4`` (``W``: the widest width
      of the space's last stage), i.e. S0's width ratios to its last stage;
    * depth of stage i: the allowed depth nearest ``s * D * d_i / max(d)`` (``D``: the space's
      deepest depth), i.e. S0's depth ratios to its deepest stage (stage 3);
    * attention: a stage where S0 has attention blocks gets ``round(depth * a_i / d_i)`` of them, at
      least 1, within what the space allows, with S0's mixer (``attn``); other stages get none;
    * expansion of block j of k: S0's expansion of block ``round((j + 1) * d_i / k) - 1`` of that stage
      (so the last block, attention in S0, maps to S0's last block), times ``s``, nearest allowed.

    When no scale meets the budgets with S0's attention, the attention blocks switch to the
    stage's cheapest attention mixer (``lite``: variant ``cheapest``), then are dropped (``none``);
    the JSON says which variant and scale were used.
    At ``s = 1`` on ``efficientformer_v2_demo`` this gives ``16:ffn4 / 16:ffn4 / 32:ffn3,attn4 / 64:attn4``.

Every pick is scored alike:

* proxy accuracy: one :class:`~nas.accuracy.AccuracyEvaluator` with the setting the searches use
  (inherited weights, BN recalibrated on the same ``--calib-batches`` training batches, the same
  first ``--val-images`` validation images);
* params (exact, the supernet's lowering), LUT latency, and latency **measured** end to end with
  ONNX Runtime on 1 thread (``bench_search.measure_round_robin``: ``--rounds`` round-robin rounds,
  each model's quietest round, in the LUT's statistic);
* fine-tuned test accuracy: the static model (``net.get_active_subnet``) with BN recalibrated,
  fine-tuned from the inherited weights for ``--finetune-epochs`` with the recipe of
  ``nas-extract --finetune-epochs`` (``train_static``, lr 5e-4 to 5e-6, warm-up 0.25 epoch),
  once per seed (``--seeds``, default 0,1,2: ``recipe.seed`` and ``torch.manual_seed``), then top-1
  on the test split; mean and sample std over the seeds. A config picked twice (by two methods or
  at two budgets) is fine-tuned once per seed and its figures are shared.

Verdicts: method A beats B when the mean difference exceeds the spread
``sqrt(std_A^2 + std_B^2)``; every comparison of ``slim`` and ``nsga2`` with each baseline (and
with each other) is written as a sentence, also when it does not beat it.

Teacher distillation (the second file): the teacher is the space's largest config, extracted and
fine-tuned the same way (seed 0). The student is the ``slim`` pick at the 50 % budget, fine-tuned
with the teacher (hard distillation through ``head_dist``, as ``nas-extract --teacher``) on each
seed; "without the teacher" is that pick's fine-tuning above (the same recipe and seeds, so the
same run). Reports both means, their difference and its spread.

CPU time (2 cores): ``--quick`` fine-tunes on a 6,000-image training subset, tests on 2,000 test
images, and evaluates proxies on the first 1,000 validation images with 2 calibration batches.
``nsga2`` and ``random`` get as many real evaluations as ``slim`` made at the same budget in every
mode (``--eval-cap N`` caps them, and the verdicts then say where the counts were not matched).
A slim search on 1,000 images takes 15-20 s with about 100 evaluations, most of them on part of
the images; a real evaluation of nsga2 or random, on all 1,000, about 0.5 s; a 6,000-image
fine-tuning epoch 8-13 s, 45 of them at most: 17.5 minutes in all on 2026-12-03. The full mode uses the
whole splits (5,000 validation images, 4 calibration batches): expect one to two hours.
``--smoke`` is for a tiny synthetic run folder only (256 training, 200 test and at most 200
validation images, 1 calibration batch, 8 evaluations, 1 latency round).

    python experiments/bench_baselines.py [--quick | --smoke] [--work demo] [--supernet RUN] [--lut FILE]
        [--threads 2] [--json experiments/results/baselines.json] [--teacher-json experiments/results/teacher.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.bench_ranking import subset  # noqa: E402
from experiments.bench_search import measure_round_robin  # noqa: E402
from latency import LatencyTable, predict_latency  # noqa: E402
from latency.lut import default_lut_path  # noqa: E402
from nas.accuracy import AccuracyEvaluator, load_run_splits  # noqa: E402
from nas.objectives import Budgets  # noqa: E402
from nas.search import Scorer, SearchSettings, best_feasible  # noqa: E402
from nas.search_run import NoFeasibleSubnet, SearchRunConfig, load_latency_models, run_search  # noqa: E402
from search_spaces import ArchConfig, SearchSpace, count_params, get_preset  # noqa: E402
from search_spaces.fileio import atomic_write_json  # noqa: E402
from supernet.bn import evaluate, recalibrate_bn  # noqa: E402
from supernet.data import DatasetSplits, make_loader  # noqa: E402
from supernet.elastic import Supernet  # noqa: E402
from supernet.run import SupernetRun, load_run, load_supernet  # noqa: E402
from supernet.static_train import StaticRecipe, train_static  # noqa: E402

DEVICE = "local-cpu"
METHODS = ("slim", "nsga2", "random", "uniform", "s0-shaped")
SEARCHED = ("slim", "nsga2")
BASELINES = ("random", "uniform", "s0-shaped")
S0_PRESET = "efficientformerv2_s0"
#: Fine-tuning recipe of ``nas-extract --finetune-epochs`` (its default ``--finetune-lr``).
FINETUNE_LR = 5e-4


# ============================================================================ settings and context
@dataclass(frozen=True)
class Settings:
    """What one run of the benchmark does (recorded in both JSON files)."""

    mode: str                      # "full", "quick" or "smoke"
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    val_images: int | None         # None: the whole validation split
    calib_batches: int
    train_images: int | None       # fine-tuning images (None: the whole training split)
    test_images: int | None        # None: the whole test split
    finetune_epochs: int
    eval_cap: int | None           # most evaluations nsga2 and random get (None: as many as slim)
    random_tries: int
    rounds: int
    threads: int
    teacher: bool


@dataclass
class Bench:
    """Everything the parts share: the run, its supernet and LUT, the data, the judge, the clocks."""

    settings: Settings
    run: SupernetRun
    net: Supernet
    lut: LatencyTable
    lut_path: Path
    splits: DatasetSplits          # the run's own splits (what the searches and the judge use)
    finetune: DatasetSplits        # training subset and test subset for fine-tuning and testing
    judge: AccuracyEvaluator
    out: Path                      # <work>/bench-baselines
    val_images: int
    clocks: dict[str, dict[str, float]] = field(default_factory=dict)
    tuned: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)   # (hash, seed) -> result

    @contextmanager
    def clock(self, part: str) -> Iterator[None]:
        """Add the CPU seconds (all threads of this process) and wall seconds of a block to ``part``."""
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            row = self.clocks.setdefault(part, {"cpu_s": 0.0, "wall_s": 0.0})
            row["cpu_s"] += time.process_time() - c0
            row["wall_s"] += time.perf_counter() - w0


@dataclass(frozen=True)
class Budget:
    """A joint budget: LUT latency and exact parameters, each at ``fraction`` of the space's range."""

    fraction: float
    latency_ms: float
    max_params: int
    latency_text: str

    @property
    def label(self) -> str:
        return f"{round(100 * self.fraction)}%"

    def budgets(self) -> Budgets:
        return Budgets.parse([self.latency_text], max_params=self.max_params)

    def meets(self, params: int, ms: float) -> bool:
        return ms <= self.latency_ms and params <= self.max_params


@dataclass
class Pick:
    """One method's choice at one budget; ``arch`` is ``None`` when the method found nothing feasible."""

    method: str
    arch: ArchConfig | None
    evaluated: int                 # real accuracy evaluations the method spent choosing
    search_accuracy: float | None  # the accuracy the method chose by (None: it did not evaluate)
    detail: dict[str, Any] = field(default_factory=dict)


# ============================================================================ small helpers
def figures(bench: Bench, arch: ArchConfig) -> tuple[int, float]:
    """Exact params (the supernet's lowering, as the searches count them) and LUT latency (ms)."""
    return count_params(bench.net.lower(arch)), predict_latency(arch, bench.lut)


def nearest(choices: Sequence[float], target: float) -> Any:
    """The choice nearest ``target`` (ties: the smaller one); choices are ascending."""
    return min(choices, key=lambda c: (abs(c - target), c))


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def budget_at(bench: Bench, fraction: float) -> Budget:
    """The joint budget ``fraction`` of the way from the smallest to the largest config."""
    space = bench.run.space
    (p_lo, ms_lo), (p_hi, ms_hi) = figures(bench, space.smallest()), figures(bench, space.largest())
    text = f"{DEVICE}={ms_lo + fraction * (ms_hi - ms_lo):.6f}ms"
    parsed = Budgets.parse([text])   # the same float the searches will parse from the same text
    return Budget(fraction, parsed.latency_ms[DEVICE], int(p_lo + fraction * (p_hi - p_lo)), text)


def fresh_scorer(bench: Bench, budget: Budget) -> tuple[Scorer, AccuracyEvaluator]:
    """A scorer like ``run_search``'s (same latency model, lowering, budgets) with a new evaluator of the
    judge's setting, so its real evaluations can be counted from zero."""
    ev = AccuracyEvaluator(bench.net, bench.splits, val_images=bench.val_images,
                           calib_batches=bench.settings.calib_batches, seed=SearchSettings().seed,
                           identity=bench.run.weights_sha256)
    models = load_latency_models([DEVICE], {DEVICE: bench.lut_path}, bench.run)
    return Scorer(space=bench.run.space, accuracy=ev, latency=models, budgets=budget.budgets(),
                  primary_device=DEVICE, lower=bench.net.lower), ev


# ============================================================================ the five picks
def search_pick(bench: Bench, budget: Budget, strategy: str, n_trials: int | None = None) -> Pick:
    """``slim`` or ``nsga2`` run as ``nas-search`` runs it, from a cold start in its own folder."""
    out = bench.out / f"{strategy}-{round(100 * budget.fraction)}"
    shutil.rmtree(out, ignore_errors=True)   # a leftover accuracy cache or study would hide evaluations
    kw: dict[str, Any] = {"strategy": strategy}
    if n_trials is not None:
        kw.update(n_trials=n_trials, population_size=max(2, min(SearchSettings().population_size, n_trials // 2)))
    cfg = SearchRunConfig(latency=(budget.latency_text,), device=DEVICE, max_params=str(budget.max_params),
                          supernet=str(bench.run.path), luts=(str(bench.lut_path),), out=str(out),
                          val_images=bench.val_images, calib_batches=bench.settings.calib_batches,
                          settings=SearchSettings(**kw))
    detail: dict[str, Any] = {"folder": str(out), **({"n_trials": n_trials, "population_size": kw["population_size"]}
                                                     if n_trials is not None else {})}
    try:
        r = run_search(cfg)
    except NoFeasibleSubnet as exc:
        summary = json.loads((out / "search.json").read_text(encoding="utf-8"))
        return Pick(strategy, None, int(summary["evaluated"]), None, {**detail, "error": str(exc)})
    o = r.outcome
    detail.update(candidates=len(o.candidates), seconds=o.seconds,
                  **{k: o.stats.get(k) for k in ("evaluated_full", "evaluated_images", "validation_images")})
    return Pick(strategy, r.best.arch, o.evaluated, r.best.accuracy, detail)


def random_pick(bench: Bench, budget: Budget, n: int, *, seed: int = 0) -> Pick:
    """Random search: ``n`` distinct feasible samples, each really evaluated; infeasible draws are free."""
    scorer, ev = fresh_scorer(bench, budget)
    rng = random.Random(f"bench-baselines:random:{budget.fraction}:{seed}")
    seen: set[str] = set()
    tries = rejected = 0
    while ev.evaluated < n and tries < bench.settings.random_tries:
        arch = bench.run.space.sample(rng)
        tries += 1
        if arch.hash in seen:
            continue
        seen.add(arch.hash)
        if not budget.meets(*figures(bench, arch)):
            rejected += 1
            continue
        scorer(arch)
    best = best_feasible(list(scorer.seen.values()), DEVICE)
    detail = {"draws": tries, "rejected_infeasible": rejected, "distinct": len(seen)}
    return Pick("random", best.arch if best else None, ev.evaluated, best.accuracy if best else None, detail)


def uniform_pick(bench: Bench, budget: Budget, *, grid: int = 201) -> Pick:
    """The uniformly scaled config of the largest fraction that meets both budgets (no evaluation)."""
    for i in range(grid - 1, -1, -1):
        f = i / (grid - 1)
        arch = bench.run.space.uniform(f)
        if budget.meets(*figures(bench, arch)):
            return Pick("uniform", arch, 0, None, {"uniform_fraction": f})
    return Pick("uniform", None, 0, None, {"error": "no uniformly scaled config meets the budgets"})


def s0_shaped(space: SearchSpace, preset: ArchConfig, scale: float, *, attention: str = "s0") -> ArchConfig:
    """``preset``'s shape mapped into ``space`` at ``scale`` (see the module docstring for the mapping).

    ``attention``: ``"s0"`` (the preset's mixer where the space allows it), ``"cheapest"`` (the
    stage's cheapest attention mixer) or ``"none"`` (as few attention blocks as the stage allows).
    """
    if len(preset.stages) != len(space.stages):
        raise ValueError(f"{len(preset.stages)} preset stages for {len(space.stages)} space stages")
    top_width = space.stages[-1].widths[-1]
    top_depth = max(ch.depths[-1] for ch in space.stages)
    deepest = max(preset.depths)
    stages = []
    for ch, st in zip(space.stages, preset.stages):
        width = nearest(ch.widths, scale * top_width * st.width / preset.stages[-1].width)
        depth = nearest(ch.depths, scale * top_depth * st.depth / deepest)
        s0_attn = [b.mixer for b in st.blocks if b.mixer != ch.plain_mixer]
        allowed = ch.attn_range(depth)
        n_attn = allowed.start
        if s0_attn and attention != "none" and ch.attn_mixers:
            n_attn = min(max(1, round(depth * len(s0_attn) / st.depth), allowed.start), allowed.stop - 1)
        mixer = s0_attn[-1] if s0_attn and s0_attn[-1] in ch.attn_mixers and attention == "s0" else \
            (ch.attn_mixers[0] if ch.attn_mixers else "")
        exps = [nearest(ch.expansions, scale * st.blocks[round((j + 1) * st.depth / depth) - 1].expansion)
                for j in range(depth)]
        stages.append(ch.stage(width, exps, [mixer] * n_attn))
    return space.check(ArchConfig(space.family, tuple(stages), space.stem_stride, space.head_widths, space.head_dim))


def s0_pick(bench: Bench, budget: Budget) -> Pick:
    """The largest-scale S0-shaped config that meets both budgets (no evaluation)."""
    space, preset = bench.run.space, get_preset(S0_PRESET)
    if preset.family != space.family:
        return Pick("s0-shaped", None, 0, None, {"error": f"space family {space.family} is not S0's {preset.family}"})
    for attention in ("s0", "cheapest", "none"):
        for i in range(100, 0, -1):
            arch = s0_shaped(space, preset, i / 100, attention=attention)
            if budget.meets(*figures(bench, arch)):
                return Pick("s0-shaped", arch, 0, None, {"scale": i / 100, "attention": attention})
    return Pick("s0-shaped", None, 0, None, {"error": "no S0-shaped config meets the budgets"})


def picks_at(bench: Bench, budget: Budget) -> dict[str, Pick]:
    """The five picks at one budget, each timed."""
    picks: dict[str, Pick] = {}
    with bench.clock(f"pick {budget.label} slim"):
        picks["slim"] = search_pick(bench, budget, "slim")
    n = picks["slim"].evaluated
    cap = bench.settings.eval_cap
    matched = max(2, min(n, cap) if cap else n)   # nsga2 needs 2 trials for 2 populations of 1
    with bench.clock(f"pick {budget.label} nsga2"):
        picks["nsga2"] = search_pick(bench, budget, "nsga2", n_trials=matched)
    with bench.clock(f"pick {budget.label} random"):
        picks["random"] = random_pick(bench, budget, matched)
    with bench.clock(f"pick {budget.label} uniform"):
        picks["uniform"] = uniform_pick(bench, budget)
    with bench.clock(f"pick {budget.label} s0-shaped"):
        picks["s0-shaped"] = s0_pick(bench, budget)
    for p in picks.values():
        p.detail["matched_evaluations"] = matched if p.method in ("nsga2", "random") else None
    print(f"budget {budget.label}: {budget.latency_ms:.4f} ms, {budget.max_params:,} params; slim used {n} real "
          f"evaluations, nsga2 and random get {matched}" + (f" (capped at {cap})" if cap and n > cap else ""),
          flush=True)
    return picks


# ============================================================================ scoring
def finetuned_model(bench: Bench, arch: ArchConfig, seed: int, *, teacher: torch.nn.Module | None = None
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The static model of ``arch`` (inherited weights, BN recalibrated, fine-tuned with ``seed``), its test top-1."""
    t0 = time.perf_counter()
    model = recalibrate_bn(bench.net.get_active_subnet(arch), None, bench.judge.calib)
    recipe = StaticRecipe(epochs=bench.settings.finetune_epochs, lr=FINETUNE_LR, min_lr=FINETUNE_LR / 100,
                          warmup_epochs=0.25, seed=seed, channels_last=False)
    torch.manual_seed(seed)
    train_static(model, bench.finetune, recipe, teacher=teacher, label=f"fine-tune {arch.hash} seed {seed}")
    test = evaluate(model.eval(), make_loader(bench.finetune.test, batch_size=256, shuffle=False, seed=0))
    return model, {"seed": seed, "test": test, "seconds": time.perf_counter() - t0}


def finetuned(bench: Bench, arch: ArchConfig, seed: int) -> dict[str, Any]:
    """:func:`finetuned_model`'s figures, computed once per (config, seed) and shared by every pick of it."""
    key = (arch.hash, seed)
    if key not in bench.tuned:
        bench.tuned[key] = finetuned_model(bench, arch, seed)[1]
    return bench.tuned[key]


def score(bench: Bench, budget: Budget, pick: Pick) -> dict[str, Any]:
    """Proxy accuracy, counts, LUT latency and fine-tuned test accuracy (per seed, mean, std) of a pick."""
    row: dict[str, Any] = {"method": pick.method, "evaluated": pick.evaluated, "search_accuracy": pick.search_accuracy,
                           **pick.detail}
    if pick.arch is None:
        return {**row, "arch": None}
    params, ms = figures(bench, pick.arch)
    with bench.clock("proxy accuracy"):
        proxy = bench.judge(pick.arch)
    shared = all((pick.arch.hash, s) in bench.tuned for s in bench.settings.seeds)
    with bench.clock(f"fine-tune {budget.label} {pick.method}"):
        runs = [finetuned(bench, pick.arch, s) for s in bench.settings.seeds]
    mean, std = mean_std([r["test"] for r in runs])
    return {**row, "arch": pick.arch.to_string(), "hash": pick.arch.hash, "params": params, "lut_ms": ms,
            "meets_budgets": budget.meets(params, ms), "proxy": proxy, "finetuned": runs,
            "finetuned_earlier": shared, "test_mean": mean, "test_std": std}


def compare(a: dict[str, Any], b: dict[str, Any], label: str) -> tuple[str, dict[str, Any]]:
    """Whether pick ``a`` beats pick ``b`` by more than the spread, as a sentence and as figures (points)."""
    head = f"at the {label} budget"
    if a.get("arch") is None or b.get("arch") is None:
        missing = a["method"] if a.get("arch") is None else b["method"]
        return (f"{head}: {missing} found no subnet within the budgets, so {a['method']} vs {b['method']} "
                f"cannot be compared"), {"a": a["method"], "b": b["method"], "beats": None}
    diff = 100 * (a["test_mean"] - b["test_mean"])
    spread = 100 * math.sqrt((a["test_std"] or 0.0) ** 2 + (b["test_std"] or 0.0) ** 2)
    same = a["hash"] == b["hash"]
    measured = a["test_std"] is not None and b["test_std"] is not None
    spread_text = f"spread {spread:.2f}" if measured else "one seed: no spread measured"
    beats = diff > spread
    if beats:
        text = f"{head}: {a['method']} beats {b['method']} by {diff:.2f} points ({spread_text})"
    else:
        text = f"{head}: {a['method']} does not beat {b['method']}: {diff:+.2f} points, {spread_text}"
        if same:
            text += " (both picked the same subnet)"
    return text, {"a": a["method"], "b": b["method"], "beats": beats, "difference_points": diff,
                  "spread_points": spread if measured else None, "same_subnet": same}


def verdicts_at(rows: dict[str, dict[str, Any]], label: str) -> list[tuple[str, dict[str, Any]]]:
    """slim and nsga2 against every baseline, and slim against nsga2."""
    pairs = [(s, b) for s in SEARCHED for b in BASELINES] + [("slim", "nsga2")]
    return [compare(rows[a], rows[b], label) for a, b in pairs]


def measure(bench: Bench, archs: dict[str, ArchConfig]) -> dict[str, tuple[float, float]]:
    """Measured end-to-end latency (ms, IQR ms) of each distinct config, by hash (ORT, 1 thread, round-robin)."""
    models = {h: bench.net.get_active_subnet(a).eval() for h, a in archs.items()}   # as nas-extract exports them
    shape = (1, bench.run.in_chans, bench.run.resolution, bench.run.resolution)
    return measure_round_robin(models, shape, rounds=bench.settings.rounds, statistic=bench.lut.statistic)


# ============================================================================ teacher distillation
def teacher_part(bench: Bench, student: ArchConfig, student_runs: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Fine-tune the student with the fine-tuned largest config as a hard-distillation teacher; compare."""
    largest = bench.run.space.largest()
    with bench.clock("teacher fine-tune"):
        teacher, t_row = finetuned_model(bench, largest, 0)
    teacher.eval()
    with bench.clock("student with teacher"):
        tuned = [finetuned_model(bench, student, s, teacher=teacher) for s in bench.settings.seeds]
    distilled = [row for _, row in tuned]
    has_dist = bool(getattr(tuned[0][0], "has_dist_head", False))
    plain_mean, plain_std = mean_std([r["test"] for r in student_runs])
    kd_mean, kd_std = mean_std([r["test"] for r in distilled])
    diff = 100 * (kd_mean - plain_mean)
    spread = 100 * math.sqrt((kd_std or 0.0) ** 2 + (plain_std or 0.0) ** 2)   # 0 with one seed (said below)
    who = f"the {label} slim pick ({count_params(bench.net.lower(student)):,} params)"
    spread_text = f"spread {spread:.2f}" if len(distilled) > 1 else "one seed: no spread measured"
    if diff > spread:
        text = f"distillation from the largest subnet helps {who} by {diff:.2f} points ({spread_text})"
    elif -diff > spread:
        text = f"distillation from the largest subnet hurts {who} by {-diff:.2f} points ({spread_text})"
    else:
        text = (f"distillation from the largest subnet does not help {who} beyond the spread: "
                f"{diff:+.2f} points, {spread_text}")
    teacher_text = (f"the teacher (largest config, {count_params(bench.net.lower(largest)):,} params, fine-tuned "
                    f"seed 0) reaches {100 * t_row['test']:.2f}% test accuracy")
    return {
        "teacher": {"arch": largest.to_string(), "seed": 0, **t_row, "params": count_params(bench.net.lower(largest))},
        "student": {"arch": student.to_string(), "budget": label, "has_dist_head": has_dist,
                    "distillation": "hard, through head_dist" if has_dist else "hard, one head learns both targets"},
        "without_teacher": {"runs": student_runs, "test_mean": plain_mean, "test_std": plain_std,
                            "note": "the student's fine-tuning in baselines.json (same recipe and seeds)"},
        "with_teacher": {"runs": distilled, "test_mean": kd_mean, "test_std": kd_std},
        "difference_points": diff, "spread_points": spread, "helps": diff > spread,
        "verdicts": [teacher_text, text],
    }


# ============================================================================ command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "demo"),
                   help="the folder where `make demo` ran (default: the repository's demo/); "
                        "the searches write to WORK/bench-baselines")
    p.add_argument("--supernet", help="supernet run folder (default: WORK/runs/fmnist)")
    p.add_argument("--lut", help="local-cpu LUT (default: WORK/lut-local-cpu-<resolution>.json)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="about 20 min on 2 cores: fine-tune on 6,000 training images, test on 2,000, proxy on "
                           "1,000 validation images with 2 calibration batches")
    mode.add_argument("--smoke", action="store_true",
                      help="end-to-end check on a tiny synthetic run: 256 training, 200 test, <= 200 validation "
                           "images, 1 calibration batch, 8 evaluations, 1 latency round")
    p.add_argument("--fractions", default="0.3,0.5,0.7", help="budget fractions of the space's range")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds 0..N-1 (default 3)")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--eval-cap", type=int, help="most evaluations nsga2 and random get (default: as many as slim made "
                                                "at the same budget)")
    p.add_argument("--random-tries", type=int, default=20000, help="most random draws (infeasible ones included)")
    p.add_argument("--rounds", type=int, help="latency round-robin rounds (default 3; --smoke 1)")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher-distillation part")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", default=str(ROOT / "experiments" / "results" / "baselines.json"))
    p.add_argument("--teacher-json", default=str(ROOT / "experiments" / "results" / "teacher.json"))
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = {"full": (None, 4, None, None, None), "quick": (1000, 2, 6000, 2000, None),
             "smoke": (200, 1, 256, 200, 8)}[mode]
    val, calib, train, test, cap = sizes
    fractions = tuple(float(f) for f in args.fractions.split(","))
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise SystemExit(f"--fractions must be numbers in (0, 1), got {args.fractions!r}")
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    return Settings(mode, fractions, tuple(range(args.seeds)), val, calib, train, test, args.finetune_epochs,
                    args.eval_cap if args.eval_cap is not None else cap, args.random_tries,
                    args.rounds if args.rounds is not None else (1 if mode == "smoke" else 3), args.threads,
                    not args.no_teacher)


def load_bench(args: argparse.Namespace, settings: Settings) -> Bench:
    work = Path(args.work).resolve()
    run = load_run(Path(args.supernet) if args.supernet else work / "runs" / "fmnist")
    lut_path = Path(args.lut) if args.lut else default_lut_path(DEVICE, run.resolution, work)
    lut = LatencyTable.load(lut_path)
    lut.check_compatible(device=DEVICE, resolution=run.setup.resolution, space_hash=run.space.hash,
                         task=run.setup.task)
    net = load_supernet(run)
    splits = load_run_splits(run)
    val_images = min(settings.val_images or len(splits.val), len(splits.val))
    tune = replace(splits, train=subset(splits.train, settings.train_images or len(splits.train), 0),
                   test=subset(splits.test, settings.test_images or len(splits.test), 1))
    judge = AccuracyEvaluator(net, splits, val_images=val_images, calib_batches=settings.calib_batches,
                              seed=SearchSettings().seed, identity=run.weights_sha256)
    return Bench(settings, run, net, lut, lut_path.resolve(), splits, tune, judge, work / "bench-baselines", val_images)


def print_table(budget: Budget, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\nbudget {budget.label}: LUT <= {budget.latency_ms:.4f} ms, params <= {budget.max_params:,}")
    print(f"{'pick':<10} {'params':>9} {'LUT ms':>8} {'meas. ms':>9} {'proxy':>7} {'fine-tuned test':>17} "
          f"{'evals':>6}  arch")
    for r in rows.values():
        if r.get("arch") is None:
            print(f"{r['method']:<10} {'-':>9} {'-':>8} {'-':>9} {'-':>7} {'-':>17} {r['evaluated']:>6}  "
                  f"({r.get('error', 'nothing feasible')})")
            continue
        sd = f"{100 * r['test_std']:.2f}" if r["test_std"] is not None else "-"
        acc = f"{100 * r['test_mean']:.2f} ± {sd}"
        print(f"{r['method']:<10} {r['params']:>9,} {r['lut_ms']:>8.4f} {r['measured_ms']:>9.4f} "
              f"{100 * r['proxy']:>6.2f}% {acc:>17} {r['evaluated']:>6}  {r['arch']}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    settings = make_settings(args)
    torch.set_num_threads(settings.threads)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("nas").setLevel(logging.WARNING)
    t_all, c_all = time.perf_counter(), time.process_time()
    bench = load_bench(args, settings)
    bench.clocks["load"] = {"cpu_s": time.process_time() - c_all, "wall_s": time.perf_counter() - t_all}
    space = bench.run.space
    (p_lo, ms_lo), (p_hi, ms_hi) = figures(bench, space.smallest()), figures(bench, space.largest())
    print(f"supernet {bench.run.path} ({space.name}), LUT {bench.lut_path} ({bench.lut.describe()})")
    print(f"range: {ms_lo:.4f} to {ms_hi:.4f} ms LUT, {p_lo:,} to {p_hi:,} params; mode {settings.mode}: "
          f"proxy on {bench.val_images} validation images, {settings.calib_batches} calibration batches; "
          f"fine-tune {settings.finetune_epochs} epoch(s) on {len(bench.finetune.train)} images, seeds "
          f"{list(settings.seeds)}; test on {len(bench.finetune.test)} images", flush=True)

    budgets = [budget_at(bench, f) for f in settings.fractions]
    all_picks = {b.label: picks_at(bench, b) for b in budgets}
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for b in budgets:
        table[b.label] = {}
        for m in METHODS:
            table[b.label][m] = score(bench, b, all_picks[b.label][m])
            r = table[b.label][m]
            if r.get("arch") is not None:
                print(f"  {b.label} {m}: proxy {100 * r['proxy']:.2f}%, fine-tuned test "
                      f"{100 * r['test_mean']:.2f}% over {len(r['finetuned'])} seed(s)", flush=True)

    distinct = {p.arch.hash: p.arch for ps in all_picks.values() for p in ps.values() if p.arch is not None}
    with bench.clock("latency measurement"):
        measured = measure(bench, distinct)
    verdicts: list[str] = []
    comparisons: list[dict[str, Any]] = []
    for b in budgets:
        over = []
        for r in table[b.label].values():
            if r.get("arch") is not None:
                r["measured_ms"], r["measured_iqr_ms"] = measured[r["hash"]]
                r["measured_within_budget"] = r["measured_ms"] <= b.latency_ms
                if not r["measured_within_budget"]:
                    over.append(f"at the {b.label} budget: {r['method']}'s measured latency {r['measured_ms']:.4f} ms "
                                f"is over the {b.latency_ms:.4f} ms budget (LUT {r['lut_ms']:.4f} ms)")
        print_table(b, table[b.label])
        verdicts.extend(over)
        for text, fig in verdicts_at(table[b.label], b.label):
            verdicts.append(text)
            comparisons.append({"budget": b.label, **fig})
    slim_evals = {b.label: table[b.label]["slim"]["evaluated"] for b in budgets}
    capped = [lab for lab in slim_evals if settings.eval_cap and slim_evals[lab] > settings.eval_cap]
    if capped:
        verdicts.append(f"nsga2 and random had at most {settings.eval_cap} real evaluations (--eval-cap) where slim "
                        f"used more ({', '.join(f'{lab}: {slim_evals[lab]}' for lab in capped)}): not matched there")
    print("\n" + "\n".join(f"- {v}" for v in verdicts))

    teacher_doc = None
    if settings.teacher:
        mid = min(budgets, key=lambda b: abs(b.fraction - 0.5))
        slim = table[mid.label]["slim"]
        if slim.get("arch") is None:
            print("teacher part skipped: slim found nothing at the middle budget")
        else:
            teacher_doc = teacher_part(bench, ArchConfig.from_string(slim["arch"]), slim["finetuned"], mid.label)
            print("\n" + "\n".join(f"- {v}" for v in teacher_doc["verdicts"]))

    common = {
        "settings": {**asdict(settings), "finetune_recipe": {"lr": FINETUNE_LR, "min_lr": FINETUNE_LR / 100,
                                                             "warmup_epochs": 0.25, "batch_size": 128},
                     "val_images_used": bench.val_images, "train_images_used": len(bench.finetune.train),
                     "test_images_used": len(bench.finetune.test)},
        "seeds": list(settings.seeds), "supernet": str(bench.run.path), "supernet_sha256": bench.run.weights_sha256,
        "space": space.name, "lut": str(bench.lut_path), "lut_describe": bench.lut.describe(),
        "machine": platform.platform(), "threads": settings.threads, "date": time.strftime("%Y-%m-%d"),
    }
    total = {"cpu_s": time.process_time() - c_all, "wall_s": time.perf_counter() - t_all}
    parts = {k: v for k, v in bench.clocks.items() if not k.startswith(("teacher", "student"))}
    doc = {
        **common,
        "range": {"latency_ms": [ms_lo, ms_hi], "params": [p_lo, p_hi]},
        "budgets": [{"fraction": b.fraction, "label": b.label, "latency_ms": b.latency_ms, "max_params": b.max_params,
                     "picks": table[b.label]} for b in budgets],
        "measurement": {"device": DEVICE, "rounds": settings.rounds, "statistic": bench.lut.statistic,
                        "what": "ONNX Runtime, 1 thread, quickest-median round of round-robin rounds"},
        "comparisons": comparisons, "verdicts": verdicts, "cpu_seconds": parts, "total_seconds": total,
    }
    out = atomic_write_json(Path(args.json), _finite(doc))
    print(f"\nwrote {out}")
    if teacher_doc is not None:
        t_parts = {k: v for k, v in bench.clocks.items() if k.startswith(("teacher", "student"))}
        t_out = atomic_write_json(Path(args.teacher_json), _finite({**common, **teacher_doc, "cpu_seconds": t_parts}))
        print(f"wrote {t_out}")
    print(f"total: {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} CPU s")


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as ``None`` (the JSON writer refuses them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
