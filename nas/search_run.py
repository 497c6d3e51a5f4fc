"""``run_search``: the one entry point of a search, from working-folder defaults to written results.

It runs in three pieces: resolve the inputs (supernet run, devices, budgets, LUTs), run the
strategy found by name in the registry (:func:`nas.search.get_strategy`), and write the reports.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from search_spaces import TASKS, LoweringSetup, format_resolution
from search_spaces.errors import NasUserError
from search_spaces.fileio import atomic_write_json
from search_spaces.subnet_file import SubnetFile

from .objectives import Budgets, MesWeights
from .search import Candidate, LatencyModel, Scorer, SearchOutcome, SearchSettings, get_strategy
from .study_slots import heartbeat_options, sqlite_lock

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from search_spaces import ArchConfig, BlockSpec
    from supernet.elastic import Supernet
    from supernet.run import SupernetRun

__all__ = ["SearchRunConfig", "SearchResult", "NoFeasibleSubnet", "run_search", "find_luts", "deploy_setup", "load_latency_models"]

logger = logging.getLogger(__name__)


class NoFeasibleSubnet(NasUserError):
    """No evaluated subnet meets every budget (the CLI exits with code 3)."""


@dataclass(frozen=True)
class SearchRunConfig:
    """A search as the user asked for it (each field is one ``nas-search`` flag)."""

    latency: tuple[str, ...] = ()
    device: str | None = None
    max_params: str | None = None
    max_macs: str | None = None
    supernet: str | None = None
    luts: tuple[str, ...] = ()
    out: str = "runs/search"
    val_images: int = 2000
    calib_batches: int = 4
    settings: SearchSettings = field(default_factory=SearchSettings)
    mes: MesWeights = field(default_factory=MesWeights)
    resolution: tuple[int, int] | None = None
    task: str = "classify"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise NasUserError(f"--task must be one of {list(TASKS)}, got {self.task!r}")
        if self.val_images < 10:
            raise NasUserError(f"--val-images must be >= 10, got {self.val_images}")
        if self.calib_batches < 1:
            raise NasUserError(f"--calib-batches must be >= 1, got {self.calib_batches}")


@dataclass
class SearchResult:
    """What :func:`run_search` wrote: the chosen candidate, its ``subnet.json`` and every file by name."""

    out: Path
    best: Candidate
    subnet: SubnetFile
    outcome: SearchOutcome
    files: dict[str, Path]


@dataclass(frozen=True)
class _Inputs:
    """Everything a search needs, resolved and checked before anything is written."""

    run: SupernetRun
    budgets: Budgets
    models: dict[str, LatencyModel]
    primary: str
    deploy: LoweringSetup


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deploy_setup(run: SupernetRun, resolution: tuple[int, int] | None, task: str) -> LoweringSetup:
    """The setup budgets apply to: the run's, at ``resolution`` (default: the run's) and for ``task``."""
    return run.setup.replace(resolution=resolution or run.setup.resolution, task=task)


def find_luts(folder: Path, setup: LoweringSetup) -> dict[str, Path]:
    """LUT files named as ``nas-build-lut`` names them for ``setup`` in ``folder``, by device."""
    from latency.lut import default_lut_path

    name = default_lut_path("DEVICE", setup.resolution, task=setup.task).name
    head, tail = name.split("DEVICE")
    return {p.name[len(head): -len(tail)]: p for p in sorted(folder.glob(f"{head}*{tail}"))}


def _build_hint(device: str, setup: LoweringSetup, run: SupernetRun) -> str:
    hint = f"nas-build-lut --device {device}"
    if setup.resolution != run.setup.resolution:
        hint += f" --resolution {format_resolution(setup.resolution)}"
    if setup.task != "classify":
        hint += f" --task {setup.task}"
    return hint


def load_latency_models(devices: list[str], explicit: dict[str, Path], run: SupernetRun,
                        setup: LoweringSetup | None = None) -> dict[str, LatencyModel]:
    """One :class:`LatencyModel` per device from its LUT, refusing LUTs of another device, setup or space.

    ``setup`` is the deployment the budgets apply to (default: the run's own).
    """
    from latency import LatencyTable, predict_latency
    from latency.lut import default_lut_path

    setup = setup or run.setup
    where = format_resolution(setup.resolution) + (f", task {setup.task}" if setup.task != "classify" else "")
    models = {}
    for device in devices:
        path = explicit.get(device) or default_lut_path(device, setup.resolution, task=setup.task)
        if not path.is_file():
            raise NasUserError(f"no latency LUT for device {device!r} at resolution {where} ({path}); "
                               f"run: {_build_hint(device, setup, run)}")
        lut = LatencyTable.load(path)
        lut.check_compatible(device=device, resolution=setup.resolution, space_hash=run.space.hash,
                             task=setup.task)
        if not lut.complete:  # refuse before anything is written, not halfway through the search
            raise NasUserError(f"LUT {str(path)!r} is incomplete ({len(lut)} of {lut.expected_entries} entries, an "
                               f"interrupted build); finish it with: {_build_hint(device, setup, run)} (it resumes)")
        models[device] = LatencyModel(device, lambda arch, lut=lut: predict_latency(arch, lut),
                                      lut.source_label, str(path), _sha256(path), lut)
    return models


def _default_device(cfg: SearchRunConfig, run: SupernetRun, setup: LoweringSetup, explicit: dict[str, Path],
                    say: Callable[[str], None]) -> str | None:
    """``--device``, else (when a bare ``--latency`` or none is given) the device of the newest LUT here."""
    if cfg.device is not None:
        return cfg.device
    bare = [v for v in cfg.latency if "=" not in v]
    if not bare and cfg.latency:
        return None
    found = {**find_luts(Path("."), setup), **explicit}
    if not found:
        where = format_resolution(setup.resolution) + (f" (task {setup.task})" if setup.task != "classify" else "")
        raise NasUserError(f"no latency LUT for resolution {where} in this folder; "
                           f"run: {_build_hint('DEVICE', setup, run)} (DEVICE: e.g. iphone12 or local-cpu)")
    # several LUTs: the one built last is the one the user just asked for
    device = max(found, key=lambda d: (found[d].stat().st_mtime_ns, d))
    others = sorted(set(found) - {device})
    say(f"nas-search: using device {device!r} from {found[device]}"
        + (f" (the newest LUT; also here: {', '.join(others)})" if others else "")
        + " (set --device to choose)")
    return device


def _resolve(cfg: SearchRunConfig, say: Callable[[str], None]) -> _Inputs:
    """The supernet run, budgets and latency models of ``cfg``, from the working folder's defaults."""
    from latency import LatencyTable
    from supernet.run import find_latest_run, load_run

    # the budgets' values first, so that a typo is named before any file is looked for (the device of a
    # bare --latency is only known once the LUTs are found; "" stands in for it, as no device has that name)
    Budgets.parse(cfg.latency, default_device=cfg.device or "", max_params=cfg.max_params, max_macs=cfg.max_macs)
    if cfg.supernet is None:
        run_dir = find_latest_run(".")
        say(f"nas-search: using the latest supernet run {run_dir} (set --supernet to choose)")
    else:
        run_dir = Path(cfg.supernet)
    run = load_run(run_dir)
    setup = deploy_setup(run, cfg.resolution, cfg.task)
    if setup != run.setup:
        say(f"nas-search: budgets apply to the deployment at {format_resolution(setup.resolution)}"
            + (f" as a {setup.task}" if setup.task != "classify" else "")
            + f"; accuracy is the supernet's at its training input {format_resolution(run.setup.resolution)}")
    explicit = {LatencyTable.load(Path(item)).device: Path(item) for item in cfg.luts}
    default_device = _default_device(cfg, run, setup, explicit, say)
    budgets = Budgets.parse(cfg.latency, default_device=default_device, max_params=cfg.max_params,
                            max_macs=cfg.max_macs)
    devices = list(dict.fromkeys([*([default_device] if default_device else []), *budgets.latency_ms]))
    return _Inputs(run, budgets, load_latency_models(devices, explicit, run, setup), devices[0], setup)


def run_search(cfg: SearchRunConfig, *, notify: Callable[[str], None] | None = None,
               progress: Callable[[str], None] | None = None) -> SearchResult:
    """Find the most accurate subnet within every budget, and write ``subnet.json`` and the reports.

    Defaults come from the working folder: the latest finished supernet run, and the
    ``lut-<device>-<resolution>.json`` files for that run's resolution (or for ``cfg.resolution``
    and ``cfg.task``: latency, params and MACs are then those of that deployment).

    Raises:
        NasUserError: bad budgets, no supernet run, no or incompatible LUT.
        NoFeasibleSubnet: nothing meets the budgets (the message gives the smallest reachable figures).
    """
    from supernet.run import load_supernet

    from .accuracy import AccuracyEvaluator, load_run_splits

    say = notify or logger.info
    inputs = _resolve(cfg, say)
    strategy = get_strategy(cfg.settings.strategy)
    check = getattr(strategy, "check", None)   # a strategy may refuse a space before anything is written
    if check is not None:
        check(inputs.run.space)
    unreachable = _unreachable(inputs)
    if unreachable is not None:
        raise unreachable
    net = load_supernet(inputs.run)
    splits = load_run_splits(inputs.run)
    storage = _storage(cfg.settings.storage) if strategy.uses_study and cfg.settings.storage else None
    out = Path(cfg.out)  # everything the search needs is checked: only now is the output folder made
    out.mkdir(parents=True, exist_ok=True)
    if strategy.uses_study and storage is None:
        storage = _storage(f"sqlite:///{(out / 'study.db').resolve()}")
    evaluator = AccuracyEvaluator(net, splits, val_images=cfg.val_images, calib_batches=cfg.calib_batches,
                                  seed=cfg.settings.seed, cache_path=out / "accuracy_cache.jsonl",
                                  identity=inputs.run.weights_sha256,
                                  prefix_cache_bytes=cfg.settings.prefix_cache_mb << 20)
    if len(evaluator):
        say(f"nas-search: {len(evaluator)} cached accuracies in {out / 'accuracy_cache.jsonl'} will be reused")
    scorer = Scorer(space=inputs.run.space, accuracy=evaluator, latency=inputs.models, budgets=inputs.budgets,
                    primary_device=inputs.primary, lower=_lowering(net, inputs.deploy), weights=cfg.mes)
    outcome = strategy.run(scorer, cfg.settings, progress=progress, storage=storage)
    outcome.evaluated = evaluator.evaluated
    outcome.stats.update(evaluated_full=evaluator.evaluated_full, evaluated_images=evaluator.evaluated_images,
                         validation_images=evaluator.n_images)
    files = _write_reports(out, cfg, inputs, outcome)
    if outcome.best is None:
        raise _no_feasible(scorer, inputs, outcome)
    sub = _subnet_file(outcome.best, cfg, inputs, net, out)
    files["subnet.json"] = sub.save(out / "subnet.json")
    return SearchResult(out, outcome.best, sub, outcome, files)


def _lowering(net: Supernet, setup: LoweringSetup) -> Callable[[ArchConfig], tuple[BlockSpec, ...]]:
    """``arch -> specs`` for the exact counts: the supernet's own lowering when it is the deployment."""
    if setup == net.setup:
        return net.lower
    from search_spaces import lower

    return lambda arch: lower(arch, setup)


def _write_reports(out: Path, cfg: SearchRunConfig, inputs: _Inputs, outcome: SearchOutcome) -> dict[str, Path]:
    """``pareto.csv``, ``pareto.png``, ``pareto.html``, ``path.csv`` (slim), ``search.json``; the console table."""
    from .report import plot_pareto_png, summary_table, write_csv, write_pareto_csv, write_pareto_html

    primary, budgets = inputs.primary, inputs.budgets
    files: dict[str, Path] = {}
    lat_budget = budgets.latency_ms.get(primary)
    source = inputs.models[primary].source
    files["pareto.csv"] = write_pareto_csv(out / "pareto.csv", outcome.candidates, primary)
    files["pareto.png"] = plot_pareto_png(out / "pareto.png", outcome.candidates, primary, budget_ms=lat_budget,
                                          source=source, best=outcome.best)
    files["pareto.html"] = write_pareto_html(out / "pareto.html", outcome.candidates, primary, budget_ms=lat_budget,
                                             budgets_text=_budgets_text(budgets), source=source, best=outcome.best)
    if outcome.path:
        files["path.csv"] = write_csv(out / "path.csv", outcome.path)
    summary = {
        "strategy": cfg.settings.strategy, "settings": asdict(cfg.settings), "budgets": budgets.to_dict(),
        "primary_device": primary, "seconds": outcome.seconds, "candidates": len(outcome.candidates),
        "evaluated": outcome.evaluated,
        "candidates_per_minute": 60 * len(outcome.candidates) / max(outcome.seconds, 1e-9),
        "supernet_run": str(inputs.run.path), "feasible": sum(c.feasible for c in outcome.candidates),
        **outcome.stats,
    }
    files["search.json"] = atomic_write_json(out / "search.json", summary)
    print(summary_table(outcome.candidates, primary, best=outcome.best), file=sys.stderr)
    return files


def _unreachable(inputs: _Inputs) -> NoFeasibleSubnet | None:
    """The error for a budget that no config of the space meets on its own, before anything is evaluated.

    Each figure is additive over a network's units, so its least value over the whole space is
    exact and cheap (:func:`search_spaces.enumerate.cheapest`; a fraction of a second for the
    full V2 space). Budgets that each fit but not together are still found by the search.
    """
    from latency import fastest
    from search_spaces import count_macs, count_params
    from search_spaces.enumerate import cheapest

    space, budgets, setup = inputs.run.space, inputs.budgets, inputs.deploy
    misses = []
    for device, budget in budgets.latency_ms.items():
        floor, arch = fastest(space, inputs.models[device].table)
        if floor > budget * (1 + 1e-9):
            misses.append(f"{device} {floor:.3f} ms > {budget:g} ms (the fastest config on that LUT: {arch.to_string()})")
    for name, limit, count, unit in (("params", budgets.max_params, count_params, "M params"),
                                     ("MACs", budgets.max_macs, count_macs, "M MACs")):
        if limit is not None:
            least, arch = cheapest(space, setup, lambda spec, count=count: count([spec]))
            if least > limit:
                misses.append(f"{least / 1e6:.3f}{unit} > {limit / 1e6:g}{unit} (the config with the fewest "
                              f"{name}: {arch.to_string()})")
    if not misses:
        return None
    return NoFeasibleSubnet(
        f"no subnet of space {space.name!r} can meet the budgets ({_budgets_text(budgets)}): its least figures are "
        + "; ".join(misses) + ". Loosen the budget, or search a space or deployment resolution that reaches it")


def _no_feasible(scorer: Scorer, inputs: _Inputs, outcome: SearchOutcome) -> NoFeasibleSubnet:
    """The error for a search without a feasible candidate, naming the smallest figures the space reaches."""
    params, macs, lat = scorer.cheap(inputs.run.space.smallest())
    reach = ", ".join(f"{d} {v:.3f} ms" for d, v in lat.items())
    return NoFeasibleSubnet(
        f"no subnet meets the budgets ({_budgets_text(inputs.budgets)}) among {len(outcome.candidates)} candidates; "
        f"the smallest config of the space reaches {reach}, {params / 1e6:.3f}M params, {macs / 1e6:.1f}M MACs")


def _subnet_file(best: Candidate, cfg: SearchRunConfig, inputs: _Inputs, net: Supernet, out: Path) -> SubnetFile:
    """``subnet.json`` of the chosen candidate, with its figures and provenance."""
    from ._provenance import environment

    run, models, deploy = inputs.run, inputs.models, inputs.deploy
    return SubnetFile(
        best.arch, resolution=deploy.resolution, num_classes=deploy.num_classes, in_chans=deploy.in_chans,
        distillation=net.lower(best.arch)[-1].distillation, task=deploy.task,
        metrics={
            "params": best.params, "macs": best.macs, "proxy_accuracy": best.accuracy, "mes": best.mes,
            "latency_ms": {d: {"value": v, "source": models[d].source} for d, v in best.latency_ms.items()},
        },
        provenance={
            "supernet_run": str(run.path.resolve()), "supernet_sha256": run.weights_sha256,
            "space_name": run.space.name, "space_hash": run.space.hash,
            "luts": {d: {"path": str(Path(m.lut_path).resolve()), "sha256": m.lut_sha256, "source": m.source}
                     for d, m in models.items()},
            "search": {"strategy": cfg.settings.strategy, "budgets": inputs.budgets.to_dict(), "folder": str(out)},
            "command": sys.argv, "environment": environment(),
        },
    )


def _storage(url: str) -> BaseStorage:
    """An optuna storage for ``url``; a URL that optuna cannot open is the user's mistake."""
    import warnings

    import optuna

    try:
        with warnings.catch_warnings():  # heartbeats: "experimental" in optuna's words, stable since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _open_storage(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy and the drivers raise many kinds
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NasUserError(f"--storage {url!r} cannot be opened ({first}); give an optuna storage URL such as "
                           f"sqlite:///study.db or postgresql://user:password@host/db") from None


def _open_storage(url: str) -> BaseStorage:
    import optuna

    if url.startswith("sqlite:///"):
        # Workers that start together on a fresh file race to create optuna's schema: one at a time.
        with sqlite_lock(Path(url[len("sqlite:///"):])):
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}},
                                              **heartbeat_options())
    if url.startswith(("postgresql://", "postgres://")):  # psycopg 3, whatever SQLAlchemy's default driver
        return _postgres_storage("postgresql+psycopg://" + url.split("://", 1)[1])
    if url.startswith("postgresql+"):
        return _postgres_storage(url)
    return optuna.storages.get_storage(url)


def _postgres_storage(url: str) -> Any:
    """Workers that start together on a fresh database race to create optuna's schema: one at a time."""
    import optuna
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:  # the lock is held until this transaction ends
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(7234010511)"))
            return optuna.storages.RDBStorage(url, **heartbeat_options())
    finally:
        engine.dispose()


def _budgets_text(b: Budgets) -> str:
    parts = [f"{d} <= {v:g} ms" for d, v in b.latency_ms.items()]
    if b.max_params is not None:
        parts.append(f"params <= {b.max_params / 1e6:g}M")
    if b.max_macs is not None:
        parts.append(f"MACs <= {b.max_macs / 1e6:g}M")
    return ", ".join(parts) or "no budgets"
