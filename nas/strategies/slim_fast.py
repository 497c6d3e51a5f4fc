"""The fast path of greedy joint slimming: the same MES-greedy path, with far fewer real evaluations.

Every step still takes, among the actions that got a real evaluation, the one with the smallest
accuracy drop per MES gain, and every figure on the path (and so the chosen subnet's accuracy) is
a real evaluation on every validation image. What changes is which actions get evaluated, on how
many images, and how much of the network is run for each:

1. **Accuracy predictor** (:mod:`nas.predictor`, as Once-for-All does): ridge regression on an
   architecture encoding, refitted every step on every subnet evaluated so far. Its target is the
   negated validation loss (cross-entropy) on the first rung's images: on a few hundred images,
   accuracy moves only with the handful of images whose top class flips, which is noise next to
   the gap between two neighbouring subnets, while the loss moves with every image. (For the 19
   one-step neighbours of the largest subnet of a demo-space supernet trained for 1 epoch, the loss
   on 256 images ranked them by accuracy on 2,000 images with Spearman 0.93, and the accuracy on
   the same 256 images with 0.74.) Until ``warmup`` subnets are known a random sample of actions
   is evaluated; later steps evaluate the ``top_k`` actions with the best predicted drop per MES
   gain, plus ``explore`` random others. The action of the largest MES gain is always among them:
   the step's rule takes it when no action drops accuracy less per gain (e.g. every neighbour
   scores the same), and a ranking by loss would rarely nominate it. Its Spearman correlation on
   evaluated subnets it had not been trained on is reported, against the loss it predicts and
   against the accuracy on the same images.
2. **Successive halving** of validation images: the chosen actions are evaluated on
   ``rung_images`` images, the better half (by drop per MES gain on those images; the drop is in
   loss on the partial rungs, where accuracy is mostly noise) on twice as many, and so on up to
   every image; the last one standing, by accuracy drop per MES gain on every image, is the
   step's greedy choice.
3. **Several actions per step while far from the budgets**: the winner and the next-best actions
   that touch other stages or blocks are applied together (up to ``max_combine``), as long as the
   result stays more than ``far`` over its most violated budget: first the evaluated ones (by real
   loss drop per MES gain on the first rung), then the others by the predictor's rank. The
   combination gets its own real evaluation. Such a step gives only half as many actions (``top_k``
   and ``explore``, rounded up) a real evaluation: it runs on the largest subnets, where an
   evaluation costs most, and many actions are applied at once anyway. Near the budgets every step
   applies one action, chosen among the full ``top_k`` + ``explore``.
4. **The final pick near the budget**: at a step from a subnet over its budgets, the actions that
   meet every budget also compete by accuracy alone (successive halving; the winner gets a real
   evaluation on every image and becomes a candidate). The exhaustive path's final pick is the most
   accurate feasible subnet among all it evaluated, many of them neighbours off the path; this
   gives the fast path the same chance, where the greedy rule would cross the budget with the
   action of the best drop per MES gain, often far below it.
5. **BN recalibrated once per block and reused** (:mod:`nas.prefix_eval`): a candidate runs only
   the blocks from its first difference with the current subnet on.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np

from search_spaces import ArchConfig, SlimAction

from ..predictor import RidgePredictor, encode, spearman
from ..search import Candidate, Progress, Scorer, SearchOutcome, SearchSettings, best_feasible

__all__ = ["StagedAccuracy", "fast_slim"]

logger = logging.getLogger(__name__)


class StagedAccuracy(Protocol):
    """An accuracy source that can evaluate on the leading validation images (``AccuracyEvaluator``)."""

    n_images: int

    def rung_images(self, images: int) -> int: ...

    def correct(self, arch: ArchConfig, images: int, *, keep: bool = False) -> np.ndarray: ...

    def loss(self, arch: ArchConfig, images: int) -> float | None: ...

    def set_anchor(self, arch: ArchConfig) -> None: ...


@dataclass
class _Trial:
    """One action of a step: its cheap figures, its prediction and its real accuracies by image count."""

    action: SlimAction
    est: Candidate
    gain: float
    predicted_ratio: float = math.nan
    predicted: float = math.nan   # the predictor's figure: negated loss on the first rung's images
    acc: dict[int, float] = field(default_factory=dict)

    def ratio(self, merit: Callable[[ArchConfig], float], base: float) -> tuple[float, float]:
        """Sort key: the drop of ``merit`` from ``base`` per MES gain (equal drops: the larger gain first)."""
        return (base - merit(self.action.arch)) / self.gain, -self.gain


#: A sort key of trials, best first.
_Key = Callable[[_Trial], tuple[float, float]]


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def _max_violation(c: Candidate) -> float:
    return max(c.violations.values(), default=0.0)


class _FastSlim:
    def __init__(self, scorer: Scorer, settings: SearchSettings, progress: Progress | None) -> None:
        self.scorer, self.settings, self.say = scorer, settings, progress or logger.info
        self.ev: StagedAccuracy = scorer.accuracy  # type: ignore[assignment]
        self.space = scorer.space
        self.n_all = self.ev.n_images
        rungs = [self.ev.rung_images(settings.rung_images)]
        while rungs[-1] < self.n_all:
            rungs.append(self.ev.rung_images(2 * rungs[-1]))
        self.rungs = rungs
        self.n0 = rungs[0]
        self.rng = random.Random(f"slim-fast:{settings.seed}")
        self.train: dict[str, tuple[np.ndarray, float]] = {}   # arch hash -> (features, negated loss on n0 images)
        self.held_out: list[tuple[int, float, float, float]] = []   # (step, predicted, -loss, accuracy) on n0 images
        self.real_actions = 0
        self.all_actions = 0
        self.warmup = 16   # evaluated subnets before the predictor ranks actions
        self.feasible_picks = 0   # feasible actions that competed for the final pick (_feasible_pick)

    # ------------------------------------------------------------------ evaluations
    def _features(self, c: Candidate) -> np.ndarray:
        return encode(self.space, c.arch, params=c.params, macs=c.macs)

    def _learn(self, c: Candidate) -> None:
        loss = self.ev.loss(c.arch, self.n0)
        if loss is not None:   # None: a cache row written before losses were kept
            self.train[c.arch.hash] = (self._features(c), -loss)

    def full(self, arch: ArchConfig, *, keep: bool) -> Candidate:
        """A real evaluation of ``arch`` on every validation image (recorded as a search candidate)."""
        right = self.ev.correct(arch, self.n_all, keep=keep)
        cand = self.scorer.with_accuracy(arch, float(right.mean()))
        self.scorer.seen[arch.hash] = cand
        self._learn(cand)
        return cand

    def _on(self, t: _Trial, images: int, *, keep: bool = False) -> float:
        right = self.ev.correct(t.action.arch, images, keep=keep)
        t.acc[images] = float(right.mean())
        if images == self.n_all:
            self.scorer.seen[t.action.arch.hash] = replace(t.est, accuracy=t.acc[images])
        self._learn(t.est)
        return t.acc[images]

    def _merit(self, archs: list[ArchConfig], images: int) -> Callable[[ArchConfig], float]:
        """How good each of ``archs`` is on the first ``images`` images (higher is better). Before the last rung
        it is the negated loss, which separates close subnets where accuracy on a few hundred images is mostly
        noise; on every image it is the accuracy, the figure the path and the final pick are judged by.
        Accuracy also where a loss is unknown (a cache row written before losses were kept)."""
        if images < self.n_all and all(self.ev.loss(a, images) is not None for a in archs):
            return lambda a: -self.ev.loss(a, images)  # type: ignore[operator]
        return lambda a: float(self.ev.correct(a, images).mean())

    # ------------------------------------------------------------------ one step
    def _trials(self, cur: Candidate) -> list[_Trial]:
        from .slim import unstuck_actions

        actions = self.space.slimming_actions(cur.arch)
        out = self._gaining(cur, actions)
        if not out and not cur.feasible:  # no single action gains MES: repeat moves until one does
            out = self._gaining(cur, unstuck_actions(self.scorer, cur, actions))
        return out

    def _gaining(self, cur: Candidate, actions: list[SlimAction]) -> list[_Trial]:
        out = []
        for act in actions:
            est = self.scorer.with_accuracy(act.arch, math.nan)
            if est.mes - cur.mes > 0:
                out.append(_Trial(act, est, est.mes - cur.mes))
        return out

    def _select(self, cur: Candidate, trials: list[_Trial], step: int) -> list[_Trial]:
        """The trials that get a real evaluation: a random warm-up sample until the predictor has data, then
        the ``top_k`` best ranked by predicted drop per MES gain and ``explore`` random others (half of each,
        rounded up, at a step far from the budgets, which combines many actions anyway). The action of the
        largest MES gain is always among them (in place of a random one): the step's rule takes it whenever
        no action drops accuracy less per gain, e.g. when the accuracy of every neighbour is the same, and a
        ranking by loss, which always differs a little, would rarely nominate it."""
        top_k, explore = self.settings.top_k, self.settings.explore
        if self._far(cur):
            top_k, explore = (top_k + 1) // 2, (explore + 1) // 2
        k = top_k + explore
        if len(trials) <= k:
            return trials
        biggest = max(trials, key=lambda t: t.gain)
        if len(self.train) < self.warmup:
            others = [t for t in trials if t is not biggest]
            return [biggest, *self.rng.sample(others, min(len(trials), max(2 * k, self.warmup)) - 1)]
        x = np.stack([f for f, _ in self.train.values()])
        y = np.array([a for _, a in self.train.values()])
        model = RidgePredictor.fit_loo(x, y)
        pred = model.predict(np.stack([self._features(t.est) for t in trials]))
        base = float(model.predict(self._features(cur)))
        for t, p in zip(trials, pred):
            t.predicted, t.predicted_ratio = float(p), (base - float(p)) / t.gain
        ranked = sorted(trials, key=lambda t: (t.predicted_ratio, -t.gain))
        top, rest = ranked[:top_k], ranked[top_k:]
        if biggest in rest:   # it takes a random one's place
            rest.remove(biggest)
            top.append(biggest)
            explore = max(explore - 1, 0)
        return top + self.rng.sample(rest, min(explore, len(rest)))

    def _far(self, c: Candidate) -> bool:
        """Whether ``c`` is far from the budgets: its most violated one exceeded by more than ``far``."""
        return _max_violation(c) > self.settings.far

    def _halve(self, trials: list[_Trial], order: Callable[[list[_Trial], int], _Key], *, anchor: bool) -> _Trial:
        """Successive halving over the rungs, best first by ``order(survivors, images)``; the winner is evaluated
        on every image (and, with ``anchor``, keeps its block inputs as the next anchor)."""
        survivors = list(trials)
        for n in self.rungs:
            last = n == self.n_all
            for t in survivors:
                self._on(t, n, keep=anchor and last and len(survivors) == 1)
            survivors.sort(key=order(survivors, n))
            if last:
                break
            survivors = survivors[:max(1, math.ceil(len(survivors) / 2))]
        return survivors[0]

    def _by_ratio(self, cur: Candidate, trials: list[_Trial], images: int) -> _Key:
        """Sort key of ``trials``: their drop from ``cur`` in :meth:`_merit` on ``images`` images per MES gain."""
        merit = self._merit([cur.arch, *(t.action.arch for t in trials)], images)
        base = merit(cur.arch)
        return lambda t: t.ratio(merit, base)

    def _halving(self, cur: Candidate, chosen: list[_Trial], step: int) -> _Trial:
        """The step's greedy choice: the smallest accuracy drop per MES gain, by successive halving."""
        winner = self._halve(chosen, lambda survivors, n: self._by_ratio(cur, survivors, n), anchor=True)
        for t in chosen:
            loss = self.ev.loss(t.action.arch, self.n0)
            if not math.isnan(t.predicted) and loss is not None:
                self.held_out.append((step, t.predicted, -loss, t.acc[self.n0]))
        return winner

    def _feasible_pick(self, trials: list[_Trial], chosen: list[_Trial]) -> None:
        """At a step from a subnet over its budgets, the actions that meet every budget compete for the final
        pick by accuracy alone, as every feasible neighbour does on the exhaustive path (whose final pick is
        the most accurate feasible subnet it evaluated, on or off the path). The greedy rule crosses the
        budget with the best drop per MES gain, often far below it; the pick should not depend on that.
        The feasible actions evaluated for the step compete, plus the ``top_k`` others the predictor ranks
        best (a random ``top_k`` before it is fitted); the winner of a halving by accuracy gets a real
        evaluation on every image and becomes a candidate."""
        feasible = [t for t in trials if t.est.feasible]
        pool = [t for t in feasible if t in chosen]
        rest = [t for t in feasible if t not in chosen]
        if any(math.isnan(t.predicted) for t in rest):
            rest = self.rng.sample(rest, len(rest))
        else:
            rest.sort(key=lambda t: -t.predicted)
        pool += rest[:self.settings.top_k]
        if pool:
            self.feasible_picks += len(pool)
            def by_merit(survivors: list[_Trial], n: int) -> _Key:
                merit = self._merit([t.action.arch for t in survivors], n)
                return lambda t: (-merit(t.action.arch), -t.gain)

            self._halve(pool, by_merit, anchor=False)

    def _combine(self, cur: Candidate, winner: _Trial, chosen: list[_Trial], trials: list[_Trial]) -> list[_Trial]:
        """The winner, plus the next-best non-conflicting actions while far from the budgets: first the evaluated
        ones (by their real loss drop per MES gain on the first rung), then the others by the predictor's rank.
        The combination gets its own real evaluation (:meth:`step`)."""
        picked = [winner]
        if self.settings.max_combine <= 1 or not self._far(cur):
            return picked
        if not self._far(winner.est):
            return picked
        ranked = sorted(chosen, key=self._by_ratio(cur, chosen, self.n0))
        ranked += sorted((t for t in trials if t not in chosen and not math.isnan(t.predicted_ratio)),
                         key=lambda t: (t.predicted_ratio, -t.gain))
        for t in ranked:
            if len(picked) >= self.settings.max_combine:
                break
            if t is winner or any(t.action.conflicts(p.action) for p in picked):
                continue
            arch = self.space.combine(cur.arch, [p.action for p in picked] + [t.action])
            if not self._far(self.scorer.with_accuracy(arch, math.nan)):
                break
            picked.append(t)
        return picked

    def step(self, cur: Candidate, step: int) -> tuple[str, Candidate] | None:
        t0 = time.perf_counter()
        trials = self._trials(cur)
        if not trials:
            return None
        chosen = self._select(cur, trials, step)
        self.all_actions += len(trials)
        self.real_actions += len(chosen)
        t1 = time.perf_counter()
        if not cur.feasible:   # first, while the block inputs kept are still the current subnet's
            self._feasible_pick(trials, chosen)
        winner = self._halving(cur, chosen, step)
        picked = self._combine(cur, winner, chosen, trials)
        if len(picked) == 1:
            new = self.scorer.seen[winner.action.arch.hash]
        else:
            new = self.full(self.space.combine(cur.arch, [t.action for t in picked]), keep=True)
        self.ev.set_anchor(new.arch)
        logger.debug("slim step %d: %d actions, %d evaluated, %d applied; ranking %.2f s, evaluations %.2f s",
                     step, len(trials), len(chosen), len(picked), t1 - t0, time.perf_counter() - t1)
        return " + ".join(t.action.name for t in picked), new

    # ------------------------------------------------------------------ the path
    def run(self) -> SearchOutcome:
        from .slim import step_message

        t0 = time.perf_counter()
        current = self.full(self.space.largest(), keep=True)
        self.ev.set_anchor(current.arch)
        path = [{"step": 0, "action": "start (largest)", **current.row()}]
        steps_after_feasible = step = 0
        while True:
            if current.feasible:
                if steps_after_feasible >= self.settings.extra_steps:
                    break
                steps_after_feasible += 1
            taken = self.step(current, step + 1)
            if taken is None:
                break
            step += 1
            name, current = taken
            path.append({"step": step, "action": name, **current.row()})
            self.say(step_message(step, name, current, self.scorer.primary))
        cands = list(self.scorer.seen.values())
        out = SearchOutcome(cands, best_feasible(cands, self.scorer.primary), path, time.perf_counter() - t0)
        out.stats = self.stats()
        return out

    def stats(self) -> dict[str, float | int | str | None]:
        pred = [h[1] for h in self.held_out]
        within = [spearman([h[1] for h in self.held_out if h[0] == k], [h[2] for h in self.held_out if h[0] == k])
                  for k in sorted({h[0] for h in self.held_out})]
        within = [w for w in within if not math.isnan(w)]

        def rho(col: int) -> float | None:
            return _finite(spearman(pred, [h[col] for h in self.held_out])) if len(pred) >= 3 else None
        runner = getattr(self.ev, "runner", None)
        return {
            "mode": "fast", "rungs": ",".join(str(n) for n in self.rungs),
            "actions_considered": self.all_actions, "actions_evaluated": self.real_actions,
            "feasible_pick_actions": self.feasible_picks,
            "predictor_target": f"validation loss on {self.n0} images",
            "predictor_held_out": len(self.held_out),
            "predictor_spearman": rho(2),
            "predictor_spearman_accuracy": rho(3),
            "predictor_spearman_within_step": float(np.mean(within)) if within else None,
            "block_work_fraction": (runner.blocks_run / runner.blocks_total
                                    if runner is not None and runner.blocks_total else None),
            # the work of the evaluations, in full recalibrations and evaluations of the largest subnet
            "largest_full_evaluations": (runner.macs_run / runner.full_macs(self.space.largest())
                                         if runner is not None else None),
        }


def fast_slim(scorer: Scorer, settings: SearchSettings, *, progress: Progress | None = None) -> SearchOutcome:
    """Greedy joint slimming, fast path (see the module docstring)."""
    return _FastSlim(scorer, settings, progress).run()
