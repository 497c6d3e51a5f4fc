"""Exactly ``n_trials`` COMPLETE trials with several workers on one real SQLite study, one of them killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402

_WORKER = """
import sys, time
from pathlib import Path
import optuna
from nas.study_slots import run_trials
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, n, go, hang_on = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
import warnings; warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2,
                                     engine_kwargs={"connect_args": {"timeout": 60}})
study = optuna.load_study(study_name="s", storage=storage)
while not go.exists():
    time.sleep(0.01)
def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    if hang_on >= 0 and trial.number == hang_on:
        print("hanging", trial.number, flush=True)
        time.sleep(600)  # killed here
    time.sleep(0.02)
    return x
run_trials(study, objective, n, say=lambda m: print(m, flush=True), poll_s=0.2)
print("done", flush=True)
"""


def _study(tmp_path: Path) -> str:
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=url)
    return url


def _states(url: str) -> dict[str, int]:
    import optuna

    trials = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_three_workers_finish_with_exactly_n_complete_trials(tmp_path: Path) -> None:
    url, go = _study(tmp_path), tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, url, "23", str(go), "-1"], env=F.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    go.touch()
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert _states(url) == {"COMPLETE": 23}, "optuna's MaxTrialsCallback would let k workers end up to k-1 over"


def test_a_killed_workers_trial_is_failed_and_its_slot_reopens(tmp_path: Path) -> None:
    url, go = _study(tmp_path), tmp_path / "go"
    go.touch()
    killed = subprocess.Popen([sys.executable, "-c", _WORKER, url, "5", str(go), "2"], env=F.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert killed.stdout is not None
    line = killed.stdout.readline()
    assert line.startswith("hanging 2"), line + killed.stdout.read()
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert _states(url) == {"COMPLETE": 2, "RUNNING": 1}
    rest = subprocess.run([sys.executable, "-c", _WORKER, url, "5", str(go), "-1"], env=F.env(),
                          capture_output=True, text=True, timeout=240)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    # the restarted worker runs trials while 2 complete + 1 reserved are below 5; the killed trial holds
    # the fifth slot until its heartbeat is 2 s old (the worker waits, saying so, if it gets there first)
    import optuna

    trials = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    assert _states(url) == {"COMPLETE": 5, "FAIL": 1}
    assert [t.number for t in trials if t.state.name == "FAIL"] == [2]


def test_a_failing_objective_is_told_fail_and_raises(tmp_path: Path) -> None:
    import optuna

    from nas.study_slots import run_trials

    url = _study(tmp_path)
    study = optuna.load_study(study_name="s", storage=url)

    def objective(trial: optuna.Trial) -> list[float]:
        if trial.number == 1:
            raise RuntimeError("boom")
        return [trial.suggest_float("x", 0, 1)]

    with pytest.raises(RuntimeError, match="boom"):
        run_trials(study, objective, 4)
    assert _states(url) == {"COMPLETE": 1, "FAIL": 1}
    run_trials(study, lambda t: [t.suggest_float("x", 0, 1)], 4)  # the failed slot is open again
    assert _states(url) == {"COMPLETE": 4, "FAIL": 1}
