"""The built-in search strategies; importing this package registers them (see :mod:`nas.search`)."""
from __future__ import annotations

from .nsga2 import Nsga2Strategy
from .slim import SlimStrategy

__all__ = ["Nsga2Strategy", "SlimStrategy"]
