"""Describe an architecture: blocks, exact parameters and MACs (``nas-info``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dataclasses import replace

from search_spaces import (
    TASKS, ArchConfig, BlockSpec, block_macs, block_params, family_defaults, get_preset, list_presets,
    parse_resolution, resolution_json,
)
from search_spaces.kinds import get_kind
from search_spaces.errors import NasUserError
from search_spaces.subnet_file import SubnetFile

__all__ = ["resolve_target", "describe", "format_table", "lut_latencies", "pretrained_report"]


def resolve_target(target: str, *, resolution: int | str | tuple[int, int] | None = None,
                   num_classes: int | None = None, in_chans: int | None = None,
                   task: str | None = None) -> tuple[str, SubnetFile]:
    """Turn a preset name or a ``subnet.json`` path into ``(name, SubnetFile)``.

    Explicit ``resolution`` (``224`` or ``"512x1024"``) / ``num_classes`` / ``in_chans`` /
    ``task`` override the file's values.
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
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if value is not None and value < 1:
            raise NasUserError(f"--{key.replace('_', '-')} must be an integer >= 1, got {value}")
    if resolution is not None:
        resolution = parse_resolution(resolution, what="--resolution")
    if task is not None and task not in TASKS:
        raise NasUserError(f"--task must be one of {list(TASKS)}, got {task!r}")
    overrides = {k: v for k, v in (("resolution", resolution), ("num_classes", num_classes),
                                   ("in_chans", in_chans), ("task", task)) if v is not None}
    if overrides:
        sub = replace(sub, **overrides)
    return name, sub


def _role(spec: BlockSpec) -> str:
    """``stem``, ``down`` (a stage's entry unit), ``block`` or ``head``."""
    if get_kind(spec.kind).is_head:
        return "head"
    if spec.slot >= 0:
        return "block"
    return "stem" if spec.stage == 0 else "down"


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
    for s in specs:
        blocks.append({
            "stage": s.stage, "slot": s.slot, "role": _role(s), "kind": s.kind, "key": s.key, "cin": s.cin,
            "cout": s.cout, "size": resolution_json(s.hw), "out_size": resolution_json(s.out_hw), "stride": s.stride,
            "hidden": s.hidden, "params": block_params(s), "macs": block_macs(s),
        })
    arch: ArchConfig = sub.arch
    return {
        "name": name,
        "family": arch.family,
        "arch": arch.to_string(),
        "arch_hash": arch.hash,
        "params": sum(b["params"] for b in blocks),
        "macs": sum(b["macs"] for b in blocks),
        "resolution": resolution_json(sub.hw),
        "task": sub.task,
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

    model = build_model(sub.arch, sub.setup)
    report = load_pretrained(model, path)
    return {"summary": report.summary(), **report.to_dict()}


def _res_text(value: int | list[int]) -> str:
    return str(value) if isinstance(value, int) else "x".join(str(v) for v in value)


def format_table(info: dict[str, Any]) -> str:
    """Human-readable block table."""
    lines = [
        f"{info['name']}: family {info['family']}, resolution {_res_text(info['resolution'])}, task {info['task']}, "
        f"{info['num_classes']} classes, {info['in_chans']} input channels",
        f"  widths {info['widths']}  depths {info['depths']}  (arch {info['arch_hash']})",
        "",
        f"  {'#':>3} {'stage':>5}  {'kind':<14} {'in':>5} {'out':>5} {'map':>7} {'hidden':>6} {'params':>12} {'MACs':>14}",
    ]
    for i, b in enumerate(info["blocks"]):
        stage = b["role"] if b["role"] in ("stem", "head") else b["stage"]
        lines.append(
            f"  {i:>3} {stage:>5}  {b['kind']:<14} {b['cin']:>5} {b['cout']:>5} {_res_text(b['size']):>7} "
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
