"""Weight-sharing supernets for the EfficientFormer V1 and V2 spaces.

Every position of the network (stem, each downsampling, each block slot, head) is an
:class:`ElasticUnit` that stores full-size weights for every block kind that can sit there.
For an active :class:`~search_spaces.BlockSpec` the unit slices those weights (the first
``k`` channels, Once-for-All style) into exactly the parameter names and shapes of the static
block, and runs the static block's own ``forward`` on them (bound into a meta-device copy of
the block for the call, as :func:`torch.func.functional_call` would). Extraction copies the
same slices into a fresh static block. The supernet's output for an architecture and the
extracted model's output are thus computed by the same code from the same numbers.

Sharing inside a V2 block slot: the FFN (``mlp.*``, ``ls2``) is one set of weights whether the
slot is an FFN block, an Attention4D block or a LiteMLA block; each mixer has its own weights.
Depth is elastic by slot: a stage of depth ``d`` uses slots ``0 .. d-1``.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn

from search_spaces import (ArchConfig, BlockConfig, BlockSpec, LoweringSetup, SearchSpace, StageConfig, block_params,
                           lower)
from search_spaces.errors import SpaceError
from search_spaces.kinds import get_kind
from search_spaces.lowering import get_family, resolve_setup

from .blocks import build_block
from .model import StaticNet, feature_info, init_weights, tokens_to_map
from .slicing import SLICERS, Slicer, SliceWithGrad, prefix_index

__all__ = ["ElasticUnit", "Supernet", "SUPPORTED_FAMILIES", "unit_name"]

SUPPORTED_FAMILIES = ("efficientformer", "efficientformer_v2")

#: Extraction builds a block of more parameters than this on the meta device (no random
#: initialisation, which costs about 1 ms per 250K values on a small CPU) and below it on the CPU
#: (building on the meta device routes every op through Python and costs about 1 ms per block).
_SKIP_INIT_ABOVE = 250_000


def _slicer(kind: str, name: str) -> Slicer | None:
    slicer = get_kind(kind).slicer(name)
    if slicer is None:
        return None
    if slicer not in SLICERS:
        raise SpaceError(f"block kind {kind!r} names slicer {slicer!r} for {name!r}, which supernet.slicing lacks; "
                         f"known slicers: {sorted(SLICERS)}")
    return SLICERS[slicer]


def _donor(kind: str, name: str, present: Iterable[str]) -> str | None:
    """The kind whose weights ``name`` of ``kind`` shares in this slot (when that kind is present)."""
    donor = get_kind(kind).donor(name)
    return donor if donor is not None and donor in present else None


def _key(kind: str) -> str:
    return kind.replace(".", "_")


def unit_name(spec: BlockSpec) -> str:
    """The supernet position of a lowered spec: ``stem``, ``down{i}``, ``s{i}b{j}`` or ``head``.

    ``i`` is the index of the architecture's stage (``spec.stage - 1`` in the EfficientFormer
    families, whose stage 0 is the stem) and ``j`` the block slot.

    Raises:
        SpaceError: the spec carries no position (it did not come from :func:`search_spaces.lower`).
    """
    if spec.stage < 0:
        raise SpaceError(f"block {spec.key!r} carries no position; take specs from search_spaces.lower()")
    if spec.stage == 0:
        return "stem"
    if get_kind(spec.kind).is_head:
        return "head"
    si = spec.stage - 1
    return f"down{si}" if spec.slot < 0 else f"s{si}b{spec.slot}"


class ElasticUnit(nn.Module):
    """One position of a supernet, holding full-size weights for each kind it can take.

    Args:
        max_specs: the largest spec of every kind allowed at this position.
        templates: a shared cache ``spec key -> meta-device static block`` (the supernet owns it).
    """

    def __init__(self, max_specs: Iterable[BlockSpec], templates: _TemplateCache) -> None:
        super().__init__()
        self.max_specs = {s.kind: s for s in max_specs}
        self.full = nn.ModuleDict()
        for kind, spec in self.max_specs.items():
            module = build_block(spec)
            for name in [n for n, _ in module.named_children()] + [n for n, _ in module.named_parameters(recurse=False)]:
                if _donor(kind, name, self.max_specs) is not None:
                    setattr(module, name, None)  # held by the donor kind's module in this slot
            self.full[_key(kind)] = module
        self._templates = templates
        #: spec key -> how to slice each tensor of its static block (see :meth:`_plan`)
        self._plans: dict[str, _Plan] = {}
        #: a head unit returns ``(head, head_dist)`` in training (see ``Supernet.set_distilled_training``)
        self.distilled = False

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.max_specs)

    def _source(self, kind: str, name: str) -> tuple[nn.Module, BlockSpec]:
        donor = _donor(kind, name, self.max_specs)
        if donor is not None:
            return self.full[_key(donor)], self.max_specs[donor]
        return self.full[_key(kind)], self.max_specs[kind]

    def _plan(self, spec: BlockSpec) -> _Plan:
        """How to slice each tensor of ``spec``'s static block out of the full weights and bind it into
        the block's template, worked out once per spec (and again if the template was evicted)."""
        template = self._templates.get(spec)
        plan = self._plans.get(spec.key)
        if plan is None or plan.template is not template:
            if spec.kind not in self.max_specs:
                raise SpaceError(f"this supernet position cannot hold a {spec.kind!r} block "
                                 f"(it holds {list(self.kinds)})")
            slices = []
            for name, t in _tensors(template):
                module, max_spec = self._source(spec.kind, name)
                slices.append(_Slice.make(name, module, t.shape, _slicer(spec.kind, name), max_spec))
            targets = [_store(template, s.name) for s in slices]
            plan = _Plan(template, tuple(slices), tuple(targets), tuple(d[leaf] for d, leaf in targets))
            self._plans[spec.key] = plan
        return plan

    def _sliced(self, plan: _Plan, spec: BlockSpec) -> list[torch.Tensor]:
        """The tensors of ``plan``'s static block, in its order, as slices of the full weights."""
        grad = torch.is_grad_enabled()
        out: list[Any] = []
        tracked: list[int] = []  # parameters sliced with their gradients, in one autograd call
        for p in plan.slices:
            full = p.store[p.leaf]
            if p.slicer is not None:
                out.append(p.slicer(full, p.shape, spec, p.max_spec))
            elif grad and full.requires_grad and isinstance(full, nn.Parameter):
                tracked.append(len(out))
                out.append(full)
            else:
                out.append(full if p.whole else full[p.index])
        if tracked:
            parts = SliceWithGrad.slices(tuple(plan.slices[i].index for i in tracked), tuple(out[i] for i in tracked))
            for i, part in zip(tracked, parts):
                out[i] = part
        return out

    def state_for(self, spec: BlockSpec) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the static block for ``spec``, as slices (views) of the full weights."""
        plan = self._plan(spec)
        return {p.name: t for p, t in zip(plan.slices, self._sliced(plan, spec))}

    def forward(self, x: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
        """The static block's own ``forward`` on the sliced weights.

        The slices are bound into the block's meta-device template for the call and the template's
        own tensors put back after it: what :func:`torch.func.functional_call` does, without its
        per-call name resolution (about a third of a millisecond per block on a small CPU)."""
        plan = self._plan(spec)
        template = plan.template
        if template.training != self.training:  # (templates are only ever switched here, whole)
            template.train(self.training)
        if hasattr(template, "distilled_training"):
            template.distilled_training = self.distilled
        tensors = self._sliced(plan, spec)
        try:
            for (store, leaf), t in zip(plan.targets, tensors):
                store[leaf] = t
            return template(x)
        finally:
            for (store, leaf), t in zip(plan.targets, plan.originals):
                store[leaf] = t

    @torch.no_grad()  # plain views to copy from: no autograd nodes, no dense copies of strided slices
    def export(self, spec: BlockSpec) -> nn.Module:
        """A fresh static block for ``spec`` with the sliced weights copied in."""
        state = {k: v.detach() for k, v in self.state_for(spec).items()}
        device = next(iter(state.values())).device if state else torch.device("cpu")
        if block_params(spec) > _SKIP_INIT_ABOVE:  # every tensor is overwritten below: skip initialising it
            with torch.device("meta"):
                block = build_block(spec)
            block.to_empty(device=device)
        else:  # building on the meta device costs more than initialising a small block
            block = build_block(spec).to(device)
        persistent = block.state_dict().keys()
        missing, unexpected = block.load_state_dict({k: v for k, v in state.items() if k in persistent}, strict=True)
        assert not missing and not unexpected
        for name, t in _tensors(block):  # non-persistent buffers (index tables) too
            if name not in persistent:
                t.copy_(state[name])
        return block


class _Slice(NamedTuple):
    """Where one tensor of a static block comes from, and which part of it."""
    name: str  # the static block's name for it
    store: dict[str, Any]  # the ``_parameters`` or ``_buffers`` of the module holding the full tensor
    leaf: str  # its key there (looked up on every call: moving the supernet replaces a buffer)
    shape: torch.Size  # the static block's shape
    index: tuple[slice, ...]  # the leading box of that shape
    whole: bool  # the box is the whole tensor
    slicer: Slicer | None  # a kind's own slicer (for non-prefix layouts)
    max_spec: BlockSpec

    @classmethod
    def make(cls, name: str, module: nn.Module, shape: torch.Size, slicer: Slicer | None,
             max_spec: BlockSpec) -> "_Slice":
        store, leaf = _store(module, name)
        full_shape = store[leaf].shape
        index = tuple(slice(0, n) for n in shape) if slicer is not None else prefix_index(full_shape, shape)
        return cls(name, store, leaf, shape, index, tuple(full_shape) == tuple(shape), slicer, max_spec)


class _Plan(NamedTuple):
    """A spec's slices and where each is bound in the spec's template (see ``ElasticUnit.forward``)."""
    template: nn.Module
    slices: tuple[_Slice, ...]
    targets: tuple[tuple[dict[str, Any], str], ...]
    originals: tuple[torch.Tensor, ...]  # the template's own (meta) tensors, put back after each call


def _store(module: nn.Module, name: str) -> tuple[dict[str, Any], str]:
    """The dict (``_parameters`` or ``_buffers``) and key holding tensor ``name`` of ``module``."""
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    return (module._parameters if leaf in module._parameters else module._buffers), leaf


def _tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


class _TemplateCache:
    """Meta-device static blocks by spec key, least recently used evicted beyond ``capacity``."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._cache: OrderedDict[str, nn.Module] = OrderedDict()

    def get(self, spec: BlockSpec) -> nn.Module:
        key = spec.key
        module = self._cache.get(key)
        if module is None:
            with torch.device("meta"):
                module = build_block(spec)
            self._cache[key] = module
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return module


