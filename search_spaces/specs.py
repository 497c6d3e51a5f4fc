"""Block specs: frozen, hashable descriptions of one unit of a lowered network.

Lowering (:func:`search_spaces.lower`) turns an :class:`~search_spaces.arch.ArchConfig`
into a tuple of :class:`BlockSpec`. The same specs are the keys of the latency LUT,
the units of exact parameter and MAC counting, and what the static model and the
supernet build, so these parts can never disagree about an architecture.

>>> spec = BlockSpec("ef2.ffn", cin=48, cout=48, size=14, hidden=192)
>>> spec.key
'ef2.ffn|cin=48|cout=48|size=14|hidden=192'
>>> BlockSpec.from_key(spec.key) == spec
True
>>> spec.input_shape(batch=1)
(1, 48, 14, 14)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import SpaceError

__all__ = ["BLOCK_KINDS", "BlockSpec", "ceil_div"]

#: Every block kind, with a one-line meaning. Prefix = family (ef1 / ef2 / evit).
BLOCK_KINDS: dict[str, str] = {
    "ef1.stem": "EfficientFormer stem: 2x (conv3x3 s2, BN, ReLU)",
    "ef1.down": "EfficientFormer downsampling: conv3x3 s2 + BN",
    "ef1.meta4d": "EfficientFormer Meta4D: pool mixer + conv MLP, layer scales",
    "ef1.meta3d": "EfficientFormer Meta3D: LN + MHSA (8 heads, kd 32, vd 128) + LN + MLP, layer scales",
    "ef1.head": "EfficientFormer head: LN, token mean, head + head_dist",
    "ef2.stem": "EfficientFormerV2 stem: 2x (conv3x3 s2, BN, GELU)",
    "ef2.down": "EfficientFormerV2 downsampling: conv3x3 s2 + BN",
    "ef2.down_attn": "EfficientFormerV2 stage-4 downsampling: conv3x3 s2 + BN plus local-global attention",
    "ef2.ffn": "EfficientFormerV2 FFN block: 1x1, dw3x3, 1x1 with BN and GELU, layer scale",
    "ef2.attn_ffn": "EfficientFormerV2 Attention4D + FFN block (stride 2 in stage 3)",
    "ef2.lite_ffn": "EfficientFormerV2 block with LiteMLA linear attention in place of Attention4D",
    "ef2.head": "EfficientFormerV2 head: BN, global pool, head + head_dist",
    "evit.stem": "EfficientViT input conv: conv3x3 s2 (no bias), BN, Hardswish",
    "evit.dsconv": "EfficientViT residual DSConv: dw3x3, BN, Hardswish, 1x1, BN",
    "evit.mbconv": "EfficientViT MBConv: 1x1, dw3x3, 1x1, BN after each (residual when shapes allow)",
    "evit.down_fn": "EfficientViT stride-2 MBConv with fewer norms (stages 3-4 entry)",
    "evit.block": "EfficientViT block: LiteMLA + fewer-norm MBConv, both residual",
    "evit.head": "EfficientViT head: 1x1 conv, BN, Hardswish, pool, Linear, LN, Hardswish, Linear",
}


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints: the output side of a stride-``b`` 3x3 conv with padding 1."""
    return -(-a // b)


@dataclass(frozen=True)
class BlockSpec:
    """One unit of a lowered network.

    Args:
        kind: one of :data:`BLOCK_KINDS`.
        cin: input channels.
        cout: output channels.
        size: input feature-map side in pixels (maps are square).
        stride: spatial stride of the block (the output side is ``ceil(size / stride)``).
        hidden: hidden width of the block's MLP or inverted bottleneck.
        heads: attention heads.
        key_dim: query/key dimension per head.
        value_dim: value dimension per head (LiteMLA: the head dimension).
        tokens_in: the input is a token sequence ``(B, size*size, cin)`` rather than a map.
        num_classes: classes of a head block.
        distillation: a head block also has ``head_dist`` (averaged at inference).
        head_hidden: EfficientViT head widths ``(w0, w1)``.
    """

    kind: str
    cin: int
    cout: int
    size: int
    stride: int = 1
    hidden: int = 0
    heads: int = 0
    key_dim: int = 0
    value_dim: int = 0
    tokens_in: bool = False
    num_classes: int = 0
    distillation: bool = False
    head_hidden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_KINDS:
            raise SpaceError(f"block kind must be one of {sorted(BLOCK_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "head_hidden", tuple(self.head_hidden))
        for name in ("cin", "cout", "size", "stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpaceError(f"BlockSpec.{name} must be a positive int, got {v!r} ({self.kind})")
        for name in ("hidden", "heads", "key_dim", "value_dim", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SpaceError(f"BlockSpec.{name} must be an int >= 0, got {v!r} ({self.kind})")

    @property
    def family_prefix(self) -> str:
        return self.kind.split(".")[0]

    @property
    def out_size(self) -> int:
        """Output feature-map side."""
        if self.kind.endswith(".head"):
            return 1
        return ceil_div(self.size, self.stride)

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        """Shape of the block's input: ``(B, N, C)`` tokens or ``(B, C, H, W)`` maps."""
        if self.tokens_in:
            return (batch, self.size * self.size, self.cin)
        return (batch, self.cin, self.size, self.size)

    # ----------------------------------------------------------------- codec
    @property
    def key(self) -> str:
        """Canonical string key: kind, then every field that differs from its default."""
        parts = [self.kind, f"cin={self.cin}", f"cout={self.cout}", f"size={self.size}"]
        for f in fields(self)[4:]:
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
        """Inverse of :attr:`key`."""
        try:
            kind, *items = key.split("|")
            kw: dict[str, Any] = {}
            types = {f.name: f.type for f in fields(cls)}
            for item in items:
                name, value = item.split("=", 1)
                if name not in types:
                    raise ValueError(f"unknown field {name!r}")
                if name == "head_hidden":
                    kw[name] = tuple(int(x) for x in value.split("x") if x)
                elif name in ("tokens_in", "distillation"):
                    kw[name] = bool(int(value))
                else:
                    kw[name] = int(value)
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
