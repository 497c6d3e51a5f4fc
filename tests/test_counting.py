"""Exact parameter and MAC counting (``search_spaces.counting``) checked against torch.

The pure-Python counts must equal the published parameter counts of every preset
(../shared/DESIGN.md, section 3) and torch's own counts of the built models: ``sum(p.numel())`` for
parameters and ``FlopCounterMode`` for MACs (it counts conv, linear and matmul FLOPs as
2 x MACs, which is exactly our MAC convention). Models are built on the meta device, so
even EfficientFormer-L7 costs no memory and no arithmetic.

Random configs: 200 per registered space. A :class:`~supernet.StaticNet` is a plain
sequence of ``build_block(spec)`` modules, so its counts are the sums of its blocks'
counts. Each distinct block spec of the 200 configs is built and counted by torch once
(about 2,000 blocks in all); whole models are counted as well for a handful of configs
per space, which checks that sum. Counting all 1,000 whole models directly takes about
five minutes on two cores, because meta-device batch norm runs a Python decomposition.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from search_spaces import (
    ArchConfig, BlockSpec, block_macs, block_params, count_macs, count_params, get_preset, get_space,
    list_presets, list_spaces, lower,
)
from search_spaces.registry import PUBLISHED_PARAMS
from supernet import build_block, build_model


NUM_RANDOM = 200
#: Seeds whose whole model (not only its blocks) is also counted by torch.
WHOLE_MODEL_SEEDS = range(8)


def space_settings(space_name: str) -> dict[str, int]:
    """Lowering settings per space: the demo spaces are for 32x32 grey images with 10 classes."""
    if space_name.endswith("_demo"):
        return {"resolution": 32, "in_chans": 1, "num_classes": 10}
    return {"resolution": 224, "in_chans": 3, "num_classes": 1000}


def torch_counts(module: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(parameters, MACs)`` of a meta-device module as torch counts them (eval mode, one forward)."""
    params = sum(p.numel() for p in module.parameters())
    x = torch.zeros(input_shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module.eval()(x)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return params, flops // 2


def meta_model_counts(arch: ArchConfig, **settings: int) -> tuple[tuple[BlockSpec, ...], int, int]:
    with torch.device("meta"):
        model = build_model(arch, **settings)
    params, macs = torch_counts(model, (1, model.in_chans, model.resolution, model.resolution))
    return model.specs, params, macs


# ------------------------------------------------------------------------------------ presets
def test_published_table_covers_every_preset() -> None:
    assert sorted(PUBLISHED_PARAMS) == list_presets()


@pytest.mark.parametrize("name", list_presets())
def test_preset_params_equal_published_count(name: str) -> None:
    assert count_params(lower(get_preset(name))) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", list_presets())
def test_preset_counts_equal_torch(name: str) -> None:
    specs, params, macs = meta_model_counts(get_preset(name), resolution=224)
    assert specs == lower(get_preset(name), resolution=224)
    assert params == PUBLISHED_PARAMS[name]
    assert count_params(specs) == params
    assert count_macs(specs) == macs
    assert sum(block_params(s) for s in specs) == params
    assert sum(block_macs(s) for s in specs) == macs


# ------------------------------------------------------------------------------ random configs
@pytest.mark.parametrize("space_name", list_spaces())
def test_random_configs_count_like_torch(space_name: str) -> None:
    space = get_space(space_name)
    settings = space_settings(space_name)
    seen: dict[BlockSpec, tuple[int, int]] = {}
    mismatches = []
    for seed in range(NUM_RANDOM):
        arch = space.sample(seed)
        specs = lower(arch, **settings)
        for spec in specs:
            if spec in seen:
                continue
            with torch.device("meta"):
                block = build_block(spec)
            seen[spec] = torch_counts(block, spec.input_shape())
            ours = (block_params(spec), block_macs(spec))
            if ours != seen[spec]:
                mismatches.append(f"seed {seed} {spec.key}: ours (params, MACs) {ours}, torch {seen[spec]}")
        assert count_params(specs) == sum(seen[s][0] for s in specs)
        assert count_macs(specs) == sum(seen[s][1] for s in specs)
    assert not mismatches, "\n".join(mismatches[:20])
    assert len(seen) > 10  # the sample really varies


@pytest.mark.parametrize("space_name", list_spaces())
def test_whole_models_of_space_count_like_torch(space_name: str) -> None:
    space = get_space(space_name)
    settings = space_settings(space_name)
    archs = [space.smallest(), space.largest(), *(space.sample(seed) for seed in WHOLE_MODEL_SEEDS)]
    for arch in archs:
        specs, params, macs = meta_model_counts(arch, **settings)
        assert (count_params(specs), count_macs(specs)) == (params, macs), arch.to_string()


def test_counts_follow_resolution_classes_and_channels() -> None:
    """Attention-bias tables and MACs follow the resolution; head and stem follow classes and channels."""
    arch = get_preset("efficientformer_l1")
    at_224, at_448 = lower(arch, resolution=224), lower(arch, resolution=448)
    assert count_params(at_448) > count_params(at_224)  # 14x14 instead of 7x7 bias table
    assert count_macs(at_448) > 3 * count_macs(at_224)
    for kw in ({"resolution": 448}, {"num_classes": 10, "in_chans": 1}):
        specs, params, macs = meta_model_counts(arch, **kw)
        assert (count_params(specs), count_macs(specs)) == (params, macs)
    with_dist = count_params(lower(arch, distillation=True))
    without = count_params(lower(arch, distillation=False))
    assert with_dist - without == 448 * 1000 + 1000
