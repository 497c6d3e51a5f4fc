"""Exact parameter and MAC counts from block specs, in pure Python.

Both come from the block kind's op trace (:mod:`search_spaces.ops`, one entry per kind in
:mod:`search_spaces.kinds`), the same trace the latency prior reads its features from.

Conventions (``docs/design.md``):

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

from typing import Iterable

from .kinds import trace
from .specs import BlockSpec

__all__ = ["block_params", "block_macs", "count_params", "count_macs"]


def block_params(spec: BlockSpec) -> int:
    """Exact parameter count of one block."""
    return trace(spec).params


def block_macs(spec: BlockSpec) -> int:
    """MACs of one block at batch 1 (convolutions, linear layers, attention products)."""
    return trace(spec).macs


def count_params(specs: Iterable[BlockSpec]) -> int:
    """Exact parameter count of a lowered network."""
    return sum(trace(s).params for s in specs)


def count_macs(specs: Iterable[BlockSpec]) -> int:
    """MACs of a lowered network at batch 1."""
    return sum(trace(s).macs for s in specs)
