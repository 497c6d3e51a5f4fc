"""Suite-wide rules and the shared working folders.

1. **No silent skips.** The only tests allowed to skip are those marked ``macos_only`` (CoreML
   prediction runs only on macOS) and ``cuda_only`` (the GPU recipe). This file skips them where
   they cannot run, with a fixed reason; any other skip, xfail or skipped module makes the session
   fail (exit code 1), and the summary lists each one with its reason.
2. **Shared folders are read-only.** The working folders built once per session (``work``:
   ``nas-train`` + ``nas-build-lut``; ``searched``: the default ``nas-search`` in a copy of it;
   ``extracted``: ``nas-extract subnet.json`` in a copy of that; ``iphone``: ``nas-build-lut
   --device iphone12`` in another copy) are only read. A test that runs a command there first takes
   a private copy (:func:`_fixtures_search.copy_folder`; files are copied, never hard-linked). After
   every test that used one, the folder's tree (paths, sizes, modification times) must be unchanged,
   and at the end of the session every file's SHA-256 must be too; the test that wrote into it fails.
3. **Order.** ``make test`` runs in random order (pytest-randomly prints its seed in the header)
   in two worker processes (pytest-xdist, ``--dist loadfile``: each module runs whole on one
   worker, in the seed's order). Each shared folder is built once per run, by the first worker
   that needs it (under a lock; the others wait and then load its record). A worker runs torch on
   one thread; the commands the tests start choose their own threads. Rerun one order
   in one process with ``-p randomly --randomly-seed=N -n 0``. ``--reverse-order`` (with
   ``-p no:randomly``) runs the suite backwards, to show that no test depends on another's files.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures_search as F  # noqa: E402

#: The only reasons a test may skip for (set here, by marker).
MACOS_REASON = "CoreML prediction needs macOS (coremltools converts anywhere but runs models only on macOS)"
CUDA_REASON = "needs a CUDA GPU (the GPU recipe: --device cuda, bf16, --compile)"
ALLOWED_SKIPS = {MACOS_REASON, CUDA_REASON}

_bad_skips: list[str] = []


# ============================================================================ options and markers
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reverse-order", action="store_true",
                     help="run the tests in reverse order (use with -p no:randomly)")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers on two cores: torch's default (a thread per core) in each would put four
        # busy threads on two cores, and OpenMP's spinning threads then slow both workers down.
        import torch

        torch.set_num_threads(1)
    config.addinivalue_line("markers", f"macos_only: skipped off macOS ({MACOS_REASON})")
    config.addinivalue_line("markers", f"cuda_only: skipped without a CUDA GPU ({CUDA_REASON})")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse-order"):
        items.reverse()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("macos_only") is not None and sys.platform != "darwin":
        pytest.skip(MACOS_REASON)
    if item.get_closest_marker("cuda_only") is not None and not _cuda_available():
        pytest.skip(CUDA_REASON)


# ============================================================================ no silent skips
def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if hasattr(report, "wasxfail"):
        _bad_skips.append(f"{report.nodeid}: marked xfail ({report.wasxfail or 'no reason'})")
    elif report.skipped and _skip_reason(report) not in ALLOWED_SKIPS:
        _bad_skips.append(f"{report.nodeid}: skipped ({_skip_reason(report)})")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _bad_skips.append(f"{report.nodeid}: the whole module skipped ({_skip_reason(report)})")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _bad_skips and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.has_plugin("randomly"):
        terminalreporter.line(f"random order: rerun this order with -p randomly --randomly-seed={seed} "
                               f"(add -n 0 for one process)")
    if _bad_skips:
        terminalreporter.section("skips that are not allowed (the session fails)", red=True)
        terminalreporter.line(f"only these reasons may skip: {sorted(ALLOWED_SKIPS)}")
        for line in _bad_skips:
            terminalreporter.line(line)


# ============================================================================ the shared folders
@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """After a test that used a shared folder: the folder must be exactly as it was."""
    result = yield
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, F.Shared):
            value.check_unchanged()
    return result


def _shared(name: str, tmp_path_factory: pytest.TempPathFactory,
            build: Callable[[Path], F.Shared]) -> Iterator[F.Shared]:
    """Build a shared folder once per run: the first worker that needs it builds it under a lock
    (the others wait), records it beside the folder, and every later worker loads that record.
    A build that failed leaves no record, so the next worker that needs the folder tries again."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # common to this run's workers
    folder, record = root / f"nas-{name}", root / f"nas-{name}.json"
    with open(root / f"nas-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file():
            shared = F.Shared.load(record)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            shared = build(folder)
            shared.save(record)
    yield shared
    shared.check_unchanged(deep=True)


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[F.Shared]:
    """nas-train (synthetic data, 1 epoch) + nas-build-lut --device local-cpu; read-only."""
    yield from _shared("work", tmp_path_factory, F.build_work)


@pytest.fixture(scope="session")
def searched(work: F.Shared, tmp_path_factory: pytest.TempPathFactory) -> Iterator[F.Shared]:
    """The default ``nas-search --latency X --max-params Y`` in a copy of ``work``; read-only."""
    yield from _shared("searched", tmp_path_factory, lambda root: F.build_searched(work, root))


@pytest.fixture(scope="session")
def extracted(searched: F.Shared, tmp_path_factory: pytest.TempPathFactory) -> Iterator[F.Shared]:
    """``nas-extract subnet.json`` (every format) in a copy of ``searched``; read-only."""
    yield from _shared("extracted", tmp_path_factory, lambda root: F.build_extracted(searched, root))


@pytest.fixture(scope="session")
def iphone(work: F.Shared, tmp_path_factory: pytest.TempPathFactory) -> Iterator[F.Shared]:
    """``nas-build-lut --device iphone12`` as typed, in a copy of ``work``; read-only."""
    yield from _shared("iphone", tmp_path_factory, lambda root: F.build_iphone(work, root))
