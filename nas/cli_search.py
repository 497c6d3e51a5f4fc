"""``nas-search``: find the most accurate subnet of a trained supernet within latency and size budgets.

Accuracy is the supernet's shared weights with recalibrated BN on the validation split; latency
comes from the LUTs built by nas-build-lut (predicted LUTs are labelled predicted everywhere).
Outputs: subnet.json (the best feasible subnet), pareto.csv, pareto.png, pareto.html, search.json,
and for --strategy slim the path.csv. Exit code 3 when nothing meets the budgets (at once, before any
evaluation, for a budget that no config of the space meets: its least latency, params and MACs are exact).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from search_spaces import TASKS
from search_spaces.errors import NasUserError
from search_spaces.fileio import atomic_write_text

from ._cli import NasArgumentParser, announce, int_at_least, positive_float, resolution_arg, run_cli
from .objectives import MesWeights
from .search import SearchSettings, strategy_names
from .search_run import NoFeasibleSubnet, SearchRunConfig, run_search

EPILOG = """examples:
  nas-search --latency 1.6ms --max-params 5M          defaults: latest supernet run, the one LUT here
  nas-search --device local-cpu --latency 5ms --strategy nsga2 --n-trials 200
  nas-search --latency iphone12=1.6ms --latency local-cpu=15ms --max-params 5M
  nas-search --latency 1.6ms --max-params 5M --strategy gumbel    on an efficientformer (V1) space
  nas-search --latency 1600us --max-macs 300M --supernet runs/fmnist --lut lut-iphone12-224.json
  nas-search --resolution 512x1024 --task backbone --latency 20ms   budgets of the headless backbone at 512x1024
  several workers on one study: nas-search ... --strategy nsga2 --storage postgresql://host/db --study-name s1

