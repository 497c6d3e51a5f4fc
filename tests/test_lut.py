"""Tests of the latency LUT library: table format, prediction, prior, calibration, builds and bundles.

Measurements are real (ONNX Runtime sessions, CoreML conversion, the bundle runner as a
subprocess) on tiny spaces; no test asserts on a timing.
"""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latency import (
    Calibration,
    LatencyStats,
    LatencyTable,
    fastest,
    get_profile,
    merge_tables,
    predict_breakdown,
    predict_latency,
)
from latency.build import build_lut, import_results, lut_specs, parse_shard, write_bundle
from latency.measure import VALIDATION_ROUNDS
from latency.prior import (
    IPHONE12_PRESET_MS,
    block_features,
    fit_prior,
    iphone12_prior,
    nnls,
    predicted_table,
)
from latency.profiles import DeviceProfile
from latency.validate import fidelity_metrics, fit_calibration, sample_archs, spearman, validate_lut
from search_spaces import ArchConfig, SearchSpace, StageChoices, block_macs, get_space, lower
from search_spaces.enumerate import enumerate_specs
from search_spaces.errors import FileFormatError, NasUserError

REPO = Path(__file__).resolve().parents[1]
FAST = DeviceProfile(name="fast-cpu", backend="onnxruntime", is_local=True, threads=1, warmup=1, repeats=5)


def tiny_space() -> SearchSpace:
    """A V2-shaped space with 18 specs at 32 px: every block kind, two stage-4 widths."""
    e = (2,)
    mixers = ("lite", "attn")
    return SearchSpace("tiny_v2", "efficientformer_v2", (
        StageChoices((16,), (1,), e, "ffn"),
        StageChoices((16,), (1,), e, "ffn"),
        StageChoices((32,), (1,), e, "ffn", mixers, max_attn=1),
        StageChoices((32, 48), (1,), e, "ffn", mixers, max_attn=1),
    ), stem_stride=2)


def tiny_v1_space() -> SearchSpace:
    """A V1-shaped space with a dozen specs at 32 px (stem, downsampling, Meta4D, Meta3D, heads)."""
    return SearchSpace("tiny_v1", "efficientformer", (
        StageChoices((16,), (1,), (4,), "pool"),
        StageChoices((16,), (1,), (4,), "pool"),
        StageChoices((32,), (1,), (4,), "pool"),
        StageChoices((32, 48), (1, 2), (4,), "pool", ("attn",), max_attn=1),
    ), stem_stride=2)


SETUP = dict(resolution=32, num_classes=10, in_chans=1)


def fake_table(space: SearchSpace, value: float = 0.1) -> LatencyTable:
    lut = LatencyTable(device="demo", backend="onnxruntime", distillation=True, space_name=space.name,
                       space_hash=space.hash, space=space.to_dict(), **SETUP)  # type: ignore[arg-type]
    for spec in enumerate_specs(space, **SETUP):  # type: ignore[arg-type]
        lut.set_measured(spec.key, LatencyStats.from_samples([value, value * 1.1, value * 0.9]))
    lut.expected_entries = len(lut)
    return lut


# --------------------------------------------------------------------------- table format
def test_table_round_trip_and_header(tmp_path: Path) -> None:
    space = tiny_space()
    lut = fake_table(space)
    lut.set_calibration(Calibration("linear", 1.1, 0.2, n=5, loo_mape=0.01))
    path = lut.save(tmp_path / "lut.json")
    data = json.loads(path.read_text())
    for key in ("schema", "device", "backend", "profile", "environment", "threads", "batch", "resolution",
                "num_classes", "in_chans", "space_name", "space_hash", "date", "predicted", "measurement",
                "calibration", "entries", "statistic"):
        assert key in data, key
    entry = next(iter(data["entries"].values()))
    assert {"count", "median_ms", "mean_ms", "std_ms", "p90_ms", "source"} <= set(entry)
    assert entry["source"] == "measured"
    back = LatencyTable.load(path)
    assert back.keys() == lut.keys() and back.calibration == lut.calibration and not back.predicted
    assert back.search_space() == space


