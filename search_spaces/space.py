"""Search spaces: which architecture configs are allowed, and how to move between them.

A :class:`SearchSpace` holds one :class:`StageChoices` per stage. In every stage the
blocks are ``depth`` blocks of the stage's plain mixer, of which the last ``n`` may be
attention blocks (``0 <= n <= max_attn``), as in both EfficientFormer papers. Each block
picks its own expansion ratio, and each attention slot its own mixer.

>>> from search_spaces import get_space
>>> space = get_space("efficientformer_v2")
>>> arch = space.sample(0)
>>> space.contains(arch)
True
>>> space.contains(space.largest()) and space.contains(space.smallest())
True
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, TypeVar

from .arch import MIXERS, ArchConfig, BlockConfig, StageConfig
from .errors import SpaceError

__all__ = ["StageChoices", "SearchSpace", "SlimAction", "TrialLike", "ParamValue", "as_rng", "build_stage"]

_T = TypeVar("_T")

#: A value of the optuna encoding: a width, depth or attention count, an expansion, or a mixer.
ParamValue = int | float | str


class TrialLike(Protocol):
    """What :meth:`SearchSpace.suggest` needs of an optuna trial (``optuna.trial.Trial`` has it)."""

    def suggest_categorical(self, name: str, choices: Sequence[_T]) -> _T: ...

    def suggest_int(self, name: str, low: int, high: int) -> int: ...


def build_stage(width: int, expansions: Sequence[float], *, plain_mixer: str,
                attn_mixers: Sequence[str] = ()) -> StageConfig:
    """The one stage layout of every family: plain blocks first, then the attention blocks last.

    Args:
        width: the stage's channels.
        expansions: one expansion ratio per block; the stage's depth is their number.
        plain_mixer: the mixer of the leading blocks (``ffn``, ``pool``, ...).
        attn_mixers: the mixers of the last ``len(attn_mixers)`` blocks, in order.

    Raises:
        SpaceError: more attention mixers than blocks.

    >>> build_stage(48, [4, 3, 4], plain_mixer="ffn", attn_mixers=["attn"]).blocks[-2:]
    (BlockConfig(mixer='ffn', expansion=3), BlockConfig(mixer='attn', expansion=4))
    """
    n_attn = len(attn_mixers)
    if n_attn > len(expansions):
        raise SpaceError(f"a stage of {len(expansions)} blocks cannot hold {n_attn} attention blocks "
                         f"(attn_mixers {list(attn_mixers)})")
    mixers = [plain_mixer] * (len(expansions) - n_attn) + list(attn_mixers)
    return StageConfig(width, tuple(BlockConfig(m, e) for m, e in zip(mixers, expansions)))


def as_rng(rng: int | random.Random) -> random.Random:
    """A :class:`random.Random` from a seed or an existing generator (never the global one)."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, int):
        raise TypeError(f"rng must be an int seed or random.Random, got {type(rng).__name__}")
    return random.Random(rng)


