"""Load published weights into our static models, export ours in their layouts, warm-start a supernet.

Our presets compute exactly what timm's models of the same names compute, so a published
checkpoint maps onto a :class:`~supernet.StaticNet` by renaming its keys. Layouts (told from
the key names, or given as ``layout=``):

* ``timm``: timm's ``efficientformer``, ``efficientformer_v2`` and ``efficientvit_mit`` models;
* ``snap``: snap-research/EfficientFormer (V1 L1/L3/L7, V2 S0/S1/S2/L), the ``model`` entry of
  its ``.pth`` files;
* ``mit``: mit-han-lab/efficientvit classification models B0-B3, the ``state_dict`` entry;
* ``native``: our own ``model.state_dict()`` (``blocks.{i}....``).

Each key is mapped by name (tables in :mod:`supernet._layouts_names`) and its shape is checked.
A checkpoint that does not fit raises :class:`~search_spaces.errors.FileFormatError` naming the
first key that does not fit (a wrong shape first, in the model's order; then a checkpoint key with
no place in the model; then a missing key) and, when one fits, the preset the checkpoint is for.
Keys that may be missing or extra, and nothing else:

* ``*.attention_bias_idxs`` next to a bias table the model loads (timm V1 and snap store these
  index buffers; they are derived, so they are only used to check, and if needed convert, the
  order of the bias table);
* ``num_batches_tracked`` missing from the checkpoint (the model keeps its counter);
* ``head_dist`` missing from the checkpoint: accepted, the model's ``head_dist`` keeps its fresh
  initialisation and the report says so. Its output, ``(head + head_dist) / 2``, then is not the
  checkpoint's: for inference build the model with ``distillation=False``.

Attention-bias tables are interpolated when the model's resolution differs from the
checkpoint's, and the classifier (``head``, ``head_dist``; EfficientViT: the final linear) is
re-initialised when, and only when, the number of classes differs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Union

import torch
import torch.nn as nn

from search_spaces import ArchConfig, BlockSpec, get_preset, list_presets, lower
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.kinds import get_kind

from ._layouts_bias import bias_value, resize_bias_table, target_bias_grid
from ._layouts_io import read_checkpoint, unwrap
from ._layouts_names import LAYOUT_TABLES, LAYOUTS, NATIVE, block_fields, detect, translate
from .elastic import ElasticUnit, Supernet, unit_name
from .model import StaticNet, build_model

__all__ = [
    "LAYOUTS", "LoadReport", "export_state_dict", "init_supernet_from", "load_pretrained", "read_checkpoint",
    "resize_bias_table", "target_bias_grid", "transfer_weights", "adapt_input_conv",
]

logger = logging.getLogger(__name__)

Source = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]

_IDX = "attention_bias_idxs"
_BIAS = "attention_biases"


# ============================================================================ names
@dataclass(frozen=True)
class _Names:
    theirs: dict[str, str]  # our persistent key -> checkpoint key
    derived: dict[str, str]  # checkpoint key of a stored index buffer -> our (non-persistent) buffer
    as_c11: frozenset[str]  # our keys stored as (C, 1, 1)


def _names(model: StaticNet, layout: str) -> _Names:
    family = model.arch.family
    if layout not in LAYOUTS:
        raise NasUserError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    table = None if layout == "native" else LAYOUT_TABLES.get((layout, family))
    if layout != "native" and table is None:
        known = sorted(lay for lay, fam in LAYOUT_TABLES if fam == family) + ["native"]
        raise NasUserError(f"the {layout} layout has no {family} models; layouts for {family}: {', '.join(known)}")
    fields = block_fields(model.arch, model.specs)
    kinds = []
    for i, spec in enumerate(model.specs):
        kn = NATIVE if table is None else table.get(spec.kind)
        if kn is None:
            raise NasUserError(f"block {i} ({spec.kind}) has no counterpart in the {layout} layout of {family}; "
                               f"use layout='native'")
        kinds.append((kn, kn.prefix.format(**fields[i])))
    theirs: dict[str, str] = {}
    c11: set[str] = set()
    for key in model.state_dict():
        _, idx, rest = key.split(".", 2)
        kn, prefix = kinds[int(idx)]
        theirs[key] = prefix + translate(rest, kn.renames)
        if rest in kn.as_c11:
            c11.add(key)
    derived = {prefix + translate(name, kn.renames): f"blocks.{i}.{name}"
               for i, (kn, prefix) in enumerate(kinds) for name in kn.derived}
    if len(set(theirs.values())) != len(theirs):
        raise RuntimeError(f"the {layout} table maps two of our tensors to one name")
    return _Names(theirs, derived, frozenset(c11))


def _model_label(model: StaticNet) -> str:
    for name in list_presets():
        if get_preset(name) == model.arch:
            return name
    return f"{model.arch.family} architecture"


def _classifier_keys(model: StaticNet) -> list[str]:
    """Our keys of the final classifier: ``head`` and ``head_dist`` (EfficientViT: its last linear)."""
    last = len(model.specs) - 1
    return [k for k in model.state_dict() if k.startswith((f"blocks.{last}.head.", f"blocks.{last}.head_dist."))]


# ============================================================================ loading
@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did.

    Args:
        source: the file (or ``<state dict>``).
        layout: layout the keys were read in.
        loaded: tensors copied into the model.
        total: persistent tensors of the model.
        resized: attention-bias tables interpolated, ``"key: 7x7 -> 8x8"``.
        reinitialised: classifier tensors re-initialised (another number of classes).
        checkpoint_classes: classes of the checkpoint's classifier (``None``: it has none).
        head_dist_in_checkpoint: the checkpoint has a distillation head.
        kept: model tensors the checkpoint lacks, left as they were (``num_batches_tracked``, ``head_dist``).
        ignored: checkpoint keys not loaded: stored index buffers (derived), and the distillation
            head of a classifier that is re-initialised anyway.
        adapted: the first conv adapted to another number of input channels (:func:`adapt_input_conv`).
    """

    source: str
    layout: str
    loaded: int
    total: int
    resized: tuple[str, ...] = ()
    reinitialised: tuple[str, ...] = ()
    checkpoint_classes: int | None = None
    head_dist_in_checkpoint: bool = False
    kept: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    adapted: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for logs and ``nas-info``."""
        parts = [f"{self.source}: {self.layout} layout, loaded {self.loaded} of {self.total} tensors"]
        if self.resized:
            parts.append(f"resized {len(self.resized)} attention-bias tables ({self.resized[0].split(': ')[1]})")
        if self.adapted:
            parts.append(f"adapted the first conv ({self.adapted[0].split(': ')[1]})")
        if self.reinitialised:
            parts.append(f"re-initialised the classifier ({self.checkpoint_classes} classes in the checkpoint; "
                         f"{', '.join(self.reinitialised)})")
        if any(".head_dist." in k for k in self.kept):
            parts.append("no head_dist in the checkpoint (kept its initialisation)")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def load_pretrained(model: StaticNet, source: Source, *, layout: str | None = None) -> LoadReport:
    """Load a checkpoint into ``model`` in place, mapping its keys by name.

    Args:
        model: a static model (:func:`supernet.build_model`).
        source: a checkpoint file (see :func:`read_checkpoint`) or a state dict in memory.
        layout: ``"timm"``, ``"snap"``, ``"mit"`` or ``"native"``; ``None`` tells it from the keys.

    Returns:
        What was loaded, resized and re-initialised (also logged).

    Raises:
        FileFormatError: the file cannot be read, or its keys or shapes do not fit the model (the
            message names the first checkpoint key that does not fit, and a preset it would fit).
        NasUserError: ``layout`` is unknown or has no models of this family.
    """
    if not isinstance(model, StaticNet):
        raise TypeError(f"model must be a StaticNet (supernet.build_model), got {type(model).__name__}")
    if isinstance(source, Mapping):
        label, sd = "<state dict>", unwrap(dict(source), "<state dict>")
    else:
        label, sd = str(source), read_checkpoint(source)
    layout = _resolve_layout(sd, model, layout, label)
    names = _names(model, layout)
    values, report = _plan(model, sd, names, label, layout)
    model.load_state_dict(values, strict=False)
    with torch.no_grad():
        for key in report.reinitialised:
            t = model.get_parameter(key)
            if t.ndim > 1:
                nn.init.trunc_normal_(t, std=0.02)
            else:
                nn.init.zeros_(t)
    if report.reinitialised:
        logger.warning("%s: the checkpoint's classifier has %s classes and the model's %d: re-initialised %s "
                       "(trunc-normal weights, std 0.02; zero biases)", label, report.checkpoint_classes,
                       model.num_classes, ", ".join(report.reinitialised))
    if any(".head_dist." in k for k in report.kept):
        logger.warning("%s: no head_dist in the checkpoint; the model's head_dist keeps its initialisation, so "
                       "(head + head_dist) / 2 is not the checkpoint's output: build with distillation=False", label)
    logger.info("%s", report.summary())
    return report


def _resolve_layout(sd: dict[str, torch.Tensor], model: StaticNet, layout: str | None, label: str) -> str:
    found = detect(list(sd))
    if layout is not None:
        if layout not in LAYOUTS:
            raise NasUserError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        return layout
    if found is None:
        raise FileFormatError(f"checkpoint {label!r}: cannot tell its layout from its key names (first keys: "
                              f"{', '.join(list(sd)[:3])}); pass a layout, one of {list(LAYOUTS)}")
    found_layout, family = found
    if family is not None and family != model.arch.family:
        raise FileFormatError(f"checkpoint {label!r} is a {found_layout} {family} checkpoint, but the model is "
                              f"{_model_label(model)} ({model.arch.family}); build a {family} model for it")
    return found_layout


def _plan(model: StaticNet, sd: dict[str, torch.Tensor], names: _Names, label: str, layout: str,
          ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The tensors to load, by our key, and the report.

    Raises FileFormatError naming the first problem: a wrong shape (in the model's order), else a
    checkpoint key with no place in the model (in the checkpoint's order), else a missing key.
    """
    target = model.state_dict()
    position = {k: n for n, k in enumerate(target)}
    first_conv = _first_conv(target)
    ours_of = {t: o for o, t in names.theirs.items()}
    classifier = set(_classifier_keys(model))
    head_w = names.theirs[f"blocks.{len(model.specs) - 1}.head.weight"]
    reinit = head_w in sd and sd[head_w].ndim == 2 and sd[head_w].shape[0] != model.num_classes
    dist_names = _their_head_dist_names(model, layout)
    values: dict[str, torch.Tensor] = {}
    problems: list[tuple[tuple[int, int], str]] = []  # (rank, message)
    resized: list[str] = []
    adapted: list[str] = []
    ignored: list[str] = []
    for key, value in sd.items():
        our = ours_of.get(key)
        if our is None and key.endswith("." + _IDX) and ours_of.get(key[: -len(_IDX)] + _BIAS):
            ignored.append(key)
            continue
        if our is None:
            if key in dist_names and reinit:
                ignored.append(key)
            elif key in dist_names:
                problems.append(((1, len(problems)), f"checkpoint key {key!r} is a distillation head, but the model "
                                                     f"was built without one; build it with distillation=True"))
            else:
                problems.append(((1, len(problems)), f"checkpoint key {key!r} has no place in the "
                                                     f"{_model_label(model)} model ({layout} layout)"))
            continue
        if our in names.as_c11 and value.ndim == 3 and value.shape[1:] == (1, 1):
            value = value.reshape(value.shape[0])
        want = target[our].shape
        if our.endswith("." + _BIAS) and value.ndim == 2 and value.shape[0] == want[0]:
            spec = model.specs[int(our.split(".")[1])]
            try:
                value, note = bias_value(value, want, spec, sd.get(key[: -len(_BIAS)] + _IDX))
            except ValueError as exc:
                problems.append(((0, position[our]), f"checkpoint key {key!r} cannot fill {our!r}: {exc}"))
                continue
            if note:
                resized.append(f"{our}: {note}")
        if our == first_conv and value.ndim == 4 and value.shape[1] != want[1] and \
                (value.shape[0], *value.shape[2:]) == (want[0], *want[2:]):
            adapted.append(f"{our}: input channels {value.shape[1]} -> {want[1]}")
            value = adapt_input_conv(value, want[1])
        if value.shape == want:
            values[our] = value
        elif our in classifier and reinit and value.shape[1:] == want[1:]:
            continue
        else:
            problems.append(((0, position[our]), f"checkpoint key {key!r} has shape {tuple(value.shape)}; "
                                                 f"the model expects {tuple(want)} at {our!r}"))
    missing = [o for o in target if o not in values and not (reinit and o in classifier)
               and not o.endswith(".num_batches_tracked") and ".head_dist." not in o]
    kept = [o for o in target if o not in values and not (reinit and o in classifier)]
    problems += [((2, position[o]), f"the checkpoint has no {names.theirs[o]!r} for the model's {o!r}")
                 for o in missing]
    if problems:
        raise FileFormatError(_problem_message(label, [m for _, m in sorted(problems)], model, sd, layout))
    report = LoadReport(
        source=label, layout=layout, loaded=len(values), total=len(target), resized=tuple(resized),
        reinitialised=tuple(k for k in target if reinit and k in classifier),
        checkpoint_classes=int(sd[head_w].shape[0]) if head_w in sd and sd[head_w].ndim == 2 else None,
        head_dist_in_checkpoint=any(k in sd for k in dist_names), kept=tuple(kept), ignored=tuple(ignored),
        adapted=tuple(adapted))
    return values, report


