"""The training settings as a schema model, the nas-train flags generated from it, and the run files' schemas.

In-process and fast: no training runs here (tests/test_train.py trains). Every validation
boundary of :class:`TrainConfig` is checked (the value at the boundary passes, the next one
fails with a message naming the setting and the value), plus inf and NaN, wrong types, the
cross-field rules, ``--config`` files overridden by flags, and the files a run of the previous
version wrote (``tests/data``): a schema-1 ``supernet.json`` and a checkpoint's metadata.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from nas.cli_train import build_parser, default_out, resolve_config
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.schema import validate
from supernet.run import load_run
from supernet.run_schema import CheckpointMeta, SupernetFile
from supernet.train_config import TrainConfig, flag_name

DATA = Path(__file__).resolve().parent / "data"


def config_error(**settings: Any) -> str:
    with pytest.raises(NasUserError) as info:
        TrainConfig(**settings)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- boundaries of every field
# (field, accepted boundary value, rejected neighbour)
BOUNDARIES = [
    ("epochs", 1, 0), ("batch_size", 2, 1), ("lr", 1e-12, 0.0), ("min_lr", 0.0, -1e-12),
    ("weight_decay", 0.0, -0.1), ("warmup_epochs", 0.0, -0.1), ("label_smoothing", 0.0, -0.1),
    ("label_smoothing", 0.99, 1.0), ("num_random", 0, -1), ("num_random", 16, 17), ("seed", 0, -1),
    ("train_subset", 128, 1), ("val_size", 1, 0), ("calib_batches", 1, 0), ("save_every", 0, -1),
    ("threads", 0, -1), ("stem_stride", 4, 3), ("stem_stride", 0, 1), ("resolution", 16, 15),
    ("resolution", 1024, 1025), ("resolution", "16x1024", "16x1025"),
]


@pytest.mark.parametrize("field,good,bad", BOUNDARIES, ids=[f"{f}={b!r}" for f, _, b in BOUNDARIES])
def test_field_boundaries(field: str, good: Any, bad: Any) -> None:
    others = {"min_lr": 0.0} if field == "lr" else {}  # min_lr <= lr
    TrainConfig(**{field: good}, **others)
    message = config_error(**{field: bad}, **others)
    assert f"`{field}`" in message and repr(bad) in message, message


@pytest.mark.parametrize("field", ["lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_floats_refuse_inf_and_nan(field: str, value: float) -> None:
    message = config_error(**{field: value})
    assert f"`{field}`" in message and str(value) in message, message


@pytest.mark.parametrize("field,value", [
    ("epochs", True), ("epochs", "3"), ("epochs", 3.0), ("lr", "0.1"), ("distill", 1), ("distill", "true"),
    ("bf16", "yes"), ("stem_stride", False), ("space", 3), ("resolution", True), ("resolution", [32]),
    ("resolution", "32x"), ("device", "tpu"), ("device", "cuda:x"), ("train_subset", 2.5),
])
def test_wrong_types_are_refused(field: str, value: Any) -> None:
    message = config_error(**{field: value})
    assert f"`{field}`" in message and repr(value) in message, message


def test_cross_field_rules_at_their_boundaries() -> None:
    TrainConfig(lr=0.01, min_lr=0.01)
    assert "`min_lr` must be at most `lr` (0.01)" in config_error(lr=0.01, min_lr=0.011)
    assert "`min_lr` must be at most `lr` (1e-06), got 1e-05" in config_error(lr=1e-6)
    TrainConfig(epochs=2, warmup_epochs=2.0)
    assert "`warmup_epochs` must be at most `epochs` (2)" in config_error(epochs=2, warmup_epochs=2.5)
    TrainConfig(batch_size=32, train_subset=32)
    assert "`train_subset` must be at least `batch_size` (32), got 31" in config_error(batch_size=32, train_subset=31)


def test_unknown_setting_is_named() -> None:
    with pytest.raises(NasUserError, match=r"cfg.json: unknown training setting\(s\) \['bogus_key'\]"):
        TrainConfig.from_dict({"bogus_key": 1}, source="cfg.json")
    with pytest.raises(NasUserError):
        TrainConfig(bogus_key=1)


def test_config_is_frozen_and_hashable() -> None:
    cfg = TrainConfig()
    with pytest.raises(Exception):
        cfg.epochs = 3  # type: ignore[misc]
    assert hash(cfg) == hash(TrainConfig()) and cfg == TrainConfig()


@pytest.mark.parametrize("value,hw,stored", [
    (32, (32, 32), 32), ("32", (32, 32), 32), ("512x1024", (512, 1024), [512, 1024]),
    ([64, 128], (64, 128), [64, 128]), ((48, 48), (48, 48), 48),
])
def test_resolution_forms(value: Any, hw: tuple[int, int], stored: Any) -> None:
    cfg = TrainConfig(resolution=value)
    assert cfg.resolution == hw and cfg.to_dict()["resolution"] == stored
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_to_dict_round_trips_and_identity_ignores_machine_settings() -> None:
    cfg = TrainConfig(dataset="synthetic:512", epochs=3, bf16=True, train_subset=256)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    other = TrainConfig.from_dict({**cfg.to_dict(), "device": "cuda", "threads": 4, "save_every": 5,
                                   "compile": True})
    assert other.identity() == cfg.identity() and other != cfg
    assert TrainConfig.from_dict({**cfg.to_dict(), "seed": 1}).identity() != cfg.identity()


# ----------------------------------------------------------------------------- the generated nas-train flags
def test_every_field_is_a_flag_with_its_default_in_the_help() -> None:
    parser = build_parser()
    text = parser.format_help()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name, info in TrainConfig.model_fields.items():
        assert flag_name(name) in flags, name
        assert info.description, f"{name} has no description for its --help"
    for line in ("--epochs N", "passes over the training split (default: 5)", "--stem-stride {0,2,4}",
                 "--distill {true,false}", "--resolution N|HxW", "--compile "):
        assert line in " ".join(text.split()) or line in text, line


def _resolve(*argv: str) -> TrainConfig:
    args = build_parser().parse_args(list(argv))
    return resolve_config(args)


def test_flags_parse_to_the_model_and_override_the_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"epochs": 7, "lr": 0.01, "resolution": "64x64", "distill": False}))
    cfg = _resolve("--config", str(cfg_file), "--lr", "0.02", "--bf16", "true", "--compile",
                   "--resolution", "48", "--stem-stride", "4", "--train-subset", "300")
    assert (cfg.epochs, cfg.lr, cfg.resolution, cfg.distill, cfg.bf16, cfg.compile, cfg.stem_stride,
            cfg.train_subset) == (7, 0.02, (48, 48), False, True, True, 4, 300)
    assert _resolve().compile is False and _resolve().bf16 is None
    assert str(default_out(_resolve("--resolution", "32"))) == "runs/efficientformer_v2_demo-fashion-mnist-r32"


def test_messages_name_the_flag_or_the_file_field(tmp_path: Path) -> None:
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"epochs": "two", "min_lr": 1}))
    with pytest.raises(NasUserError, match=r"^--epochs must be an integer >= 1, got 0$"):
        _resolve("--epochs", "0")
    with pytest.raises(NasUserError, match=r"run.json: `epochs` must be an integer >= 1, got 'two'"):
        _resolve("--config", str(cfg_file))
    with pytest.raises(NasUserError, match=r"run.json: `min_lr` must be at most --lr \(0.002\), got 1$"):
        _resolve("--config", str(cfg_file), "--epochs", "2")
    with pytest.raises(NasUserError, match=r"^--lr must be a finite number > 0, got nan$"):
        _resolve("--lr", "nan")


@pytest.mark.parametrize("argv,words", [
    (["--epochs", "abc"], ["--epochs", "'abc'"]), (["--distill", "maybe"], ["--distill", "'maybe'"]),
    (["--stem-stride", "3"], ["--stem-stride", "3"]),
])
def test_flag_type_errors_exit_2_with_one_line(argv: list[str], words: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nas-train: error:"), err
    assert all(w in err for w in words), err


# ----------------------------------------------------------------------------- files of the previous version
def test_schema1_supernet_json_of_the_previous_version_loads(tmp_path: Path) -> None:
    """tests/data/supernet-schema1.json was written verbatim by nas-train before the schema models."""
    raw = json.loads((DATA / "supernet-schema1.json").read_text())
    file = validate(SupernetFile, raw, source="supernet-schema1.json")
    assert file.to_json() == raw, "reading and writing a schema-1 file must not change it"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(DATA / "supernet-schema1.json", run_dir / "supernet.json")
    (run_dir / "supernet.safetensors").write_bytes(b"stand-in: the real weights are not stored in the repo")
    run = load_run(run_dir, check_weights=False)
    assert (run.resolution, run.num_classes, run.in_chans, run.dataset) == (32, 10, 3, "synthetic:256")
    assert run.space.name == "efficientformer_v2_demo" and run.meta == raw
    # its recipe reads as the same settings (settings added since take their defaults)
    assert TrainConfig.from_dict(run.file.recipe).to_dict() == {**raw["recipe"], "compile_backend": "inductor", "init": [],
                                                                 "teacher": None}
    with pytest.raises(FileFormatError, match="checksum"):
        load_run(run_dir)


@pytest.mark.parametrize("edit,words", [
    (lambda d: d.update(schema=2), ["schema 1", "2"]),
    (lambda d: d.update(resolution="32"), ["resolution", "'32'"]),
    (lambda d: d.update(extra_field=1), ["extra_field", "unknown field"]),
    (lambda d: d.pop("num_classes"), ["num_classes", "missing"]),
    (lambda d: d.update(weights_sha256="abc"), ["weights_sha256", "'abc'"]),
    (lambda d: d["log"][0].update(epoch="1"), ["log[0].epoch"]),
    (lambda d: d["space"].pop("stages"), ["space"]),
])
def test_bad_supernet_json_is_one_line(tmp_path: Path, edit: Any, words: list[str]) -> None:
    raw = json.loads((DATA / "supernet-schema1.json").read_text())
    edit(raw)
    (tmp_path / "supernet.json").write_text(json.dumps(raw))
    (tmp_path / "supernet.safetensors").write_bytes(b"x")
    with pytest.raises(FileFormatError) as info:
        load_run(tmp_path, check_weights=False)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), info.value


def test_hand_made_minimal_supernet_json_loads(tmp_path: Path) -> None:
    """Only the fields a run needs are required (tools and tests write minimal run folders)."""
    raw = json.loads((DATA / "supernet-schema1.json").read_text())
    (tmp_path / "supernet.safetensors").write_bytes(b"weights")
    minimal = {k: raw[k] for k in ("schema", "space", "resolution", "num_classes", "in_chans", "complete")}
    minimal.update(recipe={"dataset": "synthetic"}, weights_sha256=hashlib.sha256(b"weights").hexdigest())
    (tmp_path / "supernet.json").write_text(json.dumps(minimal))
    assert load_run(tmp_path).resolution == 32


def test_checkpoint_metadata_of_the_previous_version_validates() -> None:
    raw = json.loads((DATA / "checkpoint-meta-schema1.json").read_text())
    meta = validate(CheckpointMeta, raw, source="checkpoint")
    assert meta.model_dump(mode="json", by_alias=True) == raw
    assert (meta.step, meta.total, len(meta.log)) == (14, 14, 2)
    for edit in (lambda d: d.update(step=15), lambda d: d.update(step="3"), lambda d: d.pop("optimizer"),
                 lambda d: d["epoch_running"].update(loss_n=-1)):
        bad = json.loads(json.dumps(raw))
        edit(bad)
        with pytest.raises(FileFormatError):
            validate(CheckpointMeta, bad, source="checkpoint")
