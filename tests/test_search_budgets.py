"""Searches under budgets that bind, on the demo space: does the search pick a good subnet a user can trust?

The budget: latency 40% of the way from the smallest to the largest config (by the local-cpu
LUT), parameters half of the largest config's (:func:`_fixtures_search.binding_budget`; 40% of
the largest config's latency would leave nothing but the smallest config at 32 px). The largest
config violates both budgets, and about half of the space's random configs meet them.

``nas-search`` runs for real, once with ``--strategy slim`` and once with ``--strategy nsga2``,
in a private copy of the shared working folder; the slim result is extracted with ``nas-extract``
and its proxy accuracy is recomputed here, by code written here (BN recalibration and the
accuracy count), on the same images. The greedy step rule and the accuracy cache's settings are
checked in-process against an oracle written here.

Flags whose success path is checked here: ``--max-actions``, ``--extra-steps``,
``--val-images``, ``--device`` (nas-search) and ``--no-measure`` (nas-extract).
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402

from nas.objectives import Budgets, MesWeights, mes  # noqa: E402

VAL_IMAGES = 40
MAX_ACTIONS = 3
EXTRA_STEPS = 1
N_TRIALS = 12


@dataclass
class Bound:
    path: Path
    budget: F.Budget
    slim: subprocess.CompletedProcess[str]
    nsga2: subprocess.CompletedProcess[str]
    model: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def bound(work: F.Shared, tmp_path_factory: pytest.TempPathFactory) -> Bound:
    d = F.copy_workdir(work.path, tmp_path_factory.mktemp("bound") / "w")
    b = F.binding_budget(work)
    common = ["--latency", b.latency_text, "--max-params", b.params_text, "--val-images", str(VAL_IMAGES),
              "--calib-batches", "1", "--threads", "1"]
    slim = F.cli("nas-search", *common, "--max-actions", str(MAX_ACTIONS), "--extra-steps", str(EXTRA_STEPS),
                 "--out", "runs/slim", cwd=d, timeout=600)
    assert slim.returncode == 0, F.describe(slim)
    # as the README types it: a bare --latency applies to --device
    nsga2 = F.cli("nas-search", "--device", F.DEVICE, *common, "--strategy", "nsga2", "--n-trials", str(N_TRIALS),
                  "--population-size", "4", "--out", "runs/nsga2", cwd=d, timeout=600)
    assert nsga2.returncode == 0, F.describe(nsga2)
    model = F.cli("nas-extract", "runs/slim/subnet.json", "--formats", "safetensors", "--no-measure",
                  "--out", "runs/slim-model", cwd=d, timeout=600)
    assert model.returncode == 0, F.describe(model)
    return Bound(d, b, slim, nsga2, model)


def _figures(work_dir: Path, arch) -> tuple[float, int]:  # noqa: ANN001
    """Latency (the LUT, summed here) and exact params (the pure-Python counter) of ``arch``."""
    from latency import LatencyTable, predict_breakdown
    from search_spaces import count_params, lower

    lut = LatencyTable.load(work_dir / F.LUT_NAME)
    specs = lower(arch, resolution=F.RESOLUTION, num_classes=10, in_chans=3, distillation=lut.distillation)
    bd = predict_breakdown(arch, lut)
    assert [blk.key for blk in bd.blocks] == [s.key for s in specs]
    return bd.total_ms, count_params(specs)


def test_the_budget_binds(work: F.Shared, bound: Bound) -> None:
    from supernet.run import load_run

    b = bound.budget
    space = load_run(work.run_dir).space
    lat, params = _figures(work.path, space.largest())
    assert lat > b.latency_ms and params > b.params, "the largest config must violate both budgets"
    lat, params = _figures(work.path, space.smallest())
    assert lat < b.latency_ms and params < b.params, "the smallest config must meet both"
    feasible = 0
    for seed in range(300):
        lat, params = _figures(work.path, space.sample(seed))
        feasible += lat <= b.latency_ms and params <= b.params
    assert 0.15 * 300 <= feasible <= 0.85 * 300, f"{feasible} of 300 random configs meet the budget"


@pytest.mark.parametrize("strategy", ["slim", "nsga2"])
def test_the_chosen_subnet_meets_both_budgets(bound: Bound, strategy: str) -> None:
    from search_spaces.subnet_file import SubnetFile

    b = bound.budget
    out = bound.path / "runs" / strategy
    sub = SubnetFile.load(out / "subnet.json")
    lat, params = _figures(bound.path, sub.arch)
    assert lat <= b.latency_ms and params <= b.params, (lat, params, b)
    assert sub.metrics["latency_ms"][F.DEVICE]["value"] == pytest.approx(lat, rel=1e-9)
    assert sub.metrics["params"] == params
    assert sub.provenance["search"]["strategy"] == strategy
    summary = json.loads((out / "search.json").read_text())
    assert summary["budgets"] == {"latency_ms": {F.DEVICE: b.latency_ms}, "max_params": b.params, "max_macs": None}
    # the most accurate of the feasible candidates it evaluated (ties: the faster, then the smaller)
    with open(out / "pareto.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    feasible = [r for r in rows if float(r[f"latency_ms[{F.DEVICE}]"]) <= b.latency_ms and int(r["params"]) <= b.params]
    assert {r["feasible"] for r in feasible} == {"True"} and len(feasible) == summary["feasible"]
    if strategy == "slim":   # it starts from the largest config, which is over budget
        assert len(feasible) < len(rows)
    best = max(feasible, key=lambda r: (float(r["accuracy"]), -float(r[f"latency_ms[{F.DEVICE}]"]), -int(r["params"])))
    assert best["arch_hash"] == sub.arch.hash
    assert sub.metrics["proxy_accuracy"] == float(best["accuracy"])


def test_nsga2_ran_its_trials_under_the_budget(bound: Bound) -> None:
    import optuna

    study = optuna.load_study(study_name="nas-search",
                              storage=f"sqlite:///{bound.path / 'runs' / 'nsga2' / 'study.db'}")
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == N_TRIALS
    feasible = [t for t in done if all(v <= 0 for v in t.user_attrs["candidate"]["violations"].values())]
    assert feasible, "no trial met the budget"
    assert all(set(t.user_attrs["candidate"]["violations"]) == {f"latency:{F.DEVICE}", "params"} for t in done)


def test_slim_path_is_monotone_in_mes_and_ends_within_budget(bound: Bound) -> None:
    b = bound.budget
    with open(bound.path / "runs" / "slim" / "path.csv", newline="") as fh:
        path = list(csv.DictReader(fh))
    assert path[0]["action"] == "start (largest)" and path[0]["feasible"] == "False"
    assert len(path) >= 3, "a binding budget takes several slimming steps"
    scores = [float(r["mes"]) for r in path]
    assert all(a < b_ for a, b_ in zip(scores, scores[1:])), scores
    for r in path:   # the recorded MES is the documented formula of the recorded figures
        assert float(r["mes"]) == pytest.approx(mes(float(r[f"latency_ms[{F.DEVICE}]"]), int(r["params"])), rel=1e-9)
        feasible = float(r[f"latency_ms[{F.DEVICE}]"]) <= b.latency_ms and int(r["params"]) <= b.params
        assert (r["feasible"] == "True") == feasible
    assert path[-1]["feasible"] == "True"


def test_flag_extra_steps_continues_that_many_steps_after_the_budget_is_met(bound: Bound) -> None:
    with open(bound.path / "runs" / "slim" / "path.csv", newline="") as fh:
        path = list(csv.DictReader(fh))
    first = next(i for i, r in enumerate(path) if r["feasible"] == "True")
    assert len(path) - 1 - first == EXTRA_STEPS, [(r["step"], r["feasible"]) for r in path]


def test_flag_max_actions_caps_the_candidates_per_step(bound: Bound) -> None:
    out = bound.path / "runs" / "slim"
    with open(out / "path.csv", newline="") as fh:
        steps = len(list(csv.DictReader(fh))) - 1
    summary = json.loads((out / "search.json").read_text())
    assert summary["settings"]["max_actions"] == MAX_ACTIONS
    # the largest config, then at most MAX_ACTIONS new candidates per step (the demo space offers up to 19)
    assert steps + 1 <= summary["candidates"] <= 1 + MAX_ACTIONS * steps
    assert summary["evaluated"] == summary["candidates"]


def test_flag_val_images_sets_the_images_each_accuracy_counts(bound: Bound) -> None:
    with open(bound.path / "runs" / "slim" / "pareto.csv", newline="") as fh:
        accs = [float(r["accuracy"]) for r in csv.DictReader(fh)]
    assert all(abs(a * VAL_IMAGES - round(a * VAL_IMAGES)) < 1e-9 for a in accs), "accuracies are k/40"
    rows = [json.loads(ln) for ln in (bound.path / "runs" / "slim" / "accuracy_cache.jsonl").read_text().splitlines()]
    assert rows and all(f"|val={VAL_IMAGES}|calib=1x128|" in r["setting"] for r in rows), rows[0]["setting"]


def test_flag_device_names_the_device_of_a_bare_latency(bound: Bound) -> None:
    summary = json.loads((bound.path / "runs" / "nsga2" / "search.json").read_text())
    assert summary["primary_device"] == F.DEVICE and list(summary["budgets"]["latency_ms"]) == [F.DEVICE]
    assert "using device" not in bound.nsga2.stderr, "--device was given: no default to announce"
    assert "using device" in bound.slim.stderr   # without it, the only LUT here is chosen and announced


def test_flag_no_measure_skips_the_latency_measurement(bound: Bound) -> None:
    rec = json.loads((bound.path / "runs" / "slim-model" / "extract.json").read_text())
    assert "latency_ms" not in rec["metrics"]
    assert "measured" not in bound.model.stdout
    assert set(rec["files"]) == {"model.safetensors", "model.md", "subnet.json"}


# ============================================================================ proxy accuracy, recomputed here
def _normalised(split, idx: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    mean = torch.tensor(split.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(split.std, dtype=torch.float64).view(1, -1, 1, 1)
    return ((split.images[idx].double() / 255.0 - mean) / std).float()


def _recalibrate(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """BN statistics: the mean over batches of each batch's mean and unbiased variance (in train mode)."""
    sums: dict[torch.nn.Module, list] = {}

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].double()
        acc = sums.setdefault(module, [0.0, 0.0, 0])
        acc[0] = acc[0] + x.mean(dim=(0, 2, 3))
        acc[1] = acc[1] + x.var(dim=(0, 2, 3), unbiased=True)
        acc[2] += 1

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(record) for m in bns]
    model.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    for m in bns:
        s_mean, s_var, n = sums[m]
        m.running_mean.copy_((s_mean / n).float())
        m.running_var.copy_((s_var / n).float())
    model.eval()