def _first_conv(state: dict[str, torch.Tensor]) -> str:
    """Our key of the network's first convolution (the stem's), in a model's ``state_dict()``."""
    return next(k for k, v in state.items() if v.ndim == 4)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first conv's ``(out, c, k, k)`` weight for ``in_chans`` input channels, as timm adapts it.

    One channel: the sum over the input channels (a grey image is the mean of R, G and B, and the
    conv of the mean equals the conv of the summed weights up to the factor the sum absorbs).
    More channels: the weight repeated along the input channels, cut to ``in_chans`` and scaled by
    ``c / in_chans`` so the expected activation stays the same.

    >>> adapt_input_conv(torch.ones(8, 3, 3, 3), 1).shape
    torch.Size([8, 1, 3, 3])
    """
    c = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // c)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)


def _their_head_dist_names(model: StaticNet, layout: str) -> set[str]:
    """Checkpoint names of a distillation head in this layout, whether or not the model has one."""
    last = len(model.specs) - 1
    if model.arch.family == "efficientvit":
        return set()
    table = None if layout == "native" else LAYOUT_TABLES[(layout, model.arch.family)]
    kn = NATIVE if table is None else table[model.specs[-1].kind]
    prefix = kn.prefix.format(i=last)
    return {prefix + translate(f"head_dist.{leaf}", kn.renames) for leaf in ("weight", "bias")}


def _problem_message(label: str, problems: list[str], model: StaticNet, sd: dict[str, torch.Tensor],
                     layout: str) -> str:
    message = f"{label}: {problems[0]}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more keys that do not fit)"
    guess = _guess_preset(model, sd, layout)
    if guess:
        message += f" — is this {guess} rather than {_model_label(model)}?"
    return message


def _guess_preset(model: StaticNet, sd: dict[str, torch.Tensor], layout: str) -> str | None:
    """A preset of the model's family whose keys and shapes fit ``sd``, classifier and bias tables aside."""
    for name in list_presets():
        arch: ArchConfig = get_preset(name)
        if arch.family != model.arch.family or arch == model.arch:
            continue
        specs = lower(arch, resolution=model.resolution, num_classes=model.num_classes, in_chans=model.in_chans,
                      distillation=model.specs[-1].distillation)
        with torch.device("meta"):
            cand = StaticNet(arch, specs, resolution=model.resolution)
        names = _names(cand, layout)
        flexible = set(_classifier_keys(cand))
        rigid: dict[str, tuple[int, ...]] = {}
        loose = set(names.derived) | _their_head_dist_names(cand, layout)
        for key, t in cand.state_dict().items():
            if key in flexible or key.endswith((_BIAS, "num_batches_tracked")) or ".head_dist." in key:
                loose.add(names.theirs[key])
            else:
                rigid[names.theirs[key]] = (t.shape[0], 1, 1) if key in names.as_c11 else tuple(t.shape)
        have = {k: tuple(v.shape) for k, v in sd.items() if k not in loose and not k.endswith(_IDX)}
        if have == rigid:
            return name
    return None