units: latency 1.6ms, 1600us, 0.0016s; counts 5M, 500K, 5e6, 5000000
"""


def build_parser() -> argparse.ArgumentParser:
    d, m = SearchSettings(), MesWeights()
    p = NasArgumentParser(prog="nas-search", description=__doc__, epilog=EPILOG)
    p.add_argument("--latency", action="append", default=[], metavar="[DEVICE=]TIME",
                   help="latency budget, repeatable; a bare value applies to --device")
    p.add_argument("--device", help="device of bare --latency values and of the plots (default: the only LUT here)")
    p.add_argument("--max-params", help="parameter budget, e.g. 5M")
    p.add_argument("--max-macs", help="MAC budget, e.g. 300M")
    p.add_argument("--supernet", help="supernet run folder (default: the latest one under this folder)")
    p.add_argument("--lut", action="append", default=[], help="LUT file, repeatable (default: lut-DEVICE-RES.json here)")
    p.add_argument("--resolution", type=resolution_arg, metavar="PX|HxW",
                   help="input size the latency and size budgets apply to: 224 or 512x1024 (default: the "
                        "supernet's); needs a LUT built at it (nas-build-lut --resolution ...). Accuracy stays "
                        "the supernet's at its training input")
    p.add_argument("--task", choices=TASKS, default="classify",
                   help="classify (default) or backbone: budgets apply to the network without its head, as "
                        "deployed under a detector or segmenter; needs a backbone LUT (nas-build-lut --task backbone)")
    p.add_argument("--out", help="output folder (default: runs/search, and subnet.json is also copied here)")
    p.add_argument("--strategy", default=d.strategy,
                   help=f"one of {', '.join(strategy_names())}: slim is EfficientFormerV2's joint slimming, "
                        f"nsga2 optuna's NSGA-II, gumbel EfficientFormer's latency-driven slimming (V1 spaces)")
    p.add_argument("--seed", type=int_at_least(0), default=d.seed)
    p.add_argument("--val-images", type=int_at_least(1), default=2000, help="validation images per accuracy estimate")
    p.add_argument("--calib-batches", type=int_at_least(1), default=4,
                   help="BN recalibration batches of 128 training images per candidate (default 4)")
    p.add_argument("--threads", type=int_at_least(1), help="torch threads for accuracy evaluation (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress lines")
    g = p.add_argument_group("slim", "fast by default: an accuracy predictor ranks each step's actions, the best "
                                     "get real evaluations with successive halving of images, several actions per "
                                     "step while far from the budgets, and only the blocks after a shared prefix "
                                     "are recalibrated and run; every figure on the path is a real evaluation")
    g.add_argument("--extra-steps", type=int_at_least(0), default=d.extra_steps, help="steps to continue after all budgets are met")
    g.add_argument("--exhaustive", action="store_true",
                   help="evaluate every action of every step on every image (the original, slow algorithm)")
    g.add_argument("--max-actions", type=int_at_least(0), default=d.max_actions,
                   help="exhaustive slim that evaluates N random actions per step, each on every image (implies --exhaustive; when none of them gains MES, N more are drawn before slim stops; 0: every action)")
    g.add_argument("--top-k", type=int_at_least(1), default=d.top_k,
                   help=f"actions per step, best ranked by the predictor, that get a real evaluation "
                        f"(default {d.top_k}; half as many, rounded up, while far from the budgets)")
    g.add_argument("--explore", type=int_at_least(0), default=d.explore,
                   help=f"further random actions per step that get a real evaluation "
                        f"(default {d.explore}; half as many, rounded up, while far from the budgets)")
    g.add_argument("--rung-images", type=int_at_least(1), default=d.rung_images,
                   help=f"validation images of the first halving rung (default {d.rung_images})")
    g.add_argument("--max-combine", type=int_at_least(1), default=d.max_combine,
                   help=f"most actions applied together per step while far from the budgets (default {d.max_combine}; 1: one)")
    g.add_argument("--far", type=float, default=d.far,
                   help=f"far from the budgets = more than this fraction over the most violated one (default {d.far})")
    g.add_argument("--prefix-cache-mb", type=int_at_least(0), default=d.prefix_cache_mb,
                   help=f"memory for the current subnet's block inputs (default {d.prefix_cache_mb})")
    g = p.add_argument_group("nsga2")
    g.add_argument("--n-trials", type=int_at_least(1), default=d.n_trials, help="COMPLETE trials in total, exactly, over every worker of the study (a rerun resumes it)")
    g.add_argument("--population-size", type=int_at_least(2), default=d.population_size)
    g.add_argument("--storage", help="optuna storage URL (default: sqlite in --out); share it between workers")
    g.add_argument("--study-name", default=d.study_name)
    g.add_argument("--surrogate", action="store_true",
                   help="score trials that the accuracy predictor says cannot win with the predictor instead "
                        "of a real evaluation (default: every trial is evaluated for real)")
    g = p.add_argument_group("gumbel", "EfficientFormer (V1)'s latency-driven slimming, for the efficientformer "
                                       "spaces: Gumbel-softmax logits over each block's meta-path (Meta4D, Meta3D or "
                                       "identity), expansion and the stage widths, trained through the frozen "
                                       "supernet against the expected LUT latency and size; then discretised "
                                       "within the budgets")
    g.add_argument("--gumbel-steps", type=int_at_least(1), default=d.gumbel_steps,
                   help=f"optimisation steps of the logits (default {d.gumbel_steps})")
    g.add_argument("--gumbel-batch-size", type=int_at_least(1), default=d.gumbel_batch_size,
                   help=f"training images per step (default {d.gumbel_batch_size})")
    g.add_argument("--gumbel-lr", type=positive_float, default=d.gumbel_lr,
                   help=f"Adam learning rate of the logits (default {d.gumbel_lr})")
    g.add_argument("--gumbel-penalty", type=float, default=d.gumbel_penalty,
                   help=f"weight of each budget's hinge on its expected cost (default {d.gumbel_penalty})")
    g = p.add_argument_group("MES = score * (latency / U_latency)^-a_latency * (params / U_params)^-a_params")
    g.add_argument("--mes-u-latency", type=float, default=m.u_latency_ms, help="U_latency in ms")
    g.add_argument("--mes-u-params", type=float, default=m.u_params, help="U_params")
    g.add_argument("--mes-a-latency", type=float, default=m.a_latency, help="a_latency")
    g.add_argument("--mes-a-params", type=float, default=m.a_params, help="a_params")
    return p


def _body(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise NasUserError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    settings = SearchSettings(strategy=args.strategy, seed=args.seed, max_actions=args.max_actions,
                              extra_steps=args.extra_steps, exhaustive=args.exhaustive, top_k=args.top_k,
                              explore=args.explore, rung_images=args.rung_images, max_combine=args.max_combine,
                              far=args.far, prefix_cache_mb=args.prefix_cache_mb, surrogate=args.surrogate,
                              n_trials=args.n_trials, population_size=args.population_size, storage=args.storage,
                              study_name=args.study_name, gumbel_steps=args.gumbel_steps,
                              gumbel_batch_size=args.gumbel_batch_size, gumbel_lr=args.gumbel_lr,
                              gumbel_penalty=args.gumbel_penalty)
    weights = MesWeights(u_latency_ms=args.mes_u_latency, u_params=args.mes_u_params,
                         a_latency=args.mes_a_latency, a_params=args.mes_a_params)
    out = args.out or "runs/search"
    if not args.out:
        announce(f"nas-search: writing results to {out} (set --out to choose)")
    cfg = SearchRunConfig(latency=tuple(args.latency), device=args.device, max_params=args.max_params,
                          max_macs=args.max_macs, supernet=args.supernet, luts=tuple(args.lut), out=out,
                          val_images=args.val_images, calib_batches=args.calib_batches, settings=settings,
                          mes=weights, resolution=args.resolution, task=args.task)
    try:
        result = run_search(cfg, notify=announce, progress=None if args.no_progress else announce)
    except NoFeasibleSubnet as exc:
        sys.stderr.write(f"nas-search: {exc}\n")
        return 3
    b = result.best
    print(f"best subnet: accuracy {100 * b.accuracy:.2f}% (validation, proxy), {b.params:,} params, "
          f"{b.macs / 1e6:.1f}M MACs")
    for dev, v in b.latency_ms.items():
        src = result.subnet.metrics["latency_ms"][dev]["source"]
        print(f"  {dev}: {v:.3f} ms ({src})")
    print(f"  arch {b.arch.to_string()}")
    o = result.outcome
    print(f"search: {o.seconds:.1f} s, {len(o.candidates)} candidates ({o.evaluated} newly evaluated), "
          f"{60 * len(o.candidates) / max(o.seconds, 1e-9):.1f} candidates/min")
    line = predictor_line(o.stats)
    if line:
        print(line)
    print(f"files: {', '.join(str(p) for p in result.files.values())}")
    if not args.out:
        atomic_write_text(Path("subnet.json"), result.files["subnet.json"].read_text())
        print("wrote subnet.json; next: nas-extract subnet.json")
    return 0


def predictor_line(stats: dict[str, Any]) -> str | None:
    """The summary line on the accuracy predictor, when the search used one and could rank it: the
    fast slim path counts actions, NSGA-II with ``--surrogate`` counts trials."""
    if stats.get("predictor_spearman") is None:
        return None
    line = (f"  accuracy predictor: Spearman {stats['predictor_spearman']:.3f} on {stats['predictor_held_out']} "
            f"evaluated subnets it had not been trained on")
    if stats.get("predictor_spearman_accuracy") is not None:   # the fast slim path predicts the loss
        line += f" (loss; {stats['predictor_spearman_accuracy']:.3f} against accuracy on the same images)"
    if "actions_evaluated" in stats:
        line += f"; {stats['actions_evaluated']} of {stats['actions_considered']} actions evaluated"
    if "trials_predicted" in stats:
        line += f"; {stats['trials_predicted']} of {stats['trials']} trials scored by the predictor alone"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("nas-search", build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
