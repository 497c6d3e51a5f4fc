"""SharedAdamW: plain AdamW where a tensor is used whole, nothing outside the used region otherwise."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from search_spaces import get_space
from supernet import Supernet, build_model
from supernet.optim import SharedAdamW, used_region


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def test_equals_torch_adamw_on_tensors_used_whole() -> None:
    torch.manual_seed(0)
    model = build_model(get_space("efficientformer_v2_demo").largest(), num_classes=10, resolution=32, in_chans=1)
    twin = copy.deepcopy(model)
    reference = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    ours = SharedAdamW(twin.parameters(), lr=1e-2, weight_decay=0.05)
    x, y = _batch()
    for _ in range(4):
        for m, opt in ((model, reference), (twin, ours)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert ours.state_dict()["state"].keys() == reference.state_dict()["state"].keys()


def test_a_subnet_step_changes_only_the_used_slices() -> None:
    space = get_space("efficientformer_v2_demo")
    net = Supernet(space, num_classes=10, resolution=32, in_chans=1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = SharedAdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(net(x, space.smallest()), y).backward()
    opt.step()
    used = 0
    for name, p in net.named_parameters():
        delta = (p.detach() - before[name]).abs()
        region = used_region(p)
        if region is None:
            assert float(delta.max()) == 0.0, f"{name} changed without being used"
            continue
        inside = torch.zeros_like(delta, dtype=torch.bool)
        inside[tuple(slice(0, k) for k in region)] = True
        assert not delta[~inside].any(), f"{name} changed outside its used region"
        used += int(inside.sum())
    assert 0 < used < sum(p.numel() for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None or not p.grad.any() for p in net.parameters())
    assert all(used_region(p) is None for p in net.parameters())


def test_sandwich_uses_the_union_of_the_subnets_slices() -> None:
    space = get_space("efficientformer_v2_demo")
    net = Supernet(space, num_classes=10, resolution=32, in_chans=1)
    opt = SharedAdamW(net.parameters(), lr=1e-2)
    x, y = _batch()
    opt.zero_grad()
    for arch in (space.smallest(), space.largest()):
        F.cross_entropy(net(x, arch), y).backward()
    stem = net.units["stem"].full["ef2_stem"].conv2.conv.weight
    assert used_region(stem) == tuple(stem.shape)  # the largest uses the stem whole


@pytest.mark.parametrize("kw, name", [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"),
                                      ({"eps": float("nan")}, "eps")])
def test_refuses_bad_values(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SharedAdamW([torch.nn.Parameter(torch.zeros(2))], **kw)


@pytest.mark.parametrize("shape, region, channels_last, grad_contiguous", [
    ((6, 5, 3, 3), (4, 2, 3, 3), False, False),  # strided: gathered, stepped, written back
    ((6, 5, 3, 3), (4, 2, 3, 3), True, False),
    ((6, 5, 3, 3), (4, 2, 3, 3), True, True),  # a gradient laid out unlike its parameter
    ((6, 5, 3, 3), (4, 5, 3, 3), True, False),  # leading rows: dense already, stepped in place
    ((6, 5), (4, 5), False, False),
    ((7,), (3,), False, False),  # a vector's prefix (biases, norms): dense, stepped in place
], ids=["strided", "strided-channels_last", "strided-channels_last-grad_contiguous", "rows-channels_last", "rows",
        "prefix"])
def test_a_used_region_steps_exactly_like_adamw_on_that_slice(shape: tuple[int, ...], region: tuple[int, ...],
                                                              channels_last: bool, grad_contiguous: bool) -> None:
    """Bit for bit AdamW on a tensor holding just the used slice; nothing outside it changes."""
    from supernet.optim import manage, mark_used

    gen = torch.Generator().manual_seed(3)
    full = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    if channels_last:
        full.data = full.data.contiguous(memory_format=torch.channels_last)
    manage(full)
    box = tuple(slice(0, n) for n in region)
    alone = torch.nn.Parameter(full.detach()[box].clone())
    ours = SharedAdamW([full], lr=1e-2, weight_decay=0.05)
    reference = torch.optim.AdamW([alone], lr=1e-2, weight_decay=0.05, fused=True)
    outside = full.detach().clone()
    for _ in range(3):
        g = torch.randn(*region, generator=gen)
        ours.zero_grad()
        if full.grad is None:
            full.grad = torch.zeros(shape) if grad_contiguous else torch.zeros_like(full)
        full.grad[box] += g
        mark_used(full, g.shape)
        alone.grad = torch.empty_like(alone).copy_(g)  # the fused kernel needs the parameter's own layout
        ours.step()
        reference.step()
    assert torch.equal(full.detach()[box], alone.detach())
    ours.sync_state()  # a strided region's moments are kept in buffers between steps
    assert torch.equal(ours.state[full]["exp_avg"][box], reference.state[alone]["exp_avg"])
    assert torch.equal(ours.state[full]["exp_avg_sq"][box], reference.state[alone]["exp_avg_sq"])
    changed = full.detach() != outside
    assert changed[box].all()
    changed[box] = False
    assert not changed.any()


def _reference_step(full: torch.Tensor, grad: torch.Tensor, state: dict, region: tuple[int, ...], *, lr: float,
                    weight_decay: float) -> None:
    """AdamW on the region alone: copies of it stepped by the fused kernel, written back (no buffers kept)."""
    box = tuple(slice(0, n) for n in region)
    if not state:
        state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(full), exp_avg_sq=torch.zeros_like(full))
    views = (full[box], grad[box], state["exp_avg"][box], state["exp_avg_sq"][box])
    # Dense copies in the layout SharedAdamW's buffers have (the fused kernel's vector tail falls on other
    # elements in another layout, which can move results by an ulp).
    dense = [v.clone(memory_format=torch.preserve_format) for v in views]
    state["step"] += 1
    torch._fused_adamw_(*([d] for d in dense), [], [state["step"]], amsgrad=False, lr=lr, beta1=0.9, beta2=0.999,
                        weight_decay=weight_decay, eps=1e-8, maximize=False)
    for v, d in zip(views[:1] + views[2:], dense[:1] + dense[2:]):
        v.copy_(d)


def test_moments_kept_in_buffers_follow_region_changes_state_dicts_and_set_to_none() -> None:
    """Regions that change from step to step, a state dict taken mid-way (and loaded into a new optimizer),
    and gradients dropped with ``set_to_none``: bit for bit the region-by-region reference throughout."""
    from supernet.optim import manage, mark_used

    gen = torch.Generator().manual_seed(5)
    shape = (6, 5, 3, 3)
    full = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    manage(full)
    ref_param, ref_grad, ref_state = full.detach().clone(), torch.zeros(shape), {}
    ours = SharedAdamW([full], lr=1e-2, weight_decay=0.05)
    regions = [(4, 2, 3, 3), (4, 2, 3, 3), (5, 3, 3, 3), (4, 2, 3, 3), (6, 5, 3, 3), (3, 4, 3, 3), (3, 4, 3, 3)]
    for i, region in enumerate(regions):
        box = tuple(slice(0, n) for n in region)
        ours.zero_grad(set_to_none=(i == 3))
        ref_grad.zero_()
        g = torch.randn(*region, generator=gen)
        if full.grad is None:
            full.grad = torch.zeros_like(full)
        full.grad[box] += g
        mark_used(full, g.shape)
        ref_grad[box] += g
        ours.step()
        _reference_step(ref_param, ref_grad, ref_state, region, lr=1e-2, weight_decay=0.05)
        assert torch.equal(full.detach(), ref_param), f"step {i}"
        if i == 1:  # mid-way, moments in buffers: the state dict has them, and a new optimizer goes on from it
            sd = copy.deepcopy(ours.state_dict())
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sd["state"][0][k], ref_state[k])
            ours = SharedAdamW([full], lr=1e-2, weight_decay=0.05)
            ours.load_state_dict(sd)
    ours.sync_state()
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours.state[full][k], ref_state[k])
    assert ours.state[full]["step"].item() == ref_state["step"].item() == len(regions)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_sliced_weights_step_like_adamw_through_their_kept_copies(channels_last: bool) -> None:
    """A strided slice's dense copy is reused by the next forward and stepped in place by SharedAdamW, and
    the backward's dense gradient is stepped instead of the gathered region.

    Through SliceWithGrad, over steps that repeat a region, change it, write to the parameter or to its
    gradient from outside (which must retire the copy or the handed-over gradient), accumulate two
    backward passes, and put a new tensor behind the parameter: bit for bit the region-by-region AdamW
    reference, and every forward sees the parameter's current values. ``[shape, small]`` is a sandwich
    step: the whole tensor is used, so it is stepped in place (by a kernel that does not move the version
    counter), while the slice last taken is the small one.
    """
    from supernet.slicing import SliceWithGrad

    gen = torch.Generator().manual_seed(7)
    shape = (6, 5, 3, 3)
    full = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    full.data = full.data.contiguous(memory_format=layout)
    ref_param, ref_state = full.detach().clone(), {}
    ref_grad = torch.zeros_like(ref_param)  # the reference's copies must share one layout (the fused kernel reads memory)
    ours = SharedAdamW([full], lr=1e-2, weight_decay=0.05)
    small, mid = (4, 2, 3, 3), (5, 3, 3, 3)
    steps = [[small], [small], [small], "write", [small], [mid], [small], [shape], [small], "scale_grad", [small], [small],
             [small, small], [small, mid], [shape, small], [small], [small, shape], [small], "load", [small], [small]]
    last_ptr = None
    for i, step in enumerate(steps):
        if step == "scale_grad":  # applied to the step before it, between its backward and optimizer step
            continue
        if step == "write":  # an in-place write from outside: the kept copy must not be used again
            with torch.no_grad():
                full.mul_(0.5)
            ref_param.mul_(0.5)
            continue
        if step == "load":  # a new tensor behind the parameter
            full.data = (full.data * 2).contiguous(memory_format=layout)
            ref_param.mul_(2)
            last_ptr = None
            continue
        ours.zero_grad()
        ref_grad.zero_()
        for region in step:  # one backward pass each, accumulated
            box = tuple(slice(0, n) for n in region)
            (part,) = SliceWithGrad.slices((box,), (full,))
            assert torch.equal(part, ref_param[box]), f"step {i}: the forward saw stale values"
            if i in (1, 2):  # the same region as the step before, nothing written in between: the same copy
                assert part.data_ptr() == last_ptr, f"step {i}: copied again"
            last_ptr = part.data_ptr()
            w = torch.randn(*region, generator=gen)
            (part * w).sum().backward()
            ref_grad[box] += w
        if i + 1 < len(steps) and steps[i + 1] == "scale_grad":  # e.g. clipping, or averaging over ranks, between backward and step
            full.grad.mul_(0.5)
            ref_grad.mul_(0.5)
        ours.step()
        _reference_step(ref_param, ref_grad, ref_state, tuple(map(max, *step)) if len(step) > 1 else step[0],
                        lr=1e-2, weight_decay=0.05)
        assert torch.equal(full.detach(), ref_param), f"step {i}"
    ours.sync_state()
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours.state[full][k], ref_state[k])


def test_slices_of_weights_another_optimizer_steps_are_copied_afresh() -> None:
    """torch's fused AdamW writes in place without moving version counters: slices of the weights it steps
    must not reuse a kept copy (only weights a live SharedAdamW steps keep them), also after a SharedAdamW
    stepped them first and was dropped."""
    import gc

    from supernet.slicing import SliceWithGrad

    full = torch.nn.Parameter(torch.randn(6, 5, 3, 3))
    box = (slice(0, 4), slice(0, 2))
    shared = SharedAdamW([full], lr=0.1)
    for _ in range(2):
        shared.zero_grad()
        SliceWithGrad.slices((box,), (full,))[0].sum().backward()
        shared.step()
    del shared
    gc.collect()
    full.grad = None
    opt = torch.optim.AdamW([full], lr=0.1, fused=True)
    for _ in range(3):
        opt.zero_grad()
        (part,) = SliceWithGrad.slices((box,), (full,))
        assert torch.equal(part, full.detach()[box])
        part.sum().backward()
        opt.step()


def test_forget_slices_drops_a_copy_that_a_write_through_data_left_current() -> None:
    """A write through ``.data`` (as a collective broadcast does) moves no version counter; after
    ``forget_slices`` the next slice sees the written values."""
    from supernet.optim import forget_slices
    from supernet.slicing import SliceWithGrad

    full = torch.nn.Parameter(torch.randn(6, 5, 3, 3))
    opt = SharedAdamW([full], lr=0.1)  # kept alive: only weights a live SharedAdamW steps keep copies
    box = (slice(0, 4), slice(0, 2))
    first = SliceWithGrad.slices((box,), (full,))[0]
    full.data.mul_(2)
    assert torch.equal(SliceWithGrad.slices((box,), (full,))[0], first)  # the copy is kept, unseen write
    forget_slices([full])
    assert torch.equal(SliceWithGrad.slices((box,), (full,))[0], full.detach()[box])
    del opt
