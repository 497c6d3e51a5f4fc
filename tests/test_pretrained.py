"""Published checkpoints into our presets (``supernet.pretrained``), with no download.

The state dicts are generated from key names and shapes written down here from the reference
module trees (timm's ``EfficientFormer``, ``EfficientFormerV2`` and ``EfficientVit``; the
snap-research and mit-han-lab originals), NOT from our own model: each generator walks the
reference model's construction and names every tensor in two layouts at once (timm's and the
original repo's), so that the same numbers can be loaded both ways. Index buffers are computed
the way each reference computes them (timm: ``|dy| * W + |dx|``; snap: offsets numbered in
order of first appearance).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from search_spaces import ArchConfig, BlockConfig, StageConfig, get_preset, get_space
from search_spaces.errors import FileFormatError
from supernet import Supernet, build_model
from supernet.pretrained import export_state_dict, init_supernet_from, load_pretrained, resize_bias_table

# ---------------------------------------------------------------- reference variant tables (timm / originals)
V1 = {  # widths, depths, num_vit
    "efficientformer_l1": ((48, 96, 224, 448), (3, 2, 6, 4), 1),
    "efficientformer_l3": ((64, 128, 320, 512), (4, 4, 12, 6), 4),
    "efficientformer_l7": ((96, 192, 384, 768), (6, 6, 18, 8), 8),
}
V2 = {  # widths, depths, expansion ratios of stages 3 and 4 (stages 1-2: 4), num_vit
    "efficientformerv2_s0": ((32, 48, 96, 176), (2, 2, 6, 4), ((4, 3, 3, 3, 4, 4), (4, 3, 3, 4)), 2),
    "efficientformerv2_s1": ((32, 48, 120, 224), (3, 3, 9, 6), ((4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)), 2),
    "efficientformerv2_s2": ((32, 64, 144, 288), (4, 4, 12, 8),
                             ((4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)), 4),
    "efficientformerv2_l": ((40, 80, 192, 384), (5, 5, 15, 10),
                            ((4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)), 6),
}
EVIT = {  # widths, depths, head dim, head widths
    "efficientvit_b0": ((8, 16, 32, 64, 128), (1, 2, 2, 2, 2), 16, (1024, 1280)),
    "efficientvit_b1": ((16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16, (1536, 1600)),
    "efficientvit_b2": ((24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32, (2304, 2560)),
    "efficientvit_b3": ((32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32, (2304, 2560)),
}
ORIGINAL = {**{n: "snap" for n in V1}, **{n: "snap" for n in V2}, **{n: "mit" for n in EVIT}}
SMALL = ("efficientformer_l1", "efficientformerv2_s0", "efficientvit_b0")  # presets run forward


@dataclass(frozen=True)
class Entry:
    """One tensor, named in timm's layout and the original's (None: that layout has no such tensor)."""

    timm: str | None
    orig: str | None
    shape: tuple[int, ...]
    fill: str = "w"  # w, one, var, count, ls, idx_rel:<side>, idx_down:<side>
    orig_shape: tuple[int, ...] | None = None


class Tree:
    """Collects entries while a generator walks a reference model's construction."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def conv(self, t: str, o: str, cout: int, cin_per_group: int, k: int, bias: bool = True) -> None:
        self.entries.append(Entry(f"{t}.weight", f"{o}.weight", (cout, cin_per_group, k, k)))
        if bias:
            self.entries.append(Entry(f"{t}.bias", f"{o}.bias", (cout,)))

    def linear(self, t: str, o: str, cout: int, cin: int, bias: bool = True) -> None:
        self.entries.append(Entry(f"{t}.weight", f"{o}.weight", (cout, cin)))
        if bias:
            self.entries.append(Entry(f"{t}.bias", f"{o}.bias", (cout,)))

    def bn(self, t: str, o: str, c: int) -> None:
        for leaf, fill in (("weight", "one"), ("bias", "w"), ("running_mean", "w"), ("running_var", "var")):
            self.entries.append(Entry(f"{t}.{leaf}", f"{o}.{leaf}", (c,), fill))
        self.entries.append(Entry(f"{t}.num_batches_tracked", f"{o}.num_batches_tracked", (), "count"))

    def ln(self, t: str, o: str, c: int) -> None:
        self.entries.append(Entry(f"{t}.weight", f"{o}.weight", (c,), "one"))
        self.entries.append(Entry(f"{t}.bias", f"{o}.bias", (c,)))

    def param(self, t: str | None, o: str | None, shape: tuple[int, ...], fill: str = "w",
              orig_shape: tuple[int, ...] | None = None) -> None:
        self.entries.append(Entry(t, o, shape, fill, orig_shape))


