"""Where the LUT-building names used to live; kept so that ``from latency.build import ...`` works.

The code is split by job: :mod:`latency.specs` (setup, specs, shards), :mod:`latency.measure`
(in-process builds and whole-network timing), :mod:`latency.bundle` (writing bundles) and
:mod:`latency.importing` (importing a runner's results). New code imports from those, or from
:mod:`latency` itself.
"""
from __future__ import annotations

from latency._private import VALIDATION_ROUNDS, BuildProgress
from latency.bundle import BundleInfo, default_bundle_path, write_bundle
from latency.importing import ImportResult, import_results
from latency.measure import BuildResult, build_lut, measure_networks
from latency.specs import lut_specs, new_table, parse_shard

__all__ = [
    "VALIDATION_ROUNDS",
    "BuildProgress",
    "BuildResult",
    "BundleInfo",
    "ImportResult",
    "parse_shard",
    "lut_specs",
    "new_table",
    "default_bundle_path",
    "build_lut",
    "measure_networks",
    "write_bundle",
    "import_results",
]
