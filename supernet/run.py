"""Finished supernet runs on disk: finding the latest one, validating it, loading it.

A run folder is complete when it holds ``supernet.json`` (with ``"complete": true``) and
``supernet.safetensors`` whose SHA-256 matches the one recorded in the JSON. ``supernet.json``
is validated with its schema model, :class:`supernet.run_schema.SupernetFile`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces import LoweringSetup, SearchSpace
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.fileio import read_json

if TYPE_CHECKING:
    from .elastic import Supernet
    from .run_schema import SupernetFile

__all__ = ["SupernetRun", "find_latest_run", "load_run", "load_supernet"]

_SEARCH_DEPTH = 4


@dataclass(frozen=True)
class SupernetRun:
    """A finished ``nas-train`` run (metadata only; :func:`load_supernet` loads the weights).

    Attributes:
        path: the run folder.
        meta: ``supernet.json`` as read (JSON values).
        file: the same, validated.
    """

    path: Path
    meta: dict[str, Any]
    file: SupernetFile

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.file.space)

    @property
    def resolution(self) -> int:
        return self.file.resolution

    @property
    def num_classes(self) -> int:
        return self.file.num_classes

    @property
    def setup(self) -> LoweringSetup:
        """The lowering setup of the supernet (its training input, classes and channels, with the head)."""
        from search_spaces.lowering import get_family, resolve_setup

        return resolve_setup(get_family(self.space.family), None, num_classes=self.num_classes,
                             resolution=self.resolution, in_chans=self.in_chans)

    @property
    def in_chans(self) -> int:
        return self.file.in_chans

    @property
    def dataset(self) -> str:
        return str(self.file.recipe["dataset"])

    @property
    def weights_sha256(self) -> str:
        return self.file.weights_sha256

    @property
    def hash(self) -> str:
        """Short provenance hash of the supernet weights."""
        return self.weights_sha256[:12]


def _candidates(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("node_modules", "__pycache__")]
        if depth >= _SEARCH_DEPTH:
            dirnames[:] = []
        if "supernet.json" in filenames and "supernet.safetensors" in filenames:
            found.append(Path(dirpath))
    return found


def find_latest_run(root: str | os.PathLike[str] = ".") -> Path:
    """The most recently finished supernet run under ``root`` (searched a few folders deep).

    Raises:
        NasUserError: there is none; the message says to run ``nas-train`` first.
    """
    root = Path(root)
    runs = []
    for path in _candidates(root):
        try:
            meta = read_json(path / "supernet.json", what="supernet.json")
        except FileFormatError:
            continue
        if isinstance(meta, dict) and meta.get("complete"):
            runs.append(((path / "supernet.json").stat().st_mtime, path))
    if not runs:
        raise NasUserError(f"no finished supernet run (supernet.json + supernet.safetensors) under {str(root)!r}; "
                           f"run nas-train first, or pass --supernet RUN_DIR")
    return max(runs)[1]


def load_run(path: str | os.PathLike[str], *, check_weights: bool = True) -> SupernetRun:
    """Read and validate a run folder's ``supernet.json`` (and the weights' checksum).

    Raises:
        FileFormatError: missing, incomplete or corrupt run.
    """
    from search_spaces.schema import validate  # pydantic: loaded when a run is read, not by `import supernet`

    from .run_schema import SUPERNET_SCHEMA, SupernetFile

    path = Path(path)
    if path.is_file() and path.name == "supernet.json":
        path = path.parent
    if not path.is_dir():
        raise FileFormatError(f"supernet run {str(path)!r} does not exist; run nas-train first")
    meta = read_json(path / "supernet.json", what="supernet.json")
    if not isinstance(meta, dict) or meta.get("schema") != SUPERNET_SCHEMA:
        found = meta.get("schema") if isinstance(meta, dict) else None
        raise FileFormatError(f"{path / 'supernet.json'} is not a supernet.json of schema {SUPERNET_SCHEMA} "
                              f"(its schema: {found!r})")
    if not meta.get("complete"):
        raise FileFormatError(f"supernet run {str(path)!r} is incomplete; rerun its nas-train command to finish it")
    file = validate(SupernetFile, meta, source=str(path / "supernet.json"))
    if "dataset" not in file.recipe:
        raise FileFormatError(f"{path / 'supernet.json'}: field 'recipe' has no 'dataset'")
    weights = path / "supernet.safetensors"
    if not weights.is_file():
        raise FileFormatError(f"supernet run {str(path)!r} has no supernet.safetensors; rerun nas-train")
    if check_weights and hashlib.sha256(weights.read_bytes()).hexdigest() != file.weights_sha256:
        raise FileFormatError(f"{weights} does not match the checksum in supernet.json (modified or corrupt)")
    return SupernetRun(path, meta, file)


def load_supernet(run: SupernetRun | str | os.PathLike[str], *, device: str = "cpu") -> Supernet:
    """Build the run's supernet and load its weights (safetensors; nothing is unpickled)."""
    from .checkpoint import load_tensors
    from .elastic import Supernet

    run = run if isinstance(run, SupernetRun) else load_run(run)
    net = Supernet(run.space, num_classes=run.num_classes, resolution=run.resolution, in_chans=run.in_chans)
    tensors, _ = load_tensors(run.path / "supernet.safetensors", what="supernet weights")
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise FileFormatError(f"{run.path / 'supernet.safetensors'} does not fit the recorded space: "
                              f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
                              f"(e.g. {(missing or unexpected)[:3]})")
    return net.to(device).eval()
