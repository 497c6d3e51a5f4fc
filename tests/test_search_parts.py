"""Tests of the search's parts without processes: the strategy registry, the space's optuna encoding
and stage builder, and the reports (CSV through pandas, the self-contained plotly page).

Real optuna trials (in-memory studies), real files; nothing is mocked.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from nas.objectives import Budgets
from nas.report import write_csv, write_pareto_csv, write_pareto_html
from nas.search import (Candidate, SearchSettings, SearchStrategy, get_strategy, register_strategy,
                        strategy_names)
from search_spaces import ArchConfig, BlockConfig, SearchSpace, get_space, list_spaces
from search_spaces.errors import NasUserError, SpaceError
from search_spaces.space import build_stage


# ============================================================================ registry
def test_registry_holds_the_strategies_behind_one_protocol() -> None:
    assert strategy_names() == ["gumbel", "nsga2", "slim"]
    for name in strategy_names():
        strategy = get_strategy(name)
        assert strategy.name == name
        assert isinstance(strategy.uses_study, bool)
        assert callable(strategy.run)
    assert get_strategy("nsga2").uses_study and not get_strategy("slim").uses_study
    assert not get_strategy("gumbel").uses_study and callable(get_strategy("gumbel").check)


@pytest.mark.parametrize("bad", ["greedy", "", "SLIM", "nsga"])
def test_unknown_strategy_lists_the_known_names(bad: str) -> None:
    with pytest.raises(NasUserError, match=r"--strategy must be one of \['gumbel', 'nsga2', 'slim'\], got"):
        get_strategy(bad)
    with pytest.raises(NasUserError, match=r"one of \['gumbel', 'nsga2', 'slim'\]"):
        SearchSettings(strategy=bad)


def test_a_name_registers_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("slim")(lambda: get_strategy("slim"))


def test_strategies_satisfy_the_protocol_signature() -> None:
    import inspect

    want = inspect.signature(SearchStrategy.run)
    for name in strategy_names():
        got = inspect.signature(type(get_strategy(name)).run)
        assert list(got.parameters) == list(want.parameters), name
        for p in ("progress", "storage"):
            assert got.parameters[p].kind is inspect.Parameter.KEYWORD_ONLY


# ============================================================================ stage builder and optuna encoding
def test_build_stage_puts_attention_last() -> None:
    st = build_stage(64, [4, 3, 2, 4], plain_mixer="ffn", attn_mixers=["lite", "attn"])
    assert [b.mixer for b in st.blocks] == ["ffn", "ffn", "lite", "attn"]
    assert [b.expansion for b in st.blocks] == [4, 3, 2, 4] and st.width == 64
    assert build_stage(8, [2], plain_mixer="pool").blocks == (BlockConfig("pool", 2),)
    with pytest.raises(SpaceError, match="cannot hold 2 attention blocks"):
        build_stage(8, [2], plain_mixer="ffn", attn_mixers=["attn", "attn"])


@pytest.mark.parametrize("space_name", list_spaces())
def test_encode_decode_round_trip_every_space(space_name: str) -> None:
    space = get_space(space_name)
    for arch in [space.largest(), space.smallest(), *(space.sample(s) for s in range(30))]:
        assert space.decode(space.encode(arch)) == arch


@pytest.mark.parametrize("space_name", ["efficientformer_v2_demo", "efficientformer_v2", "efficientformer"])
def test_suggest_through_real_optuna_trials_stays_in_the_space(space_name: str) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = get_space(space_name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []

    def objective(trial: optuna.trial.Trial) -> float:
        arch = space.suggest(trial)
        assert space.why_not(arch) is None
        # the stored parameters decode to the same config (a resumed study rebuilds it from them)
        assert space.decode(trial.params) == arch
        seen.append(arch)
        return 0.0

    study.optimize(objective, n_trials=20)
    assert len({a.hash for a in seen}) > 10
    # a trial fixed to an encoded config suggests exactly that config
    target = space.sample(7)
    assert space.suggest(optuna.trial.FixedTrial(space.encode(target))) == target


def test_decode_clamps_the_attention_count_to_the_depth() -> None:
    space = get_space("efficientformer_v2")
    params = space.encode(space.largest())
    params["s2.depth"] = space.stages[2].depths[0]
    params["s2.attn"] = 99
    arch = space.decode(params)
    st, ch = arch.stages[2], space.stages[2]
    assert sum(b.mixer != ch.plain_mixer for b in st.blocks) == min(ch.max_attn, st.depth)


# ============================================================================ reports
def _candidates(space: SearchSpace, n: int = 8) -> list[Candidate]:
    budgets = Budgets.parse(["2ms"], default_device="dev", max_params="3M")
    out = []
    for i in range(n):
        arch = space.sample(i)
        lat, params = 1.0 + 0.25 * i, 1_000_000 + 300_000 * i
        out.append(Candidate(arch, 0.5 + 0.04 * i - 0.01 * (i % 3), params, 10_000_000, {"dev": lat},
                             budgets.violations(latency_ms={"dev": lat}, params=params, macs=0), 50.0 - i))
    return out


def test_pareto_html_is_one_offline_file_with_the_data(tmp_path: Path) -> None:
    space = get_space("efficientformer_v2_demo")
    cands = _candidates(space)
    best = max((c for c in cands if c.feasible), key=lambda c: c.accuracy)
    page = write_pareto_html(tmp_path / "pareto.html", cands, "dev", budget_ms=2.0,
                             budgets_text="dev <= 2 ms, params <= 3M", source="measured-lut", best=best).read_text()
    # self-contained: plotly.js inlined, no script or stylesheet fetched from anywhere
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.I), "a script is loaded from a URL"
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?https?:", page, flags=re.I)
    assert "Plotly.newPlot" in page and len(page) > 1_000_000  # the library itself is in the file
    # the data: every architecture (hover text), accuracy in %, the budget line, the chosen subnet
    figure = json.loads(re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*\{", page, flags=re.S).group(1))
    points = {arch: (x, y, params) for trace in figure if trace["mode"] == "markers"
              for x, y, (params, arch) in zip(trace["x"], trace["y"], trace["customdata"])}
    assert set(points) == {c.arch.to_string() for c in cands}
    for c in cands:
        x, y, params = points[c.arch.to_string()]
        assert (x, params) == (c.latency_ms["dev"], c.params) and y == pytest.approx(100 * c.accuracy)
    (chosen,) = [t for t in figure if t["name"] == "chosen"]
    assert chosen["customdata"] == [[best.params, best.arch.to_string()]] and chosen["marker"]["symbol"] == "star"
    assert "budget 2 ms" in page and "dev &lt;= 2 ms, params &lt;= 3M" in page
    assert f"<code>{best.arch.to_string()}</code>" in page   # the chosen subnet, readable without JavaScript


def test_pareto_html_without_candidates(tmp_path: Path) -> None:
    page = write_pareto_html(tmp_path / "p.html", [], "dev", budget_ms=None, budgets_text="no budgets",
                             source="predicted", best=None).read_text()
    assert "No candidates" in page and "<script" not in page


def test_csv_reports_read_back(tmp_path: Path) -> None:
    space = get_space("efficientformer_v2_demo")
    cands = _candidates(space)
    write_pareto_csv(tmp_path / "pareto.csv", cands, "dev")
    with open(tmp_path / "pareto.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["latency_ms[dev]"]) for r in rows] == sorted(c.latency_ms["dev"] for c in cands)
    assert {r["feasible"] for r in rows} == {"True", "False"} and {r["pareto"] for r in rows} <= {"True", "False"}
    by_hash = {c.arch.hash: c for c in cands}
    for r in rows:
        c = by_hash[r["arch_hash"]]
        assert float(r["accuracy"]) == c.accuracy and int(r["params"]) == c.params
        assert ArchConfig.from_string(r["arch"]) == c.arch
    write_csv(tmp_path / "path.csv", [{"step": 0, "action": "start", "a": 1.5}, {"step": 1, "action": "x", "b": 2}])
    with open(tmp_path / "path.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"step": "0", "action": "start", "a": "1.5", "b": ""}, {"step": "1", "action": "x", "a": "", "b": "2"}]
