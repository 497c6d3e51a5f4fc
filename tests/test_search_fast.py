"""Tests of the fast slimming path: block-input reuse, halving rungs in the cache, the predictor,
combined actions, and the strategy itself.

A small supernet of the demo space (fresh weights; the figures need not be good, only exact) on
synthetic images. Latency comes from a cost model proportional to MACs (a real latency model, as a
predicted LUT is one); the CLI tests in ``test_search.py`` use measured LUTs.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.accuracy import AccuracyEvaluator
from nas.objectives import Budgets
from nas.predictor import RidgePredictor, encode, spearman
from nas.search import LatencyModel, Scorer, SearchSettings, get_strategy
from nas.strategies.slim import exhaustive_slim
from search_spaces import ArchConfig, count_macs, count_params, get_space
from search_spaces.errors import SpaceError
from supernet.data import load_dataset
from supernet.elastic import Supernet

SPACE = "efficientformer_v2_demo"


@pytest.fixture(scope="module")
def setup() -> tuple[Supernet, object]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    splits = load_dataset("synthetic:400", resolution=32, seed=0, val_size=160)
    net = Supernet(get_space(SPACE).with_stem_stride(2), num_classes=splits.num_classes, resolution=32,
                   in_chans=splits.in_chans).eval()
    return net, splits


def _evaluator(setup, **kw) -> AccuracyEvaluator:
    net, splits = setup
    kw.setdefault("batch_size", 32)
    return AccuracyEvaluator(net, splits, val_images=150, calib_batches=2, calib_batch_size=32, seed=0, **kw)


def _neighbours(space, arch, n: int = 12) -> list:
    acts = space.slimming_actions(arch)
    return [a.arch for a in acts[:: max(1, len(acts) // n)]]


# ============================================================================ block-input reuse
@pytest.mark.parametrize("cache_bytes", [1 << 30, 1])
def test_suffix_evaluation_equals_full_recalibration_image_for_image(setup, cache_bytes: int) -> None:
    net, _ = setup
    space = net.space
    plain, fast = _evaluator(setup), _evaluator(setup, prefix_cache_bytes=cache_bytes)
    anchor = space.largest()
    fast.set_anchor(anchor)
    archs = [anchor, *_neighbours(space, anchor, 5)]
    archs += _neighbours(space, archs[3], 2) + [space.sample(1)]   # two steps away, and unrelated
    for arch in archs:
        want = plain.correct(arch, plain.n_images)
        assert plain.runner is None and len(want) == 150
        got = fast.correct(arch, fast.n_images)
        assert np.array_equal(got, want), arch.to_string()
        assert fast.cached(arch) == plain(arch) == pytest.approx(want.mean())
    runner = fast.runner
    if cache_bytes > 1:
        assert runner.blocks_run < runner.blocks_total, "no block was reused"
        assert runner.kept_bytes() > 0
    else:
        assert runner.kept_bytes() == 0


def test_partial_evaluations_are_leading_whole_batches(setup) -> None:
    net, _ = setup
    space = net.space
    plain, fast = _evaluator(setup), _evaluator(setup, prefix_cache_bytes=1 << 30)
    fast.set_anchor(space.largest())
    assert [fast.rung_images(n) for n in (1, 32, 33, 100, 149, 5000)] == [32, 32, 64, 128, 150, 150]
    arch = _neighbours(space, space.largest())[2]
    part = fast.correct(arch, 50)
    assert len(part) == 64 and fast.evaluated == 1 + 1   # the anchor's own run counts too
    assert np.array_equal(part, plain.correct(arch, 150)[:64])
    assert fast.cached(arch) is None, "a partial evaluation is not an accuracy on every image"
    assert np.array_equal(fast.correct(arch, 32), part[:32]) and fast.evaluated == 2   # served from the first
    # a later rung extends the recalibrated subnet with the next images only: same figures as from scratch
    blocks = fast.runner.blocks_run
    assert np.array_equal(fast.correct(arch, 150), plain.correct(arch, 150))
    assert fast.runner.blocks_run == blocks, "the extension recalibrated the subnet again"
    assert fast.cached(arch) == plain(arch)


def test_loss_is_the_mean_cross_entropy_on_the_same_images(setup, tmp_path: Path) -> None:
    """What the fast path's predictor learns: the suffix runner's losses (a partial run, then its extension)
    equal a plain recalibrated run's, image for image; the cache keeps them exactly (a rerun's predictor
    learns what the first run's did), and a row written without them (an older cache) gives none."""
    from supernet.bn import recalibrate_bn
    from supernet.data import make_loader

    net, _ = setup
    space = net.space
    path = tmp_path / "accuracy_cache.jsonl"
    plain, fast = _evaluator(setup), _evaluator(setup, prefix_cache_bytes=1 << 30, cache_path=path, identity="w")
    fast.set_anchor(space.largest())
    arch = _neighbours(space, space.largest())[2]
    model = recalibrate_bn(net.get_active_subnet(arch).to(memory_format=torch.channels_last), None, plain.calib)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in make_loader(plain.val, batch_size=32, shuffle=False, seed=0,
                                                              channels_last=True)])
    loss = -logits.log_softmax(dim=-1)[torch.arange(150), plain.val.labels].numpy()
    assert fast.loss(arch, 32) is None   # not evaluated yet
    fast.correct(arch, 50)
    assert fast.loss(arch, 64) == pytest.approx(loss[:64].mean(), rel=1e-5)
    assert fast.loss(arch, 32) == pytest.approx(loss[:32].mean(), rel=1e-5)
    assert fast.loss(arch, 150) is None   # only 64 images so far
    fast.correct(arch, 150)   # the extension adds the next images' losses to the first ones
    assert fast.loss(arch, 150) == pytest.approx(loss.mean(), rel=1e-5)
    plain(arch)
    assert plain.loss(arch, 150) == pytest.approx(loss.mean(), rel=1e-5) and loss.mean() > 0
    again = _evaluator(setup, prefix_cache_bytes=1 << 30, cache_path=path, identity="w")
    assert again.cached(arch) == fast.cached(arch) and again.evaluated == 0
    assert again.loss(arch, 150) == fast.loss(arch, 150) and again.loss(arch, 64) == fast.loss(arch, 64)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all("loss" in r for r in rows)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "loss"}) + "\n" for r in rows))
    older = _evaluator(setup, prefix_cache_bytes=1 << 30, cache_path=path, identity="w")
    assert older.cached(arch) == fast.cached(arch) and older.loss(arch, 150) is None


