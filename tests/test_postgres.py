"""Many search workers on one PostgreSQL study: a real server, real ``nas-search`` processes, one SIGKILL.

A throwaway PostgreSQL server (``initdb`` in a fresh folder, Unix socket only; see ``_postgres``)
holds one optuna study. Two ``nas-search --strategy nsga2 --storage postgresql://...`` workers run
at once; one is SIGKILLed after it completed some trials and is restarted with the same
command. The study is then read with optuna directly.

The study must end with exactly ``--n-trials`` COMPLETE trials (``nas.study_slots``: each trial is
reserved under an advisory lock before it runs, and sends heartbeats while it runs). The trial
the kill interrupted stops beating; once it is older than the grace period a worker fails it and
its slot is run again, so it ends FAIL, and neither the count, the sampler nor the results read it.
"""
from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402
import _postgres as PG  # noqa: E402

N_TRIALS = 40
STUDY = "s1"
_STORAGES: dict[str, Any] = {}  # optuna storages the tests read studies through, one per URL


@pytest.fixture(scope="module")
def postgres() -> Iterator[PG.PostgresServer]:
    """A running throwaway server, stopped (``pg_ctl stop -m immediate``, else SIGKILL) even when a test fails."""
    bindir = PG.find_bindir()
    if bindir is None:
        pytest.fail(f"PostgreSQL's initdb is not installed: {PG.INSTALL_HINT}")
    server = PG.start_server(bindir)
    try:
        yield server
    finally:
        for storage in _STORAGES.values():
            storage.engine.dispose()
        _STORAGES.clear()
        server.stop()


def _load(url: str) -> Any:
    """The study, read with optuna directly (psycopg 3 named in the URL); one storage (one pool) per URL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg://", 1))
    return optuna.load_study(study_name=STUDY, storage=_STORAGES[url])


def _logged(log: Path) -> list[int]:
    """Trial numbers a worker reported done (the ``trial N: ...`` progress lines of ``log.err``, in order)."""
    err = Path(f"{log}.err")
    text = err.read_text(encoding="utf-8", errors="replace") if err.exists() else ""
    return [int(n) for n in re.findall(r"^trial (\d+):", text, flags=re.M)]


# ============================================================================ the storage URL
def test_plain_postgresql_url_opens_with_psycopg3(postgres: PG.PostgresServer) -> None:
    """``--storage postgresql://...`` (no driver named) works with the psycopg 3 we depend on.

    SQLAlchemy 2.0 maps a bare ``postgresql://`` to psycopg2 (2.1 to psycopg), so ``_storage``
    names psycopg itself.
    """
    import optuna
    import psycopg

    from nas.search_run import _storage
    from search_spaces.errors import NasUserError

    postgres.createdb("plain")
    url = postgres.url("plain")
    storage = _storage(url)
    assert storage.engine.dialect.driver == "psycopg"
    study = optuna.create_study(study_name="t", storage=storage, directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.5, 1.0]))
    with psycopg.connect(host=str(postgres.socket_dir), port=PG.PORT, user=PG.ROLE, dbname="plain") as conn:
        assert conn.execute("SELECT count(*) FROM trials").fetchone() == (1,)

    missing = postgres.url("nodb")
    with pytest.raises(NasUserError, match=r"--storage .*nodb.* cannot be opened .*nodb"):
        _storage(missing)


_OPEN = """
import sys, time
from pathlib import Path
import optuna
from nas.search_run import _storage
go, url = Path(sys.argv[1]), sys.argv[2]
Path(sys.argv[3]).touch()  # imported and waiting
while not go.exists():
    time.sleep(0.001)
optuna.create_study(study_name="nas-search", storage=_storage(url), load_if_exists=True,
                    directions=["maximize", "minimize", "minimize"])
