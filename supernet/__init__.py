"""Supernet: static models, elastic weight-sharing supernets, training and extraction (torch)."""
from __future__ import annotations

from .blocks import build_block
from .model import StaticNet, build_model, init_weights

__all__ = ["StaticNet", "build_block", "build_model", "init_weights"]
