"""Shared command-line plumbing: one-line errors with exit code 2, logging, progress bars."""
from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Callable, NoReturn, Sequence

from search_spaces.errors import NasUserError

__all__ = ["NasArgumentParser", "run_cli", "setup_logging", "announce", "int_at_least", "positive_float"]

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
