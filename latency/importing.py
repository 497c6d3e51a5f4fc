"""Importing a bundle runner's ``results.json`` into a LUT, checked against the bundle's manifest.

:func:`import_results` refuses results measured for another manifest (its SHA-256), device or
keys, turns every result into a measured entry (replacing predicted ones, adding to a partial
table of the same setup) and returns the whole networks' stats for validation. The results'
host record travels into the table's environment, so a CoreML table measured on a Mac says so
(:attr:`latency.lut.LatencyTable.source_label`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latency import bundle_runner as _runner
from latency._private import TOOLKIT_KEY, best_rounds, open_existing
from latency.lut import Calibration, LatencyTable, default_lut_path
from latency.profiles import DeviceProfile
from latency.specs import new_table, parse_shard
from latency.stats import LatencyStats
from search_spaces import ArchConfig, LoweringSetup, SearchSpace
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.fileio import read_json

__all__ = ["ImportResult", "import_results"]

logger = logging.getLogger(__name__)


@dataclass
class ImportResult:
    """What :func:`import_results` produced.

    Attributes:
        table: the table (saved at ``path``).
        path: where it was saved.
        imported: entries taken from the results.
        replaced_predicted: predicted entries that measured ones replaced.
        complete: whether the runner finished every model of the manifest.
        networks: whole-network stats by name, with ``archs`` their architectures.
    """

    table: LatencyTable
    path: Path
    imported: int
    replaced_predicted: int
    complete: bool
    networks: dict[str, LatencyStats] = field(default_factory=dict)
    archs: dict[str, ArchConfig] = field(default_factory=dict)


def _load_bundle_manifest(bundle: Path) -> tuple[dict[str, Any], str]:
    mpath = bundle / _runner.MANIFEST_NAME
    manifest = read_json(mpath, what="bundle manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get(TOOLKIT_KEY), dict) \
            or not isinstance(manifest.get("entries"), list):
        raise FileFormatError(f"{str(mpath)!r} is not a manifest written by nas-build-lut (no {TOOLKIT_KEY!r} "
                              f"section); import results only into the bundle they were measured for")
    return manifest, _runner.manifest_sha256(mpath)


def _samples(record: Any, where: str) -> list[float]:
    if not isinstance(record, dict) or "samples_ms" not in record:
        raise FileFormatError(f"{where} must be an object with samples_ms")
    try:
        LatencyStats.from_samples(record["samples_ms"])
    except NasUserError as exc:
        raise FileFormatError(f"{where}: {exc}") from None
    return [float(x) for x in record["samples_ms"]]


def _read_results(rpath: Path, bdir: Path) -> dict[str, Any]:
    data = read_json(rpath, what="results file")
    if not isinstance(data, dict) or data.get("schema") != _runner.SCHEMA or not isinstance(data.get("results"), dict):
        raise FileFormatError(f"results file {str(rpath)!r} is not a schema-{_runner.SCHEMA} runner results file "
                              f"(need schema, manifest_sha256, device and results)")
    if not (bdir / _runner.MANIFEST_NAME).is_file():
        raise NasUserError(f"no {_runner.MANIFEST_NAME} next to {str(rpath)!r}; pass the bundle folder with "
                           f"--bundle DIR")
    return data


def _check_matches(data: dict[str, Any], manifest: dict[str, Any], digest: str, rpath: Path, bdir: Path,
                   device: str | None) -> list[str]:
    """Refuse results of another manifest, device or keys; returns the manifest's entry keys."""
    if data.get("manifest_sha256") != digest:
        raise NasUserError(f"{str(rpath)!r} does not match the bundle's manifest: it was measured for manifest "
                           f"sha256 {str(data.get('manifest_sha256'))[:12]}..., {str(bdir / 'manifest.json')!r} has "
                           f"{digest[:12]}...; run runner.py on this bundle and import its results.json")
    if data.get("device") != manifest.get("device") or data.get("backend") != manifest.get("backend"):
        raise NasUserError(f"{str(rpath)!r} is for device {data.get('device')!r} ({data.get('backend')}), the "
                           f"manifest for {manifest.get('device')!r} ({manifest.get('backend')})")
    if device is not None and device != manifest["device"]:
        raise NasUserError(f"{str(rpath)!r} holds {manifest['device']!r} results, not {device!r}; pass "
                           f"--device {manifest['device']}")
    keys = [e.get("key") for e in manifest["entries"] if isinstance(e, dict)]
    names = [m.get("name") for m in manifest.get("models", []) if isinstance(m, dict)]
    stray = sorted(set(data["results"]) - set(keys))
    stray_models = sorted(set(data.get("models") or {}) - set(names))
    if stray or stray_models:
        example = (stray or stray_models)[0]
        raise NasUserError(f"{str(rpath)!r} does not match the bundle's manifest: {len(stray) + len(stray_models)} "
                           f"result key(s) are not in it (e.g. {example!r})")
    return keys


