"""Benchmark of the latency LUT (issues 5 and 11.3): build time, fidelity next to the measurement's own
noise, the iPhone 12 prior and lookup speed.

    python experiments/bench_lut.py                       # full default V2 space at 224, 100 + 40 subnets
    python experiments/bench_lut.py --validate 30 --retest 20 --space efficientformer_v2_demo --resolution 32

1. Build the local-cpu LUT of the space from scratch (ONNX Runtime, 1 thread): entries, seconds,
   and the ratio to the 60 s target, with the load average (other processes share the machine).
2. Time ``--validate`` random subnets end to end (each exported whole, timed alone in 3 rounds
   far apart; the best round counts) and compare them with the LUT sums, raw and calibrated
   (leave-one-out), for both statistics the LUT stores (median, fastest run). With
   ``--compare-runs N``, the LUT is built again with 5 warm-up and N timed runs per block (the
   local-cpu profile's setting before 2026-12-03; blocks now get 1 and 10, whole networks still 5
   and 30) and both are validated against the same subnets.
3. Test-retest: the same ``--retest`` subnets measured end to end twice, in two separate
   processes. Run 2 against run 1 is the measurement's own disagreement (Spearman, MAPE, within
   5% / 10%); it is printed next to the LUT's calibrated fidelity against each run, so a
   within-5% figure can be read next to the noise floor.
4. The iPhone 12 prior's leave-one-out error on the seven presets, for several feature sets.
5. ``predict_latency`` lookups per second.

Targets: build <= 60 s on 2 cores; after calibration Spearman >= 0.98, >= 99% within 10%,
>= 90% within 5%. Results go to ``--out`` (JSON) and stdout, with the environment block.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from latency import (
    LatencyTable,
    build_lut,
    fit_prior,
    get_profile,
    iphone12_prior,
    measure_networks,
    predict_latency,
    sample_archs,
    validate_lut,
)
from latency.lut import default_lut_path
from latency.specs import lut_specs
from latency.runtime import measurement_environment
from latency.stats import LatencyStats
from latency.validate import fidelity_metrics
from search_spaces import ArchConfig, LoweringSetup, family_defaults, get_space

HERE = Path(__file__).resolve().parent
TARGET_BUILD_S = 60.0


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _line(tag: str, m: dict) -> str:
    rho = "n/a" if m["spearman"] is None else f"{m['spearman']:.4f}"
    return (f"  {tag:<28} Spearman {rho}  MAPE {_pct(m['mape'])}  within 5% {_pct(m['within_5'])}  "
            f"within 10% {_pct(m['within_10'])}  max {_pct(m['max_ape'])}  bias {m['bias']:+.3f}")


def _measure_only(archs_file: Path, out: Path) -> int:
    """Child process of the test-retest: time the networks of ``archs_file`` end to end, write their stats."""
    spec = json.loads(archs_file.read_text())
    archs = [ArchConfig.from_dict(a) for a in spec["archs"]]
    setup = LoweringSetup(**spec["setup"])
    nets = measure_networks(archs, get_profile("local-cpu"), setup=setup, jobs=spec.get("jobs"))
    out.write_text(json.dumps({name: st.to_dict() for name, st in nets.items()}))
    return 0


def _retest_runs(archs: list, setup: LoweringSetup, jobs: int | None, work: Path) -> list[dict[str, LatencyStats]]:
    """The same networks measured end to end twice, each time in a fresh process."""
    spec = {"archs": [a.to_dict() for a in archs], "jobs": jobs,
            "setup": {"resolution": list(setup.resolution), "num_classes": setup.num_classes,
                      "in_chans": setup.in_chans, "distillation": setup.distillation}}
    runs = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        (Path(tmp) / "archs.json").write_text(json.dumps(spec))
        for r in (1, 2):
            out = Path(tmp) / f"run{r}.json"
            subprocess.run([sys.executable, __file__, "--measure-only", str(Path(tmp) / "archs.json"), str(out)],
                           check=True)
            runs.append({k: LatencyStats.from_dict(v) for k, v in json.loads(out.read_text()).items()})
    return runs


def _retest(lut: LatencyTable, archs: list, runs: list[dict[str, LatencyStats]], say,
            other: tuple[str, LatencyTable] | None = None) -> dict:
    """Run 2 against run 1 (the noise floor) and the LUT's fidelity against each run, per statistic; also
    ``other``'s (a second LUT, by tag), if given."""
    names = [f"subnet-{a.hash}" for a in archs]
    out: dict = {"n": len(names)}
    for statistic in ("min", "median"):
        pick = (lambda st: st.min_ms) if statistic == "min" else (lambda st: st.median_ms)
        r1, r2 = [pick(runs[0][n]) for n in names], [pick(runs[1][n]) for n in names]
        lut.set_statistic(statistic)
        vs = [validate_lut(lut, archs, run) for run in runs]
        out[statistic] = {"run2_vs_run1": fidelity_metrics(r2, r1),
                          "lut_vs_run1": {"raw": vs[0].raw, "calibrated": vs[0].calibrated},
                          "lut_vs_run2": {"raw": vs[1].raw, "calibrated": vs[1].calibrated}}
        say(f"test-retest, statistic {statistic}, {len(names)} subnets measured end to end in two separate processes:")
        say(_line("run 2 vs run 1 (noise floor)", out[statistic]["run2_vs_run1"]))
        say(_line("LUT calibrated (LOO) vs run 1", vs[0].calibrated))
        say(_line("LUT calibrated (LOO) vs run 2", vs[1].calibrated))
        if other is not None:
            tag, table = other
            table.set_statistic(statistic)
            ws = [validate_lut(table, archs, run) for run in runs]
            out[statistic][f"{tag}_vs_run1"] = {"raw": ws[0].raw, "calibrated": ws[0].calibrated}
            out[statistic][f"{tag}_vs_run2"] = {"raw": ws[1].raw, "calibrated": ws[1].calibrated}
            say(_line(f"{tag} LUT vs run 1", ws[0].calibrated))
            say(_line(f"{tag} LUT vs run 2", ws[1].calibrated))
    lut.set_statistic("median")
    return out


