"""``nas-search --strategy gumbel``: EfficientFormer (V1)'s latency-driven slimming on the V1 demo space.

A V1 supernet is trained here (1 epoch of synthetic data at 32 px) and profiled on this machine,
once for the module; each test works in its own copy.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402

V1_TRAIN = ("--space", "efficientformer_demo", "--dataset", "synthetic:512", "--resolution", "32", "--epochs", "1",
            "--batch-size", "64", "--threads", "1", "--out", F.RUN, "--no-progress")


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("v1")
    for name, args in (("nas-train", V1_TRAIN), ("nas-build-lut", ("--device", F.DEVICE, "--validate", "4",
                                                                     "--no-progress"))):
        r = F.cli(name, *args, cwd=d, timeout=600)
        assert r.returncode == 0, F.describe(r)
    return d


def _one_hot(logits, arch) -> None:  # noqa: ANN001
    """Set ``logits`` so that ``arch`` (its blocks in the leading slots) has probability ~1."""
    space = logits.space
    with torch.no_grad():
        for si, (ch, st, ops) in enumerate(zip(space.stages, arch.stages, logits.ops)):
            n = ch.depths[-1]
            o = [ops.index(b.mixer) for b in st.blocks] + [0] * (n - len(st.blocks))
            e = [ch.expansions.index(b.expansion) for b in st.blocks] + [0] * (n - len(st.blocks))
            logits.width_logits[si].fill_(-60.0)
            logits.width_logits[si][ch.widths.index(st.width)] = 60.0
            logits.op_logits[si].fill_(-60.0)
            logits.exp_logits[si].fill_(-60.0)
            for j in range(n):
                logits.op_logits[si][j, o[j]] = 60.0
                logits.exp_logits[si][j, e[j]] = 60.0


def test_expected_costs_are_exact_for_one_hot_choices(v1: Path) -> None:
    """The relaxation's expected latency and params equal the LUT's prediction and the exact count of a config."""
    from latency import LatencyTable, predict_latency
    from latency.predict import block_ms
    from nas.gumbel import ArchLogits, cost_tables
    from search_spaces import count_params, lower
    from search_spaces.kinds import trace
    from supernet.run import load_run

    space = load_run(v1 / F.RUN).space
    lut = LatencyTable.load(v1 / F.LUT_NAME)
    logits = ArchLogits(space)
    tables = cost_tables(logits, lut.setup, {"ms": lambda s: block_ms(s, lut),
                                             "params": lambda s: float(trace(s).params)})
    archs = [space.largest(), space.smallest(), *(space.sample(seed) for seed in range(40))]
    assert any(len(a.stages[-1].blocks) > 1 and a.stages[-1].blocks[0].mixer != a.stages[-1].blocks[-1].mixer
               for a in archs), "some configs must mix plain and attention blocks in the last stage"
    for arch in archs:
        _one_hot(logits, arch)
        assert logits.decode(logits.most_probable())[0] == arch
        with torch.no_grad():
            ms = float(tables["ms"].expected(logits)) + lut.calibration.offset_ms
            params = float(tables["params"].expected(logits))
        assert ms == pytest.approx(predict_latency(arch, lut), rel=1e-5), arch.to_string()
        assert params == pytest.approx(count_params(lower(arch, lut.setup)), rel=1e-6), arch.to_string()


def test_gumbel_search_as_typed_honours_both_budgets(v1: Path, tmp_path: Path) -> None:
    from latency import LatencyTable, predict_latency
    from search_spaces import count_params, lower
    from search_spaces.subnet_file import SubnetFile
    from supernet.run import load_run

    d = F.copy_workdir(v1, tmp_path / "w")
    space = load_run(d / F.RUN).space
    lut = LatencyTable.load(d / F.LUT_NAME)
    setup = lut.setup
    lo, hi = predict_latency(space.smallest(), lut), predict_latency(space.largest(), lut)
    p_lo, p_hi = (count_params(lower(a, setup)) for a in (space.smallest(), space.largest()))
    budget_ms, budget_params = lo + 0.4 * (hi - lo), int(p_lo + 0.5 * (p_hi - p_lo))
    weights = (d / F.RUN / "supernet.safetensors").read_bytes()
    r = F.cli("nas-search", "--latency", f"{budget_ms:.4f}ms", "--max-params", str(budget_params),
              "--strategy", "gumbel", "--gumbel-steps", "25", "--gumbel-lr", "0.08", "--gumbel-penalty", "3", "--val-images", "100", "--calib-batches", "1",
              "--threads", "1", cwd=d, timeout=600)
    assert r.returncode == 0, F.describe(r)
    assert "Traceback" not in r.stderr
    sub = SubnetFile.load(d / "subnet.json")
    ms, params = predict_latency(sub.arch, lut), count_params(sub.specs())
    assert ms <= budget_ms and params <= budget_params, (ms, params, budget_ms, budget_params)
    assert sub.metrics["params"] == params and sub.metrics["latency_ms"][F.DEVICE]["value"] == pytest.approx(ms)
    assert sub.provenance["search"]["strategy"] == "gumbel"
    summary = json.loads((d / "runs" / "search" / "search.json").read_text())
    assert summary["mode"] == "gumbel" and summary["settings"]["gumbel_steps"] == 25
    assert (summary["settings"]["gumbel_lr"], summary["settings"]["gumbel_penalty"]) == (0.08, 3.0)
    assert summary["expected[params]"] > 0 and f"expected[latency:{F.DEVICE}]" in summary
    with open(d / "runs" / "search" / "path.csv", newline="") as fh:
        path = list(csv.DictReader(fh))
    assert path[0]["action"] == "most probable" and path[-1]["feasible"] == "True"
    # the most accurate feasible architecture of the path, each of which was evaluated for real
    feasible = [r for r in path if r["feasible"] == "True"]
    assert sub.arch.hash == max(feasible, key=lambda r: float(r["accuracy"]))["arch_hash"] or \
        float(sub.metrics["proxy_accuracy"]) == max(float(r["accuracy"]) for r in feasible)
    assert "gumbel step 0:" in r.stderr and "gumbel step 24:" in r.stderr   # progress of the logits' training
    assert (d / F.RUN / "supernet.safetensors").read_bytes() == weights
    # the written subnet extracts like any other
    x = F.cli("nas-extract", "subnet.json", "--formats", "safetensors", "--no-measure", cwd=d, timeout=600)
    assert x.returncode == 0, F.describe(x)


def test_gumbel_leaves_the_supernet_as_it_was_and_moves_towards_the_budget(v1: Path) -> None:
    """In-process: weights and BN statistics are restored; a binding budget pulls the expected latency down."""
    from latency import LatencyTable, predict_latency
    from latency.predict import block_ms
    from nas.gumbel import GumbelSettings, gumbel_slim
    from supernet.data import load_dataset
    from supernet.run import load_run, load_supernet

    run = load_run(v1 / F.RUN)
    net = load_supernet(run)
    lut = LatencyTable.load(v1 / F.LUT_NAME)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    splits = load_dataset("synthetic:512", resolution=32, seed=0)
    x, y = splits.train.images[:32].float() / 255.0, splits.train.labels[:32].long()
    lo, hi = predict_latency(run.space.smallest(), lut), predict_latency(run.space.largest(), lut)
    budget = lo + 0.2 * (hi - lo) - lut.calibration.offset_ms

    def violations(arch):  # noqa: ANN001, ANN202
        return {"ms": predict_latency(arch, lut) / (budget + lut.calibration.offset_ms) - 1}

    result = gumbel_slim(net, lambda step: (x, y), costs={"ms": lambda s: block_ms(s, lut)}, budgets={"ms": budget},
                         violations=violations, settings=GumbelSettings(steps=30, penalty=20.0), setup=lut.setup)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the supernet's tensors must be unchanged"
    first, last = result.history[0]["expected[ms]"], result.history[-1]["expected[ms]"]
    assert first > budget and last < first
    assert result.feasible and violations(result.arch)["ms"] <= 0
    # the budget is spent: every change of one choice towards a larger network breaks it (or was visited)
    visited = {str(row["arch"]) for row in result.path}
    for name, cand in result.logits.moves(result.choices, grow=True):
        arch = result.logits.decode(cand)[0]
        assert violations(arch)["ms"] > 0 or arch.to_string() in visited, name


def test_gumbel_refuses_a_space_of_another_family(work: F.Shared, tmp_path: Path) -> None:
    d = F.copy_workdir(work.path, tmp_path / "w")
    r = F.cli("nas-search", "--latency", "1ms", "--strategy", "gumbel", cwd=d)
    assert r.returncode == 2 and "Traceback" not in r.stderr, F.describe(r)
    assert "efficientformer" in r.stderr and "--strategy slim" in r.stderr
    assert not (d / "runs" / "search").exists(), "nothing is written before the inputs are checked"