def _toolkit_setup(tk: dict[str, Any], where: str) -> tuple[SearchSpace, DeviceProfile, LoweringSetup]:
    """The space, profile and lowering setup a bundle was made for (its manifest's toolkit section)."""
    try:
        space = SearchSpace.from_dict(tk["space"])
        profile = DeviceProfile.from_dict(tk["profile"])
        setup = LoweringSetup(resolution=tk["resolution"], num_classes=int(tk["num_classes"]),
                              in_chans=int(tk["in_chans"]), distillation=bool(tk["distillation"]),
                              task=tk.get("task", "classify"))
    except (KeyError, TypeError, ValueError, NasUserError) as exc:
        raise FileFormatError(f"{where}: bad {TOOLKIT_KEY} section: {exc}") from None
    return space, profile, setup


def _environment(data: dict[str, Any], digest: str) -> dict[str, Any]:
    host = data.get("host") if isinstance(data.get("host"), dict) else {}
    return {"host": host, "runner": {k: data.get(k) for k in ("threads", "warmup", "repeats", "interleave", "seed",
                                                              "updated_utc")},
            "runs": data.get("runs"), "manifest_sha256": digest}


def _networks(data: dict[str, Any], tk: dict[str, Any], rpath: Path,
              where: str) -> tuple[dict[str, LatencyStats], dict[str, ArchConfig]]:
    """Whole networks' best-round stats and their architectures."""
    round_of = tk.get("rounds") if isinstance(tk.get("rounds"), dict) else {}
    net_samples: dict[str, list[list[float]]] = {}
    for k, v in (data.get("models") or {}).items():
        net_samples.setdefault(round_of.get(k, k), []).append(_samples(v, f"{str(rpath)!r}: models[{k!r}]"))
    networks = best_rounds(net_samples)[0]
    archs = {}
    for name, arch in (tk.get("networks") or {}).items():
        try:
            archs[name] = ArchConfig.from_dict(arch)
        except NasUserError as exc:
            raise FileFormatError(f"{where}: network {name!r}: {exc}") from None
    return networks, {k: v for k, v in archs.items() if k in networks}


def _into_table(target: Path, fresh: LatencyTable, stats: dict[str, LatencyStats],
                n_keys: int) -> tuple[LatencyTable, int]:
    """Measured entries into the table at ``target`` (same setup) or into ``fresh``; returns it and the replaced
    count."""
    table = open_existing(target, fresh, action="import")
    replaced = 0
    if table is None:
        table = fresh
    else:
        replaced = sum(1 for k in stats if k in table and not table[k].measured)
        table.environment = fresh.environment
        table.measurement = "bundle"
        if table.shard is None and table.expected_entries is None:
            table.expected_entries = n_keys
        if replaced and table.calibration.method == "prior":
            table.set_calibration(Calibration())  # the prior's overhead does not belong to measured figures
    for key, st in stats.items():
        table.set_measured(key, st)
    if table.n_predicted == 0:
        table.prior = None
    return table, replaced


def import_results(
    results: str | os.PathLike[str],
    *,
    bundle: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> ImportResult:
    """Turn a runner's ``results.json`` into a LUT, checking it against the bundle's manifest.

    Measured entries replace predicted ones in an existing table of the same setup at ``out``
    (e.g. the predicted iPhone LUT), and add to a partial measured one (e.g. other shards).

    Args:
        results: the runner's ``results.json``.
        bundle: the bundle folder (default: the folder holding ``results``).
        out: the LUT file (default ``lut-<device>-<resolution>.json`` in the working folder).
        device: the device the caller expects; refused if the results are for another.

    Returns:
        An :class:`ImportResult`.

    Raises:
        FileFormatError: a missing, truncated or corrupt results or manifest file.
        NasUserError: results for another manifest, device or keys; ``out`` of another setup.
    """
    rpath = Path(results)
    bdir = Path(bundle) if bundle is not None else rpath.parent
    data = _read_results(rpath, bdir)
    manifest, digest = _load_bundle_manifest(bdir)
    keys = _check_matches(data, manifest, digest, rpath, bdir, device)
    tk = manifest[TOOLKIT_KEY]
    where = repr(str(bdir / "manifest.json"))
    space, profile, setup = _toolkit_setup(tk, where)
    threads = data.get("threads", profile.threads)
    if threads != profile.threads:
        logger.warning("results were measured with %s thread(s), the profile says %d; the LUT records %s",
                       threads, profile.threads, threads)
        profile = profile.with_threads(int(threads))
    fresh = new_table(space, profile, setup, measurement="bundle", expected_entries=len(keys),
                      shard=parse_shard(tk.get("shard")), environment=_environment(data, digest))
    stats = {k: LatencyStats.from_samples(_samples(v, f"{str(rpath)!r}: results[{k!r}]"))
             for k, v in data["results"].items()}
    networks, archs = _networks(data, tk, rpath, where)
    target = Path(out) if out is not None else default_lut_path(profile.name, setup.resolution, task=setup.task)
    table, replaced = _into_table(target, fresh, stats, len(keys))
    complete = bool(data.get("complete")) and len(stats) == len(keys)
    if not complete:
        logger.warning("results are partial: %d of %d blocks measured; run runner.py again to finish them",
                       len(stats), len(keys))
    table.save(target)
    return ImportResult(table, target, len(stats), replaced, complete, networks, archs)
