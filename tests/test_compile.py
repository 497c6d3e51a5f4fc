"""``--compile`` for the supernet: per-spec static graphs that match eager, and a failing compiler never stops a run.

Everything is real: dynamo, AOTAutograd and (for the failure) Inductor with its C++ toolchain.
The in-process checks and the successful ``nas-train --compile`` run use the ``aot_eager``
backend (dynamo and AOTAutograd without code generation), because Inductor's C++ code
generation for each of a few dozen graphs is slow on a small CPU machine. The failure is forced
through Inductor itself, with ``CXX`` pointing to a compiler that does not exist, as on a
machine without a working C++ toolchain. No test asserts on a timing.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from search_spaces import get_space
from supernet import Supernet
from supernet.compile import CompiledSupernet

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--space", "efficientformer_v2_demo", "--dataset", "synthetic:64", "--resolution", "32", "--epochs", "1",
        "--batch-size", "32", "--threads", "1", "--no-progress", "--compile"]


def _demo_net() -> tuple[Supernet, object]:
    torch.manual_seed(0)
    space = get_space("efficientformer_v2_demo").with_stem_stride(2)
    net = Supernet(space, num_classes=10, resolution=32, in_chans=3).to(memory_format=torch.channels_last)
    return net.train(), space


def test_compiled_blocks_match_eager_with_one_graph_per_spec(caplog: pytest.LogCaptureFixture) -> None:
    torch.set_num_threads(1)
    net, space = _demo_net()
    twin = copy.deepcopy(net)
    compiled = CompiledSupernet(twin, backend="aot_eager", compiles_per_step=4)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    arch = space.largest()
    specs = {s.key for s in net.lower(arch)}

    with caplog.at_level(logging.WARNING):
        out, ref = compiled(x, arch), net(x, arch)
    assert compiled.stats.graphs == 4 and compiled.stats.eager_calls > 0, "the step's budget of 4 compilations"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.float().sum().backward()
    ref.float().sum().backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    for (name, b), c in zip(net.named_buffers(), twin.buffers()):  # BN statistics updated alike
        torch.testing.assert_close(c, b, atol=1e-6, rtol=1e-5, msg=name)

    compiled.compiles_per_step = 100  # the next step compiles the rest
    compiled.begin_step()
    compiled(x, arch)
    stats = compiled.update_counts()
    assert stats.graphs == len(specs) and stats.evicted == 0
    before = (stats.compiled_calls, stats.eager_calls)
    compiled.begin_step()
    torch.testing.assert_close(compiled(x, arch), net(x, arch), atol=1e-5, rtol=1e-5)
    assert (stats.compiled_calls - before[0], stats.eager_calls - before[1]) == (len(net.lower(arch)), 0)
    assert stats.failures == 0 and compiled.update_counts().recompiles == 0, stats.summary()

    compiled.max_graphs = len(specs)  # another config's specs push out the least recently used ones
    compiled.begin_step()
    torch.testing.assert_close(compiled(x, space.smallest()), net(x, space.smallest()), atol=1e-5, rtol=1e-5)
    assert len(compiled._graphs) == len(specs) and stats.evicted >= 1
    assert stats.evicted == stats.graphs - len(compiled._graphs)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _nas_train(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas.cli_train", *TINY, "--out", str(tmp_path / "run"), *args],
                          cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=900)


def _check_finished(tmp_path: Path, proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "supernet.json").read_text())
    assert meta["complete"] and meta["recipe"]["compile"] is True
    assert all(0.0 <= meta["metrics"][k] <= 1.0 for k in ("val_acc_largest", "test_acc_smallest"))
    return meta


@pytest.mark.timeout(1200)
def test_nas_train_compile_runs_the_demo_space(tmp_path: Path) -> None:
    proc = _nas_train(tmp_path, "--compile-backend", "aot_eager")
    _check_finished(tmp_path, proc)
    m = re.search(r"compile: (\d+) block graphs compiled in [\d.]+ s, (\d+) recompiles, (\d+)% of block calls",
                  proc.stderr)
    assert m, proc.stderr[-3000:]
    graphs, recompiles, percent = map(int, m.groups())
    assert graphs > 0 and recompiles == 0 and percent > 50, m.group(0)
    assert "warning" not in proc.stderr.lower() and "failed" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.timeout(1200)
def test_a_failing_compiler_falls_back_to_eager_with_one_warning(tmp_path: Path) -> None:
    """Inductor without a working C++ compiler: every compilation fails; the run finishes eagerly."""
    proc = _nas_train(tmp_path, env={**ENV, "CXX": str(tmp_path / "no-such-c++")})
    _check_finished(tmp_path, proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    warned = [ln for ln in lines if "torch.compile failed" in ln]
    assert len(warned) == 1, proc.stderr[-3000:]
    assert warned[0].startswith("nas-train: torch.compile failed (") and "no-such-c++" in warned[0], warned[0]
    assert "training continues" in warned[0]
    assert all(ln.startswith("nas-train: ") for ln in lines), proc.stderr[-3000:]
    assert re.search(r"compile: 0 block graphs compiled .* 0% of block calls compiled, 3 compile failures",
                     proc.stderr), proc.stderr[-3000:]


def test_unknown_backend_is_a_user_error(tmp_path: Path) -> None:
    proc = _nas_train(tmp_path, "--compile-backend", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("nas-train: error: --compile-backend 'nope'")
    assert not (tmp_path / "run").exists()
