"""Checkpoints as safetensors with JSON metadata, written atomically. Nothing is ever unpickled.

One file holds the tensors (weights, optimizer moments, RNG state) and, in its header
metadata, a JSON document with everything else (step, config, log). A reader never sees a
half-written file: :func:`save_tensors` writes through :func:`search_spaces.fileio.atomic_write_bytes`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from search_spaces.errors import FileFormatError
from search_spaces.fileio import atomic_write_bytes

__all__ = ["save_tensors", "load_tensors", "optimizer_to_tensors", "optimizer_from_tensors"]

_META_KEY = "formslim"

#: A JSON value as :func:`json.loads` returns it.
JsonValue = Union[None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]]


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], meta: Mapping[str, JsonValue]) -> Path:
    """Write ``tensors`` plus the JSON-able ``meta`` to one safetensors file, atomically."""
    flat = {k: v.detach().to("cpu").contiguous().clone() if _shares(v) else v.detach().to("cpu").contiguous()
            for k, v in tensors.items()}
    data = st_save(flat, metadata={_META_KEY: json.dumps(meta, allow_nan=False)})
    return atomic_write_bytes(path, data)


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0


def load_tensors(path: str | os.PathLike[str], *,
                 what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, JsonValue]]:
    """Read a file written by :func:`save_tensors`: ``(tensors, meta)``.

    Raises:
        FileFormatError: missing, truncated, not safetensors, or without our metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta_text = (fh.metadata() or {}).get(_META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{what} {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if meta_text is None:
        raise FileFormatError(f"{what} {str(path)!r} has no {_META_KEY!r} metadata; it was not written by this toolkit")
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{what} {str(path)!r} has corrupt metadata: {exc.msg}") from None
    if not isinstance(meta, dict):
        raise FileFormatError(f"{what} {str(path)!r} has metadata that is not a JSON object")
    return tensors, meta


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, JsonValue]]:
    """Split an optimizer's state dict into tensors and JSON-able param groups."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, JsonValue]] = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = json.loads(json.dumps(sd["param_groups"]))  # as JSON values: tuples (AdamW's betas) become lists
    meta: dict[str, JsonValue] = {"param_groups": groups, "scalars": dict(scalars)}
    return tensors, meta


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                           meta: Mapping[str, JsonValue]) -> None:
    """Inverse of :func:`optimizer_to_tensors`, loading into ``opt``."""
    state: dict[int, dict[str, torch.Tensor | JsonValue]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    scalars, groups = meta.get("scalars", {}), meta.get("param_groups")
    if not isinstance(scalars, dict) or not isinstance(groups, list):
        raise FileFormatError("optimizer metadata must hold `param_groups` (a list) and `scalars` (an object)")
    for idx, extra in scalars.items():
        if isinstance(extra, dict):
            state.setdefault(int(idx), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": groups})