# ============================================================================ export
def export_state_dict(model: StaticNet, layout: str) -> dict[str, torch.Tensor]:
    """``model``'s weights named as ``layout`` names them (copies): the inverse of :func:`load_pretrained`.

    Index buffers that the layout stores (timm V1, snap) are included, so the result loads
    strictly into the original module tree; loading it back gives the same model.

    >>> from search_spaces import get_preset
    >>> sd = export_state_dict(build_model(get_preset("efficientformerv2_s0")), "timm")
    >>> sd["stem.conv1.conv.weight"].shape
    torch.Size([16, 3, 3, 3])
    """
    names = _names(model, layout)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        value = t.detach().clone()
        out[names.theirs[key]] = value.reshape(-1, 1, 1) if key in names.as_c11 else value
    for their, buffer in names.derived.items():
        out[their] = model.get_buffer(buffer).detach().clone()
    return out


# ============================================================================ supernet warm start
def init_supernet_from(net: Supernet, arch: ArchConfig, source: StaticNet | Source, *,
                       layout: str | None = None) -> int:
    """Copy a static model's weights into ``arch``'s slice of the supernet's shared tensors.

    Every tensor that ``net.get_active_subnet(arch)`` would read (parameters and BN running
    statistics, including weights a slot shares between kinds) is overwritten, so that subnet
    then computes what the source model computes. Everything else in the supernet (wider
    channels, deeper slots, other block kinds) keeps its default initialisation: trunc-normal
    (std 0.02) Linear weights with zero biases, PyTorch's default conv initialisation, BN weight 1,
    bias 0, running mean 0, variance 1, layer scales 1e-5 and zero attention biases.

    Args:
        net: the supernet.
        arch: an architecture in ``net``'s space (e.g. a preset).
        source: a :class:`~supernet.StaticNet` of ``arch`` built for ``net``'s resolution, classes and
            input channels, or a checkpoint file or state dict (loaded with :func:`load_pretrained`).
        layout: layout of a file or state dict (``None``: told from its keys).

    Returns:
        The number of tensors written.
    """
    arch = net.space.check(arch)
    specs = tuple(net.lower(arch))
    if isinstance(source, StaticNet):
        model = source
    else:
        model = build_model(arch, num_classes=net.num_classes, resolution=net.resolution, in_chans=net.in_chans,
                            distillation=net.distillation)
        load_pretrained(model, source, layout=layout)
    if tuple(model.specs) != specs:
        i = next((i for i, (a, b) in enumerate(zip(model.specs, specs)) if a != b), min(len(specs), len(model.specs)))
        got = model.specs[i].key if i < len(model.specs) else "nothing"
        want = specs[i].key if i < len(specs) else "nothing"
        raise NasUserError(f"the source model does not match the supernet's lowering of this architecture at block "
                           f"{i}: {got} vs {want}; build it with the supernet's resolution, classes and input channels")
    written = 0
    with torch.no_grad():
        for block, (unit, spec) in zip(model.blocks, net.units_for(arch), strict=True):
            written += _copy_block(unit, spec, block, unit_name(spec))
    logger.info("warm-started %d tensors of the supernet from %s", written, _model_label(model))
    return written