@pytest.mark.parametrize("text, fragment", [
    ('{"schema": 1, "format": "formslim-nas latency LUT", "entries": {', "not valid JSON"),
    ("", "not valid JSON"),
    ('[1, 2]', "must hold a JSON object"),
    ('{"schema": 1}', "is not a latency LUT"),
])
def test_corrupt_files_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=fragment):
        LatencyTable.load(path)


def test_inconsistent_files_are_refused(tmp_path: Path) -> None:
    lut = fake_table(tiny_space())
    data = lut.to_dict()
    key = next(iter(data["entries"]))
    for mutate, fragment in [
        (lambda d: d.update(schema=3), "schema 3"),  # schema 2 is current since the HxW format
        (lambda d: d.pop("space_hash"), "space_hash"),
        (lambda d: d.update(predicted=True), "header says predicted"),
        (lambda d: d["entries"][key].update(median_ms=-1.0), key.split("|")[0]),
        (lambda d: d["entries"].update({"nonsense|cin=1": d["entries"][key]}), "nonsense"),
        (lambda d: d["calibration"].update(scale=0), "scale"),
        (lambda d: d.update(statistic="mean"), "statistic"),
    ]:
        bad = json.loads(json.dumps(data))
        mutate(bad)
        (tmp_path / "x.json").write_text(json.dumps(bad))
        with pytest.raises(FileFormatError, match=fragment):
            LatencyTable.load(tmp_path / "x.json")


def test_check_compatible_refuses_other_device_resolution_space() -> None:
    lut = fake_table(tiny_space())
    lut.check_compatible(device="demo", resolution=32, space_hash=tiny_space().hash)
    with pytest.raises(NasUserError, match="built for device 'demo', not 'iphone12'"):
        lut.check_compatible(device="iphone12")
    with pytest.raises(NasUserError, match="resolution 32, not 224"):
        lut.check_compatible(resolution=224)
    with pytest.raises(NasUserError, match="search space 'tiny_v2'"):
        lut.check_compatible(space_hash="0123456789ab")


def test_measured_always_wins_over_predicted() -> None:
    lut = fake_table(tiny_space())
    key = lut.keys()[0]
    before = lut[key]
    lut.set_predicted(key, 99.0)
    assert lut[key] == before and not lut.predicted
    other = LatencyTable(device="demo", backend="onnxruntime", distillation=True, space_name="s",
                         space_hash="h", measurement="predicted", **SETUP)  # type: ignore[arg-type]
    other.set_predicted(key, 2.0)
    assert other.predicted
    other.set_measured(key, LatencyStats.from_samples([1.0]))
    assert not other.predicted and other[key].median_ms == 1.0


def test_merge_shards_and_refuse_other_setups(tmp_path: Path) -> None:
    space = tiny_space()
    full = fake_table(space)
    keys = full.keys()
    shards = []
    for i in (1, 2):
        t = LatencyTable(device="demo", backend="onnxruntime", distillation=True, space_name=space.name,
                         space_hash=space.hash, space=space.to_dict(), shard=f"{i}/2", **SETUP)  # type: ignore[arg-type]
        for key in keys[i - 1::2]:
            t.set_entry(key, full[key])
        shards.append(t)
    merged = merge_tables(shards)
    assert merged.keys() == keys and merged.complete and merged.shard is None
    assert merged.expected_entries == len(keys)
    merged_half = merge_tables(shards[:1])
    assert not merged_half.complete
    stranger = LatencyTable(device="iphone12", backend="coreml", distillation=True, space_name=space.name,
                            space_hash=space.hash, **SETUP)  # type: ignore[arg-type]
    with pytest.raises(NasUserError, match="refusing to merge.*device='demo'.*device='iphone12'"):
        merge_tables([shards[0], stranger])


