"""Evaluate subnets that share a prefix with an anchor subnet by running only their suffix.

A subnet is a sequence of blocks (``Supernet.units_for(arch)``: each lowered spec with the
supernet unit at its position, in forward order). Two subnets that agree on their first ``k`` blocks (same supernet unit and same
spec) compute the same activations entering block ``k`` for the same input, in training mode (BN
recalibration) and in evaluation mode (with the same recalibrated statistics). So the inputs of the
anchor's blocks are computed once, on the fixed calibration batches (training mode) and on the
fixed validation batches (evaluation mode), and kept; a candidate that differs from block ``k`` on
only recalibrates and runs blocks ``k...``. The result is the same computation as a full
recalibration and evaluation, block for block, on the same batches.

Kept inputs are limited to ``cache_bytes``; boundaries nearer the head are kept first (they are
the cheapest to keep and save the most work). A candidate starts from the last kept boundary at
or before its first differing block.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn

from supernet.elastic import unit_name

if TYPE_CHECKING:
    from search_spaces import ArchConfig
    from supernet.elastic import Supernet

__all__ = ["PrefixCachedRunner", "Prepared"]

logger = logging.getLogger(__name__)

Unit = tuple[str, "BlockSpec"]


@dataclass
class _Boundary:
    """The inputs of one block of the anchor: one tensor per calibration batch and per validation batch."""

    calib: Sequence[torch.Tensor]
    val: Sequence[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.calib, *self.val))


@dataclass
class Prepared:
    """A subnet's blocks from ``start`` on, recalibrated, with the inputs of block ``start`` (see :meth:`PrefixCachedRunner.prepare`).

    It stays valid when the anchor changes: it keeps its own reference to those inputs.
    """

    arch: ArchConfig
    start: int
    mods: list[nn.Module]
    base: _Boundary
    macs: int = 0   # per image, of the blocks from start on

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.mods for p in m.parameters())


def _macs(units: Sequence[Unit]) -> int:
    from search_spaces import block_macs

    return sum(block_macs(spec) for _, spec in units)


def _bns(modules: Sequence[nn.Module]) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class PrefixCachedRunner:
    """Validation logits of subnets, with BN recalibrated, reusing an anchor subnet's block inputs.

    Args:
        net: the supernet.
        calib: BN calibration batches ``(B, C, H, W)`` (as :func:`supernet.bn.recalibrate_bn` uses them).
        val: validation image batches ``(B, C, H, W)``, in order.
        val_images: the number of images in ``val``.
        cache_bytes: most bytes of kept block inputs.
        channels_last: run blocks in ``torch.channels_last`` memory format.
    """

    def __init__(self, net: Supernet, calib: Sequence[torch.Tensor], val: Sequence[torch.Tensor], *,
                 val_images: int, cache_bytes: int = 1 << 30, channels_last: bool = True) -> None:
        self.net, self.calib, self.val, self.val_images = net, calib, val, val_images
        self.cache_bytes, self.channels_last = cache_bytes, channels_last
        self._anchor: list[Unit] | None = None
        self._anchor_arch: ArchConfig | None = None
        self._kept: dict[int, _Boundary] = {0: _Boundary(self.calib, self.val)}
        self.blocks_run = 0          # blocks recalibrated and run, over all calls (work done)
        self.blocks_total = 0        # blocks a full recalibration and evaluation would have run
        self.macs_run = 0            # multiply-accumulates run: per image, per block, over all calls
        self._n_calib = sum(len(t) for t in calib)

    # ------------------------------------------------------------------ structure
    def units(self, arch: ArchConfig) -> list[Unit]:
        """``(supernet unit name, spec)`` of every block of ``arch``, in forward order."""
        return [(unit_name(spec), spec) for _, spec in self.net.units_for(arch)]

    @staticmethod
    def common_prefix(a: Sequence[Unit], b: Sequence[Unit]) -> int:
        """Number of leading blocks that ``a`` and ``b`` share (same unit, same spec)."""
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    def _start(self, units: Sequence[Unit]) -> int:
        """The last kept boundary at or before the first block where ``units`` leaves the anchor."""
        if self._anchor is None:
            return 0
        p = self.common_prefix(self._anchor, units)
        return max(k for k in self._kept if k <= min(p, len(units) - 1))

    # ------------------------------------------------------------------ running
    def _modules(self, units: Sequence[Unit]) -> list[nn.Module]:
        mods = []
        for name, spec in units:
            m = self.net.units[name].export(spec)
            mods.append(m.to(memory_format=torch.channels_last) if self.channels_last else m)
        return mods

    @torch.no_grad()
    def prepare(self, arch: ArchConfig) -> Prepared:
        """``arch``'s blocks after the anchor's shared prefix, exported and recalibrated, ready to evaluate."""
        units = self.units(arch)
        start = self._start(units)
        base = self._kept[start]
        mods = self._modules(units[start:])
        self._recalibrate(mods, base.calib, start, {})
        for mod in mods:
            mod.eval()
        self.blocks_run += len(mods)
        self.blocks_total += len(units)
        prepared = Prepared(arch, start, mods, base, _macs(units[start:]))
        self.macs_run += prepared.macs * self._n_calib
        return prepared

    @torch.no_grad()
    def run(self, prepared: Prepared, first: int, stop: int) -> torch.Tensor:
        """Logits ``(N, classes)`` of a prepared subnet on validation batches ``first`` to ``stop - 1``."""
        out = []
        for x in prepared.base.val[first:stop]:
            for mod in prepared.mods:
                x = mod(x)
            out.append(x)
            self.macs_run += prepared.macs * len(x)
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def logits(self, arch: ArchConfig, n_batches: int | None = None, *, keep: bool = False) -> torch.Tensor:
        """Logits ``(N, classes)`` of ``arch`` on the first ``n_batches`` validation batches (default all).

        With ``keep``, ``arch`` becomes the anchor and the inputs of its blocks are kept (all batches).
        """
        if not keep:
            return self.run(self.prepare(arch), 0, len(self.val) if n_batches is None else n_batches)
        units = self.units(arch)
        start = self._start(units)
        base = self._kept[start]
        mods = self._modules(units[start:])
        new: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {k: ([], [])
                                                                          for k in self._plan(mods, start, base)}
        self._recalibrate(mods, base.calib, start, new)
        for mod in mods:
            mod.eval()
        out = []
        for x in base.val:
            for j, mod in enumerate(mods):
                if start + j in new:
                    new[start + j][1].append(x)
                x = mod(x)
            out.append(x)
        self.blocks_run += len(mods)
        self.blocks_total += len(units)
        self.macs_run += _macs(units[start:]) * (self._n_calib + self.val_images)
        self._kept = {k: b for k, b in self._kept.items() if k <= start}
        self._kept.update({k: _Boundary(c, v) for k, (c, v) in new.items()})
        self._anchor, self._anchor_arch = list(units), arch
        return torch.cat(out) if out else torch.empty(0)

    def _recalibrate(self, mods: Sequence[nn.Module], calib: Sequence[torch.Tensor], start: int,
                     new: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]) -> None:
        """Re-estimate the BN statistics of ``mods`` on ``calib`` (cumulative average), keeping inputs in ``new``."""
        bns = _bns(mods)
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        for mod in mods:
            mod.train()
        for x in calib:
            for j, mod in enumerate(mods):
                if start + j in new:
                    new[start + j][0].append(x)
                x = mod(x)

    @torch.no_grad()
    def _plan(self, mods: Sequence[nn.Module], start: int, base: _Boundary) -> set[int]:
        """Boundaries after ``start`` to keep for a new anchor whose blocks from ``start`` on are ``mods``:
        from the head backwards, within the byte limit. Kept boundaries at or before ``start`` stay
        (they are the new anchor's too). Sizes come from one image run through ``mods``.
        """
        images = self._n_calib + self.val_images
        budget = self.cache_bytes - sum(b.nbytes for k, b in self._kept.items() if 0 < k <= start)
        x, sizes = base.val[0][:1], {}
        for j, mod in enumerate(mods[:-1]):
            x = mod.eval()(x)
            sizes[start + j + 1] = x[0].numel() * x.element_size() * images
        keep = set()
        for k in sorted(sizes, reverse=True):
            if sizes[k] <= budget:
                keep.add(k)
                budget -= sizes[k]
        return keep

    # ------------------------------------------------------------------ anchor
    @property
    def anchor(self) -> ArchConfig | None:
        return self._anchor_arch

    def full_macs(self, arch: ArchConfig) -> int:
        """Multiply-accumulates of one full recalibration and evaluation of ``arch`` (every block, every image)."""
        return _macs(self.units(arch)) * (self._n_calib + self.val_images)

    def kept_bytes(self) -> int:
        """Bytes of kept block inputs (the input batches themselves not counted)."""
        return sum(b.nbytes for k, b in self._kept.items() if k > 0)
