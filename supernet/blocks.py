"""Static torch modules, one class per block kind, built from :class:`~search_spaces.BlockSpec`.

:func:`build_block` is the only constructor the rest of the toolkit uses: the static
model, the latency profiler (one block at a time) and supernet extraction (which copies
sliced weights into these very classes) all go through it.

Shapes: map blocks take and return ``(B, C, H, W)``; ``ef1.meta3d`` takes ``(B, C, H, W)``
(first Meta3D block, it flattens) or ``(B, N, C)`` and returns ``(B, N, C)``; heads return
``(B, num_classes)``.
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from search_spaces import BlockSpec
from search_spaces.kinds import get_kind

__all__ = ["build_block", "block_class", "ConvNorm", "LiteMLA", "relative_bias_index", "downsample_bias_index"]

LN_EPS = 1e-5
LITE_EPS = 1e-5


class ConvNorm(nn.Module):
    """Conv2d (padding ``k // 2``) followed by BatchNorm2d."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _grid(h: int, w: int, step: int = 1) -> torch.Tensor:
    """``(2, N)`` row and column of every point of an ``h x w`` grid (every ``step``-th), row-major."""
    return torch.stack(torch.meshgrid(torch.arange(0, h, step), torch.arange(0, w, step), indexing="ij")).flatten(1)


def _on_default_device(compute: Callable[[int, int], torch.Tensor]) -> Callable[[int, int], torch.Tensor]:
    """``compute(h, w)`` worked out once on the CPU, then handed out as a fresh tensor on the current
    default device. Blocks are often built under ``torch.device("meta")``, where the index
    arithmetic would run through Python decompositions (about 80 ms per call)."""
    cached = functools.lru_cache(maxsize=256)(compute)

    @functools.wraps(compute)
    def wrapper(h: int, w: int) -> torch.Tensor:
        with torch.device("cpu"):
            index = cached(h, w)
        return index.to(torch.get_default_device(), copy=True)

    return wrapper


@_on_default_device
def relative_bias_index(h: int, w: int) -> torch.Tensor:
    """``(N, N)`` index into an ``h*w`` bias table by ``|dy| * w + |dx|`` (N = h*w).

    The reference models index the same way (timm: ``rel_pos[0] * resolution[1] + rel_pos[1]``).
    """
    pos = _grid(h, w)
    rel = (pos[:, :, None] - pos[:, None, :]).abs()
    return rel[0] * w + rel[1]


@_on_default_device
def downsample_bias_index(h: int, w: int) -> torch.Tensor:
    """``(N2, N)`` index for stride-2 queries against full-grid keys (V2 attention downsampling).

    Keys lie on the ``h x w`` input grid and queries on its stride-2 subgrid; the offset
    ``(|dy|, |dx|)`` indexes an ``h*w`` table as ``|dy| * w + |dx|``. On square maps this is
    timm's index; timm builds the key grid from the width alone, which only works when
    ``h == w``, so for non-square maps we take the true ``h x w`` grid.
    """
    rel = (_grid(h, w, 2)[:, :, None] - _grid(h, w)[:, None, :]).abs()
    return rel[0] * w + rel[1]


def _layer_scale(c: int) -> nn.Parameter:
    return nn.Parameter(torch.full((c,), 1e-5))


# =============================================================================== EfficientFormer V1
class EfStem(nn.Module):
    """Two conv3x3 + BN + act; the second has stride 2 when the stem stride is 4 (``ef1.stem``, ``ef2.stem``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        half = spec.cout // 2
        act = nn.ReLU if spec.kind == "ef1.stem" else nn.GELU
        self.conv1 = ConvNorm(spec.cin, half, 3, 2)
        self.act1 = act()
        self.conv2 = ConvNorm(half, spec.cout, 3, 2 if spec.stride == 4 else 1)
        self.act2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x))))


class Downsample(nn.Module):
    """Conv3x3 stride 2 + BN (``ef1.down``, ``ef2.down``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.conv = ConvNorm(spec.cin, spec.cout, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Meta4D(nn.Module):
    """``x + ls1 * (avgpool3(x) - x)``, then ``x + ls2 * MLP(x)`` (``ef1.meta4d``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        c, h = spec.cin, spec.hidden
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.ls1 = _layer_scale(c)
        self.fc1 = ConvNorm(c, h)
        self.act = nn.GELU()
        self.fc2 = ConvNorm(h, c)
        self.ls2 = _layer_scale(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1.view(1, -1, 1, 1) * (self.pool(x) - x)
        return x + self.ls2.view(1, -1, 1, 1) * self.fc2(self.act(self.fc1(x)))


class MHSA(nn.Module):
    """V1 attention on tokens: fused qkv (per head ``[q kd, k kd, v vd]``), learned relative bias, proj."""

    def __init__(self, c: int, heads: int, key_dim: int, value_dim: int, hw: tuple[int, int]) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.scale = key_dim ** -0.5
        self.hw = tuple(hw)
        self.qkv = nn.Linear(c, heads * (2 * key_dim + value_dim))
        self.proj = nn.Linear(heads * value_dim, c)
        self.attention_biases = nn.Parameter(torch.zeros(heads, hw[0] * hw[1]))
        self.register_buffer("attention_bias_idxs", relative_bias_index(*hw), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.value_dim)
        return self.proj(x)


class Meta3D(nn.Module):
    """LN + MHSA and LN + MLP on tokens, each with a layer scale (``ef1.meta3d``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        c = spec.cin
        self.flatten = not spec.tokens_in
        self.norm1 = nn.LayerNorm(c, eps=LN_EPS)
        self.token_mixer = MHSA(c, spec.heads, spec.key_dim, spec.value_dim, spec.hw)
        self.ls1 = _layer_scale(c)
        self.norm2 = nn.LayerNorm(c, eps=LN_EPS)
        self.fc1 = nn.Linear(c, spec.hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(spec.hidden, c)
        self.ls2 = _layer_scale(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        x = x + self.ls1 * self.token_mixer(self.norm1(x))
        return x + self.ls2 * self.fc2(self.act(self.fc1(self.norm2(x))))


class _DistilledHead(nn.Module):
    """``head`` and optional ``head_dist`` on pooled features, as the EfficientFormer recipe trains them.

    At inference the two are averaged. With :attr:`distilled_training` on, a training-mode
    forward returns ``(head(x), head_dist(x))`` instead, for hard distillation from a teacher
    (DeiT's recipe: the class head learns the labels, the distillation head the teacher's).
    """

    distilled_training = False

    def _heads(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.head_dist is None:
            return self.head(x)
        if self.distilled_training and self.training:
            return self.head(x), self.head_dist(x)
        return (self.head(x) + self.head_dist(x)) / 2


class Ef1Head(_DistilledHead):
    """LN, mean over tokens, ``(head + head_dist) / 2`` (``ef1.head``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.flatten = not spec.tokens_in
        self.norm = nn.LayerNorm(spec.cin, eps=LN_EPS)
        self.head = nn.Linear(spec.cin, spec.num_classes)
        self.head_dist = nn.Linear(spec.cin, spec.num_classes) if spec.distillation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        return self._heads(self.norm(x).mean(dim=1))


# =============================================================================== EfficientFormerV2
class ConvMlp(nn.Module):
    """1x1 + BN + GELU, dw3x3 + BN + GELU, 1x1 + BN (V2 FFN)."""

    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.fc1 = ConvNorm(c, h)
        self.mid = ConvNorm(h, h, 3, groups=h)
        self.fc2 = ConvNorm(h, c)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.mid(self.act(self.fc1(x)))))


class Attention4D(nn.Module):
    """V2 attention on maps: q/k/v 1x1 convs, relative bias, talking heads, v_local, GELU + proj.

    With ``stride=2`` (stage 3) a dw3x3 stride-2 conv runs first and the result is upsampled
    back (bilinear) before the projection. ``hw`` is the input map; the attention runs on
    ``hw`` subsampled by ``stride`` (its bias table has one entry per offset on that grid).
    """

    def __init__(self, c: int, heads: int, key_dim: int, value_dim: int, hw: tuple[int, int], stride: int) -> None:
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.scale = key_dim ** -0.5
        self.hw = (math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
        self.n = self.hw[0] * self.hw[1]
        kh, dh = heads * key_dim, heads * value_dim
        self.dh = dh
        self.stride_conv = ConvNorm(c, c, 3, stride, groups=c) if stride > 1 else None
        self.upsample = nn.Upsample(scale_factor=stride, mode="bilinear") if stride > 1 else None
        self.q = ConvNorm(c, kh)
        self.k = ConvNorm(c, kh)
        self.v = ConvNorm(c, dh)
        self.v_local = ConvNorm(dh, dh, 3, groups=dh)
        self.talking_head1 = nn.Conv2d(heads, heads, 1)
        self.talking_head2 = nn.Conv2d(heads, heads, 1)
        self.act = nn.GELU()
        self.proj = ConvNorm(dh, c)
        self.attention_biases = nn.Parameter(torch.zeros(heads, self.n))
        self.register_buffer("attention_bias_idxs", relative_bias_index(*self.hw), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every reshape names all dims but the batch (-1): a traced batch size becomes an int cast that
        # coremltools cannot convert on small maps.
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        vd = self.dh // self.heads
        q = self.q(x).reshape(-1, self.heads, self.key_dim, self.n).permute(0, 1, 3, 2)
        k = self.k(x).reshape(-1, self.heads, self.key_dim, self.n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(-1, self.heads, vd, self.n).permute(0, 1, 3, 2)
        attn = (q @ k) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = self.talking_head2(self.talking_head1(attn).softmax(dim=-1))
        x = (attn @ v).transpose(2, 3).reshape(-1, self.dh, self.hw[0], self.hw[1]) + v_local
        if self.upsample is not None:
            x = self.upsample(x)
        return self.proj(self.act(x))


class LiteMLA(nn.Module):
    """EfficientViT multi-scale linear attention (ReLU kernel, computed in float32)."""

    def __init__(self, c: int, heads: int, dim: int) -> None:
        super().__init__()
        td = heads * dim
        self.dim = dim
        self.qkv = nn.Conv2d(c, 3 * td, 1, bias=False)
        self.aggreg_dw = nn.Conv2d(3 * td, 3 * td, 5, padding=2, groups=3 * td, bias=False)
        self.aggreg_pw = nn.Conv2d(3 * td, 3 * td, 1, groups=3 * heads, bias=False)
        self.proj = ConvNorm(2 * td, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, self.aggreg_pw(self.aggreg_dw(qkv))], dim=1)
        qkv = qkv.flatten(2).unflatten(1, (-1, 3 * self.dim)).transpose(-1, -2)  # not h * w: coremltools cannot cast it
        q, k, v = qkv.chunk(3, dim=-1)
        dtype = v.dtype
        q, k = F.relu(q).float(), F.relu(k).float()
        v = F.pad(v.float(), (0, 1), mode="constant", value=1.0)
        out = q @ (k.transpose(-1, -2) @ v)
        out = (out[..., :-1] / (out[..., -1:] + LITE_EPS)).to(dtype)
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


class Ef2Block(nn.Module):
    """V2 block: optional token mixer (Attention4D or LiteMLA) with ``ls1``, then FFN with ``ls2``.

    Covers ``ef2.ffn`` (no mixer), ``ef2.attn_ffn`` and ``ef2.lite_ffn``.
    """

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        c = spec.cin
        if spec.kind == "ef2.attn_ffn":
            self.token_mixer: nn.Module | None = Attention4D(c, spec.heads, spec.key_dim, spec.value_dim,
                                                             spec.hw, spec.attn_stride)
        elif spec.kind == "ef2.lite_ffn":
            self.token_mixer = LiteMLA(c, spec.heads, spec.value_dim)
        else:
            self.token_mixer = None
        self.ls1 = _layer_scale(c) if self.token_mixer is not None else None
        self.mlp = ConvMlp(c, spec.hidden)
        self.ls2 = _layer_scale(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mixer is not None:
            x = x + self.ls1.view(1, -1, 1, 1) * self.token_mixer(x)
        return x + self.ls2.view(1, -1, 1, 1) * self.mlp(x)


class LocalGlobalQuery(nn.Module):
    """Stride-2 query: dw3x3 s2 conv plus a plain subsample, then 1x1 + BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.local = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin)
        self.proj = ConvNorm(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.local(x) + x[:, :, ::2, ::2])


class AttnDownsample(nn.Module):
    """Stage-4 entry of V2: ``Attn(x) + BN(conv3x3 s2(x))`` (``ef2.down_attn``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        cin, cout = spec.cin, spec.cout
        self.heads, self.key_dim = spec.heads, spec.key_dim
        self.scale = spec.key_dim ** -0.5
        self.hw2 = spec.out_hw
        self.n, self.n2 = spec.h * spec.w, self.hw2[0] * self.hw2[1]
        kh, dh = spec.heads * spec.key_dim, spec.heads * spec.value_dim
        self.dh = dh
        self.conv = ConvNorm(cin, cout, 3, 2)
        self.q = LocalGlobalQuery(cin, kh)
        self.k = ConvNorm(cin, kh)
        self.v = ConvNorm(cin, dh)
        self.v_local = ConvNorm(dh, dh, 3, 2, groups=dh)
        self.act = nn.GELU()
        self.proj = ConvNorm(dh, cout)
        self.attention_biases = nn.Parameter(torch.zeros(spec.heads, self.n))
        self.register_buffer("attention_bias_idxs", downsample_bias_index(*spec.hw), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vd = self.dh // self.heads  # all dims but the batch named, as in Attention4D
        q = self.q(x).reshape(-1, self.heads, self.key_dim, self.n2).permute(0, 1, 3, 2)
        k = self.k(x).reshape(-1, self.heads, self.key_dim, self.n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(-1, self.heads, vd, self.n).permute(0, 1, 3, 2)
        attn = ((q @ k) * self.scale + self.attention_biases[:, self.attention_bias_idxs]).softmax(dim=-1)
        y = (attn @ v).transpose(2, 3).reshape(-1, self.dh, self.hw2[0], self.hw2[1]) + v_local
        return self.proj(self.act(y)) + self.conv(x)


class Ef2Head(_DistilledHead):
    """BN, global average pool, ``(head + head_dist) / 2`` (``ef2.head``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(spec.cin)
        self.head = nn.Linear(spec.cin, spec.num_classes)
        self.head_dist = nn.Linear(spec.cin, spec.num_classes) if spec.distillation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.norm(x).mean(dim=(2, 3)))


# =============================================================================== EfficientViT
class EvitStem(nn.Module):
    """Conv3x3 (no bias), BN, Hardswish (``evit.stem``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.conv = ConvNorm(spec.cin, spec.cout, 3, spec.stride, bias=False)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class DSConv(nn.Module):
    """Residual dw3x3 + BN + Hardswish, 1x1 + BN (``evit.dsconv``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.depth_conv = ConvNorm(spec.cin, spec.cin, 3, groups=spec.cin, bias=False)
        self.act = nn.Hardswish()
        self.point_conv = ConvNorm(spec.cin, spec.cout, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.point_conv(self.act(self.depth_conv(x)))


class MBConv(nn.Module):
    """Inverted bottleneck 1x1, dw3x3, 1x1 with Hardswish.

    ``fewer_norm``: the first two convs have bias and no BN (``evit.down_fn`` and inside
    ``evit.block``); otherwise BN follows every conv and no conv has a bias (``evit.mbconv``).
    Residual when stride is 1 and the width is unchanged.
    """

    def __init__(self, cin: int, cout: int, hidden: int, stride: int, *, fewer_norm: bool) -> None:
        super().__init__()
        if fewer_norm:
            self.inverted_conv: nn.Module = nn.Conv2d(cin, hidden, 1)
            self.depth_conv: nn.Module = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden)
        else:
            self.inverted_conv = ConvNorm(cin, hidden, bias=False)
            self.depth_conv = ConvNorm(hidden, hidden, 3, stride, groups=hidden, bias=False)
        self.point_conv = ConvNorm(hidden, cout, bias=False)
        self.act = nn.Hardswish()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.point_conv(self.act(self.depth_conv(self.act(self.inverted_conv(x)))))
        return x + y if self.residual else y


class EvitBlock(nn.Module):
    """``x + LiteMLA(x)``, then ``x + MBConv(x)`` (fewer norms) (``evit.block``)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.context = LiteMLA(spec.cin, spec.heads, spec.value_dim)
        self.local = MBConv(spec.cin, spec.cin, spec.hidden, 1, fewer_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(x + self.context(x))


class EvitHead(nn.Module):
    """1x1 conv + BN + Hardswish, pool, Linear (no bias), LN, Hardswish, Dropout, Linear (``evit.head``)."""

    def __init__(self, spec: BlockSpec, *, dropout: float = 0.0) -> None:
        super().__init__()
        w0, w1 = spec.head_hidden
        self.in_conv = ConvNorm(spec.cin, w0, bias=False)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(w0, w1, bias=False)
        self.norm = nn.LayerNorm(w1, eps=LN_EPS)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(w1, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.in_conv(x)).mean(dim=(2, 3))
        return self.head(self.drop(self.act(self.norm(self.fc(x)))))


def build_mbconv(spec: BlockSpec) -> MBConv:
    """``evit.mbconv`` (BN after every conv) or ``evit.down_fn`` (fewer norms) from its spec."""
    return MBConv(spec.cin, spec.cout, spec.hidden, spec.stride, fewer_norm=spec.kind == "evit.down_fn")


@functools.lru_cache(maxsize=None)
def block_class(kind: str) -> Callable[[BlockSpec], nn.Module]:
    """The module constructor of ``kind``, from its registry entry (``search_spaces.kinds``)."""
    module, _, name = get_kind(kind).module.partition(":")
    return getattr(importlib.import_module(module), name)


def build_block(spec: BlockSpec) -> nn.Module:
    """The static module of one block spec (freshly initialised).

    >>> from search_spaces import BlockSpec
from search_spaces.kinds import get_kind
    >>> block = build_block(BlockSpec("ef2.ffn", cin=16, cout=16, h=8, w=8, hidden=64))
    >>> block(torch.zeros(2, 16, 8, 8)).shape
    torch.Size([2, 16, 8, 8])
    """
    return block_class(spec.kind)(spec)