def _export_paths(specs: list, n: int, seed: int, work: Path, say) -> dict:
    """Blocks written both ways, side by side: recorded from their forward (what builds use) and by the
    TorchScript exporter. Export time per block (build, graph, ONNX Runtime optimisation), and the
    latency of the two optimized graphs timed round-robin in one loop, with a second session of the
    exported graph as the noise floor."""
    import random
    import statistics
    import warnings

    import onnx

    from latency import bundle_runner as runner
    from latency._private import entry_item, onnx_bytes
    from latency.measure import _ort_options, _run_fn
    from latency.runtime import export_onnx, ort_session
    from supernet.blocks import build_block

    profile = get_profile("local-cpu")
    opts = _ort_options(profile)  # as a build's export workers optimize graphs, and its timing opens them
    picked = random.Random(seed).sample(specs, min(n, len(specs)))
    seconds = {"recorded": 0.0, "torchscript": 0.0}
    ratios, floor, fallbacks = [], [], 0
    kinds: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(dir=work) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, spec in enumerate(picked):
            item, paths = entry_item(spec, profile.batch), {}
            for way in ("recorded", "torchscript"):
                t0 = time.perf_counter()
                module = build_block(spec).eval()
                data = onnx_bytes(item, module, check=False) if way == "recorded" else \
                    export_onnx(module, item.input_shape, check=False)
                paths[way] = os.path.join(tmp, f"{way}{i}.onnx")
                ort_session(data, save_optimized=paths[way], **opts)
                seconds[way] += time.perf_counter() - t0
                if way == "recorded":
                    fallbacks += onnx.load_model_from_string(data).producer_name != "nas-toolkit"
            fns = [_run_fn(item, paths[w], profile) for w in ("recorded", "torchscript", "torchscript")]
            warmup, repeats = profile.runs("entry")
            rec, ts, ts2 = (statistics.median(x) for x in runner.time_runs(fns, warmup=warmup, repeats=repeats))
            ratios.append(rec / ts)
            floor.append(ts2 / ts)
            kinds.setdefault(spec.kind, []).append((rec / ts, ts2 / ts))
    k = len(picked)

    def spread(xs: list[float]) -> dict:
        dev = sorted(abs(x - 1) for x in xs)
        return {"median_ratio": statistics.median(xs), "mean_abs_dev": sum(dev) / len(dev),
                "within_5": sum(d <= 0.05 for d in dev) / len(dev), "max_abs_dev": dev[-1]}

    out = {"n": k, "ms_per_block": {w: 1e3 * t / k for w, t in seconds.items()},
           "speedup": seconds["torchscript"] / seconds["recorded"], "fallbacks": fallbacks,
           "latency_recorded_vs_exported": spread(ratios), "latency_exported_vs_itself": spread(floor),
           "by_kind": {kind: {"n": len(v), "recorded_vs_exported": spread([a for a, _ in v]),
                              "exported_vs_itself": spread([b for _, b in v])} for kind, v in sorted(kinds.items())}}
    say(f"export, {k} random blocks written both ways: recorded {out['ms_per_block']['recorded']:.1f} ms per "
        f"block, TorchScript {out['ms_per_block']['torchscript']:.1f} ms ({out['speedup']:.1f}x; build, graph and "
        f"ONNX Runtime optimisation; {fallbacks} fell back to the exporter)")
    for tag, key in (("recorded / exported graph", "latency_recorded_vs_exported"),
                     ("exported / itself (noise)", "latency_exported_vs_itself")):
        m = out[key]
        say(f"  latency {tag:<26} median ratio {m['median_ratio']:.3f}  mean |dev| {_pct(m['mean_abs_dev'])}  "
            f"within 5% {_pct(m['within_5'])}  max |dev| {_pct(m['max_abs_dev'])}")
    for kind, m in out["by_kind"].items():
        a, b = m["recorded_vs_exported"], m["exported_vs_itself"]
        say(f"    {kind:<14} n={m['n']:<3} recorded/exported median {a['median_ratio']:.3f}, within 5% "
            f"{_pct(a['within_5'])}; exported/itself median {b['median_ratio']:.3f}, within 5% {_pct(b['within_5'])}")
    return out


