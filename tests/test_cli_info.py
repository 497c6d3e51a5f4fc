"""``nas-info`` run as a real subprocess: output, exit codes and one-line errors.

Each run happens in a fresh temporary folder, so no ``lut-*.json`` of the working tree is
picked up.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from search_spaces import count_macs, count_params, get_preset, get_space, list_presets, lower
from search_spaces.subnet_file import SubnetFile

_SCRIPT = Path(sys.executable).with_name("nas-info")
NAS_INFO = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "nas.cli_info"]


def nas_info(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NAS_INFO, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_preset_json(tmp_path: Path) -> None:
    proc = nas_info("efficientformerv2_s0", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert {"name", "family", "params", "macs", "resolution", "num_classes", "blocks"} <= set(info)
    assert info["name"] == "efficientformerv2_s0"
    assert info["family"] == "efficientformer_v2"
    assert info["params"] == 3_600_256
    specs = lower(get_preset("efficientformerv2_s0"))
    assert info["macs"] == count_macs(specs)
    assert (info["resolution"], info["num_classes"]) == (224, 1000)
    assert len(info["blocks"]) == len(specs)
    assert sum(b["params"] for b in info["blocks"]) == info["params"]
    assert [b["key"] for b in info["blocks"]] == [s.key for s in specs]
    assert info["arch_hash"] == get_preset("efficientformerv2_s0").hash


def test_preset_table(tmp_path: Path) -> None:
    proc = nas_info("efficientformer_l1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "efficientformer_l1" in proc.stdout
    assert "12,289,928" in proc.stdout


def test_overrides_change_the_counts(tmp_path: Path) -> None:
    proc = nas_info("efficientformer_l1", "--json", "--resolution", "448", "--num-classes", "10", "--in-chans", "1",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    specs = lower(get_preset("efficientformer_l1"), resolution=448, num_classes=10, in_chans=1)
    assert (info["resolution"], info["num_classes"], info["in_chans"]) == (448, 10, 1)
    assert (info["params"], info["macs"]) == (count_params(specs), count_macs(specs))


def test_list_names_every_preset(tmp_path: Path) -> None:
    proc = nas_info("--list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in list_presets():
        assert name in proc.stdout
    proc = nas_info("--list", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 11
    assert [r["name"] for r in rows] == list_presets()
    assert {r["name"]: r["params"] for r in rows}["efficientvit_b0"] == 3_410_008


def test_subnet_file(tmp_path: Path) -> None:
    arch = get_space("efficientformer_v2_demo").sample(7)
    SubnetFile(arch, resolution=32, num_classes=10, in_chans=1, metrics={"top1": 0.87}).save(tmp_path / "subnet.json")
    proc = nas_info("subnet.json", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    specs = lower(arch, resolution=32, num_classes=10, in_chans=1)
    assert info["params"] == count_params(specs)
    assert info["macs"] == count_macs(specs)
    assert (info["resolution"], info["num_classes"], info["in_chans"]) == (32, 10, 1)
    assert info["arch_hash"] == arch.hash
    assert info["metrics"] == {"top1": 0.87}
    table = nas_info(str(tmp_path / "subnet.json"), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "top1" in table.stdout


_V2_STAGES = [
    {"width": 32, "blocks": [{"mixer": "ffn", "expansion": 4}]},
    {"width": 48, "blocks": [{"mixer": "ffn", "expansion": 4}]},
    {"width": 96, "blocks": [{"mixer": "ffn", "expansion": 4}]},
    {"width": 176, "blocks": [{"mixer": "ffn", "expansion": 4}]},
]


def _subnet(**changes: object) -> str:
    d = {"schema": 1, "family": "efficientformer_v2", "resolution": 224, "num_classes": 1000, "stages": _V2_STAGES}
    d.update(changes)
    return json.dumps(d)


_ATTN_IN_STAGE_1 = [{"width": 32, "blocks": [{"mixer": "attn", "expansion": 4}]}, *_V2_STAGES[1:]]

#: (id, arguments, file to write as {name: text}, fragments the error line must hold)
BAD_INPUTS = [
    ("unknown-preset", ["efficientformer_l2"], {}, ["'efficientformer_l2'", "efficientformerv2_s0", "efficientvit_b3"]),
    ("missing-file", ["nothere.json"], {}, ["nothere.json", "does not exist"]),
    ("corrupt-json", ["subnet.json"], {"subnet.json": _subnet()[:40]}, ["subnet.json", "not valid JSON"]),
    ("bad-field", ["subnet.json"], {"subnet.json": _subnet(resolution=-1)}, ["subnet.json", "'resolution'", "-1"]),
    ("unknown-field", ["subnet.json"], {"subnet.json": _subnet(colour="red")}, ["subnet.json", "colour"]),
    ("bad-family", ["subnet.json"], {"subnet.json": _subnet(family="resnet")}, ["'family'", "'resnet'"]),
    ("attn-in-stage-1", ["subnet.json"], {"subnet.json": _subnet(stages=_ATTN_IN_STAGE_1)},
     ["subnet.json", "stage 1 block 1", "'attn'"]),
    ("negative-resolution", ["efficientformerv2_s0", "--resolution", "-1"], {}, ["resolution", "-1"]),
    ("odd-v2-map", ["efficientformerv2_s0", "--resolution", "100"], {}, ["resolution 100", "even", "divisible by 32"]),
    ("resolution-not-int", ["efficientformerv2_s0", "--resolution", "abc"], {}, ["--resolution", "'abc'"]),
    ("zero-classes", ["efficientformerv2_s0", "--num-classes", "0"], {}, ["--num-classes", "0"]),
    ("no-argument", [], {}, ["preset", "subnet.json"]),
    ("unknown-flag", ["efficientformerv2_s0", "--colour"], {}, ["--colour"]),
]


@pytest.mark.parametrize("args, files, fragments", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path: Path, args: list[str], files: dict[str, str],
                                                  fragments: list[str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    proc = nas_info(*args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nas-info: error: ")
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert proc.stdout == ""


def test_help(tmp_path: Path) -> None:
    proc = nas_info("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "--json" in proc.stdout and "--list" in proc.stdout
