"""``nsga2``: optuna's NSGA-II over accuracy, latency and parameters, with every budget as a constraint.

Objectives: accuracy (max), latency on the primary device (min) and parameters (min). The study
lives in an optuna storage (SQLite in the output folder by default), so a rerun resumes it and
several workers can share one study. The space's own optuna encoding
(:meth:`~search_spaces.SearchSpace.suggest`) turns a trial into an architecture.

By default every trial gets a real evaluation. With ``settings.surrogate``, once a population of
trials has real evaluations, the accuracy predictor of :mod:`nas.predictor` is fitted on them
before each trial; a trial that cannot be the answer (over a budget, or predicted below the best
real feasible accuracy by more than the predictor's error) is scored with the prediction, marked
``accuracy_source = "predicted"``, and never reported as a candidate. Only real evaluations are
candidates, so the chosen subnet's accuracy is always real.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from search_spaces import ArchConfig

from ..predictor import RidgePredictor, encode, spearman
from ..search import Candidate, Progress, Scorer, SearchOutcome, SearchSettings, best_feasible, register_strategy
from ..study_slots import run_trials

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage

__all__ = ["Nsga2Strategy"]


@register_strategy("nsga2")
class Nsga2Strategy:
    """NSGA-II with optuna; resumes the study in ``storage`` and stops at exactly ``n_trials`` complete trials."""

    name = "nsga2"
    uses_study = True

    def run(self, scorer: Scorer, settings: SearchSettings, *, progress: Progress | None = None,
            storage: BaseStorage | None = None) -> SearchOutcome:
        import optuna

        t0 = time.perf_counter()
        # optuna >= 5 reads constraints that trials set themselves; older versions take constraints_func.
        per_trial = hasattr(optuna.trial.Trial, "set_constraint")
        sampler = optuna.samplers.NSGAIISampler(
            population_size=settings.population_size, seed=settings.seed,
            constraints_func=None if per_trial else (lambda t: list(t.user_attrs["constraints"])),
        )
        study = optuna.create_study(study_name=settings.study_name, storage=storage, sampler=sampler,
                                    directions=["maximize", "minimize", "minimize"], load_if_exists=True)

        def objective(trial: optuna.trial.Trial) -> tuple[float, float, float]:
            arch = scorer.space.suggest(trial)
            cand, predicted = _surrogate(trial, scorer, arch, settings) if settings.surrogate else (None, None)
            source = "predicted" if cand is not None else "real"
            cand = cand or scorer(arch)
            _record(trial, cand, per_trial=per_trial, source=source, predicted=predicted)
            if progress is not None:
                progress(f"trial {trial.number}: acc {cand.accuracy:.4f}{' (predicted)' if source != 'real' else ''}, "
                         f"{scorer.primary} {cand.latency_ms[scorer.primary]:.3f} ms, {cand.params / 1e6:.3f}M"
                         f"{' (feasible)' if cand.feasible else ''}")
            return cand.accuracy, cand.latency_ms[scorer.primary], float(cand.params)

        run_trials(study, objective, settings.n_trials, say=progress)
        out = list(_study_candidates(study).values())
        result = SearchOutcome(out, best_feasible(out, scorer.primary), [], time.perf_counter() - t0)
        if settings.surrogate:
            result.stats = _surrogate_stats(study)
        return result


def _real_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    import optuna

    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
            and t.user_attrs.get("accuracy_source", "real") == "real"]


def _surrogate(trial: optuna.trial.Trial, scorer: Scorer, arch: ArchConfig,
               settings: SearchSettings) -> tuple[Candidate | None, float | None]:
    """``(candidate scored by the predictor, None)`` for a trial that cannot win, else ``(None, prediction)``.

    Before a population of real evaluations exists there is nothing to fit: ``(None, None)``.
    """
    real = _real_trials(trial.study)
    if len(real) < settings.population_size:
        return None, None
    space = scorer.space
    x = np.stack([encode(space, ArchConfig.from_string(t.user_attrs["arch"]), params=t.user_attrs["candidate"]["params"],
                         macs=t.user_attrs["candidate"]["macs"]) for t in real])
    y = np.array([t.user_attrs["candidate"]["accuracy"] for t in real])
    model = RidgePredictor.fit_loo(x, y)
    est = scorer.with_accuracy(arch, math.nan)
    pred = float(model.predict(encode(space, arch, params=est.params, macs=est.macs)))
    rmse = float(np.sqrt(np.mean((model.predict(x) - y) ** 2)))
    feasible = [t.user_attrs["candidate"]["accuracy"] for t in real
                if all(v <= 0 for v in t.user_attrs["candidate"]["violations"].values())]
    if not est.feasible or (feasible and pred < max(feasible) - 2 * rmse):
        return replace(est, accuracy=min(max(pred, 0.0), 1.0)), None
    return None, pred


def _surrogate_stats(study: optuna.Study) -> dict[str, float | int | str | None]:
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    pairs = [(t.user_attrs["predicted_accuracy"], t.user_attrs["candidate"]["accuracy"]) for t in done
             if t.user_attrs.get("predicted_accuracy") is not None]
    rho = spearman([p for p, _ in pairs], [r for _, r in pairs]) if len(pairs) >= 3 else math.nan
    return {"mode": "surrogate", "trials": len(done),
            "trials_predicted": sum(t.user_attrs.get("accuracy_source") == "predicted" for t in done),
            "predictor_held_out": len(pairs), "predictor_spearman": None if math.isnan(rho) else rho}


def _record(trial: optuna.trial.Trial, cand: Candidate, *, per_trial: bool, source: str = "real",
            predicted: float | None = None) -> None:
    """Store the trial's architecture (through the codec), constraints and figures in its user attributes."""
    trial.set_user_attr("accuracy_source", source)
    if predicted is not None:
        trial.set_user_attr("predicted_accuracy", predicted)
    trial.set_user_attr("arch", cand.arch.to_string())
    trial.set_user_attr("constraints", [float(v) for v in cand.violations.values()])
    if per_trial:
        for key, value in cand.violations.items():
            trial.set_constraint(key, float(value))
    trial.set_user_attr("candidate", {"accuracy": cand.accuracy, "params": cand.params, "macs": cand.macs,
                                      "latency_ms": dict(cand.latency_ms), "violations": dict(cand.violations),
                                      "mes": cand.mes})


def _study_candidates(study: optuna.Study) -> dict[str, Candidate]:
    """The candidates of every complete, really evaluated trial of the study (of every worker sharing it)."""
    import optuna

    cands: dict[str, Candidate] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state != optuna.trial.TrialState.COMPLETE or t.user_attrs.get("accuracy_source", "real") != "real":
            continue
        arch = ArchConfig.from_string(t.user_attrs["arch"])
        c = t.user_attrs["candidate"]
        cands.setdefault(arch.hash, Candidate(arch, c["accuracy"], c["params"], c["macs"], c["latency_ms"],
                                              c["violations"], c["mes"]))
    return cands
