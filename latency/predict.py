"""Network latency from a LUT: lower the architecture, sum its blocks, apply the calibration.

:func:`predict_latency` is the one lookup that nas-info, search and extraction use. It is
fast: the first call on a table compiles it (spec -> calibrated milliseconds), and every
lowered unit's calibrated figure is cached. Lowering is positioned and piecewise
(:mod:`search_spaces.lowering`): the stem, each stage's entry, each block and the head lower
from what the previous unit hands on (a carry: map size, channels, token layout), the
architecture's family-wide fields and their own config alone. So each unit's figure is cached
under exactly that key, and an architecture whose units have all been seen costs one
dictionary lookup per block and no lowering. The cache is exact by construction, not a
heuristic. A spec that the table lacks is an error that names the key, the nearest keys and
the command that rebuilds the table; nothing is filled in silently.

>>> from latency.lut import LatencyTable
>>> from latency.stats import LatencyStats
>>> from search_spaces import get_space, lower
>>> from search_spaces.enumerate import enumerate_specs
>>> space = get_space("efficientformer_v2_demo")
>>> lut = LatencyTable(device="demo", backend="onnxruntime", resolution=32, num_classes=10, in_chans=1,
...                    distillation=True, space_name=space.name, space_hash=space.hash)
>>> for spec in enumerate_specs(space, resolution=32, num_classes=10, in_chans=1):
...     lut.set_measured(spec.key, LatencyStats.from_samples([0.1]))
>>> round(predict_latency(space.smallest(), lut), 3)  # 9 blocks of 0.1 ms
0.9
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from latency.lut import LatencyTable
from search_spaces import ArchConfig, BlockSpec, LoweringSetup, SearchSpace, lower
from search_spaces.errors import NasUserError
from search_spaces.lowering import Carry, get_family

__all__ = ["BlockLatency", "LatencyBreakdown", "fastest", "predict_latency", "predict_breakdown", "check_covers",
           "table_setup", "block_ms"]

logger = logging.getLogger(__name__)

_MAX_CACHED_PARTS = 500_000
_NUMERIC = ("cin", "cout", "h", "w", "stride", "hidden", "heads", "key_dim", "value_dim", "attn_stride", "num_classes")


@dataclass(frozen=True)
class BlockLatency:
    """One block's share of a prediction.

    Attributes:
        key: the block-spec key.
        kind: the block kind.
        lut_ms: the LUT's figure for it (its median or fastest run, as ``lut.statistic`` says).
        calibrated_ms: ``lut_ms`` times the calibration weight of its kind, plus the
            calibration's per-block constant.
        source: ``"measured"`` or ``"predicted"``.
    """

    key: str
    kind: str
    lut_ms: float
    calibrated_ms: float
    source: str


@dataclass(frozen=True)
class LatencyBreakdown:
    """A prediction with its parts.

    Attributes:
        device: the LUT's device.
        total_ms: calibrated network latency (what :func:`predict_latency` returns).
        raw_sum_ms: plain sum of the blocks' LUT figures.
        offset_ms: the calibration's per-inference constant.
        calibration: the calibration method.
        predicted: True when any block figure is predicted rather than measured.
        blocks: one :class:`BlockLatency` per block, in forward order.
    """

    device: str
    total_ms: float
    raw_sum_ms: float
    offset_ms: float
    calibration: str
    predicted: bool
    blocks: tuple[BlockLatency, ...]

    @property
    def source(self) -> str:
        """``"predicted"`` or ``"measured-lut"``: the label every report shows next to the figure."""
        return "predicted" if self.predicted else "measured-lut"

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "total_ms": self.total_ms, "raw_sum_ms": self.raw_sum_ms,
            "offset_ms": self.offset_ms, "calibration": self.calibration, "source": self.source,
            "predicted": self.predicted,
            "blocks": [{"key": b.key, "kind": b.kind, "lut_ms": b.lut_ms, "calibrated_ms": b.calibrated_ms,
                        "source": b.source} for b in self.blocks],
        }


class _Compiled:
    """A table turned into spec -> calibrated ms, with per-architecture and per-unit caches.

    ``parts`` holds one dict per set of family-wide fields, mapping a unit's cache key to
    ``(calibrated ms, carry id out)``: ``(-1, width)`` for the stem, ``(i, width, carry id)``
    for the entry of stage ``i``, ``(i, j == 0, width, mixer, expansion, carry id)`` for block ``j``
    (a block's spec depends on its index only through whether it opens the stage: see
    :class:`~search_spaces.lowering.Family`)
    and ``("head", carry id)`` for the head. Carries are interned as small ints (``carries``),
    so a warm lookup builds tuples of plain values only.
    """

    def __init__(self, lut: LatencyTable) -> None:
        self.version = lut.version
        cal = lut.calibration
        self.offset = cal.offset_ms
        self.setup = table_setup(lut)
        self.by_spec: dict[BlockSpec, float] = {}
        for key, entry in lut.items():
            spec = BlockSpec.from_key(key)
            self.by_spec[spec] = cal.block_ms(spec.kind, entry.value(lut.statistic))
        self.parts: dict[tuple[Any, ...], dict[tuple[Any, ...], tuple[float, int]]] = {}
        self.carries: list[Carry] = []
        self.carry_ids: dict[Carry, int] = {}
        self.size = 0

    def carry_id(self, carry: Carry) -> int:
        cid = self.carry_ids.get(carry)
        if cid is None:
            cid = self.carry_ids[carry] = len(self.carries)
            self.carries.append(carry)
        return cid


def table_setup(lut: LatencyTable) -> LoweringSetup:
    """The lowering setup a table's specs were made for."""
    setup = getattr(lut, "setup", None)
    if isinstance(setup, LoweringSetup):
        return setup
    return LoweringSetup(resolution=lut.resolution, num_classes=lut.num_classes, in_chans=lut.in_chans,
                         distillation=lut.distillation, task=getattr(lut, "task", "classify"))


