"""Tests of the weight-sharing supernet: exact extraction, structure, gradients, BN recalibration.

Every supernet-capable space is covered (V2 and V1, default and demo). Before any comparison
the supernet's BN running statistics, its 1-D parameters (layer scales, norms, biases) and its
attention biases are randomised: with the initial layer scales of 1e-5 every block is nearly an
identity, and a wrong slice or a lost buffer could go unnoticed. Nothing is mocked.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from search_spaces import (
    ArchConfig,
    BlockConfig,
    SearchSpace,
    SpaceError,
    StageConfig,
    count_params,
    get_preset,
    get_space,
    list_presets,
    lower,
)
from supernet import StaticNet, Supernet, build_block, build_model, recalibrate_bn

NUM_CLASSES = 10
ATOL = 1e-5
N_RANDOM = 24

#: (space, resolution, in_chans): the ImageNet-shaped spaces at 64 px RGB, the demo spaces at 32 px grey.
SPACES = [
    ("efficientformer_v2", 64, 3),
    ("efficientformer", 64, 3),
    ("efficientformer_v2_demo", 32, 1),
    ("efficientformer_demo", 32, 1),
]

#: Presets each default space must contain (the reference facts in ../shared/DESIGN.md, section 3).
EXPECTED_PRESETS = {
    "efficientformer_v2": {"efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2", "efficientformerv2_l"},
    "efficientformer": {"efficientformer_l1", "efficientformer_l3", "efficientformer_l7"},
}


@dataclass
class Case:
    name: str
    space: SearchSpace
    net: Supernet
    resolution: int
    in_chans: int
    x: torch.Tensor  # (2, C, H, W) evaluation input

    def presets(self) -> dict[str, ArchConfig]:
        return {p: get_preset(p) for p in list_presets() if self.space.contains(get_preset(p))}

    def lower(self, arch: ArchConfig):  # noqa: ANN201
        return lower(arch, resolution=self.resolution, num_classes=NUM_CLASSES, in_chans=self.in_chans)

    def images(self, n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, self.in_chans, self.resolution, self.resolution, generator=gen)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The test machine has two cores shared with other jobs; restore torch's setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def randomise(net: nn.Module, seed: int) -> None:
    """Random BN running stats, 1-D parameters (layer scales, BN/LN affine, biases) and attention biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
            elif "attention_biases" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


@pytest.fixture(scope="module", params=SPACES, ids=[s[0] for s in SPACES])
def case(request: pytest.FixtureRequest) -> Case:
    name, resolution, in_chans = request.param
    space = get_space(name)
    torch.manual_seed(0)
    net = Supernet(space, num_classes=NUM_CLASSES, resolution=resolution, in_chans=in_chans)
    randomise(net, seed=1)
    net.eval()
    c = Case(name, space, net, resolution, in_chans, x=torch.empty(0))
    c.x = c.images(2, seed=2)
    return c


def _checksums(module: nn.Module) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in module.state_dict().items()}


def _assert_extraction_exact(case: Case, arch: ArchConfig, label: str) -> torch.Tensor:
    net = case.net.eval()
    with torch.no_grad():
        y_super = net(case.x, arch)
        sub = net.get_active_subnet(arch).eval()
        y_sub = sub(case.x)
    assert y_super.shape == y_sub.shape == (case.x.shape[0], NUM_CLASSES)
    assert y_super.dtype == y_sub.dtype == torch.float32
    assert torch.isfinite(y_super).all(), f"{label}: non-finite supernet output for {arch.to_string()}"
    diff = float((y_super - y_sub).abs().max())
    assert diff <= ATOL, f"{label}: extracted subnet differs from the supernet by {diff:.3g} for {arch.to_string()}"
    return y_super


# ----------------------------------------------------------------------------- exact extraction


def test_default_spaces_contain_their_presets(case: Case) -> None:
    expected = EXPECTED_PRESETS.get(case.name, set())
    assert expected <= set(case.presets()), f"{case.name} lacks presets {sorted(expected - set(case.presets()))}"


def test_extraction_exact_for_largest_smallest_and_presets(case: Case) -> None:
    archs = {"largest": case.space.largest(), "smallest": case.space.smallest(), **case.presets()}
    outputs = {label: _assert_extraction_exact(case, arch, label) for label, arch in archs.items()}
    # The randomised weights make the architectures differ: the comparison above is not trivial.
    gap = float((outputs["largest"] - outputs["smallest"]).abs().max())
    assert gap > 1e-3, f"largest and smallest give nearly the same logits ({gap:.3g}); the test would be blind"


