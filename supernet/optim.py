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

The update itself is torch's fused AdamW kernel. A strided used region is stepped in dense
buffers of its own, and the parameter's region written back. The region's moments stay in the
buffers for as long as the region stays the same (a subnet trained alone), and go back to the
state tensors when it changes, in :meth:`SharedAdamW.state_dict` and in
:meth:`SharedAdamW.sync_state`. The parameter and gradient need no gathering when the slicing
left them dense already (:class:`SliceCache`): the forward pass's copy of the region, current
while the tensor's version counter has not moved, and the backward pass's gradient of it, when
the region held zeros before. The copy is stepped in place and stays current after the
write-back, so a subnet trained step after step copies its strided slices once.
(:meth:`SharedAdamW.step`; the fused kernel does not move version counters, so the step moves
them itself.)

Gradients stay allocated between steps and :meth:`SharedAdamW.zero_grad` zeroes only the
regions used since the last call, so a step does not re-allocate and clear full-size gradients.
State dicts have AdamW's layout (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter).
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.autograd.graph import increment_version

__all__ = ["SharedAdamW", "SliceCache", "forget_slices", "is_dense", "manage", "mark_used", "slice_cache", "used_region"]

_REGION = "_nas_used_region"
_MANAGED = "_nas_managed"
_SLICE = "_nas_slice"
_KEEPS_COPIES = "_nas_keeps_copies"


def mark_used(param: torch.Tensor, shape: tuple[int, ...] | torch.Size | None = None) -> None:
    """Record that the current step used ``param[:shape[0], :shape[1], ...]`` (``None``: all of it)."""
    new = tuple(param.shape if shape is None else shape)
    old = getattr(param, _REGION, None)
    if old is not None and old != new:
        new = tuple(max(a, b) for a, b in zip(old, new))
    setattr(param, _REGION, new)


