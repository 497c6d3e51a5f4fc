"""What a LUT holds: the lowering setup, every distinct block spec of a space under it, and shards.

A LUT is built for one search space under one :class:`~search_spaces.LoweringSetup` (input
height and width, classes, input channels, distillation head, task). :func:`lut_specs` lists
the specs to measure, :func:`new_table` makes the empty table whose header records all of it.

>>> from search_spaces import get_space
>>> setup = resolve_setup(get_space("efficientformer_v2_demo"), resolution=32, num_classes=10, in_chans=1)
>>> setup.resolution, setup.distillation
((32, 32), True)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from search_spaces import BlockSpec, LoweringSetup, SearchSpace
from search_spaces.enumerate import enumerate_specs
from search_spaces.errors import NasUserError

if TYPE_CHECKING:
    from latency.lut import LatencyTable
    from latency.profiles import DeviceProfile

__all__ = ["ResolutionLike", "parse_shard", "resolve_setup", "lut_specs", "new_table"]

#: A resolution as callers give it: ``224``, ``"512x1024"``, ``(512, 1024)`` or ``[512, 1024]``.
ResolutionLike = int | str | tuple[int, int] | list[int]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse ``"i/n"`` (1-based: ``1/4`` ... ``4/4``) into ``(i, n)``; None stays None.

    Raises:
        NasUserError: not of the form ``i/n`` with ``1 <= i <= n``.

    >>> parse_shard("2/4")
    (2, 4)
    """
    if text is None:
        return None
    try:
        i_text, n_text = str(text).split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise NasUserError(f"--shard must look like i/n, e.g. 1/4 (shards are numbered 1..n), got {text!r}") from None
    if n < 1 or not 1 <= i <= n:
        raise NasUserError(f"--shard {text!r}: need 1 <= i <= n (shards are numbered 1..n)")
    return i, n


def resolve_setup(space: SearchSpace, setup: LoweringSetup | None = None, **fields: Any) -> LoweringSetup:
    """The lowering setup of a LUT for ``space``, with the distillation head decided.

    Args:
        space: the search space (its family decides a ``None`` distillation).
        setup: a setup; or give its fields as keywords (``resolution``, ``num_classes``,
            ``in_chans``, ``distillation``, ``task``; None values take the defaults), not both.

    Raises:
        TypeError: both ``setup`` and fields.
        NasUserError: a field out of range.
    """
    from search_spaces.lowering import get_family, resolve_setup as resolve

    return resolve(get_family(space.family), setup, **fields)


def lut_specs(space: SearchSpace, setup: LoweringSetup | None = None, *, resolution: ResolutionLike | None = None,
              num_classes: int | None = None, in_chans: int | None = None, distillation: bool | None = None,
              task: str | None = None, shard: tuple[int, int] | None = None) -> list[BlockSpec]:
    """Every distinct spec of ``space`` under a setup (stem, blocks, downsampling, head), sorted by key.

    Args:
        space: the search space.
        setup: the lowering setup; or its fields as keywords (see :func:`resolve_setup`).
        resolution: input side in pixels, ``"HxW"`` or ``(height, width)``.
        num_classes: classifier outputs.
        in_chans: input channels.
        distillation: distillation head; None takes the family default.
        task: ``classify`` (default) or ``backbone``.
        shard: ``(i, n)`` keeps every n-th spec starting at the i-th (1-based).

    Raises:
        SpaceError: the space cannot be lowered under this setup.
        NasUserError: a ``backbone`` setup that lowering does not support yet.

    >>> from search_spaces import get_space
    >>> len(lut_specs(get_space("efficientformer_v2_demo"), resolution=32, num_classes=10, in_chans=1))
    91
    """
    setup = resolve_setup(space, setup, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                          distillation=distillation, task=task)
    specs = enumerate_specs(space, setup)
    if shard is not None:
        i, n = shard
        specs = specs[i - 1::n]
    return specs


def new_table(space: SearchSpace, profile: DeviceProfile, setup: LoweringSetup, *, measurement: str,
              expected_entries: int | None, shard: tuple[int, int] | None = None,
              environment: dict[str, Any] | None = None, statistic: str = "median") -> LatencyTable:
    """An empty table whose header describes this space, setup and profile.

    Args:
        space: the search space.
        profile: the device profile.
        setup: the lowering setup (its distillation decided: see :func:`resolve_setup`).
        measurement: ``in-process``, ``bundle`` or ``predicted``.
        expected_entries: entries of a complete table (its shard's share for a shard).
        shard: ``(i, n)`` for one shard of a split build.
        environment: host and versions where the figures are measured.
        statistic: which figure predictions sum, ``median`` or ``min``.
    """
    from latency.lut import LatencyTable

    setup = resolve_setup(space, setup)
    return LatencyTable(
        device=profile.name, backend=profile.backend, setup=setup,
        space_name=space.name, space_hash=space.hash, space=space.to_dict(), profile=profile.to_dict(),
        environment=environment, threads=profile.threads, batch=profile.batch, precision=profile.precision,
        measurement=measurement, statistic=statistic, expected_entries=expected_entries,
        shard=f"{shard[0]}/{shard[1]}" if shard else None,
    )
