"""Shared command-line plumbing: one-line errors with exit code 2, logging, progress bars."""
from __future__ import annotations

import argparse
import logging
import math
import sys
import types
import typing
from typing import TYPE_CHECKING, Callable, NoReturn, Sequence

from search_spaces.errors import NasUserError

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["NasArgumentParser", "run_cli", "setup_logging", "announce", "int_at_least", "positive_float",
           "bool_value", "add_schema_flags", "schema_flag_values"]

EXIT_USER_ERROR = 2


class NasArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ... (see --help)``), exit code 2."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
        self.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USER_ERROR)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum``; the error names the bad value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type`` for positive, finite numbers (learning rates and the like)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {text!r}")
    return value


def seconds_arg(text: str) -> float:
    """argparse type of a duration in seconds: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected finite seconds >= 0, got {text!r}")
    return value


def resolution_arg(text: str) -> tuple[int, int]:
    """argparse type of ``--resolution``: ``224`` (square) or ``512x1024`` (height x width)."""
    from search_spaces import parse_resolution

    try:
        return parse_resolution(text)
    except NasUserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def setup_logging(verbose: int = 0, quiet: bool = False, prog: str | None = None) -> None:
    """Log to stderr, each line prefixed with the tool's name, so that every line says who wrote it."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    fmt = f"{prog}: %(message)s" if prog else "%(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    if verbose < 2:
        for noisy in ("optuna", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # coremltools warns on every import on Linux (no native runtime, untested torch version):
        # nothing the user can act on, and prediction is guarded with our own message
        logging.getLogger("coremltools").setLevel(logging.ERROR)


def announce(message: str) -> None:
    """Tell the user about a default that was chosen for them (stderr, always shown)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def run_cli(prog: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
            argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run ``body``, and turn user mistakes into one line and exit code 2."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False), prog)
    try:
        rc = body(args)
    except NasUserError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    return 0 if rc is None else int(rc)


# ----------------------------------------------------------------------------- flags from a schema model
def bool_value(text: str) -> bool:
    """An argparse ``type`` for ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_value(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float_value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


_FLAG_TYPES: dict[object, Callable[[str], object]] = {int: _int_value, float: _float_value, bool: bool_value,
                                                      str: str}


_METAVARS: dict[Callable[[str], object], str] = {_int_value: "N", _float_value: "X", bool_value: "{true,false}"}


def _flag_kind(annotation: object) -> tuple[Callable[[str], object], list[object] | None]:
    """The argparse ``type`` and ``choices`` of a field annotation (``X | None`` as ``X``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return _FLAG_TYPES.get(type(args[0]), str), list(args)
    if origin in (types.UnionType, typing.Union) and len(args) == 1:
        return _flag_kind(args[0])
    if origin is typing.Annotated:
        return _flag_kind(args[0])
    return _FLAG_TYPES.get(annotation, str), None  # str, or a value the model parses itself (e.g. 512x1024)


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def add_schema_flags(group: argparse._ActionsContainer, model: type[BaseModel]) -> None:
    """Add one flag per field of a schema model (a pydantic model such as ``TrainConfig``).

    Each field ``batch_size`` becomes ``--batch-size``: its help is the field's description plus
    its default, its type and choices come from the annotation (``Literal`` values are the
    choices, ``X | None`` is read as ``X``), a bool takes ``true`` or ``false``, and a field whose
    ``json_schema_extra`` has ``"switch": True`` is a flag without a value that sets it to true.
    Every flag defaults to ``None`` ("not given"), so a ``--config`` file's value stays unless the
    flag is given; :func:`schema_flag_values` collects the given ones. A field's
    ``json_schema_extra`` may set ``"default_help"`` (how its default reads in the help),
    ``"metavar"``, and ``"repeat": True`` for a list of strings given one flag per item.
    """
    defaults = model.model_construct().model_dump(mode="json")
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flag = "--" + name.replace("_", "-")
        default = extra.get("default_help", _default_text(defaults.get(name)))
        help_text = f"{info.description or name} (default: {default})".replace("%", "%%")
        if extra.get("switch"):
            group.add_argument(flag, dest=name, action="store_const", const=True, help=help_text)
            continue
        if extra.get("repeat"):
            group.add_argument(flag, dest=name, action="append", metavar=extra.get("metavar"),
                               help=help_text + "; repeatable")
            continue
        kind, choices = _flag_kind(info.annotation)
        metavar = str(extra["metavar"]) if "metavar" in extra else (None if choices else _METAVARS.get(kind))
        group.add_argument(flag, dest=name, type=kind, choices=choices, metavar=metavar, help=help_text)


def schema_flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, object]:
    """The fields of ``model`` given as flags in ``args`` (those not ``None``), by field name."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
