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

from .optim import mark_used, slice_cache, used_region

__all__ = ["SLICERS", "SliceWithGrad", "Slicer", "lite_proj", "prefix", "prefix_index"]

Slicer = Callable[[torch.Tensor, torch.Size, BlockSpec, BlockSpec], torch.Tensor]


class SliceWithGrad(torch.autograd.Function):
    """``full[index]`` for each ``(full, index)`` pair, whose backward adds into ``full.grad`` in place.

    Autograd's own slice backward materialises a zero tensor of the full size for every sliced
    weight and then adds it to ``.grad``; on small CPU workloads that doubled the supernet's
    overhead. Gradients land in ``.grad`` exactly as with plain slicing (``None`` until first use),
    and the slice is recorded as used (:func:`supernet.optim.mark_used`), so that
    :class:`~supernet.optim.SharedAdamW` steps and zeroes only that region. A block's weights are
    sliced in one call (:meth:`slices`): one autograd node per block, not one per tensor. What a slice
    leaves for the next one of the same region (its view, its dense copy, the gradient's view) is kept
    in the tensor's :class:`~supernet.optim.SliceCache`.
    """

    @staticmethod
    def forward(ctx: Any, indexes: tuple[tuple[slice, ...], ...], fulls: tuple[torch.Tensor, ...],  # type: ignore[override]
                anchor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.fulls = fulls
        ctx.caches = caches = [slice_cache(full, index) for full, index in zip(fulls, indexes)]
        parts = []
        for full, cache in zip(fulls, caches):
            if cache.dense:  # a slice that is dense already (a vector's prefix, leading rows) is used as it is
                parts.append(cache.view.detach())
                continue
            # A strided slice gets one dense copy, shared by the forward op and its backward (each would
            # otherwise make its own), and kept for later slices until the tensor is written to; clone
            # keeps the weight's memory format (channels_last stays so).
            copy = cache.current_copy(full)
            if copy is None:
                copy = cache.copy = cache.view.clone(memory_format=torch.preserve_format)
                cache.version = full._version
            parts.append(copy.detach())
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[None, ...]:  # type: ignore[override]
        with torch.no_grad():
            into, parts, handed = [], [], []
            for full, cache, grad in zip(ctx.fulls, ctx.caches, grads):
                if grad is None:  # that slice did not reach the loss
                    continue
                if full.grad is None:
                    full.grad = torch.zeros_like(full)
                if grad.shape == full.shape:
                    into.append(full.grad)
                else:
                    into.append(cache.grad_region(full.grad))
                    if not cache.dense and used_region(full) is None:
                        # The first gradient since zero_grad: the region held zeros, so after the add it equals
                        # ``grad``, which the optimizer can step instead of gathering the region.
                        handed.append((full, cache, grad, full.grad._version))
                parts.append(grad)
                mark_used(full, grad.shape)
            if into:
                torch._foreach_add_(into, parts)  # one call for the block's tensors
            for full, cache, grad, version in handed:
                if full.grad._version == version + 1:  # added to once (not twice, as a weight sliced twice here)
                    cache.dense_grad, cache.grad_version = grad, version + 1
        return None, None, None

    @classmethod
    def slices(cls, indexes: tuple[tuple[slice, ...], ...], fulls: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``full[index]`` for each pair, as one autograd node.

        The weights reach the node inside a tuple, which autograd does not look into: it would give
        every weight a gradient-accumulation node of its own, which the engine then runs (and each
        one's hooks) with no gradient, since this node's backward writes ``.grad`` itself. A 0-dim
        tensor that requires grad stands in for all of them, so that the slices require grad.
        """
        return cls.apply(indexes, fulls, _ANCHOR)


#: The one input through which :meth:`SliceWithGrad.slices` joins the autograd graph (it gets no gradient).
_ANCHOR = torch.zeros((), requires_grad=True)


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
        return SliceWithGrad.slices((index,), (full,))[0]
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
