"""Bundles: the block models of a space in a device's format, to be timed on the device.

:func:`write_bundle` (any profile) writes the block models (ONNX or ``.mlpackage``),
``manifest.json``, ``runner.py`` (a copy of :mod:`latency.bundle_runner`) and a README. The
runner writes ``results.json`` on the device; :func:`latency.importing.import_results` checks it
against the manifest and turns it into a table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latency import bundle_runner as _runner
from latency._private import (
    TOOLKIT_KEY,
    VALIDATION_ROUNDS,
    BuildProgress,
    Item,
    ProgressFn,
    coreml_options,
    default_jobs,
    entry_item,
    exporter,
    model_items,
)
from latency.profiles import DeviceProfile
from latency.specs import ResolutionLike, lut_specs, resolve_setup
from search_spaces import ArchConfig, LoweringSetup, SearchSpace, format_resolution, parse_resolution
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.fileio import atomic_write_json, atomic_write_text, read_json

__all__ = ["BundleInfo", "default_bundle_path", "write_bundle"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleInfo:
    """A written bundle: its folder, manifest and what it holds."""

    folder: Path
    manifest: Path
    entries: int
    models: int
    reused: int
    sha256: str


def default_bundle_path(device: str, resolution: ResolutionLike, folder: str | os.PathLike[str] = ".", *,
                        task: str = "classify") -> Path:
    """``lut-<device>-<resolution>[-<task>].bundle`` in ``folder`` (``224`` or ``512x1024``; the task named
    when it is not ``classify``), beside the LUT it is for.

    >>> default_bundle_path("iphone12", (512, 1024)).name
    'lut-iphone12-512x1024.bundle'
    """
    suffix = "" if task == "classify" else f"-{task}"
    return Path(folder) / f"lut-{device}-{format_resolution(parse_resolution(resolution))}{suffix}.bundle"


def _file_name(ident: str, fmt: str, kind: str) -> str:
    if kind == "model":
        return f"models/{ident}.{fmt}"
    return f"blocks/{hashlib.sha1(ident.encode()).hexdigest()[:16]}.{fmt}"


_README = """# Latency bundle: {device} ({backend}, {fmt})

Made by `nas-build-lut` for the search space `{space}` (hash `{space_hash}`) at {size}
px, batch {batch}: {n_entries} block models{models_line}. `runner.py` times every model with the
settings in `manifest.json` ({threads} thread(s), {warmup} warm-up runs, {repeats} timed runs) and
writes `results.json`. It needs only Python 3.9+, numpy and {runtime}; not torch, not this toolkit.
Runs are resumable: after an interruption, run the same command again.

## On a Mac (CoreML bundles; ONNX bundles work too)

```
cd {folder_name}
python3 -m pip install numpy {pip_runtime}
python3 runner.py
```

A CoreML bundle run on a Mac times that Mac (its CPU, GPU and Neural Engine), not an iPhone;
`results.json` records the host, and a LUT imported from it says so wherever it is shown. For
the phone itself use Xcode's Core ML performance report on the `.mlpackage` files, or an app
that loads them with the same compute units ({compute_units}).

## On an Android phone (Termux) or an Arm board (ONNX bundles)

```
# copy the folder over, e.g.: adb push {folder_name} /data/local/tmp/  (or scp to the board)
pkg install python python-numpy      # Termux; on a board: apt install python3-numpy
python3 -m pip install onnxruntime
cd {folder_name}
taskset 80 python3 runner.py --threads {threads}   # pin to one big core (CPU 7 on a Snapdragon 855)
```

Close other apps, keep the device plugged in and cool; `python3 runner.py --check` validates
the bundle without measuring.

## Back on the machine that made the bundle

```
nas-build-lut --device {device} --import {folder_name}/results.json
```

