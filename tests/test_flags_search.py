"""Success paths of the README's ``nas-search``, ``nas-build-lut`` and ``nas-extract`` features, as users type them.

Each test runs real commands in a private copy of a shared folder (conftest) and checks the
outcome a user would check: the file that says which device, statistic or study was used, the
budgets of every device met, the figures recomputed here from the LUTs.

Features: ``--device-file`` and several devices at once (``--latency a=.. --latency b=..``),
``--statistic``, ``--mes-*``, ``--storage``/``--study-name``, slim's exit code 3 when nothing
fits, ``--import`` of iPhone results over the predicted LUT, ``nas-extract --finetune-epochs``.
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

from nas.objectives import MesWeights, mes  # noqa: E402

CHEAP = ("--calib-batches", "1", "--val-images", "10", "--threads", "1")


def _extremes(folder: Path, lut_name: str) -> tuple[float, float, int, int]:
    """(smallest ms, largest ms, smallest params, largest params) of the run's space on that LUT."""
    from latency import LatencyTable, predict_latency
    from search_spaces import count_params, lower
    from supernet.run import load_run

    space = load_run(folder / F.RUN).space
    lut = LatencyTable.load(folder / lut_name)
    s, la = space.smallest(), space.largest()
    params = [count_params(lower(a, resolution=F.RESOLUTION, num_classes=10, in_chans=3,
                                 distillation=lut.distillation)) for a in (s, la)]
    return predict_latency(s, lut), predict_latency(la, lut), params[0], params[1]


# ============================================================================ --device-file, several devices
DEVICE_FILE = """\
# a device of my own: this machine's CPU through ONNX Runtime, with fewer timed runs
name = "mycpu"
base = "local-cpu"
warmup = 2
repeats = 10
description = "local CPU, quick profile"
"""