def test_parse_shard_and_spec_sharding() -> None:
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    for bad in ("0/3", "4/3", "a/b", "3", "1/0"):
        with pytest.raises(NasUserError, match="shard"):
            parse_shard(bad)
    space = tiny_space()
    every = lut_specs(space, **SETUP)  # type: ignore[arg-type]
    parts = [lut_specs(space, shard=(i, 3), **SETUP) for i in (1, 2, 3)]  # type: ignore[arg-type]
    assert sorted(s.key for p in parts for s in p) == sorted(s.key for s in every)


# --------------------------------------------------------------------------- prediction
def test_predict_latency_sums_blocks_and_applies_calibration() -> None:
    space = get_space("efficientformer_v2_demo")
    lut = fake_table(space, value=0.1)
    arch = space.sample(3)
    specs = lower(arch, resolution=32, num_classes=10, in_chans=1, distillation=True)
    assert predict_latency(arch, lut) == pytest.approx(0.1 * len(specs))
    lut.set_calibration(Calibration("blocks", 2.0, 0.5, per_block_ms=-0.01))
    expected = 0.5 + len(specs) * (2.0 * 0.1 - 0.01)
    assert predict_latency(arch, lut) == pytest.approx(expected)  # the cache follows the calibration
    bd = predict_breakdown(arch, lut)
    assert bd.total_ms == pytest.approx(expected) and bd.source == "measured-lut"
    assert [b.key for b in bd.blocks] == [s.key for s in specs]
    lut.set_statistic("min")
    assert predict_latency(arch, lut) == pytest.approx(0.5 + len(specs) * (2.0 * 0.09 - 0.01))


def test_missing_spec_error_names_key_nearest_and_command(tmp_path: Path) -> None:
    space = get_space("efficientformer_v2_demo")
    lut = fake_table(space)
    arch = space.largest()
    victim = lower(arch, resolution=32, num_classes=10, in_chans=1, distillation=True)[3]
    lut._entries.pop(victim.key)
    lut.save(tmp_path / "lut-demo-32.json")
    with pytest.raises(NasUserError) as info:
        predict_latency(arch, lut)
    msg = str(info.value)
    assert victim.key in msg and "nearest keys" in msg
    assert "nas-build-lut --device demo --space efficientformer_v2_demo --resolution 32" in msg
    assert "incomplete" in msg


def test_predict_latency_repeated_lookups_give_the_first_answer() -> None:
    """The fast path learns a signature per new architecture; new and repeated lookups must agree exactly.

    (Its throughput is a benchmark: ``experiments/bench_lut.py`` reports it, not this test.)
    """
    space = get_space("efficientformer_v2")
    lut = LatencyTable(device="demo", backend="onnxruntime", resolution=224, num_classes=1000, in_chans=3,
                       distillation=True, space_name=space.name, space_hash=space.hash, space=space.to_dict())
    rng = np.random.default_rng(1)
    for spec in enumerate_specs(space, resolution=224):
        lut.set_measured(spec.key, LatencyStats.from_samples([float(rng.uniform(0.01, 1.0))]))
    archs = [space.sample(i) for i in range(1500)]
    first = [predict_latency(a, lut) for a in archs]
    again = [predict_latency(a, lut) for a in reversed(archs)][::-1]
    assert again == first
    assert len(set(first)) > 1000, "random entries must give (almost) every architecture its own latency"
    for a, value in list(zip(archs, first))[::100]:
        exact = sum(lut[s.key].median_ms for s in lower(a, resolution=224, distillation=True))
        assert value == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("name, resolution", [("efficientformer_v2", 224), ("efficientformer_demo", 32),
                                              ("efficientvit", 224), ("efficientformer_v2_demo", 32)])
