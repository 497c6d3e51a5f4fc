"""Block specs: frozen, hashable descriptions of one unit of a lowered network.

Lowering (:func:`search_spaces.lower`) turns an :class:`~search_spaces.arch.ArchConfig`
into a tuple of :class:`BlockSpec`. The same specs are the keys of the latency LUT,
the units of exact parameter and MAC counting, and what the static model and the
supernet build, so these parts can never disagree about an architecture.

A lowered spec also knows where it sits: its ``stage`` (0 the stem, then the body stages
1..n, the head after them) and its ``slot`` in that stage (the index of the architecture's
block it realises, or -1 for the stage's entry: stem conv, downsampling or head). Positions
take no part in equality, hashing or the key: two blocks that compute the same thing on the
same shapes are the same LUT entry wherever they sit.

Input maps have a height and a width (``h``, ``w``). A square spec keeps the schema-1 key
(``size=14``); a non-square one writes ``size=HxW``.

>>> spec = BlockSpec("ef2.ffn", cin=48, cout=48, h=14, w=14, hidden=192)
>>> spec.key
'ef2.ffn|cin=48|cout=48|size=14|hidden=192'
>>> BlockSpec.from_key(spec.key) == spec
True
>>> spec.input_shape(batch=1)
(1, 48, 14, 14)
>>> BlockSpec.from_key("ef2.ffn|cin=48|cout=48|size=14x28|hidden=192").out_hw
(14, 28)
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Mapping

from .errors import SpaceError
from .kinds import get_kind, list_kinds
from .ops import ceil_div, out_hw

__all__ = ["BlockSpec", "ceil_div", "block_kinds"]

_POSITION = ("stage", "slot")
_INT_FIELDS = ("stride", "hidden", "heads", "key_dim", "value_dim", "attn_stride", "num_classes")
_BOOL_FIELDS = ("tokens_in", "distillation")


def block_kinds() -> dict[str, str]:
    """Every registered block kind with its one-line description."""
    return {name: get_kind(name).doc for name in list_kinds()}


@dataclass(frozen=True)
class BlockSpec:
    """One unit of a lowered network.

    Args:
        kind: a registered block kind (:func:`search_spaces.kinds.list_kinds`).
        cin: input channels.
        cout: output channels.
        h: input feature-map height in pixels (for token input: the grid the tokens come from).
        w: input feature-map width.
        stride: spatial stride of the block: the output map is ``ceil(h / stride) x ceil(w / stride)``.
        hidden: hidden width of the block's MLP or inverted bottleneck.
        heads: attention heads.
        key_dim: query/key dimension per head.
        value_dim: value dimension per head (LiteMLA: the head dimension).
        attn_stride: stride of an attention that runs on a subsampled map inside a block whose
            output keeps the input size (EfficientFormerV2 stage 3).
        tokens_in: the input is a token sequence ``(B, h*w, cin)`` rather than a map.
        num_classes: classes of a head block.
        distillation: a head block also has ``head_dist`` (averaged at inference).
        head_hidden: EfficientViT head widths ``(w0, w1)``.
        stage: position: 0 for the stem, 1..n for the body stages, n + 1 for the head
            (-1 when unknown, e.g. a spec parsed from a LUT key).
        slot: position in the stage: the index of the architecture's block, or -1 for the
            stage's entry unit (stem conv, downsampling, head).
    """

    kind: str
    cin: int
    cout: int
    h: int
    w: int
    stride: int = 1
    hidden: int = 0
    heads: int = 0
    key_dim: int = 0
    value_dim: int = 0
    attn_stride: int = 1
    tokens_in: bool = False
    num_classes: int = 0
    distillation: bool = False
    head_hidden: tuple[int, ...] = ()
    stage: int = field(default=-1, compare=False)
    slot: int = field(default=-1, compare=False)

    def __post_init__(self) -> None:
        get_kind(self.kind)  # unknown kinds raise, naming the known ones
        object.__setattr__(self, "head_hidden", tuple(self.head_hidden))
        for name in ("cin", "cout", "h", "w", "stride", "attn_stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpaceError(f"BlockSpec.{name} must be a positive int, got {v!r} ({self.kind})")
        for name in ("hidden", "heads", "key_dim", "value_dim", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SpaceError(f"BlockSpec.{name} must be an int >= 0, got {v!r} ({self.kind})")

    # ----------------------------------------------------------------- shapes
    @property
    def hw(self) -> tuple[int, int]:
        """Input ``(height, width)``."""
        return self.h, self.w

    @property
    def out_hw(self) -> tuple[int, int]:
        """Output ``(height, width)`` (``(1, 1)`` for a head)."""
        if get_kind(self.kind).is_head:
            return 1, 1
        return out_hw(self.hw, self.stride)

    @property
    def attn_hw(self) -> tuple[int, int]:
        """The grid the block's attention runs on (its input map, subsampled by ``attn_stride``)."""
        return out_hw(self.hw, self.attn_stride)

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        """Shape of the block's input: ``(B, N, C)`` tokens or ``(B, C, H, W)`` maps."""
        if self.tokens_in:
            return (batch, self.h * self.w, self.cin)
        return (batch, self.cin, self.h, self.w)

    def at(self, stage: int, slot: int = -1) -> BlockSpec:
        """The same spec placed at ``(stage, slot)``.

        A copy of this (validated) spec with only its position changed, so it skips ``__post_init__``
        and keeps the cached :attr:`key` (which leaves the position out); enumerating the full V2 space
        places some 77,000 specs."""
        placed = object.__new__(BlockSpec)
        placed.__dict__.update(self.__dict__)
        placed.__dict__["stage"], placed.__dict__["slot"] = stage, slot
        return placed

    # ----------------------------------------------------------------- codec
    @cached_property  # a frozen spec's key never changes; the supernet looks it up for every block it runs
    def key(self) -> str:
        """Canonical string key: kind, channels, size, then every field that differs from its default."""
        size = str(self.h) if self.h == self.w else f"{self.h}x{self.w}"
        parts = [self.kind, f"cin={self.cin}", f"cout={self.cout}", f"size={size}"]
        for f in fields(self)[5:]:
            if f.name in _POSITION:
                continue
            v = getattr(self, f.name)
            if v != f.default:
                if isinstance(v, bool):
                    v = int(v)
                elif isinstance(v, tuple):
                    v = "x".join(str(x) for x in v)
                parts.append(f"{f.name}={v}")
        return "|".join(parts)

    @classmethod
    def from_key(cls, key: str) -> BlockSpec:
        """Inverse of :attr:`key`; also reads schema-1 keys (``stride=2`` on ``ef2.attn_ffn`` meant
        the attention stride, now ``attn_stride``)."""
        try:
            kind, *items = key.split("|")
            kw: dict[str, Any] = {}
            for item in items:
                name, value = item.split("=", 1)
                if name == "size":
                    h, _, w = value.partition("x")
                    kw["h"], kw["w"] = int(h), int(w or h)
                elif name == "head_hidden":
                    kw[name] = tuple(int(x) for x in value.split("x") if x)
                elif name in _BOOL_FIELDS:
                    kw[name] = bool(int(value))
                elif name in _INT_FIELDS or name in ("cin", "cout"):
                    kw[name] = int(value)
                else:
                    raise ValueError(f"unknown field {name!r}")
            if kind == "ef2.attn_ffn" and kw.get("stride", 1) != 1:  # schema-1 key
                kw["attn_stride"] = kw.pop("stride")
            return cls(kind=kind, **kw)
        except SpaceError:
            raise
        except (ValueError, TypeError) as exc:
            raise SpaceError(f"cannot parse block key {key!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["head_hidden"] = list(self.head_hidden)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlockSpec:
        return cls(**{k: (tuple(v) if k == "head_hidden" else v) for k, v in d.items()})
