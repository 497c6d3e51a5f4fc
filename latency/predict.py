"""Network latency from a LUT: lower the architecture, sum its blocks, apply the calibration.

:func:`predict_latency` is the one lookup that nas-info, search and extraction use. It is
fast: the first call on a table compiles it (spec -> calibrated milliseconds), and results are
cached per architecture, so repeated lookups cost a dictionary access. New architectures are
summed from cached *block signatures*: a block's spec depends only on local choices (its
stage and width, its own mixer and expansion; for the block that opens a stage also the
previous width, for a later block its predecessor's mixer; see :mod:`search_spaces.enumerate`),
so once a signature has been
seen in one lowering, later architectures need no lowering at all. After 16 lowerings the
space's signatures are learnt in one go from a compact set of covering configs. The first few
and then every 256th shortcut answer are checked against a full lowering, and any
disagreement turns the shortcut off for that table. A spec that the table lacks is an error that names the key, the
nearest keys and the command that rebuilds the table; nothing is filled in silently.

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
from search_spaces import ArchConfig, BlockSpec, StageConfig, lower
from search_spaces.errors import NasUserError

__all__ = ["BlockLatency", "LatencyBreakdown", "predict_latency", "predict_breakdown", "check_covers"]

logger = logging.getLogger(__name__)

_MAX_CACHED_ARCHS = 200_000
_CHECK_EVERY = 256  # every n-th fast-path answer (and the first few) is checked against a full lowering
_CHECK_FIRST = 4
_PRIME_AFTER = 16  # after this many lowerings, learn the space's block signatures at once
_NUMERIC = ("cin", "cout", "size", "stride", "hidden", "heads", "key_dim", "value_dim", "num_classes")


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
    """A table turned into spec -> calibrated ms, with per-architecture and per-block-signature caches."""

    def __init__(self, lut: LatencyTable) -> None:
        self.version = lut.version
        cal = lut.calibration
        self.offset = cal.offset_ms
        self.by_spec: dict[BlockSpec, float] = {}
        for key, entry in lut.items():
            spec = BlockSpec.from_key(key)
            self.by_spec[spec] = cal.block_ms(spec.kind, entry.value(lut.statistic))
        self.by_arch: dict[ArchConfig, float] = {}
        self.layouts: dict[tuple[Any, ...], _Layout | None] = {}
        self.by_sig: dict[tuple[Any, ...], float] = {}
        self.fast_ok = True
        self.fast_answers = 0
        self.slow_answers = 0
        self.primed = False


def _arch_constants(arch: ArchConfig) -> tuple[Any, ...]:
    return (arch.family, len(arch.stages), arch.stem_stride, arch.head_widths, arch.head_dim)


_Layout = tuple[tuple[int, ...], int, tuple[bool, ...]]


def _layout(arch: ArchConfig, lut: LatencyTable, base: Sequence[BlockSpec]) -> _Layout | None:
    """How this family's lowering is laid out, found by lowering a few variants of ``arch``.

    Returns ``(prefix, tail, opening_sees_prev)``: stage ``si`` lowers to ``prefix[si]`` specs
    (stem, downsampling), then one spec per block; ``tail`` specs (the head) follow the last
    stage; ``opening_sees_prev[si]`` says whether the spec of the stage's first block changes
    with the previous stage's width. None when the lowering does not have that shape.
    """
    n = len(base)
    ends = []
    for si, st in enumerate(arch.stages):
        if not st.blocks:
            return None
        try:
            longer = _lower(arch.replace_stage(si, StageConfig(st.width, st.blocks + (st.blocks[-1],))), lut)
        except NasUserError:
            return None
        if len(longer) != n + 1:
            return None
        end = next((i for i in range(n) if longer[i] != base[i]), n)
        if tuple(longer[end + 1:]) != tuple(base[end:]):
            return None
        ends.append(end)
    prefix, starts, start = [], [], 0
    for st, end in zip(arch.stages, ends):
        p = end - start - len(st.blocks)
        if p < 0:
            return None
        prefix.append(p)
        starts.append(start)
        start = end
    sees_prev = [True] * len(arch.stages)
    for si in range(1, len(arch.stages)):
        prev = arch.stages[si - 1]
        try:
            wider = _lower(arch.replace_stage(si - 1, StageConfig(prev.width + 8, prev.blocks)), lut)
        except NasUserError:
            continue
        first = starts[si] + prefix[si]
        if len(wider) == n:
            sees_prev[si] = wider[first] != base[first]
    return tuple(prefix), n - ends[-1], tuple(sees_prev)


def _signatures(arch: ArchConfig, layout: _Layout) -> list[tuple[tuple[Any, ...], int]]:
    """``(signature, number of specs)`` pairs covering the lowering of ``arch`` in order (see :func:`_fast_sum`)."""
    prefix, tail, sees_prev = layout
    out: list[tuple[tuple[Any, ...], int]] = []
    prev_w = None
    for si, st in enumerate(arch.stages):
        blocks, w = st.blocks, st.width
        out.append((("pre", si, prev_w, w), prefix[si]))
        b = blocks[0]
        out.append((("blk0", si, prev_w if sees_prev[si] else None, w, b.mixer, b.expansion), 1))
        for bi in range(1, len(blocks)):
            b = blocks[bi]
            out.append((("blk", si, w, b.mixer, b.expansion, blocks[bi - 1].mixer), 1))
        prev_w = w
    last = arch.stages[-1]
    out.append((("tail", last.width, last.blocks[-1].mixer), tail))
    return out


def _prime(lut: LatencyTable, comp: _Compiled) -> None:
    """Learn the block signatures of the table's space from a compact set of covering configs.

    For every stage and width, configs whose stage holds every plain expansion and then each
    attention block after each kind of predecessor, or opens with it; for every (previous
    width, width) pair, one config for the stage's stem or downsampling. About 2,000 lowerings
    (0.3-0.6 s) for the default V2 space, once per table.
    """
    space = lut.search_space()
    if space is None:
        return
    from search_spaces import BlockConfig

    smallest = space.smallest()
    layout = comp.layouts.get(_arch_constants(smallest))
    if layout is None:
        return

    def learn(si: int, prev_w: int | None, w: int, blocks: Sequence[Any]) -> None:
        arch = smallest
        if prev_w is not None:
            arch = arch.replace_stage(si - 1, StageConfig(prev_w, smallest.stages[si - 1].blocks))
        arch = arch.replace_stage(si, StageConfig(w, tuple(blocks)))
        try:
            specs = _lower(arch, lut)
        except NasUserError:
            return
        if all(sp in comp.by_spec for sp in specs):
            _learn(arch, specs, lut, comp)

    for si, ch in enumerate(space.stages):
        plain = [BlockConfig(ch.plain_mixer, e) for e in ch.expansions]
        attn = [BlockConfig(m, e) for m in ch.attn_mixers for e in ch.expansions]
        pairs = [blk for pm in ch.attn_mixers for b in attn for blk in (BlockConfig(pm, ch.expansions[0]), b)]
        variants = [plain + plain]
        variants += [plain + [b] + pairs for b in attn] + [[b] + pairs for b in attn]
        prevs = space.stages[si - 1].widths if si else (None,)
        for w in ch.widths:
            for prev_w in (prevs if layout[2][si] else prevs[:1]):
                for blocks in variants:
                    learn(si, prev_w, w, blocks)
            for prev_w in prevs[1:] if not layout[2][si] else ():
                learn(si, prev_w, w, plain)


def _fast_sum(arch: ArchConfig, comp: _Compiled) -> float | None:
    """The calibrated sum from block signatures, or None when one is unknown.

    Signatures: a stage's stem/downsampling by (stage, previous width, width); its opening
    block by (stage, previous width if it matters, width, mixer, expansion); a later block by
    (stage, width, mixer, expansion, predecessor's mixer); the head by (width, last mixer).
    """
    layout = comp.layouts.get((arch.family, len(arch.stages), arch.stem_stride, arch.head_widths, arch.head_dim))
    if layout is None:
        return None
    sees_prev = layout[2]
    by_sig = comp.by_sig
    total = comp.offset
    prev_w = None
    w, pm = 0, ""
    try:
        for si, st in enumerate(arch.stages):
            blocks, w = st.blocks, st.width
            if not blocks:
                return None
            total += by_sig[("pre", si, prev_w, w)]
            b = blocks[0]
            total += by_sig[("blk0", si, prev_w if sees_prev[si] else None, w, b.mixer, b.expansion)]
            pm = b.mixer
            for b in blocks[1:]:
                total += by_sig[("blk", si, w, b.mixer, b.expansion, pm)]
                pm = b.mixer
            prev_w = w
        total += by_sig[("tail", w, pm)]
    except KeyError:
        return None
    return total


def _learn(arch: ArchConfig, specs: Sequence[BlockSpec], lut: LatencyTable, comp: _Compiled) -> None:
    """Record the block signatures of a lowered ``arch`` (all its specs are known to be in the table)."""
    const = _arch_constants(arch)
    if const not in comp.layouts:
        comp.layouts[const] = _layout(arch, lut, specs) if all(st.blocks for st in arch.stages) else None
    layout = comp.layouts[const]
    if layout is None:
        return
    sigs = _signatures(arch, layout)
    if sum(n for _, n in sigs) != len(specs):
        return
    i = 0
    for sig, n in sigs:
        comp.by_sig[sig] = sum(comp.by_spec[s] for s in specs[i:i + n])
        i += n


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
    return lower(arch, resolution=lut.resolution, num_classes=lut.num_classes, in_chans=lut.in_chans,
                 distillation=lut.distillation)


def _distance(a: BlockSpec, b: BlockSpec) -> float:
    d = 0.0
    for name in _NUMERIC:
        x, y = getattr(a, name), getattr(b, name)
        if x != y:
            d += abs(math.log((x + 1) / (y + 1)))
    d += 10.0 * ((a.tokens_in != b.tokens_in) + (a.distillation != b.distillation) + (a.head_hidden != b.head_hidden))
    return d


def _rebuild_command(lut: LatencyTable) -> str:
    cmd = f"nas-build-lut --device {lut.device} --space {lut.space_name} --resolution {lut.resolution}"
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
    return NasUserError(f"block {spec.key!r} is missing from {where} for {lut.device} at {lut.resolution}px"
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
        return _sum_specs(specs, lut, comp, arch if isinstance(arch, ArchConfig) else None)
    if not isinstance(arch, ArchConfig):
        raise TypeError(f"`arch` must be an ArchConfig, got {type(arch).__name__}")
    if comp.fast_ok:  # cheaper than hashing the architecture for the cache
        fast = _fast_sum(arch, comp)
        if fast is not None:
            comp.fast_answers += 1
            if comp.fast_answers <= _CHECK_FIRST or comp.fast_answers % _CHECK_EVERY == 0:
                exact = _sum_specs(_lower(arch, lut), lut, comp, arch)
                if not math.isclose(fast, exact, rel_tol=1e-9, abs_tol=1e-12):
                    logger.warning("block-signature shortcut disagreed with lowering for %s (%.6f vs %.6f ms); "
                                   "turned it off for this LUT", arch.to_string(), fast, exact)
                    comp.fast_ok = False
                    return exact
            return fast
    cached = comp.by_arch.get(arch)
    if cached is not None:
        return cached
    block_specs = _lower(arch, lut)
    total = _sum_specs(block_specs, lut, comp, arch)
    if comp.fast_ok:
        _learn(arch, block_specs, lut, comp)
        comp.slow_answers += 1
        if comp.slow_answers >= _PRIME_AFTER and not comp.primed:
            comp.primed = True  # many new architectures: learn the space's signatures in one go
            _prime(lut, comp)
    _remember(comp, arch, total)
    return total


def _remember(comp: _Compiled, arch: ArchConfig, total: float) -> None:
    if len(comp.by_arch) >= _MAX_CACHED_ARCHS:
        comp.by_arch.clear()
    comp.by_arch[arch] = total


def _sum_specs(block_specs: Sequence[BlockSpec], lut: LatencyTable, comp: _Compiled, arch: ArchConfig | None) -> float:
    by_spec = comp.by_spec
    total = comp.offset
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


def check_covers(lut: LatencyTable, specs: Sequence[BlockSpec]) -> None:
    """Raise the missing-spec error for the first of ``specs`` that ``lut`` lacks (no-op when all are there)."""
    comp = _compiled(lut)
    for spec in specs:
        if spec not in comp.by_spec:
            raise _missing_error(spec, lut, comp, None)