def _compiled(lut: LatencyTable) -> _Compiled:
    if not isinstance(lut, LatencyTable):
        raise TypeError(f"`lut` must be a LatencyTable (LatencyTable.load(path)), got {type(lut).__name__}")
    comp: _Compiled | None = getattr(lut, "_compiled_predictor", None)
    if comp is None or comp.version != lut.version:
        comp = _Compiled(lut)
        lut._compiled_predictor = comp  # type: ignore[attr-defined]
    return comp


def _lower(arch: ArchConfig, lut: LatencyTable) -> tuple[BlockSpec, ...]:
    if not isinstance(arch, ArchConfig):
        raise TypeError(f"`arch` must be an ArchConfig, got {type(arch).__name__}")
    return lower(arch, _compiled(lut).setup)


def _miss(comp: _Compiled, lut: LatencyTable, arch: ArchConfig, cache: dict[tuple[Any, ...], tuple[float, int]],
          key: tuple[Any, ...], specs: Sequence[BlockSpec], carry: Carry) -> tuple[float, int]:
    """Sum a freshly lowered unit, remember it under ``key`` and return ``(ms, carry id out)``."""
    hit = (_sum_specs(specs, lut, comp, arch), comp.carry_id(carry))
    if comp.size >= _MAX_CACHED_PARTS:
        for part in comp.parts.values():
            part.clear()
        comp.size = 0
    cache[key] = hit
    comp.size += 1
    return hit


