"""The house limits of the library's code: modules under 500 lines, functions under 80, no DESIGN.md outside docs/.

``latency/bundle_runner.py`` is the one exception to the module limit: it is copied alone into
device bundles, so it cannot import helpers, and its header says so.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search_spaces", "supernet", "latency", "nas")
ONE_FILE_ON_PURPOSE = {"latency/bundle_runner.py"}


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 40
    return files


def test_no_module_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert set(long) <= ONE_FILE_ON_PURPOSE, long
    for rel in ONE_FILE_ON_PURPOSE:
        assert "One file on purpose" in (ROOT / rel).read_text(encoding="utf-8")[:400]


def test_no_function_over_80_lines() -> None:
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_the_design_doc_lives_in_docs() -> None:
    assert (ROOT / "docs" / "design.md").is_file()
    where = [str(p.relative_to(ROOT)) for p in [*_sources(), *(ROOT / "experiments").glob("*.py"), ROOT / "README.md"]
             if "DESIGN.md" in p.read_text(encoding="utf-8")]
    assert not where, f"point at docs/design.md instead: {where}"
