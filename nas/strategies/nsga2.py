"""``nsga2``: optuna's NSGA-II over accuracy, latency and parameters, with every budget as a constraint.

Objectives: accuracy (max), latency on the primary device (min) and parameters (min). The study
lives in an optuna storage (SQLite in the output folder by default), so a rerun resumes it and
several workers can share one study. The space's own optuna encoding
(:meth:`~search_spaces.SearchSpace.suggest`) turns a trial into an architecture.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from search_spaces import ArchConfig

from ..search import Candidate, Progress, Scorer, SearchOutcome, SearchSettings, best_feasible, register_strategy

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage

__all__ = ["Nsga2Strategy"]


@register_strategy("nsga2")
class Nsga2Strategy:
    """NSGA-II with optuna; resumes the study in ``storage`` and stops at ``n_trials`` complete trials in total."""

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
            cand = scorer(scorer.space.suggest(trial))
            _record(trial, cand, per_trial=per_trial)
            if progress is not None:
                progress(f"trial {trial.number}: acc {cand.accuracy:.4f}, {scorer.primary} "
                         f"{cand.latency_ms[scorer.primary]:.3f} ms, {cand.params / 1e6:.3f}M"
                         f"{' (feasible)' if cand.feasible else ''}")
            return cand.accuracy, cand.latency_ms[scorer.primary], float(cand.params)

        complete = optuna.trial.TrialState.COMPLETE
        done = [t for t in study.get_trials(deepcopy=False) if t.state == complete]
        if len(done) < settings.n_trials:
            study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(settings.n_trials, states=(complete,))],
                           n_trials=settings.n_trials - len(done))
        out = list(_study_candidates(study).values())
        return SearchOutcome(out, best_feasible(out, scorer.primary), [], time.perf_counter() - t0)


def _record(trial: optuna.trial.Trial, cand: Candidate, *, per_trial: bool) -> None:
    """Store the trial's architecture (through the codec), constraints and figures in its user attributes."""
    trial.set_user_attr("arch", cand.arch.to_string())
    trial.set_user_attr("constraints", [float(v) for v in cand.violations.values()])
    if per_trial:
        for key, value in cand.violations.items():
            trial.set_constraint(key, float(value))
    trial.set_user_attr("candidate", {"accuracy": cand.accuracy, "params": cand.params, "macs": cand.macs,
                                      "latency_ms": dict(cand.latency_ms), "violations": dict(cand.violations),
                                      "mes": cand.mes})


def _study_candidates(study: optuna.Study) -> dict[str, Candidate]:
    """The candidates of every complete trial of the study (of every worker sharing it), by arch hash."""
    import optuna

    cands: dict[str, Candidate] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        arch = ArchConfig.from_string(t.user_attrs["arch"])
        c = t.user_attrs["candidate"]
        cands.setdefault(arch.hash, Candidate(arch, c["accuracy"], c["params"], c["macs"], c["latency_ms"],
                                              c["violations"], c["mes"]))
    return cands
