"""Joint latency-and-parameter search over a trained supernet: the parts every strategy shares.

A search strategy turns a :class:`Scorer` (architecture to :class:`Candidate`: accuracy, exact
counts, latency per device, budget violations, MES) into a :class:`SearchOutcome`. Strategies
implement the small :class:`SearchStrategy` protocol, as optuna's samplers implement theirs,
and are found by name in a registry (:func:`get_strategy`, :func:`strategy_names`):

* ``slim`` (:mod:`nas.strategies.slim`): EfficientFormerV2's greedy joint slimming.
* ``nsga2`` (:mod:`nas.strategies.nsga2`): optuna's NSGA-II with every budget as a constraint.

Accuracy comes from :class:`~nas.accuracy.AccuracyEvaluator` (validation split, never test);
latency from the LUTs, through one predictor per device.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence

from search_spaces import ArchConfig, BlockSpec, SearchSpace, count_macs, count_params
from search_spaces.errors import NasUserError

from .objectives import Budgets, MesWeights, mes

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from latency import LatencyTable

__all__ = ["Candidate", "LatencyModel", "SearchSettings", "SearchOutcome", "Scorer", "SearchStrategy",
           "register_strategy", "get_strategy", "strategy_names", "pareto_front", "best_feasible",
           "arch_from_params"]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
Row = dict[str, float | int | str | bool]


@dataclass(frozen=True)
class LatencyModel:
    """Latency of architectures on one device, from a LUT.

    Args:
        device: device name.
        predict: ``arch -> milliseconds`` (calibrated).
        source: ``measured-lut`` or ``predicted`` (an analytical prior, never shown as measured).
        lut_path: the LUT file.
        lut_sha256: its checksum, for provenance.
        table: the LUT itself (strategies that need block figures, e.g. ``gumbel``).
    """

    device: str
    predict: Callable[[ArchConfig], float]
    source: str
    lut_path: str = ""
    lut_sha256: str = ""
    table: LatencyTable | None = None


@dataclass(frozen=True)
class Candidate:
    """One scored architecture: proxy accuracy (fraction), exact counts, latency (ms) per device.

    ``violations`` holds the relative excess per budget (``> 0`` means over budget).
    """

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

    def row(self) -> Row:
        r: Row = {"arch_hash": self.arch.hash, "accuracy": self.accuracy, "params": self.params, "macs": self.macs}
        r.update({f"latency_ms[{d}]": v for d, v in self.latency_ms.items()})
        r.update({"mes": self.mes, "feasible": self.feasible, "arch": self.arch.to_string()})
        return r


class Scorer:
    """Turns an architecture into a :class:`Candidate` (accuracy, exact counts, latency per device).

    Args:
        space: the search space.
        accuracy: ``arch -> validation accuracy`` (fraction), e.g. an ``AccuracyEvaluator``.
        latency: one :class:`LatencyModel` per device.
        budgets: the constraints.
        primary_device: the device of MES and of the plots (must have a LUT).
        lower: ``arch -> block specs`` (the supernet's lowering, for exact counts).
        weights: MES units and exponents.
    """

    def __init__(self, *, space: SearchSpace, accuracy: Callable[[ArchConfig], float],
                 latency: Mapping[str, LatencyModel], budgets: Budgets, primary_device: str,
                 lower: Callable[[ArchConfig], tuple[BlockSpec, ...]], weights: MesWeights = MesWeights()) -> None:
        if primary_device not in latency:
            raise NasUserError(f"primary device {primary_device!r} has no LUT; devices with LUTs: {sorted(latency)}")
        missing = sorted(set(budgets.latency_ms) - set(latency))
        if missing:
            raise NasUserError(f"--latency names device(s) {missing} that have no LUT")
        self.space, self.accuracy, self.latency = space, accuracy, latency
        self.budgets, self.primary, self.lower, self.weights = budgets, primary_device, lower, weights
        self.seen: dict[str, Candidate] = {}

    def cheap(self, arch: ArchConfig) -> tuple[int, int, dict[str, float]]:
        """Exact params, MACs and LUT latency per device (no accuracy evaluation)."""
        specs = self.lower(arch)
        lat = {d: m.predict(arch) for d, m in self.latency.items()}
        return count_params(specs), count_macs(specs), lat

    def with_accuracy(self, arch: ArchConfig, accuracy: float) -> Candidate:
        """The candidate of ``arch`` for a given accuracy (not recorded in :attr:`seen`)."""
        params, macs, lat = self.cheap(arch)
        return Candidate(arch, accuracy, params, macs, lat,
                         self.budgets.violations(latency_ms=lat, params=params, macs=macs),
                         mes(lat[self.primary], params, self.weights))

    def __call__(self, arch: ArchConfig) -> Candidate:
        hit = self.seen.get(arch.hash)
        if hit is not None:
            return hit
        cand = self.with_accuracy(arch, self.accuracy(arch))
        self.seen[arch.hash] = cand
        return cand


@dataclass(frozen=True)
class SearchSettings:
    """Settings of the search strategies (the CLI maps each flag to one field).

    Args:
        strategy: a registered strategy name (:func:`strategy_names`).
        seed: seed of every random choice of the search.
        max_actions: slim: the exhaustive algorithm, evaluating this many random actions per step (0: all);
            when none of them gains MES, as many others are drawn before the path stops.
        extra_steps: slim: steps to continue after every budget is met.
        exhaustive: slim: give every action of every step a real evaluation on every validation
            image (the original algorithm) instead of the fast path below.
        top_k: slim (fast): actions per step that get a real evaluation, those the accuracy
            predictor ranks best by predicted accuracy drop per MES gain (half as many, rounded up,
            while far from the budgets).
        explore: slim (fast): further actions per step, drawn at random, that get a real evaluation
            (half as many, rounded up, while far from the budgets).
        rung_images: slim (fast): validation images of the first successive-halving rung; each
            further rung doubles them and keeps the better half, up to every image.
        max_combine: slim (fast): most non-conflicting actions applied together in one step while
            far from the budgets (the evaluated ones first, then those the predictor ranks next).
        far: slim (fast): "far from the budgets" means the most violated budget is exceeded by more
            than this fraction (0.1: 10 % over); nearer, every step applies one action.
        prefix_cache_mb: slim (fast): memory for the block inputs of the current subnet, reused by
            candidates that share its leading blocks.
        surrogate: nsga2: after the first population, trials whose predicted accuracy cannot beat
            the best real one are scored by the predictor instead of a real evaluation (off by default).
        gumbel_steps: gumbel: optimisation steps of the architecture logits.
        gumbel_batch_size: gumbel: training images per step.
        gumbel_lr: gumbel: Adam learning rate of the logits.
        gumbel_penalty: gumbel: weight of each budget's hinge on its expected cost.
        n_trials: nsga2: complete trials in total (a rerun resumes the study).
        population_size: nsga2: NSGA-II population.
        storage: nsga2: optuna storage URL (``None``: SQLite in the output folder).
        study_name: nsga2: the study's name in the storage.
    """

    strategy: str = "slim"
    seed: int = 0
    max_actions: int = 0
    extra_steps: int = 3
    exhaustive: bool = False
    top_k: int = 6
    explore: int = 2
    rung_images: int = 256
    max_combine: int = 16
    far: float = 0.1
    prefix_cache_mb: int = 1024
    surrogate: bool = False
    gumbel_steps: int = 120
    gumbel_batch_size: int = 64
    gumbel_lr: float = 0.05
    gumbel_penalty: float = 2.0
    n_trials: int = 60
    population_size: int = 16
    storage: str | None = None
    study_name: str = "nas-search"

    def __post_init__(self) -> None:
        names = strategy_names()
        if self.strategy not in names:
            raise NasUserError(f"--strategy must be one of {names}, got {self.strategy!r}")
        for name, low in (("max_actions", 0), ("extra_steps", 0), ("n_trials", 1), ("population_size", 2),
                          ("top_k", 1), ("explore", 0), ("rung_images", 1), ("max_combine", 1),
                          ("prefix_cache_mb", 0), ("gumbel_steps", 1), ("gumbel_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise NasUserError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        for name, low in (("gumbel_lr", 0.0), ("gumbel_penalty", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (name == "gumbel_lr" and value == 0):
                raise NasUserError(f"--{name.replace('_', '-')} must be a finite number "
                                   f"{'> 0' if name == 'gumbel_lr' else '>= 0'}, got {value!r}")
        if not (isinstance(self.far, (int, float)) and math.isfinite(self.far) and self.far >= 0):
            raise NasUserError(f"--far must be a finite number >= 0 (a fraction over budget), got {self.far!r}")


@dataclass
class SearchOutcome:
    """What a strategy found: every candidate it scored, the best feasible one, and its path (slim)."""

    candidates: list[Candidate]
    best: Candidate | None
    path: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    evaluated: int = 0
    stats: dict[str, float | int | str | None] = field(default_factory=dict)


class SearchStrategy(Protocol):
    """A search strategy (shaped like optuna's samplers: one small interface, found by name).

    Attributes:
        name: the registry name (``--strategy``).
        uses_study: whether :meth:`run` needs an optuna ``storage`` (a study that resumes).

    A strategy may also define ``check(space)``, raising :class:`NasUserError` for a space it
    cannot search; ``run_search`` calls it before anything is written.
    """

    name: str
    uses_study: bool

    def run(self, scorer: Scorer, settings: SearchSettings, *, progress: Progress | None = None,
            storage: BaseStorage | None = None) -> SearchOutcome:
        """Search with ``scorer`` and return every scored candidate and the best feasible one."""
        ...


_STRATEGIES: dict[str, Callable[[], SearchStrategy]] = {}


def register_strategy(name: str) -> Callable[[Callable[[], SearchStrategy]], Callable[[], SearchStrategy]]:
    """Class decorator: make a strategy available as ``--strategy NAME``."""
    def deco(factory: Callable[[], SearchStrategy]) -> Callable[[], SearchStrategy]:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        _STRATEGIES[name] = factory
        return factory
    return deco


def _load_builtin() -> None:
    from . import strategies  # noqa: F401 - registers slim and nsga2


def strategy_names() -> list[str]:
    """The registered strategy names, sorted.

    >>> strategy_names()
    ['nsga2', 'slim']
    """
    _load_builtin()
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> SearchStrategy:
    """A new instance of the strategy registered as ``name``.

    Raises:
        NasUserError: unknown name (the message lists the known ones).
    """
    _load_builtin()
    if name not in _STRATEGIES:
        raise NasUserError(f"--strategy must be one of {sorted(_STRATEGIES)}, got {name!r}")
    return _STRATEGIES[name]()


def pareto_front(cands: Sequence[Candidate], primary: str) -> list[Candidate]:
    """Candidates not dominated in (accuracy up, primary latency down, params down)."""
    def dominates(a: Candidate, b: Candidate) -> bool:
        ka = (a.accuracy, -a.latency_ms[primary], -a.params)
        kb = (b.accuracy, -b.latency_ms[primary], -b.params)
        return all(x >= y for x, y in zip(ka, kb)) and ka != kb
    return [c for c in cands if not any(dominates(o, c) for o in cands)]


def best_feasible(cands: Sequence[Candidate], primary: str) -> Candidate | None:
    """The most accurate candidate within every budget (ties: faster, then smaller); ``None`` if none is."""
    feasible = [c for c in cands if c.feasible]
    return max(feasible, key=lambda c: (c.accuracy, -c.latency_ms[primary], -c.params)) if feasible else None


def arch_from_params(space: SearchSpace, params: Mapping[str, object]) -> ArchConfig:
    """Decode an optuna parameter set of ``space`` (kept for callers of earlier versions: :meth:`SearchSpace.decode`)."""
    return space.decode(params)