This checks `results.json` against `manifest.json` (its SHA-256, device and keys) and writes
`lut-{device}-{res_text}.json`{import_validation}. Measured figures replace any predicted ones.
"""


def _manifest(profile: DeviceProfile, entries: list[dict[str, Any]], models: list[dict[str, Any]],
              toolkit: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = {
        "schema": _runner.SCHEMA, "device": profile.name, "backend": profile.backend,
        "format": profile.model_format, "threads": profile.threads, "batch": profile.batch,
        "warmup": profile.warmup, "repeats": profile.repeats, "seed": 0,
    }
    if profile.backend == "onnxruntime":
        m["providers"] = list(profile.providers)
        m["graph_optimization"] = profile.graph_optimization
    else:
        m["compute_units"] = profile.compute_units
    m["entries"] = entries
    m["models"] = models
    m[TOOLKIT_KEY] = toolkit
    return m


def _bundle_setup(space: SearchSpace, profile: DeviceProfile, setup: LoweringSetup,
                  shard: tuple[int, int] | None) -> dict[str, Any]:
    """What a bundle folder was made for (``.bundle-setup.json``, and the manifest's toolkit section)."""
    from search_spaces import resolution_json

    out = {"device": profile.name, "profile": profile.to_dict(), "space_name": space.name,
           "space_hash": space.hash, "space": space.to_dict(), "resolution": resolution_json(setup.resolution),
           "num_classes": setup.num_classes, "in_chans": setup.in_chans, "distillation": setup.distillation,
           "shard": f"{shard[0]}/{shard[1]}" if shard else None}
    if setup.task != "classify":  # absent for classification, so older bundles keep their hash
        out["task"] = setup.task
    return out


def _claim_folder(folder: Path, setup: dict[str, Any]) -> None:
    """Refuse a folder that holds another setup's bundle or other files; then mark it as ours."""
    marker = folder / ".bundle-setup.json"
    if marker.is_file():
        try:
            old = read_json(marker, what="bundle setup")
        except FileFormatError:
            old = None
        if old != setup:
            raise NasUserError(f"bundle folder {str(folder)!r} holds a bundle for another setup (device, profile, "
                               f"space, resolution or shard); pass another --bundle or delete it")
    elif folder.exists() and any(folder.iterdir()):
        raise NasUserError(f"{str(folder)!r} exists and is not a bundle made by nas-build-lut; pass another "
                           f"--bundle or delete it")
    atomic_write_json(marker, setup)


def _todo(items: list[Item], folder: Path, fmt: str) -> tuple[list[tuple[Item, str]], int]:
    """Model files still to write (one per file key), and how many already exist."""
    todo, reused, seen = [], 0, set()
    for item in items:
        if item.file_key in seen:
            continue
        seen.add(item.file_key)
        path = folder / _file_name(item.file_key, fmt, item.kind)
        if path.exists():
            reused += 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            todo.append((item, str(path)))
    return todo, reused


def _export_all(todo: list[tuple[Item, str]], profile: DeviceProfile, jobs: int | None,
                progress: ProgressFn | None) -> None:
    fmt = profile.model_format
    t0 = time.monotonic()
    total_cost = sum(i.cost for i, _ in todo)
    done_cost = done = 0
    n_jobs = default_jobs(total_cost * (8 if fmt == "mlpackage" else 1), jobs)
    with exporter(n_jobs, fmt, coreml_options(profile)) as ex:
        step = max(1, n_jobs * 4)
        for start in range(0, len(todo), step):
            part = todo[start:start + step]
            ex.wait(ex.submit(part))
            done += len(part)
            done_cost += sum(i.cost for i, _ in part)
            if progress is not None:
                elapsed = time.monotonic() - t0
                progress(BuildProgress("export", done, len(todo), elapsed,
                                       elapsed / done_cost * (total_cost - done_cost), part[-1][0].ident))


def _write_readme(folder: Path, profile: DeviceProfile, space: SearchSpace, setup: LoweringSetup, n_entries: int,
                  n_models: int, rounds: int) -> None:
    fmt = profile.model_format
    h, w = setup.resolution
    atomic_write_text(folder / "README.md", _README.format(
        device=profile.name, backend=profile.backend, fmt=fmt, space=space.name, space_hash=space.hash,
        size=f"{h}x{w}", res_text=setup.text, batch=profile.batch, n_entries=n_entries,
        models_line=(f" and {n_models} whole networks for validation (each timed in {rounds} rounds)"
                     if n_models else ""),
        threads=profile.threads, warmup=profile.warmup, repeats=profile.repeats,
        runtime="coremltools (macOS)" if fmt == "mlpackage" else "onnxruntime",
        pip_runtime="coremltools" if fmt == "mlpackage" else "onnxruntime", folder_name=folder.name,
        compute_units=profile.compute_units,
        import_validation=(", plus the validation report and calibration from the whole networks"
                           if n_models else ""),
    ))


def write_bundle(
    space: SearchSpace,
    profile: DeviceProfile,
    *,
    folder: str | os.PathLike[str],
    setup: LoweringSetup | None = None,
    resolution: ResolutionLike | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    distillation: bool | None = None,
    task: str | None = None,
    shard: tuple[int, int] | None = None,
    validation_archs: Sequence[ArchConfig] = (),
    rounds: int = VALIDATION_ROUNDS,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
) -> BundleInfo:
    """Write a bundle to be run on the device: models, ``manifest.json``, ``runner.py`` and ``README.md``.

    Model files that already exist (from an interrupted earlier call for the same setup) are
    reused, and the manifest holds no dates, so rewriting an unchanged bundle keeps its
    SHA-256 and any ``results.json`` measured for it stays valid.

    Args:
        space: the search space.
        profile: any profile; ONNX models for onnxruntime, ``.mlpackage`` for coreml.
        folder: the bundle folder (created).
        setup: the lowering setup; or its fields as keywords (``resolution``, ``num_classes``,
            ``in_chans``, ``distillation``, ``task``).
        shard: ``(i, n)``: only this shard's specs.
        validation_archs: whole networks to include for end-to-end validation.
        rounds: each network is listed this many times (one file), so the runner times it in
            rounds far apart; the import keeps the best round.
        jobs: export worker processes (see :func:`latency.measure.build_lut`).
        progress: called as models are written.

    Returns:
        A :class:`BundleInfo`.

    Raises:
        NasUserError: ``folder`` holds a bundle of another setup.
    """
    folder = Path(folder)
    setup = resolve_setup(space, setup, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                          distillation=distillation, task=task)
    specs = lut_specs(space, setup, shard=shard)
    fmt = profile.model_format
    marker = _bundle_setup(space, profile, setup, shard)
    _claim_folder(folder, marker)
    items = [entry_item(s, profile.batch) for s in specs]
    items += model_items(validation_archs, batch=profile.batch, setup=setup, rounds=rounds)
    todo, reused = _todo(items, folder, fmt)
    if reused:
        logger.info("bundle %s: reusing %d model files written earlier", folder, reused)
    _export_all(todo, profile, jobs, progress)
    entries = [{"key": i.ident, "file": _file_name(i.ident, fmt, "entry"), "input_shape": list(i.input_shape)}
               for i in items if i.kind == "entry"]
    models = [{"name": i.ident, "file": _file_name(i.file_key, fmt, "model"), "input_shape": list(i.input_shape)}
              for i in items if i.kind == "model"]
    toolkit = {**marker, "networks": {i.file_key: i.arch for i in items if i.kind == "model"},
               "rounds": {i.ident: i.file_key for i in items if i.kind == "model"}}
    manifest_path = folder / _runner.MANIFEST_NAME
    atomic_write_text(manifest_path, json.dumps(_manifest(profile, entries, models, toolkit), indent=1,
                                                sort_keys=False) + "\n")
    runner = folder / "runner.py"
    shutil.copyfile(Path(_runner.__file__), runner)
    runner.chmod(0o755)
    _write_readme(folder, profile, space, setup, len(entries), len({m["file"] for m in models}), rounds)
    _runner.load_manifest(folder)  # the runner must accept what we wrote
    return BundleInfo(folder, manifest_path, len(entries), len(toolkit["networks"]), reused,
                      _runner.manifest_sha256(manifest_path))