def test_fast_path_matches_lowering(name: str, resolution: int) -> None:
    space = get_space(name)
    if resolution <= 64 and space.family != "efficientvit":
        space = space.with_stem_stride(2)
    from search_spaces import family_defaults

    dist = family_defaults(space.family)
    lut = LatencyTable(device="d", backend="onnxruntime", resolution=resolution, num_classes=1000, in_chans=3,
                       distillation=dist, space_name=space.name, space_hash=space.hash, space=space.to_dict())
    rng = np.random.default_rng(0)
    for spec in enumerate_specs(space, resolution=resolution):
        lut.set_measured(spec.key, LatencyStats.from_samples([float(rng.uniform(0.1, 2.0))]))
    lut.set_calibration(Calibration("blocks", 1.1, 0.3, per_block_ms=-0.01))
    archs = [space.sample(i) for i in range(600)] + [space.largest(), space.smallest()]
    fast = [predict_latency(a, lut) for a in archs]
    exact = [predict_latency(a, lut, specs=lower(a, resolution=resolution, distillation=dist)) for a in archs]
    assert fast == pytest.approx(exact, rel=1e-9)
    from latency.predict import _compiled

    assert _compiled(lut).size < 5000  # figures are cached per unit, not per architecture


def _every_config(space: SearchSpace) -> list[ArchConfig]:
    """Every config of a (small) space, written out choice by choice."""
    per_stage = []
    for ch in space.stages:
        per_stage.append([ch.stage(w, exps, mixers) for w in ch.widths for d in ch.depths for n in ch.attn_range(d)
                          for exps in itertools.product(ch.expansions, repeat=d)
                          for mixers in itertools.product(ch.attn_mixers, repeat=n)])
    return [ArchConfig(space.family, stages, space.stem_stride, space.head_widths, space.head_dim)
            for stages in itertools.product(*per_stage)]


def _random_table(space: SearchSpace, resolution: int, seed: int) -> LatencyTable:
    """Random block figures under a calibration whose per-block constant makes some blocks cost less than nothing:
    then a deeper stage can be the faster one, and the minimum is not simply the smallest config."""
    from search_spaces import family_defaults

    dist = family_defaults(space.family)
    lut = LatencyTable(device="d", backend="onnxruntime", resolution=resolution, num_classes=10, in_chans=3,
                       distillation=dist, space_name=space.name, space_hash=space.hash, space=space.to_dict())
    rng = np.random.default_rng(seed)
    for spec in enumerate_specs(space, resolution=resolution, num_classes=10, in_chans=3):
        lut.set_measured(spec.key, LatencyStats.from_samples([float(rng.uniform(0.01, 1.0))]))
    lut.set_calibration(Calibration("blocks", 1.0, 0.3, per_block_ms=-0.2))
    return lut


@pytest.mark.parametrize("family", ["efficientformer_v2", "efficientformer"])
def test_fastest_is_the_least_prediction_of_every_config(family: str) -> None:
    """Checked against every config of a small space, written out one by one (29,376 for V2, 2,880 for V1)."""
    plain, mixers = ("ffn", ("lite", "attn")) if family == "efficientformer_v2" else ("pool", ("attn",))
    e = (2, 4) if family == "efficientformer_v2" else (3, 4)
    v2_only = (mixers, 1) if family == "efficientformer_v2" else ()  # V1 has attention in its last stage only
    space = SearchSpace(f"small_{family}", family, (
        StageChoices((16,), (1,), e, plain),
        StageChoices((16, 24), (1, 2), e, plain),
        StageChoices((32, 40), (1, 2), e, plain, *v2_only),
        StageChoices((48,), (1, 2), e, plain, mixers, max_attn=2, min_attn=1 if family == "efficientformer" else 0),
    ), stem_stride=2)
    configs = _every_config(space)
    assert 500 < len(configs) < 30_000 and all(space.contains(a) for a in configs)
    for seed in range(3):
        lut = _random_table(space, 32, seed)
        value, arch = fastest(space, lut)
        assert space.contains(arch)
        assert value == pytest.approx(predict_latency(arch, lut), rel=1e-12)
        assert value == pytest.approx(min(predict_latency(a, lut) for a in configs), rel=1e-12)


