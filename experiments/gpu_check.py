"""GPU check of supernet training: throughput eager vs compiled, extraction parity, ONNX parity.

One script of at most ``--time-limit`` seconds (default 570, under 10 minutes). On a CUDA device
it trains the full EfficientFormerV2 space (``efficientformer_v2``) at 224 px on synthetic data
with the ``nas-train`` step itself (:func:`supernet.sandwich.sandwich_step`): a sandwich of 4
(largest, smallest, 2 random), in-place distillation, AdamW, bf16 autocast, channels_last.

1. **eager**: warm-up, then ``--steps`` timed steps: images/s and peak memory.
2. **compiled** (:class:`supernet.compile.CompiledSupernet`, one static graph per block spec):
   the same four configs; warm-up steps compile their specs (at most ``--compile-seconds``;
   blocks left uncompiled run eagerly and the share is printed), then ``--steps`` timed steps:
   images/s, peak memory, compile time, graphs, recompiles.
3. **compiled, live**: ``--live-steps`` steps with fresh random configs every step, as in
   training (new specs compile within the per-step budget): images/s and the share of block
   calls that ran compiled. Skipped when time is short.
4. **extraction parity**: for the four configs, ``get_active_subnet(arch)`` against the
   supernet's forward on the GPU-trained weights (float32, TF32 off, eval mode).
5. **ONNX parity**: two extracted subnets exported (TorchScript exporter, opset 17), checked
   by ``onnx.checker`` and run by ONNX Runtime on CPU against torch (within 1e-4, as
   ``nas-extract`` checks).

Goal (issue 11.5): >= 900 images/s compiled on one H100/H200. For scale, timm's static
EfficientFormerV2-L trains at about 1,856 images/s compiled and 343 eager there; a sandwich of 4
costs roughly 2.2 V2-L passes per image. Images/s counts each batch image once per step, as
``nas-train`` logs it.

Without CUDA it says so and exits 0. ``--device cpu`` is a dry run of the same code path,
small enough for a CPU (on CPU the compile backend defaults to ``aot_eager``, since Inductor's
C++ code generation for dozens of graphs is slow there; ``--compile-backend inductor`` forces it)::

    PYTHONPATH=. python experiments/gpu_check.py                      # on the GPU machine
    PYTHONPATH=. python experiments/gpu_check.py --device cpu --steps 2 --resolution 64 \\
        --space efficientformer_v2_demo --batch-size 8                # CPU dry run

Needs only torch, numpy, onnx and onnxruntime besides this repository (no pydantic, optuna,
pandas or coremltools; ONNX and ONNX Runtime are imported when step 5 runs). Exit code 0 when
every check that ran passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import platform
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch

    from search_spaces import ArchConfig

PARITY_ATOL = 1e-4  # extracted subnet vs supernet forward, float32 logits (both compute the same ops)
ONNX_ATOL = 1e-4  # ONNX Runtime vs torch, as nas-extract checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--space", default="efficientformer_v2", help="search space (default efficientformer_v2)")
    p.add_argument("--resolution", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per phase (default 20)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--live-steps", type=int, default=10, help="steps of phase 3, fresh configs each (default 10)")
    p.add_argument("--num-random", type=int, default=2, help="random configs per step (default 2: a sandwich of 4)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager on cpu)")
    p.add_argument("--compile-seconds", type=float, default=300.0,
                   help="most seconds of compilation in phase 2 (default 300)")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on for cuda)")
    p.add_argument("--time-limit", type=float, default=570.0, help="stop starting phases after this (default 570 s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@dataclass
class Phase:
    """One timed phase's numbers."""

    name: str
    images_per_s: float = 0.0
    seconds_per_step: float = 0.0
    peak_mem_gib: float = 0.0
    note: str = ""


