"""``nas-train``: train a weight-sharing supernet over a search space.

Each step trains the largest, the smallest and --num-random random subnets (sandwich rule),
the others distilled from the largest. A checkpoint is written at every epoch end (and every
--save-every steps); running the same command again resumes where it stopped, and a finished
run is not trained twice. Distributed: torchrun --nproc_per_node N -m nas.cli_train ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from search_spaces.errors import NasUserError
from search_spaces.fileio import read_json

from ._cli import NasArgumentParser, add_schema_flags, announce, run_cli, schema_flag_values
from ._provenance import write_command

if TYPE_CHECKING:
    from supernet.train_config import TrainConfig

EPILOG = """examples:
  nas-train                                         the CPU demo recipe (V2 demo space, Fashion-MNIST 32 px)
  nas-train --space efficientformer_v2 --dataset fashion-mnist --resolution 32 --epochs 5 --out runs/fmnist
  nas-train --space efficientformer_v2 --dataset imagefolder:/data/imagenet --resolution 224 --device cuda
  torchrun --nproc_per_node 2 -m nas.cli_train --dataset synthetic --epochs 1

outputs (in --out): supernet.safetensors, supernet.json, train_log.csv, checkpoint.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``nas-train`` parser: run options, then one flag per :class:`~supernet.train.TrainConfig` field."""
    from supernet.train_config import TrainConfig

    p = NasArgumentParser(prog="nas-train", description=__doc__, epilog=EPILOG)
    p.add_argument("--config", help="JSON file of settings (field names as below, with underscores); flags override it")
    p.add_argument("--out", help="run folder (default: runs/<space>-<dataset>-r<resolution>)")
    p.add_argument("--restart", action="store_true", help="discard a checkpoint or finished run in --out")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in --out and continue it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_schema_flags(p.add_argument_group("training settings"), TrainConfig)
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The settings of ``--config`` (if given) overridden by the flags given, validated."""
    from supernet.train_config import TrainConfig

    settings: dict[str, object] = {}
    if args.config:
        loaded = read_json(args.config, what="--config file")
        if not isinstance(loaded, dict):
            raise NasUserError(f"--config {args.config!r} must hold a JSON object of settings")
        settings.update(loaded)
    flags = schema_flag_values(args, TrainConfig)
    settings.update(flags)
    return TrainConfig.from_dict(settings, source=args.config or "", flags=set(flags))


def default_out(cfg: TrainConfig) -> Path:
    dataset = cfg.dataset.split(":")[0]
    return Path("runs") / f"{cfg.space}-{dataset}-r{cfg.resolution_text}"


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
