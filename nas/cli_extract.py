"""``nas-extract``: turn a searched subnet into a standalone, exported and measured model.

Copies the subnet's weights out of its supernet (checking that outputs match within 1e-5),
recalibrates BN, optionally fine-tunes, reports validation and test accuracy, exports
model.safetensors, model.onnx (checked against torch within 1e-4) and model.mlpackage (CoreML,
converted here; prediction needs macOS), measures local-cpu latency next to the LUT prediction,
and writes a model card (model.md). Load the result with nas.extract.load_subnet(folder).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._cli import NasArgumentParser, announce, int_at_least, positive_float, run_cli
from .extract import FORMATS, extract

EPILOG = """examples:
  nas-extract subnet.json                       supernet from subnet.json's provenance
  nas-extract subnet.json --finetune-epochs 3 --out model/
  nas-extract runs/search/subnet.json --supernet runs/fmnist --formats safetensors,onnx
  nas-extract subnet.json --features-only         a backbone for detection or segmentation
  nas-extract subnet.json --finetune-epochs 2 --teacher runs/extract-largest   hard distillation from a teacher
"""


def build_parser() -> argparse.ArgumentParser:
    p = NasArgumentParser(prog="nas-extract", description=__doc__, epilog=EPILOG)
    p.add_argument("subnet", help="subnet.json written by nas-search (or by hand)")
    p.add_argument("--supernet", help="supernet run folder (default: the one named in subnet.json)")
    p.add_argument("--out", help="output folder (default: runs/extract-<arch hash>)")
    p.add_argument("--finetune-epochs", type=int_at_least(0), default=0, help="fine-tune the extracted model (default 0)")
    p.add_argument("--finetune-lr", type=positive_float, default=5e-4, help="fine-tuning learning rate (default 5e-4)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of the fine-tuning's initial state and data order (default 0): repeat a fine-tuning "
                        "with several seeds to see its spread")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--no-measure", action="store_true", help="skip the local-cpu latency measurement")
    p.add_argument("--features-only", action="store_true",
                   help="write a backbone without the classifier head: the model returns one feature map per stage "
                        "(for detection and segmentation); ONNX and CoreML get one output per stage")
    p.add_argument("--teacher", help="distil from this teacher while fine-tuning (needs --finetune-epochs): an "
                                     "extracted model folder, or PRESET=WEIGHTS such as efficientformerv2_s0=w.pth")
    return p


def _body(args: argparse.Namespace) -> int:
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    r = extract(args.subnet, supernet=args.supernet, out=args.out, finetune_epochs=args.finetune_epochs,
                finetune_lr=args.finetune_lr, formats=formats, measure=not args.no_measure,
                features_only=args.features_only, teacher=args.teacher, seed=args.seed, notify=announce,
                progress=announce)
    m = r.metrics
    print(f"extracted model: {r.out}" + (f" ({m['deployed_as']})" if "deployed_as" in m else ""))
    print(f"  params {m['params']:,}; val accuracy {100 * m['val_accuracy_inherited']:.2f}% (inherited)"
          + (f", {100 * m['val_accuracy_finetuned']:.2f}% (fine-tuned)" if "val_accuracy_finetuned" in m else "")
          + f"; test accuracy {100 * m['test_accuracy']:.2f}%")
    for dev, v in m.get("latency_ms", {}).items():
        parts = []
        if "measured" in v:
            parts.append(f"measured {v['measured']:.3f} ms ({v.get('statistic', 'median')})")
        if "lut" in v:
            parts.append(f"LUT {v['lut']:.3f} ms ({v['lut_source']})")
        print(f"  {dev}: {', '.join(parts)}")
    if "coreml_prediction" in m:
        print(f"  CoreML: {m['coreml_prediction']}")
    print(f"  files: {', '.join(sorted(r.files))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("nas-extract", build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