@pytest.mark.parametrize("name, resolution", [("efficientformer_v2", 224), ("efficientformer", 224),
                                              ("efficientvit", 224), ("efficientformer_v2_demo", 32)])
def test_fastest_of_every_space_beats_its_samples(name: str, resolution: int) -> None:
    space = get_space(name)
    lut = _random_table(space, resolution, 0)
    value, arch = fastest(space, lut)
    assert space.contains(arch) and value == pytest.approx(predict_latency(arch, lut), rel=1e-12)
    samples = [space.sample(i) for i in range(300)] + [space.smallest(), space.largest()]
    assert value <= min(predict_latency(a, lut) for a in samples)


# --------------------------------------------------------------------------- prior
def test_prior_features_match_exact_macs() -> None:
    for name, res in (("efficientformer_v2", 224), ("efficientformer", 224), ("efficientvit", 224)):
        for spec in enumerate_specs(get_space(name), resolution=res):
            f = block_features(spec)
            assert f["macs"] == block_macs(spec)
            assert f["act"] > 0


def test_nnls_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.normal(size=(9, 3))
        b = rng.normal(size=9)
        x = nnls(a, b)
        assert (x >= 0).all()
        errs = []  # brute force over the feasible active sets
        for mask in range(8):
            cols = [j for j in range(3) if mask >> j & 1]
            z = np.zeros(3)
            if cols:
                sol = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
                if (sol < 0).any():
                    continue
                z[cols] = sol
            errs.append(np.linalg.norm(a @ z - b))
        assert np.linalg.norm(a @ x - b) <= min(errs) + 1e-9


def test_iphone12_prior_leave_one_out() -> None:
    prior = iphone12_prior()
    assert prior.features == ("macs", "act", "const")
    assert set(prior.fitted_on) == set(IPHONE12_PRESET_MS)
    assert all(c >= 0 for c in prior.coefficients)
    print(f"\niPhone 12 prior: LOO MAPE {prior.loo_mape:.4f} (max {prior.loo_max_ape:.4f}); "
          f"MACs + const only: {fit_prior(features=('macs', 'const')).loo_mape:.4f}")
    assert prior.loo_mape < 0.10  # the shared reference facts: 8.1% is achievable; MACs alone 10.7%
    assert fit_prior(features=("macs", "const")).loo_mape == pytest.approx(0.107, abs=0.002)
    s0 = lower(__import__("search_spaces").get_preset("efficientformerv2_s0"), resolution=224)
    assert prior.network_ms(s0) == pytest.approx(prior.fit_ms["efficientformerv2_s0"])


def test_predicted_table_is_labelled_predicted(tmp_path: Path) -> None:
    space = tiny_space()
    lut = predicted_table(space, get_profile("iphone12"), **SETUP)  # type: ignore[arg-type]
    assert lut.predicted and lut.measurement == "predicted" and lut.calibration.method == "prior"
    assert all(e.source == "predicted" for _, e in lut.items())
    lut.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["predicted"] is True and data["prior"]["loo_mape"] > 0
    assert predict_breakdown(space.smallest(), LatencyTable.load(tmp_path / "p.json")).source == "predicted"


