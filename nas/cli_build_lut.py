"""``nas-build-lut``: build a device's latency lookup table (LUT) for a search space.

Every distinct block the space can produce at the resolution (stem, every block kind,
downsampling, head) is profiled on the device and stored in ``lut-<device>-<res>.json``.
``local-cpu`` is measured here, in this process. Other devices get a **bundle** (the block
models in the device's format, manifest.json, a standalone runner.py and a README) to run on
the device; ``--import`` turns its results.json into the LUT. Until then, ``iphone12`` also
gets a *predicted* LUT from an analytical prior, labelled predicted everywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from search_spaces import TASKS, LoweringSetup, SearchSpace, get_space, list_spaces, parse_resolution, resolution_json
from search_spaces.errors import NasUserError

from ._cli import NasArgumentParser, announce, int_at_least, resolution_arg, run_cli, seconds_arg

if TYPE_CHECKING:
    from tqdm import tqdm

    from latency.lut import LatencyTable
    from latency.measure import BuildProgress
    from latency.profiles import DeviceProfile
    from latency.stats import LatencyStats
    from search_spaces import ArchConfig

__all__ = ["build_parser", "main"]

logger = logging.getLogger("nas.cli_build_lut")
PROG = "nas-build-lut"
#: Subnets timed end to end by default after an in-process build, to fit its calibration. Ten give a
#: leave-one-out error for both the ``linear`` and ``blocks`` calibrations (``blocks`` needs 6), remove
#: the bias of plain sums (about +30% for the demo space at 32 px), and cost a few seconds per subnet.
DEFAULT_VALIDATE = 10

EPILOG = """examples:
  # in a folder where nas-train has run: the space, resolution and classes come from the run
  nas-build-lut --device local-cpu                  # measure every block here (ONNX Runtime, 1 thread),
                                                    # then 10 random subnets end to end: the calibration
  nas-build-lut --device local-cpu --validate 100   # 100 subnets instead (a tighter calibration)
  nas-build-lut --device local-cpu --validate 0     # blocks only, no calibration
  nas-build-lut --device local-cpu --space efficientformer_v2 --resolution 224
  nas-build-lut --device iphone12 --space efficientformer_v2 --resolution 512x1024 --task backbone

  # iPhone 12 (CoreML mlprogram, fp16, compute units ALL, iOS16)
  nas-build-lut --device iphone12                   # writes lut-iphone12-<res>.bundle/ (.mlpackage models)
                                                    # and a PREDICTED lut-iphone12-<res>.json meanwhile
  #   on a Mac: cd lut-iphone12-<res>.bundle && pip install numpy coremltools && python3 runner.py
  nas-build-lut --device iphone12 --import lut-iphone12-<res>.bundle/results.json   # measured wins

  # Snapdragon 855 (ONNX Runtime on the arm64 CPU, 1 thread on a big core)
  nas-build-lut --device snapdragon855 --validate 20   # bundle with 20 whole subnets for calibration
  #   on the phone (Termux) or board: pip install numpy onnxruntime && taskset 80 python3 runner.py
  nas-build-lut --device snapdragon855 --import lut-snapdragon855-<res>.bundle/results.json

  # your own device, no code: a TOML/JSON profile (fields of DeviceProfile, optionally base = "...")
  nas-build-lut --device-file pixel7.toml

  # split a build over machines or workers, then join the files
  nas-build-lut --device local-cpu --shard 1/2      # -> lut-local-cpu-<res>.shard-1of2.json
  nas-build-lut --device local-cpu --shard 2/2
  nas-build-lut --merge lut-local-cpu-224.shard-1of2.json lut-local-cpu-224.shard-2of2.json

  # the local bundle protocol, end to end on this machine
  nas-build-lut --device local-cpu --bundle b/ && python3 b/runner.py && nas-build-lut --import b/results.json