def test_cache_file_keeps_partial_rows_apart(setup, tmp_path: Path) -> None:
    net, _ = setup
    space = net.space
    path = tmp_path / "accuracy_cache.jsonl"
    ev = _evaluator(setup, prefix_cache_bytes=1 << 30, cache_path=path, identity="w1")
    ev.set_anchor(space.largest())
    small, full = _neighbours(space, space.largest())[1:3]
    ev.correct(small, 32)
    ev.correct(full, 150)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    settings = {r["hash"]: r["setting"] for r in rows}
    assert settings[small.hash] == ev.setting + "|images=32" and settings[full.hash] == ev.setting
    assert len(rows) == ev.evaluated
    again = _evaluator(setup, prefix_cache_bytes=1 << 30, cache_path=path, identity="w1")
    assert again.cached(full) == ev.cached(full) and again.cached(small) is None
    assert np.array_equal(again.correct(small, 32), ev.correct(small, 32)) and again.evaluated == 0
    other = _evaluator(setup, cache_path=path, identity="w2")   # other weights: nothing is reused
    assert len(other) == 0


# ============================================================================ predictor
def test_ridge_predictor_ranks_a_noisy_linear_accuracy() -> None:
    rng = np.random.default_rng(0)
    space = get_space("efficientformer_v2")
    archs = [space.sample(i) for i in range(120)]
    x = np.stack([encode(space, a) for a in archs])
    w = rng.normal(size=x.shape[1])
    y = (x - x.mean(0)) / (x.std(0) + 1e-9) @ w * 0.01 + rng.normal(scale=0.002, size=len(archs))
    model = RidgePredictor.fit_loo(x[:80], y[:80])
    assert spearman(model.predict(x[80:]), y[80:]) > 0.8
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="alpha"):
        RidgePredictor.fit(x, y, alpha=0)


# ============================================================================ combined actions
def test_non_conflicting_actions_combine_and_conflicts_are_refused() -> None:
    space = get_space("efficientformer_v2")
    arch = space.largest()
    acts = space.slimming_actions(arch)
    picked = []
    for a in sorted(acts, key=lambda a: (a.block < 0, a.stage)):   # block actions first, then whole stages
        if not any(a.conflicts(p) for p in picked):
            picked.append(a)
    assert len(picked) > 8
    both = space.combine(arch, picked)
    assert space.contains(both)
    for a in picked:   # each action's change is in the combination
        if a.block < 0:
            assert both.stages[a.stage] == a.arch.stages[a.stage]
        else:
            assert both.stages[a.stage].blocks[a.block] == a.arch.stages[a.stage].blocks[a.block]
    width = next(a for a in acts if a.block < 0 and a.stage == 2)
    same_stage = next(a for a in acts if a.stage == 2 and a is not width)
    assert width.conflicts(same_stage) and same_stage.conflicts(width)
    with pytest.raises(SpaceError, match="conflict"):
        space.combine(arch, [width, same_stage])


