"""Slicing a supernet's shared weights: leading boxes whose gradients land in the full tensors.

A subnet uses the first ``k`` channels of each shared tensor (Once-for-All style), so most
slices are prefixes (:func:`prefix`); a block kind whose layout is not a prefix names a slicer of
its own (``BlockKind.slicers`` in ``search_spaces.kinds``; :data:`SLICERS`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from search_spaces import BlockSpec

from .optim import is_dense, manage, mark_used

__all__ = ["SLICERS", "SliceWithGrad", "Slicer", "lite_proj", "prefix", "prefix_index"]

Slicer = Callable[[torch.Tensor, torch.Size, BlockSpec, BlockSpec], torch.Tensor]


class SliceWithGrad(torch.autograd.Function):
    """``full[index]`` for each ``(full, index)`` pair, whose backward adds into ``full.grad`` in place.

    Autograd's own slice backward materialises a zero tensor of the full size for every sliced
    weight and then adds it to ``.grad``; on small CPU workloads that doubled the supernet's
    overhead. Gradients land in ``.grad`` exactly as with plain slicing (``None`` until first use),
    and the slice is recorded as used (:func:`supernet.optim.mark_used`), so that
    :class:`~supernet.optim.SharedAdamW` steps and zeroes only that region. A block's weights are
    sliced in one call: one autograd node per block, not one per tensor.
    """

    @staticmethod
    def forward(ctx: Any, indexes: tuple[tuple[slice, ...], ...],  # type: ignore[override]
                *fulls: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.fulls, ctx.indexes = fulls, indexes
        parts = []
        for full, index in zip(fulls, indexes):
            manage(full)
            part = full.detach()[index]
            # A strided slice gets one dense copy, shared by the forward op and its backward (each
            # would otherwise make its own); clone keeps the weight's memory format (channels_last
            # stays so). A slice that is dense already (a vector's prefix, leading rows) is used as it is.
            parts.append(part if is_dense(part) else part.clone(memory_format=torch.preserve_format))
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[None, ...]:  # type: ignore[override]
        with torch.no_grad():
            into, parts = [], []
            for full, index, grad in zip(ctx.fulls, ctx.indexes, grads):
                if grad is None:  # that slice did not reach the loss
                    continue
                if full.grad is None:
                    full.grad = torch.zeros_like(full)
                into.append(full.grad if grad.shape == full.shape else full.grad[index])
                parts.append(grad)
                mark_used(full, grad.shape)
            if into:
                torch._foreach_add_(into, parts)  # one call for the block's tensors
        return (None,) * (len(grads) + 1)


def prefix_index(full_shape: torch.Size, shape: torch.Size) -> tuple[slice, ...]:
    """The index of the leading ``shape`` box of a tensor of ``full_shape``.

    Raises:
        RuntimeError: ``shape`` does not fit inside ``full_shape``.
    """
    if len(full_shape) != len(shape) or any(s > f for s, f in zip(shape, full_shape)):
        raise RuntimeError(f"cannot slice a {tuple(full_shape)} weight to {tuple(shape)}")
    return tuple(slice(0, s) for s in shape)


def prefix(full: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``full[:shape[0], :shape[1], ...]``; a parameter's gradient lands in its ``.grad`` and marks the region used."""
    index = prefix_index(full.shape, shape)
    if isinstance(full, nn.Parameter) and full.requires_grad and torch.is_grad_enabled():
        return SliceWithGrad.apply((index,), full)[0]
    if full.shape == shape:
        return full
    return full[index]


def lite_proj(full: torch.Tensor, shape: torch.Size, spec: BlockSpec, max_spec: BlockSpec) -> torch.Tensor:
    """LiteMLA proj input channels are ``[scale 0: heads*dim, scale 1: heads*dim]``: not a prefix."""
    td, td_max = spec.heads * spec.value_dim, max_spec.heads * max_spec.value_dim
    w = prefix(full, torch.Size((shape[0], *full.shape[1:])))
    if td == td_max:
        return w
    return torch.cat([w[:, :td], w[:, td_max: td_max + td]], dim=1)


#: Slicers by the names block kinds use for them (``BlockKind.slicers`` in ``search_spaces.kinds``).
SLICERS: dict[str, Slicer] = {"lite_proj": lite_proj}
