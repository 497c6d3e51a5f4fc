"""What every run records next to its outputs: the exact command, versions and git commit."""
from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from search_spaces.fileio import atomic_write_json

__all__ = ["environment", "write_command"]

_PACKAGES = ("formslim-nas", "torch", "numpy", "onnx", "onnxruntime", "coremltools", "optuna", "pandas", "safetensors")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "versions": versions,
        "git_commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_command(out_dir: str | Path, prog: str, argv: list[str], resolved: dict[str, Any]) -> None:
    """Write ``command.json`` (argv, resolved settings, environment) into ``out_dir``."""
    atomic_write_json(Path(out_dir) / f"command-{prog}.json",
                      {"command": [prog, *argv], "settings": resolved, "environment": environment()})