class Check:
    """The run: model, optimizer, data, fixed configs, and the deadline."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from search_spaces import get_space
        from supernet.elastic import Supernet

        self.args = args
        self.device = torch.device(args.device)
        self.deadline = time.monotonic() + args.time_limit
        self.bf16 = args.bf16 == "on" or (args.bf16 == "auto" and self.device.type == "cuda")
        space = get_space(args.space)
        self.space = space.with_stem_stride(2 if args.resolution <= 64 else space.stem_stride)
        torch.manual_seed(args.seed)
        self.net: Supernet = Supernet(self.space, num_classes=1000, resolution=args.resolution, in_chans=3)
        self.net.to(self.device).to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, weight_decay=0.05,
                                     fused=self.device.type == "cuda" or None)
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, generator=gen)
        self.x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(self.device)
        rng = random.Random(args.seed)
        self.archs: list[ArchConfig] = [self.space.largest(), self.space.smallest()]
        self.archs += [self.space.sample(rng) for _ in range(args.num_random)]

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, forward: Callable[[torch.Tensor, ArchConfig], torch.Tensor], archs: list[ArchConfig]) -> None:
        from supernet.sandwich import sandwich_step

        self.opt.zero_grad(set_to_none=True)
        sandwich_step(forward, archs, self.x, self.y, label_smoothing=0.1, distill=True, bf16=self.bf16)
        self.opt.step()

    def timed(self, name: str, steps: int, run_step: Callable[[int], None]) -> Phase:
        """``steps`` calls of ``run_step(i)``, timed end to end (device synchronised)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        t0 = time.perf_counter()
        for i in range(steps):
            run_step(i)
        self.sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        return Phase(name, steps * self.args.batch_size / seconds, seconds / steps, peak)


def phase_eager(check: Check) -> Phase:
    args = check.args
    for _ in range(args.warmup_steps):
        check.step(check.net, check.archs)
    return check.timed("eager", args.steps, lambda i: check.step(check.net, check.archs))


def phase_compiled(check: Check, backend: str) -> tuple[Phase, Any]:
    from supernet.compile import CompiledSupernet, dynamo_counters

    args = check.args
    compiled = CompiledSupernet(check.net, backend=backend, compiles_per_step=8, max_graphs=4096)
    t0 = time.perf_counter()
    warm = 0
    budget = min(args.compile_seconds, max(0.0, check.time_left() - 120))
    while True:  # warm-up: compile the four configs' specs, 8 per step, within the time budget
        compiled.begin_step()
        graphs_before = compiled.stats.graphs + compiled.stats.failures
        check.step(compiled, check.archs)
        warm += 1
        settled = compiled.stats.graphs + compiled.stats.failures == graphs_before  # every spec compiled or failed
        if (settled and warm >= args.warmup_steps) or compiled.stats.compile_seconds > budget or warm > 200:
            break
    check.sync()
    warm_seconds = time.perf_counter() - t0
    compiled.compiles_per_step = 0  # the timed steps compile nothing: what is not compiled now runs eagerly
    calls = (compiled.stats.compiled_calls, compiled.stats.eager_calls)
    phase = check.timed("compiled", args.steps, lambda i: check.step(compiled, check.archs))
    stats = compiled.update_counts()
    share = (stats.compiled_calls - calls[0]) / max(1, stats.compiled_calls + stats.eager_calls - sum(calls))
    phase.note = (f"{warm} warm-up steps in {warm_seconds:.0f} s; {stats.summary()}; "
                  f"{100 * share:.0f}% of the timed block calls compiled; dynamo: {dynamo_counters()}")
    return phase, compiled


