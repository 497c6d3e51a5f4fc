"""Project exceptions.

Every error a user can cause (bad flag, bad file, config outside a space) is a
:class:`NasUserError`. The command-line tools print its message on one line and
exit with code 2; library callers can catch it like the ``ValueError`` it is.
"""
from __future__ import annotations

__all__ = ["NasUserError", "SpaceError", "FileFormatError"]


class NasUserError(ValueError):
    """A mistake in user input: the message names the problem and the fix."""


class SpaceError(NasUserError):
    """A config, preset or choice that a search space does not allow."""


class FileFormatError(NasUserError):
    """A file (subnet.json, LUT, results, checkpoint metadata) that is missing, corrupt or of the wrong kind."""
