"""``gumbel``: EfficientFormer's latency-driven slimming (section 4 of the V1 paper) as a strategy.

The relaxation itself lives in :mod:`nas.gumbel`; this module feeds it what a search has:
the supernet and its training split (from the accuracy evaluator), each budgeted device's LUT
(expected latency from the calibrated block figures), the parameter and MAC counts of the op
traces, and the budgets. The discretised architecture, and every architecture on the way from
the most probable one to it, get a real evaluation, so the written figures are like every other
strategy's: proxy accuracy on the validation images, exact counts, LUT latency.
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable

from search_spaces import ArchConfig
from search_spaces.errors import NasUserError

from ..search import Progress, Scorer, SearchOutcome, SearchSettings, best_feasible, register_strategy

if TYPE_CHECKING:
    import torch
    from optuna.storages import BaseStorage

    from search_spaces import BlockSpec, LoweringSetup, SearchSpace
    from supernet.data import DatasetSplits

__all__ = ["GumbelStrategy"]

logger = logging.getLogger(__name__)


@register_strategy("gumbel")
class GumbelStrategy:
    """Gumbel-softmax relaxation over meta-paths, widths and expansions, trained against the budgets."""

    name = "gumbel"
    uses_study = False

    @staticmethod
    def check(space: SearchSpace) -> None:
        """Refuse, before anything is written, a space this strategy does not slim."""
        if space.family != "efficientformer":
            raise NasUserError(f"--strategy gumbel is EfficientFormer (V1)'s latency-driven slimming: it runs on "
                               f"the efficientformer spaces, not on a {space.family!r} space; use --strategy slim")

    def run(self, scorer: Scorer, settings: SearchSettings, *, progress: Progress | None = None,
            storage: BaseStorage | None = None) -> SearchOutcome:
        from ..gumbel import GumbelSettings, gumbel_slim

        t0 = time.perf_counter()
        net, splits = _supernet_and_data(scorer)
        costs, budgets, setup = _costs(scorer)
        gs = GumbelSettings(steps=settings.gumbel_steps, batch_size=settings.gumbel_batch_size,
                            lr=settings.gumbel_lr, penalty=settings.gumbel_penalty, seed=settings.seed)
        say = progress or logger.info
        say(f"gumbel: {gs.steps} steps of the architecture logits against "
            + ", ".join(f"{n} <= {v:g}" for n, v in budgets.items()))
        result = gumbel_slim(net, _batches(splits, gs.batch_size, settings.seed), costs=costs, budgets=budgets,
                             violations=lambda arch: scorer.with_accuracy(arch, math.nan).violations,
                             settings=gs, setup=setup, progress=progress)
        path = []
        for i, row in enumerate(result.path):   # real evaluations of the discretisation path
            last = i == len(result.path) - 1
            arch = scorer.space.check(result.arch if last else ArchConfig.from_string(str(row["arch"])))
            cand = scorer(arch)
            path.append({"step": i, "action": str(row["move"]), **cand.row()})
            say(f"gumbel {row['move']}: acc {cand.accuracy:.4f}, {scorer.primary} "
                f"{cand.latency_ms[scorer.primary]:.3f} ms, {cand.params / 1e6:.3f}M params"
                + (" (feasible)" if cand.feasible else ""))
        cands = list(scorer.seen.values())
        last = result.history[-1] if result.history else {}
        stats: dict[str, float | int | str | None] = {
            "mode": "gumbel", "gumbel_steps": gs.steps, "discretisation_moves": len(result.path) - 1,
            "final_task_loss": last.get("task_loss"),
            **{k: v for k, v in last.items() if k.startswith("expected[")},
        }
        return SearchOutcome(cands, best_feasible(cands, scorer.primary), path, time.perf_counter() - t0,
                             stats=stats)


def _supernet_and_data(scorer: Scorer) -> tuple[Any, DatasetSplits]:
    net, splits = getattr(scorer.accuracy, "net", None), getattr(scorer.accuracy, "splits", None)
    if net is None or splits is None:
        raise NasUserError("--strategy gumbel trains architecture logits through the supernet: it needs the "
                           "supernet's accuracy evaluator (nas-search provides it)")
    GumbelStrategy.check(net.space)
    return net, splits


def _costs(scorer: Scorer) -> tuple[dict[str, Callable[[BlockSpec], float]], dict[str, float], LoweringSetup]:
    """Per budget, ``spec -> cost of one block`` (calibrated LUT milliseconds, params, MACs) and its limit;
    and the setup the blocks are lowered with (the primary LUT's: the deployment the budgets are for)."""
    from latency.predict import block_ms
    from search_spaces.kinds import trace

    costs: dict[str, Callable[[BlockSpec], float]] = {}
    budgets: dict[str, float] = {}
    for device, limit in scorer.budgets.latency_ms.items():
        lut = scorer.latency[device].table
        if lut is None:
            raise NasUserError(f"--strategy gumbel needs the LUT of {device!r} (its block figures)")
        offset = lut.calibration.offset_ms   # per inference: the budget on the block sum is what remains
        costs[f"latency:{device}"] = lambda spec, lut=lut: block_ms(spec, lut)
        budgets[f"latency:{device}"] = max(limit - offset, 1e-6)
    if scorer.budgets.max_params is not None:
        costs["params"] = lambda spec: float(trace(spec).params)
        budgets["params"] = float(scorer.budgets.max_params)
    if scorer.budgets.max_macs is not None:
        costs["macs"] = lambda spec: float(trace(spec).macs)
        budgets["macs"] = float(scorer.budgets.max_macs)
    if not budgets:
        raise NasUserError("--strategy gumbel slims against budgets: give --latency, --max-params or --max-macs")
    primary = scorer.latency[scorer.primary].table
    if primary is None:
        raise NasUserError(f"--strategy gumbel needs the LUT of {scorer.primary!r}")
    return costs, budgets, primary.setup


def _batches(splits: DatasetSplits, batch_size: int, seed: int
             ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``step -> (images, labels)``: the training split in a seeded order, epoch after epoch."""
    from supernet.data import make_loader

    state: dict[str, Any] = {"epoch": -1, "it": iter(())}

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            try:
                return next(state["it"])
            except StopIteration:
                state["epoch"] += 1
                state["it"] = iter(make_loader(splits.train, batch_size=batch_size, shuffle=True, seed=seed,
                                               epoch=state["epoch"], drop_last=True))
        raise NasUserError(f"the training split has fewer than {batch_size} images: one Gumbel batch")
    return get
