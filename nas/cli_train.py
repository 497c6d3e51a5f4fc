"""``nas-train``: train a weight-sharing supernet over a search space.

Each step trains the largest, the smallest and --num-random random subnets (sandwich rule),
the others distilled from the largest. A checkpoint is written at every epoch end (and every
--save-every steps); running the same command again resumes where it stopped, and a finished
run is not trained twice. Distributed: torchrun --nproc_per_node N -m nas.cli_train ...
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from search_spaces.errors import NasUserError
from search_spaces.fileio import read_json

from ._cli import NasArgumentParser, announce, run_cli
from ._provenance import write_command

EPILOG = """examples:
  nas-train                                         the CPU demo recipe (V2 demo space, Fashion-MNIST 32 px)
  nas-train --space efficientformer_v2 --dataset fashion-mnist --resolution 32 --epochs 5 --out runs/fmnist
  nas-train --space efficientformer_v2 --dataset imagefolder:/data/imagenet --resolution 224 --device cuda
  torchrun --nproc_per_node 2 -m nas.cli_train --dataset synthetic --epochs 1

outputs (in --out): supernet.safetensors, supernet.json, train_log.csv, checkpoint.safetensors
"""


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from supernet.train import TrainConfig

    d = TrainConfig()
    p = NasArgumentParser(prog="nas-train", description=__doc__, epilog=EPILOG)
    p.add_argument("--config", help="JSON file of settings (field names as below, with underscores); flags override it")
    p.add_argument("--out", help="run folder (default: runs/<space>-<dataset>-r<resolution>)")
    p.add_argument("--restart", action="store_true", help="discard a checkpoint or finished run in --out")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in --out and continue it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("training settings")
    g.add_argument("--space", help=f"search space (default {d.space}; see nas-info --list for presets)")
    g.add_argument("--dataset", help=f"fashion-mnist, imagefolder:PATH or synthetic[:N] (default {d.dataset})")
    g.add_argument("--resolution", type=int, help=f"input side in pixels (default {d.resolution})")
    g.add_argument("--stem-stride", type=int, help="stem stride 2 or 4 (default: 2 for resolutions up to 64, for "
                                                   "small images; else the space's ImageNet-shaped 4)")
    g.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=int, help=f"global batch (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {d.lr})")
    g.add_argument("--min-lr", type=float, help=f"final learning rate of the cosine schedule (default {d.min_lr})")
    g.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    g.add_argument("--warmup-epochs", type=float, help=f"default {d.warmup_epochs}")
    g.add_argument("--label-smoothing", type=float, help=f"default {d.label_smoothing}")
    g.add_argument("--num-random", type=int, help=f"random subnets per step (default {d.num_random})")
    g.add_argument("--distill", type=_bool, help="in-place distillation from the largest (default true)")
    g.add_argument("--seed", type=int, help=f"default {d.seed}")
    g.add_argument("--train-subset", type=int, help="train on this many images only (seeded)")
    g.add_argument("--val-size", type=int, help="validation images carved from the training set")
    g.add_argument("--calib-batches", type=int, help=f"BN recalibration batches (default {d.calib_batches})")
    g.add_argument("--save-every", type=int, help="also checkpoint every N steps (default: epoch ends only)")
    g.add_argument("--device", help="cpu or cuda (default cpu)")
    g.add_argument("--channels-last", type=_bool, help="NHWC memory format (default true)")
    g.add_argument("--bf16", type=_bool, help="bfloat16 autocast (default: on for cuda)")
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the supernet (GPU)")
    g.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return p


def resolve_config(args: argparse.Namespace) -> Any:
    from supernet.train import TrainConfig

    settings: dict[str, Any] = {}
    if args.config:
        loaded = read_json(args.config, what="--config file")
        if not isinstance(loaded, dict):
            raise NasUserError(f"--config {args.config!r} must hold a JSON object of settings")
        settings.update(loaded)
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    try:
        return TrainConfig.from_dict(settings)
    except TypeError as exc:
        raise NasUserError(f"bad training settings: {exc}") from None


def default_out(cfg: Any) -> Path:
    dataset = cfg.dataset.split(":")[0]
    return Path("runs") / f"{cfg.space}-{dataset}-r{cfg.resolution}"


def _body(args: argparse.Namespace) -> int:
    from supernet.train import CHECKPOINT, train

    cfg = resolve_config(args)
    out = Path(args.out) if args.out else default_out(cfg)
    if not args.out:
        announce(f"nas-train: writing the run to {out} (set --out to choose)")
    if args.restart and out.exists():
        for name in (CHECKPOINT, "supernet.safetensors", "supernet.json", "train_log.csv"):
            (out / name).unlink(missing_ok=True)
    if args.resume and not (out / CHECKPOINT).is_file():
        raise NasUserError(f"--resume: no checkpoint in {out}; run without --resume to start training")
    result = train(cfg, out, resume=True, progress=not args.no_progress,
                   on_start=lambda: write_command(out, "nas-train", args.argv, cfg.to_dict()))
    if result.already_complete:
        announce(f"nas-train: {out} is already trained with these settings (use --restart to train again)")
    m = result.metrics
    if m:
        print(f"supernet: {out}/supernet.safetensors")
        for key in ("val_acc_largest", "val_acc_smallest", "test_acc_largest", "test_acc_smallest"):
            if key in m:
                print(f"  {key:<18} {m[key]:.4f}")
        if "train_seconds" in m:
            print(f"  train time         {m['train_seconds']:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.set_defaults(argv=list(sys.argv[1:] if argv is None else argv))
    return run_cli("nas-train", parser, _body, argv)


if __name__ == "__main__":
    sys.exit(main())