class Supernet(nn.Module):
    """A weight-sharing supernet over a V1 or V2 search space.

    Args:
        space: the search space; its largest config sets the stored weight sizes.
        setup: the lowering setup (input size, classes, channels, distillation head); or
            give its fields as keywords:
        num_classes: classifier outputs.
        resolution: input side in pixels, or ``(height, width)`` (attention-bias tables
            depend on it).
        in_chans: input channels.
        distillation: add ``head_dist``; ``None`` takes the family default.

    The active architecture defaults to the largest. ``forward(x)`` runs the active one,
    ``forward(x, arch)`` any config in the space.

    >>> from search_spaces import get_space
    >>> net = Supernet(get_space("efficientformer_v2_demo"), num_classes=10, resolution=32, in_chans=1)
    >>> arch = net.sample(0)
    >>> sub = net.get_active_subnet(arch).eval()
    >>> x = torch.randn(2, 1, 32, 32)
    >>> torch.allclose(net.eval()(x, arch), sub(x), atol=1e-5)
    True
    """

    def __init__(self, space: SearchSpace, setup: LoweringSetup | None = None, *, num_classes: int | None = None,
                 resolution: int | tuple[int, int] | None = None, in_chans: int | None = None,
                 distillation: bool | None = None) -> None:
        super().__init__()
        if space.family not in SUPPORTED_FAMILIES:
            raise SpaceError(f"supernets exist for families {list(SUPPORTED_FAMILIES)}, not {space.family!r}")
        self.space = space
        self.setup = resolve_setup(get_family(space.family), setup, num_classes=num_classes, resolution=resolution,
                                   in_chans=in_chans, distillation=distillation)
        if self.setup.task != "classify":
            raise SpaceError("a supernet trains classifiers: its setup's task must be 'classify'")
        self.num_classes, self.in_chans = self.setup.num_classes, self.setup.in_chans
        self.hw = self.setup.resolution
        #: the input side for a square input (as an int), else ``(height, width)``
        self.resolution: int | tuple[int, int] = self.hw[0] if self.hw[0] == self.hw[1] else self.hw
        self.distillation = self.setup.distillation
        self._templates = _TemplateCache()
        self._lowered: OrderedDict[str, tuple[BlockSpec, ...]] = OrderedDict()
        self._valid: set[str] = set()
        self.units = nn.ModuleDict()
        for name, specs in self._max_specs().items():
            self.units[name] = ElasticUnit(specs, self._templates)
        init_weights(self)
        self.active: ArchConfig = space.largest()

    # ------------------------------------------------------------------ structure
    @staticmethod
    def unit_names(arch: ArchConfig) -> list[str]:
        """Supernet positions used by ``arch``, in the order of its lowered specs.

        Positions come from the lowering (``spec.stage``, ``spec.slot``), which does not depend
        on the input size; any valid size gives the same names.
        """
        return [unit_name(spec) for spec in lower(arch)]

    def units_for(self, arch: ArchConfig) -> list[tuple[ElasticUnit, BlockSpec]]:
        """``(unit, spec)`` for every block of ``arch``, in forward order.

        Raises:
            SpaceError: a block sits at a position this supernet lacks (the architecture does
                not fit the space the supernet was built for).
        """
        pairs = []
        for spec in self.lower(arch):
            name = unit_name(spec)
            if name not in self.units:
                raise SpaceError(f"block {spec.key!r} sits at position {name!r} (stage {spec.stage}, slot "
                                 f"{spec.slot}), which this supernet does not have; its space is {self.space.name!r}")
            pairs.append((self.units[name], spec))
        return pairs

    def _max_specs(self) -> dict[str, list[BlockSpec]]:
        """For every position, the largest spec of each kind that can sit there."""
        space = self.space
        variants = []
        for mixer_of in (lambda ch: ch.plain_mixer, lambda ch: ch.attn_mixers[-1] if ch.attn_mixers else None,
                         lambda ch: ch.attn_mixers[0] if ch.attn_mixers else None):
            stages = []
            for ch in space.stages:
                mixer = mixer_of(ch) or ch.plain_mixer
                stages.append(StageConfig(ch.widths[-1], tuple(BlockConfig(mixer, ch.expansions[-1])
                                                                for _ in range(ch.depths[-1]))))
            variants.append(ArchConfig(space.family, tuple(stages), space.stem_stride,
                                       space.head_widths, space.head_dim))
        out: dict[str, dict[str, BlockSpec]] = {}
        for arch in variants:
            for spec in self.lower(arch):
                out.setdefault(unit_name(spec), {}).setdefault(spec.kind, spec)
        return {name: list(kinds.values()) for name, kinds in out.items()}

    def lower(self, arch: ArchConfig) -> tuple[BlockSpec, ...]:
        """The block specs of ``arch`` at this supernet's setup (cached)."""
        key = arch.canonical_json()
        specs = self._lowered.get(key)
        if specs is None:
            specs = lower(arch, self.setup)
            self._lowered[key] = specs
            if len(self._lowered) > 4096:
                self._lowered.popitem(last=False)
        return specs

    # ------------------------------------------------------------------ activation
    def _checked(self, arch: ArchConfig) -> ArchConfig:
        """``arch`` if it is in the space (remembered by hash), else a SpaceError naming the choice."""
        if arch.hash not in self._valid:
            self.space.check(arch)
            self._valid.add(arch.hash)
        return arch

    def set_max(self) -> None:
        self.active = self.space.largest()

    def set_active(self, arch: ArchConfig) -> None:
        self.active = self.space.check(arch)

    def sample(self, rng: int | random.Random) -> ArchConfig:
        return self.space.sample(rng)

    def forward(self, x: torch.Tensor, arch: ArchConfig | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of ``arch`` (default: the active config) for ``x`` ``(B, C, H, W)``."""
        arch = self.active if arch is None else self._checked(arch)
        for unit, spec in self.units_for(arch):
            x = unit(x, spec)
        return x

    def forward_features(self, x: torch.Tensor, arch: ArchConfig | None = None,
                         out_indices: Sequence[int] = (0, 1, 2, 3)) -> list[torch.Tensor]:
        """The output map ``(B, C, H, W)`` of each requested body stage of ``arch`` (default: active).

        The same maps, in the same order, as ``get_active_subnet(arch).forward_features(x, out_indices)``.
        """
        arch = self.active if arch is None else self._checked(arch)
        pairs = self.units_for(arch)
        infos = feature_info([spec for _, spec in pairs])
        n = len(infos)
        bad = [i for i in out_indices if not -n <= i < n]
        if bad or not out_indices:
            raise SpaceError(f"out_indices must be stage indices in [0, {n}), got {list(out_indices)}")
        wanted = [infos[i % n] for i in out_indices]
        stops = {f.block: f for f in wanted}
        out: dict[int, torch.Tensor] = {}
        for i, (unit, spec) in enumerate(pairs[: max(stops) + 1]):
            x = unit(x, spec)
            if i in stops:
                info = stops[i]
                out[info.index] = tokens_to_map(x, info.hw) if x.dim() == 3 else x
        return [out[f.index] for f in wanted]

    def get_active_subnet(self, arch: ArchConfig | None = None) -> StaticNet:
        """A standalone static model of ``arch`` (default: active) with the supernet's weights copied in."""
        arch = self.space.check(self.active if arch is None else arch)
        blocks = [unit.export(spec) for unit, spec in self.units_for(arch)]
        net = StaticNet(arch, self.lower(arch), resolution=self.hw, blocks=blocks)
        return net.train(self.training)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or "attention_biases" in n}

    @property
    def distilled(self) -> bool:
        """Whether the head returns ``(head, head_dist)`` logits in training (hard distillation)."""
        return bool(self.units["head"].distilled)

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, make the head return ``(head, head_dist)`` (needs a distillation head)."""
        if enable and not self.setup.distillation:
            raise SpaceError("this supernet has no head_dist; hard distillation needs one")
        self.units["head"].distilled = bool(enable)