# --------------------------------------------------------------------------- calibration and metrics
def test_metrics_and_spearman() -> None:
    m = fidelity_metrics([1.0, 2.15, 2.9, 4.5], [1.0, 2.0, 3.0, 4.0])
    assert m["n"] == 4 and m["within_5"] == 0.25 + 0.25 and m["within_10"] == 0.75
    assert m["mape"] == pytest.approx((0 + 0.075 + 1 / 30 + 0.125) / 4)
    assert spearman([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(spearman([1, 1], [1, 2]))
    assert fidelity_metrics([1.0], [1.0])["spearman"] is None


def test_fit_calibration_recovers_line_and_block_overhead() -> None:
    rng = np.random.default_rng(0)
    raw = rng.uniform(5, 40, size=40)
    blocks = rng.integers(15, 40, size=40)
    kinds = [{"a": r * 0.5, "b": r * 0.5} for r in raw]
    y = 0.9 * raw + 1.5
    cal, loo, fitted = fit_calibration(raw, kinds, y, n_blocks=blocks)
    assert cal.method == "linear" and cal.scale == pytest.approx(0.9) and cal.offset_ms == pytest.approx(1.5)
    assert np.allclose(loo, y)
    y2 = 0.9 * raw - 0.05 * blocks + 1.0
    cal2, _, _ = fit_calibration(raw, kinds, y2, n_blocks=blocks)
    assert cal2.method == "blocks" and cal2.per_block_ms == pytest.approx(-0.05)
    assert cal2.apply({"a": raw[0]}, int(blocks[0])) == pytest.approx(y2[0])
    small, _, _ = fit_calibration([1.0, 2.0], [{}, {}], [2.0, 4.0])
    assert small.scale == 2.0 and small.loo_mape is None


# --------------------------------------------------------------------------- real measurements
def test_build_resume_shard_and_validate(tmp_path: Path) -> None:
    space = tiny_space()
    out = tmp_path / "lut.json"
    seen = []

    def stop_after_first_group(p: object) -> None:
        seen.append(p)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_lut(space, FAST, out=out, jobs=1, chunk=4, progress=stop_after_first_group, **SETUP)  # type: ignore[arg-type]
    partial = LatencyTable.load(out)
    assert len(partial) == 4 and not partial.complete
    first = {k: e for k, e in partial.items()}
    archs = sample_archs(space, 3, seed=1)
    res = build_lut(space, FAST, out=out, jobs=1, chunk=4, validation_archs=archs, **SETUP)  # type: ignore[arg-type]
    assert res.resumed == 4 and res.measured == len(lut_specs(space, **SETUP)) - 4  # type: ignore[arg-type]
    assert all(res.table[k] == e for k, e in first.items())  # finished entries were not measured again
    assert res.table.complete and len(res.networks) == 3
    rep = validate_lut(res.table, archs, res.networks, json_path=tmp_path / "v.json", png_path=tmp_path / "v.png")
    data = json.loads((tmp_path / "v.json").read_text())
    for key in ("n", "spearman", "mape", "within_5", "within_10"):
        assert key in data and key in data["raw"] and key in data["calibrated"]
    assert data["n"] == 3 and (tmp_path / "v.png").stat().st_size > 1000
    assert rep.calibration.method == "linear" and res.table.calibration == rep.calibration
    # shards with a worker pool, then merge
    shards = [build_lut(space, FAST, out=tmp_path / f"s{i}.json", shard=(i, 2), jobs=2 if i == 1 else 1,
                        **SETUP).table for i in (1, 2)]  # type: ignore[arg-type]
    merged = merge_tables(shards)
    assert merged.keys() == res.table.keys() and merged.complete
    with pytest.raises(NasUserError, match="refusing to resume.*resolution=32.*resolution=64"):
        build_lut(space, FAST, out=out, resolution=64, num_classes=10, in_chans=1)


def test_blocks_and_whole_networks_get_their_own_runs(tmp_path: Path) -> None:
    """A profile's block runs time the LUT's blocks; whole networks keep its warmup and repeats."""
    space = tiny_space()
    prof = FAST.replace(block_warmup=0, block_repeats=3)
    assert prof.runs("entry") == (0, 3) and prof.runs("model") == (1, 5) and FAST.runs("entry") == (1, 5)
    res = build_lut(space, prof, out=tmp_path / "lut.json", jobs=1, chunk=4,
                    validation_archs=sample_archs(space, 1, seed=4), **SETUP)  # type: ignore[arg-type]
    assert {e.stats.count for _, e in res.table.items()} == {3}
    assert [st.count for rounds in res.network_rounds.values() for st in rounds] == [5] * VALIDATION_ROUNDS
    with pytest.raises(NasUserError, match="block_repeats"):
        FAST.replace(block_repeats=0)


def test_local_bundle_round_trip_with_runner_subprocess(tmp_path: Path) -> None:
    space = tiny_space()
    archs = sample_archs(space, 3, seed=2)
    info = write_bundle(space, FAST, folder=tmp_path / "b", validation_archs=archs, jobs=1, **SETUP)  # type: ignore[arg-type]
    assert info.entries == len(lut_specs(space, **SETUP)) and info.models == 3  # type: ignore[arg-type]
    for name in ("manifest.json", "runner.py", "README.md"):
        assert (tmp_path / "b" / name).is_file()
    readme = (tmp_path / "b" / "README.md").read_text()
    assert "Mac" in readme and "Android" in readme and "--import" in readme
    proc = subprocess.run([sys.executable, str(tmp_path / "b" / "runner.py"), "-q", "--repeats", "5", "--warmup", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # rewriting the same bundle reuses every file and keeps the manifest's hash
    again = write_bundle(space, FAST, folder=tmp_path / "b", validation_archs=archs, jobs=1, **SETUP)  # type: ignore[arg-type]
    assert again.sha256 == info.sha256 and again.reused == info.entries + info.models
    res = import_results(tmp_path / "b" / "results.json", out=tmp_path / "lut.json", device="fast-cpu")
    assert res.complete and res.imported == info.entries and len(res.networks) == 3
    assert res.table.measurement == "bundle" and not res.table.predicted
    assert res.table.environment["manifest_sha256"] == info.sha256
    rep = validate_lut(res.table, res.archs, res.networks)
    assert rep.n == 3
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    # results that do not match the manifest
    bad = dict(results, manifest_sha256="0" * 64)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(NasUserError, match="does not match the bundle's manifest"):
        import_results(tmp_path / "bad.json", bundle=tmp_path / "b", out=tmp_path / "x.json")
    stray = json.loads(json.dumps(results))
    stray["results"]["ef2.ffn|cin=999|cout=999|size=8|hidden=1998"] = {"samples_ms": [1.0]}
    (tmp_path / "stray.json").write_text(json.dumps(stray))
    with pytest.raises(NasUserError, match="not in it"):
        import_results(tmp_path / "stray.json", bundle=tmp_path / "b", out=tmp_path / "x.json")
    (tmp_path / "trunc.json").write_text((tmp_path / "b" / "results.json").read_text()[:200])
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        import_results(tmp_path / "trunc.json", bundle=tmp_path / "b", out=tmp_path / "x.json")
    with pytest.raises(NasUserError, match="not 'iphone12'"):
        import_results(tmp_path / "b" / "results.json", out=tmp_path / "x.json", device="iphone12")


def test_iphone12_bundle_is_coreml(tmp_path: Path) -> None:
    space = tiny_v1_space()  # V2's ef2.down_attn does not convert to CoreML yet (supernet/blocks.py)
    info = write_bundle(space, get_profile("iphone12"), folder=tmp_path / "ios", jobs=1, **SETUP)  # type: ignore[arg-type]
    manifest = json.loads(info.manifest.read_text())
    assert manifest["format"] == "mlpackage" and manifest["compute_units"] == "ALL"
    assert manifest["toolkit"]["profile"]["precision"] == "fp16"
    assert all((tmp_path / "ios" / e["file"]).is_dir() for e in manifest["entries"])
    assert len(manifest["entries"]) == len(lut_specs(space, **SETUP))  # type: ignore[arg-type]
