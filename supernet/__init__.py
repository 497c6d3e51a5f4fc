"""Supernet: static models, elastic weight-sharing supernets, training, BN recalibration and extraction (torch)."""
from __future__ import annotations

from .blocks import build_block
from .bn import evaluate, recalibrate_bn
from .elastic import Supernet
from .model import FeatureInfo, StaticNet, build_model, init_weights
from .pretrained import LoadReport, export_state_dict, init_supernet_from, load_pretrained
from .run import SupernetRun, find_latest_run, load_run, load_supernet

__all__ = [
    "FeatureInfo", "LoadReport", "StaticNet", "Supernet", "SupernetRun", "build_block", "build_model", "evaluate",
    "export_state_dict", "find_latest_run", "init_supernet_from", "init_weights", "load_pretrained", "load_run",
    "load_supernet", "recalibrate_bn",
]
