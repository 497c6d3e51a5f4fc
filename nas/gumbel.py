"""Latency-driven slimming with a Gumbel-softmax relaxation (EfficientFormer, section 4).

The EfficientFormer (V1) paper slims its supernet by learning how much each meta-path matters:
every block slot chooses between a Meta4D block, a Meta3D block (where the space allows one)
and the identity, every stage chooses its width, and the choices are relaxed with
Gumbel-softmax so that their logits train by gradient descent against the task loss plus a
latency term. This module does that on our weight-sharing supernet:

* :class:`ArchLogits` holds one categorical per choice: a width per stage, and per block slot
  its meta-path (``skip``, the plain mixer, the attention mixers) and its expansion ratio;
* each step samples a discrete architecture with the straight-through Gumbel-softmax estimator
  (hard in the forward pass, soft in the backward pass, as GDAS does), runs it through the
  supernet's shared weights (frozen; BN running statistics are restored afterwards), and
  scales every chosen unit's output by its straight-through weight (1 in the forward pass), so
  the task loss reaches the logits;
* the latency term is the **expected** latency of the relaxed choices on each budgeted device,
  summed from the LUT's calibrated block figures (:class:`CostTables`), and the parameter term
  the expected parameter count from the op traces; each enters as a squared hinge over its
  budget;
* after training, the most probable architecture is taken and, while it misses a budget, the
  single change of one choice that buys the most budget per unit of log-probability lost is
  applied (the paper's slimming of the least important paths); then, while a change towards a
  larger network keeps every budget, the most probable such change is applied, so a loose
  budget is not left unused. Every step is checked against the budgets with the exact LUT and
  counts.

The expected costs are exact for one-hot choices (every space config, encoded with its blocks
in the leading slots). Approximations under spread-out probabilities, stated: an attention
block takes tokens with the probability that the slot before it holds an attention block
(else it flattens the map itself), and the head takes tokens with the probability that any
slot of the last stage is an attention block.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from search_spaces import ArchConfig, BlockConfig, LoweringSetup, SearchSpace, StageConfig
from search_spaces.errors import NasUserError

from .gumbel_costs import SKIP, CostTables, cost_tables

if TYPE_CHECKING:
    from supernet.elastic import Supernet

__all__ = ["SKIP", "ArchLogits", "Choices", "CostTables", "GumbelSettings", "GumbelResult", "cost_tables", "gumbel_slim"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choices:
    """One index per categorical: per stage its width, and per slot its meta-path and expansion."""

    widths: tuple[int, ...]
    ops: tuple[tuple[int, ...], ...]
    expansions: tuple[tuple[int, ...], ...]


class ArchLogits(nn.Module):
    """The architecture parameters of a space: one logit vector per choice.

    Args:
        space: the search space (EfficientFormer families: stages of plain blocks whose last
            ``n`` may be attention blocks).

    Attributes:
        ops: per stage, the meta-paths a slot can take: ``skip``, the plain mixer, then the
            attention mixers of the stage.
    """

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        self.ops = [[SKIP, ch.plain_mixer, *ch.attn_mixers] for ch in space.stages]
        self.width_logits = nn.ParameterList(nn.Parameter(torch.zeros(len(ch.widths))) for ch in space.stages)
        self.op_logits = nn.ParameterList(nn.Parameter(torch.zeros(ch.depths[-1], len(ops)))
                                          for ch, ops in zip(space.stages, self.ops))
        self.exp_logits = nn.ParameterList(nn.Parameter(torch.zeros(ch.depths[-1], len(ch.expansions)))
                                           for ch in space.stages)
        # the first `smallest depth` slots of a stage always hold a block: their skip is masked out
        self._masks = [torch.zeros(ch.depths[-1], len(ops)) for ch, ops in zip(space.stages, self.ops)]
        for ch, mask in zip(space.stages, self._masks):
            mask[: ch.depths[0], 0] = -math.inf
        with torch.no_grad():  # start from the supernet's largest config being the most probable
            for w, e in zip(self.width_logits, self.exp_logits):
                w[-1] += 1.0
                e[:, -1] += 1.0
            for o in self.op_logits:
                o[:, 1] += 1.0

    def probabilities(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Softmax of every logit vector: ``(widths, ops, expansions)``, one tensor per stage."""
        return ([w.softmax(-1) for w in self.width_logits], [o.softmax(-1) for o in self._op_logits()],
                [e.softmax(-1) for e in self.exp_logits])

    def _op_logits(self) -> list[torch.Tensor]:
        return [o + m for o, m in zip(self.op_logits, self._masks)]

    def sample(self, tau: float, gen: torch.Generator) -> tuple[Choices, dict[str, list[torch.Tensor]]]:
        """A hard Gumbel-softmax sample and the straight-through weight of each chosen option."""
        def draw(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            u = torch.rand(logits.shape, generator=gen).clamp_(1e-10, 1 - 1e-10)
            soft = ((logits - torch.log(-torch.log(u))) / tau).softmax(-1)
            index = soft.argmax(-1)
            hard = F.one_hot(index, soft.shape[-1]).to(soft.dtype)
            weight = (hard - soft.detach() + soft).gather(-1, index.unsqueeze(-1)).squeeze(-1)
            return index, weight

        widths, ops, exps = [], [], []
        weights: dict[str, list[torch.Tensor]] = {"widths": [], "ops": [], "expansions": []}
        for w, o, e in zip(self.width_logits, self._op_logits(), self.exp_logits):
            for logits, idx_out, key in ((w, widths, "widths"), (o, ops, "ops"), (e, exps, "expansions")):
                index, weight = draw(logits)
                idx_out.append(tuple(index.tolist()) if index.dim() else int(index))
                weights[key].append(weight)
        return Choices(tuple(widths), tuple(ops), tuple(exps)), weights

    def most_probable(self) -> Choices:
        return Choices(tuple(int(w.argmax()) for w in self.width_logits),
                       tuple(tuple(o.argmax(-1).tolist()) for o in self._op_logits()),
                       tuple(tuple(e.argmax(-1).tolist()) for e in self.exp_logits))

    def log_prob(self, c: Choices) -> float:
        """Log-probability of ``c`` under the independent categoricals."""
        total = 0.0
        with torch.no_grad():
            for si, (w, o, e) in enumerate(zip(self.width_logits, self._op_logits(), self.exp_logits)):
                total += float(w.log_softmax(-1)[c.widths[si]])
                rows = torch.arange(o.shape[0])
                total += float(o.log_softmax(-1)[rows, torch.tensor(c.ops[si])].sum())
                total += float(e.log_softmax(-1)[rows, torch.tensor(c.expansions[si])].sum())
        return total

    def decode(self, c: Choices) -> tuple[ArchConfig, list[list[int]]]:
        """The architecture of ``c`` and, per stage, the slot each of its blocks came from.

        A stage keeps its non-skipped slots in order, plain blocks first and attention blocks
        last (the spaces put attention last), with at most ``max_attn`` attention blocks (the
        surplus becomes plain) and at least the smallest allowed depth (skipped slots are
        restored as plain blocks, most probable first).
        """
        stages, sources = [], []
        for si, ch in enumerate(self.space.stages):
            kept = [(j, self.ops[si][op]) for j, op in enumerate(c.ops[si]) if self.ops[si][op] != SKIP]
            while len(kept) not in ch.depths:
                if len(kept) > ch.depths[-1]:
                    kept = kept[:ch.depths[-1]]
                    continue
                free = [j for j in range(len(c.ops[si])) if j not in {k for k, _ in kept}]
                kept = sorted(kept + [(free[0], ch.plain_mixer)])
            plain = [(j, m) for j, m in kept if m == ch.plain_mixer]
            attn = [(j, m) for j, m in kept if m != ch.plain_mixer]
            allowed = ch.attn_range(len(kept))
            while len(attn) > allowed.stop - 1:
                j, _ = attn.pop(0)
                plain = sorted(plain + [(j, ch.plain_mixer)])
            order = plain + attn
            blocks = tuple(BlockConfig(m, ch.expansions[c.expansions[si][j]]) for j, m in order)
            stages.append(StageConfig(ch.widths[c.widths[si]], blocks))
            sources.append([j for j, _ in order])
        s = self.space
        arch = ArchConfig(s.family, tuple(stages), s.stem_stride, s.head_widths, s.head_dim)
        return s.check(arch), sources

    def moves(self, c: Choices, *, grow: bool = False) -> list[tuple[str, Choices]]:
        """Every single-choice change towards a smaller network: a narrower width, a slot skipped
        or turned from attention to plain, a lower expansion; with ``grow``, towards a larger one
        (the same changes the other way)."""
        out = []
        for si, ch in enumerate(self.space.stages):
            w_new = c.widths[si] + (1 if grow else -1)
            if 0 <= w_new < len(ch.widths):
                w = list(c.widths)
                w[si] = w_new
                out.append((f"s{si + 1}.width -> {ch.widths[w_new]}", Choices(tuple(w), c.ops, c.expansions)))
            for j, op in enumerate(c.ops[si]):
                lowest = 1 if j < ch.depths[0] else 0
                targets = range(op + 1, len(self.ops[si])) if grow else range(lowest, op)
                for new in targets:  # skip < plain < attention mixers
                    ops = [list(row) for row in c.ops]
                    ops[si][j] = new
                    out.append((f"s{si + 1}.slot {j + 1} {self.ops[si][op]} -> {self.ops[si][new]}",
                                Choices(c.widths, tuple(tuple(r) for r in ops), c.expansions)))
                e_new = c.expansions[si][j] + (1 if grow else -1)
                if 0 <= e_new < len(ch.expansions):
                    exps = [list(row) for row in c.expansions]
                    exps[si][j] = e_new
                    out.append((f"s{si + 1}.slot {j + 1} expansion -> {ch.expansions[e_new]}",
                                Choices(c.widths, c.ops, tuple(tuple(r) for r in exps))))
        return out




# ================================================================================== training
@dataclass(frozen=True)
class GumbelSettings:
    """Settings of the relaxed search.

    Args:
        steps: optimisation steps of the architecture logits.
        batch_size: training images per step.
        lr: Adam learning rate of the logits.
        tau: Gumbel-softmax temperature at the first and the last step (annealed geometrically).
        penalty: weight of each budget's hinge ``max(0, expected / budget - 1)`` in the loss.
        seed: seed of the Gumbel noise and of the batch order.
    """

    steps: int = 120
    batch_size: int = 64
    lr: float = 0.05
    tau: tuple[float, float] = (4.0, 0.5)
    penalty: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise NasUserError(f"--gumbel-steps and the batch size must be >= 1, got {self.steps}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.penalty >= 0 and math.isfinite(self.penalty)):
            raise NasUserError(f"the logits' lr must be > 0 and the penalty >= 0, got {self.lr}, {self.penalty}")
        if not all(t > 0 and math.isfinite(t) for t in self.tau):
            raise NasUserError(f"Gumbel temperatures must be positive, got {self.tau}")


@dataclass
class GumbelResult:
    """The relaxed search's outcome.

    Attributes:
        arch: the discretised architecture (every budget checked with the exact LUT figures).
        choices: its choice indices.
        feasible: whether ``arch`` meets every budget.
        history: per logged step: loss, task loss, expected cost per budget, temperature.
        path: the discretisation: the most probable architecture, then each slimming move.
        logits: the trained architecture logits.
    """

    arch: ArchConfig
    choices: Choices
    feasible: bool
    history: list[dict[str, float]] = field(default_factory=list)
    path: list[dict[str, object]] = field(default_factory=list)
    logits: ArchLogits | None = None


def relaxed_forward(net: Supernet, arch: ArchConfig, sources: list[list[int]], weights: dict[str, list[torch.Tensor]],
                    choices: Choices, ops: list[list[str]], x: torch.Tensor) -> torch.Tensor:
    """The supernet's forward pass of ``arch``, each chosen unit scaled by its straight-through weight."""
    pairs = net.units_for(arch)
    last_of_stage = {spec.stage: i for i, (_, spec) in enumerate(pairs) if spec.stage > 0 and spec.slot >= 0}
    for i, (unit, spec) in enumerate(pairs):
        x = unit(x, spec)
        s = spec.stage - 1  # the architecture's stage index (EfficientFormer families)
        if spec.stage == 0:
            x = x * weights["widths"][0]
        elif spec.slot < 0 and 0 < s < len(sources):
            x = x * weights["widths"][s]
        elif spec.slot >= 0:
            j = sources[s][spec.slot]
            x = x * weights["ops"][s][j] * weights["expansions"][s][j]
        if spec.slot >= 0 and last_of_stage.get(spec.stage) == i:
            for j, op in enumerate(choices.ops[s]):
                if ops[s][op] == SKIP and j not in sources[s]:
                    x = x * weights["ops"][s][j]
    return x


def _train_logits(net: Supernet, logits: ArchLogits, tables: Mapping[str, CostTables], budgets: Mapping[str, float],
                  batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]], settings: GumbelSettings,
                  progress: Callable[[str], None] | None) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(logits.parameters(), lr=settings.lr)
    t0, t1 = settings.tau
    history = []
    for step in range(settings.steps):
        tau = t0 * (t1 / t0) ** (step / max(1, settings.steps - 1))
        choices, weights = logits.sample(tau, gen)
        arch, sources = logits.decode(choices)
        x, y = batches(step)
        task = F.cross_entropy(relaxed_forward(net, arch, sources, weights, choices, logits.ops, x), y)
        expected = {name: tables[name].expected(logits) for name in budgets}
        penalty = sum((F.relu(expected[n] / b - 1) for n, b in budgets.items()), torch.zeros(()))
        loss = task + settings.penalty * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == settings.steps - 1:
            row = {"step": step, "loss": float(loss.detach()), "task_loss": float(task.detach()), "tau": tau,
                   **{f"expected[{n}]": float(v.detach()) for n, v in expected.items()}}
            history.append(row)
            msg = (f"gumbel step {step}: loss {row['loss']:.4f} (task {row['task_loss']:.4f}), "
                   + ", ".join(f"E[{n}] {float(v.detach()):.4g} (budget {budgets[n]:.4g})" for n, v in expected.items()))
            (progress or logger.info)(msg)
    return history