"""


def test_workers_starting_together_can_open_a_fresh_postgresql_study(postgres: PG.PostgresServer,
                                                                     tmp_path: Path) -> None:
    """Six workers open one new database at the same moment: optuna's schema is created once, by one of them.

    Without a lock, concurrent ``CREATE TABLE``/``CREATE TYPE`` of optuna's schema fail in all but
    one (``duplicate key value violates unique constraint "pg_type_typname_nsp_index"``).
    """
    import subprocess

    import optuna

    postgres.createdb("fresh")
    url = postgres.url("fresh")
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN, str(go), url, str(r)], env=F.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in ready]
    try:
        F.wait_for(lambda: all(r.exists() for r in ready), timeout=120, what="six workers at the starting line")
        go.touch()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [o.strip().splitlines()[-1] for p, o in zip(procs, outs) if p.returncode != 0]
    assert not failed, f"{len(failed)} of 6 workers could not open a new PostgreSQL study: {failed}"
    storage = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg://", 1))
    assert [s.study_name for s in storage.get_all_studies()] == ["nas-search"]


# ============================================================================ two workers, one killed
def test_two_workers_share_a_postgresql_study_and_survive_a_kill(work: F.Shared, postgres: PG.PostgresServer,
                                                                    tmp_path: Path) -> None:
    folder = F.copy_workdir(work.path, tmp_path / "work")
    postgres.createdb("nas")
    url = postgres.url("nas")
    ex = F.space_extremes(work)
    small_ms, large_ms = ex["smallest"][1], ex["largest"][1]
    budget_ms = float(f"{small_ms + 0.5 * (large_ms - small_ms):.4f}")  # binds: about half the space is over it
    common = ["--latency", f"{budget_ms:.4f}ms", "--strategy", "nsga2", "--n-trials", str(N_TRIALS),
              "--population-size", "4", "--calib-batches", "1", "--threads", "1",
              "--storage", url, "--study-name", STUDY]
    cmd_a = [*common, "--seed", "1", "--out", "runs/pg-a"]
    cmd_b = [*common, "--seed", "2", "--out", "runs/pg-b"]
    logs = {name: tmp_path / name for name in ("a1", "b", "a2", "a3", "a4")}
    procs: dict[str, Any] = {}
    try:
        procs["a1"] = F.popen("nas-search", *cmd_a, cwd=folder, log=logs["a1"])
        procs["b"] = F.popen("nas-search", *cmd_b, cwd=folder, log=logs["b"])
        killed = _kill_a_mid_trial(procs, logs, url, cmd_a, folder)
        final_a = killed["restart"]
        procs[final_a] = F.popen("nas-search", *cmd_a, cwd=folder, log=logs[final_a])  # the same command again
        for name in ("b", final_a):
            procs[name].wait(timeout=400)
    finally:
        for p in procs.values():
            if p.poll() is None:
                F.kill_group(p)

    errs = {name: Path(f"{logs[name]}.err").read_text(encoding="utf-8", errors="replace") for name in procs}
    for name in ("b", final_a):
        assert procs[name].returncode == 0, f"worker {name} exited with {procs[name].returncode}:\n{errs[name][-4000:]}"
        assert "Traceback" not in errs[name], errs[name][-4000:]
    _check_study(url, killed, logs, procs, final_a)
    assert "cached accuracies" in errs[final_a], "the restarted worker must reuse its folder's accuracy cache"
    for out in ("runs/pg-a", "runs/pg-b"):
        sub = json.loads((folder / out / "subnet.json").read_text())
        assert sub["metrics"]["latency_ms"]["local-cpu"]["value"] <= budget_ms
        assert sub["provenance"]["search"]["strategy"] == "nsga2"
    import optuna

    values = [t.values for t in _load(url).get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    assert any(v[1] > budget_ms for v in values) and any(v[1] <= budget_ms for v in values), \
        "the latency budget must bind: some trials over it, some within"


def _kill_a_mid_trial(procs: dict[str, Any], logs: dict[str, Path], url: str, cmd_a: list[str],
                      folder: Path) -> dict[str, Any]:
    """SIGKILL worker A (``a1``) once both workers completed trials and A is inside a trial.

    A is killed while the study holds two running trials (one of them B's). Whether the SIGKILL
    still landed inside A's trial is only known afterwards (once B finished the trial it was
    running): if A's trial ended just before the kill, A is restarted and killed again, at most
    three times.
    """
    import optuna

    S = optuna.trial.TrialState
    out: dict[str, Any] = {"done_before": {}, "intervals": []}
    for attempt, name in enumerate(("a1", "a2", "a3")):
        if name != "a1":
            procs[name] = F.popen("nas-search", *cmd_a, cwd=folder, log=logs[name])
        need_a = 3 if name == "a1" else 1

        def ready() -> bool:
            if procs["b"].poll() is not None:
                pytest.fail(f"worker B exited ({procs['b'].returncode}) before A was killed: the workers never ran "
                            f"at once\n{Path(str(logs['b']) + '.err').read_text()[-3000:]}")
            a, b = _logged(logs[name]), _logged(logs["b"])
            if len(a) < need_a or len(b) < 1:
                return False
            trials = _load(url).get_trials(deepcopy=False)
            busy = sum(t.state in (S.COMPLETE, S.RUNNING) for t in trials)
            assert busy <= N_TRIALS - 6, f"A and B did not run at once (A did {a}, B did {b} of {N_TRIALS})"
            # B runs one trial at a time: with two trials running, A is inside one, so the kill lands there
            # (unless that trial ends in the few milliseconds before it)
            inside = sum(t.state == S.RUNNING for t in trials) >= 2
            return inside and _logged(logs[name]) == a  # no trial of A finished while the study was read
        F.wait_for(ready, proc=procs[name], timeout=300, what=f"worker {name} to complete {need_a} trials beside B")
        F.kill_group(procs[name])
        kill_time = datetime.datetime.now()
        post = {t.number: t for t in _load(url).get_trials(deepcopy=True)}
        running = {n for n, t in post.items() if t.state == S.RUNNING}
        # B runs one trial at a time: once it reports a trial numbered above every trial running at the
        # kill, the one it was running then is finished, so what is still unreported was A's.
        last = max(running, default=-1)
        F.wait_for(lambda: procs["b"].poll() is not None or max(_logged(logs["b"]), default=-1) > last,
                   timeout=120, what="worker B to finish the trial it was running at the kill")
        done_by_a = {n: post[n] for n in _logged(logs[name]) if post[n].state == S.COMPLETE}
        out["done_before"].update(done_by_a)
        out["intervals"] += [(t.datetime_start, t.datetime_complete) for t in done_by_a.values()]
        interrupted = running - set(_logged(logs["b"]))
        if interrupted:
            assert len(interrupted) == 1, f"A runs one trial at a time, yet {interrupted} were left running"
            (n,) = interrupted
            out["intervals"].append((post[n].datetime_start, kill_time))
            out.update(interrupted=n, killed=name, kill_time=kill_time, post=post,
                       restart=("a2", "a3", "a4")[attempt])
            return out
    pytest.fail("three SIGKILLs of worker A all landed between two trials")


def _check_study(url: str, killed: dict[str, Any], logs: dict[str, Path], procs: dict[str, Any],
                 final_a: str) -> None:
    import optuna

    S = optuna.trial.TrialState
    trials = _load(url).get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), f"trial numbers must be unique and contiguous: {numbers}"
    assert len({t._trial_id for t in trials}) == len(trials)
    complete = {t.number: t for t in trials if t.state == S.COMPLETE}
    assert len(complete) == N_TRIALS, f"{len(complete)} COMPLETE trials for --n-trials {N_TRIALS}"

    # the interrupted trial: failed once its heartbeat went stale, never counted
    z = killed["interrupted"]
    others = {t.number: t.state.name for t in trials if t.state != S.COMPLETE}
    assert others == {z: "FAIL"}, f"only the killed worker's trial may be unfinished, and it ends FAIL: {others}"

    # nothing ran twice: each worker's reported trials are its own, and together they are the COMPLETE ones
    reported = {name: _logged(logs[name]) for name in procs}
    for name, nums in reported.items():
        assert len(nums) == len(set(nums)), f"worker {name} reported a trial twice: {nums}"
    seen: dict[int, str] = {}
    for name, nums in reported.items():
        for n in nums:
            assert n not in seen, f"trial {n} was reported by worker {seen[n]} and worker {name}"
            seen[n] = name
    assert set(seen) - {z} == set(complete), "the COMPLETE trials are exactly those the workers reported"
    # B must have run trials. The restarted worker may find the study finished when it connects (B alone can
    # complete it while the restart imports torch and loads the supernet): its rejoining is checked by its
    # exit code and its reuse of the folder's accuracy cache, asserted by the caller.
    assert reported["b"], f"worker B ran no trials: {reported}"
    assert reported[final_a] or len(complete) >= N_TRIALS, f"the restarted worker left the study short: {reported}"

    # every trial A had completed before the kill is still there, unchanged
    before = killed["done_before"]
    assert len(before) >= 3
    for n, t in before.items():
        now = complete.get(n)
        assert now is not None, f"trial {n}, completed by A before the kill, is gone"
        assert (now.values, now.params, now.datetime_complete, now.user_attrs["arch"]) == \
            (t.values, t.params, t.datetime_complete, t.user_attrs["arch"])

    # the two workers ran at once: a trial of B overlaps, in the study's own timestamps, a trial of A
    b_trials = [complete[n] for n in reported["b"] if n in complete and complete[n].datetime_complete
                < killed["kill_time"]]
    assert b_trials, "B completed no trial before A was killed"
    overlaps = [(a, b.number) for a in killed["intervals"] for b in b_trials
                if a[0] < b.datetime_complete and b.datetime_start < a[1]]
    assert overlaps, f"no trial of B ran while a trial of A ran: A {killed['intervals']}, B {b_trials}"