# ============================================================================ the strategy
def _scorer(setup, evaluator, budget_fraction: float = 0.5) -> Scorer:
    net, _ = setup
    space = net.space

    def ms(arch) -> float:   # a cost model: 1 ms per 10M MACs
        return count_macs(net.lower(arch)) / 1e7

    lo, hi = ms(space.smallest()), ms(space.largest())
    p_hi = count_params(net.lower(space.largest()))
    budgets = Budgets.parse([f"{lo + budget_fraction * (hi - lo):.6f}ms"], default_device="model",
                            max_params=str(int(0.9 * p_hi)))
    return Scorer(space=space, accuracy=evaluator, budgets=budgets, primary_device="model", lower=net.lower,
                  latency={"model": LatencyModel("model", ms, "predicted")})


def test_fast_slim_walks_a_greedy_path_of_real_evaluations(setup) -> None:
    net, _ = setup
    fast = _evaluator(setup, prefix_cache_bytes=1 << 30)
    scorer = _scorer(setup, fast)
    settings = SearchSettings(top_k=3, explore=1, rung_images=32, max_combine=3, far=0.1, extra_steps=1)
    out = get_strategy("slim").run(scorer, settings)
    assert out.best is not None and out.best.feasible
    plain = _evaluator(setup)
    for row in out.path:   # every figure on the path is a real evaluation on every image
        arch = next(c.arch for c in out.candidates if c.arch.hash == row["arch_hash"])
        assert row["accuracy"] == plain(arch)
    assert out.best.accuracy == plain(out.best.arch)
    assert all(fast.cached(c.arch) == c.accuracy for c in out.candidates)
    assert out.stats["mode"] == "fast" and out.stats["rungs"] == "32,64,128,150"
    assert out.stats["actions_evaluated"] < out.stats["actions_considered"]
    assert out.stats["predictor_held_out"] > 0 and out.stats["predictor_target"].startswith("validation loss")
    assert "predictor_spearman_accuracy" in out.stats
    # crossing the budget, the feasible actions competed by accuracy; the winner is a real candidate
    assert out.stats["feasible_pick_actions"] > 0
    on_path = {r["arch_hash"] for r in out.path}
    assert any(c.feasible and c.arch.hash not in on_path for c in out.candidates), "no feasible pick off the path"
    assert any(" + " in str(r["action"]) for r in out.path), "no step combined actions while far from budget"
    steps = [r for r in out.path[1:]]
    assert all(r["mes"] > p["mes"] for p, r in zip(out.path, steps)), "MES must grow at every step"


def test_far_steps_evaluate_half_and_combine_the_predictors_next_actions(setup, caplog) -> None:
    """Far from the budgets, a step after the warm-up gives only half of --top-k and --explore (rounded up) a
    real evaluation, and its combination goes on past the evaluated actions with those the predictor ranks
    next; near them, a step evaluates the full --top-k + --explore."""
    import logging

    net, _ = setup
    space = net.space
    fast = _evaluator(setup, prefix_cache_bytes=1 << 30)
    scorer = _scorer(setup, fast, 0.05)
    settings = SearchSettings(top_k=4, explore=2, rung_images=32, max_combine=6, far=0.1, extra_steps=0)
    with caplog.at_level(logging.DEBUG, logger="nas.strategies.slim_fast"):
        out = get_strategy("slim").run(scorer, settings)
    assert out.best is not None and out.best.feasible
    counts = [tuple(int(x) for x in m.groups()) for m in
              (re.search(r"slim step (\d+): (\d+) actions, (\d+) evaluated, (\d+) applied", r.getMessage())
               for r in caplog.records) if m]
    assert len(counts) == len(out.path) - 1

    def violation(row) -> float:
        cand = scorer.with_accuracy(ArchConfig.from_string(row["arch"]), math.nan)
        return max(cand.violations.values(), default=0.0)

    far = [(c, out.path[c[0] - 1]) for c in counts[1:] if violation(out.path[c[0] - 1]) > 0.1]
    near = [c for c in counts[1:] if violation(out.path[c[0] - 1]) <= 0.1]
    assert far and near, counts
    assert all(c[2] <= 2 + 1 for c, _ in far), counts            # ceil(4/2) + ceil(2/2)
    assert all(c[2] == min(c[1], 4 + 2) for c in near), counts
    unevaluated = []
    for (step, _, _, applied), prev in far:
        if applied < 2:
            continue
        row = out.path[step]
        by_name = {a.name: a for a in space.slimming_actions(ArchConfig.from_string(prev["arch"]))}
        unevaluated += [n for n in row["action"].split(" + ") if by_name[n].arch.hash not in fast._correct]
    assert unevaluated, "no combination went past the evaluated actions"
    assert all(r["mes"] > p["mes"] for p, r in zip(out.path, out.path[1:]))
    assert all(fast.cached(c.arch) == c.accuracy for c in out.candidates)