def _discretise(logits: ArchLogits, violations: Callable[[ArchConfig], Mapping[str, float]],
                progress: Callable[[str], None] | None) -> tuple[ArchConfig, Choices, bool, list[dict[str, object]]]:
    """The most probable architecture, then greedy single-choice moves until every budget is met."""
    choices = logits.most_probable()
    arch, _ = logits.decode(choices)

    def excess(v: Mapping[str, float]) -> float:
        return sum(max(0.0, x) for x in v.values())

    current = excess(violations(arch))
    path: list[dict[str, object]] = [{"step": 0, "move": "most probable", "arch": arch.to_string(), "excess": current,
                                      "log_prob": logits.log_prob(choices)}]
    while current > 0:
        lp = logits.log_prob(choices)
        best, best_score = None, -math.inf
        for name, cand in logits.moves(choices):
            cand_arch, _ = logits.decode(cand)
            gain = current - excess(violations(cand_arch))
            if gain <= 0:
                continue
            score = gain / (lp - logits.log_prob(cand) + 1e-6)
            if score > best_score:
                best, best_score = (name, cand, cand_arch), score
        if best is None:
            break
        name, choices, arch = best
        current = excess(violations(arch))
        path.append({"step": len(path), "move": name, "arch": arch.to_string(), "excess": current,
                     "log_prob": logits.log_prob(choices)})
        (progress or logger.info)(f"gumbel discretise: {name} -> over budget by {current:.4f}")
    if current <= 0:
        arch, choices = _fill(logits, violations, arch, choices, path, progress)
    return arch, choices, current <= 0, path