def test_proxy_accuracy_equals_an_independent_evaluation_of_the_extracted_model(bound: Bound) -> None:
    """subnet.json's proxy accuracy, recomputed from model.safetensors: same images, same BN recalibration.

    The search recalibrates BN on ``--calib-batches`` seeded batches of 128 training images
    (seed = ``--seed``, default 0) and counts correct answers on the first ``--val-images``
    validation images. Here the same images are drawn (``calibration_batches`` picks them), and
    the recalibration, normalisation and counting are done by code written in this file.
    """
    from nas.accuracy import load_run_splits
    from nas.extract import load_subnet
    from search_spaces.subnet_file import SubnetFile
    from supernet.data import calibration_batches
    from supernet.run import load_run

    sub = SubnetFile.load(bound.path / "runs" / "slim" / "subnet.json")
    model = load_subnet(bound.path / "runs" / "slim-model")
    splits = load_run_splits(load_run(bound.path / F.RUN))
    nb = max(1, min(1, len(splits.train) // 128))   # --calib-batches 1
    batches = calibration_batches(splits.train, batch_size=128, num_batches=nb, seed=0, channels_last=True)
    _recalibrate(model, batches)
    n = min(VAL_IMAGES, len(splits.val))
    x = _normalised(splits.val, torch.arange(n))
    with torch.no_grad():
        correct = int((model(x).argmax(dim=1) == splits.val.labels[:n]).sum())
    assert abs(correct / n - sub.metrics["proxy_accuracy"]) <= 1e-6, (correct, n, sub.metrics["proxy_accuracy"])


# ============================================================================ the greedy rule, in-process
def _toy_accuracy(largest_macs: int, lower):  # noqa: ANN001, ANN202
    """A known accuracy: grows with MACs, plus a fixed per-architecture term (so drops differ per action)."""
    from search_spaces import count_macs

    def acc(arch) -> float:  # noqa: ANN001
        jitter = int(arch.hash[:4], 16) / 0xFFFF
        return 0.5 + 0.4 * math.sqrt(count_macs(lower(arch)) / largest_macs) + 0.02 * jitter
    return acc


def test_slim_takes_the_action_with_the_smallest_accuracy_drop_per_mes_gain(work: F.Shared) -> None:
    """exhaustive slim's path, step by step, against the rule of the README written out here."""
    from latency import LatencyTable, predict_latency
    from nas.search import LatencyModel, Scorer, SearchSettings
    from nas.strategies.slim import exhaustive_slim
    from search_spaces import count_macs, count_params
    from search_spaces import lower as lower_arch
    from supernet.run import load_run

    run = load_run(work.run_dir)
    space = run.space
    lut = LatencyTable.load(work.lut_path)

    def lower(arch):  # noqa: ANN001, ANN202
        return lower_arch(arch, resolution=run.resolution, num_classes=run.num_classes, in_chans=run.in_chans,
                          distillation=lut.distillation)

    acc = _toy_accuracy(count_macs(lower(space.largest())), lower)
    b = F.binding_budget(work)
    budgets = Budgets.parse([f"{F.DEVICE}={b.latency_text}"], max_params=b.params_text)
    weights = MesWeights()
    latency = {F.DEVICE: LatencyModel(F.DEVICE, lambda a: predict_latency(a, lut), "measured-lut")}
    scorer = Scorer(space=space, accuracy=acc, latency=latency, budgets=budgets, primary_device=F.DEVICE,
                    lower=lower, weights=weights)
    outcome = exhaustive_slim(scorer, SearchSettings(extra_steps=2))

    def score(arch) -> tuple[float, float, bool]:  # noqa: ANN001
        ms, params = predict_latency(arch, lut), count_params(lower(arch))
        return acc(arch), mes(ms, params, weights), ms <= b.latency_ms and params <= b.params

    expected, current, after = [space.largest()], space.largest(), 0
    while True:
        a0, m0, ok = score(current)
        if ok:
            if after == 2:
                break
            after += 1
        best = None
        for action in space.slimming_actions(current):
            a1, m1, _ = score(action.arch)
            if m1 > m0 and (best is None or (a0 - a1) / (m1 - m0) < best[0]):
                best = ((a0 - a1) / (m1 - m0), action.arch)
        if best is None:
            break
        current = best[1]
        expected.append(current)
    got = [row["arch"] for row in outcome.path]
    assert got == [a.to_string() for a in expected]
    assert len(expected) > 4, "the budget must take several steps to meet"
    assert outcome.best is not None and outcome.best.feasible
    assert outcome.best.accuracy == max(c.accuracy for c in outcome.candidates if c.feasible)


# ============================================================================ the accuracy cache and its setting
def test_cached_accuracies_count_only_under_the_same_setting(tmp_path: Path) -> None:
    """README: results are cached by architecture hash; a change of images, calibration, seed or weights drops them."""
    from nas.accuracy import AccuracyEvaluator
    from search_spaces import get_space
    from supernet import Supernet
    from supernet.data import load_dataset

    space = get_space("efficientformer_v2_demo").with_stem_stride(2)
    torch.manual_seed(0)
    net = Supernet(space, num_classes=10, resolution=32, in_chans=3)
    splits = load_dataset("synthetic:400", resolution=32, seed=0)
    assert len(splits.val) >= 30
    cache = tmp_path / "accuracy_cache.jsonl"
    archs = [space.smallest(), space.sample(3)]
    kw = {"val_images": 20, "calib_batches": 1, "calib_batch_size": 32, "seed": 0, "cache_path": cache,
          "identity": "w1"}

    first = AccuracyEvaluator(net, splits, **kw)
    values = [first(a) for a in archs]
    assert first.evaluated == 2 and len(cache.read_text().splitlines()) == 2
    again = AccuracyEvaluator(net, splits, **kw)
    assert len(again) == 2 and [again(a) for a in archs] == values and again.evaluated == 0
    for change in ({"val_images": 30}, {"calib_batches": 2}, {"seed": 1}, {"identity": "w2"}):
        other = AccuracyEvaluator(net, splits, **{**kw, **change})
        assert len(other) == 0, f"{change}: cached figures of another setting must not count"
        other(archs[0])
        assert other.evaluated == 1, change
    assert len(cache.read_text().splitlines()) == 6
    assert len(AccuracyEvaluator(net, splits, **kw)) == 2   # the first setting's rows still count for it


def test_slim_with_max_actions_does_not_give_up_while_the_budget_is_reachable(work: F.Shared) -> None:
    """Exit 3 says that nothing meets the budgets; with ``--max-actions`` slim must not stop short of a reachable budget.

    With ``--max-actions N`` slim evaluates N random actions per step. On a measured LUT a few
    slimming actions do not raise MES (a narrower block can time slower), and when every
    sampled action is one of them, slim stops there: before the budget is met, although other
    actions would raise MES and the smallest config meets the budget. ``nas-search`` then exits
    3 with "no subnet meets the budgets ... the smallest config of the space reaches <less than
    the budget>". Checked in-process on the session's LUT, for seeds 0-5 with ``max_actions=1``.
    """
    from latency import LatencyTable, predict_latency
    from nas.search import LatencyModel, Scorer, SearchSettings
    from nas.strategies.slim import exhaustive_slim
    from search_spaces import lower as lower_arch
    from supernet.run import load_run

    run = load_run(work.run_dir)
    lut = LatencyTable.load(work.lut_path)

    def lower(arch):  # noqa: ANN001, ANN202
        return lower_arch(arch, resolution=run.resolution, num_classes=run.num_classes, in_chans=run.in_chans,
                          distillation=lut.distillation)

    b = F.binding_budget(work)
    budgets = Budgets.parse([f"{F.DEVICE}={b.latency_text}"], max_params=b.params_text)
    latency = {F.DEVICE: LatencyModel(F.DEVICE, lambda a: predict_latency(a, lut), "measured-lut")}
    violations = budgets.violations(latency_ms={F.DEVICE: predict_latency(run.space.smallest(), lut)},
                                    params=b.smallest_params, macs=0)
    assert all(v <= 0 for v in violations.values()), "the smallest config meets the budget"
    gave_up = []
    for seed in range(6):
        scorer = Scorer(space=run.space, accuracy=lambda a: 0.5, latency=latency, budgets=budgets,
                        primary_device=F.DEVICE, lower=lower)
        outcome = exhaustive_slim(scorer, SearchSettings(max_actions=1, extra_steps=0, seed=seed))
        if outcome.best is None:
            gave_up.append(f"seed {seed}: stopped after {len(outcome.path) - 1} steps at {outcome.path[-1]['arch']} "
                           f"({outcome.path[-1][f'latency_ms[{F.DEVICE}]']:.3f} ms)")
    assert not gave_up, (f"slim gave up with the budget ({b.latency_text}, {b.params_text}) reachable "
                         f"(smallest config {b.smallest_ms:.3f} ms):\n" + "\n".join(gave_up))