@pytest.mark.parametrize("exhaustive", [False, True], ids=["fast", "exhaustive"])
def test_slim_repeats_a_move_when_no_single_action_gains_mes(setup, exhaustive: bool) -> None:
    """Latency that is not monotone in width (as ONNX Runtime's kernels favour multiples of 16): every
    one-step width move from an aligned width times slower, two steps faster. Slimming must not stop there
    over its budget (it used to: "no subnet meets the budgets" with the smallest config well within)."""
    net, _ = setup
    space = net.space

    def ms(arch) -> float:   # 1 ms per 10M MACs, plus 1 ms for each stage whose width is not a multiple of 16
        return count_macs(net.lower(arch)) / 1e7 + sum(st.width % 16 != 0 for st in arch.stages)

    budgets = Budgets.parse([f"{1.01 * ms(space.smallest()):.6f}ms"], default_device="model")
    scorer = Scorer(space=space, accuracy=_evaluator(setup, prefix_cache_bytes=1 << 30), budgets=budgets,
                    primary_device="model", lower=net.lower, latency={"model": LatencyModel("model", ms, "predicted")})
    settings = SearchSettings(exhaustive=exhaustive, max_actions=3 if exhaustive else 0, top_k=3, explore=1,
                              rung_images=32, extra_steps=0)
    out = get_strategy("slim").run(scorer, settings)
    assert out.best is not None and out.best.feasible, f"stopped at {out.path[-1]['arch']}"
    repeated = [r["action"] for r in out.path[1:] if re.search(r"(s\d\.width) \d+->\d+ \+ \1 ", r["action"])]
    assert repeated, [r["action"] for r in out.path]
    assert all(r["mes"] > p["mes"] for p, r in zip(out.path, out.path[1:])), "MES must grow at every step"


def test_exhaustive_flag_runs_the_original_algorithm(setup) -> None:
    ev1, ev2 = _evaluator(setup, prefix_cache_bytes=1 << 30), _evaluator(setup)
    settings = SearchSettings(exhaustive=True, max_actions=3, extra_steps=0)
    a = get_strategy("slim").run(_scorer(setup, ev1, 0.9), settings)
    b = exhaustive_slim(_scorer(setup, ev2, 0.9), settings)
    assert [r["arch_hash"] for r in a.path] == [r["arch_hash"] for r in b.path]
    assert ev1.evaluated == ev2.evaluated == len(a.candidates) and ev1.evaluated_full == ev1.evaluated


def test_nsga2_surrogate_scores_hopeless_trials_with_the_predictor(setup) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ev = _evaluator(setup)
    scorer = _scorer(setup, ev, 0.3)
    settings = SearchSettings(strategy="nsga2", surrogate=True, n_trials=16, population_size=4, seed=1)
    storage = optuna.storages.InMemoryStorage()
    out = get_strategy("nsga2").run(scorer, settings, storage=storage)
    study = optuna.load_study(study_name=settings.study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    sources = [t.user_attrs["accuracy_source"] for t in trials]
    assert len(trials) == 16 and sources[:4] == ["real"] * 4 and "predicted" in sources
    assert ev.evaluated == len({t.user_attrs["arch"] for t in trials if t.user_attrs["accuracy_source"] == "real"})
    # only real evaluations are candidates, and the answer is one of them
    assert all(ev.cached(c.arch) == c.accuracy for c in out.candidates)
    assert out.best is None or ev.cached(out.best.arch) == out.best.accuracy
    assert out.stats["trials_predicted"] == sources.count("predicted") and out.stats["mode"] == "surrogate"
    # without the flag, every trial is a real evaluation
    ev2, storage2 = _evaluator(setup), optuna.storages.InMemoryStorage()
    plain = SearchSettings(strategy="nsga2", n_trials=6, population_size=4, seed=1)
    out2 = get_strategy("nsga2").run(_scorer(setup, ev2, 0.3), plain, storage=storage2)
    trials2 = optuna.load_study(study_name=plain.study_name, storage=storage2).get_trials(deepcopy=False)
    assert [t.user_attrs["accuracy_source"] for t in trials2] == ["real"] * 6
    assert len(out2.candidates) == len({t.user_attrs["arch"] for t in trials2}) == ev2.evaluated
