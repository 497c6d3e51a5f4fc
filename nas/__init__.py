"""NAS: command-line tools, objectives, search strategies, extraction and reports."""
from __future__ import annotations

from .info import describe, resolve_target

__all__ = ["describe", "resolve_target"]
