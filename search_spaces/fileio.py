"""Atomic file writes and checked JSON reads.

Everything the toolkit writes goes through :func:`atomic_write_bytes`: the data
lands in a temporary file in the same folder, is flushed to disk, and then
renamed over the target. A reader (or a run killed half-way) never sees a
truncated file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import FileFormatError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "read_json"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Returns:
        The path written, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically. NaN and inf are refused."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike[str], *, what: str = "file") -> Any:
    """Read a JSON file, turning every failure into a :class:`FileFormatError` that names the file.

    Args:
        path: the file to read.
        what: what the file is, for the message ("LUT", "subnet.json", ...).

    Raises:
        FileFormatError: the file is missing, unreadable, or not valid JSON.
    """
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise FileFormatError(f"{what} {str(path)!r} is a folder, expected a JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"cannot read {what} {str(path)!r}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            f"{what} {str(path)!r} is not valid JSON (truncated or corrupt?): {exc.msg} at line {exc.lineno}"
        ) from None