class SliceCache:
    """What slicing a shared tensor leaves for the next slice of the same region (see :func:`slice_cache`).

    ``view`` is the region as a view of the tensor, ``dense`` whether that view is dense memory. For a
    strided region, ``copy`` is the dense copy the forward passes use and ``version`` the tensor's
    version counter when ``copy`` was last equal to the region: any in-place write to the tensor or a
    view of it moves the counter and so retires the copy. :class:`SharedAdamW` steps a strided region
    in its copy and writes it back, after which the copy is current again: a subnet trained step after
    step is gathered and copied once, not every step. ``grad_view`` is the region of the gradient whose
    memory starts at ``grad_ptr``. ``dense_grad`` is the backward pass's dense gradient of a strided region
    that held zeros before it was added, so equals the region while the gradient's version counter stays at
    ``grad_version``: the optimizer steps it instead of gathering the region.
    """

    __slots__ = ("index", "ptr", "view", "shape", "dense", "copy", "version", "grad_ptr", "grad_view", "dense_grad",
                 "grad_version")

    def __init__(self, full: torch.Tensor, index: tuple[slice, ...]) -> None:
        self.index, self.ptr = index, full.data_ptr()
        self.view = full.detach()[index]
        self.shape, self.dense = self.view.shape, is_dense(self.view)
        self.copy: torch.Tensor | None = None
        self.version = -1
        self.grad_ptr: int | None = None
        self.grad_view: torch.Tensor | None = None
        self.dense_grad: torch.Tensor | None = None
        self.grad_version = -1

    def current_copy(self, full: torch.Tensor) -> torch.Tensor | None:
        """The dense copy of the region, if nothing has written to ``full`` since it was taken.

        Only for a tensor that a live :class:`SharedAdamW` steps: fused optimizer kernels (torch's own
        ``AdamW(fused=True)`` among them) write in place without moving the version counter, and
        SharedAdamW moves it itself.
        """
        if self.copy is None or self.version != full._version or self.ptr != full.data_ptr():
            return None
        keeper = getattr(full, _KEEPS_COPIES, None)
        return self.copy if keeper is not None and keeper() is not None else None

    def stand_ins(self, full: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The region's dense copy and the backward pass's dense gradient of it, each where it is current and
        laid out like ``like`` (else None); the gradient is handed over once."""
        copy = self.current_copy(full)
        if copy is not None and copy.stride() != like.stride():
            copy = None
        grad, self.dense_grad = self.dense_grad, None
        g = full.grad
        if grad is not None and (g is None or g.data_ptr() != self.grad_ptr or g._version != self.grad_version
                                 or grad.stride() != like.stride()):
            grad = None
        return copy, grad

    def grad_region(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad[index]``, kept while the gradient's memory is the same (the cached view holds that memory)."""
        ptr = grad.data_ptr()
        if ptr != self.grad_ptr:
            self.grad_view, self.grad_ptr = grad[self.index], ptr
        return self.grad_view  # type: ignore[return-value]


def slice_cache(full: torch.Tensor, index: tuple[slice, ...]) -> SliceCache:
    """``full``'s :class:`SliceCache` for ``index``, made anew when the index or the tensor's memory changed.

    Marks ``full`` as sliced (:func:`manage`): its uses are marked by the slices from then on.
    """
    cache = getattr(full, _SLICE, None)
    if cache is None or cache.index != index or cache.ptr != full.data_ptr():
        cache = SliceCache(full, index)
        setattr(full, _SLICE, cache)
        manage(full)
    return cache


def forget_slices(params: Iterable[torch.Tensor]) -> None:
    """Drop the slice caches of ``params``: for writes that bypass the version counter (``t.data``, collectives)."""
    for p in params:
        if hasattr(p, _SLICE):
            delattr(p, _SLICE)


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


class _Plan:
    """How one parameter's used region is stepped: views of the region in the parameter, its gradient
    and both moments, and for a strided region the dense buffers the fused kernel works on.

    A strided region's moments live in its buffers while the plan lasts (``dirty``: newer than the
    state tensors); :meth:`SharedAdamW.sync_state` writes them back.
    """

    __slots__ = ("region", "ptr", "of", "views", "buffers", "loaded", "dirty")

    def __init__(self, region: tuple[int, ...], p: torch.Tensor, state: dict[str, Any],
                 views: tuple[torch.Tensor, ...], buffers: tuple[torch.Tensor, ...] | None) -> None:
        #: what the views were taken of: the region, the parameter's memory, its gradient and moments
        self.region, self.ptr = region, p.data_ptr()
        self.of = (p.grad, state["exp_avg"], state["exp_avg_sq"])
        self.views, self.buffers = views, buffers
        self.loaded = self.dirty = False

    def fits(self, p: torch.Tensor, region: tuple[int, ...], state: dict[str, Any]) -> bool:
        """The views are still of ``p``'s region: the same region and tensors (a new tensor anywhere, e.g. after
        ``load_state_dict``, a change of memory format or a dropped gradient, needs a new plan)."""
        of = self.of
        return (self.region == region and self.ptr == p.data_ptr() and of[0] is p.grad
                and of[1] is state.get("exp_avg") and of[2] is state.get("exp_avg_sq"))

    def moments_of(self, state: dict[str, Any]) -> bool:
        """The plan's moment views are of ``state``'s moment tensors."""
        return self.of[1] is state.get("exp_avg") and self.of[2] is state.get("exp_avg_sq")


class SharedAdamW(torch.optim.Optimizer):
    """AdamW over the used regions of shared tensors (see the module docstring).

    A strided region's moments are kept in dense buffers from step to step while the region stays the
    same, and written back to the state tensors when it changes and in :meth:`state_dict`; call
    :meth:`sync_state` before reading ``optimizer.state`` directly.

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
        self._plans: dict[torch.Tensor, _Plan] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:  # plain autograd accumulation means the whole tensor was used
                    p.register_post_accumulate_grad_hook(_mark_whole)
                setattr(p, _KEEPS_COPIES, weakref.ref(self))  # its writes move the version counter (SliceCache)

    # ----------------------------------------------------------------- state kept in buffers
    def _write_back(self, plan: _Plan, p: torch.Tensor) -> None:
        """Write a plan's moments back to the state tensors, if they are newer and those tensors are still ``p``'s."""
        if plan.dirty and plan.moments_of(self.state[p]):
            torch._foreach_copy_(list(plan.views[2:]), list(plan.buffers[2:]))  # type: ignore[index]
        plan.dirty = False

    @torch.no_grad()
    def sync_state(self) -> None:
        """Write the moments kept in buffers back to ``self.state`` (``state_dict`` does this itself)."""
        for p, plan in self._plans.items():
            self._write_back(plan, p)

    def state_dict(self) -> dict[str, Any]:
        self.sync_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._plans.clear()  # their buffers hold the moments being replaced
        super().load_state_dict(state_dict)

    def _plan(self, p: torch.Tensor, region: tuple[int, ...]) -> _Plan:
        """The tensors ``step`` hands the fused kernel for ``p``'s used region (kept while the region and
        the tensors behind it stay the same: a subnet trained alone reuses them every step). Called under
        ``no_grad`` (views of a parameter made with grad mode on would join the autograd graph)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:  # a state dict loaded from a file keeps steps on the CPU
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        plan = self._plans.get(p)
        if plan is not None:
            if plan.fits(p, region, state):
                return plan
            self._write_back(plan, p)
        views = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
        if region != tuple(p.shape):
            box = _box(region)
            views = tuple(t[box] for t in views)
        # Whole tensors, and regions that are dense already (1-D prefixes, leading rows), are stepped in
        # place; a strided region is gathered into dense buffers of its own, laid out as the forward's
        # dense copy of it is (``clone`` in the preserved format), so that the copy can stand in for one.
        buffers = None if _dense_alike(views) else tuple(torch.empty_like(views[0], memory_format=torch.preserve_format)
                                                         for _ in views)
        plan = self._plans[p] = _Plan(region, p, state, views, buffers)
        return plan

    # ----------------------------------------------------------------- the optimizer
    @torch.no_grad()
    def zero_grad(self, set_to_none: bool | None = None) -> None:  # type: ignore[override]
        """Zero the gradients' used regions (``set_to_none=True``: drop the gradients instead)."""
        used = []
        for group in self.param_groups:
            for p in group["params"]:
                region = getattr(p, _REGION, None)  # (used_region, inlined: this loop sees every parameter)
                if region is None:
                    continue
                delattr(p, _REGION)
                if set_to_none:
                    plan = self._plans.pop(p, None)
                    if plan is not None:
                        self._write_back(plan, p)
                    p.grad = None
                    cache = getattr(p, _SLICE, None)
                    if cache is not None:  # its views would keep the dropped gradient's memory
                        cache.grad_view = cache.grad_ptr = cache.dense_grad = None
                elif p.grad is not None:
                    plan = self._plans.get(p)
                    if plan is not None and plan.region == region and plan.of[0] is p.grad:
                        used.append(plan.views[1])  # the step's own view of the region
                    else:
                        used.append(p.grad if region == p.grad.shape else p.grad[_box(region)])
        if used:
            torch._foreach_zero_(used)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One AdamW update of every parameter's used region.

        The update runs in torch's fused AdamW kernel (the one ``torch.optim.AdamW(fused=True)``
        runs), which reads its tensors as dense memory. A tensor used whole, and a used region that
        is dense memory already (a prefix of a vector, the leading rows of a matrix), is passed as it
        is. A strided region is stepped in dense buffers and the parameter's region written back; its
        moments stay there while the region does (see :meth:`sync_state`). The parameter and gradient
        are gathered into them (all regions in one copy call) unless the slices' dense copy of the
        region and the backward's dense gradient of it are current, which are stepped instead
        (:meth:`SliceCache.stand_ins`).
        """
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            tensors: tuple[list[torch.Tensor], ...] = ([], [], [], [])
            steps: list[torch.Tensor] = []
            gather_to: list[torch.Tensor] = []
            gather_from: list[torch.Tensor] = []
            strided: list[tuple[torch.Tensor, _Plan, torch.Tensor, SliceCache | None]] = []
            for p in group["params"]:
                region = getattr(p, _REGION, None)  # (used_region, inlined: this loop sees every parameter)
                if p.grad is None or region is None:
                    continue
                plan = self._plan(p, region)
                steps.append(self.state[p]["step"])
                bufs = plan.buffers
                if bufs is None:
                    for out, t in zip(tensors, plan.views):
                        out.append(t)
                    continue
                # The forward pass's dense copy of the region and the backward pass's dense gradient of it,
                # where current, stand in for the parameter's and the gradient's buffers (not gathered
                # again); the copy stays current after the write-back.
                cache = getattr(p, _SLICE, None)
                if cache is not None and (cache.shape != region or cache.ptr != p.data_ptr()):
                    cache = None
                own = (None, None) if cache is None else cache.stand_ins(p, bufs[0])
                n = 2 if plan.loaded else 4  # moments: gathered once, when the plan is new
                for i, (out, buf) in enumerate(zip(tensors, bufs)):
                    t = own[i] if i < 2 else None
                    if t is None:
                        t = buf
                        if i < n:
                            gather_to.append(buf)
                            gather_from.append(plan.views[i])
                    out.append(t)
                plan.loaded = plan.dirty = True
                strided.append((p, plan, tensors[0][-1], cache))
            if not steps:
                continue
            if gather_to:
                torch._foreach_copy_(gather_to, gather_from)
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(*tensors, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                                beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            # The fused kernel writes in place without telling autograd: move the version counters, which
            # retire the slices' copies of a tensor stepped in place (and catch a graph still holding one).
            increment_version(tensors[0])
            if strided:  # the parameter's region back into the parameter; its buffer is the region's copy now
                torch._foreach_copy_([plan.views[0] for _, plan, _, _ in strided], [t for _, _, t, _ in strided])
                for p, _, t, cache in strided:
                    if cache is not None:
                        cache.copy, cache.version = t, p._version
        return loss


def is_dense(t: torch.Tensor) -> bool:
    """``t`` covers one dense block of memory, in the standard or the channels_last layout."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _dense_alike(tensors: tuple[torch.Tensor, ...]) -> bool:
    """All of ``tensors`` cover dense memory with the same strides (what the fused kernel reads)."""
    first = tensors[0]
    return is_dense(first) and all(t.stride() == first.stride() and t.dtype == first.dtype for t in tensors[1:])
