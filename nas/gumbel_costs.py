"""Expected costs of relaxed architecture choices (:mod:`nas.gumbel`): per-choice cost tables.

Every unit choice of an EfficientFormer-family space (the stem at each width, each stage entry
for each pair of widths, each slot at each width, meta-path and expansion, and the head) is
lowered once through the family's piecewise lowering, its cost summed, and kept in tensors; the
expected cost under the categoricals' probabilities is then a few small tensor contractions,
differentiable in the logits. For one-hot choices it equals the cost of the architecture exactly.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from search_spaces import ArchConfig, BlockConfig, StageConfig
from search_spaces.lowering import Carry, get_family
from search_spaces.space import StageChoices

if TYPE_CHECKING:
    from .gumbel import ArchLogits

__all__ = ["CostTables", "cost_tables"]

#: the meta-path of a slot that holds no block
SKIP = "skip"


@dataclass
class CostTables:
    """Per-choice unit costs of a space at a setup, for one cost (a device's latency or parameters).

    ``stem[w]``: the stem at stage 1's width ``w``; ``entry[i][u, w]``: stage ``i``'s entry from
    width ``u`` to ``w`` (empty for stage 0); ``blocks[i][j, w, o, e]``: slot ``j`` of stage ``i``
    at width ``w`` with meta-path ``o`` and expansion ``e`` (0 for ``skip``), when the block
    before it is not an attention block (an attention block then turns the map into tokens),
    and ``blocks_after_attn`` the same after an attention block (it takes tokens); ``head[w, t]``:
    the head at the last width, ``t`` = 1 after attention (tokens); ``offset``: a constant.
    """

    stem: torch.Tensor
    entry: list[torch.Tensor]
    blocks: list[torch.Tensor]
    head: torch.Tensor
    offset: float = 0.0
    blocks_after_attn: list[torch.Tensor] | None = None

    def expected(self, logits: ArchLogits) -> torch.Tensor:
        """The cost's expectation under the categoricals' probabilities (differentiable)."""
        pw, po, pe = logits.probabilities()
        total = self.stem @ pw[0] + self.offset
        for i in range(1, len(pw)):
            total = total + pw[i - 1] @ self.entry[i] @ pw[i]
        for i in range(len(pw)):
            blocks = self.blocks[i]
            if self.blocks_after_attn is not None and blocks.shape[0] > 1:
                # a slot's input is tokens when the slot before it holds an attention block
                p_prev = torch.cat([torch.zeros(1), po[i][:-1, 2:].sum(-1)]).view(-1, 1, 1, 1)
                blocks = blocks * (1 - p_prev) + self.blocks_after_attn[i] * p_prev
            total = total + torch.einsum("w,jo,je,jwoe->", pw[i], po[i], pe[i], blocks)
        last = len(pw) - 1
        attn = po[last][:, 2:].sum(-1)
        p_tokens = 1 - torch.prod(1 - attn) if attn.numel() else torch.zeros(())
        head = self.head[:, 0] * (1 - p_tokens) + self.head[:, 1] * p_tokens
        return total + head @ pw[last]


def cost_tables(logits: ArchLogits, setup: object, costs: Mapping[str, Callable[[object], float]]
                ) -> dict[str, CostTables]:
    """One :class:`CostTables` per named cost (``spec -> cost``), built by lowering every unit
    choice of the space through its family's piecewise lowering."""
    space = logits.space
    family = get_family(space.family)
    base = space.smallest()
    hw_in = [family.stem(base, setup)[1].hw]  # map size entering each stage (widths do not change it)
    carry = family.stem(base, setup)[1]
    for si in range(len(base.stages)):
        carry = family.stage(base, si, carry, setup)[1]
        hw_in.append(carry.hw)

    def with_stage(si: int, width: int, blocks: tuple[BlockConfig, ...], prev: int | None = None) -> ArchConfig:
        arch = base.replace_stage(si, StageConfig(width, blocks or base.stages[si].blocks))
        if prev is not None:
            arch = arch.replace_stage(si - 1, StageConfig(prev, base.stages[si - 1].blocks))
        return arch

    stem = [family.stem(with_stage(0, w, ()), setup)[0] for w in space.stages[0].widths]
    entries: list[dict[tuple[int, int], tuple]] = []
    blocks: list[dict[tuple[int, int, int, int], object]] = []
    blocks_tok: list[dict[tuple[int, int, int, int], object]] = []
    for si, ch in enumerate(space.stages):
        ent, blk, tok = {}, {}, {}
        for (ui, u), (wi, w) in itertools.product(enumerate(space.stages[si - 1].widths if si else (None,)),
                                                  enumerate(ch.widths)):
            if si:
                ent[ui, wi] = family.entry(with_stage(si, w, (), prev=u), si, Carry(hw_in[si], u), setup)[0]
        after = family.entry(with_stage(si, ch.widths[0], ()), si, Carry(hw_in[si], space.stages[si - 1].widths[0]
                                                                         if si else ch.widths[0]), setup)[1].hw
        for j, (wi, w), (oi, op), (ei, e) in itertools.product(range(ch.depths[-1]), enumerate(ch.widths),
                                                               enumerate(logits.ops[si]), enumerate(ch.expansions)):
            if op == SKIP:
                continue
            attn = op != ch.plain_mixer
            arch = with_stage(si, w, (BlockConfig(op, e),) * (j + 1))
            blk[j, wi, oi, ei] = family.block(arch, si, j, Carry(after, w, False), setup)[0]
            tok[j, wi, oi, ei] = (family.block(arch, si, j, Carry(after, w, True), setup)[0]
                                  if attn and j > 0 else blk[j, wi, oi, ei])
        entries.append(ent)
        blocks.append(blk)
        blocks_tok.append(tok)
    last = space.stages[-1]
    heads = {}
    for (wi, w), t in itertools.product(enumerate(last.widths), (False, True)):
        heads[wi, int(t)] = family.head(with_stage(len(base.stages) - 1, w, ()), Carry(hw_in[-1], w, t), setup)
    out = {}
    for name, cost in costs.items():
        def total(specs: Sequence[object]) -> float:
            return float(sum(cost(s) for s in specs))

        ent_t = [torch.zeros(0)] + [
            torch.tensor([[total(entries[si][ui, wi]) for wi in range(len(ch.widths))]
                          for ui in range(len(space.stages[si - 1].widths))])
            for si, ch in enumerate(space.stages) if si]
        def table(si: int, ch: StageChoices, specs: dict[tuple[int, int, int, int], object]) -> torch.Tensor:
            t = torch.zeros(ch.depths[-1], len(ch.widths), len(logits.ops[si]), len(ch.expansions))
            for (j, wi, oi, ei), spec in specs.items():
                t[j, wi, oi, ei] = cost(spec)
            return t

        blk_t = [table(si, ch, blocks[si]) for si, ch in enumerate(space.stages)]
        tok_t = [table(si, ch, blocks_tok[si]) for si, ch in enumerate(space.stages)]
        head_t = torch.tensor([[total(heads[wi, t]) for t in (0, 1)] for wi in range(len(last.widths))])
        out[name] = CostTables(torch.tensor([total(s) for s in stem]), ent_t, blk_t, head_t,
                               blocks_after_attn=tok_t)
    return out