def _copy_block(unit: ElasticUnit, spec: BlockSpec, block: nn.Module, where: str) -> int:
    src = block.state_dict()  # persistent tensors only: index buffers follow from the spec
    views = unit.state_for(spec)
    for key, value in src.items():
        if get_kind(spec.kind).slicer(key) == "lite_proj":
            _write_lite_proj(unit, spec, key, value)
        else:
            views[key].copy_(value)  # a prefix slice: a view of the shared full tensor
    check = unit.state_for(spec)
    bad = [k for k, v in src.items() if not torch.equal(check[k], v.to(check[k].device))]
    if bad:
        slicer = " (its slicer returns a copy; add a writer in supernet/pretrained.py)" if any(
            get_kind(spec.kind).slicer(k) is not None for k in bad) else ""
        raise RuntimeError(f"supernet unit {where} ({spec.kind}) did not take {bad[0]!r}{slicer}")
    return len(src)


def _write_lite_proj(unit: ElasticUnit, spec: BlockSpec, key: str, value: torch.Tensor) -> None:
    """Inverse of ``elastic._lite_proj``: the two scales' input columns sit at ``[0, td)`` and ``[td_max, td_max + td)``."""
    module, max_spec = unit._source(spec.kind, key)
    full = module.get_parameter(key)
    td, td_max = spec.heads * spec.value_dim, max_spec.heads * max_spec.value_dim
    rows = value.shape[0]
    full[:rows, :td].copy_(value[:, :td])
    full[:rows, td_max: td_max + td].copy_(value[:, td:])


