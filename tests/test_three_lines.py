"""The mission's three lines, typed exactly as a user types them, in a folder where nas-train has run.

    nas-build-lut --device iphone12
    nas-search --latency 1.6ms --max-params 5M
    nas-extract subnet.json

Each default (the latest supernet run, the LUT for its resolution, the supernet named in
subnet.json's provenance) must be chosen from the folder and printed as it is chosen. The folder
also holds a local-cpu LUT, as after ``make demo``: the LUT just built is the one searched with.
The first line runs once per session (conftest's read-only ``iphone`` folder: it converts every
block to CoreML, the slowest step of the suite); the other two run in a private copy of it.

These are the README's lines as typed, so the budget does not bind on the demo space (the
largest config is about 0.3 ms predicted and 590K params); budgets that bind are tested in
test_search_budgets.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import _fixtures_search as F


def test_the_three_lines_as_typed(iphone: F.Shared, tmp_path: Path) -> None:
    lut = iphone.procs["lut"]
    assert f"using supernet run {F.RUN}" in lut.stderr + lut.stdout, F.describe(lut)
    assert "PREDICTED" in lut.stdout, F.describe(lut)
    table = json.loads((iphone.path / "lut-iphone12-32.json").read_text())
    assert table["device"] == "iphone12"
    assert (iphone.path / "lut-iphone12-32.bundle" / "runner.py").is_file()

    folder = F.copy_folder(iphone.path, tmp_path / "w")
    search = F.cli("nas-search", "--latency", "1.6ms", "--max-params", "5M", cwd=folder, timeout=600)
    assert search.returncode == 0, F.describe(search)
    said = search.stdout + search.stderr
    assert "using the latest supernet run" in said and "runs/tiny" in said, F.describe(search)
    assert "using device 'iphone12'" in said, F.describe(search)  # the newest LUT, not the older local-cpu one
    sub = json.loads((folder / "subnet.json").read_text())
    metrics = sub["metrics"]
    lat = metrics["latency_ms"]["iphone12"]
    assert lat["source"] == "predicted", lat  # labelled predicted: nothing was measured on an iPhone
    assert lat["value"] <= 1.6 and metrics["params"] <= 5_000_000, metrics

    extract = F.cli("nas-extract", "subnet.json", cwd=folder, timeout=600)
    assert extract.returncode == 0, F.describe(extract)
    said = extract.stdout + extract.stderr
    assert "runs/tiny" in said and "provenance" in said, F.describe(extract)
    out = [p for p in (folder / "runs").glob("extract-*") if p.is_dir()]
    assert len(out) == 1, out
    for name in ("model.safetensors", "model.onnx", "model.md", "extract.json"):
        assert (out[0] / name).is_file(), name
    F.check_folder_integrity(folder)
