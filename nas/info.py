"""Describe an architecture: blocks, exact parameters and MACs (``nas-info``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from search_spaces import (
    ArchConfig, BlockSpec, block_macs, block_params, family_defaults, get_preset, list_presets,
)
from search_spaces.errors import NasUserError
from search_spaces.subnet_file import SubnetFile

__all__ = ["resolve_target", "describe", "format_table", "lut_latencies", "pretrained_report"]


def resolve_target(target: str, *, resolution: int | None = None, num_classes: int | None = None,
                   in_chans: int | None = None) -> tuple[str, SubnetFile]:
    """Turn a preset name or a ``subnet.json`` path into ``(name, SubnetFile)``.

    Explicit ``resolution`` / ``num_classes`` / ``in_chans`` override the file's values.
    """
    path = Path(target)
    if target.endswith(".json") or path.is_file():
        sub = SubnetFile.load(path)
        name = path.stem if path.name != "subnet.json" else str(path)
    elif target in list_presets():
        arch = get_preset(target)
        sub = SubnetFile(arch, distillation=family_defaults(arch.family))
        name = target
    else:
        raise NasUserError(
            f"{target!r} is neither a preset nor a subnet.json file; known presets: {', '.join(list_presets())}"
        )
    overrides = {k: v for k, v in (("resolution", resolution), ("num_classes", num_classes),
                                   ("in_chans", in_chans)) if v is not None}
    for key, value in overrides.items():
        low = 8 if key == "resolution" else 1
        if value < low:
            raise NasUserError(f"--{key.replace('_', '-')} must be an integer >= {low}, got {value}")
    if overrides:
        sub = SubnetFile(sub.arch, overrides.get("resolution", sub.resolution),
                         overrides.get("num_classes", sub.num_classes), overrides.get("in_chans", sub.in_chans),
                         sub.distillation, sub.metrics, sub.provenance)
    return name, sub


def _stage_labels(specs: tuple[BlockSpec, ...]) -> list[str]:
    labels, stage = [], 1
    for i, s in enumerate(specs):
        if i == 0:
            labels.append("stem")
        elif i == len(specs) - 1:
            labels.append("head")
        else:
            if s.out_size < s.size:
                stage += 1
            labels.append(str(stage))
    return labels


def lut_latencies(sub: SubnetFile, luts: list[Path], *, strict: bool = False) -> dict[str, dict[str, Any]]:
    """Latency of ``sub`` from each LUT that fits its resolution, labelled measured-lut or predicted.

    A LUT that does not cover the architecture (another space) gives an ``error`` entry instead,
    unless ``strict`` (LUTs the user named): then every problem is raised.
    """
    out: dict[str, dict[str, Any]] = {}
    if not luts:
        return out
    from latency import LatencyTable, predict_latency

    for path in luts:
        try:
            lut = LatencyTable.load(path)
            lut.check_compatible(resolution=sub.resolution)
            if (lut.num_classes, lut.in_chans) != (sub.num_classes, sub.in_chans):
                if strict:
                    raise NasUserError(f"LUT {str(path)!r} is for {lut.num_classes} classes and {lut.in_chans} "
                                       f"input channels, not {sub.num_classes} and {sub.in_chans}")
                continue
            value = predict_latency(sub.arch, lut)
        except NasUserError as exc:
            if strict:
                raise
            out[path.stem] = {"error": str(exc).split(";")[0], "lut": str(path)}
            continue
        out[lut.device] = {"value": value, "source": "predicted" if lut.predicted else "measured-lut",
                           "lut": str(path)}
    return out


def describe(name: str, sub: SubnetFile, *, luts: list[Path] | None = None, strict: bool = False) -> dict[str, Any]:
    """Everything ``nas-info --json`` prints: totals, one row per block, and latency per LUT given."""
    specs = sub.specs()
    blocks = []
    for label, s in zip(_stage_labels(specs), specs):
        blocks.append({
            "stage": label, "kind": s.kind, "key": s.key, "cin": s.cin, "cout": s.cout, "size": s.size,
            "stride": s.stride, "hidden": s.hidden, "params": block_params(s), "macs": block_macs(s),
        })
    arch: ArchConfig = sub.arch
    return {
        "name": name,
        "family": arch.family,
        "arch": arch.to_string(),
        "arch_hash": arch.hash,
        "params": sum(b["params"] for b in blocks),
        "macs": sum(b["macs"] for b in blocks),
        "resolution": sub.resolution,
        "num_classes": sub.num_classes,
        "in_chans": sub.in_chans,
        "distillation": sub.distillation,
        "widths": list(arch.widths),
        "depths": list(arch.depths),
        "blocks": blocks,
        "latency_ms": lut_latencies(sub, luts or [], strict=strict),
        "metrics": dict(sub.metrics),
    }


def pretrained_report(sub: SubnetFile, path: str | Path) -> dict[str, Any]:
    """Build ``sub``'s model, load the checkpoint at ``path`` into it, and return the load report (a dict)."""
    from supernet import build_model
    from supernet.pretrained import load_pretrained

    model = build_model(sub.arch, num_classes=sub.num_classes, resolution=sub.resolution, in_chans=sub.in_chans,
                        distillation=sub.distillation)
    report = load_pretrained(model, path)
    return {"summary": report.summary(), **report.to_dict()}


def format_table(info: dict[str, Any]) -> str:
    """Human-readable block table."""
    lines = [
        f"{info['name']}: family {info['family']}, resolution {info['resolution']}, "
        f"{info['num_classes']} classes, {info['in_chans']} input channels",
        f"  widths {info['widths']}  depths {info['depths']}  (arch {info['arch_hash']})",
        "",
        f"  {'#':>3} {'stage':>5}  {'kind':<14} {'in':>5} {'out':>5} {'map':>5} {'hidden':>6} {'params':>12} {'MACs':>14}",
    ]
    for i, b in enumerate(info["blocks"]):
        lines.append(
            f"  {i:>3} {b['stage']:>5}  {b['kind']:<14} {b['cin']:>5} {b['cout']:>5} {b['size']:>5} "
            f"{b['hidden'] or '':>6} {b['params']:>12,} {b['macs']:>14,}"
        )
    lines += ["", f"  parameters {info['params']:,}   MACs {info['macs']:,} ({info['macs'] / 1e9:.3f} G)"]
    for device, v in info.get("latency_ms", {}).items():
        if "value" in v:
            label = "PREDICTED (analytical prior, not measured)" if v["source"] == "predicted" else "from a measured LUT"
            lines.append(f"  latency on {device}: {v['value']:.3f} ms, {label} ({v['lut']})")
        else:
            lines.append(f"  latency from {v['lut']}: not available ({v['error']})")
    for key, value in info.get("metrics", {}).items():
        lines.append(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if "pretrained" in info:
        lines.append(f"  pretrained: {info['pretrained']['summary']}")
    return "\n".join(lines)
