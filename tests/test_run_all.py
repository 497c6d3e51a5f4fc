"""``experiments/run_all.py`` renders the demo's figures with or without a ``demo/`` folder in the checkout."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def run_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("run_all_under_test", ROOT / "experiments" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "experiments" / "results")
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    return module


def _demo_run(root: Path) -> None:
    run = root / "demo" / "runs" / "fmnist"
    run.mkdir(parents=True)
    metrics = {"val_acc_largest": 0.8888, "test_acc_largest": 0.8808, "val_acc_smallest": 0.8806,
               "test_acc_smallest": 0.8699, "train_seconds": 1397.2}
    (run / "supernet.json").write_text(json.dumps({"metrics": metrics}))
    ex = root / "demo" / "runs" / "extract-0123456789ab"
    ex.mkdir()
    (ex / "extract.json").write_text(json.dumps({"metrics": {
        "supernet_parity_max_abs": 0.0, "onnx_max_abs": 4.8e-7, "test_accuracy": 0.875, "params": 224564,
        "latency_ms": {"local-cpu": {"measured": 0.257, "lut": 0.330, "lut_source": "measured-lut"}}}}))


def test_demo_figures_are_kept_for_a_checkout_without_the_demo_folder(run_all, tmp_path: Path) -> None:
    assert "Demo supernet" not in run_all.render()  # nothing to show yet
    _demo_run(tmp_path)
    with_folder = run_all.render()
    assert "| largest | 88.88% | 88.08% |" in with_folder
    assert "`extract-0123456789ab`" in with_folder and "ratio 0.78" in with_folder
    assert (tmp_path / "experiments" / "results" / "demo.json").is_file()
    shutil.rmtree(tmp_path / "demo")
    assert run_all.render() == with_folder  # the same summary from results/demo.json
