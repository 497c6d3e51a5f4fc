"""Supernet: static models, elastic weight-sharing supernets, training, BN recalibration and extraction (torch)."""
from __future__ import annotations

from .blocks import build_block
from .bn import evaluate, recalibrate_bn
from .elastic import Supernet
from .model import StaticNet, build_model, init_weights
from .run import SupernetRun, find_latest_run, load_run, load_supernet

__all__ = [
    "StaticNet", "Supernet", "SupernetRun", "build_block", "build_model", "evaluate", "find_latest_run",
    "init_weights", "load_run", "load_supernet", "recalibrate_bn",
]