def _compare_runs(space, profile, args, classes: int, chans: int, dist: bool, archs: list, nets: dict,
                  lut: LatencyTable, seconds: float | None, say) -> dict:
    """The LUT built again with 5 warm-up and ``--compare-runs`` timed runs per block, both validated
    against the same end-to-end measurements: what the profile's fewer runs cost in fidelity."""
    many = profile.replace(block_warmup=5, block_repeats=args.compare_runs)
    path = args.work / f"lut-local-cpu-{args.resolution}-runs{args.compare_runs}.json"
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    build_lut(space, many, resolution=args.resolution, out=path, num_classes=classes, in_chans=chans, jobs=args.jobs)
    other_s = time.perf_counter() - t0
    other = LatencyTable.load(path)
    (w1, r1), (w2, r2) = profile.runs("entry"), many.runs("entry")
    out: dict = {"profile": {"warmup": w1, "repeats": r1, "build_s": seconds},
                 "compared": {"warmup": w2, "repeats": r2, "build_s": other_s, "lut": str(path)}}
    say(f"runs per block: the LUT built again with {w2} warm-up and {r2} timed runs per block in {other_s:.1f} s "
        f"(the profile's {w1} and {r1}: {'reused' if seconds is None else f'{seconds:.1f} s'}), both against the "
        f"same {len(archs)} subnets:")
    for statistic in ("median", "min"):
        for tag, table in ((f"{r1} runs", lut), (f"{r2} runs", other)):
            table.set_statistic(statistic)
            rep = validate_lut(table, archs, nets)
            out.setdefault(statistic, {})[tag] = {"raw": rep.raw, "calibrated": rep.calibrated}
            say(_line(f"{statistic}, {tag}, calibrated", rep.calibrated))
    lut.set_statistic("median")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="efficientformer_v2")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--validate", type=int, default=100)
    p.add_argument("--retest", type=int, default=40, help="subnets measured twice, in two processes (0: skip)")
    p.add_argument("--export-blocks", type=int, default=60,
                   help="blocks written both ways (recorded and TorchScript), side by side (0: skip)")
    p.add_argument("--compare-runs", type=int, default=30, metavar="N",
                   help="also build the LUT with 5 warm-up and N timed runs per block (the profile's former "
                        "setting) and validate both against the same subnets (0: skip)")
    p.add_argument("--measure-only", nargs=2, type=Path, metavar=("ARCHS", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None, help="export workers (default: CPU count, max 8)")
    p.add_argument("--work", type=Path, default=HERE / "results" / "bench_lut", help="folder for the LUT and reports")
    p.add_argument("--out", type=Path, default=HERE / "results" / "lut.json")
    p.add_argument("--reuse-lut", action="store_true", help="skip the build when the LUT exists")
    args = p.parse_args()
    if args.measure_only:
        return _measure_only(*args.measure_only)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.extend(text.splitlines())

    profile = get_profile("local-cpu")
    space = get_space(args.space)
    if args.resolution <= 64 and space.family != "efficientvit":
        space = space.with_stem_stride(2)
    classes, chans = (1000, 3) if args.resolution > 64 else (10, 1)
    dist = family_defaults(space.family)
    env = measurement_environment(profile)
    say(f"environment: {platform.platform()}, {env['host']['cpu']}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, versions {env['host']['versions']}, load average {_load()}")
    args.work.mkdir(parents=True, exist_ok=True)
    lut_path = default_lut_path("local-cpu", args.resolution, args.work)
    result: dict = {"environment": env, "space": space.name, "space_hash": space.hash,
                    "resolution": args.resolution, "load_before": _load()}

    # 1. build
    if not (args.reuse_lut and lut_path.is_file()):
        lut_path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        built = build_lut(space, profile, resolution=args.resolution, out=lut_path, num_classes=classes,
                          in_chans=chans, jobs=args.jobs)
        seconds = time.perf_counter() - t0
        noisy = sum(1 for _, e in built.table.items() if e.stats is not None and e.stats.noisy)
        say(f"build: {len(built.table)} entries in {seconds:.1f} s, {seconds / TARGET_BUILD_S:.2f}x the target of "
            f"{TARGET_BUILD_S:.0f} s on 2 cores; {noisy} noisy entries (IQR > 10% of the median); load average "
            f"before {result['load_before']}, after {_load()}")
        result["build"] = {"entries": len(built.table), "seconds": seconds, "target_s": TARGET_BUILD_S,
                           "ratio_to_target": seconds / TARGET_BUILD_S, "noisy": noisy, "load_after": _load()}
    lut = LatencyTable.load(lut_path)
    if args.export_blocks:
        specs = lut_specs(space, resolution=args.resolution, num_classes=classes, in_chans=chans, distillation=dist)
        result["export"] = _export_paths(specs, args.export_blocks, args.seed, args.work, say)

    # 2. fidelity
    if args.validate:
        archs = sample_archs(space, args.validate, seed=args.seed)
        t0 = time.perf_counter()
        nets = measure_networks(archs, profile, resolution=args.resolution, num_classes=classes, in_chans=chans,
                                distillation=dist, jobs=args.jobs)
        say(f"measured {len(nets)} subnets end to end in {time.perf_counter() - t0:.1f} s (3 rounds each)")
        result["fidelity"] = {}
        for statistic in ("median", "min"):
            lut.set_statistic(statistic)
            rep = validate_lut(lut, archs, nets, json_path=args.work / f"validation-{statistic}.json",
                               png_path=args.work / f"validation-{statistic}.png",
                               context={"measured": "in-process, after the build", "rounds": 3})
            say(f"fidelity, statistic {statistic}, {rep.n} subnets (calibration {rep.calibration.method}):")
            say(_line("raw LUT sums", rep.raw))
            say(_line("calibrated (leave-one-out)", rep.calibrated))
            result["fidelity"][statistic] = {"raw": rep.raw, "calibrated": rep.calibrated,
                                             "calibration": rep.calibration.to_dict()}
        lut.set_statistic("median")
        if args.compare_runs:
            result["runs_check"] = _compare_runs(space, profile, args, classes, chans, dist, archs, nets, lut,
                                                 result.get("build", {}).get("seconds"), say)
        validate_lut(lut, archs, nets, json_path=lut_path.with_name(lut_path.stem + ".validation.json"))
        lut.save()
        shutil.copyfile(args.work / "validation-median.png", lut_path.with_name(lut_path.stem + ".validation.png"))

    # 3. test-retest
    if args.retest:
        archs = sample_archs(space, args.retest, seed=args.seed + 1)
        t0 = time.perf_counter()
        runs = _retest_runs(archs, LoweringSetup(resolution=args.resolution, num_classes=classes, in_chans=chans,
                                                 distillation=dist), args.jobs, args.work)
        say(f"test-retest: {args.retest} subnets measured twice in {time.perf_counter() - t0:.1f} s; load average "
            f"{_load()}")
        other = None
        if "runs_check" in result:  # the LUT built with more runs per block, scored on the same retest runs
            compared = result["runs_check"]["compared"]
            other = (f"{compared['repeats']}-run", LatencyTable.load(compared["lut"]))
        result["retest"] = _retest(LatencyTable.load(lut_path), archs, runs, say, other)
        result["retest"]["archs"] = {f"subnet-{a.hash}": a.to_dict() for a in archs}
        result["retest"]["runs"] = [{k: st.to_dict() for k, st in run.items()} for run in runs]

    # 4. the iPhone 12 prior
    result["prior"] = {}
    say("iPhone 12 prior, leave-one-out over the 7 presets (V2 paper's table):")
    for feats in (("macs",), ("macs", "const"), ("macs", "act"), ("macs", "act", "const"),
                  ("macs_dense", "macs_dw", "macs_attn", "act", "const")):
        pr = fit_prior(features=feats)
        say(f"  {'+'.join(feats):<40} LOO MAPE {_pct(pr.loo_mape)} (max {_pct(pr.loo_max_ape)})")
        result["prior"]["+".join(feats)] = {"loo_mape": pr.loo_mape, "loo_max_ape": pr.loo_max_ape}
    result["prior"]["default"] = iphone12_prior().to_dict()

    # 5. lookups per second
    archs = [space.sample(10_000 + i) for i in range(6000)]
    rates = []
    for batch in (archs[:3000], archs[3000:], archs[3000:]):
        t0 = time.perf_counter()
        for a in batch:
            predict_latency(a, lut)
        rates.append(len(batch) / (time.perf_counter() - t0))
    say(f"predict_latency: {rates[0]:,.0f}/s for the first 3,000 new architectures (learning included), "
          f"{rates[1]:,.0f}/s for the next 3,000 new, {rates[2]:,.0f}/s repeated (target >= 10,000/s)")
    result["lookups_per_s"] = {"first_new": rates[0], "new": rates[1], "repeated": rates[2]}
    result["summary_lines"] = [ln for ln in lines if not ln.startswith("environment:")]
    result["date"] = time.strftime("%Y-%m-%d")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