def test_extraction_exact_for_random_configs(case: Case) -> None:
    seen = set()
    for seed in range(N_RANDOM):
        arch = case.space.sample(seed)
        assert case.space.contains(arch)
        seen.add(arch.hash)
        _assert_extraction_exact(case, arch, f"sample({seed})")
    assert len(seen) > N_RANDOM // 2, "the samples should be mostly distinct"


def test_extracted_model_has_build_model_structure(case: Case) -> None:
    archs = {"largest": case.space.largest(), "smallest": case.space.smallest(), **case.presets()}
    archs.update({f"sample({s})": case.space.sample(100 + s) for s in range(5)})
    for label, arch in archs.items():
        sub = case.net.get_active_subnet(arch)
        with torch.device("meta"):  # shapes and classes only: skip allocating and initialising the weights
            ref = build_model(arch, num_classes=NUM_CLASSES, resolution=case.resolution, in_chans=case.in_chans)
        assert isinstance(sub, StaticNet) and type(sub) is type(ref)
        assert sub.arch == arch and sub.specs == ref.specs == case.lower(arch), label
        assert (sub.resolution, sub.in_chans, sub.num_classes) == (case.resolution, case.in_chans, NUM_CLASSES)
        assert [type(b) for b in sub.blocks] == [type(b) for b in ref.blocks], label
        assert [(n, type(m)) for n, m in sub.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()], label
        assert {k: v.shape for k, v in sub.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert {n for n, _ in sub.named_buffers()} == {n for n, _ in ref.named_buffers()}, label
        # Non-persistent buffers (attention-bias index tables) are exported too.
        for i, (block, spec) in enumerate(zip(sub.blocks, sub.specs)):
            idxs = {n: b for n, b in block.named_buffers() if "attention_bias_idxs" in n}
            if idxs:
                fresh = dict(build_block(spec).named_buffers())
                for name, buf in idxs.items():
                    assert torch.equal(buf, fresh[name]), f"{label}: blocks.{i}.{name}"
        n_params = sum(p.numel() for p in sub.parameters())
        assert n_params == sum(p.numel() for p in ref.parameters()) == count_params(case.lower(arch)), label
        assert not any(t.is_meta for t in list(sub.parameters()) + list(sub.buffers())), label


def test_extracted_weights_are_copies(case: Case) -> None:
    arch = case.space.sample(7)
    net = case.net.eval()
    super_storages = {t.untyped_storage().data_ptr() for t in list(net.parameters()) + list(net.buffers())}
    before = _checksums(net)
    with torch.no_grad():
        y_before = net(case.x, arch)
        sub = net.get_active_subnet(arch).eval()
        assert not {t.untyped_storage().data_ptr() for t in sub.state_dict().values()} & super_storages
        for t in sub.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)  # parameters and running stats of the copy
        assert _checksums(net) == before, "mutating the extracted model changed the supernet"
        assert torch.equal(net(case.x, arch), y_before)

        # And the other way round: changing the supernet leaves an extracted model alone.
        sub2 = net.get_active_subnet(arch).eval()
        sub_before = _checksums(sub2)
        y_sub = sub2(case.x)
        stem = net.units["stem"]
        saved = {k: v.clone() for k, v in stem.state_dict().items()}
        try:
            for t in stem.state_dict().values():
                if t.is_floating_point():
                    t.add_(1.0)
            assert _checksums(sub2) == sub_before
            assert torch.equal(sub2(case.x), y_sub)
        finally:
            stem.load_state_dict(saved)
        assert torch.equal(net(case.x, arch), y_before)


# ----------------------------------------------------------------------------- gradients


