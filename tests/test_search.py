"""Tests of the search: budgets in human units, MES, and ``nas-search`` as users type it.

The command-line tests run real ``nas-search`` processes (real optuna studies in SQLite, real
files) on the shared working folder of conftest (a supernet trained on synthetic data for one
epoch and a local-cpu LUT measured here): the default search is read from the read-only
``searched`` folder, and every other command runs in a private copy. Nothing is mocked and
nothing asserts on a timing. Budgets that bind hard are in test_search_budgets.py.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402

from nas.objectives import Budgets, MesWeights, mes  # noqa: E402
from nas.search import Candidate, arch_from_params, pareto_front  # noqa: E402
from search_spaces import ArchConfig, get_space  # noqa: E402
from search_spaces.errors import NasUserError  # noqa: E402


# ============================================================================ budgets and units
@pytest.mark.parametrize("text", ["1.6ms", "1600us", "0.0016s", "1600000ns", "1.6 ms", " 1.6ms ", "1.6MS", "16e-1ms"])
def test_latency_units_parse_to_milliseconds(text: str) -> None:
    b = Budgets.parse([text], default_device="iphone12")
    assert b.latency_ms == {"iphone12": pytest.approx(1.6, rel=1e-12)}
    assert b.max_params is None and b.max_macs is None


@pytest.mark.parametrize("text,count", [("5M", 5_000_000), ("500K", 500_000), ("5e6", 5_000_000),
                                        ("5000000", 5_000_000), ("1.2G", 1_200_000_000), ("0.5M", 500_000),
                                        ("5_000_000", 5_000_000), ("500k", 500_000)])
def test_count_units(text: str, count: int) -> None:
    b = Budgets.parse([], max_params=text, max_macs=text)
    assert b.max_params == count and b.max_macs == count and isinstance(b.max_params, int)


@pytest.mark.parametrize("text", ["1.6", "1.6xs", "-1ms", "nanms", "infms", "0ms", "ms", "", "1e400ms", "1,6ms",
                                  "1.6 m s", "+-1ms", "1.6msms"])
def test_bad_latency_is_refused_with_the_flag_named(text: str) -> None:
    with pytest.raises(NasUserError, match="--latency"):
        Budgets.parse([text], default_device="local-cpu")


@pytest.mark.parametrize("text", ["-5M", "0", "5X", "nan", "inf", "1e400", "M", "", "5MM", "-0.1K"])
def test_bad_counts_are_refused_with_the_flag_named(text: str) -> None:
    with pytest.raises(NasUserError, match="--max-params"):
        Budgets.parse([], max_params=text)
    with pytest.raises(NasUserError, match="--max-macs"):
        Budgets.parse([], max_macs=text)


def test_device_budgets() -> None:
    b = Budgets.parse(["1.6ms", "local-cpu=20ms", "snapdragon855=3000us"], default_device="iphone12",
                      max_params="5M", max_macs="300M")
    assert b.latency_ms == {"iphone12": 1.6, "local-cpu": 20.0, "snapdragon855": pytest.approx(3.0)}
    assert (b.max_params, b.max_macs) == (5_000_000, 300_000_000)
    # device=value works without a default device
    assert Budgets.parse(["iphone12=1.6ms"]).latency_ms == {"iphone12": 1.6}
    assert b.to_dict() == {"latency_ms": dict(b.latency_ms), "max_params": 5_000_000, "max_macs": 300_000_000}


@pytest.mark.parametrize("values,default", [(["1.6ms", "iphone12=2ms"], "iphone12"),
                                            (["a=1ms", "a=2ms"], None),
                                            (["1ms", "2ms"], "local-cpu")])
def test_duplicate_device_is_refused(values: list[str], default: str | None) -> None:
    with pytest.raises(NasUserError, match="twice"):
        Budgets.parse(values, default_device=default)


def test_missing_device_is_refused() -> None:
    with pytest.raises(NasUserError, match="names no device"):
        Budgets.parse(["1.6ms"])
    with pytest.raises(NasUserError, match="device name before '=' is empty"):
        Budgets.parse(["=1.6ms"])


def _feasible(b: Budgets, **figures) -> bool:
    """Within every budget: no violation above 0 (what ``Candidate.feasible`` checks)."""
    return all(v <= 0 for v in b.violations(**figures).values())


def test_violations_are_relative_excess_and_positive_means_over_budget() -> None:
    b = Budgets.parse(["2ms"], default_device="d", max_params="1M", max_macs="100M")
    v = b.violations(latency_ms={"d": 3.0}, params=500_000, macs=100_000_000)
    assert v == {"latency:d": pytest.approx(0.5), "params": pytest.approx(-0.5), "macs": pytest.approx(0.0)}
    assert not _feasible(b, latency_ms={"d": 3.0}, params=500_000, macs=100_000_000)
    assert _feasible(b, latency_ms={"d": 2.0}, params=1_000_000, macs=1)


# ============================================================================ MES
def test_mes_matches_the_documented_figures() -> None:
    # docs/design.md (MES): U_params 3M, U_latency 1 ms, a_latency 1.0, a_params 0.5, score 100
    assert round(mes(0.9, 3.5e6), 1) == 102.9   # EfficientFormerV2-S0
    assert round(mes(2.7, 26.1e6), 1) == 12.6   # EfficientFormerV2-L
    w = MesWeights()
    assert (w.score, w.u_latency_ms, w.u_params, w.a_latency, w.a_params) == (100.0, 1.0, 3e6, 1.0, 0.5)
    assert mes(1.0, 3e6) == pytest.approx(100.0)
    assert mes(0.5, 3e6) == pytest.approx(200.0)       # twice as fast: twice the MES
    assert mes(1.0, 12e6) == pytest.approx(50.0)       # 4x the params: half the MES
    assert mes(1.0, 12e6, MesWeights(a_params=0.0)) == pytest.approx(100.0)


@pytest.mark.parametrize("kwargs", [{"u_latency_ms": 0}, {"u_params": -1}, {"score": float("nan")},
                                    {"a_latency": -0.5}, {"a_params": float("inf")}])
def test_mes_weights_are_validated(kwargs: dict) -> None:
    with pytest.raises(NasUserError):
        MesWeights(**kwargs)


# ============================================================================ codec and Pareto front (no processes)
def _params_of(space, arch: ArchConfig) -> dict:
    p: dict = {}
    for si, (st, ch) in enumerate(zip(arch.stages, space.stages)):
        p[f"s{si}.width"] = st.width
        p[f"s{si}.depth"] = len(st.blocks)
        n_attn = sum(b.mixer != ch.plain_mixer for b in st.blocks)
        if ch.max_attn:
            p[f"s{si}.attn"] = n_attn
        for j in range(ch.depths[-1]):
            blk = st.blocks[j] if j < len(st.blocks) else None
            p[f"s{si}.b{j}.e"] = blk.expansion if blk else ch.expansions[0]
            if ch.attn_mixers:
                p[f"s{si}.b{j}.mixer"] = blk.mixer if blk and blk.mixer != ch.plain_mixer else ch.attn_mixers[0]
    return p


@pytest.mark.parametrize("space_name", ["efficientformer_v2_demo", "efficientformer_v2"])
def test_arch_from_params_round_trips_every_config(space_name: str) -> None:
    space = get_space(space_name)
    archs = [space.largest(), space.smallest(), *(space.sample(seed) for seed in range(25))]
    for arch in archs:
        assert arch_from_params(space, _params_of(space, arch)) == arch


def test_pareto_front_keeps_only_non_dominated() -> None:
    space = get_space("efficientformer_v2_demo")
    arch = [space.sample(i) for i in range(5)]

    def cand(i: int, acc: float, ms: float, params: int) -> Candidate:
        return Candidate(arch[i], acc, params, 0, {"d": ms}, {}, 0.0)

    a, b, c, d = cand(0, 0.9, 1.0, 100), cand(1, 0.8, 0.5, 100), cand(2, 0.8, 1.0, 100), cand(3, 0.9, 1.0, 50)
    front = pareto_front([a, b, c, d], "d")
    assert {x.arch for x in front} == {b.arch, d.arch}   # a is dominated by d (fewer params), c by both


# ============================================================================ nas-search as users type it
def _search_dir(folder: F.Shared) -> Path:
    return folder.path / "runs" / "search"


def test_default_search_writes_a_valid_subnet_within_budget(searched: F.Shared) -> None:
    from latency import LatencyTable, predict_latency
    from search_spaces import count_params
    from search_spaces.subnet_file import SubnetFile
    from supernet.run import load_run

    work = searched
    b, r = searched.info["budget"], searched.procs["search"]
    assert "Traceback" not in r.stderr + r.stdout
    out = _search_dir(searched)
    for name in ("subnet.json", "pareto.csv", "pareto.png", "pareto.html", "search.json", "path.csv"):
        assert (out / name).is_file(), f"runs/search/{name} missing; {F.describe(r)}"
    assert (work.path / "subnet.json").is_file(), "subnet.json was not copied into the working folder"
    assert (work.path / "subnet.json").read_text() == (out / "subnet.json").read_text()
    assert "nas-extract subnet.json" in r.stdout

    # the first lines announce every default that was chosen for the user
    head = "\n".join(F.lines(r.stderr)[:4])
    assert "writing results to runs/search" in head, r.stderr
    assert f"using the latest supernet run {F.RUN}" in head, r.stderr
    assert f"using device '{F.DEVICE}' from {F.LUT_NAME}" in head, r.stderr

    run = load_run(work.run_dir)
    sub = SubnetFile.load(work.path / "subnet.json")
    assert run.space.why_not(sub.arch) is None
    assert (sub.resolution, sub.num_classes, sub.in_chans) == (run.resolution, run.num_classes, run.in_chans)

    # budgets met, and the recorded figures are the exact count and the LUT's prediction
    lat = sub.metrics["latency_ms"][F.DEVICE]
    assert lat["value"] <= b.latency_ms, (lat, b)
    assert lat["source"] == "measured-lut"
    assert sub.metrics["params"] <= b.params
    assert count_params(sub.specs()) == sub.metrics["params"]
    lut = LatencyTable.load(work.lut_path)
    assert predict_latency(sub.arch, lut) == pytest.approx(lat["value"], rel=1e-9)
    assert 0.0 <= sub.metrics["proxy_accuracy"] <= 1.0

    # provenance: hashes of the supernet weights and of the LUT
    prov = sub.provenance
    assert prov["supernet_sha256"] == run.weights_sha256 == F.sha256(work.run_dir / "supernet.safetensors")
    assert Path(prov["supernet_run"]).resolve() == work.run_dir.resolve()
    assert prov["space_hash"] == run.space.hash
    assert prov["luts"][F.DEVICE]["sha256"] == F.sha256(work.lut_path)
    assert Path(prov["luts"][F.DEVICE]["path"]).resolve() == work.lut_path.resolve()

    # reports agree with subnet.json
    summary = json.loads((out / "search.json").read_text())
    assert summary["strategy"] == "slim" and summary["primary_device"] == F.DEVICE
    assert summary["budgets"] == {"latency_ms": {F.DEVICE: b.latency_ms}, "max_params": b.params, "max_macs": None}
    assert summary["evaluated"] > 0 and summary["feasible"] > 0
    with open(out / "pareto.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["candidates"]
    feasible = [row for row in rows if row["feasible"] == "True"]
    assert feasible and any(row["pareto"] == "True" for row in rows)
    assert max(float(row["accuracy"]) for row in feasible) == pytest.approx(sub.metrics["proxy_accuracy"])
    assert sub.arch.hash in {row["arch_hash"] for row in feasible}
    for row in feasible:
        assert float(row[f"latency_ms[{F.DEVICE}]"]) <= b.latency_ms and int(row["params"]) <= b.params
    with open(out / "path.csv", newline="") as fh:
        path = list(csv.DictReader(fh))
    assert path[0]["action"] == "start (largest)" and path[0]["arch"] == run.space.largest().to_string()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "pareto.html").read_text()
    assert "<svg" in page and sub.arch.to_string() in page


def test_search_progress_lines_are_not_printed_twice(searched: F.Shared) -> None:
    r = searched.procs["search"]
    steps = [ln for ln in F.lines(r.stderr) if ln.startswith("slim step ")]
    assert steps, r.stderr
    assert len(steps) == len(set(steps)), "every slim step is printed twice on stderr:\n" + "\n".join(steps[:6])


def test_rerun_reuses_the_accuracy_cache(searched: F.Shared, tmp_path: Path) -> None:
    from search_spaces.subnet_file import SubnetFile

    b = searched.info["budget"]
    d = F.copy_folder(searched.path, tmp_path / "w")
    first_arch = SubnetFile.load(d / "subnet.json").arch
    cache = d / "runs" / "search" / "accuracy_cache.jsonl"
    n_cached = len(cache.read_text().splitlines())
    assert n_cached == json.loads((d / "runs" / "search" / "search.json").read_text())["evaluated"]
    r = F.cli("nas-search", "--latency", b.latency_text, "--max-params", b.params_text, cwd=d)
    assert r.returncode == 0, F.describe(r)
    assert f"{n_cached} cached accuracies" in r.stderr
    assert json.loads((d / "runs" / "search" / "search.json").read_text())["evaluated"] == 0
    assert "(0 newly evaluated)" in r.stdout
    assert len(cache.read_text().splitlines()) == n_cached
    assert SubnetFile.load(d / "subnet.json").arch == first_arch


def _study(folder: Path):
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'study.db'}")
    return optuna.load_study(study_name="nas-search", storage=storage)


def _complete(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def _nsga2_args(work: F.Shared, out: str, n_trials: int) -> list[str]:
    ex = F.space_extremes(work)
    # Every config fits: these tests are about resuming and sharing a study, and must never end with
    # exit 3. NSGA-II under budgets that bind is tested in test_search_budgets.py.
    loose = f"{ex['largest'][1] * 1.01:.4f}ms"
    return ["--latency", loose, "--strategy", "nsga2", "--n-trials", str(n_trials), "--population-size", "4",
            "--calib-batches", "1", "--threads", "1", "--out", out]


def test_nsga2_resumes_its_study(work: F.Shared, tmp_path: Path) -> None:
    from search_spaces.subnet_file import SubnetFile
    from supernet.run import load_run

    d = F.copy_workdir(work.path, tmp_path / "w")
    out = "runs/nsga2-resume"
    r = F.cli("nas-search", *_nsga2_args(work, out, 6), cwd=d)
    assert r.returncode == 0, F.describe(r)
    assert len(_complete(_study(d / out))) == 6
    r = F.cli("nas-search", *_nsga2_args(work, out, 12), cwd=d)
    assert r.returncode == 0, F.describe(r)
    study = _study(d / out)
    assert len(_complete(study)) == 12
    assert len(study.get_trials(deepcopy=False)) == 12, "a resumed study ran more trials than asked for"
    reported = [int(n) for n in re.findall(r"^trial (\d+):", r.stderr, flags=re.M)]
    assert sorted(reported) == list(range(6, 12)), "the rerun must run only the 6 missing trials"
    space = load_run(d / F.RUN).space
    for t in _complete(study):
        arch = ArchConfig.from_string(t.user_attrs["arch"])
        assert space.why_not(arch) is None
        assert set(t.user_attrs["candidate"]) >= {"accuracy", "params", "latency_ms", "violations"}
    sub = SubnetFile.load(d / out / "subnet.json")
    assert sub.provenance["search"]["strategy"] == "nsga2"
    best = max(_complete(study), key=lambda t: t.values[0])
    assert sub.metrics["proxy_accuracy"] == pytest.approx(best.values[0])
    F.check_folder_integrity(d / out)


def test_two_workers_share_one_study(work: F.Shared, tmp_path: Path) -> None:
    d = F.copy_workdir(work.path, tmp_path / "w")
    out = "runs/nsga2-workers"
    args = _nsga2_args(work, out, 16)
    procs = [F.popen("nas-search", *args, "--seed", str(seed), cwd=d, log=tmp_path / f"worker{seed}")
             for seed in (1, 2)]
    try:
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:
            if p.poll() is None:
                F.kill_group(p)
    errs = [(tmp_path / f"worker{seed}.err").read_text() for seed in (1, 2)]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, f"a worker exited with {p.returncode}:\n{err[-4000:]}"
        assert "Traceback" not in err
    study = _study(d / out)
    done = _complete(study)
    assert len(done) >= 16
    import optuna

    assert not [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.FAIL]
    per_worker = [{int(n) for n in re.findall(r"^trial (\d+):", err, flags=re.M)} for err in errs]
    assert all(per_worker), f"both workers must run trials of the shared study, got {per_worker}"
    assert not per_worker[0] & per_worker[1], "two workers ran the same trial"
    assert per_worker[0] | per_worker[1] == {t.number for t in done}
    F.check_folder_integrity(d / out)


_OPEN_STORAGE = """
import os, sys, time
from pathlib import Path
import optuna
from nas.search_run import _storage
folder, url = Path(sys.argv[1]), sys.argv[2]
(folder / f"ready-{os.getpid()}").touch()   # at the barrier
while not (folder / "go").exists():
    time.sleep(0.001)
