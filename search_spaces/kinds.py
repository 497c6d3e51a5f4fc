"""The block-kind registry: everything about one kind of block, in one entry.

A :class:`BlockKind` says what a kind computes and how the toolkit treats it:

* ``trace``: the kind's op trace (:class:`~search_spaces.ops.OpTrace`), the ONE description from
  which exact parameter counts, MACs and the latency prior's features all come;
* ``module``: the torch module that implements it, as an import path
  (``"supernet.blocks:Ef2Block"``; this package never imports torch itself);
* ``shares`` and ``slicers``: its elastic rules in a weight-sharing supernet: which parameter
  prefixes it takes from another kind in the same supernet slot, and which parameters are not
  a plain prefix slice of the full-size weight (named slicers of :mod:`supernet.elastic`).

Adding a kind means registering one entry (next to its family's lowering) plus its module.

>>> kind = get_kind("ef2.ffn")
>>> kind.module
'supernet.blocks:Ef2Block'
>>> get_kind("nope")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
SpaceError: unknown block kind 'nope'; known block kinds: ...
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

from .errors import SpaceError
from .ops import OpTrace

if TYPE_CHECKING:
    from .specs import BlockSpec

__all__ = ["BlockKind", "register_kind", "get_kind", "list_kinds", "trace"]


@dataclass(frozen=True)
class BlockKind:
    """One kind of block.

    Args:
        name: ``family prefix . kind``, e.g. ``"ef2.attn_ffn"``; the first field of LUT keys.
        doc: one line saying what the block is.
        module: ``"package.module:Callable"`` that builds the torch module from a spec.
        trace: records the block's ops for a spec on an :class:`OpTrace`.
        shares: ``(parameter prefix, donor kind)`` pairs: in a supernet slot that can also hold
            the donor kind, these parameters are the donor's (e.g. the FFN of a V2 attention
            block is the FFN of the plain block in the same slot).
        slicers: ``(parameter name, slicer name)`` pairs for parameters whose active part is not
            the leading slice of the full-size tensor (resolved by :mod:`supernet.elastic`).
    """

    name: str
    doc: str
    module: str
    trace: Callable[[BlockSpec, OpTrace], None]
    shares: tuple[tuple[str, str], ...] = ()
    slicers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if "." not in self.name:
            raise SpaceError(f"block kind names are 'family.kind', got {self.name!r}")
        if ":" not in self.module:
            raise SpaceError(f"BlockKind.module must be 'package.module:Callable', got {self.module!r}")

    @property
    def is_head(self) -> bool:
        """A classifier head: the last block of a ``classify`` lowering, absent from a ``backbone`` one."""
        return self.name.endswith(".head")

    def donor(self, param: str) -> str | None:
        """The kind whose weights ``param`` shares in the same slot, or None."""
        for prefix, donor in self.shares:
            if param == prefix.rstrip(".") or param.startswith(prefix):
                return donor
        return None

    def slicer(self, param: str) -> str | None:
        """The named slicer of ``param``, or None for a plain leading slice."""
        return dict(self.slicers).get(param)


_KINDS: dict[str, BlockKind] = {}


def register_kind(kind: BlockKind) -> BlockKind:
    """Add a kind to the registry (once per name)."""
    if kind.name in _KINDS and _KINDS[kind.name] != kind:
        raise SpaceError(f"block kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def list_kinds() -> list[str]:
    return sorted(_KINDS)


def get_kind(name: str) -> BlockKind:
    """The registered kind ``name``."""
    kind = _KINDS.get(name)
    if kind is None:
        raise SpaceError(f"unknown block kind {name!r}; known block kinds: {', '.join(list_kinds())}")
    return kind


@lru_cache(maxsize=65536)
def trace(spec: BlockSpec) -> OpTrace:
    """The op trace of one block (cached per spec; treat the result as read-only)."""
    t = OpTrace()
    get_kind(spec.kind).trace(spec, t)
    return t
