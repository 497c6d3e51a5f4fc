"""Joint latency-and-parameter search over a trained supernet (``nas-search``).

Strategies:

* ``slim``: EfficientFormerV2's greedy joint slimming. From the largest config, every step
  evaluates the slimming actions (narrower stage, fewer blocks, lower expansion, attention to
  FFN, softmax to linear attention) and takes the one with the smallest accuracy drop per gain
  in MES, until every budget is met, then ``extra_steps`` further to trace the path.
* ``nsga2``: optuna's NSGA-II with ``constraints_func`` for every budget; objectives accuracy
  (max), latency on the primary device (min) and parameters (min). The study lives in an
  optuna storage (SQLite in the output folder by default), so a rerun resumes and several
  workers can share one study.

Accuracy comes from :class:`~nas.accuracy.AccuracyEvaluator` (validation split, never test);
latency from the LUTs, through one predictor per device.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from search_spaces import ArchConfig, BlockConfig, SearchSpace, StageConfig, count_macs, count_params
from search_spaces.errors import NasUserError

from .objectives import Budgets, MesWeights, mes

__all__ = ["Candidate", "LatencyModel", "SearchSettings", "SearchOutcome", "Scorer", "slim_search", "nsga2_search",
           "pareto_front", "arch_from_params"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyModel:
    """Latency of architectures on one device, from a LUT.

    Args:
        device: device name.
        predict: ``arch -> milliseconds`` (calibrated).
        source: ``measured-lut`` or ``predicted`` (an analytical prior, never shown as measured).
        lut_path: the LUT file.
        lut_sha256: its checksum, for provenance.
    """

    device: str
    predict: Callable[[ArchConfig], float]
    source: str
    lut_path: str = ""
    lut_sha256: str = ""


@dataclass(frozen=True)
class Candidate:
    arch: ArchConfig
    accuracy: float
    params: int
    macs: int
    latency_ms: Mapping[str, float]
    violations: Mapping[str, float]
    mes: float

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.violations.values())

    def row(self) -> dict[str, Any]:
        r: dict[str, Any] = {"arch_hash": self.arch.hash, "accuracy": self.accuracy, "params": self.params,
                             "macs": self.macs}
        r.update({f"latency_ms[{d}]": v for d, v in self.latency_ms.items()})
        r.update({"mes": self.mes, "feasible": self.feasible, "arch": self.arch.to_string()})
        return r


class Scorer:
    """Turns an architecture into a :class:`Candidate` (accuracy, exact counts, latency per device)."""

    def __init__(self, *, space: SearchSpace, accuracy: Callable[[ArchConfig], float],
                 latency: Mapping[str, LatencyModel], budgets: Budgets, primary_device: str,
                 lower: Callable[[ArchConfig], Any], weights: MesWeights = MesWeights()) -> None:
        if primary_device not in latency:
            raise NasUserError(f"primary device {primary_device!r} has no LUT; devices with LUTs: {sorted(latency)}")
        missing = sorted(set(budgets.latency_ms) - set(latency))
        if missing:
            raise NasUserError(f"--latency names device(s) {missing} that have no LUT")
        self.space, self.accuracy, self.latency = space, accuracy, latency
        self.budgets, self.primary, self.lower, self.weights = budgets, primary_device, lower, weights
        self.seen: dict[str, Candidate] = {}

    def cheap(self, arch: ArchConfig) -> tuple[int, int, dict[str, float]]:
        specs = self.lower(arch)
        lat = {d: m.predict(arch) for d, m in self.latency.items()}
        return count_params(specs), count_macs(specs), lat

    def __call__(self, arch: ArchConfig) -> Candidate:
        hit = self.seen.get(arch.hash)
        if hit is not None:
            return hit
        params, macs, lat = self.cheap(arch)
        cand = Candidate(arch, self.accuracy(arch), params, macs, lat,
                         self.budgets.violations(latency_ms=lat, params=params, macs=macs),
                         mes(lat[self.primary], params, self.weights))
        self.seen[arch.hash] = cand
        return cand


@dataclass(frozen=True)
class SearchSettings:
    """Settings of the search strategies (the CLI maps each flag to one field)."""

    strategy: str = "slim"
    seed: int = 0
    max_actions: int = 0
    extra_steps: int = 3
    n_trials: int = 60
    population_size: int = 16
    storage: str | None = None
    study_name: str = "nas-search"

    def __post_init__(self) -> None:
        if self.strategy not in ("slim", "nsga2"):
            raise NasUserError(f"--strategy must be one of ['nsga2', 'slim'], got {self.strategy!r}")
        for name, low in (("max_actions", 0), ("extra_steps", 0), ("n_trials", 1), ("population_size", 2)):
            if getattr(self, name) < low:
                raise NasUserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")


@dataclass
class SearchOutcome:
    candidates: list[Candidate]
    best: Candidate | None
    path: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    evaluated: int = 0


def pareto_front(cands: Sequence[Candidate], primary: str) -> list[Candidate]:
    """Candidates not dominated in (accuracy up, primary latency down, params down)."""
    def dominates(a: Candidate, b: Candidate) -> bool:
        ka = (a.accuracy, -a.latency_ms[primary], -a.params)
        kb = (b.accuracy, -b.latency_ms[primary], -b.params)
        return all(x >= y for x, y in zip(ka, kb)) and ka != kb
    return [c for c in cands if not any(dominates(o, c) for o in cands)]


def best_feasible(cands: Sequence[Candidate], primary: str) -> Candidate | None:
    feasible = [c for c in cands if c.feasible]
    return max(feasible, key=lambda c: (c.accuracy, -c.latency_ms[primary], -c.params)) if feasible else None


# ============================================================================ slim
def slim_search(scorer: Scorer, settings: SearchSettings, *,
                progress: Callable[[str], None] | None = None) -> SearchOutcome:
    """Greedy joint slimming from the largest config (EfficientFormerV2, section 3.3)."""
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
        if settings.max_actions and len(actions) > settings.max_actions:
            actions = rng.sample(actions, settings.max_actions)
        best_ratio, best = math.inf, None
        for act in actions:
            cand = scorer(act.arch)
            gain = cand.mes - current.mes
            if gain <= 0:
                continue
            ratio = (current.accuracy - cand.accuracy) / gain
            if ratio < best_ratio:
                best_ratio, best = ratio, (act.name, cand)
        if best is None:
            break
        step += 1
        name, current = best
        path.append({"step": step, "action": name, **current.row()})
        msg = (f"slim step {step}: {name}: acc {current.accuracy:.4f}, {scorer.primary} "
               f"{current.latency_ms[scorer.primary]:.3f} ms, {current.params / 1e6:.3f}M params, "
               f"MES {current.mes:.1f}{' (feasible)' if current.feasible else ''}")
        (progress or logger.info)(msg)
    cands = list(scorer.seen.values())
    return SearchOutcome(cands, best_feasible(cands, scorer.primary), path, time.perf_counter() - t0)


# ============================================================================ nsga2
def arch_from_params(space: SearchSpace, params: Mapping[str, Any]) -> ArchConfig:
    """Decode a fixed-length optuna parameter set into a config of ``space`` (always valid).

    Per stage ``s``: ``s{s}.width``, ``s{s}.depth``, ``s{s}.attn`` (clamped to what the depth
    allows), and per slot ``s{s}.b{j}.e`` and, for attention slots, ``s{s}.b{j}.mixer``.
    """
    stages = []
    for si, ch in enumerate(space.stages):
        depth = params[f"s{si}.depth"]
        allowed = ch.attn_range(depth)
        n_attn = min(max(params.get(f"s{si}.attn", 0), allowed.start), allowed.stop - 1)
        blocks = []
        for j in range(depth):
            e = params[f"s{si}.b{j}.e"]
            if j >= depth - n_attn:
                blocks.append(BlockConfig(params[f"s{si}.b{j}.mixer"], e))
            else:
                blocks.append(BlockConfig(ch.plain_mixer, e))
        stages.append(StageConfig(params[f"s{si}.width"], tuple(blocks)))
    return space.check(ArchConfig(space.family, tuple(stages), space.stem_stride, space.head_widths, space.head_dim))


def _suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for si, ch in enumerate(space.stages):
        params[f"s{si}.width"] = trial.suggest_categorical(f"s{si}.width", list(ch.widths))
        params[f"s{si}.depth"] = trial.suggest_categorical(f"s{si}.depth", list(ch.depths))
        if ch.max_attn:
            params[f"s{si}.attn"] = trial.suggest_int(f"s{si}.attn", ch.min_attn, ch.max_attn)
        for j in range(ch.depths[-1]):
            params[f"s{si}.b{j}.e"] = trial.suggest_categorical(f"s{si}.b{j}.e", list(ch.expansions))
            if ch.attn_mixers:
                params[f"s{si}.b{j}.mixer"] = trial.suggest_categorical(f"s{si}.b{j}.mixer", list(ch.attn_mixers))
    return params


def nsga2_search(scorer: Scorer, settings: SearchSettings, *, storage: Any,
                 progress: Callable[[str], None] | None = None) -> SearchOutcome:
    """NSGA-II over the space with optuna; resumes the study in ``storage`` and stops at ``n_trials`` in total."""
    import optuna

    t0 = time.perf_counter()
    space = scorer.space
    # optuna >= 5 reads constraints that trials set themselves; older versions take constraints_func.
    per_trial = hasattr(optuna.trial.Trial, "set_constraint")
    sampler = optuna.samplers.NSGAIISampler(
        population_size=settings.population_size, seed=settings.seed,
        constraints_func=None if per_trial else (lambda t: list(t.user_attrs["constraints"])),
    )
    study = optuna.create_study(study_name=settings.study_name, storage=storage, sampler=sampler,
                                directions=["maximize", "minimize", "minimize"], load_if_exists=True)

    def objective(trial: Any) -> tuple[float, float, float]:
        arch = arch_from_params(space, _suggest(trial, space))
        cand = scorer(arch)
        trial.set_user_attr("arch", arch.to_string())
        trial.set_user_attr("constraints", [float(v) for v in cand.violations.values()])
        if per_trial:
            for key, value in cand.violations.items():
                trial.set_constraint(key, float(value))
        trial.set_user_attr("candidate", {"accuracy": cand.accuracy, "params": cand.params, "macs": cand.macs,
                                          "latency_ms": dict(cand.latency_ms), "violations": dict(cand.violations),
                                          "mes": cand.mes})
        if progress is not None:
            progress(f"trial {trial.number}: acc {cand.accuracy:.4f}, {scorer.primary} "
                     f"{cand.latency_ms[scorer.primary]:.3f} ms, {cand.params / 1e6:.3f}M"
                     f"{' (feasible)' if cand.feasible else ''}")
        return cand.accuracy, cand.latency_ms[scorer.primary], float(cand.params)

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < settings.n_trials:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(
            settings.n_trials, states=(optuna.trial.TrialState.COMPLETE,))], n_trials=settings.n_trials - len(done))
    cands: dict[str, Candidate] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        arch = ArchConfig.from_string(t.user_attrs["arch"])
        c = t.user_attrs["candidate"]  # trials of every worker sharing the study
        cands.setdefault(arch.hash, Candidate(arch, c["accuracy"], c["params"], c["macs"], c["latency_ms"],
                                              c["violations"], c["mes"]))
    out = list(cands.values())
    return SearchOutcome(out, best_feasible(out, scorer.primary), [], time.perf_counter() - t0)
