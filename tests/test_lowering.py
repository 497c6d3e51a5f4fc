"""Positioned lowering, block-kind registry, non-square inputs and the feature API.

The expected positions are written down from the presets' published tables (widths, depths),
not derived from the lowering under test; counts at non-square inputs are checked against
torch's own parameter count and a MAC count from forward hooks.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from search_spaces import (
    BlockSpec, LoweringSetup, count_macs, count_params, get_preset, get_space, list_presets, lower,
)
from search_spaces.enumerate import enumerate_specs
from search_spaces.errors import SpaceError
from search_spaces.kinds import get_kind, list_kinds
from supernet import Supernet, build_model
from supernet.blocks import downsample_bias_index, relative_bias_index

BIN = Path(sys.executable).parent

#: (stem stage blocks, per body stage: (entry units, blocks)) from the papers' tables.
DEPTHS = {
    "efficientformer_l1": (3, 2, 6, 4), "efficientformer_l3": (4, 4, 12, 6), "efficientformer_l7": (6, 6, 18, 8),
    "efficientformerv2_s0": (2, 2, 6, 4), "efficientformerv2_s1": (3, 3, 9, 6),
    "efficientformerv2_s2": (4, 4, 12, 8), "efficientformerv2_l": (5, 5, 15, 10),
}
EVIT_DEPTHS = {"efficientvit_b0": (1, 2, 2, 2, 2), "efficientvit_b1": (1, 2, 3, 3, 4),
               "efficientvit_b2": (1, 3, 4, 4, 6), "efficientvit_b3": (1, 4, 6, 6, 9)}


def expected_stages(name: str) -> list[int]:
    if name in DEPTHS:  # stem, stage 1 blocks, then a downsampling + blocks for stages 2-4, head
        d = DEPTHS[name]
        return [0] + [1] * d[0] + [2] * (1 + d[1]) + [3] * (1 + d[2]) + [4] * (1 + d[3]) + [5]
    d = EVIT_DEPTHS[name]  # input conv + DSConv blocks, MBConv stages (first block strided), entry MBConv + blocks
    return [0] * (1 + d[0]) + [1] * d[1] + [2] * d[2] + [3] * (1 + d[3]) + [4] * (1 + d[4]) + [5]


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_stage_of_every_block_of_every_preset(name: str) -> None:
    specs = lower(get_preset(name))
    assert [s.stage for s in specs] == expected_stages(name)
    for s in specs:  # slots count the architecture's blocks; entry units are -1
        assert s.slot >= -1


def test_nas_info_json_gives_every_block_its_stage() -> None:
    r = subprocess.run([str(BIN / "nas-info"), "efficientformerv2_s0", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    blocks = json.loads(r.stdout)["blocks"]
    # the wording: 0 (stem), stage 1 x2, 2 x3 (with the downsampling), 3 x7, 4 x5, then the head
    assert [b["stage"] for b in blocks] == [0, 1, 1, 2, 2, 2] + [3] * 7 + [4] * 5 + [5]
    assert [b["role"] for b in blocks][:4] == ["stem", "block", "block", "down"] and blocks[-1]["role"] == "head"
    table = subprocess.run([str(BIN / "nas-info"), "efficientformerv2_s0"], capture_output=True, text=True,
                           timeout=120).stdout
    stage_column = [line.split()[1] for line in table.splitlines() if "ef2." in line]
    assert stage_column == ["stem", "1", "1", "2", "2", "2"] + ["3"] * 7 + ["4"] * 5 + ["head"]


def test_positions_stay_out_of_identity_and_keys() -> None:
    a = BlockSpec("ef2.ffn", cin=8, cout=8, h=4, w=4, hidden=16, stage=1, slot=0)
    b = BlockSpec("ef2.ffn", cin=8, cout=8, h=4, w=4, hidden=16, stage=3, slot=5)
    assert a == b and hash(a) == hash(b) and a.key == b.key == "ef2.ffn|cin=8|cout=8|size=4|hidden=16"


def test_schema1_keys_parse_and_non_square_keys_round_trip() -> None:
    old = "ef2.attn_ffn|cin=96|cout=96|size=14|stride=2|hidden=384|heads=8|key_dim=32|value_dim=128"
    spec = BlockSpec.from_key(old)
    assert spec.stride == 1 and spec.attn_stride == 2 and spec.out_hw == (14, 14) and spec.attn_hw == (7, 7)
    assert BlockSpec.from_key(spec.key) == spec and "attn_stride=2" in spec.key
    wide = BlockSpec("ef2.down", cin=8, cout=16, h=14, w=28, stride=2)
    assert wide.key == "ef2.down|cin=8|cout=16|size=14x28|stride=2"
    assert BlockSpec.from_key(wide.key) == wide and wide.out_hw == (7, 14)
    assert wide.input_shape(2) == (2, 8, 14, 28)


def test_every_kind_has_one_entry_with_module_and_trace() -> None:
    from supernet.blocks import block_class

    kinds = list_kinds()
    assert len(kinds) == 18
    for name in kinds:
        kind = get_kind(name)
        assert callable(block_class(name)) and callable(kind.trace)
        for _, donor in kind.shares:
            assert donor in kinds


def test_a_block_at_a_position_the_supernet_lacks_raises() -> None:
    space = get_space("efficientformer_v2_demo")
    net = Supernet(space, num_classes=10, resolution=32, in_chans=1)
    arch = space.largest()
    deeper = arch.replace_stage(2, arch.stages[2].__class__(arch.stages[2].width,
                                                            (arch.stages[2].blocks[0],) * 3))
    with pytest.raises(SpaceError, match="position 's2b2'"):
        net.units_for(deeper)
    # the names follow the lowering's positions, in forward order
    names = Supernet.unit_names(arch)
    assert names[0] == "stem" and names[-1] == "head" and names[1:3] == ["s0b0", "down1"]
    assert len(names) == len(lower(arch, resolution=32, num_classes=10, in_chans=1))
    with pytest.raises(SpaceError, match="carries no position"):
        from supernet.elastic import unit_name

        unit_name(BlockSpec.from_key("ef2.ffn|cin=8|cout=8|size=4|hidden=16"))


def _torch_macs(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Conv and linear MACs from forward hooks (attention products are checked at square sizes in
    test_counting against the reference figures; here the shapes vary)."""
    macs = 0

    def conv_hook(m: torch.nn.Conv2d, _: object, out: torch.Tensor) -> None:
        nonlocal macs
        macs += int(out.numel() // out.shape[0] * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])

    def lin_hook(m: torch.nn.Linear, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal macs
        macs += int(out.numel() // out.shape[0] * m.in_features)

    # talking heads are 1x1 convs over the heads of the attention map: our convention counts them
    # with the attention products, so they are left out here like those
    hooks = [m.register_forward_hook(conv_hook) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d) and "talking_head" not in n]
    hooks += [m.register_forward_hook(lin_hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(shape))
    for h in hooks:
        h.remove()
    return macs


@pytest.mark.parametrize("space_name, hw", [("efficientformer_v2", (64, 96)), ("efficientformer", (96, 64)),
                                            ("efficientvit", (64, 160)), ("efficientformer_v2_demo", (32, 48))])
def test_non_square_counts_equal_torch(space_name: str, hw: tuple[int, int]) -> None:
    space = get_space(space_name)
    for seed in range(4):
        arch = space.sample(seed)
        setup = LoweringSetup(resolution=hw, num_classes=7, in_chans=3)
        specs = lower(arch, setup)
        model = build_model(arch, setup)
        assert count_params(specs) == sum(p.numel() for p in model.parameters())
        # conv + linear MACs from torch; attention products from the trace's attention class
        from search_spaces.kinds import trace

        attn = sum(trace(s).attn for s in specs)
        assert count_macs(specs) - attn == _torch_macs(model, (1, 3, *hw))
        out = model(torch.randn(1, 3, *hw))
        assert out.shape == (1, 7)


def test_nas_info_counts_non_square_exactly() -> None:
    r = subprocess.run([str(BIN / "nas-info"), "efficientformerv2_s0", "--resolution", "512x1024", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    model = build_model(get_preset("efficientformerv2_s0"), resolution=(512, 1024))
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["resolution"] == [512, 1024] and info["blocks"][0]["size"] == [512, 1024]


def test_bias_indices_follow_the_reference_formula() -> None:
    # square maps: the table index is |dy| * side + |dx| (timm and the original code agree)
    idx = relative_bias_index(3, 3)
    assert idx[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8] and idx[4].tolist() == [4, 3, 4, 1, 0, 1, 4, 3, 4]
    # non-square: |dy| * w + |dx| over the h x w grid
    h, w = 2, 3
    idx = relative_bias_index(h, w)
    pts = [(y, x) for y in range(h) for x in range(w)]
    assert idx.tolist() == [[abs(a[0] - b[0]) * w + abs(a[1] - b[1]) for b in pts] for a in pts]
    d = downsample_bias_index(4, 6)
    q = [(y, x) for y in range(0, 4, 2) for x in range(0, 6, 2)]
    k = [(y, x) for y in range(4) for x in range(6)]
    assert d.tolist() == [[abs(a[0] - b[0]) * 6 + abs(a[1] - b[1]) for b in k] for a in q]


def test_backbone_of_s0_at_512x1024() -> None:
    model = build_model(get_preset("efficientformerv2_s0"), features_only=True).eval()
    assert not model.has_head
    big = build_model(get_preset("efficientformerv2_s0"), resolution="512x1024", features_only=True).eval()
    feats = big(torch.randn(1, 3, 512, 1024))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 128, 256), (1, 48, 64, 128), (1, 96, 32, 64),
                                               (1, 176, 16, 32)]
    assert [(f["num_chs"], f["reduction"]) for f in big.feature_info] == [(32, 4), (48, 8), (96, 16), (176, 32)]
    assert sum(p.numel() for p in big.parameters()) == count_params(
        lower(get_preset("efficientformerv2_s0"), resolution=(512, 1024), task="backbone"))


def test_backbone_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    import onnxruntime as ort

    from latency.runtime import export_onnx

    model = build_model(get_preset("efficientformerv2_s0"), resolution="512x1024", features_only=True).eval()
    x = torch.randn(1, 3, 512, 1024, generator=torch.Generator().manual_seed(0))
    export_onnx(model, x.shape, tmp_path / "backbone.onnx")
    sess = ort.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert len(got) == 4
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape) and float(np.abs(g - w.numpy()).max()) <= 1e-4


@pytest.mark.parametrize("name", ["efficientformer_l1", "efficientvit_b0"])
def test_backbones_of_v1_and_efficientvit(name: str) -> None:
    model = build_model(get_preset(name), resolution="224x320", features_only=True, out_indices=(1, 3)).eval()
    feats = model(torch.randn(1, 3, 224, 320))
    assert [tuple(f.shape)[2:] for f in feats] == [(28, 40), (7, 10)]
    full = build_model(get_preset(name), resolution="224x320")
    full.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        again = full.eval().forward_features(torch.randn(1, 3, 224, 320), (3,))
    assert tuple(again[0].shape) == tuple(feats[1].shape)


def test_supernet_features_equal_the_extracted_subnet() -> None:
    net = Supernet(get_space("efficientformer_demo"), num_classes=10, resolution="32x64", in_chans=1).eval()
    for seed in range(3):
        arch = net.sample(seed)
        sub = net.get_active_subnet(arch).eval()
        x = torch.randn(2, 1, 32, 64)
        with torch.no_grad():
            a, b = net.forward_features(x, arch), sub.forward_features(x, (0, 1, 2, 3))
            assert len(a) == 4 and all(torch.equal(u, v) for u, v in zip(a, b))
            torch.testing.assert_close(net(x, arch), sub(x), rtol=0, atol=1e-6)


def test_enumeration_of_backbone_tables_has_no_head() -> None:
    space = get_space("efficientformer_v2_demo")
    full = enumerate_specs(space, resolution=32, num_classes=10, in_chans=1)
    backbone = enumerate_specs(space, resolution="32x64", num_classes=10, in_chans=1, task="backbone")
    assert any(get_kind(s.kind).is_head for s in full)
    assert not any(get_kind(s.kind).is_head for s in backbone)
    assert all(s.w == 2 * s.h for s in backbone)
