"""Latency: device profiles, measurement, LUTs, prediction, validation and the iPhone 12 prior.

Light names (profiles, stats, LUTs, prediction, the prior) import without torch; the build,
bundle and validation functions load torch and ONNX Runtime on first use.

>>> from latency import get_profile, list_profiles
>>> list_profiles()
['iphone12', 'local-cpu', 'snapdragon855']
"""
from __future__ import annotations

import importlib
from typing import Any

from .calibration import Calibration
from .lut import LatencyTable, LutEntry, default_lut_path
from .merge import merge_tables
from .predict import BlockLatency, LatencyBreakdown, check_covers, fastest, predict_breakdown, predict_latency
from .prior import IPHONE12_PRESET_MS, LatencyPrior, fit_prior, iphone12_prior, predicted_table
from .profiles import DeviceProfile, get_profile, list_profiles, load_profile_file
from .stats import LatencyStats

_LAZY = {
    "BuildProgress": "measure", "BuildResult": "measure", "build_lut": "measure", "measure_networks": "measure",
    "BundleInfo": "bundle", "default_bundle_path": "bundle", "write_bundle": "bundle",
    "ImportResult": "importing", "import_results": "importing",
    "lut_specs": "specs", "parse_shard": "specs", "resolve_setup": "specs",
    "ValidationReport": "validate", "fidelity_metrics": "validate", "fit_calibration": "validate",
    "sample_archs": "validate", "validate_lut": "validate", "validation_paths": "validate",
    "export_onnx": "runtime", "measure_module": "runtime", "convert_coreml": "runtime",
}

__all__ = [
    "DeviceProfile", "get_profile", "list_profiles", "load_profile_file",
    "LatencyStats",
    "Calibration", "LatencyTable", "LutEntry", "default_lut_path", "merge_tables",
    "BlockLatency", "LatencyBreakdown", "check_covers", "fastest", "predict_breakdown", "predict_latency",
    "IPHONE12_PRESET_MS", "LatencyPrior", "fit_prior", "iphone12_prior", "predicted_table",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'latency' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