def _fill(logits: ArchLogits, violations: Callable[[ArchConfig], Mapping[str, float]], arch: ArchConfig,
          choices: Choices, path: list[dict[str, object]], progress: Callable[[str], None] | None
          ) -> tuple[ArchConfig, Choices]:
    """Spend what the budgets leave: while a change towards a larger network keeps every budget,
    apply the one the logits rate most probable.

    The hinge only pushes down, and the most probable choice of each independent categorical can
    land well under the budgets; left there, a loose budget would go unused.
    """
    seen = {arch.hash}
    while True:
        best, best_lp = None, -math.inf
        for name, cand in logits.moves(choices, grow=True):
            cand_arch, _ = logits.decode(cand)
            if cand_arch.hash in seen or any(v > 0 for v in violations(cand_arch).values()):
                continue
            lp = logits.log_prob(cand)
            if lp > best_lp:
                best, best_lp = (name, cand, cand_arch), lp
        if best is None:
            return arch, choices
        name, choices, arch = best
        seen.add(arch.hash)
        path.append({"step": len(path), "move": f"fill: {name}", "arch": arch.to_string(), "excess": 0.0,
                     "log_prob": best_lp})
        (progress or logger.info)(f"gumbel fill: {name} (within every budget)")


def gumbel_slim(net: Supernet, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *,
                costs: Mapping[str, Callable[[object], float]], budgets: Mapping[str, float],
                violations: Callable[[ArchConfig], Mapping[str, float]], settings: GumbelSettings = GumbelSettings(),
                setup: LoweringSetup | None = None, progress: Callable[[str], None] | None = None) -> GumbelResult:
    """Learn the architecture logits of ``net``'s space, then discretise within the budgets.

    Args:
        net: a trained supernet of an EfficientFormer family; its weights are not changed (they
            are frozen for the search and its BN running statistics are restored afterwards).
        batches: ``step -> (images, labels)`` training batches.
        costs: per budget name, ``spec -> cost`` of one block (a device's calibrated LUT
            milliseconds, or its parameter count).
        budgets: per budget name, the limit the expected cost is pushed under.
        violations: ``arch -> relative excess per budget`` (``> 0`` is over), from the exact LUT
            predictions and counts, for the discretisation.
        settings: see :class:`GumbelSettings`.
        setup: the setup the costs are for (a LUT's; default: the supernet's own).
        progress: receives one line per logged step.

    Raises:
        NasUserError: the space is not of an EfficientFormer family.
    """
    if net.space.family not in ("efficientformer", "efficientformer_v2"):
        raise NasUserError(f"--strategy gumbel needs an EfficientFormer space, not {net.space.family!r}")
    logits = ArchLogits(net.space)
    tables = cost_tables(logits, setup or net.setup, costs)
    buffers = {k: v.detach().clone() for k, v in net.named_buffers()}
    grad_flags = [p.requires_grad for p in net.parameters()]
    was_training = net.training
    try:
        for p in net.parameters():
            p.requires_grad_(False)
        net.train()
        history = _train_logits(net, logits, tables, budgets, batches, settings, progress)
    finally:
        for p, flag in zip(net.parameters(), grad_flags):
            p.requires_grad_(flag)
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(buffers[k])
        net.train(was_training)
    arch, choices, feasible, path = _discretise(logits, violations, progress)
    return GumbelResult(arch, choices, feasible, history, path, logits)
