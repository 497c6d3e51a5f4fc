"""Architecture configs: the one description of a network that everything else reads.

An :class:`ArchConfig` lists, per stage, the width and each block's mixer and
expansion ratio. It is frozen, hashable, round-trips through JSON, and has a
stable content hash that names it in caches, LUT provenance and file names.

>>> arch = ArchConfig(family="efficientformer_v2", stages=(
...     StageConfig(16, (BlockConfig("ffn", 4),)),
...     StageConfig(32, (BlockConfig("ffn", 4),)),
...     StageConfig(48, (BlockConfig("ffn", 3), BlockConfig("attn", 4))),
...     StageConfig(64, (BlockConfig("lite", 2),)),
... ))
>>> ArchConfig.from_dict(arch.to_dict()) == arch
True
>>> ArchConfig.from_string(arch.to_string()) == arch
True
>>> arch.to_string()
'efficientformer_v2/s4/16:ffn4/32:ffn4/48:ffn3,attn4/64:lite2'
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import SpaceError

__all__ = ["MIXERS", "BlockConfig", "StageConfig", "ArchConfig"]

#: Every mixer any family knows. ``pool``: EfficientFormer Meta4D pooling;
#: ``attn``: softmax attention (V1 Meta3D, V2 Attention4D); ``ffn``: V2 block
#: with no token mixer; ``lite``: EfficientViT LiteMLA linear attention;
#: ``conv``: EfficientViT convolutional blocks (DSConv, MBConv).
MIXERS = ("pool", "attn", "ffn", "lite", "conv")


def _num(x: float) -> int | float:
    """Canonical JSON number: integral floats become ints (so 4 and 4.0 hash alike)."""
    xf = float(x)
    return int(xf) if xf.is_integer() else xf


@dataclass(frozen=True)
class BlockConfig:
    """One block: its token mixer and the expansion ratio of its MLP / inverted bottleneck.

    Args:
        mixer: one of :data:`MIXERS`; which ones a family accepts is checked by lowering.
        expansion: hidden width = ``int(width * expansion)``.
    """

    mixer: str
    expansion: float

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise SpaceError(f"block mixer must be one of {MIXERS}, got {self.mixer!r}")
        e = self.expansion
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
            raise SpaceError(f"block expansion must be a positive finite number, got {e!r}")
        object.__setattr__(self, "expansion", _num(e))

    def to_dict(self) -> dict[str, Any]:
        return {"mixer": self.mixer, "expansion": _num(self.expansion)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "block") -> BlockConfig:
        _check_keys(d, {"mixer", "expansion"}, where)
        try:
            return cls(mixer=d["mixer"], expansion=d["expansion"])
        except SpaceError as exc:
            raise SpaceError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class StageConfig:
    """One stage: its width (channels) and its blocks, in order."""

    width: int
    blocks: tuple[BlockConfig, ...]

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width <= 0:
            raise SpaceError(f"stage width must be a positive int, got {self.width!r}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        for b in self.blocks:
            if not isinstance(b, BlockConfig):
                raise SpaceError(f"stage blocks must be BlockConfig, got {type(b).__name__}")

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "stage") -> StageConfig:
        _check_keys(d, {"width", "blocks"}, where)
        if not isinstance(d["blocks"], list):
            raise SpaceError(f"{where}.blocks must be a list, got {type(d['blocks']).__name__}")
        blocks = tuple(BlockConfig.from_dict(b, where=f"{where}.blocks[{i}]") for i, b in enumerate(d["blocks"]))
        try:
            return cls(width=d["width"], blocks=blocks)
        except SpaceError as exc:
            raise SpaceError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class ArchConfig:
    """A complete architecture of one family.

    Args:
        family: ``efficientformer``, ``efficientformer_v2`` or ``efficientvit``.
        stages: the stages in order. EfficientFormer families have 4; EfficientViT has 5,
            the first being the stem's DSConv blocks.
        stem_stride: total stride of the stem. 4 is the ImageNet design of both
            EfficientFormers, 2 that of EfficientViT; a smaller value suits small images
            (e.g. 2 for EfficientFormer on 32x32 Fashion-MNIST).
        head_widths: EfficientViT classifier widths ``(w0, w1)``; empty for other families.
        head_dim: EfficientViT LiteMLA head dimension; 0 for other families.
    """

    family: str
    stages: tuple[StageConfig, ...]
    stem_stride: int = 4
    head_widths: tuple[int, ...] = ()
    head_dim: int = 0
    _hash: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "head_widths", tuple(self.head_widths))
        if not isinstance(self.family, str) or not self.family:
            raise SpaceError(f"family must be a non-empty string, got {self.family!r}")
        if not self.stages:
            raise SpaceError("an architecture needs at least one stage")
        for s in self.stages:
            if not isinstance(s, StageConfig):
                raise SpaceError(f"stages must be StageConfig, got {type(s).__name__}")
        if self.stem_stride not in (1, 2, 4):
            raise SpaceError(f"stem_stride must be one of (1, 2, 4), got {self.stem_stride!r}")

    # ----------------------------------------------------------------- views
    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(s.width for s in self.stages)

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(s.depth for s in self.stages)

    def blocks(self) -> list[tuple[int, int, BlockConfig]]:
        """All blocks as ``(stage_index, block_index, block)``."""
        return [(si, bi, b) for si, s in enumerate(self.stages) for bi, b in enumerate(s.blocks)]

    def replace_stage(self, index: int, stage: StageConfig) -> ArchConfig:
        """A copy with stage ``index`` replaced."""
        stages = list(self.stages)
        stages[index] = stage
        return ArchConfig(self.family, tuple(stages), self.stem_stride, self.head_widths, self.head_dim)

    # ----------------------------------------------------------------- codec
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "family": self.family,
            "stem_stride": self.stem_stride,
            "stages": [s.to_dict() for s in self.stages],
        }
        if self.head_widths:
            d["head_widths"] = list(self.head_widths)
        if self.head_dim:
            d["head_dim"] = self.head_dim
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "arch") -> ArchConfig:
        """Build from :meth:`to_dict` output, with errors that name the bad field."""
        label = where or "architecture"
        if not isinstance(d, Mapping):
            raise SpaceError(f"{label} must be a JSON object, got {type(d).__name__}")
        _check_keys(d, {"family", "stages"}, label, optional={"stem_stride", "head_widths", "head_dim"})
        pre = f"{where}." if where else ""
        if not isinstance(d["stages"], list):
            raise SpaceError(f"{pre}stages must be a list, got {type(d['stages']).__name__}")
        stages = tuple(StageConfig.from_dict(s, where=f"{pre}stages[{i}]") for i, s in enumerate(d["stages"]))
        head_widths = d.get("head_widths", [])
        if not isinstance(head_widths, list) or not all(isinstance(w, int) and w > 0 for w in head_widths):
            raise SpaceError(f"{pre}head_widths must be a list of positive ints, got {head_widths!r}")
        try:
            return cls(
                family=d["family"],
                stages=stages,
                stem_stride=d.get("stem_stride", 4),
                head_widths=tuple(head_widths),
                head_dim=d.get("head_dim", 0),
            )
        except SpaceError as exc:
            raise SpaceError(f"{where}: {exc}" if where else str(exc)) from None

    def to_string(self) -> str:
        """Compact, human-readable, lossless form: ``family/sSTRIDE/W:mixerE,.../...``.

        EfficientViT adds ``/h<head_dim>:<w0>x<w1>`` at the end.
        """
        parts = [self.family, f"s{self.stem_stride}"]
        for s in self.stages:
            parts.append(f"{s.width}:" + ",".join(f"{b.mixer}{_num(b.expansion)}" for b in s.blocks))
        if self.head_widths or self.head_dim:
            parts.append(f"h{self.head_dim}:" + "x".join(str(w) for w in self.head_widths))
        return "/".join(parts)

    @classmethod
    def from_string(cls, text: str) -> ArchConfig:
        """Inverse of :meth:`to_string`."""
        try:
            parts = text.strip().split("/")
            family, stride = parts[0], parts[1]
            if not stride.startswith("s"):
                raise ValueError("missing stem stride")
            head_widths: tuple[int, ...] = ()
            head_dim = 0
            stage_parts = parts[2:]
            if stage_parts and stage_parts[-1].startswith("h"):
                hd, hw = stage_parts[-1][1:].split(":")
                head_dim = int(hd)
                head_widths = tuple(int(w) for w in hw.split("x") if w)
                stage_parts = stage_parts[:-1]
            stages = []
            for sp in stage_parts:
                w, blocks = sp.split(":")
                bl = []
                for tok in filter(None, blocks.split(",")):
                    mixer = tok.rstrip("0123456789.")
                    bl.append(BlockConfig(mixer, float(tok[len(mixer):])))
                stages.append(StageConfig(int(w), tuple(bl)))
            return cls(family, tuple(stages), int(stride[1:]), head_widths, head_dim)
        except SpaceError:
            raise
        except (ValueError, IndexError) as exc:
            raise SpaceError(f"cannot parse architecture string {text!r}: {exc}") from None

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Stable content hash (12 hex digits of SHA-256 over the canonical JSON)."""
        if not self._hash:
            object.__setattr__(self, "_hash", hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12])
        return self._hash


def _check_keys(d: Mapping[str, Any], required: set[str], where: str, optional: set[str] = frozenset()) -> None:
    if not isinstance(d, Mapping):
        raise SpaceError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing = sorted(required - set(d))
    if missing:
        raise SpaceError(f"{where} is missing field(s) {missing}")
    unknown = sorted(set(d) - required - set(optional))
    if unknown:
        raise SpaceError(f"{where} has unknown field(s) {unknown}; allowed: {sorted(required | set(optional))}")