@pytest.fixture(scope="module")
def two_devices(work: F.Shared, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = F.copy_workdir(work.path, tmp_path_factory.mktemp("devices") / "w")
    (d / "mycpu.toml").write_text(DEVICE_FILE)
    lut = F.cli("nas-build-lut", "--device-file", "mycpu.toml", "--no-progress", cwd=d)
    assert lut.returncode == 0, F.describe(lut)
    budgets = {}
    for device in (F.DEVICE, "mycpu"):
        s_ms, l_ms, _, _ = _extremes(d, f"lut-{device}-{F.RESOLUTION}.json")
        budgets[device] = float(f"{s_ms + 0.4 * (l_ms - s_ms):.4f}")
    _, _, s_p, l_p = _extremes(d, F.LUT_NAME)
    max_params = int(0.5 * l_p) // 1000 * 1000
    search = F.cli("nas-search", *(x for dev, ms in budgets.items() for x in ("--latency", f"{dev}={ms}ms")),
                   "--max-params", str(max_params), "--max-actions", "3", "--extra-steps", "0", *CHEAP,
                   "--out", "runs/two", cwd=d)
    assert search.returncode == 0, F.describe(search)
    return {"path": d, "lut": lut, "search": search, "budgets": budgets, "max_params": max_params}


def test_flag_device_file_builds_a_lut_for_that_device(two_devices: dict, work: F.Shared) -> None:
    from latency import LatencyTable

    d = two_devices["path"]
    table = LatencyTable.load(d / f"lut-mycpu-{F.RESOLUTION}.json")
    assert table.device == "mycpu" and not table.predicted and table.complete
    assert table.profile["repeats"] == 10 and table.profile["warmup"] == 2 and table.profile["backend"] == "onnxruntime"
    _, entry = next(iter(table.items()))
    assert entry.measured and entry.stats.count == 10
    assert set(table.keys()) == set(LatencyTable.load(work.lut_path).keys())
    assert f"-> lut-mycpu-{F.RESOLUTION}.json" in two_devices["lut"].stdout


def test_two_devices_at_once_meet_both_budgets(two_devices: dict) -> None:
    from latency import LatencyTable, predict_latency
    from search_spaces import count_params
    from search_spaces.subnet_file import SubnetFile

    d, budgets = two_devices["path"], two_devices["budgets"]
    sub = SubnetFile.load(d / "runs" / "two" / "subnet.json")
    assert set(sub.metrics["latency_ms"]) == set(budgets)
    for device, limit in budgets.items():
        lut = LatencyTable.load(d / f"lut-{device}-{F.RESOLUTION}.json")
        assert predict_latency(sub.arch, lut) <= limit
        assert sub.metrics["latency_ms"][device]["value"] == pytest.approx(predict_latency(sub.arch, lut), rel=1e-9)
        assert sub.metrics["latency_ms"][device]["source"] == "measured-lut"
        assert sub.provenance["luts"][device]["sha256"] == F.sha256(d / f"lut-{device}-{F.RESOLUTION}.json")
        # the budget binds on this device too: the largest config is over it
        assert _extremes(d, f"lut-{device}-{F.RESOLUTION}.json")[1] > limit
    assert count_params(sub.specs()) <= two_devices["max_params"]
    summary = json.loads((d / "runs" / "two" / "search.json").read_text())
    assert summary["budgets"]["latency_ms"] == budgets and summary["primary_device"] == F.DEVICE
    with open(d / "runs" / "two" / "pareto.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:   # a candidate is feasible only if it meets every device's budget
        ok = all(float(row[f"latency_ms[{dev}]"]) <= ms for dev, ms in budgets.items()) and \
            int(row["params"]) <= two_devices["max_params"]
        assert (row["feasible"] == "True") == ok, row


# ============================================================================ --statistic
def test_flag_statistic_median_makes_predictions_sum_medians(work: F.Shared, tmp_path: Path) -> None:
    from latency import LatencyTable, predict_latency
    from search_spaces import lower
    from supernet.run import load_run

    d = F.copy_workdir(work.path, tmp_path / "w")
    before = LatencyTable.load(d / F.LUT_NAME)
    assert before.statistic == "min"   # the default for builds on this machine
    r = F.cli("nas-build-lut", "--device", F.DEVICE, "--statistic", "median", "--no-progress", cwd=d)
    assert r.returncode == 0, F.describe(r)
    assert f"(0 measured now, {len(before)} from an earlier run)" in r.stdout, r.stdout   # nothing measured again
    after = LatencyTable.load(d / F.LUT_NAME)
    assert after.statistic == "median" and json.loads((d / F.LUT_NAME).read_text())["statistic"] == "median"
    arch = load_run(d / F.RUN).space.largest()
    specs = lower(arch, resolution=F.RESOLUTION, num_classes=10, in_chans=3, distillation=after.distillation)

    def calibrated(lut: LatencyTable, figure: str) -> float:   # the calibration's formula over the chosen figure
        cal = lut.calibration
        return cal.offset_ms + sum(cal.block_ms(s.kind, getattr(lut[s.key].stats, figure)) for s in specs)

    assert predict_latency(arch, after) == pytest.approx(calibrated(after, "median_ms"), rel=1e-9)
    assert predict_latency(arch, before) == pytest.approx(calibrated(before, "min_ms"), rel=1e-9)
    assert sum(after[s.key].stats.median_ms for s in specs) > sum(before[s.key].stats.min_ms for s in specs)


# ============================================================================ --mes-*
def test_flag_mes_sets_the_units_and_exponents_of_mes(work: F.Shared, tmp_path: Path) -> None:
    from search_spaces.subnet_file import SubnetFile

    d = F.copy_workdir(work.path, tmp_path / "w")
    b = F.budget(work)
    weights = MesWeights(u_latency_ms=0.5, u_params=1e6, a_latency=2.0, a_params=0.25)
    r = F.cli("nas-search", "--latency", b.latency_text, "--max-params", b.params_text, "--max-actions", "2",
              "--extra-steps", "0", "--mes-u-latency", "0.5", "--mes-u-params", "1e6", "--mes-a-latency", "2",
              "--mes-a-params", "0.25", *CHEAP, "--out", "runs/mes", cwd=d)
    assert r.returncode == 0, F.describe(r)
    with open(d / "runs" / "mes" / "path.csv", newline="") as fh:
        path = list(csv.DictReader(fh))
    assert len(path) >= 2
    for row in path:
        ms, params = float(row[f"latency_ms[{F.DEVICE}]"]), int(row["params"])
        assert float(row["mes"]) == pytest.approx(mes(ms, params, weights), rel=1e-9)
        assert float(row["mes"]) != pytest.approx(mes(ms, params), rel=1e-3)   # not the default weights
    sub = SubnetFile.load(d / "runs" / "mes" / "subnet.json")
    lat = sub.metrics["latency_ms"][F.DEVICE]["value"]
    assert sub.metrics["mes"] == pytest.approx(mes(lat, sub.metrics["params"], weights), rel=1e-9)


# ============================================================================ --storage / --study-name
def test_flags_storage_and_study_name_share_one_study_between_runs(work: F.Shared, tmp_path: Path) -> None:
    import optuna

    from search_spaces.subnet_file import SubnetFile

    d = F.copy_workdir(work.path, tmp_path / "w")
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    loose = f"{F.space_extremes(work)['largest'][1] * 1.01:.4f}ms"
    common = ["--latency", loose, "--strategy", "nsga2", "--population-size", "2", "--storage", url,
              "--study-name", "s1", *CHEAP]
    first = F.cli("nas-search", *common, "--n-trials", "3", "--seed", "1", "--out", "runs/a", cwd=d)
    assert first.returncode == 0, F.describe(first)
    second = F.cli("nas-search", *common, "--n-trials", "6", "--seed", "2", "--out", "runs/b", cwd=d)
    assert second.returncode == 0, F.describe(second)
    assert [s.study_name for s in optuna.get_all_study_summaries(storage=url)] == ["s1"]
    study = optuna.load_study(study_name="s1", storage=url)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6, "the second run adds 3 trials to the first run's 3"
    assert not (d / "runs" / "a" / "study.db").exists() and not (d / "runs" / "b" / "study.db").exists()
    best = max(done, key=lambda t: (t.values[0], -t.values[1], -t.values[2]))
    sub = SubnetFile.load(d / "runs" / "b" / "subnet.json")
    assert sub.arch.to_string() == best.user_attrs["arch"]   # the second run saw every trial of the study


# ============================================================================ exit code 3
def _least(work: F.Shared) -> tuple[float, str, int]:
    """The least predicted latency over the space (and its config) and the fewest params."""
    from latency import LatencyTable, fastest
    from search_spaces import count_params
    from search_spaces.enumerate import cheapest
    from supernet.run import load_run

    run = load_run(work.run_dir)
    lut = LatencyTable.load(work.lut_path)
    floor, arch = fastest(run.space, lut)
    fewest, _ = cheapest(run.space, run.setup, lambda spec: count_params([spec]))
    return floor, arch.to_string(), int(fewest)


def test_search_refuses_at_once_a_budget_that_no_config_meets(work: F.Shared, tmp_path: Path) -> None:
    d = F.copy_workdir(work.path, tmp_path / "w")
    floor, arch, fewest = _least(work)
    loose = f"{F.space_extremes(work)['largest'][1] * 2:.4f}ms"
    before = F.tree(d)
    for flags, figure in ((["--latency", f"{floor * 0.98:.4f}ms"], f"{F.DEVICE} {floor:.3f} ms"),
                          (["--latency", loose, "--max-params", str(fewest - 1)], f"{fewest / 1e6:.3f}M params")):
        r = F.cli("nas-search", *flags, *CHEAP, cwd=d)
        assert r.returncode == 3, F.describe(r)
        assert "Traceback" not in r.stderr + r.stdout
        msg = [ln for ln in F.lines(r.stderr) if "can meet the budgets" in ln]
        assert len(msg) == 1 and figure in msg[0], r.stderr
        if "--max-params" not in flags:
            assert arch in msg[0], "the message names the fastest config"
        assert F.tree(d) == before, "nothing is evaluated or written"


def test_search_exits_3_when_no_candidate_meets_the_budgets(work: F.Shared, tmp_path: Path) -> None:
    """A budget some config meets, which the search's few candidates miss: the error comes after the search."""
    d = F.copy_workdir(work.path, tmp_path / "w")
    floor, _, _ = _least(work)
    _, s_ms, s_params = F.space_extremes(work)["smallest"]
    r = F.cli("nas-search", "--latency", f"{floor * 1.0001:.6f}ms", "--strategy", "nsga2", "--population-size", "2",
              "--n-trials", "2", "--seed", "0", *CHEAP, cwd=d)
    assert r.returncode == 3, F.describe(r)
    assert "Traceback" not in r.stderr + r.stdout
    msg = [ln for ln in F.lines(r.stderr) if "no subnet meets the budgets" in ln]
    assert len(msg) == 1 and f"{F.DEVICE} {s_ms:.3f} ms" in msg[0] and f"{s_params / 1e6:.3f}M params" in msg[0], r.stderr
    assert not (d / "subnet.json").exists() and not (d / "runs" / "search" / "subnet.json").exists()
    with open(d / "runs" / "search" / "pareto.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(row["feasible"] == "False" for row in rows)   # nothing it evaluated fits


# ============================================================================ --import of iPhone results
def _fake_iphone_results(bundle: Path) -> dict:
    """results.json as runner.py writes it on a Mac (CoreML runs only on macOS): samples for every block."""
    import hashlib

    manifest = json.loads((bundle / "manifest.json").read_text())
    results = {}
    for i, e in enumerate(manifest["entries"]):
        base = 0.02 + 0.001 * (i % 17)
        results[e["key"]] = {"samples_ms": [base * f for f in (1.0, 1.1, 0.95, 1.02, 1.3)]}
    return {"schema": 1, "manifest_sha256": hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest(),
            "device": "iphone12", "backend": "coreml", "threads": manifest["threads"], "warmup": 10, "repeats": 5,
            "complete": True, "results": results, "models": {},
            "host": {"platform": "macOS-15-arm64", "machine": "arm64", "python": "3.12"}}


def test_flag_import_replaces_the_predicted_iphone_lut(iphone: F.Shared, tmp_path: Path) -> None:
    import statistics

    from latency import LatencyTable, predict_latency
    from search_spaces import lower
    from search_spaces.subnet_file import SubnetFile

    d = F.copy_folder(iphone.path, tmp_path / "w")
    bundle = d / "lut-iphone12-32.bundle"
    predicted = LatencyTable.load(d / "lut-iphone12-32.json")
    assert predicted.predicted
    data = _fake_iphone_results(bundle)
    (bundle / "results.json").write_text(json.dumps(data))
    r = F.cli("nas-build-lut", "--device", "iphone12", "--import", "lut-iphone12-32.bundle/results.json",
              "--no-progress", cwd=d)
    assert r.returncode == 0, F.describe(r)
    assert f"replaced {len(predicted)} predicted entries" in r.stdout, r.stdout
    measured = LatencyTable.load(d / "lut-iphone12-32.json")
    assert not measured.predicted and measured.complete and measured.statistic == "median"

    search = F.cli("nas-search", "--latency", "1.6ms", "--strategy", "nsga2", "--n-trials", "2",
                   "--population-size", "2", *CHEAP, cwd=d)
    assert search.returncode == 0, F.describe(search)
    assert "using device 'iphone12'" in search.stderr, search.stderr
    sub = SubnetFile.load(d / "subnet.json")
    lat = sub.metrics["latency_ms"]["iphone12"]
    assert lat["source"] == "measured-lut", lat
    specs = lower(sub.arch, resolution=F.RESOLUTION, num_classes=10, in_chans=3, distillation=measured.distillation)
    medians = sum(statistics.median(data["results"][s.key]["samples_ms"]) for s in specs)
    assert lat["value"] == pytest.approx(medians, rel=1e-9)
    assert predict_latency(sub.arch, predicted) != pytest.approx(lat["value"], rel=1e-3), "predictions changed"


# ============================================================================ nas-extract --finetune-epochs
def test_flag_finetune_epochs_changes_the_weights_and_reports_accuracy(searched: F.Shared, tmp_path: Path) -> None:
    from nas.extract import load_subnet
    from search_spaces.subnet_file import SubnetFile
    from supernet.run import load_run, load_supernet

    d = F.copy_folder(searched.path, tmp_path / "w")
    r = F.cli("nas-extract", "subnet.json", "--finetune-epochs", "1", "--formats", "safetensors", "--no-measure",
              "--out", "runs/ft", cwd=d)
    assert r.returncode == 0, F.describe(r)
    assert "fine-tune epoch 1/1" in r.stderr and "(fine-tuned)" in r.stdout, F.describe(r)
    m = json.loads((d / "runs" / "ft" / "extract.json").read_text())["metrics"]
    assert m["finetune_epochs"] == 1 and 0.0 <= m["val_accuracy_finetuned"] <= 1.0
    assert f"{100 * m['val_accuracy_finetuned']:.2f}% (fine-tuned)" in r.stdout
    assert SubnetFile.load(d / "runs" / "ft" / "subnet.json").metrics["val_accuracy_finetuned"] == \
        m["val_accuracy_finetuned"]
    # the weights moved away from the supernet's (training mode: BN uses batch statistics, so only weights count)
    arch = SubnetFile.load(d / "subnet.json").arch
    net = load_supernet(load_run(d / F.RUN)).train()
    model = load_subnet(d / "runs" / "ft").train()
    x = torch.randn(8, 3, F.RESOLUTION, F.RESOLUTION, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(x) - net(x, arch)).abs().max() > 1e-3
    # --seed: another seed, another fine-tuning; the default seed is 0
    assert m["finetune_seed"] == 0
    r1 = F.cli("nas-extract", "subnet.json", "--finetune-epochs", "1", "--seed", "1", "--formats", "safetensors",
               "--no-measure", "--out", "runs/ft-seed1", cwd=d)
    assert r1.returncode == 0, F.describe(r1)
    assert json.loads((d / "runs" / "ft-seed1" / "extract.json").read_text())["metrics"]["finetune_seed"] == 1
    other = load_subnet(d / "runs" / "ft-seed1").train()
    with torch.no_grad():
        assert (other(x) - model(x)).abs().max() > 1e-4


# ============================================================================ the fast path's flags, --lut, --supernet
def test_fast_path_flags_shape_each_step(work: F.Shared, tmp_path: Path) -> None:
    """--top-k/--explore cap the actions evaluated per step, --max-combine 1 applies one action per step,
    --rung-images is recorded, --lut/--supernet name the inputs instead of the defaults."""
    d = F.copy_workdir(work.path, tmp_path / "w")
    b = F.binding_budget(work)
    r = F.cli("nas-search", "--latency", b.latency_text, "--max-params", b.params_text, "--top-k", "2",
              "--explore", "0", "--rung-images", "32", "--max-combine", "1", "--far", "0.5", "--prefix-cache-mb", "0",
              "--lut", F.LUT_NAME, "--supernet", F.RUN, "--calib-batches", "1", "--val-images", "64", "--threads", "1",
              "--extra-steps", "0", "--out", "runs/fast", cwd=d)
    assert r.returncode == 0, F.describe(r)
    assert "using the latest supernet run" not in r.stderr   # it was named
    summary = json.loads((d / "runs" / "fast" / "search.json").read_text())
    s = summary["settings"]
    assert (s["top_k"], s["explore"], s["rung_images"], s["max_combine"], s["far"], s["prefix_cache_mb"]) == \
        (2, 0, 32, 1, 0.5, 0)
    # rungs are whole evaluation batches (256 images): with this folder's 51 validation images, one rung of all
    # (test_search_fast.py checks partial rungs on a larger split)
    assert summary["rungs"] == str(summary["validation_images"])
    with open(d / "runs" / "fast" / "path.csv", newline="") as fh:
        path = list(csv.DictReader(fh))
    steps = len(path) - 1
    assert steps >= 2 and all(" + " not in row["action"] for row in path)   # one action per step
    # once the predictor has its warm-up sample, a step evaluates only --top-k + --explore of its actions
    assert summary["actions_evaluated"] < summary["actions_considered"]


def test_flag_surrogate_lets_the_predictor_score_trials(work: F.Shared, tmp_path: Path) -> None:
    d = F.copy_workdir(work.path, tmp_path / "w")
    b = F.binding_budget(work)
    r = F.cli("nas-search", "--latency", b.latency_text, "--strategy", "nsga2", "--n-trials", "16",
              "--population-size", "4", "--surrogate", *CHEAP, "--out", "runs/sur", cwd=d)
    assert r.returncode == 0, F.describe(r)
    summary = json.loads((d / "runs" / "sur" / "search.json").read_text())
    assert summary["settings"]["surrogate"] is True
    assert summary["mode"] == "surrogate" and summary["trials"] == 16 and "trials_predicted" in summary


def test_the_predictor_line_reads_each_strategy_s_figures() -> None:
    """The closing line on the accuracy predictor, for the fast slim path (actions) and for NSGA-II with
    --surrogate (trials; it once asked NSGA-II for action counts it never has, and nas-search crashed
    after a finished study)."""
    from nas.cli_search import predictor_line

    assert predictor_line({"predictor_spearman": None, "actions_evaluated": 3}) is None
    assert predictor_line({"mode": "surrogate", "trials": 16}) is None
    slim = predictor_line({"predictor_spearman": 0.81234, "predictor_held_out": 12, "actions_evaluated": 40,
                           "actions_considered": 95})
    assert slim == ("  accuracy predictor: Spearman 0.812 on 12 evaluated subnets it had not been trained on; "
                    "40 of 95 actions evaluated")
    loss = predictor_line({"predictor_spearman": 0.6, "predictor_spearman_accuracy": 0.25, "predictor_held_out": 12,
                           "actions_evaluated": 40, "actions_considered": 95})
    assert loss == ("  accuracy predictor: Spearman 0.600 on 12 evaluated subnets it had not been trained on "
                    "(loss; 0.250 against accuracy on the same images); 40 of 95 actions evaluated")
    nsga2 = predictor_line({"mode": "surrogate", "trials": 16, "trials_predicted": 7, "predictor_held_out": 5,
                            "predictor_spearman": -0.1})
    assert nsga2 == ("  accuracy predictor: Spearman -0.100 on 5 evaluated subnets it had not been trained on; "
                     "7 of 16 trials scored by the predictor alone")
