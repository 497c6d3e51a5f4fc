"""Schema models for the files users hand us, on pydantic v2, with one-line errors.

Every file format the toolkit reads (LUTs, ``subnet.json``, ``supernet.json``, device profiles,
training configs) is a :class:`Schema` subclass: fields are typed, unknown fields are refused,
and numbers are strict (``true`` is not an integer, ``"3"`` is not a number). Why pydantic: it is
the validation library of the Python ecosystem (optuna's and FastAPI's users know it), its
errors carry the field path, the bad value and the allowed values, and it needs no compiler
here (binary wheels).

:func:`validate` turns pydantic's :class:`~pydantic.ValidationError` into one line of our own
:class:`~search_spaces.errors.FileFormatError` (or another :class:`NasUserError`), so the
command-line tools print it and exit with code 2:

>>> class Point(Schema):
...     x: int
...     label: Literal["a", "b"] = "a"
>>> validate(Point, {"x": 1}).x
1
>>> validate(Point, {"x": True}, source="p.json")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
FileFormatError: p.json: field 'x': Input should be a valid integer, got True
>>> validate(Point, {"x": 1, "label": "c"}, source="p.json")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
FileFormatError: p.json: field 'label': Input should be 'a' or 'b', got 'c'
"""
from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import FileFormatError, NasUserError

__all__ = ["Schema", "validate", "format_validation_error", "Literal"]

M = TypeVar("M", bound=BaseModel)


class Schema(BaseModel):
    """Base of every file schema: frozen, strict, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=False)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_validation_error(exc: ValidationError, *, source: str = "") -> str:
    """The first error of ``exc`` as one line: ``source: field 'a.b[2]': message, got value``."""
    err = exc.errors(include_url=False)[0]
    where = _loc(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (not part of this format)"
    elif err.get("type") == "missing":
        msg = "is missing"
    got = "" if err.get("type") == "missing" else f", got {_short(err.get('input'))}"
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    prefix = f"{source}: " if source else ""
    return f"{prefix}field {where!r}: {msg}{got}{tail}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(model: type[M], data: Any, *, source: str = "", error: type[NasUserError] = FileFormatError) -> M:
    """Validate ``data`` (parsed JSON) as ``model``; a bad value raises ``error`` with one line.

    Args:
        model: the schema class.
        data: the parsed file (a dict for every format we have).
        source: what to name in the message (usually the file path).
        error: the exception class to raise (a :class:`NasUserError` subclass).
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_validation_error(exc, source=source)) from None