@dataclass(frozen=True)
class StageChoices:
    """The choices of one stage.

    Args:
        widths: allowed widths, ascending.
        depths: allowed depths (number of blocks), ascending.
        expansions: allowed per-block expansion ratios, ascending.
        plain_mixer: the mixer of non-attention blocks.
        attn_mixers: mixers allowed in attention slots, ordered from the cheapest to the
            largest; empty if the stage has no attention slots.
        max_attn: most attention blocks (the last blocks of the stage).
        min_attn: fewest attention blocks.
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    expansions: tuple[float, ...]
    plain_mixer: str
    attn_mixers: tuple[str, ...] = ()
    max_attn: int = 0
    min_attn: int = 0

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "expansions", "attn_mixers"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if name != "attn_mixers" and (not value or list(value) != sorted(set(value))):
                raise SpaceError(f"StageChoices.{name} must be non-empty, ascending and unique, got {value}")
        if any(w <= 0 for w in self.widths) or any(d <= 0 for d in self.depths):
            raise SpaceError("StageChoices widths and depths must be positive")
        for m in (self.plain_mixer, *self.attn_mixers):
            if m not in MIXERS:
                raise SpaceError(f"mixer must be one of {MIXERS}, got {m!r}")
        if self.max_attn and not self.attn_mixers:
            raise SpaceError("StageChoices.max_attn > 0 needs attn_mixers")
        if not 0 <= self.min_attn <= self.max_attn:
            raise SpaceError(f"need 0 <= min_attn <= max_attn, got {self.min_attn} and {self.max_attn}")
        if self.min_attn > self.depths[0]:
            raise SpaceError(f"min_attn {self.min_attn} exceeds the smallest depth {self.depths[0]}")

    def attn_range(self, depth: int) -> range:
        """Allowed numbers of attention blocks at a given depth."""
        return range(self.min_attn, min(self.max_attn, depth) + 1)

    def stage(self, width: int, expansions: Sequence[float], attn_mixers: Sequence[str] = ()) -> StageConfig:
        """A stage of this stage's layout (:func:`build_stage` with this stage's plain mixer)."""
        return build_stage(width, expansions, plain_mixer=self.plain_mixer, attn_mixers=attn_mixers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "widths": list(self.widths),
            "depths": list(self.depths),
            "expansions": list(self.expansions),
            "plain_mixer": self.plain_mixer,
            "attn_mixers": list(self.attn_mixers),
            "max_attn": self.max_attn,
            "min_attn": self.min_attn,
        }


@dataclass(frozen=True)
class SlimAction:
    """One slimming step from a config: what it does, and the config it leads to.

    Args:
        name: what the step does, e.g. ``s3.block 2 expansion 4->3``.
        arch: the config it leads to.
        stage: the stage it changes (0-based; -1: unknown).
        block: the one block it changes in place (0-based), or -1 when it changes the stage as a
            whole (width, depth). Two actions with different stages, or different blocks of the
            same stage that neither changes as a whole, can be applied together
            (:meth:`SearchSpace.combine`).
        move: the kind of step, without the values it steps from and to: ``s3.width``,
            ``s3.drop block``, ``s3.block 2 expansion``. The same move made again from the config
            the action leads to has the same ``move`` ("" when not known).
    """

    name: str
    arch: ArchConfig
    stage: int = -1
    block: int = -1
    move: str = ""

    def conflicts(self, other: SlimAction) -> bool:
        """Whether the two actions touch the same stage as a whole or the same block."""
        if self.stage < 0 or other.stage < 0:
            return True
        return self.stage == other.stage and (self.block < 0 or other.block < 0 or self.block == other.block)


@dataclass(frozen=True)
class SearchSpace:
    """A family's allowed configs.

    Args:
        name: registry name.
        family: the architecture family; every config of the space has it.
        stages: choices per stage.
        stem_stride: the stem stride of every config in the space.
        head_widths: EfficientViT head widths, fixed for the space.
        head_dim: EfficientViT LiteMLA head dimension, fixed for the space.
    """

    name: str
    family: str
    stages: tuple[StageChoices, ...]
    stem_stride: int = 4
    head_widths: tuple[int, ...] = ()
    head_dim: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "head_widths", tuple(self.head_widths))

    # --------------------------------------------------------------- identity
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "stem_stride": self.stem_stride,
            "head_widths": list(self.head_widths),
            "head_dim": self.head_dim,
            "stages": [s.to_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        """Inverse of :meth:`to_dict` (used to record a run's exact space in ``supernet.json``)."""
        try:
            stages = tuple(
                StageChoices(tuple(s["widths"]), tuple(s["depths"]), tuple(s["expansions"]), s["plain_mixer"],
                             tuple(s.get("attn_mixers", ())), s.get("max_attn", 0), s.get("min_attn", 0))
                for s in d["stages"]
            )
            return cls(d["name"], d["family"], stages, d.get("stem_stride", 4), tuple(d.get("head_widths", ())),
                       d.get("head_dim", 0))
        except (KeyError, TypeError) as exc:
            raise SpaceError(f"invalid search-space description: {exc!r}") from None

    def with_stem_stride(self, stem_stride: int) -> SearchSpace:
        """The same space with another stem stride (2 suits small images such as 32x32)."""
        if stem_stride == self.stem_stride:
            return self
        return SearchSpace(self.name, self.family, self.stages, stem_stride, self.head_widths, self.head_dim)

    @property
    def hash(self) -> str:
        """Stable hash of the space's choices (12 hex digits); LUTs record it."""
        import hashlib
        import json

        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def _arch(self, stages: list[StageConfig]) -> ArchConfig:
        return ArchConfig(self.family, tuple(stages), self.stem_stride, self.head_widths, self.head_dim)

    # --------------------------------------------------------------- membership
    def why_not(self, arch: ArchConfig) -> str | None:
        """``None`` if ``arch`` is in the space, else a sentence naming the first choice outside it."""
        if arch.family != self.family:
            return f"family {arch.family!r} is not this space's family {self.family!r}"
        if arch.stem_stride != self.stem_stride:
            return f"stem_stride {arch.stem_stride} is not this space's {self.stem_stride}"
        if arch.head_widths != self.head_widths or arch.head_dim != self.head_dim:
            return (f"head (dim {arch.head_dim}, widths {list(arch.head_widths)}) is not this space's "
                    f"(dim {self.head_dim}, widths {list(self.head_widths)})")
        if len(arch.stages) != len(self.stages):
            return f"{len(arch.stages)} stages, the space has {len(self.stages)}"
        for si, (st, ch) in enumerate(zip(arch.stages, self.stages)):
            where = f"stage {si + 1}"
            if st.width not in ch.widths:
                return f"{where} width {st.width} is not one of {list(ch.widths)}"
            if st.depth not in ch.depths:
                return f"{where} depth {st.depth} is not one of {list(ch.depths)}"
            n_attn = 0
            for bi, b in enumerate(st.blocks):
                if b.expansion not in ch.expansions:
                    return f"{where} block {bi + 1} expansion {b.expansion} is not one of {list(ch.expansions)}"
                if b.mixer == ch.plain_mixer:
                    if n_attn:
                        return f"{where} block {bi + 1} is a {b.mixer!r} block after an attention block; attention blocks must be last"
                elif b.mixer in ch.attn_mixers:
                    n_attn += 1
                else:
                    allowed = [ch.plain_mixer, *ch.attn_mixers]
                    return f"{where} block {bi + 1} mixer {b.mixer!r} is not one of {allowed}"
            if n_attn not in ch.attn_range(st.depth):
                r = ch.attn_range(st.depth)
                return f"{where} has {n_attn} attention blocks, allowed {r.start} to {r.stop - 1}"
        return None

    def contains(self, arch: ArchConfig) -> bool:
        return self.why_not(arch) is None

    def check(self, arch: ArchConfig) -> ArchConfig:
        """Return ``arch`` if it is in the space, else raise :class:`SpaceError` saying which choice is outside."""
        reason = self.why_not(arch)
        if reason is not None:
            raise SpaceError(f"config is outside space {self.name!r}: {reason}")
        return arch

    # --------------------------------------------------------------- sampling
    def sample(self, rng: int | random.Random) -> ArchConfig:
        """A uniformly random config (each choice drawn independently)."""
        r = as_rng(rng)
        stages = []
        for ch in self.stages:
            width = r.choice(ch.widths)
            depth = r.choice(ch.depths)
            n_attn = r.choice(ch.attn_range(depth))
            attn = [r.choice(ch.attn_mixers) for _ in range(n_attn)]
            stages.append(ch.stage(width, [r.choice(ch.expansions) for _ in range(depth)], attn))
        return self._arch(stages)

    def largest(self) -> ArchConfig:
        """Widest, deepest config, with the most attention blocks of the largest mixer."""
        stages = []
        for ch in self.stages:
            depth = ch.depths[-1]
            n_attn = ch.attn_range(depth)[-1]
            stages.append(ch.stage(ch.widths[-1], [ch.expansions[-1]] * depth, ch.attn_mixers[-1:] * n_attn))
        return self._arch(stages)

    def smallest(self) -> ArchConfig:
        """Narrowest, shallowest config, with the fewest attention blocks of the cheapest mixer."""
        stages = [ch.stage(ch.widths[0], [ch.expansions[0]] * ch.depths[0], ch.attn_mixers[:1] * ch.min_attn)
                  for ch in self.stages]
        return self._arch(stages)

    def mutate(self, arch: ArchConfig, rng: int | random.Random, *, prob: float = 0.1) -> ArchConfig:
        """Resample each choice of ``arch`` with probability ``prob``; the result is in the space."""
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be within [0.0, 1.0], got {prob}")
        self.check(arch)
        r = as_rng(rng)
        stages = []
        for st, ch in zip(arch.stages, self.stages):
            width = r.choice(ch.widths) if r.random() < prob else st.width
            depth = r.choice(ch.depths) if r.random() < prob else st.depth
            old_exps = [b.expansion for b in st.blocks]
            exps = [old_exps[i] if i < len(old_exps) else r.choice(ch.expansions) for i in range(depth)]
            exps = [r.choice(ch.expansions) if r.random() < prob else e for e in exps]
            old_attn = [b.mixer for b in st.blocks if b.mixer != ch.plain_mixer]
            allowed = ch.attn_range(depth)
            n_attn = len(old_attn) if len(old_attn) in allowed else r.choice(allowed)
            if r.random() < prob:
                n_attn = r.choice(allowed)
            kept = old_attn[len(old_attn) - n_attn:] if n_attn else []
            attn = [r.choice(ch.attn_mixers) for _ in range(n_attn - len(kept))] + kept
            attn = [r.choice(ch.attn_mixers) if r.random() < prob else m for m in attn]
            stages.append(ch.stage(width, exps, attn))
        return self.check(self._arch(stages))

    def uniform(self, fraction: float) -> ArchConfig:
        """A uniformly scaled config: every choice at the same relative position (0 = smallest, 1 = largest).

        Used for the uniformly scaled baselines that searched subnets must beat.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be within [0.0, 1.0], got {fraction}")

        def pick(seq: Sequence[_T]) -> _T:
            return seq[round(fraction * (len(seq) - 1))]

        stages = []
        for ch in self.stages:
            depth = pick(ch.depths)
            n_attn = pick(ch.attn_range(depth))
            attn = [pick(ch.attn_mixers)] * n_attn if n_attn else []
            stages.append(ch.stage(pick(ch.widths), [pick(ch.expansions)] * depth, attn))
        return self._arch(stages)

    # --------------------------------------------------------------- optuna encoding
    def suggest(self, trial: TrialLike) -> ArchConfig:
        """Draw a config through an optuna trial, with a fixed-length parameter set (see :meth:`decode`).

        The parameter names are stable (studies resume across versions): per stage ``s``,
        ``s{s}.width``, ``s{s}.depth``, ``s{s}.attn`` (stages with attention slots), and for every
        slot ``j`` up to the deepest depth ``s{s}.b{j}.e`` and, with attention mixers, ``s{s}.b{j}.mixer``.
        """
        params: dict[str, ParamValue] = {}
        for si, ch in enumerate(self.stages):
            params[f"s{si}.width"] = trial.suggest_categorical(f"s{si}.width", list(ch.widths))
            params[f"s{si}.depth"] = trial.suggest_categorical(f"s{si}.depth", list(ch.depths))
            if ch.max_attn:
                params[f"s{si}.attn"] = trial.suggest_int(f"s{si}.attn", ch.min_attn, ch.max_attn)
            for j in range(ch.depths[-1]):
                params[f"s{si}.b{j}.e"] = trial.suggest_categorical(f"s{si}.b{j}.e", list(ch.expansions))
                if ch.attn_mixers:
                    params[f"s{si}.b{j}.mixer"] = trial.suggest_categorical(f"s{si}.b{j}.mixer",
                                                                            list(ch.attn_mixers))
        return self.decode(params)

    def decode(self, params: Mapping[str, ParamValue]) -> ArchConfig:
        """The config of a parameter set of :meth:`suggest` (always in the space).

        ``s{s}.attn`` is clamped to what the depth allows; slots beyond the depth are ignored.

        >>> from search_spaces import get_space
        >>> space = get_space("efficientformer_v2_demo")
        >>> arch = space.sample(3)
        >>> space.decode(space.encode(arch)) == arch
        True
        """
        stages = []
        for si, ch in enumerate(self.stages):
            depth = int(params[f"s{si}.depth"])
            allowed = ch.attn_range(depth)
            n_attn = min(max(int(params.get(f"s{si}.attn", 0)), allowed.start), allowed.stop - 1)
            exps = [float(params[f"s{si}.b{j}.e"]) for j in range(depth)]
            attn = [str(params[f"s{si}.b{j}.mixer"]) for j in range(depth - n_attn, depth)]
            stages.append(ch.stage(int(params[f"s{si}.width"]), exps, attn))
        return self.check(self._arch(stages))

    def encode(self, arch: ArchConfig) -> dict[str, ParamValue]:
        """A parameter set of :meth:`suggest` that :meth:`decode` turns back into ``arch``.

        Slots beyond the depth take the smallest expansion and the cheapest attention mixer.
        """
        self.check(arch)
        params: dict[str, ParamValue] = {}
        for si, (st, ch) in enumerate(zip(arch.stages, self.stages)):
            params[f"s{si}.width"] = st.width
            params[f"s{si}.depth"] = st.depth
            if ch.max_attn:
                params[f"s{si}.attn"] = sum(b.mixer != ch.plain_mixer for b in st.blocks)
            for j in range(ch.depths[-1]):
                blk = st.blocks[j] if j < st.depth else None
                params[f"s{si}.b{j}.e"] = blk.expansion if blk else ch.expansions[0]
                if ch.attn_mixers:
                    params[f"s{si}.b{j}.mixer"] = (blk.mixer if blk and blk.mixer != ch.plain_mixer
                                                   else ch.attn_mixers[0])
        return params

    # --------------------------------------------------------------- slimming
    def slimming_actions(self, arch: ArchConfig) -> list[SlimAction]:
        """Every one-step slimming move from ``arch`` that stays in the space.

        The moves (EfficientFormerV2's joint slimming, extended): shrink a stage's width
        one step; drop the stage's last plain block or its last attention block; lower one
        block's expansion one step; turn the first attention block into a plain block; and
        switch an attention block to a cheaper attention mixer (softmax to linear).
        """
        self.check(arch)
        actions: list[SlimAction] = []
        for si, (st, ch) in enumerate(zip(arch.stages, self.stages)):
            tag = f"s{si + 1}"
            blocks = list(st.blocks)
            n_attn = sum(b.mixer != ch.plain_mixer for b in blocks)
            n_plain = len(blocks) - n_attn

            def emit(name: str, move: str, new_blocks: list[BlockConfig], width: int = st.width,
                     block: int = -1) -> None:
                cand = arch.replace_stage(si, StageConfig(width, tuple(new_blocks)))
                if self.contains(cand):
                    actions.append(SlimAction(name, cand, si, block, f"{tag}.{move}"))

            wi = ch.widths.index(st.width)
            if wi > 0:
                emit(f"{tag}.width {st.width}->{ch.widths[wi - 1]}", "width", blocks, ch.widths[wi - 1])
            if n_plain:
                emit(f"{tag}.drop block {n_plain}", "drop block", blocks[: n_plain - 1] + blocks[n_plain:])
            if n_attn:
                emit(f"{tag}.drop attention block {len(blocks)}", "drop attention block", blocks[:-1])
                first = blocks[n_plain]
                emit(f"{tag}.block {n_plain + 1} {first.mixer}->{ch.plain_mixer}", "first attention block to plain",
                     blocks[:n_plain] + [BlockConfig(ch.plain_mixer, first.expansion)] + blocks[n_plain + 1:],
                     block=n_plain)
            for bi, b in enumerate(blocks):
                ei = ch.expansions.index(b.expansion)
                if ei > 0:
                    nb = list(blocks)
                    nb[bi] = BlockConfig(b.mixer, ch.expansions[ei - 1])
                    emit(f"{tag}.block {bi + 1} expansion {b.expansion}->{ch.expansions[ei - 1]}",
                         f"block {bi + 1} expansion", nb, block=bi)
                if b.mixer in ch.attn_mixers:
                    mi = ch.attn_mixers.index(b.mixer)
                    if mi > 0:
                        nb = list(blocks)
                        nb[bi] = BlockConfig(ch.attn_mixers[mi - 1], b.expansion)
                        emit(f"{tag}.block {bi + 1} {b.mixer}->{ch.attn_mixers[mi - 1]}",
                             f"block {bi + 1} cheaper mixer", nb, block=bi)
        return actions

    def combine(self, arch: ArchConfig, actions: Sequence[SlimAction]) -> ArchConfig:
        """``arch`` with several non-conflicting slimming actions of ``arch`` applied together.

        Raises:
            SpaceError: two actions conflict (:meth:`SlimAction.conflicts`), or the result is outside the space.

        >>> from search_spaces import get_space
        >>> space = get_space("efficientformer_v2_demo")
        >>> acts = space.slimming_actions(space.largest())
        >>> a, b = acts[0], next(x for x in acts if not x.conflicts(acts[0]))
        >>> both = space.combine(space.largest(), [a, b])
        >>> both.stages[a.stage] == a.arch.stages[a.stage] and both.stages[b.stage] == b.arch.stages[b.stage]
        True
        """
        stages = list(arch.stages)
        for i, act in enumerate(actions):
            for other in actions[:i]:
                if act.conflicts(other):
                    raise SpaceError(f"slimming actions {other.name!r} and {act.name!r} conflict; apply them one at a time")
            new = act.arch.stages[act.stage]
            if act.block < 0:
                stages[act.stage] = new
            else:
                blocks = list(stages[act.stage].blocks)
                blocks[act.block] = new.blocks[act.block]
                stages[act.stage] = StageConfig(stages[act.stage].width, tuple(blocks))
        return self.check(self._arch(stages))