def _staged_sum(arch: ArchConfig, lut: LatencyTable, comp: _Compiled) -> float:
    """The calibrated network latency, summed unit by unit through the per-unit cache (see :class:`_Compiled`)."""
    family = get_family(arch.family)
    family.check(arch)
    setup = comp.setup
    consts = (arch.family, len(arch.stages), arch.stem_stride, arch.head_widths, arch.head_dim)
    cache = comp.parts.get(consts)
    if cache is None:
        cache = comp.parts[consts] = {}
    get = cache.get
    stages = arch.stages
    key: tuple[Any, ...] = (-1, stages[0].width)
    hit = get(key)
    if hit is None:
        specs, carry = family.stem(arch, setup)
        hit = _miss(comp, lut, arch, cache, key, specs, carry)
    total, cid = hit
    si = 0
    for st in stages:
        w = st.width
        key = (si, w, cid)
        hit = get(key)
        if hit is None:
            specs, carry = family.entry(arch, si, comp.carries[cid], setup)
            hit = _miss(comp, lut, arch, cache, key, specs, carry)
        total += hit[0]
        cid = hit[1]
        for bi, b in enumerate(st.blocks):
            key = (si, bi == 0, w, b.mixer, b.expansion, cid)
            hit = get(key)
            if hit is None:
                spec, carry = family.block(arch, si, bi, comp.carries[cid], setup)
                hit = _miss(comp, lut, arch, cache, key, (spec,), carry)
            total += hit[0]
            cid = hit[1]
        si += 1
    if setup.task == "classify":
        key = ("head", cid)
        hit = get(key)
        if hit is None:
            carry = comp.carries[cid]
            hit = _miss(comp, lut, arch, cache, key, family.head(arch, carry, setup), carry)
        total += hit[0]
    return total + comp.offset


def _distance(a: BlockSpec, b: BlockSpec) -> float:
    d = 0.0
    for name in _NUMERIC:
        x, y = getattr(a, name), getattr(b, name)
        if x != y:
            d += abs(math.log((x + 1) / (y + 1)))
    d += 10.0 * ((a.tokens_in != b.tokens_in) + (a.distillation != b.distillation) + (a.head_hidden != b.head_hidden))
    return d


def _rebuild_command(lut: LatencyTable) -> str:
    setup = table_setup(lut)
    cmd = f"nas-build-lut --device {lut.device} --space {lut.space_name} --resolution {setup.text}"
    if setup.task != "classify":
        cmd += f" --task {setup.task}"
    if lut.num_classes != 1000:
        cmd += f" --num-classes {lut.num_classes}"
    if lut.in_chans != 3:
        cmd += f" --in-chans {lut.in_chans}"
    if lut.path is not None:
        cmd += f" --out {lut.path}"
    return cmd


def _missing_error(spec: BlockSpec, lut: LatencyTable, comp: _Compiled, arch: ArchConfig | None) -> NasUserError:
    same_kind = [s for s in comp.by_spec if s.kind == spec.kind]
    nearest = sorted(same_kind, key=lambda s: _distance(spec, s))[:3]
    near = "; nearest keys: " + ", ".join(s.key for s in nearest) if nearest else \
        f"; the LUT has no {spec.kind!r} blocks at all"
    where = f"LUT {str(lut.path)!r}" if lut.path is not None else "the LUT"
    family = (lut.space or {}).get("family")
    why = ""
    if arch is not None and family and arch.family != family:
        why = f" (the architecture is {arch.family!r}, the LUT's space is {family!r})"
    elif not lut.complete:
        why = f" (the LUT is incomplete: {len(lut)} of {lut.expected_entries} entries; rerun the build to resume)"
    return NasUserError(f"block {spec.key!r} is missing from {where} for {lut.device} at {comp.setup.text}px"
                        f"{why}{near}. Rebuild it with: {_rebuild_command(lut)}")