def phase_live(check: Check, compiled: Any) -> Phase:
    """Fresh random configs every step, as in training; new specs compile within the per-step budget."""
    from supernet.sandwich import sandwich_archs

    args = check.args
    compiled.compiles_per_step = 8
    before = (compiled.stats.compiled_calls, compiled.stats.eager_calls, compiled.stats.graphs)

    def run(i: int) -> None:
        compiled.begin_step()
        check.step(compiled, sandwich_archs(check.space, seed=args.seed + 1, step=i, num_random=args.num_random))

    phase = check.timed("compiled, live configs", args.live_steps, run)
    s = compiled.update_counts()
    calls = s.compiled_calls + s.eager_calls - before[0] - before[1]
    phase.note = (f"{s.graphs - before[2]} new graphs compiled during the phase, "
                  f"{100 * (s.compiled_calls - before[0]) / max(1, calls):.0f}% of block calls compiled, "
                  f"{s.recompiles} recompiles in all")
    return phase


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (restored afterwards)."""
    import torch

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def check_extraction(check: Check) -> list[tuple[str, float, bool]]:
    import torch

    rows = []
    x = check.x[:8].float()
    check.net.eval()
    try:
        with torch.no_grad(), exact_float32():
            for arch in check.archs:
                ref = check.net(x, arch).float()
                out = check.net.get_active_subnet(arch).eval()(x).float()
                diff = float((out - ref).abs().max())
                tol = PARITY_ATOL * max(1.0, float(ref.abs().max()))
                rows.append((arch.to_string(), diff, diff <= tol))
    finally:
        check.net.train()
    return rows


def check_onnx(check: Check) -> list[tuple[str, float, bool]]:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    rows = []
    res = check.args.resolution
    x = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(1))
    for arch in dict.fromkeys([check.space.smallest(), check.archs[-1]]):  # two configs, or one when they agree
        model = check.net.get_active_subnet(arch).eval().float().cpu()
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen on purpose
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],  # type: ignore[arg-type]
                              output_names=["output"], do_constant_folding=True)
            ref = model(x).numpy()
        onnx.checker.check_model(onnx.load_model_from_string(buf.getvalue()))
        session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        out = session.run(["output"], {"input": x.numpy()})[0]
        diff = float(np.abs(out - ref).max())
        rows.append((arch.to_string(), diff, diff <= ONNX_ATOL * max(1.0, float(np.abs(ref).max()))))
    return rows


def environment(check: Check) -> str:
    import torch

    dev = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else platform.processor() or "cpu"
    return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {dev}, python {platform.python_version()}, "
            f"space {check.args.space} at {check.args.resolution} px, batch {check.args.batch_size}, "
            f"sandwich of {2 + check.args.num_random}, bf16 {check.bf16}, channels_last, seed {check.args.seed}")


def _run(label: str, failures: list[str], fn: Callable[[], Any]) -> Any:
    """Run one part; an exception is reported in one line and counted, and the script goes on."""
    try:
        return fn()
    except Exception as exc:  # report and continue: one broken part must not hide the others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        failures.append(f"{label}: {type(exc).__name__}: {first[:300]}")
        print(f"  FAILED {label}: {type(exc).__name__}: {first[:300]}")
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing to check (a CPU dry run: --device cpu --steps 2 "
              "--resolution 64 --space efficientformer_v2_demo --batch-size 8)")
        return 0
    backend = args.compile_backend or ("inductor" if args.device.startswith("cuda") else "aot_eager")
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        return _main(args, backend)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def _main(args: argparse.Namespace, backend: str) -> int:
    failures: list[str] = []
    check = Check(args)
    print(f"gpu_check: {environment(check)}, compile backend {backend}")
    print("configs: " + "; ".join(a.to_string() for a in check.archs))
    phases = [p for p in [_run("eager", failures, lambda: phase_eager(check))] if p]
    compiled_pair = _run("compiled", failures, lambda: phase_compiled(check, backend))
    if compiled_pair:
        phases.append(compiled_pair[0])
        if args.live_steps and check.time_left() > 150:
            live = _run("compiled, live configs", failures, lambda: phase_live(check, compiled_pair[1]))
            phases += [live] if live else []
        elif args.live_steps:
            print("  (phase 3 skipped: too little time left)")
    print(f"\n{'phase':<24} {'images/s':>10} {'s/step':>8} {'peak GiB':>9}")
    for p in phases:
        print(f"{p.name:<24} {p.images_per_s:>10.1f} {p.seconds_per_step:>8.3f} {p.peak_mem_gib:>9.2f}")
        if p.note:
            print(f"  {p.note}")
    parts: list[tuple[str, Callable[[Check], list[tuple[str, float, bool]]]]] = [
        ("extraction parity", check_extraction), ("ONNX Runtime parity", check_onnx)]
    for label, part in parts:
        rows = _run(label, failures, functools.partial(part, check)) or []
        for arch, diff, ok in rows:
            print(f"{label}: max |diff| {diff:.2e} {'ok' if ok else 'FAILED'}  {arch}")
            if not ok:
                failures.append(f"{label}: {diff:.2e} for {arch}")
    best = max((p.images_per_s for p in phases if p.name == "compiled"), default=0.0)
    print(f"\ncompiled images/s: {best:.1f} (goal on one H100/H200: >= 900)")
    print("gpu_check: " + ("all checks passed" if not failures else f"{len(failures)} problem(s): " + "; ".join(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
