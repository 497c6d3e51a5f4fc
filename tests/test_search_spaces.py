"""Tests of ``search_spaces``: configs and their codec, spaces, presets, units and ``subnet.json``.

Everything here is pure Python; the package must import without torch.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from search_spaces import (
    ArchConfig, BlockConfig, NasUserError, SearchSpace, SpaceError, StageConfig, count_params, get_preset,
    get_space, list_presets, list_spaces, lower,
)
from search_spaces.errors import FileFormatError
from search_spaces.subnet_file import SubnetFile
from search_spaces.units import parse_count, parse_latency_ms

REPO = Path(__file__).resolve().parents[1]

#: Presets each default space must contain.
SPACE_PRESETS = {
    "efficientformer": ["efficientformer_l1", "efficientformer_l3", "efficientformer_l7"],
    "efficientformer_v2": ["efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2",
                           "efficientformerv2_l"],
    "efficientvit": ["efficientvit_b1"],
}


def lower_settings(space_name: str) -> dict[str, int]:
    """Settings at which every config of the space lowers and counting is cheap.

    64 px with stem stride 4 gives a 4x4 map in stage 3 (the V2 stride-2 attention needs an
    even one); the demo spaces (stem stride 2) are for 32x32 grey images with 10 classes.
    """
    if space_name.endswith("_demo"):
        return {"resolution": 32, "in_chans": 1, "num_classes": 10}
    return {"resolution": 64}


def with_stage(arch: ArchConfig, index: int, width: int | None = None,
               blocks: list[BlockConfig] | None = None) -> ArchConfig:
    st = arch.stages[index]
    return arch.replace_stage(index, StageConfig(st.width if width is None else width,
                                                 tuple(st.blocks if blocks is None else blocks)))


def attention_stages(space: SearchSpace) -> list[int]:
    return [i for i, ch in enumerate(space.stages) if ch.max_attn > 0]


# ------------------------------------------------------------------------------ import hygiene
def test_import_does_not_load_torch() -> None:
    code = "import search_spaces, sys; assert 'torch' not in sys.modules, 'search_spaces imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------- ArchConfig
def some_configs() -> list[ArchConfig]:
    archs = [get_preset(n) for n in list_presets()]
    for name in list_spaces():
        space = get_space(name)
        archs += [space.smallest(), space.largest(), *(space.sample(seed) for seed in range(5))]
    return archs


def test_dict_json_and_string_round_trip() -> None:
    for arch in some_configs():
        assert ArchConfig.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
        assert ArchConfig.from_string(arch.to_string()) == arch
        assert ArchConfig.from_string(arch.to_string()).hash == arch.hash


def test_hash_is_content_based() -> None:
    s0 = get_preset("efficientformerv2_s0")
    assert re.fullmatch(r"[0-9a-f]{12}", s0.hash)
    assert s0.hash == get_preset("efficientformerv2_s0").hash
    # 4 and 4.0 are the same expansion, and hash alike
    d = s0.to_dict()
    d["stages"][0]["blocks"][0]["expansion"] = 4.0
    assert ArchConfig.from_dict(d).hash == s0.hash
    # one expansion changed: another config, another hash
    d["stages"][3]["blocks"][0]["expansion"] = 3
    assert ArchConfig.from_dict(d) != s0
    assert ArchConfig.from_dict(d).hash != s0.hash
    archs = set(some_configs())
    assert len({a.hash for a in archs}) == len(archs)
    # a golden value: the codec that names caches, LUT provenance and files must not drift
    assert s0.hash == "ac55f5b36f34"


def test_hash_is_stable_across_processes() -> None:
    code = (
        "import json, search_spaces as S\n"
        "out = {n: S.get_preset(n).hash for n in S.list_presets()}\n"
        "out.update({f'{n}/{k}': S.get_space(n).sample(k).hash for n in S.list_spaces() for k in range(3)})\n"
        "print(json.dumps(out))\n"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)})
            for seed in (1, 2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    theirs = [json.loads(proc.stdout) for proc in runs]
    ours = {n: get_preset(n).hash for n in list_presets()}
    ours.update({f"{n}/{k}": get_space(n).sample(k).hash for n in list_spaces() for k in range(3)})
    assert theirs[0] == theirs[1] == ours


def valid_dict() -> dict:
    return copy.deepcopy(get_preset("efficientformerv2_s0").to_dict())


def _del_mixer(d: dict) -> None:
    del d["stages"][1]["blocks"][0]["mixer"]


def _set(path: tuple, value: object):
    def edit(d: dict) -> None:
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


FROM_DICT_ERRORS = [
    pytest.param(_del_mixer, ["stages[1].blocks[0]", "mixer"], id="missing-mixer"),
    pytest.param(_set(("stages", 0, "width"), -3), ["stages[0]", "width", "-3"], id="width-negative"),
    pytest.param(_set(("stages", 0, "width"), 0), ["stages[0]", "width", "0"], id="width-zero"),
    pytest.param(_set(("stages", 0, "width"), 32.5), ["stages[0]", "width", "32.5"], id="width-float"),
    pytest.param(_set(("stages", 0, "width"), True), ["stages[0]", "width", "True"], id="width-bool"),
    pytest.param(_set(("stages", 2, "blocks", 1, "mixer"), "foo"), ["stages[2].blocks[1]", "mixer", "'foo'"],
                 id="mixer-unknown"),
    pytest.param(_set(("stages", 2, "blocks", 1, "expansion"), float("nan")),
                 ["stages[2].blocks[1]", "expansion", "nan"], id="expansion-nan"),
    pytest.param(_set(("stages", 2, "blocks", 1, "expansion"), float("inf")),
                 ["stages[2].blocks[1]", "expansion", "inf"], id="expansion-inf"),
    pytest.param(_set(("stages", 2, "blocks", 1, "expansion"), 0), ["stages[2].blocks[1]", "expansion", "0"],
                 id="expansion-zero"),
    pytest.param(_set(("stages", 2, "blocks", 1, "expansion"), -1), ["stages[2].blocks[1]", "expansion", "-1"],
                 id="expansion-negative"),
    pytest.param(_set(("stages", 2, "blocks", 1, "expansion"), "4"), ["stages[2].blocks[1]", "expansion"],
                 id="expansion-string"),
    pytest.param(_set(("stages", 2, "blocks", 1, "colour"), "red"), ["stages[2].blocks[1]", "colour"],
                 id="block-unknown-field"),
    pytest.param(_set(("stages", 2, "blocks"), {"mixer": "ffn"}), ["stages[2].blocks", "list"],
                 id="blocks-not-list"),
    pytest.param(_set(("stages",), {"0": 1}), ["stages", "list"], id="stages-not-list"),
    pytest.param(_set(("stem_stride",), 3), ["stem_stride", "3"], id="stem-stride"),
    pytest.param(_set(("head_widths",), [-1]), ["head_widths"], id="head-widths"),
]


@pytest.mark.parametrize("edit, expected", FROM_DICT_ERRORS)
def test_from_dict_errors_name_the_field(edit, expected: list[str]) -> None:
    d = valid_dict()
    edit(d)
    with pytest.raises(SpaceError) as info:
        ArchConfig.from_dict(d)
    for fragment in expected:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_from_dict_refuses_non_objects_and_missing_family() -> None:
    with pytest.raises(SpaceError, match="JSON object"):
        ArchConfig.from_dict([1, 2])  # type: ignore[arg-type]
    d = valid_dict()
    del d["family"]
    with pytest.raises(SpaceError, match="family"):
        ArchConfig.from_dict(d)


@pytest.mark.parametrize("text", ["", "efficientformer_v2", "efficientformer_v2/x4/32:ffn4",
                                  "efficientformer_v2/s4/abc:ffn4", "efficientformer_v2/s4/32:ffnX"])
def test_from_string_errors(text: str) -> None:
    with pytest.raises(SpaceError):
        ArchConfig.from_string(text)


# --------------------------------------------------------------------------------- the spaces
@pytest.mark.parametrize("name", list_spaces())
def test_sample_is_deterministic_per_seed_and_contained(name: str) -> None:
    space = get_space(name)
    samples = [space.sample(seed) for seed in range(50)]
    assert samples == [space.sample(seed) for seed in range(50)]
    assert samples == [get_space(name).sample(random.Random(seed)) for seed in range(50)]
    assert len(set(samples)) > 40
    for arch in samples:
        assert space.why_not(arch) is None, arch.to_string()
        assert arch.family == space.family
    with pytest.raises(TypeError):
        space.sample(True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        space.sample(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list_spaces())
def test_largest_smallest_and_uniform(name: str) -> None:
    space = get_space(name)
    big, small = space.largest(), space.smallest()
    assert space.contains(big) and space.contains(small)
    assert big.widths == tuple(ch.widths[-1] for ch in space.stages)
    assert big.depths == tuple(ch.depths[-1] for ch in space.stages)
    assert small.widths == tuple(ch.widths[0] for ch in space.stages)
    assert small.depths == tuple(ch.depths[0] for ch in space.stages)
    for end, ref in ((0.0, small), (1.0, big)):
        u = space.uniform(end)
        assert (u.widths, u.depths) == (ref.widths, ref.depths)
        assert u == ref
    middle = space.uniform(0.5)
    assert space.contains(middle)
    assert all(s <= m <= b for s, m, b in zip(small.widths, middle.widths, big.widths))
    for bad in (-0.1, 1.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            space.uniform(bad)
    settings = lower_settings(name)
    assert count_params(lower(small, **settings)) < count_params(lower(middle, **settings)) \
        < count_params(lower(big, **settings))


@pytest.mark.parametrize("name", list_spaces())
def test_mutate_stays_in_space(name: str) -> None:
    space = get_space(name)
    changed = 0
    for seed in range(200):
        arch = space.sample(seed)
        child = space.mutate(arch, seed + 10_000, prob=0.3)
        assert space.why_not(child) is None, child.to_string()
        assert child == space.mutate(arch, seed + 10_000, prob=0.3)
        changed += child != arch
    assert changed > 150
    for arch in (space.largest(), space.smallest()):
        assert space.mutate(arch, 1, prob=0.0) == arch
        assert space.contains(space.mutate(arch, 1, prob=1.0))
    for bad in (-0.5, 1.1, float("nan")):
        with pytest.raises(ValueError):
            space.mutate(space.largest(), 0, prob=bad)
    outside = with_stage(space.largest(), 0, width=space.stages[0].widths[-1] + 1)
    with pytest.raises(SpaceError):
        space.mutate(outside, 0)


@pytest.mark.parametrize("name", list_spaces())
def test_slimming_actions_stay_in_space_and_never_add_parameters(name: str) -> None:
    space = get_space(name)
    settings = lower_settings(name)
    archs = [space.largest(), *(space.sample(seed) for seed in range(20))]
    assert space.slimming_actions(space.smallest()) == []
    for arch in archs:
        params = count_params(lower(arch, **settings))
        actions = space.slimming_actions(arch)
        assert actions, arch.to_string()
        assert len({a.name for a in actions}) == len(actions)
        for action in actions:
            assert space.why_not(action.arch) is None, action.name
            assert action.arch != arch, action.name
            assert count_params(lower(action.arch, **settings)) <= params, f"{arch.to_string()}: {action.name}"


@pytest.mark.parametrize("name", list_spaces())
def test_slimming_actions_name_their_move_and_the_move_repeats(name: str) -> None:
    """``move`` is one key per kind of step and place: distinct within a config, and the same move
    made again from the config an action leads to (when there is one) changes the same stage again."""
    space = get_space(name)
    repeated = 0
    for arch in [space.largest(), *(space.sample(seed) for seed in range(10))]:
        actions = space.slimming_actions(arch)
        assert len({a.move for a in actions}) == len(actions), [a.move for a in actions]
        for action in actions:
            assert action.move.startswith(f"s{action.stage + 1}."), (action.move, action.name)
            again = [a for a in space.slimming_actions(action.arch) if a.move == action.move]
            assert len(again) <= 1
            if again:
                repeated += 1
                assert again[0].stage == action.stage and again[0].block == action.block or \
                    action.move.endswith("first attention block to plain"), (action.name, again[0].name)
                assert again[0].arch != action.arch
    assert repeated


@pytest.mark.parametrize("name", list_spaces())
def test_every_sample_lowers_at_the_test_resolution(name: str) -> None:
    space = get_space(name)
    for seed in range(100):
        specs = lower(space.sample(seed), **lower_settings(name))
        assert specs[0].kind.endswith(".stem") and specs[-1].kind.endswith(".head")


# ----------------------------------------------------------------------- membership and reasons
@pytest.mark.parametrize("name", list_spaces())
def test_contains_names_the_width_depth_and_expansion(name: str) -> None:
    space = get_space(name)
    arch = space.largest()
    ch = space.stages[0]
    bad_width = with_stage(arch, 0, width=ch.widths[-1] + 1)
    assert not space.contains(bad_width)
    assert f"stage 1 width {ch.widths[-1] + 1}" in space.why_not(bad_width)
    st = arch.stages[0]
    too_deep = with_stage(arch, 0, blocks=[*st.blocks, st.blocks[0]])
    assert not space.contains(too_deep)
    assert f"stage 1 depth {ch.depths[-1] + 1}" in space.why_not(too_deep)
    bad_exp = with_stage(arch, 0, blocks=[BlockConfig(st.blocks[0].mixer, ch.expansions[-1] + 1), *st.blocks[1:]])
    assert not space.contains(bad_exp)
    assert "stage 1 block 1 expansion" in space.why_not(bad_exp)
    with pytest.raises(SpaceError, match=f"outside space '{name}'.*stage 1 width"):
        space.check(bad_width)


@pytest.mark.parametrize("name", list_spaces())
def test_contains_refuses_another_family(name: str) -> None:
    space = get_space(name)
    other = next(get_preset(p) for p in list_presets() if get_preset(p).family != space.family)
    assert not space.contains(other)
    assert "family" in space.why_not(other)


ATTN_CASES = [(n, si) for n in list_spaces() for si in attention_stages(get_space(n))]


@pytest.mark.parametrize("name, si", ATTN_CASES)
def test_contains_refuses_attention_before_a_plain_block(name: str, si: int) -> None:
    space = get_space(name)
    ch = space.stages[si]
    depth = ch.depths[-1]
    attn, plain = BlockConfig(ch.attn_mixers[-1], ch.expansions[0]), BlockConfig(ch.plain_mixer, ch.expansions[0])
    blocks = [attn] + [plain] * (depth - 1)
    arch = with_stage(space.largest(), si, blocks=blocks)
    reason = space.why_not(arch)
    assert reason is not None and f"stage {si + 1} block 2" in reason and "attention blocks must be last" in reason


@pytest.mark.parametrize("name, si", [(n, si) for n, si in ATTN_CASES
                                      if get_space(n).stages[si].max_attn < get_space(n).stages[si].depths[-1]])
def test_contains_refuses_too_many_attention_blocks(name: str, si: int) -> None:
    space = get_space(name)
    ch = space.stages[si]
    n = ch.max_attn + 1
    attn, plain = BlockConfig(ch.attn_mixers[0], ch.expansions[0]), BlockConfig(ch.plain_mixer, ch.expansions[0])
    blocks = [plain] * (ch.depths[-1] - n) + [attn] * n
    arch = with_stage(space.largest(), si, blocks=blocks)
    reason = space.why_not(arch)
    assert reason is not None and f"stage {si + 1} has {n} attention blocks, allowed" in reason


@pytest.mark.parametrize("name", list_spaces())
def test_contains_refuses_a_mixer_the_stage_does_not_offer(name: str) -> None:
    space = get_space(name)
    ch = space.stages[0]
    foreign = next(m for m in ("attn", "lite", "pool", "ffn", "conv") if m not in (ch.plain_mixer, *ch.attn_mixers))
    st = space.largest().stages[0]
    arch = with_stage(space.largest(), 0, blocks=[BlockConfig(foreign, st.blocks[0].expansion), *st.blocks[1:]])
    assert f"stage 1 block 1 mixer {foreign!r}" in space.why_not(arch)


# ------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("space_name, presets", SPACE_PRESETS.items())
def test_default_spaces_contain_their_presets(space_name: str, presets: list[str]) -> None:
    space = get_space(space_name)
    big = space.largest()
    for p in presets:
        arch = get_preset(p)
        assert space.why_not(arch) is None, p
        assert all(b >= w for b, w in zip(big.widths, arch.widths)), p
        assert all(b >= d for b, d in zip(big.depths, arch.depths)), p


def test_v2_largest_covers_l() -> None:
    big, l_ = get_space("efficientformer_v2").largest(), get_preset("efficientformerv2_l")
    assert all(b >= w for b, w in zip(big.widths, l_.widths))
    assert all(b >= d for b, d in zip(big.depths, l_.depths))


def test_preset_tables() -> None:
    assert len(list_presets()) == 11
    assert get_preset("efficientformer_l1").widths == (48, 96, 224, 448)
    assert get_preset("efficientformer_l1").depths == (3, 2, 6, 4)
    s0 = get_preset("efficientformerv2_s0")
    assert s0.widths == (32, 48, 96, 176) and s0.depths == (2, 2, 6, 4)
    assert [b.expansion for b in s0.stages[2].blocks] == [4, 3, 3, 3, 4, 4]
    assert [b.mixer for b in s0.stages[3].blocks] == ["ffn", "ffn", "attn", "attn"]
    b0 = get_preset("efficientvit_b0")
    assert b0.widths == (8, 16, 32, 64, 128) and b0.head_widths == (1024, 1280) and b0.head_dim == 16


@pytest.mark.parametrize("lookup, known", [(get_preset, list_presets), (get_space, list_spaces)])
def test_unknown_names_list_the_known_ones(lookup, known) -> None:
    with pytest.raises(SpaceError) as info:
        lookup("efficientformer_l2")
    message = str(info.value)
    assert "'efficientformer_l2'" in message
    for name in known():
        assert name in message


@pytest.mark.parametrize("stem_stride, resolution, refused", [
    (4, 100, True), (4, 65, True), (4, 200, True), (4, 120, False), (4, 224, False),
    (2, 100, True), (2, 65, True), (2, 120, True), (2, 200, True), (2, 32, False),
])
def test_v2_odd_stage3_map_is_refused_with_a_hint_that_works(stem_stride: int, resolution: int, refused: bool) -> None:
    """The stride-2 attention of V2 stage 3 needs an even map; the hint must name a resolution step that gives one.

    100 px gives a 7x7 stage-3 map with stem stride 4 and 13x13 with stride 2 (both refused);
    120 px gives 8x8 with stride 4 (accepted) and 15x15 with stride 2 (refused).
    """
    s0 = get_preset("efficientformerv2_s0")
    arch = ArchConfig(s0.family, s0.stages, stem_stride=stem_stride)
    if not refused:
        lower(arch, resolution=resolution)
        return
    with pytest.raises(SpaceError) as info:
        lower(arch, resolution=resolution)
    match = re.search(r"divisible by (\d+)", str(info.value))
    assert match, f"the error should suggest a resolution: {info.value}"
    step = int(match.group(1))
    assert step == 8 * stem_stride
    for k in range(1, 9):
        lower(arch, resolution=step * k)  # raises if the hint is wrong


# --------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("text, ms", [("1.6ms", 1.6), ("1600us", 1.6), ("0.0016s", 1.6), ("1.6 ms", 1.6),
                                      ("1600µs", 1.6), ("2000000ns", 2.0), ("1ns", 1e-6), ("20MS", 20.0)])
def test_parse_latency_ms(text: str, ms: float) -> None:
    assert parse_latency_ms(text) == pytest.approx(ms, rel=1e-12)


@pytest.mark.parametrize("text", ["", "abc", "-1ms", "0ms", "0us", "nanms", "infms", "1e400ms", "5", "1.6",
                                  "1.6 hours", "ms"])
def test_parse_latency_ms_rejects(text: str) -> None:
    with pytest.raises(NasUserError) as info:
        parse_latency_ms(text)
    assert repr(text.strip()) in str(info.value) or text.strip() in str(info.value)


@pytest.mark.parametrize("text, count", [("5M", 5_000_000), ("500K", 500_000), ("500k", 500_000),
                                         ("5e6", 5_000_000), ("5000000", 5_000_000), ("1.2G", 1_200_000_000),
                                         ("5_000_000", 5_000_000), ("1", 1), (5_000_000, 5_000_000)])
def test_parse_count(text: str, count: int) -> None:
    assert parse_count(text) == count
    assert isinstance(parse_count(text), int)


@pytest.mark.parametrize("text", ["", "abc", "5Q", "-5M", "0", "0K", "nan", "inf", "1e400", "5MM", float("nan")])
def test_parse_count_rejects(text: str) -> None:
    with pytest.raises(NasUserError):
        parse_count(text)


# -------------------------------------------------------------------------------- subnet.json
def test_subnet_file_round_trip(tmp_path: Path) -> None:
    demo = get_space("efficientformer_v2_demo").sample(3)
    cases = [
        SubnetFile(get_preset("efficientformerv2_s0")),
        SubnetFile(get_preset("efficientvit_b0"), distillation=False),
        SubnetFile(demo, resolution=32, num_classes=10, in_chans=1,
                   metrics={"params": 123, "latency_ms": {"local-cpu": 1.25}, "acc": [0.5, 0.75]},
                   provenance={"supernet": "abc123", "command": "nas-search --latency 1.6ms"}),
    ]
    for i, sub in enumerate(cases):
        path = sub.save(tmp_path / f"sub{i}" / "subnet.json")
        loaded = SubnetFile.load(path)
        assert loaded == sub
        assert loaded.arch.hash == sub.arch.hash
        assert loaded.specs() == sub.specs()
        raw = json.loads(path.read_text())
        assert raw["schema"] == 1 and raw["family"] == sub.arch.family
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["subnet.json"] * 3  # no temp files left


def _subnet_dict() -> dict:
    return SubnetFile(get_preset("efficientformerv2_s0")).to_dict()


LOAD_ERRORS = [
    pytest.param(_set(("schema",), 2), ["'schema'", "2"], id="schema"),
    pytest.param(lambda d: d.pop("schema"), ["'schema'"], id="schema-missing"),
    pytest.param(_set(("colour",), "red"), ["unknown field", "colour"], id="unknown-field"),
    pytest.param(_set(("family",), "resnet"), ["'family'", "'resnet'", "efficientformer", "efficientformer_v2",
                                              "efficientvit"], id="family"),
    pytest.param(_set(("resolution",), -1), ["'resolution'", "-1"], id="resolution-negative"),
    pytest.param(_set(("resolution",), "224"), ["'resolution'"], id="resolution-string"),
    pytest.param(_set(("num_classes",), 0), ["'num_classes'", "0"], id="num-classes"),
    pytest.param(_set(("distillation",), "yes"), ["'distillation'"], id="distillation"),
    pytest.param(_set(("stages",), {"width": 32}), ["stages", "list"], id="stages-not-list"),
    pytest.param(_set(("stages", 1, "width"), -3), ["stages[1]", "width", "-3"], id="stage-width"),
    pytest.param(_set(("stages", 0, "blocks", 0, "mixer"), "attn"), ["stage 1 block 1", "'attn'"],
                 id="attn-in-stage-1"),
    pytest.param(_set(("metrics",), {"acc": float("nan")}), ["metrics.acc", "non-finite"], id="metrics-nan"),
    pytest.param(_set(("metrics",), [1]), ["'metrics'"], id="metrics-not-object"),
]


@pytest.mark.parametrize("edit, expected", LOAD_ERRORS)
def test_subnet_file_load_errors_name_the_field(tmp_path: Path, edit, expected: list[str]) -> None:
    d = _subnet_dict()
    edit(d)
    path = tmp_path / "subnet.json"
    path.write_text(json.dumps(d))
    with pytest.raises(FileFormatError) as info:
        SubnetFile.load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_subnet_file_load_errors_for_bad_files(tmp_path: Path) -> None:
    good = json.dumps(_subnet_dict())
    truncated = tmp_path / "truncated.json"
    truncated.write_text(good[: len(good) // 2])
    with pytest.raises(FileFormatError, match="not valid JSON"):
        SubnetFile.load(truncated)
    with pytest.raises(FileFormatError, match="does not exist"):
        SubnetFile.load(tmp_path / "missing.json")
    with pytest.raises(FileFormatError, match="folder"):
        SubnetFile.load(tmp_path)
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(FileFormatError, match="JSON object"):
        SubnetFile.load(not_object)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FileFormatError):
        SubnetFile.load(binary)


def test_subnet_file_refuses_non_finite_metrics_on_save(tmp_path: Path) -> None:
    sub = SubnetFile(get_preset("efficientformerv2_s0"), metrics={"acc": math.nan})
    with pytest.raises(ValueError):
        sub.save(tmp_path / "subnet.json")
    assert not list(tmp_path.iterdir())
