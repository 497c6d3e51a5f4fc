"""The built-in search strategies; importing this package registers them (see :mod:`nas.search`)."""
from __future__ import annotations

from .gumbel import GumbelStrategy
from .nsga2 import Nsga2Strategy
from .slim import SlimStrategy

__all__ = ["GumbelStrategy", "Nsga2Strategy", "SlimStrategy"]