def test_train_mode_gradients_reach_full_tensors(case: Case) -> None:
    net = case.net
    x = case.images(4, seed=3)
    y = torch.arange(4) % NUM_CLASSES
    for seed in (11, 12):
        arch = case.space.sample(seed)
        used = set(Supernet.unit_names(arch))
        sub = net.get_active_subnet(arch).train()
        net.train()
        net.zero_grad(set_to_none=True)
        try:
            out = net(x, arch)
            F.cross_entropy(out, y).backward()
            out_sub = sub(x)
            F.cross_entropy(out_sub, y).backward()
            # Train mode (BN on batch statistics): still the same function as the static subnet.
            assert float((out - out_sub).detach().abs().max()) <= 1e-4
            got = {n: p for n, p in net.named_parameters() if p.grad is not None}
            assert got, "no supernet parameter received a gradient"
            for n, p in got.items():
                assert p.grad.shape == p.shape, f"{n}: gradient {tuple(p.grad.shape)} for a {tuple(p.shape)} tensor"
                assert torch.isfinite(p.grad).all(), f"{n}: non-finite gradient"
                assert n.split(".")[1] in used, f"{n}: gradient in a unit that {arch.to_string()} does not use"
            for unit in ("stem", "head"):
                assert any(n.startswith(f"units.{unit}.") for n in got), f"no gradient reached the {unit}"
            # Same gradients as the static subnet, landing in slices of the full tensors.
            g_super = sum(float(p.grad.double().square().sum()) for p in got.values())
            g_sub = sum(float(p.grad.double().square().sum()) for p in sub.parameters() if p.grad is not None)
            assert g_sub > 0
            assert g_super == pytest.approx(g_sub, rel=1e-4), f"gradient norms differ for {arch.to_string()}"
        finally:
            net.zero_grad(set_to_none=True)
            net.eval()


def test_largest_backward_reaches_every_used_parameter(case: Case) -> None:
    """Eval mode, so that conv biases in front of a BN get a gradient too (in train mode theirs is 0)."""
    net = case.net.eval()
    arch = case.space.largest()
    sub = net.get_active_subnet(arch)
    net.zero_grad(set_to_none=True)
    try:
        out = net(case.images(4, seed=4), arch)
        assert torch.isfinite(out).all()
        F.cross_entropy(out, torch.arange(4) % NUM_CLASSES).backward()
        names = Supernet.unit_names(arch)
        assert names[0] == "stem" and names[-1] == "head" and len(names) == len(sub.blocks)
        assert {f"down{i}" for i in range(1, len(arch.stages))} <= set(names)
        for name, block in zip(names, sub.blocks):
            unit = net.units[name]
            with_grad = {n: p for n, p in unit.named_parameters() if p.grad is not None}
            for n, p in with_grad.items():
                assert torch.isfinite(p.grad).all(), f"{name}.{n}: non-finite gradient"
                assert p.grad.abs().sum() > 0, f"{name}.{n}: zero gradient from the largest subnet"
            # The largest uses whole tensors: exactly as many elements got gradients as its block has.
            n_grad = sum(p.numel() for p in with_grad.values())
            n_block = sum(p.numel() for p in block.parameters())
            assert n_grad == n_block, f"{name}: {n_grad} parameters got a gradient, the largest's block has {n_block}"
        assert set(net.units) == set(names), "the largest config should use every supernet position"
    finally:
        net.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- BN recalibration


