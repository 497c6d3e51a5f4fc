"""``torch.compile`` for a weight-sharing supernet: one static graph per block spec, eager on any failure.

Compiling the whole supernet (``torch.compile(net)``) does not hold up: its graph changes with
every sampled architecture, so dynamo recompiles for nearly every step, turns on automatic
dynamic shapes after a few recompiles, and Inductor then fails on symbolic shapes (seen on CPU
with the demo space: 64 recompiles, then ``InductorError: TypeError: cannot determine truth
value of Relational``), which killed the run.

:class:`CompiledSupernet` compiles at the level where the graph *is* static: the block. A
supernet forward is a sequence of units; for an architecture, unit ``i`` runs the static block
of one :class:`~search_spaces.BlockSpec` on slices of the unit's full weights
(:meth:`~supernet.elastic.ElasticUnit.state_for`). The slicing stays eager (views, whose custom
backward adds into the full gradients); the block's computation, ``functional_call(block,
sliced weights, x)``, is compiled once per spec key with ``dynamic=False``, so every graph has
fixed shapes. A space has a bounded set of specs (91 for ``efficientformer_v2_demo`` at 32 px,
1239 for ``efficientformer_v2`` at 224), and blocks of the same spec at different depths share
one graph. Each spec gets its own copy of the runner's code object, so dynamo keeps exactly
one cache entry per spec: no recompile limit is reached and no guard list is scanned.

Bounds: at most ``max_graphs`` compiled specs (least recently used dropped), and at most
``compiles_per_step`` new compilations between two :meth:`CompiledSupernet.begin_step` calls;
blocks over the budget run eagerly and compile in a later step, so no step stalls for long.

Failures never stop training. A spec is compiled on a probe copy of its real inputs (same
shapes, strides, dtypes and ``requires_grad``), forward and backward, so a failure of dynamo,
AOTAutograd, Inductor or the C++/Triton toolchain surfaces there, before any weight, gradient
or BN statistic is touched. It is caught: one warning names the error, that spec runs eagerly
from then on, and after ``max_failures`` failures nothing more is compiled. A failure in a real
forward call (not expected after a probe) is caught the same way and the call is rerun eagerly.

The eager path is :meth:`ElasticUnit.forward <supernet.elastic.ElasticUnit.forward>` itself, so
without compilation the numbers are those of ``Supernet.forward``; compiled blocks agree with
them to float rounding (Inductor fuses and reorders operations).
"""
from __future__ import annotations

import logging
import time
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.func import functional_call

from search_spaces import ArchConfig, BlockSpec

from .blocks import build_block
from .elastic import ElasticUnit, Supernet

__all__ = ["CompiledSupernet", "CompileStats", "dynamo_counters"]

logger = logging.getLogger(__name__)

BlockFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class CompileStats:
    """What :class:`CompiledSupernet` did so far.

    Attributes:
        graphs: specs compiled successfully (each one static graph, forward and backward).
        failures: specs whose compilation failed (they run eagerly).
        compile_seconds: wall time spent compiling (the probe runs included).
        compiled_calls: block calls that ran a compiled graph.
        eager_calls: block calls that ran eagerly (over budget, failed, or compilation off).
        evicted: compiled specs dropped to stay within ``max_graphs``.
        first_error: the first failure, as ``ExceptionType: message`` (first line).
        failed_specs: keys of the specs that failed.
        recompiles: graphs dynamo compiled beyond one per compiled spec (guard failures, graph
            breaks), as of the last :meth:`CompiledSupernet.update_counts`; 0 when all is well.
    """

    graphs: int = 0
    failures: int = 0
    compile_seconds: float = 0.0
    compiled_calls: int = 0
    eager_calls: int = 0
    evicted: int = 0
    first_error: str = ""
    failed_specs: set[str] = field(default_factory=set)
    recompiles: int = 0

    @property
    def compiled_fraction(self) -> float:
        """Share of block calls that ran compiled, in [0, 1]."""
        return self.compiled_calls / max(1, self.compiled_calls + self.eager_calls)

    def summary(self) -> str:
        """One line for the log."""
        text = (f"{self.graphs} block graphs compiled in {self.compile_seconds:.1f} s, {self.recompiles} "
                f"recompiles, {100 * self.compiled_fraction:.0f}% of block calls compiled")
        if self.failures:
            text += f", {self.failures} compile failures (first: {self.first_error})"
        return text