def transfer_weights(src: StaticNet, dst: StaticNet) -> list[str]:
    """Copy ``src``'s weights into ``dst``: the same architecture at another input size or task.

    Blocks pair up in order (``dst`` may end without the head, as a backbone does); every tensor
    must have the same shape except the attention-bias tables, which are resampled to ``dst``'s
    grids (:func:`resize_bias_table`). Returns the names of the resampled tables.

    Raises:
        NasUserError: the two models are not the same architecture.
    """
    if src.arch != dst.arch or len(dst.specs) > len(src.specs):
        raise NasUserError(f"cannot transfer weights between different architectures ({src.arch.to_string()} and "
                           f"{dst.arch.to_string()})")
    resized = []
    with torch.no_grad():
        for i, (a, b, sa, sb) in enumerate(zip(src.blocks, dst.blocks, src.specs, dst.specs)):
            if sa.kind != sb.kind or (sa.cin, sa.cout, sa.hidden) != (sb.cin, sb.cout, sb.hidden):
                raise NasUserError(f"block {i} differs: {sa.key} vs {sb.key}")
            theirs = dict(a.state_dict())
            for name, t in b.state_dict().items():
                value = theirs[name]
                if value.shape != t.shape and name.endswith("attention_biases"):
                    value = resize_bias_table(value, target_bias_grid(sa), target_bias_grid(sb))
                    resized.append(f"blocks.{i}.{name}")
                t.copy_(value)
    return resized
