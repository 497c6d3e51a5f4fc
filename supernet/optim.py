"""AdamW for shared weights: each step updates only the part of a tensor that the step used.

A supernet keeps full-size tensors (the widest width of every slot) and a subnet uses a
leading slice of each. With a plain optimizer every used tensor is updated whole: a step of an
S0-sized subnet inside the default V2 supernet pays the optimizer for all of the shared
weights it touches, and the untouched part is still decayed and moved by stale momentum.

:class:`SharedAdamW` steps only the **used region** of each tensor: the leading box that the
step's slices covered (the supernet's sliced weights mark it in their backward pass; a tensor
used whole, through plain autograd, is marked whole). Inside the region the update is exactly
AdamW's (decoupled weight decay, bias-corrected moments); outside it nothing changes, as for a
parameter that received no gradient. In sandwich training the largest subnet uses every
tensor of its slots in full, so the region is the whole tensor and the step is plain AdamW.

The update itself is torch's fused AdamW kernel; used regions are gathered into contiguous
copies for it and written back (:meth:`SharedAdamW.step`).

Gradients stay allocated between steps and :meth:`SharedAdamW.zero_grad` zeroes only the
regions used since the last call, so a step does not re-allocate and clear full-size gradients.
State dicts have AdamW's layout (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["SharedAdamW", "is_dense", "manage", "mark_used", "used_region"]

_REGION = "_nas_used_region"
_MANAGED = "_nas_managed"


def mark_used(param: torch.Tensor, shape: tuple[int, ...] | torch.Size | None = None) -> None:
    """Record that the current step used ``param[:shape[0], :shape[1], ...]`` (``None``: all of it)."""
    full = tuple(param.shape)
    new = full if shape is None else tuple(shape)
    old = getattr(param, _REGION, None)
    if old is not None:
        new = tuple(max(a, b) for a, b in zip(old, new))
    setattr(param, _REGION, new)


def manage(param: torch.Tensor) -> None:
    """Declare that ``param``'s uses are marked explicitly (by the supernet's slices), so that plain
    gradient accumulation no longer marks it whole (autograd runs that hook even for a ``None``
    gradient)."""
    if not getattr(param, _MANAGED, False):
        setattr(param, _MANAGED, True)


def _mark_whole(param: torch.Tensor) -> None:
    if not getattr(param, _MANAGED, False):
        mark_used(param)


def used_region(param: torch.Tensor) -> tuple[int, ...] | None:
    """The leading box of ``param`` used since the last :meth:`SharedAdamW.zero_grad`, or None."""
    return getattr(param, _REGION, None)


def _box(region: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in region)


class SharedAdamW(torch.optim.Optimizer):
    """AdamW over the used regions of shared tensors (see the module docstring).

    Args:
        params: parameters or parameter groups, as for :class:`torch.optim.AdamW`.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: decoupled weight decay.

    Raises:
        ValueError: a value out of range (the message names it).
    """

    def __init__(self, params: Iterable[Any], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"`lr` must be a finite number >= 0, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"`betas` must be within [0, 1), got {betas!r}")
        if not (math.isfinite(eps) and eps >= 0) or not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"`eps` and `weight_decay` must be finite numbers >= 0, got {eps!r} and {weight_decay!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:  # plain autograd accumulation means the whole tensor was used
                    p.register_post_accumulate_grad_hook(_mark_whole)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool | None = None) -> None:  # type: ignore[override]
        """Zero the gradients' used regions (``set_to_none=True``: drop the gradients instead)."""
        used = []
        for group in self.param_groups:
            for p in group["params"]:
                region = used_region(p)
                if set_to_none:
                    p.grad = None
                elif p.grad is not None and region is not None:
                    used.append(p.grad if region == p.grad.shape else p.grad[_box(region)])
                if region is not None:
                    delattr(p, _REGION)
        if used:
            torch._foreach_zero_(used)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One AdamW update of every parameter's used region.

        The update runs in torch's fused AdamW kernel (the one ``torch.optim.AdamW(fused=True)``
        runs), which reads its tensors as dense memory. A tensor used whole, and a used region that
        is dense memory already (a prefix of a vector, the leading rows of a matrix), is passed as it
        is; a strided region is gathered into contiguous copies (parameter, gradient and both
        moments), updated there and written back.
        """
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params, grads, avgs, sqs, steps = [], [], [], [], []
            scatter: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = []
            for p in group["params"]:
                region = used_region(p)
                if p.grad is None or region is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:  # a state dict loaded from a file keeps steps on the CPU
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                if region != tuple(p.shape):
                    box = _box(region)
                    tensors = tuple(t[box] for t in tensors)
                if _dense_alike(tensors):  # whole tensors, and regions that are dense already (1-D prefixes, ...)
                    dense = tensors
                else:
                    dense = tuple(v.contiguous() for v in tensors)
                    scatter.append((tensors[:1] + tensors[2:], dense[:1] + dense[2:]))  # all but the gradient
                for out, t in zip((params, grads, avgs, sqs), dense):
                    out.append(t)
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, grads, avgs, sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                                beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            if scatter:
                torch._foreach_copy_([t for views, _ in scatter for t in views],
                                     [t for _, dense in scatter for t in dense])
        return loss


def is_dense(t: torch.Tensor) -> bool:
    """``t`` covers one dense block of memory, in the standard or the channels_last layout."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _dense_alike(tensors: tuple[torch.Tensor, ...]) -> bool:
    """All of ``tensors`` cover dense memory with the same strides (what the fused kernel reads)."""
    first = tensors[0]
    return is_dense(first) and all(t.stride() == first.stride() and t.dtype == first.dtype for t in tensors[1:])