def dynamo_counters() -> dict[str, int]:
    """Dynamo's own counts since the process started (``torch._dynamo.utils.counters``):
    ``unique_graphs`` (graphs compiled, recompilations included) and ``graph_breaks``."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def _runner(template: nn.Module, name: str) -> BlockFn:
    """``functional_call(template, state, x)`` as a function with a code object of its own.

    Dynamo caches compiled frames on the code object; a fresh code object per spec gives each
    spec its own cache (one entry), instead of all specs queuing on one shared code object.
    """
    def run(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(template, state, (x,), tie_weights=False, strict=True)

    code = run.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, run.__globals__, name, run.__defaults__, run.__closure__)


def _like(t: torch.Tensor) -> torch.Tensor:
    """A detached copy with the same type, shape, strides, dtype, device and ``requires_grad``.

    The same type matters: dynamo guards on it, and an unsliced weight reaches the block as the
    ``nn.Parameter`` itself, a slice as a plain tensor.
    """
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t.detach())
    if isinstance(t, nn.Parameter):
        return nn.Parameter(out, requires_grad=t.requires_grad)
    return out.requires_grad_(t.requires_grad)


class CompiledSupernet:
    """``forward(x, arch)`` of a :class:`Supernet`, with each block spec compiled to one static graph.

    Args:
        net: the supernet (its weights are used, never copied).
        backend: the ``torch.compile`` backend (``inductor``; any other registered name).
        mode: the ``torch.compile`` mode (``None``: the default; CUDA graphs are not used, since
            thousands of small graphs would each keep their own memory pool).
        max_graphs: most compiled specs kept (least recently used dropped beyond it).
        compiles_per_step: most new compilations between two :meth:`begin_step` calls.
        max_failures: after this many failed specs, compile nothing more.

    ``forward`` is meant for training steps (``net.train()``); evaluation goes through
    extracted static subnets, as before.
    """

    def __init__(self, net: Supernet, *, backend: str = "inductor", mode: str | None = None,
                 max_graphs: int = 2048, compiles_per_step: int = 16, max_failures: int = 3) -> None:
        self.net = net
        self.backend, self.mode = backend, mode
        self.max_graphs, self.compiles_per_step, self.max_failures = max_graphs, compiles_per_step, max_failures
        self.stats = CompileStats()
        self._graphs: OrderedDict[str, BlockFn] = OrderedDict()
        self._budget = compiles_per_step
        self._given_up = False
        self._graphs_before = dynamo_counters()["unique_graphs"]

    def update_counts(self) -> CompileStats:
        """Refresh ``stats.recompiles`` from dynamo's counters and return the stats."""
        graphs = dynamo_counters()["unique_graphs"] - self._graphs_before
        self.stats.recompiles = max(0, graphs - self.stats.graphs - self.stats.failures)
        return self.stats

    @property
    def active(self) -> bool:
        """Whether new specs are still compiled (false after ``max_failures`` failures)."""
        return not self._given_up

    def begin_step(self) -> None:
        """Start a training step: refill the budget of new compilations."""
        self._budget = self.compiles_per_step

    def __call__(self, x: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
        return self.forward(x, arch)

    def forward(self, x: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of ``arch`` (a config of the supernet's space) for ``x`` ``(B, C, H, W)``."""
        net = self.net
        for unit, spec in net.units_for(arch):
            x = self._block(unit, spec, x)
        return x

    def _block(self, unit: ElasticUnit, spec: BlockSpec, x: torch.Tensor) -> torch.Tensor:
        if unit.distilled:  # a head returning both its outputs runs eagerly (graphs hold the averaged head)
            self.stats.eager_calls += 1
            return unit(x, spec)
        fn = self._graphs.get(spec.key)
        if fn is not None:
            self._graphs.move_to_end(spec.key)
        elif self._can_compile(spec):
            fn = self._compile(unit, spec, x)
        if fn is None:
            self.stats.eager_calls += 1
            return unit(x, spec)
        state = unit.state_for(spec)
        try:
            out = fn(state, x)
        except torch.OutOfMemoryError:
            raise  # not the compiler's failure: eager would need the memory too
        except Exception as exc:  # a compiler failure must never stop training: rerun this block eagerly
            self._failed(spec, exc)
            self.stats.eager_calls += 1
            return unit(x, spec)
        self.stats.compiled_calls += 1
        return out

    def _can_compile(self, spec: BlockSpec) -> bool:
        return not self._given_up and self._budget > 0 and spec.key not in self.stats.failed_specs

    def _compile(self, unit: ElasticUnit, spec: BlockSpec, x: torch.Tensor) -> BlockFn | None:
        """Compile ``spec``'s block and run it once on a probe copy of the inputs (forward and backward)."""
        self._budget -= 1
        t0 = time.perf_counter()
        with torch.device("meta"):
            template = build_block(spec)
        template.train(unit.training)
        raw = _runner(template, f"block_{len(self._graphs) + self.stats.evicted + self.stats.failures}")
        try:
            fn = torch.compile(raw, backend=self.backend, mode=self.mode, dynamic=False)
            state = {k: _like(v) for k, v in unit.state_for(spec).items()}
            out = fn(state, _like(x))
            inputs = [t for t in state.values() if t.requires_grad]
            if out.requires_grad and inputs:
                torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)
        except torch.OutOfMemoryError:  # the probe's copies did not fit: run eagerly now, try again later
            self.stats.compile_seconds += time.perf_counter() - t0
            logger.debug("no memory to probe %s; it runs eagerly this time", spec.key)
            return None
        except Exception as exc:  # dynamo, AOTAutograd, Inductor or toolchain: run this spec eagerly
            self.stats.compile_seconds += time.perf_counter() - t0
            self._failed(spec, exc)
            return None
        self.stats.compile_seconds += time.perf_counter() - t0
        self.stats.graphs += 1
        self._graphs[spec.key] = fn
        if len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.stats.evicted += 1
        logger.debug("compiled %s in %.2f s", spec.key, time.perf_counter() - t0)
        return fn

    def _failed(self, spec: BlockSpec, exc: Exception) -> None:
        self._graphs.pop(spec.key, None)
        self.stats.failed_specs.add(spec.key)
        self.stats.failures += 1
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        if self.stats.failures >= self.max_failures:
            self._given_up = True
        if self.stats.failures == 1:  # the one warning; later failures are counted in the summary
            self.stats.first_error = message
            rest = ("every block runs eagerly from now on" if self._given_up else
                    f"that block runs eagerly, and compilation stops after {self.max_failures} failures")
            logger.warning("torch.compile failed (%s); training continues: %s", message, rest)
        else:
            logger.debug("torch.compile failed for %s: %s", spec.key, message)
            if self._given_up and self.stats.failures == self.max_failures:
                logger.info("compilation stopped after %d failed block specs; the rest of the run is eager",
                            self.max_failures)
