"""Op traces: one walk over a block's operations gives its parameters, MACs and cost features.

Every block kind describes its computation once, as calls on an :class:`OpTrace`
(:mod:`search_spaces.kinds` holds the kinds). From that single trace come

* the exact parameter count (``sum(p.numel())`` of the torch module: weights, biases, BN
  affine pairs, layer scales, attention-bias tables),
* the MACs (convolutions, linear layers and attention matrix products, BN folded away),
  split into dense, depthwise/grouped and attention classes,
* the output-activation elements of every op (a proxy for memory traffic, one of the
  latency prior's features).

Counting conventions (see ``docs/design.md``): a BN that follows a conv is folded, so it has
parameters but no MACs and no activation of its own; norms that stand alone (LayerNorm, the
V2 head's BN) and element-wise ops (activations, residual adds, softmax, pooling) add
activation elements but no MACs.

>>> t = OpTrace()
>>> t.conv(16, 32, (8, 8), k=3, bn=True)
>>> t.params, t.macs, t.act
(4704, 294912, 2048)
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OpTrace", "ceil_div", "out_hw"]


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints: the output side of a stride-``b`` 3x3 conv with padding 1."""
    return -(-a // b)


def out_hw(hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Output ``(height, width)`` of a stride-``stride`` conv with ``k // 2`` padding."""
    return ceil_div(hw[0], stride), ceil_div(hw[1], stride)


@dataclass
class OpTrace:
    """Accumulates a block's parameters, MACs by class and output-activation elements.

    Attributes:
        params: parameter count.
        dense: MACs of dense convolutions and linear layers.
        dw: MACs of depthwise and grouped convolutions.
        attn: MACs of attention matrix products (``q @ k``, ``attn @ v``, talking heads).
        act: output-activation elements of every recorded op.
    """

    params: int = 0
    dense: int = 0
    dw: int = 0
    attn: int = 0
    act: int = 0

    @property
    def macs(self) -> int:
        """All MACs: ``dense + dw + attn``."""
        return self.dense + self.dw + self.attn

    # ------------------------------------------------------------------ primitives
    def conv(self, cin: int, cout: int, hw: tuple[int, int], *, k: int = 1, groups: int = 1, bias: bool = True,
             bn: bool = False) -> None:
        """A conv producing a ``cout x hw`` map (``hw`` is the OUTPUT size), optionally with a folded BN."""
        weights = cout * (cin // groups) * k * k
        self.params += weights + (cout if bias else 0) + (2 * cout if bn else 0)
        macs = weights * hw[0] * hw[1]
        if groups > 1:
            self.dw += macs
        else:
            self.dense += macs
        self.act += cout * hw[0] * hw[1]

    def linear(self, i: int, o: int, *, tokens: int = 1, bias: bool = True) -> None:
        """A linear layer applied to ``tokens`` vectors."""
        self.params += i * o + (o if bias else 0)
        self.dense += i * o * tokens
        self.act += o * tokens

    def matmul(self, macs: int, out: int) -> None:
        """An attention matrix product of ``macs`` MACs and ``out`` output elements."""
        self.attn += macs
        self.act += out

    def norm(self, c: int, elements: int = 0) -> None:
        """A norm with ``2 * c`` affine parameters, writing ``elements`` outputs (0 when folded)."""
        self.params += 2 * c
        self.act += elements

    def elem(self, n: int, times: int = 1) -> None:
        """Element-wise ops writing ``n`` elements ``times`` times (activations, adds, softmax, pooling)."""
        self.act += n * times

    def param(self, n: int) -> None:
        """Free-standing parameters (layer scales, attention-bias tables): no compute."""
        self.params += n

    # ------------------------------------------------------------------ shared sub-blocks
    def conv_ffn(self, c: int, h: int, hw: tuple[int, int]) -> None:
        """EfficientFormerV2 FFN with its layer scale: 1x1+BN, GELU, dw3x3+BN, GELU, 1x1+BN, ``ls2``, residual."""
        n = hw[0] * hw[1]
        self.conv(c, h, hw, bn=True)
        self.elem(h * n)  # GELU
        self.conv(h, h, hw, k=3, groups=h, bn=True)
        self.elem(h * n)  # GELU
        self.conv(h, c, hw, bn=True)
        self.elem(c * n)  # layer scale + residual
        self.param(c)  # ls2

    def lite_mla(self, c: int, heads: int, dim: int, hw: tuple[int, int]) -> None:
        """EfficientViT LiteMLA (ReLU linear attention over two scales) plus the residual add."""
        td, n = heads * dim, hw[0] * hw[1]
        self.conv(c, 3 * td, hw, bias=False)  # qkv
        self.conv(3 * td, 3 * td, hw, k=5, groups=3 * td, bias=False)  # aggregation dw5x5
        self.conv(3 * td, 3 * td, hw, groups=3 * heads, bias=False)  # grouped 1x1
        self.elem(2 * 2 * td * n)  # ReLU kernels on q and k, both scales
        # per scale and head: k^T v (dim x (dim + 1)), then q (k^T v) (n x (dim + 1))
        self.matmul(2 * heads * n * dim * (dim + 1), 2 * heads * dim * (dim + 1))
        self.matmul(2 * heads * n * dim * (dim + 1), 2 * heads * n * (dim + 1))
        self.conv(2 * td, c, hw, bias=False, bn=True)  # proj
        self.elem(c * n)  # residual

    def mbconv(self, cin: int, cout: int, h: int, hw_in: tuple[int, int], stride: int, *,
               fewer_norm: bool) -> None:
        """EfficientViT inverted bottleneck: 1x1, dw3x3 (stride), 1x1; residual when shapes allow.

        ``fewer_norm``: the first two convs have a bias and no BN; otherwise every conv has BN
        and no bias.
        """
        hw_out = out_hw(hw_in, stride)
        self.conv(cin, h, hw_in, bias=fewer_norm, bn=not fewer_norm)
        self.elem(h * hw_in[0] * hw_in[1])  # Hardswish
        self.conv(h, h, hw_out, k=3, groups=h, bias=fewer_norm, bn=not fewer_norm)
        self.elem(h * hw_out[0] * hw_out[1])  # Hardswish
        self.conv(h, cout, hw_out, bias=False, bn=True)
        if stride == 1 and cin == cout:
            self.elem(cout * hw_out[0] * hw_out[1])  # residual
