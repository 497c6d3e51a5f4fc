"""Exact parameter and MAC counts from block specs, in pure Python.

Conventions (DESIGN.md section 3):

* **Parameters** are every parameter of the module, as ``sum(p.numel())`` counts them:
  BN affine weights, layer scales, attention-bias tables and the distillation head included
  (running statistics are buffers, not parameters).
* **MACs** are the multiply-accumulates of convolutions, linear layers and attention matrix
  products, with BN folded away (no bias, norm, activation, pooling or upsampling terms).

The test suite checks both against torch on built models, for every preset and for random
configs of every space.

>>> from search_spaces import get_preset, lower
>>> count_params(lower(get_preset("efficientformerv2_s0"), resolution=224))
3600256
"""
from __future__ import annotations

from typing import Callable, Iterable

from .specs import BlockSpec, ceil_div

__all__ = ["block_params", "block_macs", "count_params", "count_macs"]


# --------------------------------------------------------------------------- primitives
def _conv_p(cin: int, cout: int, k: int = 1, groups: int = 1, bias: bool = True) -> int:
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def _conv_m(cin: int, cout: int, out_side: int, k: int = 1, groups: int = 1) -> int:
    return cout * (cin // groups) * k * k * out_side * out_side


def _lin_p(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def _bn(c: int) -> int:
    return 2 * c


def _ef2_ffn_p(c: int, h: int) -> int:
    # fc1 (1x1+BN), mid (dw3x3+BN), fc2 (1x1+BN), layer scale
    return _conv_p(c, h) + _bn(h) + _conv_p(h, h, 3, h) + _bn(h) + _conv_p(h, c) + _bn(c) + c


def _ef2_ffn_m(c: int, h: int, s: int) -> int:
    return _conv_m(c, h, s) + _conv_m(h, h, s, 3, h) + _conv_m(h, c, s)


def _lite_dims(spec: BlockSpec) -> tuple[int, int]:
    """(heads, total_dim) of a LiteMLA mixer."""
    return spec.heads, spec.heads * spec.value_dim


def _lite_p(c: int, heads: int, dim: int) -> int:
    td = heads * dim
    return (
        _conv_p(c, 3 * td, bias=False)  # qkv
        + _conv_p(3 * td, 3 * td, 5, 3 * td, bias=False)  # aggregation dw5x5
        + _conv_p(3 * td, 3 * td, 1, 3 * heads, bias=False)  # grouped 1x1
        + _conv_p(2 * td, c, bias=False)  # proj
        + _bn(c)
    )


def _lite_m(c: int, heads: int, dim: int, s: int) -> int:
    td = heads * dim
    n = s * s
    conv = (
        _conv_m(c, 3 * td, s)
        + _conv_m(3 * td, 3 * td, s, 5, 3 * td)
        + _conv_m(3 * td, 3 * td, s, 1, 3 * heads)
        + _conv_m(2 * td, c, s)
    )
    # two scales (identity + aggregated), each head: k^T v then q (k^T v), v padded by one
    attn = 2 * heads * 2 * n * dim * (dim + 1)
    return conv + attn


def _mbconv_p(cin: int, cout: int, h: int, *, fewer_norm: bool) -> int:
    if fewer_norm:  # bias and no BN on the first two convs
        return _conv_p(cin, h) + _conv_p(h, h, 3, h) + _conv_p(h, cout, bias=False) + _bn(cout)
    return (
        _conv_p(cin, h, bias=False) + _bn(h) + _conv_p(h, h, 3, h, bias=False) + _bn(h)
        + _conv_p(h, cout, bias=False) + _bn(cout)
    )


def _mbconv_m(cin: int, cout: int, h: int, s_in: int, stride: int) -> int:
    s_out = ceil_div(s_in, stride)
    return _conv_m(cin, h, s_in) + _conv_m(h, h, s_out, 3, h) + _conv_m(h, cout, s_out)


# --------------------------------------------------------------------------- per kind
def _p_ef_stem(s: BlockSpec) -> int:
    half = s.cout // 2
    return _conv_p(s.cin, half, 3) + _bn(half) + _conv_p(half, s.cout, 3) + _bn(s.cout)


def _m_ef_stem(s: BlockSpec) -> int:
    half = s.cout // 2
    s1 = ceil_div(s.size, 2)
    s2 = ceil_div(s1, 2 if s.stride == 4 else 1)
    return _conv_m(s.cin, half, s1, 3) + _conv_m(half, s.cout, s2, 3)


def _p_down(s: BlockSpec) -> int:
    return _conv_p(s.cin, s.cout, 3) + _bn(s.cout)


def _m_down(s: BlockSpec) -> int:
    return _conv_m(s.cin, s.cout, s.out_size, 3)


def _p_meta4d(s: BlockSpec) -> int:
    c, h = s.cin, s.hidden
    return c + _conv_p(c, h) + _bn(h) + _conv_p(h, c) + _bn(c) + c


def _m_meta4d(s: BlockSpec) -> int:
    return _conv_m(s.cin, s.hidden, s.size) + _conv_m(s.hidden, s.cin, s.size)


def _p_meta3d(s: BlockSpec) -> int:
    c, h, n = s.cin, s.hidden, s.size * s.size
    qkv = s.heads * (2 * s.key_dim + s.value_dim)
    return (
        2 * c  # norm1
        + _lin_p(c, qkv) + _lin_p(s.heads * s.value_dim, c) + s.heads * n  # attention
        + 2 * c  # norm2
        + _lin_p(c, h) + _lin_p(h, c)  # mlp
        + 2 * c  # layer scales
    )


def _m_meta3d(s: BlockSpec) -> int:
    c, h, n = s.cin, s.hidden, s.size * s.size
    qkv = s.heads * (2 * s.key_dim + s.value_dim)
    attn = s.heads * n * n * (s.key_dim + s.value_dim)
    return n * (c * qkv + s.heads * s.value_dim * c + 2 * c * h) + attn


def _p_ef1_head(s: BlockSpec) -> int:
    return 2 * s.cin + _lin_p(s.cin, s.num_classes) * (2 if s.distillation else 1)


def _m_head_linear(s: BlockSpec) -> int:
    return s.cin * s.num_classes * (2 if s.distillation else 1)


def _p_ef2_head(s: BlockSpec) -> int:
    return _bn(s.cin) + _lin_p(s.cin, s.num_classes) * (2 if s.distillation else 1)


def _p_ef2_ffn(s: BlockSpec) -> int:
    return _ef2_ffn_p(s.cin, s.hidden)


def _m_ef2_ffn(s: BlockSpec) -> int:
    return _ef2_ffn_m(s.cin, s.hidden, s.size)


def _p_attn_ffn(s: BlockSpec) -> int:
    c = s.cin
    kh, dh = s.heads * s.key_dim, s.heads * s.value_dim
    n = s.out_size ** 2
    attn = (
        (_conv_p(c, c, 3, c) + _bn(c) if s.stride > 1 else 0)  # stride conv
        + 2 * (_conv_p(c, kh) + _bn(kh))  # q, k
        + _conv_p(c, dh) + _bn(dh)  # v
        + _conv_p(dh, dh, 3, dh) + _bn(dh)  # v_local
        + 2 * _conv_p(s.heads, s.heads)  # talking heads
        + _conv_p(dh, c) + _bn(c)  # proj
        + s.heads * n  # attention biases
    )
    return attn + c + _ef2_ffn_p(c, s.hidden)


def _m_attn_ffn(s: BlockSpec) -> int:
    c, r = s.cin, s.out_size
    kh, dh = s.heads * s.key_dim, s.heads * s.value_dim
    n = r * r
    m = _conv_m(c, c, r, 3, c) if s.stride > 1 else 0
    m += 2 * _conv_m(c, kh, r) + _conv_m(c, dh, r) + _conv_m(dh, dh, r, 3, dh)
    m += s.heads * n * n * (s.key_dim + s.value_dim)  # q@k, attn@v
    m += 2 * s.heads * s.heads * n * n  # talking heads on (B, heads, N, N)
    m += _conv_m(dh, c, s.size)  # proj after upsampling back
    return m + _ef2_ffn_m(c, s.hidden, s.size)


def _p_down_attn(s: BlockSpec) -> int:
    cin, cout = s.cin, s.cout
    kh, dh = s.heads * s.key_dim, s.heads * s.value_dim
    attn = (
        _conv_p(cin, cin, 3, cin) + _conv_p(cin, kh) + _bn(kh)  # local-global query
        + _conv_p(cin, kh) + _bn(kh)  # k
        + _conv_p(cin, dh) + _bn(dh)  # v
        + _conv_p(dh, dh, 3, dh) + _bn(dh)  # v_local (stride 2)
        + _conv_p(dh, cout) + _bn(cout)  # proj
        + s.heads * s.size * s.size  # attention biases over the input grid
    )
    return _p_down(s) + attn


def _m_down_attn(s: BlockSpec) -> int:
    cin, cout, r, r2 = s.cin, s.cout, s.size, s.out_size
    kh, dh = s.heads * s.key_dim, s.heads * s.value_dim
    n, n2 = r * r, r2 * r2
    m = _conv_m(cin, cin, r2, 3, cin) + _conv_m(cin, kh, r2)  # query
    m += _conv_m(cin, kh, r) + _conv_m(cin, dh, r)  # k, v
    m += s.heads * n2 * n * (s.key_dim + s.value_dim)
    m += _conv_m(dh, dh, r2, 3, dh) + _conv_m(dh, cout, r2)
    return m + _m_down(s)


def _p_lite_ffn(s: BlockSpec) -> int:
    heads, _ = _lite_dims(s)
    return _lite_p(s.cin, heads, s.value_dim) + s.cin + _ef2_ffn_p(s.cin, s.hidden)


def _m_lite_ffn(s: BlockSpec) -> int:
    return _lite_m(s.cin, s.heads, s.value_dim, s.size) + _ef2_ffn_m(s.cin, s.hidden, s.size)


def _p_evit_stem(s: BlockSpec) -> int:
    return _conv_p(s.cin, s.cout, 3, bias=False) + _bn(s.cout)


def _m_evit_stem(s: BlockSpec) -> int:
    return _conv_m(s.cin, s.cout, s.out_size, 3)


def _p_dsconv(s: BlockSpec) -> int:
    c = s.cin
    return _conv_p(c, c, 3, c, bias=False) + _bn(c) + _conv_p(c, s.cout, bias=False) + _bn(s.cout)


def _m_dsconv(s: BlockSpec) -> int:
    return _conv_m(s.cin, s.cin, s.size, 3, s.cin) + _conv_m(s.cin, s.cout, s.size)


def _p_mbconv(s: BlockSpec) -> int:
    return _mbconv_p(s.cin, s.cout, s.hidden, fewer_norm=False)


def _p_down_fn(s: BlockSpec) -> int:
    return _mbconv_p(s.cin, s.cout, s.hidden, fewer_norm=True)


def _m_mbconv(s: BlockSpec) -> int:
    return _mbconv_m(s.cin, s.cout, s.hidden, s.size, s.stride)


def _p_evit_block(s: BlockSpec) -> int:
    return _lite_p(s.cin, s.heads, s.value_dim) + _mbconv_p(s.cin, s.cin, s.hidden, fewer_norm=True)


def _m_evit_block(s: BlockSpec) -> int:
    return _lite_m(s.cin, s.heads, s.value_dim, s.size) + _mbconv_m(s.cin, s.cin, s.hidden, s.size, 1)


def _p_evit_head(s: BlockSpec) -> int:
    w0, w1 = s.head_hidden
    return _conv_p(s.cin, w0, bias=False) + _bn(w0) + _lin_p(w0, w1, bias=False) + 2 * w1 + _lin_p(w1, s.num_classes)


def _m_evit_head(s: BlockSpec) -> int:
    w0, w1 = s.head_hidden
    return _conv_m(s.cin, w0, s.size) + w0 * w1 + w1 * s.num_classes


_COUNTERS: dict[str, tuple[Callable[[BlockSpec], int], Callable[[BlockSpec], int]]] = {
    "ef1.stem": (_p_ef_stem, _m_ef_stem),
    "ef1.down": (_p_down, _m_down),
    "ef1.meta4d": (_p_meta4d, _m_meta4d),
    "ef1.meta3d": (_p_meta3d, _m_meta3d),
    "ef1.head": (_p_ef1_head, _m_head_linear),
    "ef2.stem": (_p_ef_stem, _m_ef_stem),
    "ef2.down": (_p_down, _m_down),
    "ef2.down_attn": (_p_down_attn, _m_down_attn),
    "ef2.ffn": (_p_ef2_ffn, _m_ef2_ffn),
    "ef2.attn_ffn": (_p_attn_ffn, _m_attn_ffn),
    "ef2.lite_ffn": (_p_lite_ffn, _m_lite_ffn),
    "ef2.head": (_p_ef2_head, _m_head_linear),
    "evit.stem": (_p_evit_stem, _m_evit_stem),
    "evit.dsconv": (_p_dsconv, _m_dsconv),
    "evit.mbconv": (_p_mbconv, _m_mbconv),
    "evit.down_fn": (_p_down_fn, _m_mbconv),
    "evit.block": (_p_evit_block, _m_evit_block),
    "evit.head": (_p_evit_head, _m_evit_head),
}


def block_params(spec: BlockSpec) -> int:
    """Exact parameter count of one block."""
    return _COUNTERS[spec.kind][0](spec)


def block_macs(spec: BlockSpec) -> int:
    """MACs of one block at batch 1 (convolutions, linear layers, attention products)."""
    return _COUNTERS[spec.kind][1](spec)


def count_params(specs: Iterable[BlockSpec]) -> int:
    """Exact parameter count of a lowered network."""
    return sum(block_params(s) for s in specs)


def count_macs(specs: Iterable[BlockSpec]) -> int:
    """MACs of a lowered network at batch 1."""
    return sum(block_macs(s) for s in specs)
