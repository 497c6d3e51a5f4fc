"""``slim``: EfficientFormerV2's greedy joint slimming (section 3.3 of the paper).

From the largest config, every step evaluates the slimming actions (narrower stage, fewer
blocks, lower expansion, attention to FFN, softmax to linear attention) and takes the one with
the smallest accuracy drop per gain in MES, until every budget is met, then ``extra_steps``
further to trace the path.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from ..search import Candidate, Progress, Scorer, SearchOutcome, SearchSettings, best_feasible, register_strategy

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from search_spaces import SlimAction

__all__ = ["SlimStrategy"]

logger = logging.getLogger(__name__)


def step_message(step: int, name: str, current: Candidate, primary: str) -> str:
    """The progress line of one slimming step."""
    return (f"slim step {step}: {name}: acc {current.accuracy:.4f}, {primary} "
            f"{current.latency_ms[primary]:.3f} ms, {current.params / 1e6:.3f}M params, "
            f"MES {current.mes:.1f}{' (feasible)' if current.feasible else ''}")


@register_strategy("slim")
class SlimStrategy:
    """Greedy joint slimming from the largest config.

    By default the fast path (:mod:`nas.strategies.slim_fast`) chooses which actions get a real
    evaluation and on how many images; with ``settings.exhaustive`` or ``settings.max_actions`` (or
    an accuracy source that cannot evaluate on part of the images) every action of every step (or
    ``max_actions`` random ones) gets a full real evaluation.
    """

    name = "slim"
    uses_study = False

    def run(self, scorer: Scorer, settings: SearchSettings, *, progress: Progress | None = None,
            storage: BaseStorage | None = None) -> SearchOutcome:
        if not settings.exhaustive and not settings.max_actions and hasattr(scorer.accuracy, "correct"):
            from .slim_fast import fast_slim

            return fast_slim(scorer, settings, progress=progress)
        return exhaustive_slim(scorer, settings, progress=progress)


def _move(action: SlimAction) -> str:
    """What a slimming action does, without its step (:attr:`SlimAction.move`; an action made without
    one is known by its whole name, so it is never repeated)."""
    return action.move or action.name


def unstuck_actions(scorer: Scorer, current: Candidate, actions: list[SlimAction]) -> list[SlimAction]:
    """Each action repeated until it gains MES, for a current config that no single action improves.

    On a measured LUT latency is not monotone in width: ONNX Runtime's kernels favour channel counts
    that are multiples of 16, so every one-step move from a config can time slower (352 -> 344
    channels), while two steps of one of them (352 -> 336) are faster. Greedy slimming would stop
    there, over its budgets, with smaller configs in reach. Each returned action is one move applied
    as many times as it takes to gain MES (a move that never does is left out), so the path stays
    strictly increasing in MES.
    """
    out = []
    for act in actions:
        chain, arch = [act], act.arch
        while scorer.with_accuracy(arch, math.nan).mes <= current.mes:
            nxt = [a for a in scorer.space.slimming_actions(arch) if _move(a) == _move(act)]
            if not nxt:
                break
            chain.append(nxt[0])
            arch = nxt[0].arch
        else:
            out.append(replace(act, name=" + ".join(a.name for a in chain), arch=arch))
    return out


def exhaustive_slim(scorer: Scorer, settings: SearchSettings, *, progress: Progress | None = None) -> SearchOutcome:
    """Greedy slimming in which every action (or ``max_actions`` random ones) of every step is evaluated."""
    t0 = time.perf_counter()
    rng = random.Random(f"slim:{settings.seed}")
    space = scorer.space
    current = scorer(space.largest())
    path = [{"step": 0, "action": "start (largest)", **current.row()}]
    steps_after_feasible = 0
    step = 0
    while True:
        if current.feasible:
            if steps_after_feasible >= settings.extra_steps:
                break
            steps_after_feasible += 1
        actions = space.slimming_actions(current.arch)
        if not actions:
            break
        best = _best_action(scorer, current, actions, settings.max_actions, rng)
        if best is None and not current.feasible:  # no single action gains MES: repeat moves until one does
            best = _best_action(scorer, current, unstuck_actions(scorer, current, actions), settings.max_actions, rng)
        if best is None:
            break
        step += 1
        name, current = best
        path.append({"step": step, "action": name, **current.row()})
        (progress or logger.info)(step_message(step, name, current, scorer.primary))
    cands = list(scorer.seen.values())
    largest = scorer.seen[space.largest().hash].macs
    # the work of the evaluations, in full recalibrations and evaluations of the largest subnet
    work = sum(c.macs for c in cands) / largest if largest else None
    return SearchOutcome(cands, best_feasible(cands, scorer.primary), path, time.perf_counter() - t0,
                         stats={"mode": "exhaustive", "largest_full_evaluations": work})


def _best_action(scorer: Scorer, current: Candidate, actions: list[SlimAction], max_actions: int,
                 rng: random.Random) -> tuple[str, Candidate] | None:
    """The action with the smallest accuracy drop per MES gain among those evaluated.

    With ``max_actions`` the actions are evaluated in random groups of that size; a further group is
    drawn only when no action of the groups so far gains MES (on a measured LUT a narrower block can
    time slower), so the path stops only when no action at all gains MES.
    """
    order = rng.sample(actions, len(actions)) if max_actions and len(actions) > max_actions else list(actions)
    size = max_actions or len(order)
    best_ratio, best = math.inf, None
    for start in range(0, len(order), size):
        for act in order[start:start + size]:
            cand = scorer(act.arch)
            gain = cand.mes - current.mes
            if gain <= 0:
                continue
            ratio = (current.accuracy - cand.accuracy) / gain
            if ratio < best_ratio:
                best_ratio, best = ratio, (act.name, cand)
        if best is not None:
            break
    return best