optuna.create_study(study_name="nas-search", storage=_storage(url), load_if_exists=True,
                    directions=["maximize", "minimize", "minimize"])
"""


def test_workers_starting_together_can_open_a_fresh_sqlite_study(tmp_path: Path) -> None:
    """The default storage of several workers (docs/design.md, search): the SQLite file is created by whoever comes first.

    Six processes open the same new ``study.db`` at the same moment, through the helper
    ``run_search`` uses for ``--storage``'s default, then create-or-load the study. Each
    process marks its arrival at the barrier with a file; the barrier opens only once all six
    files exist, so all six were waiting when it opened.
    """
    import subprocess

    import optuna

    for attempt in range(2):
        folder = tmp_path / f"round{attempt}"
        folder.mkdir()
        url = f"sqlite:///{folder / 'study.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN_STORAGE, str(folder), url], env=F.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
        try:
            F.wait_for(lambda: len(list(folder.glob("ready-*"))) == 6, timeout=180,
                       what="all six processes at the barrier")
            running = [p.poll() is None for p in procs]
            assert all(running), f"a process left the barrier before it opened: {running}"
            assert not (folder / "study.db").exists(), "the database was created before the barrier opened"
            (folder / "go").touch()
            results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        failed = [(err.strip().splitlines() or ["(no output)"])[-1] for rc, err in results if rc != 0]
        assert not failed, f"{len(failed)} of 6 workers could not open a new SQLite study: {failed}"
        assert {p.pid for p in procs} == {int(f.name.split("-")[1]) for f in folder.glob("ready-*")}
        summaries = optuna.get_all_study_summaries(storage=url)
        assert [s.study_name for s in summaries] == ["nas-search"], "one study, created once"


def test_impossible_budget_is_refused_before_a_study_is_made(work: F.Shared, tmp_path: Path) -> None:
    """A budget below the space's least latency: exit 3 naming that least figure, with no study, folder or file made.

    (A budget some config meets but the search misses exits 3 after it: tests/test_flags_search.py.)
    """
    from latency import LatencyTable, fastest
    from supernet.run import load_run

    floor, arch = fastest(load_run(work.run_dir).space, LatencyTable.load(work.lut_path))
    d = F.copy_workdir(work.path, tmp_path / "w")
    before = F.tree(d)
    r = F.cli("nas-search", "--latency", "0.000001ms", "--strategy", "nsga2", "--n-trials", "2",
              "--population-size", "2", "--calib-batches", "1", "--threads", "1", "--out", "runs/infeasible",
              cwd=d)
    assert r.returncode == 3, F.describe(r)
    assert "Traceback" not in r.stderr + r.stdout
    msg = [ln for ln in F.lines(r.stderr) if "can meet the budgets" in ln]
    assert len(msg) == 1, r.stderr
    assert f"{F.DEVICE} {floor:.3f} ms > 1e-06 ms" in msg[0] and arch.to_string() in msg[0], msg[0]
    assert F.tree(d) == before, "nothing is written"


def test_unknown_device_in_multi_device_budget_exits_2(work: F.Shared, tmp_path: Path) -> None:
    b = F.budget(work)
    d = F.copy_workdir(work.path, tmp_path / "w")
    before = F.tree(d)
    r = F.cli("nas-search", "--latency", f"{F.DEVICE}={b.latency_text}", "--latency", "pixel9=2ms",
              "--max-params", b.params_text, "--out", "runs/unknown-device", cwd=d)
    assert r.returncode == 2, F.describe(r)
    assert "Traceback" not in r.stderr
    err = [ln for ln in F.lines(r.stderr) if ln.startswith("nas-search: error:")]
    assert len(err) == 1, r.stderr
    assert "pixel9" in err[0] and "nas-build-lut --device pixel9" in err[0], err[0]
    assert F.tree(d) == before


def test_latency_error_names_the_bad_value_once() -> None:
    for values, default in ((["1.6xs"], "local-cpu"), (["iphone12=1.6xs"], None)):
        with pytest.raises(NasUserError) as info:
            Budgets.parse(values, default_device=default)
        assert str(info.value).count("1.6xs'") == 1, str(info.value)


# ============================================================================ fast and exhaustive slimming
def test_default_search_reports_its_real_evaluations_and_the_predictor(searched: F.Shared) -> None:
    summary = json.loads((_search_dir(searched) / "search.json").read_text())
    assert summary["mode"] == "fast"
    assert 0 < summary["evaluated_full"] <= summary["evaluated"]
    assert summary["actions_evaluated"] <= summary["actions_considered"]
    assert "predictor_spearman" in summary and "predictor_held_out" in summary
    s = summary["predictor_spearman"]
    assert s is None or -1.0 <= s <= 1.0
    # every accuracy on the path is an evaluation on every validation image
    cache = [json.loads(line) for line in (_search_dir(searched) / "accuracy_cache.jsonl").read_text().splitlines()]
    full = {r["hash"]: r["accuracy"] for r in cache if "|images=" not in r["setting"]}
    with open(_search_dir(searched) / "path.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            assert float(row["accuracy"]) == pytest.approx(full[row["arch_hash"]], abs=0), row["action"]


def test_exhaustive_flag_evaluates_every_action_on_every_image(work: F.Shared, tmp_path: Path) -> None:
    b = F.budget(work)
    d = F.copy_workdir(work.path, tmp_path / "w")
    r = F.cli("nas-search", "--latency", b.latency_text, "--max-params", b.params_text, "--exhaustive",
              "--threads", "1", "--calib-batches", "1", "--out", "runs/exhaustive", cwd=d)
    assert r.returncode == 0, F.describe(r)
    summary = json.loads((d / "runs" / "exhaustive" / "search.json").read_text())
    assert summary["mode"] == "exhaustive" and summary["settings"]["exhaustive"] is True
    assert summary["evaluated"] == summary["evaluated_full"] == summary["candidates"]
