"""The suite's own rules (conftest), checked on small throwaway suites run by pytest itself.

A skip for any reason but the two allowed ones (CoreML prediction off macOS, CUDA-only paths),
an xfail, or a skipped module makes the session fail; the allowed skips do not.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent


def _suite(pytester: pytest.Pytester, **files: str) -> pytest.RunResult:
    for name in ("conftest.py", "_fixtures_search.py"):
        shutil.copy(HERE / name, pytester.path / name)
    pytester.makepyfile(**files)
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")


def test_only_the_allowed_skips_pass(pytester: pytest.Pytester) -> None:
    result = _suite(pytester, test_ok="""
import pytest

def test_runs():
    assert True

@pytest.mark.macos_only
def test_coreml_prediction():
    import sys
    assert sys.platform == "darwin"

@pytest.mark.cuda_only
def test_gpu():
    import torch
    assert torch.cuda.is_available()
""")
    assert result.ret == 0, result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 1 and outcomes.get("skipped", 0) + outcomes["passed"] == 3


@pytest.mark.parametrize("body, what", [
    ("import pytest\n\ndef test_a():\n    pytest.skip('not today')\n", "skipped (not today)"),
    ("import pytest\n\n@pytest.mark.skipif(True, reason='no reason')\ndef test_a():\n    pass\n", "skipped (no reason)"),
    ("import pytest\n\n@pytest.mark.xfail(reason='known')\ndef test_a():\n    assert False\n", "marked xfail (known)"),
    ("import pytest\npytest.importorskip('no_such_module_here')\n\ndef test_a():\n    pass\n",
     "the whole module skipped"),
], ids=["skip", "skipif", "xfail", "importorskip"])
def test_any_other_skip_fails_the_session(pytester: pytest.Pytester, body: str, what: str) -> None:
    result = _suite(pytester, test_bad=body)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    out = result.stdout.str()
    assert "skips that are not allowed" in out and what in out, out
