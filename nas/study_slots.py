"""Exactly ``n_trials`` complete trials in an optuna study that several workers share, any of them killable.

optuna's own stopping rule (``MaxTrialsCallback``) counts after each trial, so k workers can
finish up to k - 1 trials over the count. Here a worker **reserves** a trial before running it:
under a lock shared by every worker of the storage (a PostgreSQL advisory lock, or a lock file
beside a SQLite database), it counts the COMPLETE trials and the reserved trials still RUNNING,
and asks for a new trial only when their sum is below ``n_trials``. A reserved trial sends a
heartbeat every :data:`HEARTBEAT_S` seconds while it runs; when a worker is killed its heartbeat
stops, and after :data:`GRACE_S` seconds any worker fails the trial (optuna's
``fail_stale_trials``) and the slot opens again. A worker whose study is full except for trials
running elsewhere waits for them, so every worker returns only once the study holds exactly
``n_trials`` COMPLETE trials. RUNNING trials left by versions without reservations are ignored.
"""
from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage

__all__ = ["GRACE_S", "HEARTBEAT_S", "RESERVED", "heartbeat_options", "run_trials", "sqlite_lock"]

#: Seconds between two heartbeats of a running trial.
HEARTBEAT_S = 5
#: Seconds without a heartbeat after which a reserved RUNNING trial is failed (its worker is gone).
GRACE_S = 15
#: The system attribute that marks a trial as reserved by :func:`run_trials`.
RESERVED = "nas_reserved"
_PG_LOCK_KEY = 7234010512


def heartbeat_options() -> dict[str, int]:
    """Keyword arguments for ``optuna.storages.RDBStorage`` that turn heartbeats on."""
    return {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}


@contextlib.contextmanager
def sqlite_lock(db: Path) -> Iterator[None]:
    """The lock file beside SQLite database ``db``, held for the short sections its workers must not share."""
    import fcntl

    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _workers_lock(storage: BaseStorage) -> Iterator[None]:
    """Held by one worker of ``storage`` at a time (a no-op for storages that live in one process)."""
    storage = getattr(storage, "_backend", storage)  # a study wraps an RDBStorage in optuna's cache
    engine = getattr(storage, "engine", None)
    if engine is None:
        yield
        return
    if engine.dialect.name == "postgresql":
        import sqlalchemy

        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_PG_LOCK_KEY})"))
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({_PG_LOCK_KEY})"))
                conn.commit()
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with sqlite_lock(Path(engine.url.database)):
            yield
    else:
        yield


class _Heartbeat:
    """Records the trial's heartbeat every :data:`HEARTBEAT_S` seconds until closed (the first beat is
    :func:`_reserve`'s)."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if hasattr(storage, "record_heartbeat"):
            self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)
            self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat only brings staleness closer
                self.storage.record_heartbeat(self.trial_id)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _reserve(study: optuna.Study, n_trials: int) -> tuple[optuna.Trial | None, int, int]:
    """A new reserved trial, or None; with the COMPLETE count and the reserved trials running elsewhere."""
    import optuna

    S = optuna.trial.TrialState
    with _workers_lock(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since optuna 2.9
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False, states=(S.COMPLETE, S.RUNNING))
        complete = sum(t.state == S.COMPLETE for t in trials)
        running = sum(t.state == S.RUNNING and bool(t.system_attrs.get(RESERVED)) for t in trials)
        if complete + running >= n_trials:
            return None, complete, running
        with warnings.catch_warnings():  # "heartbeats are meant for Study.optimize": we beat ourselves
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        storage = study._storage  # optuna has no public accessor; its own heartbeat helpers read it too
        storage.set_trial_system_attr(trial._trial_id, RESERVED, True)
        if hasattr(storage, "record_heartbeat"):
            storage.record_heartbeat(trial._trial_id)  # the first beat, before any other worker counts
        return trial, complete, running


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float | Sequence[float]], n_trials: int, *,
               say: Callable[[str], None] | None = None, poll_s: float = 1.0) -> None:
    """Run trials of ``objective`` until ``study`` holds exactly ``n_trials`` COMPLETE trials.

    A trial whose objective raises is told FAIL (and the exception goes on); its slot reopens.
    ``say`` is told once when this worker starts waiting for trials running in other workers.
    """
    waiting = False
    while True:
        trial, complete, running = _reserve(study, n_trials)
        if trial is None:
            if complete >= n_trials:
                return
            if not waiting and say is not None:
                say(f"waiting for {running} trial(s) running in other workers to finish the study "
                    f"({complete}/{n_trials} complete; a killed worker's trial is failed after {GRACE_S} s "
                    f"without a heartbeat, and its slot reopens)")
            waiting = True
            time.sleep(poll_s)
            continue
        waiting = False
        beat = _Heartbeat(study._storage, trial._trial_id)
        try:
            values = objective(trial)
        except BaseException:
            import optuna

            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        finally:
            beat.close()
        study.tell(trial, values)
