"""experiments/gpu_check.py: its CPU dry run passes, with only torch, numpy, onnx and onnxruntime importable.

The GPU machine may lack the toolkit's other dependencies, so the dry run runs with pydantic,
optuna, pandas, coremltools, safetensors, tqdm, matplotlib and PIL made unimportable. The
``eager`` compile backend (dynamo tracing, no code generation) keeps it short on a CPU; the
GPU run uses Inductor through the same code. No timing is asserted.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("pydantic", "optuna", "pandas", "coremltools", "safetensors", "tqdm", "matplotlib", "PIL")
RUNNER = f"""
import runpy, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # importing it raises ImportError
sys.argv = ["experiments/gpu_check.py", *sys.argv[1:]]
runpy.run_path("experiments/gpu_check.py", run_name="__main__")
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def gpu_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=1500)


@pytest.mark.timeout(1800)
def test_cpu_dry_run_passes_without_the_other_dependencies() -> None:
    proc = gpu_check("--device", "cpu", "--space", "efficientformer_v2_demo", "--resolution", "32",
                     "--batch-size", "4", "--steps", "1", "--warmup-steps", "1", "--live-steps", "1",
                     "--num-random", "1", "--compile-backend", "eager", "--time-limit", "100000")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "gpu_check: all checks passed" in out, out
    for phase in ("eager", "compiled", "compiled, live configs"):
        assert f"\n{phase:<24} " in out, phase
    assert out.count("extraction parity: max |diff|") == 3 and out.count("ONNX Runtime parity: max |diff|") == 2
    assert "FAILED" not in out and "0 recompiles" in out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_0() -> None:
    proc = gpu_check()
    assert proc.returncode == 0 and "no CUDA device here" in proc.stdout, proc.stdout + proc.stderr