def v1_tree(name: str, classes: int = 1000) -> Tree:
    """timm ``EfficientFormer`` / snap ``EfficientFormer`` (Flat modules take a slot in stage 4)."""
    widths, depths, num_vit = V1[name]
    tr = Tree()
    w0 = widths[0]
    tr.conv("stem.conv1", "patch_embed.0", w0 // 2, 3, 3)
    tr.bn("stem.norm1", "patch_embed.1", w0 // 2)
    tr.conv("stem.conv2", "patch_embed.3", w0, w0 // 2, 3)
    tr.bn("stem.norm2", "patch_embed.4", w0)
    prev = w0
    for i, (w, d) in enumerate(zip(widths, depths)):
        if i > 0:
            tr.conv(f"stages.{i}.downsample.conv", f"network.{2 * i - 1}.proj", w, prev, 3)
            tr.bn(f"stages.{i}.downsample.norm", f"network.{2 * i - 1}.norm", w)
        nv = num_vit if i == 3 else 0
        slots = []  # (index in the stage's Sequential, is Meta3D)
        idx = 1 if nv and nv >= d else 0  # Flat first when every block is Meta3D
        for b in range(d):
            remain = d - b - 1
            meta3d = bool(nv) and nv > remain
            slots.append((idx, meta3d))
            idx += 1
            if not meta3d and nv and nv == remain:  # Flat right after the last Meta4D
                idx += 1
        for idx, meta3d in slots:
            t, o = f"stages.{i}.blocks.{idx}", f"network.{2 * i}.{idx}"
            if meta3d:
                tr.ln(f"{t}.norm1", f"{o}.norm1", w)
                tr.linear(f"{t}.token_mixer.qkv", f"{o}.token_mixer.qkv", 8 * (32 + 32 + 128), w)
                tr.linear(f"{t}.token_mixer.proj", f"{o}.token_mixer.proj", w, 8 * 128)
                tr.param(f"{t}.token_mixer.attention_biases", f"{o}.token_mixer.attention_biases", (8, 49))
                tr.param(f"{t}.token_mixer.attention_bias_idxs", f"{o}.token_mixer.attention_bias_idxs", (49, 49),
                         "idx_rel:7")
                tr.ln(f"{t}.norm2", f"{o}.norm2", w)
                tr.linear(f"{t}.mlp.fc1", f"{o}.mlp.fc1", 4 * w, w)
                tr.linear(f"{t}.mlp.fc2", f"{o}.mlp.fc2", w, 4 * w)
            else:
                tr.conv(f"{t}.mlp.fc1", f"{o}.mlp.fc1", 4 * w, w, 1)
                tr.bn(f"{t}.mlp.norm1", f"{o}.mlp.norm1", 4 * w)
                tr.conv(f"{t}.mlp.fc2", f"{o}.mlp.fc2", w, 4 * w, 1)
                tr.bn(f"{t}.mlp.norm2", f"{o}.mlp.norm2", w)
            tr.param(f"{t}.ls1.gamma", f"{o}.layer_scale_1", (w,), "ls")
            tr.param(f"{t}.ls2.gamma", f"{o}.layer_scale_2", (w,), "ls")
        prev = w
    tr.ln("norm", "norm", prev)
    tr.linear("head", "head", classes, prev)
    tr.linear("head_dist", "dist_head", classes, prev)
    return tr


def v2_tree(name: str, classes: int = 1000, res: int = 224) -> Tree:
    """timm ``EfficientFormerV2`` / snap ``EfficientFormerV2`` (snap: ``network``, nn.Sequential convs, (C,1,1) scales)."""
    widths, depths, (e3, e4), num_vit = V2[name]
    ratios = ((4,) * depths[0], (4,) * depths[1], e3, e4)
    tr = Tree()
    w0 = widths[0]
    tr.conv("stem.conv1.conv", "patch_embed.0", w0 // 2, 3, 3)
    tr.bn("stem.conv1.bn", "patch_embed.1", w0 // 2)
    tr.conv("stem.conv2.conv", "patch_embed.3", w0, w0 // 2, 3)
    tr.bn("stem.conv2.bn", "patch_embed.4", w0)
    prev, stride = w0, 4
    for i, (w, d) in enumerate(zip(widths, depths)):
        cur = math.ceil(res / stride)
        if i > 0:
            t, o = f"stages.{i}.downsample", f"network.{2 * i - 1}"
            tr.conv(f"{t}.conv.conv", f"{o}.proj" if i < 3 else f"{o}.conv", w, prev, 3)
            tr.bn(f"{t}.conv.bn", f"{o}.norm" if i < 3 else f"{o}.bn", w)
            if i == 3:
                a, oa = f"{t}.attn", f"{o}.attn"
                tr.conv(f"{a}.q.local", f"{oa}.q.local.0", prev, 1, 3)
                for m, oc, k, g in (("q.proj", 128, 1, prev), ("k", 128, 1, prev), ("v", 512, 1, prev),
                                    ("v_local", 512, 3, 1)):
                    tr.conv(f"{a}.{m}.conv", f"{oa}.{m}.0", oc, g, k)
                    tr.bn(f"{a}.{m}.bn", f"{oa}.{m}.1", oc)
                tr.conv(f"{a}.proj.conv", f"{oa}.proj.1", w, 512, 1)
                tr.bn(f"{a}.proj.bn", f"{oa}.proj.2", w)
                tr.param(f"{a}.attention_biases", f"{oa}.attention_biases", (8, cur * cur))
                tr.param(None, f"{oa}.attention_bias_idxs", (math.ceil(cur / 2) ** 2, cur * cur), f"idx_down:{cur}")
            stride *= 2
            cur = math.ceil(res / stride)
        for j in range(d):
            t, o = f"stages.{i}.blocks.{j}", f"network.{2 * i}.{j}"
            h = int(w * ratios[i][j])
            if i >= 2 and j > d - num_vit - 1:
                m, om = f"{t}.token_mixer", f"{o}.token_mixer"
                r = math.ceil(cur / 2) if i == 2 else cur
                if i == 2:
                    tr.conv(f"{m}.stride_conv.conv", f"{om}.stride_conv.0", w, 1, 3)
                    tr.bn(f"{m}.stride_conv.bn", f"{om}.stride_conv.1", w)
                for part, oc, k, g in (("q", 256, 1, w), ("k", 256, 1, w), ("v", 1024, 1, w), ("v_local", 1024, 3, 1)):
                    tr.conv(f"{m}.{part}.conv", f"{om}.{part}.0", oc, g, k)
                    tr.bn(f"{m}.{part}.bn", f"{om}.{part}.1", oc)
                tr.conv(f"{m}.talking_head1", f"{om}.talking_head1", 8, 8, 1)
                tr.conv(f"{m}.talking_head2", f"{om}.talking_head2", 8, 8, 1)
                tr.conv(f"{m}.proj.conv", f"{om}.proj.1", w, 1024, 1)
                tr.bn(f"{m}.proj.bn", f"{om}.proj.2", w)
                tr.param(f"{m}.attention_biases", f"{om}.attention_biases", (8, r * r))
                tr.param(None, f"{om}.attention_bias_idxs", (r * r, r * r), f"idx_rel:{r}")
                tr.param(f"{t}.ls1.gamma", f"{o}.layer_scale_1", (w,), "ls", orig_shape=(w, 1, 1))
            tr.conv(f"{t}.mlp.fc1.conv", f"{o}.mlp.fc1", h, w, 1)
            tr.bn(f"{t}.mlp.fc1.bn", f"{o}.mlp.norm1", h)
            tr.conv(f"{t}.mlp.mid.conv", f"{o}.mlp.mid", h, 1, 3)
            tr.bn(f"{t}.mlp.mid.bn", f"{o}.mlp.mid_norm", h)
            tr.conv(f"{t}.mlp.fc2.conv", f"{o}.mlp.fc2", w, h, 1)
            tr.bn(f"{t}.mlp.fc2.bn", f"{o}.mlp.norm2", w)
            tr.param(f"{t}.ls2.gamma", f"{o}.layer_scale_2", (w,), "ls", orig_shape=(w, 1, 1))
        prev = w
    tr.bn("norm", "norm", prev)
    tr.linear("head", "head", classes, prev)
    tr.linear("head_dist", "dist_head", classes, prev)
    return tr


def evit_tree(name: str, classes: int = 1000) -> Tree:
    """timm ``EfficientVit`` / mit ``EfficientViTCls`` (backbone + ClsHead, OpSequential ``op_list``)."""
    widths, depths, dim, (h0, h1) = EVIT[name]
    tr = Tree()
    w0 = widths[0]
    tr.conv("stem.in_conv.conv", "backbone.input_stem.op_list.0.conv", w0, 3, 3, bias=False)
    tr.bn("stem.in_conv.norm", "backbone.input_stem.op_list.0.norm", w0)
    for k in range(depths[0]):
        t, o = f"stem.res{k}.main", f"backbone.input_stem.op_list.{k + 1}.main"
        tr.conv(f"{t}.depth_conv.conv", f"{o}.depth_conv.conv", w0, 1, 3, bias=False)
        tr.bn(f"{t}.depth_conv.norm", f"{o}.depth_conv.norm", w0)
        tr.conv(f"{t}.point_conv.conv", f"{o}.point_conv.conv", w0, w0, 1, bias=False)
        tr.bn(f"{t}.point_conv.norm", f"{o}.point_conv.norm", w0)
    prev = w0
    for i, (w, d) in enumerate(zip(widths[1:], depths[1:])):
        tb, ob = f"stages.{i}.blocks", f"backbone.stages.{i}.op_list"
        for j in range(d if i < 2 else 1):
            cin = prev if j == 0 else w
            mid = round(cin * 4)
            t, o = f"{tb}.{j}.main", f"{ob}.{j}.main"
            full_norm = i < 2
            tr.conv(f"{t}.inverted_conv.conv", f"{o}.inverted_conv.conv", mid, cin, 1, bias=not full_norm)
            if full_norm:
                tr.bn(f"{t}.inverted_conv.norm", f"{o}.inverted_conv.norm", mid)
            tr.conv(f"{t}.depth_conv.conv", f"{o}.depth_conv.conv", mid, 1, 3, bias=not full_norm)
            if full_norm:
                tr.bn(f"{t}.depth_conv.norm", f"{o}.depth_conv.norm", mid)
            tr.conv(f"{t}.point_conv.conv", f"{o}.point_conv.conv", w, mid, 1, bias=False)
            tr.bn(f"{t}.point_conv.norm", f"{o}.point_conv.norm", w)
        if i >= 2:
            heads = w // dim
            td = heads * dim
            for j in range(d):
                t, o = f"{tb}.{j + 1}", f"{ob}.{j + 1}"
                c, oc = f"{t}.context_module.main", f"{o}.context_module.main"
                tr.conv(f"{c}.qkv.conv", f"{oc}.qkv.conv", 3 * td, w, 1, bias=False)
                tr.conv(f"{c}.aggreg.0.0", f"{oc}.aggreg.0.0", 3 * td, 1, 5, bias=False)
                tr.conv(f"{c}.aggreg.0.1", f"{oc}.aggreg.0.1", 3 * td, 3 * td // (3 * heads), 1, bias=False)
                tr.conv(f"{c}.proj.conv", f"{oc}.proj.conv", w, 2 * td, 1, bias=False)
                tr.bn(f"{c}.proj.norm", f"{oc}.proj.norm", w)
                lm, olm = f"{t}.local_module.main", f"{o}.local_module.main"
                tr.conv(f"{lm}.inverted_conv.conv", f"{olm}.inverted_conv.conv", 4 * w, w, 1)
                tr.conv(f"{lm}.depth_conv.conv", f"{olm}.depth_conv.conv", 4 * w, 1, 3)
                tr.conv(f"{lm}.point_conv.conv", f"{olm}.point_conv.conv", w, 4 * w, 1, bias=False)
                tr.bn(f"{lm}.point_conv.norm", f"{olm}.point_conv.norm", w)
        prev = w
    tr.conv("head.in_conv.conv", "head.op_list.0.conv", h0, prev, 1, bias=False)
    tr.bn("head.in_conv.norm", "head.op_list.0.norm", h0)
    tr.linear("head.classifier.0", "head.op_list.2.linear", h1, h0, bias=False)
    tr.ln("head.classifier.1", "head.op_list.2.norm", h1)
    tr.linear("head.classifier.4", "head.op_list.3.linear", classes, h1)
    return tr


def tree(name: str, **kw: int) -> Tree:
    return (v1_tree if name in V1 else v2_tree if name in V2 else evit_tree)(name, **kw)


# ---------------------------------------------------------------- index buffers, as each reference builds them
def timm_rel_idx(side: int) -> torch.Tensor:
    pts = list(itertools.product(range(side), range(side)))
    return torch.tensor([[abs(a[0] - b[0]) * side + abs(a[1] - b[1]) for b in pts] for a in pts])


def snap_rel_idx(side: int) -> torch.Tensor:
    """snap: offsets numbered in order of first appearance while walking query x key points."""
    pts = list(itertools.product(range(side), range(side)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in pts for b in pts]
    return torch.tensor(idxs).view(len(pts), len(pts))


def snap_down_idx(side: int) -> torch.Tensor:
    """snap ``Attention4DDownsample``: stride-2 query points against the full key grid."""
    side2 = math.ceil(side / 2)
    step = math.ceil(side / side2)
    pts, q_pts = list(itertools.product(range(side), range(side))), list(itertools.product(range(side2), range(side2)))
    offsets: dict[tuple[float, float], int] = {}
    idxs = [offsets.setdefault((abs(a[0] * step - b[0]), abs(a[1] * step - b[1])), len(offsets))
            for a in q_pts for b in pts]
    return torch.tensor(idxs).view(len(q_pts), len(pts))


def state_dicts(name: str, seed: int = 0, **kw: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(timm_sd, original_sd)`` of the same seeded numbers."""
    g = torch.Generator().manual_seed(seed)
    timm_sd, orig_sd = {}, {}
    for e in tree(name, **kw).entries:
        if e.fill.startswith("idx"):
            kind, side = e.fill.split(":")
            if e.timm:
                timm_sd[e.timm] = timm_rel_idx(int(side))
            if e.orig:
                orig_sd[e.orig] = snap_rel_idx(int(side)) if kind == "idx_rel" else snap_down_idx(int(side))
            continue
        if e.fill == "count":
            value = torch.randint(0, 10_000, (), generator=g)
        elif e.fill == "var":
            value = torch.rand(e.shape, generator=g) + 0.5
        elif e.fill == "ls":  # negative layer scales: told apart from every other vector by sign and size
            value = -0.1 - 0.1 * torch.rand(e.shape, generator=g)
        elif e.fill == "one":
            value = 1.0 + 0.05 * torch.randn(e.shape, generator=g)
        else:
            fan_in = math.prod(e.shape[1:]) if len(e.shape) > 1 else 100
            value = torch.randn(e.shape, generator=g) / math.sqrt(fan_in)
        if e.timm:
            timm_sd[e.timm] = value
        if e.orig:
            orig_sd[e.orig] = value.reshape(e.orig_shape or e.shape)
    return timm_sd, orig_sd


def assert_roles(model: torch.nn.Module) -> None:
    """Every tensor holds numbers of its role (norm weights near 1, variances in [0.5, 1.5], layer scales
    in [-0.2, -0.1]): catches a mapping that swaps, say, running_mean and running_var in every layout at once."""
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            assert m.weight.min() > 0.7 and m.bias.abs().max() < 0.7, name
        if isinstance(m, torch.nn.BatchNorm2d):
            assert 0.5 <= m.running_var.min() and m.running_var.max() <= 1.5 and m.running_mean.abs().max() < 0.7, name
    for name, p in model.named_parameters():
        is_ls = name.endswith((".ls1", ".ls2"))
        assert is_ls == bool(p.ndim == 1 and p.max() <= -0.1 and p.min() >= -0.2), name


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


# ---------------------------------------------------------------- tests
def test_snap_offset_order_is_timms_for_the_published_grids() -> None:
    for side in (7, 14):
        assert torch.equal(snap_rel_idx(side), timm_rel_idx(side))
    # attention downsampling: stride-2 queries against the 14x14 keys, |dy| * 14 + |dx| by timm's formula
    q = list(itertools.product(range(0, 14, 2), range(0, 14, 2)))
    k = list(itertools.product(range(14), range(14)))
    timm_down = torch.tensor([[abs(a[0] - b[0]) * 14 + abs(a[1] - b[1]) for b in k] for a in q])
    assert torch.equal(snap_down_idx(14), timm_down)


@pytest.mark.parametrize("name", list(V1) + list(V2) + list(EVIT))
def test_every_preset_loads_both_layouts_and_round_trips(name: str) -> None:
    timm_sd, orig_sd = state_dicts(name)
    model = build_model(get_preset(name)).eval()
    outputs = []
    for layout, sd in (("timm", timm_sd), (ORIGINAL[name], orig_sd)):
        report = load_pretrained(model, sd)
        assert report.layout == layout
        assert report.loaded == report.total == len(model.state_dict())
        assert not report.resized and not report.reinitialised and not report.kept
        assert report.head_dist_in_checkpoint == (name not in EVIT)
        assert_roles(model)
        assert_same_state(export_state_dict(model, layout), sd)
        if name in SMALL:  # the second load overwrites every tensor of the first (loaded == total)
            x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                outputs.append(model(x))
    if name in SMALL:
        assert torch.isfinite(outputs[0]).all()
        assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name", ["efficientformerv2_s0", "efficientvit_b0"])
def test_native_state_dict_is_a_third_way(name: str) -> None:
    timm_sd, _ = state_dicts(name, seed=3)
    a = build_model(get_preset(name), pretrained=timm_sd).eval()
    native = export_state_dict(a, "native")
    assert_same_state(native, a.state_dict())
    b = build_model(get_preset(name), pretrained=native).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_pth_read_weights_only_with_wrappers(tmp_path: Path) -> None:
    _, snap_sd = state_dicts("efficientformerv2_s0")
    torch.save({"model": snap_sd}, tmp_path / "eformer_s0_450.pth")
    report = load_pretrained(build_model(get_preset("efficientformerv2_s0")), tmp_path / "eformer_s0_450.pth")
    assert (report.layout, report.loaded) == ("snap", report.total)
    _, mit_sd = state_dicts("efficientvit_b0")
    torch.save({"state_dict": {f"module.{k}": v for k, v in mit_sd.items()}}, tmp_path / "b0-r224.pt")
    report = load_pretrained(build_model(get_preset("efficientvit_b0")), tmp_path / "b0-r224.pt")
    assert (report.layout, report.loaded) == ("mit", report.total)


class _Payload:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_pickle_with_objects_is_refused(tmp_path: Path) -> None:
    timm_sd, _ = state_dicts("efficientvit_b0")
    marker = tmp_path / "unpickled"
    torch.save({"model": timm_sd, "args": _Payload(marker)}, tmp_path / "bad.pth")
    with pytest.raises(FileFormatError, match="weights-only") as info:
        build_model(get_preset("efficientvit_b0"), pretrained=tmp_path / "bad.pth")
    msg = str(info.value)
    assert "bad.pth" in msg and "Unsupported global" in msg and "\n" not in msg
    assert "weights_only=False" not in msg  # torch's advice to load unsafely is not passed on
    assert not marker.exists()


def test_bad_files(tmp_path: Path) -> None:
    model = build_model(get_preset("efficientvit_b0"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "w.npz").write_bytes(b"")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    for name, match in (("junk.safetensors", "not a readable safetensors"), ("w.npz", "unknown file type"),
                        ("missing.pth", "does not exist"), ("empty.pth", "holds no state dict")):
        with pytest.raises(FileFormatError, match=match):
            load_pretrained(model, tmp_path / name)


def test_wrong_preset_names_first_key_shapes_and_guess(tmp_path: Path) -> None:
    timm_sd, _ = state_dicts("efficientformerv2_s0")
    save_file(timm_sd, tmp_path / "s0.safetensors")
    with pytest.raises(FileFormatError) as info:
        build_model(get_preset("efficientformerv2_s1"), pretrained=tmp_path / "s0.safetensors")
    msg = str(info.value)
    assert "'stages.2.downsample.conv.conv.weight' has shape (96, 48, 3, 3)" in msg
    assert "expects (120, 48, 3, 3) at 'blocks.8.conv.conv.weight'" in msg
    assert msg.endswith("is this efficientformerv2_s0 rather than efficientformerv2_s1?")
    with pytest.raises(FileFormatError, match="is a timm efficientformer_v2 checkpoint, but the model is efficientformer_l1"):
        build_model(get_preset("efficientformer_l1"), pretrained=timm_sd)


def test_leftover_and_missing_keys_are_named() -> None:
    timm_sd, _ = state_dicts("efficientvit_b0")
    model = build_model(get_preset("efficientvit_b0"))
    with pytest.raises(FileFormatError, match=r"'stages.9.blocks.0.main.extra' has no place in the efficientvit_b0"):
        load_pretrained(model, {**timm_sd, "stages.9.blocks.0.main.extra": torch.zeros(3)})
    del timm_sd["stages.3.blocks.2.context_module.main.proj.norm.running_var"]
    with pytest.raises(FileFormatError, match=r"no 'stages.3.blocks.2.context_module.main.proj.norm.running_var' "
                                              r"for the model's 'blocks.\d+.context.proj.bn.running_var'"):
        load_pretrained(model, timm_sd)


def test_bias_tables_in_another_order_are_converted() -> None:
    _, snap_sd = state_dicts("efficientformer_l1", seed=5)
    key = "network.6.4.token_mixer.attention_biases"
    perm = torch.randperm(49, generator=torch.Generator().manual_seed(0))
    shuffled = dict(snap_sd)
    shuffled[key] = snap_sd[key][:, perm]  # entry p of the new table is old entry perm[p]
    shuffled[key.replace("biases", "bias_idxs")] = torch.argsort(perm)[snap_sd[key.replace("biases", "bias_idxs")]]
    a = build_model(get_preset("efficientformer_l1"), pretrained=snap_sd)
    b = build_model(get_preset("efficientformer_l1"), pretrained=shuffled)
    ours = next(k for k in a.state_dict() if k.endswith("attention_biases"))
    assert not torch.equal(shuffled[key], snap_sd[key])
    assert torch.equal(a.state_dict()[ours], snap_sd[key]) and torch.equal(b.state_dict()[ours], snap_sd[key])
    shuffled[key.replace("biases", "bias_idxs")] = torch.zeros(49, 49, dtype=torch.long)
    with pytest.raises(FileFormatError, match="does not order the table by relative offset"):
        load_pretrained(b, shuffled)


def test_other_resolution_interpolates_bias_tables() -> None:
    timm_sd, _ = state_dicts("efficientformerv2_s0")
    for key in [k for k in timm_sd if k.endswith("attention_biases")]:
        timm_sd[key] = torch.full_like(timm_sd[key], 0.25)
    model = build_model(get_preset("efficientformerv2_s0"), resolution=256, pretrained=timm_sd).eval()
    report = load_pretrained(model, timm_sd)
    grids = sorted(r.split(": ")[1] for r in report.resized)
    assert grids == ["14x14 -> 16x16"] + ["7x7 -> 8x8"] * 4  # down_attn, 2 stride-2 + 2 stage-4 attentions
    tables = {k: v for k, v in model.state_dict().items() if k.endswith("attention_biases")}
    assert sorted(tuple(t.shape) for t in tables.values()) == [(8, 64)] * 4 + [(8, 256)]
    assert all(torch.allclose(t, torch.full_like(t, 0.25)) for t in tables.values())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)
    v1 = build_model(get_preset("efficientformer_l1"), resolution=288, pretrained=state_dicts("efficientformer_l1")[0])
    assert [tuple(v.shape) for k, v in v1.state_dict().items() if k.endswith("attention_biases")] == [(8, 81)]
    # a ramp in |dx| stays a ramp in |dx|: the same in every row, increasing, centre and ends kept
    ramp = torch.arange(7.0).repeat(7).reshape(1, 49)
    out = resize_bias_table(ramp, (7, 7), (9, 9)).reshape(9, 9)
    assert torch.allclose(out, out[:1].expand(9, 9), atol=1e-5) and torch.all(out[0, 1:] > out[0, :-1])
    assert abs(out[0, 4].item() - 3.0) < 1e-5 and abs(out[0, 0].item()) < 0.1 and abs(out[0, 8].item() - 6.0) < 0.1


def test_other_num_classes_reinitialises_the_heads(caplog: pytest.LogCaptureFixture) -> None:
    timm_sd, _ = state_dicts("efficientformer_l1")
    with caplog.at_level(logging.WARNING, logger="supernet.pretrained"):
        model = build_model(get_preset("efficientformer_l1"), num_classes=10, pretrained=timm_sd)
    report = load_pretrained(model, timm_sd)
    head = f"blocks.{len(model.specs) - 1}"
    assert report.reinitialised == (f"{head}.head.weight", f"{head}.head.bias", f"{head}.head_dist.weight",
                                    f"{head}.head_dist.bias")
    assert report.loaded == report.total - 4
    assert "has 1000 classes and the model's 10: re-initialised" in caplog.text
    assert report.checkpoint_classes == 1000
    assert torch.equal(model.state_dict()[f"{head}.norm.weight"], timm_sd["norm.weight"])
    assert torch.count_nonzero(model.state_dict()[f"{head}.head.bias"]) == 0
    evit_sd, _ = state_dicts("efficientvit_b0")
    report = load_pretrained(build_model(get_preset("efficientvit_b0"), num_classes=10), evit_sd)
    assert [k.split(".", 2)[2] for k in report.reinitialised] == ["head.weight", "head.bias"]
    bad = dict(evit_sd, **{"head.classifier.0.weight": torch.zeros(1280, 1000)})
    with pytest.raises(FileFormatError, match="'head.classifier.0.weight' has shape"):
        load_pretrained(build_model(get_preset("efficientvit_b0"), num_classes=10), bad)


def test_missing_head_dist_is_accepted_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    timm_sd, _ = state_dicts("efficientformerv2_s0")
    with_dist = dict(timm_sd)
    del timm_sd["head_dist.weight"], timm_sd["head_dist.bias"]
    with caplog.at_level(logging.WARNING, logger="supernet.pretrained"):
        report = load_pretrained(build_model(get_preset("efficientformerv2_s0")), timm_sd)
    assert not report.head_dist_in_checkpoint
    assert [k.split(".", 2)[2] for k in report.kept] == ["head_dist.weight", "head_dist.bias"]
    assert "distillation=False" in caplog.text
    plain = build_model(get_preset("efficientformerv2_s0"), distillation=False, pretrained=timm_sd).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = plain.forward_features(x)
        expected = plain.blocks[-1].head(plain.blocks[-1].norm(feats).mean(dim=(2, 3)))
        assert torch.equal(plain(x), expected)
    with pytest.raises(FileFormatError, match="'head_dist.weight' is a distillation head, but the model was built "
                                              "without one"):
        build_model(get_preset("efficientformerv2_s0"), distillation=False, pretrained=with_dist)


def _nas_info(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("nas-info")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "nas.cli_info"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_pretrained(tmp_path: Path) -> None:
    timm_sd, _ = state_dicts("efficientformerv2_s0")
    save_file(timm_sd, tmp_path / "s0.safetensors")
    proc = _nas_info("efficientformerv2_s0", "--pretrained", "s0.safetensors", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "s0.safetensors: timm layout, loaded 568 of 568 tensors" in proc.stdout
    proc = _nas_info("efficientformerv2_s0", "--pretrained", "s0.safetensors", "--json", "--resolution", "256",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)["pretrained"]
    assert (info["layout"], info["loaded"], len(info["resized"])) == ("timm", 568, 5)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    for args in (("efficientformerv2_s0", "--pretrained", "bad.safetensors"),
                 ("efficientformerv2_s1", "--pretrained", "s0.safetensors")):
        proc = _nas_info(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("nas-info: error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("space, name", [("efficientformer_v2", "efficientformerv2_s0"),
                                         ("efficientformer", "efficientformer_l1")])
def test_supernet_warm_start_reproduces_the_checkpoint(space: str, name: str) -> None:
    arch = get_preset(name)
    model = build_model(arch, pretrained=state_dicts(name, seed=7)[0]).eval()
    net = Supernet(get_space(space), num_classes=1000, resolution=224)
    written = init_supernet_from(net, arch, model)
    assert written == len(model.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(net.get_active_subnet(arch).eval()(x), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(net.eval()(x, arch), want, atol=1e-5, rtol=0)


def test_supernet_warm_start_lite_mixer_narrower_than_the_slot() -> None:
    space = get_space("efficientformer_v2_demo")
    stages = (StageConfig(16, (BlockConfig("ffn", 4),)), StageConfig(24, (BlockConfig("ffn", 2),) * 2),
              StageConfig(40, (BlockConfig("ffn", 3), BlockConfig("lite", 4))),
              StageConfig(48, (BlockConfig("ffn", 2), BlockConfig("lite", 3))))
    arch = ArchConfig("efficientformer_v2", stages, stem_stride=2)
    net = Supernet(space, num_classes=10, resolution=32, in_chans=1)
    model = build_model(arch, num_classes=10, resolution=32, in_chans=1).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if key.endswith("running_var") else
                        torch.randn(t.shape, generator=g) * 0.3)
    init_supernet_from(net, arch, model)
    x = torch.randn(3, 1, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(net.get_active_subnet(arch).eval()(x), model(x), atol=1e-5, rtol=0)