def predict_latency(arch: ArchConfig, lut: LatencyTable, *, specs: Sequence[BlockSpec] | None = None) -> float:
    """Calibrated latency of ``arch`` in milliseconds, from ``lut``.

    The architecture is lowered with the table's resolution, classes, input channels and
    distillation head; the calibrated figures of its blocks are summed and the calibration's
    offset added. Whether the result is measured or predicted is ``lut.predicted``.

    Args:
        arch: the architecture.
        lut: a table for the device (check it first with
            :meth:`~latency.lut.LatencyTable.check_compatible`).
        specs: ``arch`` already lowered for the table's setup (skips lowering; not cached).

    Returns:
        Milliseconds.

    Raises:
        NasUserError: a block of ``arch`` is missing from the table (the message names the key,
            the nearest keys and the command that rebuilds the table).
        TypeError: ``arch`` or ``lut`` of the wrong type.
    """
    comp = _compiled(lut)
    if specs is not None:
        return comp.offset + _sum_specs(specs, lut, comp, arch if isinstance(arch, ArchConfig) else None)
    if not isinstance(arch, ArchConfig):
        raise TypeError(f"`arch` must be an ArchConfig, got {type(arch).__name__}")
    return _staged_sum(arch, lut, comp)


def _sum_specs(block_specs: Sequence[BlockSpec], lut: LatencyTable, comp: _Compiled, arch: ArchConfig | None) -> float:
    """The calibrated figures of ``block_specs`` summed (the per-inference offset not included)."""
    by_spec = comp.by_spec
    total = 0.0
    try:
        for spec in block_specs:
            total += by_spec[spec]
    except KeyError:
        missing = next(s for s in block_specs if s not in by_spec)
        raise _missing_error(missing, lut, comp, arch) from None
    return total


def predict_breakdown(arch: ArchConfig, lut: LatencyTable, *,
                      specs: Sequence[BlockSpec] | None = None) -> LatencyBreakdown:
    """Like :func:`predict_latency`, with every block's share and its source.

    Raises:
        NasUserError: a block is missing from the table (see :func:`predict_latency`).
    """
    comp = _compiled(lut)
    block_specs = tuple(specs) if specs is not None else _lower(arch, lut)
    blocks = []
    for spec in block_specs:
        if spec not in comp.by_spec:
            raise _missing_error(spec, lut, comp, arch)
        entry = lut[spec.key]
        blocks.append(BlockLatency(spec.key, spec.kind, entry.value(lut.statistic), comp.by_spec[spec], entry.source))
    total = comp.offset + sum(b.calibrated_ms for b in blocks)
    return LatencyBreakdown(
        device=lut.device, total_ms=total, raw_sum_ms=sum(b.lut_ms for b in blocks), offset_ms=comp.offset,
        calibration=lut.calibration.method,
        predicted=any(b.source != "measured" for b in blocks) or lut.calibration.method == "prior",
        blocks=tuple(blocks),
    )


def block_ms(spec: BlockSpec, lut: LatencyTable) -> float:
    """One block's calibrated milliseconds (what :func:`predict_latency` sums; the offset excluded).

    Raises:
        NasUserError: the block is missing from the table (see :func:`predict_latency`).
    """
    comp = _compiled(lut)
    value = comp.by_spec.get(spec)
    if value is None:
        raise _missing_error(spec, lut, comp, None)
    return value


def fastest(space: SearchSpace, lut: LatencyTable) -> tuple[float, ArchConfig]:
    """The config of ``space`` with the lowest :func:`predict_latency` on ``lut``, and that latency.

    Exact, not a bound: a prediction is the table's offset plus one calibrated figure per unit,
    so :func:`search_spaces.enumerate.cheapest` finds the minimum stage by stage. On a measured
    table it need not be the smallest config (a narrower layer can time slower). A search uses it
    to refuse, before evaluating anything, a latency budget that no config can meet.

    Raises:
        NasUserError: a spec of the space is missing from the table (see :func:`predict_latency`).
    """
    from search_spaces.enumerate import cheapest

    comp = _compiled(lut)
    total, arch = cheapest(space, comp.setup, lambda spec: block_ms(spec, lut))
    return total + comp.offset, arch


def check_covers(lut: LatencyTable, specs: Sequence[BlockSpec]) -> None:
    """Raise the missing-spec error for the first of ``specs`` that ``lut`` lacks (no-op when all are there)."""
    comp = _compiled(lut)
    for spec in specs:
        if spec not in comp.by_spec:
            raise _missing_error(spec, lut, comp, None)