def test_recalibrate_bn(case: Case) -> None:
    net = case.net.eval()
    arch = case.space.sample(21)
    batches = [case.images(4, seed=30 + i) for i in range(3)]
    super_before = _checksums(net)
    stale = net.get_active_subnet(arch).eval()

    model = recalibrate_bn(net, arch, batches)
    assert isinstance(model, StaticNet) and model.arch == arch
    assert not model.training and not any(m.training for m in model.modules())
    assert not net.training, "recalibration must not switch the supernet to train mode"
    assert _checksums(net) == super_before, "recalibration changed the supernet itself"

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    stale_bns = [m for m in stale.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and len(bns) == len(stale_bns)
    for bn, old in zip(bns, stale_bns):
        assert bn.momentum == old.momentum, "the BN momentum must be restored"
        assert not torch.allclose(bn.running_mean, old.running_mean), "running mean unchanged"
        assert not torch.allclose(bn.running_var, old.running_var), "running var unchanged"

    # The statistics are exact averages over the calibration images: check the first BN.
    first = bns[0]
    seen: list[torch.Tensor] = []
    handle = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        handle.remove()
    feats = torch.cat(seen)
    torch.testing.assert_close(first.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    # Variance: the average of the batches' unbiased variances (what momentum=None accumulates).
    batch_vars = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1) for f in seen])
    torch.testing.assert_close(first.running_var, batch_vars.mean(dim=0), atol=1e-5, rtol=1e-4)

    # `batches` limits the calibration; (images, labels) tuples work as well as bare images.
    one = recalibrate_bn(net, arch, [(b, torch.zeros(4, dtype=torch.long)) for b in batches], batches=1)
    first_one = next(m for m in one.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    torch.testing.assert_close(first_one.running_mean, seen[0].mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)

    # A static model is recalibrated in place.
    static = net.get_active_subnet(arch)
    assert recalibrate_bn(static, loader=batches) is static
    with torch.no_grad():
        torch.testing.assert_close(static(case.x), model(case.x), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- active architecture


def test_set_active_and_default_forward(case: Case) -> None:
    net = case.net.eval()
    space = case.space
    assert net.active == space.largest(), "the active config defaults to the largest"
    arch = space.sample(31)
    with torch.no_grad():
        y_largest = net(case.x, space.largest())
        assert torch.equal(net(case.x), y_largest)
        try:
            net.set_active(arch)
            assert net.active == arch
            assert torch.equal(net(case.x), net(case.x, arch))
            assert net.get_active_subnet().arch == arch
            torch.testing.assert_close(net.get_active_subnet().eval()(case.x), net(case.x), atol=ATOL, rtol=0)
        finally:
            net.set_max()
        assert net.active == space.largest()
        assert torch.equal(net(case.x), y_largest)


def _bad_configs(space: SearchSpace) -> dict[str, tuple[ArchConfig, str]]:
    """Configs just outside the space, each with a regex for the choice its error must name."""
    base = space.smallest()
    ch = space.stages[0]
    st = base.stages[0]
    too_deep = StageConfig(st.width, st.blocks + (st.blocks[-1],) * (ch.depths[-1] + 1 - st.depth))
    return {
        "width below the choices": (base.replace_stage(0, StageConfig(ch.widths[0] - 8, st.blocks)),
                                    rf"stage 1 width {ch.widths[0] - 8}\b"),
        "width above the choices": (space.largest().replace_stage(0, StageConfig(ch.widths[-1] + 8, st.blocks)),
                                    rf"stage 1 width {ch.widths[-1] + 8}\b"),
        "width between choices": (base.replace_stage(0, StageConfig(ch.widths[0] + 4, st.blocks)),
                                  rf"stage 1 width {ch.widths[0] + 4}\b"),
        "depth": (base.replace_stage(0, too_deep), rf"stage 1 depth {ch.depths[-1] + 1}\b"),
        "expansion": (base.replace_stage(0, StageConfig(st.width, (BlockConfig(ch.plain_mixer, 1.5),) * st.depth)),
                      r"stage 1 block 1 expansion 1\.5"),
        "mixer": (base.replace_stage(0, StageConfig(st.width, (BlockConfig("lite", 4),) * st.depth)),
                  r"stage 1 block 1:? mixer 'lite'"),
    }


BAD_KINDS = ["width below the choices", "width above the choices", "width between choices", "depth", "expansion",
             "mixer"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_outside_space_refused_by_extraction_and_set_active(case: Case, kind: str) -> None:
    arch, pattern = _bad_configs(case.space)[kind]
    assert not case.space.contains(arch)
    with pytest.raises(SpaceError, match=pattern):
        case.net.get_active_subnet(arch)
    with pytest.raises(SpaceError, match=pattern):
        case.net.set_active(arch)
    assert case.net.active == case.space.largest(), "a refused set_active must leave the active config alone"


def test_outside_space_refused_by_forward(case: Case) -> None:
    """``forward(x, arch)`` must not silently run a config the supernet was never trained on.

    Checked for every kind of bad choice at once; the failure lists each kind that got through.
    """
    import re

    problems = []
    for kind, (arch, pattern) in _bad_configs(case.space).items():
        try:
            with torch.no_grad():
                case.net(case.x, arch)
        except SpaceError as exc:
            if not re.search(pattern, str(exc)):
                problems.append(f"{kind}: SpaceError does not name the choice ({pattern!r}): {exc}")
        except Exception as exc:  # noqa: BLE001 - reported, not swallowed
            problems.append(f"{kind}: {type(exc).__name__} instead of SpaceError: {exc}")
        else:
            problems.append(f"{kind}: ran without an error ({arch.to_string()})")
    assert not problems, "Supernet.forward(x, arch) accepted configs outside the space:\n" + "\n".join(problems)


def test_supernet_refuses_families_without_one() -> None:
    with pytest.raises(SpaceError, match="efficientvit"):
        Supernet(get_space("efficientvit"), num_classes=NUM_CLASSES, resolution=32)