notes:
  An interrupted build resumes: run the same command again and finished entries are kept.
  A LUT of another device, resolution or space is never overwritten or mixed in.
  --validate writes <lut>.validation.json (n, spearman, mape, within_5, within_10; raw and
  calibrated), <lut>.validation.csv (one row per subnet) and <lut>.validation.png next to the
  LUT, and stores the calibration in it.
  Exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    p = NasArgumentParser(prog=PROG, description=__doc__.replace("``", ""), epilog=EPILOG)
    dev = p.add_argument_group("device")
    g = dev.add_mutually_exclusive_group()
    g.add_argument("--device", metavar="D",
                   help="iphone12, snapdragon855, local-cpu, or a .toml/.json profile file")
    g.add_argument("--device-file", metavar="FILE", help="a TOML or JSON device profile (no code needed)")
    dev.add_argument("--threads", type=int_at_least(1), metavar="N", help="override the profile's threads (local-cpu: 1)")
    dev.add_argument("--batch", type=int_at_least(1), metavar="N", help="override the profile's batch size (default 1)")
    what = p.add_argument_group("what to profile (default: from the latest nas-train run in this folder)")
    what.add_argument("--space", metavar="S", help=f"search space: {', '.join(list_spaces())}")
    what.add_argument("--resolution", type=resolution_arg, metavar="PX|HxW",
                      help="input size: 224 (square) or 512x1024 (height x width); default: the run's, or 224")
    what.add_argument("--num-classes", type=int_at_least(1), metavar="N", help="classes (default: the run's, or 1000)")
    what.add_argument("--in-chans", type=int_at_least(1), metavar="N", help="input channels (default: the run's, or 3)")
    what.add_argument("--task", choices=TASKS,
                      help="classify (default: networks end in the classifier head) or backbone (profiled without "
                           "the head, for detection and segmentation)")
    what.add_argument("--supernet", metavar="RUN_DIR", help="take the defaults from this run instead of the latest")
    out = p.add_argument_group("output and modes")
    out.add_argument("--out", metavar="FILE", help="the LUT file (default: lut-<device>-<res>.json here)")
    out.add_argument("--shard", metavar="I/N", help="measure only shard I of N (1-based); join with --merge")
    out.add_argument("--merge", nargs="+", metavar="FILE", help="join LUT files (shards) into --out")
    out.add_argument("--bundle", metavar="DIR",
                     help="write the device bundle to DIR (default for devices that are not this machine: "
                          "lut-<device>-<res>.bundle); with --import: the bundle the results belong to")
    out.add_argument("--import", dest="import_results", metavar="RESULTS",
                     help="build the LUT from a bundle runner's results.json")
    out.add_argument("--validate", type=int_at_least(0), metavar="N",
                     help=f"time N random subnets end to end, report fidelity, store a calibration (default for "
                          f"builds on this machine: {DEFAULT_VALIDATE}; 0 skips it; default for bundles: 0)")
    out.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the validation subnets (default 0)")
    out.add_argument("--statistic", choices=("median", "min"),
                     help="which figure of each measurement predictions use: min, the fastest run (default for "
                          "builds on this machine: robust when other processes share it, and it gave the better "
                          "fidelity in experiments/bench_lut.py) or median (default for imported results); both "
                          "are stored")
    out.add_argument("--jobs", type=int_at_least(1), metavar="N",
                     help="export worker processes (default: CPU count, max 8; 1 for small builds)")
    out.add_argument("--checkpoint-every", type=seconds_arg, default=5.0, metavar="SECONDS",
                     help="save the partial LUT at least this often (default 5)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# --------------------------------------------------------------------------- progress
class _Progress:
    """A tqdm bar on a terminal; otherwise an INFO line every 10% with the ETA."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled, self.label = enabled, label
        self.bar: tqdm | None = None
        self.last_decile = -1

    def __call__(self, p: BuildProgress) -> None:
        if not self.enabled:
            return
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=p.total, desc=self.label, unit="model", dynamic_ncols=True, leave=True)
            self.bar.n = p.done
            self.bar.set_postfix_str(p.last[:40], refresh=False)
            self.bar.refresh()
            return
        decile = int(10 * p.done / max(p.total, 1))
        if decile != self.last_decile:
            self.last_decile = decile
            eta = "?" if p.eta_s is None else f"{p.eta_s:.0f} s"
            logger.info("%s: %d/%d (%.0f s elapsed, eta %s)", self.label.removeprefix(f"{PROG} "), p.done, p.total, p.elapsed_s, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------- resolution of defaults
@dataclasses.dataclass
class _Setup:
    space: SearchSpace
    lowering: LoweringSetup  # its distillation None means the family default

    @property
    def resolution(self) -> tuple[int, int]:
        return self.lowering.resolution


def _profile(args: argparse.Namespace) -> DeviceProfile | None:
    from latency.profiles import get_profile, load_profile_file

    if args.device_file:
        profile = load_profile_file(args.device_file)
    elif args.device:
        profile = get_profile(args.device)
    else:
        return None
    if args.threads is not None:
        profile = profile.with_threads(args.threads)
    if args.batch is not None:
        profile = profile.replace(batch=args.batch)
    return profile


def _need_profile(profile: DeviceProfile | None) -> DeviceProfile:
    if profile is None:
        from latency.profiles import list_profiles

        raise NasUserError(f"say which device: --device {{{','.join(list_profiles())}}} or --device-file FILE")
    return profile


def _setup_from_space(args: argparse.Namespace) -> _Setup:
    space = get_space(args.space)
    resolution = args.resolution
    if resolution is None:
        resolution = (224, 224)
        announce(f"{PROG}: using resolution 224 (default; set --resolution)")
    if max(resolution) <= 64 and space.stem_stride != 2:
        space = space.with_stem_stride(2)
        announce(f"{PROG}: using stem stride 2 for resolution {LoweringSetup(resolution=resolution).text} (as "
                 f"nas-train does up to 64 px)")
    num_classes = args.num_classes or 1000
    in_chans = args.in_chans or 3
    if args.num_classes is None or args.in_chans is None:
        announce(f"{PROG}: using {num_classes} classes and {in_chans} input channels "
                 f"(set --num-classes/--in-chans)")
    return _Setup(space, LoweringSetup(resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                                       task=args.task or "classify"))


def _setup(args: argparse.Namespace) -> _Setup:
    if args.space is not None:
        return _setup_from_space(args)
    from supernet.run import find_latest_run, load_run

    if args.supernet is not None:
        run_dir = Path(args.supernet)
    else:
        try:
            run_dir = find_latest_run(".")
        except NasUserError:
            raise NasUserError(
                "no --space given and no finished supernet run in this folder: run nas-train first, or pass "
                f"--space SPACE --resolution PX (spaces: {', '.join(list_spaces())})") from None
    run = load_run(run_dir, check_weights=False)
    dist = run.meta.get("distillation")
    lowering = LoweringSetup(resolution=args.resolution or run.resolution,
                             num_classes=args.num_classes or run.num_classes, in_chans=args.in_chans or run.in_chans,
                             distillation=dist if isinstance(dist, bool) else None, task=args.task or "classify")
    announce(f"{PROG}: using supernet run {run_dir} (space {run.space.name}, hash {run.space.hash}, resolution "
             f"{lowering.text}, {lowering.num_classes} classes, {lowering.in_chans} input channels); set "
             f"--space/--resolution to choose")
    if lowering.resolution != parse_resolution(run.resolution):
        announce(f"{PROG}: note: --resolution {lowering.text} differs from the run's {run.resolution}; nas-search "
                 f"looks for the LUT at the run's resolution")
    return _Setup(run.space, lowering)


def _default_out(args: argparse.Namespace, device: str, resolution: tuple[int, int],
                 shard: tuple[int, int] | None, task: str = "classify") -> Path:
    from latency.lut import default_lut_path

    if args.out:
        return Path(args.out)
    path = default_lut_path(device, resolution, task=task)
    if shard:
        return path.with_name(f"{path.stem}.shard-{shard[0]}of{shard[1]}.json")
    return path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# --------------------------------------------------------------------------- modes
def _validate(table: LatencyTable, archs: Mapping[str, ArchConfig] | Sequence[ArchConfig],
              networks: Mapping[str, LatencyStats], out: Path, context: dict[str, Any]) -> None:
    from latency.validate import validate_lut, validation_paths

    jp, pp = validation_paths(out)
    report = validate_lut(table, archs, networks, json_path=jp, png_path=pp, csv_path=jp.with_suffix(".csv"),
                          context=context)
    table.save(out)
    print(report.summary())
    cal = report.calibration
    per_block = f", {cal.per_block_ms:+.4f} ms per block" if cal.per_block_ms else ""
    kinds = f", {len(cal.kind_scales)} per-kind scales" if cal.kind_scales else ""
    print(f"validation: {jp}, {jp.with_suffix('.csv')} and {pp}; calibration {cal.method} (scale {cal.scale:.4f}, "
          f"offset {cal.offset_ms:+.4f} ms{per_block}{kinds}) stored in {out}")


def _merge(args: argparse.Namespace, profile: DeviceProfile | None) -> int:
    from latency.lut import LatencyTable, default_lut_path
    from latency.merge import merge_tables

    tables = [LatencyTable.load(p) for p in args.merge]
    if profile is not None and tables[0].device != profile.name:
        raise NasUserError(f"{args.merge[0]!r} holds a LUT for device {tables[0].device!r}, not {profile.name!r}")
    merged = merge_tables(tables)
    out = Path(args.out) if args.out else default_lut_path(merged.device, merged.resolution, task=merged.setup.task)
    inputs = {Path(p).resolve() for p in args.merge}
    if out.exists() and out.resolve() not in inputs:
        raise NasUserError(f"{str(out)!r} exists and is not one of the files to merge; pass --out or add it to --merge")
    merged.save(out)
    status = "complete" if merged.complete else (
        f"INCOMPLETE: {merged.expected_entries - len(merged)} of {merged.expected_entries} entries missing; "
        f"build the missing shard(s) and merge again")
    print(f"merged {len(tables)} files into {out}: {len(merged)} entries, {status}")
    return 0


def _import(args: argparse.Namespace, profile: DeviceProfile | None) -> int:
    from latency.importing import import_results

    res = import_results(args.import_results, bundle=args.bundle, out=args.out,
                         device=profile.name if profile is not None else None)
    t = res.table
    if args.statistic:
        t.set_statistic(args.statistic)
        t.save()
    print(f"imported {res.imported} measured entries into {res.path} ({t.describe()})"
          + (f"; replaced {res.replaced_predicted} predicted entries" if res.replaced_predicted else ""))
    print(f"latency source: {t.source_label}")
    if t.stand_in_host is not None:
        print(f"note: these figures time the Mac that ran the bundle ({t.stand_in_host}), not the {t.device} itself; "
              f"for the phone itself use Xcode's Core ML performance report on the .mlpackage files")
    if t.predicted:
        print(f"note: {t.n_predicted} entries are still PREDICTED (not in these results)")
    if res.networks and not res.complete:
        print("note: validation skipped: the results are partial; run runner.py again to finish them, then import "
              "again")
    elif res.networks:
        _validate(t, res.archs, res.networks, res.path, {"measured": "bundle", "results": str(args.import_results)})
    return 0


def _already_validated(out: Path, profile: DeviceProfile, setup: _Setup, archs: list[ArchConfig],
                       statistic: str) -> bool:
    """True when ``out`` is complete and already validated on exactly these subnets with this statistic."""
    from latency.lut import LatencyTable
    from latency.validate import validation_paths
    from search_spaces.fileio import read_json

    jp, _ = validation_paths(out)
    if not (archs and out.is_file() and jp.is_file()):
        return False
    try:
        table = LatencyTable.load(out)
        report = read_json(jp, what="validation report")
    except NasUserError:
        return False  # a damaged file: build and validate again
    if not table.complete or table.statistic != statistic or table.calibration.method == "none":
        return False
    if (table.device, table.setup.resolution, table.task, table.space_hash) != (
            profile.name, setup.resolution, setup.lowering.task, setup.space.hash):
        return False
    rows = report.get("subnets") if isinstance(report, dict) else None
    done = {r.get("arch_hash") for r in rows if isinstance(r, dict)} if isinstance(rows, list) else set()
    return report.get("statistic") == statistic and done == {a.hash for a in archs}


def _local(args: argparse.Namespace, profile: DeviceProfile, setup: _Setup, out: Path, shard: tuple[int, int] | None,
           archs: list[ArchConfig]) -> int:
    from latency.measure import build_lut

    statistic = args.statistic or "min"
    if _already_validated(out, profile, setup, archs, statistic):
        print(f"{PROG}: {out} is complete and already validated on these {len(archs)} subnets; nothing to do "
              f"(delete it, or pass another --seed, to measure again)")
        return 0

    bar = _Progress(not args.no_progress, f"{PROG} {profile.name}")
    try:
        res = build_lut(setup.space, profile, setup=setup.lowering, out=out, shard=shard,
                        validation_archs=archs, statistic=statistic, jobs=args.jobs,
                        checkpoint_every_s=args.checkpoint_every,
                        progress=bar)
    except RuntimeError as exc:  # a block the exporter cannot handle: a bug, not bad input
        sys.stderr.write(f"{PROG}: failed: {str(exc).splitlines()[0]}; finished entries are kept in {out}\n")
        return 1
    finally:
        bar.close()
    t = res.table
    extra = f" and {len(res.networks)} subnets end to end" if res.networks else ""
    print(f"{PROG}: {len(t)} entries ({res.measured} measured now, {res.resumed} from an earlier run){extra} "
          f"in {res.seconds:.1f} s -> {out} ({t.source_label})")
    noisy = sum(1 for _, e in t.items() if e.stats is not None and e.stats.noisy)
    if noisy:
        load = getattr(os, "getloadavg", lambda: (float("nan"),))()[0]  # (not on Windows)
        print(f"note: {noisy} of {len(t)} entries are noisy (IQR > 10% of the median; load average {load:.2f} on "
              f"{os.cpu_count()} cores): other processes on the CPU, or blocks too short to time steadily")
    if archs:
        _validate(t, archs, res.networks, out, {
            "measured": "in-process", "interleaved_with_blocks": res.measured > 0,
            "warmup": profile.warmup, "repeats": profile.repeats, "threads": profile.threads})
    return 0


def _remote(args: argparse.Namespace, profile: DeviceProfile, setup: _Setup, out: Path, shard: tuple[int, int] | None,
            archs: list[ArchConfig]) -> int:
    from latency.bundle import default_bundle_path, write_bundle
    from latency.bundle_runner import BundleError

    folder = Path(args.bundle) if args.bundle else default_bundle_path(profile.name, setup.resolution, task=setup.lowering.task)
    if profile.name == "iphone12" and shard is None:
        _predicted(profile, setup, out)  # first: usable even if the bundle cannot be finished here
    if args.bundle is None:
        announce(f"{PROG}: {profile.name} is not this machine: writing a bundle to {folder} (set --bundle)")
    bar = _Progress(not args.no_progress, f"{PROG} bundle")
    t0 = time.monotonic()
    try:
        info = write_bundle(setup.space, profile, folder=folder, setup=setup.lowering, shard=shard,
                            validation_archs=archs, jobs=args.jobs, progress=bar)
    except BundleError as exc:
        raise NasUserError(f"the bundle written to {folder} is invalid: {exc}") from None
    except RuntimeError as exc:  # a block the exporter or converter cannot handle: a bug, not bad input
        sys.stderr.write(f"{PROG}: failed: {str(exc).splitlines()[0]}; the model files written so far are kept in "
                         f"{folder}, and a rerun continues from them\n")
        return 1
    finally:
        bar.close()
    print(f"wrote bundle {folder}: {info.entries} block models ({profile.model_format})"
          + (f" + {info.models} whole subnets" if info.models else "")
          + f", manifest.json (sha256 {info.sha256[:12]}), runner.py, README.md in {time.monotonic() - t0:.1f} s")
    where = "on a Mac" if profile.backend == "coreml" else "on the device"
    print(f"next: copy {folder} to the device and run `python3 runner.py` in it {where} (see {folder}/README.md), "
          f"then: {PROG} --device {profile.name} --import {folder}/results.json")
    return 0


def _predicted(profile: DeviceProfile, setup: _Setup, out: Path) -> None:
    from latency.lut import LatencyTable
    from latency.prior import iphone12_prior, predicted_table

    table = predicted_table(setup.space, profile, setup=setup.lowering)
    if out.exists():
        old = LatencyTable.load(out)
        old.check_same_setup(table, action="replace")
        if any(e.measured for _, e in old.items()):
            print(f"kept {out}: it holds measured entries, and a measured figure always wins over a predicted one")
            return
    table.save(out)
    prior = iphone12_prior()
    print(f"wrote PREDICTED {out}: {len(table)} entries from the iPhone 12 prior (features "
          f"{', '.join(prior.features)}; leave-one-out MAPE {_pct(prior.loo_mape)}, max {_pct(prior.loo_max_ape)} "
          f"on the 7 EfficientFormer presets at 224 px). Import measurements to replace it.")
    if setup.resolution != (224, 224):
        print(f"note: the prior is fitted at 224 px; at {setup.lowering.text} px its figures are extrapolations")


def _validation_archs(args: argparse.Namespace, setup: _Setup, *, default: int) -> list[ArchConfig]:
    """The subnets to time end to end: ``--validate N`` of them, or ``default`` when it is not given."""
    from latency.validate import sample_archs

    if args.validate is not None:
        return sample_archs(setup.space, args.validate, seed=args.seed) if args.validate else []
    if not default:
        return []
    try:
        archs = sample_archs(setup.space, default, seed=args.seed)
    except NasUserError:
        announce(f"{PROG}: using --validate 0: the space has fewer than {default} subnets to validate on by default "
                 f"(set --validate N)")
        return []
    announce(f"{PROG}: using --validate {default} (default for builds on this machine: {default} random subnets "
             f"end to end calibrate the LUT; --validate 0 skips it)")
    return archs


def _body(args: argparse.Namespace) -> int:
    from latency.specs import parse_shard

    argv = list(getattr(args, "_argv", []))
    profile = _profile(args)
    if args.merge:
        for dest, flag in (("import_results", "--import"), ("validate", "--validate"), ("shard", "--shard"),
                           ("bundle", "--bundle")):
            if getattr(args, dest):
                raise NasUserError(f"--merge cannot be combined with {flag}")
        return _merge(args, profile)
    if args.import_results:
        if args.validate or args.shard:
            raise NasUserError("--import takes the validation subnets and shard from the bundle; drop --validate/--shard")
        return _import(args, profile)
    profile = _need_profile(profile)
    shard = parse_shard(args.shard)
    if args.validate and shard:
        raise NasUserError("--validate needs the whole LUT; run it after --merge, without --shard")
    setup = _setup(args)
    out = _default_out(args, profile.name, setup.resolution, shard, setup.lowering.task)
    local = profile.is_local and args.bundle is None
    archs = _validation_archs(args, setup, default=DEFAULT_VALIDATE if local and not shard else 0)
    rc = (_local if local else _remote)(args, profile, setup, out, shard, archs)
    from ._provenance import write_command

    write_command(out.parent if str(out.parent) else Path("."), PROG, argv, {
        "device": profile.to_dict(), "space": setup.space.name, "space_hash": setup.space.hash,
        "resolution": resolution_json(setup.resolution), "num_classes": setup.lowering.num_classes,
        "in_chans": setup.lowering.in_chans, "task": setup.lowering.task,
        "out": str(out), "shard": args.shard, "validate": len(archs), "seed": args.seed,
        "bundle": args.bundle, "mode": "in-process" if local else "bundle"})
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.set_defaults(_argv=argv)
    return run_cli(PROG, parser, _body, argv)


if __name__ == "__main__":
    sys.exit(main())
