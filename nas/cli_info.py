"""``nas-info``: print an architecture's blocks, exact parameter count and MACs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from search_spaces import TASKS, count_macs, count_params, format_resolution, get_preset, list_presets, lower

from ._cli import NasArgumentParser, run_cli
from .info import describe, format_table, pretrained_report, resolve_target

EPILOG = """examples:
  nas-info efficientformerv2_s0             block table of a preset at 224
  nas-info efficientformerv2_s0 --json      the same as one JSON object
  nas-info runs/search1/subnet.json         a searched subnet
  nas-info efficientformer_l1 --resolution 448 --num-classes 10
  nas-info efficientformerv2_s0 --resolution 512x1024 --task backbone   as a detection backbone
  nas-info --list                           every preset with its exact parameter count
  nas-info subnet.json --lut lut-iphone12-224.json   + latency from a LUT (predicted ones are labelled)
  nas-info efficientformerv2_s0 --pretrained efficientformerv2_s0.safetensors   load published weights
"""


def build_parser() -> argparse.ArgumentParser:
    p = NasArgumentParser(prog="nas-info", description=__doc__, epilog=EPILOG)
    p.add_argument("target", nargs="?", help="a preset name or a subnet.json file")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--resolution", help="input size in pixels: 224, or HEIGHTxWIDTH such as 512x1024 "
                                        "(default: 224 or the file's)")
    p.add_argument("--task", choices=TASKS, help="classify (with the head) or backbone (without it; "
                                                 "default: classify or the file's)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: 1000 or the file's)")
    p.add_argument("--in-chans", type=int, help="input channels (default: 3 or the file's)")
    p.add_argument("--lut", action="append", default=[],
                   help="LUT file for a latency figure, repeatable (default: lut-*-<resolution>.json here)")
    p.add_argument("--pretrained", metavar="PATH",
                   help="load a checkpoint (timm, snap-research or mit-han-lab layout; .safetensors, or .pth/.pt "
                        "read weights-only) into the model and report what loaded")
    return p


def _body(args: argparse.Namespace) -> int:
    if args.list:
        rows = []
        for name in list_presets():
            specs = lower(get_preset(name))
            rows.append({"name": name, "family": get_preset(name).family,
                         "params": count_params(specs), "macs": count_macs(specs)})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'preset':<22} {'family':<20} {'params':>12} {'GMACs @224':>11}")
            for r in rows:
                print(f"{r['name']:<22} {r['family']:<20} {r['params']:>12,} {r['macs'] / 1e9:>11.3f}")
        return 0
    if not args.target:
        build_parser().error("give a preset name or a subnet.json file, or --list")
    name, sub = resolve_target(args.target, resolution=args.resolution, num_classes=args.num_classes,
                               in_chans=args.in_chans, task=args.task)
    luts = [Path(p) for p in args.lut] or sorted(Path(".").glob(f"lut-*-{format_resolution(sub.hw)}.json"))
    info = describe(name, sub, luts=luts, strict=bool(args.lut))  # a LUT the user named must work
    if args.pretrained:
        info["pretrained"] = pretrained_report(sub, args.pretrained)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("nas-info", build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
