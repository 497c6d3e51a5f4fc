"""Shared command-line plumbing: one-line errors with exit code 2, logging, progress bars."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn, Sequence

from search_spaces.errors import NasUserError

__all__ = ["NasArgumentParser", "run_cli", "setup_logging", "announce"]

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


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if verbose < 2:
        for noisy in ("optuna", "coremltools", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def announce(message: str) -> None:
    """Tell the user about a default that was chosen for them (stderr, always shown)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def run_cli(prog: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
            argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run ``body``, and turn user mistakes into one line and exit code 2."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    try:
        rc = body(args)
    except NasUserError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    return 0 if rc is None else int(rc)
