"""The lowering setup: everything besides the architecture that decides a network's block specs.

A :class:`LoweringSetup` carries the input size (height and width), the classifier's classes,
the input channels, whether the head has ``head_dist``, and the task: ``classify`` (the
network ends in its classifier head) or ``backbone`` (it ends at the last stage's feature map,
as detection and segmentation use it). One value travels through lowering, counting, the
LUT, the supernet and extraction instead of four loose keywords.

Resolutions are written ``224`` (square) or ``512x1024`` (height x width) everywhere a user
types or reads one; files store an int for a square input and ``[height, width]`` otherwise.

>>> LoweringSetup(resolution="512x1024").resolution
(512, 1024)
>>> LoweringSetup(resolution=32, num_classes=10, in_chans=1).text
'32'
>>> parse_resolution("512x1024"), format_resolution((224, 224)), resolution_json((512, 1024))
((512, 1024), '224', [512, 1024])
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from .errors import NasUserError

__all__ = ["TASKS", "LoweringSetup", "parse_resolution", "format_resolution", "resolution_json", "MIN_RESOLUTION"]

#: ``classify``: lowering ends with the classifier head; ``backbone``: it ends at the last stage's map.
TASKS: tuple[str, ...] = ("classify", "backbone")
#: The smallest input side any family lowers (two stride-2 stem convs and three downsamplings).
MIN_RESOLUTION = 8

_RES_RE = re.compile(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*")


def parse_resolution(value: Any, *, what: str = "resolution") -> tuple[int, int]:
    """``(height, width)`` from ``224``, ``"224"``, ``"512x1024"`` or ``[512, 1024]``.

    Raises:
        NasUserError: not one positive integer or two (``HxW``), or a side under
            :data:`MIN_RESOLUTION`.
    """
    if isinstance(value, bool):
        raise NasUserError(f"{what} must be an integer or HEIGHTxWIDTH, got {value!r}")
    if isinstance(value, int):
        hw = (value, value)
    elif isinstance(value, str):
        m = _RES_RE.fullmatch(value)
        if not m:
            raise NasUserError(f"{what} {value!r} is not a resolution: write e.g. 224 or 512x1024 (height x width)")
        h = int(m.group(1))
        hw = (h, int(m.group(2)) if m.group(2) else h)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        hw = (int(value[0]), int(value[1]))
    else:
        raise NasUserError(f"{what} must be an integer or [height, width], got {value!r}")
    if min(hw) < MIN_RESOLUTION:
        raise NasUserError(f"{what} sides must be integers >= {MIN_RESOLUTION}, got {format_resolution(hw)}")
    return hw


def format_resolution(hw: tuple[int, int]) -> str:
    """``'224'`` for a square input, ``'512x1024'`` (height x width) otherwise."""
    h, w = hw
    return str(h) if h == w else f"{h}x{w}"


def resolution_json(hw: tuple[int, int]) -> int | list[int]:
    """How files store a resolution: an int when square (as schema-1 files did), else ``[h, w]``."""
    h, w = hw
    return h if h == w else [h, w]


@dataclass(frozen=True)
class LoweringSetup:
    """What besides the architecture decides the block specs.

    Args:
        resolution: input ``(height, width)``; an int or ``"HxW"`` string is accepted and
            normalised.
        num_classes: classifier outputs.
        in_chans: input channels (3 for RGB, 1 for Fashion-MNIST).
        distillation: whether the head has ``head_dist``; ``None`` means the family's default
            (EfficientFormer V1/V2: yes, EfficientViT: no), filled in by lowering.
        task: ``classify`` or ``backbone`` (no classifier head; see :data:`TASKS`).

    Raises:
        NasUserError: a value of the wrong type or out of range.
    """

    resolution: tuple[int, int] = (224, 224)
    num_classes: int = 1000
    in_chans: int = 3
    distillation: bool | None = None
    task: str = "classify"

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolution", parse_resolution(self.resolution))
        for name in ("num_classes", "in_chans"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NasUserError(f"{name} must be an integer >= 1, got {v!r}")
        if self.distillation is not None and not isinstance(self.distillation, bool):
            raise NasUserError(f"distillation must be true, false or null, got {self.distillation!r}")
        if self.task not in TASKS:
            raise NasUserError(f"task must be one of {list(TASKS)}, got {self.task!r}")

    @property
    def height(self) -> int:
        return self.resolution[0]

    @property
    def width(self) -> int:
        return self.resolution[1]

    @property
    def square(self) -> bool:
        return self.resolution[0] == self.resolution[1]

    @property
    def text(self) -> str:
        """The resolution as users write it: ``224`` or ``512x1024``."""
        return format_resolution(self.resolution)

    def replace(self, **changes: Any) -> LoweringSetup:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """``(B, in_chans, height, width)``."""
        return (batch, self.in_chans, *self.resolution)
