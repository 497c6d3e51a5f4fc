"""Key names of published checkpoints, written as renaming tables from our static model's names.

Each layout is, per family and per block kind, a template for the block's module prefix in
the other code base plus a table of renamings of dotted name prefixes inside the block
(longest match wins; names not in the table are kept). The tables were written from the
reference sources:

* ``timm``: ``timm/models/efficientformer.py``, ``efficientformer_v2.py``, ``efficientvit_mit.py``
  (timm 1.0.x; timm's ``ConvNormAct`` keeps its norm under ``.bn``);
* ``snap``: snap-research/EfficientFormer ``models/efficientformer.py`` and
  ``models/efficientformer_v2.py`` (``network`` list: stage ``s`` at ``2s``, its downsampling at
  ``2s - 1``; V2 layer scales stored as ``(C, 1, 1)``);
* ``mit``: mit-han-lab/efficientvit ``efficientvit/models/efficientvit/backbone.py`` and ``cls.py``
  (``OpSequential`` keeps its ops under ``op_list``);
* ``native``: our own ``StaticNet.state_dict()`` names.

V1 stage 4 has a parameter-free ``Flat`` module inserted before its first Meta3D block in both
timm and snap, so the Meta3D blocks sit one index later (template field ``jf``).
"""
from __future__ import annotations

from dataclasses import dataclass

from search_spaces import ArchConfig, BlockSpec
from search_spaces.kinds import get_kind
from search_spaces.lowering import get_family

__all__ = ["KindNames", "LAYOUT_TABLES", "LAYOUTS", "block_fields", "detect", "translate"]

#: Every layout name, for messages and argument checks.
LAYOUTS = ("timm", "snap", "mit", "native")



@dataclass(frozen=True)
class KindNames:
    """How one block kind is named in one layout.

    Args:
        prefix: ``str.format`` template of the block's module prefix; fields ``i`` (our block
            index), ``s`` (stage), ``j`` (slot in the stage), ``jf`` (slot counting V1's ``Flat``),
            ``j1 = j + 1``, ``s1 = s - 1``, ``d = 2s - 1`` and ``n = 2s`` (snap's ``network`` list).
        renames: ``(ours, theirs)`` dotted name prefixes inside the block.
        as_c11: our names (after the block prefix) stored there as ``(C, 1, 1)`` instead of ``(C,)``.
        derived: our non-persistent index buffers that this layout stores (persistent there);
            written by export, checked and then dropped on load.
    """

    prefix: str
    renames: tuple[tuple[str, str], ...] = ()
    as_c11: tuple[str, ...] = ()
    derived: tuple[str, ...] = ()


def translate(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``name`` with its longest matching prefix (at a dot boundary) renamed.

    >>> translate("fc1.bn.running_var", (("fc1.conv", "mlp.fc1"), ("fc1.bn", "mlp.norm1")))
    'mlp.norm1.running_var'
    """
    best: tuple[str, str] | None = None
    for ours, theirs in renames:
        if (name == ours or name.startswith(ours + ".")) and (best is None or len(ours) > len(best[0])):
            best = (ours, theirs)
    if best is None:
        return name
    return best[1] + name[len(best[0]):]


_STEM_SNAP = (("conv1.conv", "0"), ("conv1.bn", "1"), ("conv2.conv", "3"), ("conv2.bn", "4"))
_DOWN_SNAP = (("conv.conv", "proj"), ("conv.bn", "norm"))

TIMM_V1 = {
    "ef1.stem": KindNames("stem.", (("conv1.conv", "conv1"), ("conv1.bn", "norm1"),
                                    ("conv2.conv", "conv2"), ("conv2.bn", "norm2"))),
    "ef1.down": KindNames("stages.{s}.downsample.", (("conv.conv", "conv"), ("conv.bn", "norm"))),
    "ef1.meta4d": KindNames("stages.{s}.blocks.{jf}.", (
        ("ls1", "ls1.gamma"), ("ls2", "ls2.gamma"), ("fc1.conv", "mlp.fc1"), ("fc1.bn", "mlp.norm1"),
        ("fc2.conv", "mlp.fc2"), ("fc2.bn", "mlp.norm2"))),
    "ef1.meta3d": KindNames("stages.{s}.blocks.{jf}.", (
        ("ls1", "ls1.gamma"), ("ls2", "ls2.gamma"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")),
        derived=("token_mixer.attention_bias_idxs",)),
    "ef1.head": KindNames(""),
}

SNAP_V1 = {
    "ef1.stem": KindNames("patch_embed.", _STEM_SNAP),
    "ef1.down": KindNames("network.{d}.", _DOWN_SNAP),
    "ef1.meta4d": KindNames("network.{n}.{jf}.", (
        ("ls1", "layer_scale_1"), ("ls2", "layer_scale_2"), ("fc1.conv", "mlp.fc1"), ("fc1.bn", "mlp.norm1"),
        ("fc2.conv", "mlp.fc2"), ("fc2.bn", "mlp.norm2"))),
    "ef1.meta3d": KindNames("network.{n}.{jf}.", (
        ("ls1", "layer_scale_1"), ("ls2", "layer_scale_2"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")),
        derived=("token_mixer.attention_bias_idxs",)),
    "ef1.head": KindNames("", (("head_dist", "dist_head"),)),
}

_LS_TIMM = (("ls1", "ls1.gamma"), ("ls2", "ls2.gamma"))
TIMM_V2 = {
    "ef2.stem": KindNames("stem."),
    "ef2.down": KindNames("stages.{s}.downsample."),
    "ef2.down_attn": KindNames("stages.{s}.downsample.", tuple(
        (name, "attn." + name) for name in ("q", "k", "v", "v_local", "proj", "attention_biases"))),
    "ef2.ffn": KindNames("stages.{s}.blocks.{j}.", _LS_TIMM),
    "ef2.attn_ffn": KindNames("stages.{s}.blocks.{j}.", _LS_TIMM),
    "ef2.head": KindNames(""),
}

_MLP_SNAP = (("mlp.fc1.conv", "mlp.fc1"), ("mlp.fc1.bn", "mlp.norm1"), ("mlp.mid.conv", "mlp.mid"),
             ("mlp.mid.bn", "mlp.mid_norm"), ("mlp.fc2.conv", "mlp.fc2"), ("mlp.fc2.bn", "mlp.norm2"))
_ATTN4D_SNAP = tuple(
    pair for m in ("stride_conv", "q", "k", "v", "v_local")
    for pair in ((f"token_mixer.{m}.conv", f"token_mixer.{m}.0"), (f"token_mixer.{m}.bn", f"token_mixer.{m}.1"))
) + (("token_mixer.proj.conv", "token_mixer.proj.1"), ("token_mixer.proj.bn", "token_mixer.proj.2"))
SNAP_V2 = {
    "ef2.stem": KindNames("patch_embed.", _STEM_SNAP),
    "ef2.down": KindNames("network.{d}.", _DOWN_SNAP),
    "ef2.down_attn": KindNames("network.{d}.", (
        ("conv.conv", "conv"), ("conv.bn", "bn"), ("q.local", "attn.q.local.0"), ("q.proj.conv", "attn.q.proj.0"),
        ("q.proj.bn", "attn.q.proj.1"), ("k.conv", "attn.k.0"), ("k.bn", "attn.k.1"), ("v.conv", "attn.v.0"),
        ("v.bn", "attn.v.1"), ("v_local.conv", "attn.v_local.0"), ("v_local.bn", "attn.v_local.1"),
        ("proj.conv", "attn.proj.1"), ("proj.bn", "attn.proj.2"), ("attention_biases", "attn.attention_biases"),
        ("attention_bias_idxs", "attn.attention_bias_idxs")), derived=("attention_bias_idxs",)),
    "ef2.ffn": KindNames("network.{n}.{j}.", _MLP_SNAP + (("ls2", "layer_scale_2"),), as_c11=("ls2",)),
    "ef2.attn_ffn": KindNames("network.{n}.{j}.", _MLP_SNAP + _ATTN4D_SNAP + (
        ("ls1", "layer_scale_1"), ("ls2", "layer_scale_2")), as_c11=("ls1", "ls2"),
        derived=("token_mixer.attention_bias_idxs",)),
    "ef2.head": KindNames("", (("head_dist", "dist_head"),)),
}

# EfficientViT: timm and the MIT original share the names inside a block; only prefixes and the head differ.
_CONVLAYER = tuple(pair for m in ("inverted_conv", "depth_conv", "point_conv")
                   for pair in ((f"{m}.conv", f"{m}.conv"), (f"{m}.bn", f"{m}.norm")))
_DOWN_FN = (("inverted_conv", "inverted_conv.conv"), ("depth_conv", "depth_conv.conv"),
            ("point_conv.conv", "point_conv.conv"), ("point_conv.bn", "point_conv.norm"))
_EVIT_BLOCK = (
    ("context.qkv", "context_module.main.qkv.conv"), ("context.aggreg_dw", "context_module.main.aggreg.0.0"),
    ("context.aggreg_pw", "context_module.main.aggreg.0.1"), ("context.proj.conv", "context_module.main.proj.conv"),
    ("context.proj.bn", "context_module.main.proj.norm"),
    ("local.inverted_conv", "local_module.main.inverted_conv.conv"),
    ("local.depth_conv", "local_module.main.depth_conv.conv"),
    ("local.point_conv.conv", "local_module.main.point_conv.conv"),
    ("local.point_conv.bn", "local_module.main.point_conv.norm"),
)
_IN_CONV = (("conv.conv", "conv"), ("conv.bn", "norm"))
TIMM_EVIT = {
    "evit.stem": KindNames("stem.in_conv.", _IN_CONV),
    "evit.dsconv": KindNames("stem.res{j}.main.", _CONVLAYER),
    "evit.mbconv": KindNames("stages.{s1}.blocks.{j}.main.", _CONVLAYER),
    "evit.down_fn": KindNames("stages.{s1}.blocks.0.main.", _DOWN_FN),
    "evit.block": KindNames("stages.{s1}.blocks.{j1}.", _EVIT_BLOCK),
    "evit.head": KindNames("head.", (("in_conv.bn", "in_conv.norm"), ("fc", "classifier.0"),
                                     ("norm", "classifier.1"), ("head", "classifier.4"))),
}
MIT_EVIT = {
    "evit.stem": KindNames("backbone.input_stem.op_list.0.", _IN_CONV),
    "evit.dsconv": KindNames("backbone.input_stem.op_list.{j1}.main.", _CONVLAYER),
    "evit.mbconv": KindNames("backbone.stages.{s1}.op_list.{j}.main.", _CONVLAYER),
    "evit.down_fn": KindNames("backbone.stages.{s1}.op_list.0.main.", _DOWN_FN),
    "evit.block": KindNames("backbone.stages.{s1}.op_list.{j1}.", _EVIT_BLOCK),
    "evit.head": KindNames("head.op_list.", (("in_conv.conv", "0.conv"), ("in_conv.bn", "0.norm"),
                                             ("fc", "2.linear"), ("norm", "2.norm"), ("head", "3.linear"))),
}

#: ``(layout, family) -> kind -> KindNames``; ``native`` is handled by its own rule (``blocks.{i}.``).
LAYOUT_TABLES: dict[tuple[str, str], dict[str, KindNames]] = {
    ("timm", "efficientformer"): TIMM_V1,
    ("snap", "efficientformer"): SNAP_V1,
    ("timm", "efficientformer_v2"): TIMM_V2,
    ("snap", "efficientformer_v2"): SNAP_V2,
    ("timm", "efficientvit"): TIMM_EVIT,
    ("mit", "efficientvit"): MIT_EVIT,
}
NATIVE = KindNames("blocks.{i}.")


def block_fields(arch: ArchConfig, specs: tuple[BlockSpec, ...]) -> list[dict[str, int]]:
    """Template fields of every block: its index ``i``, architecture stage ``s`` and slot ``j``.

    Read off the lowering's positions (``spec.stage``, ``spec.slot``): the stem is stage 0 slot
    -1, a stage's entry unit slot -1, the head stage ``len(arch.stages)``. ``jf`` counts timm's V1
    ``Flat`` module, which sits before a stage's first Meta3D block.
    """
    first = get_family(arch.family).first_stage
    first_attn: dict[int, int] = {}
    for spec in specs:
        if spec.kind == "ef1.meta3d":
            first_attn.setdefault(spec.stage, spec.slot)
    fields = []
    for i, spec in enumerate(specs):
        if get_kind(spec.kind).is_head:
            s = len(arch.stages)
        else:
            s = max(spec.stage - first, 0)
        j = spec.slot
        jf = j + 1 if j >= first_attn.get(spec.stage, len(specs)) else j
        fields.append({"i": i, "s": s, "j": j, "jf": jf})
    for f in fields:
        f.update(j1=f["j"] + 1, s1=f["s"] - 1, d=2 * f["s"] - 1, n=2 * f["s"])
    return fields


#: ``(key that must be present, layout, family)``, tried in order; the first match wins.
_MARKERS = (
    ("backbone.input_stem.op_list.0.conv.weight", "mit", "efficientvit"),
    ("stem.in_conv.conv.weight", "timm", "efficientvit"),
    ("stem.conv1.conv.weight", "timm", "efficientformer_v2"),
    ("stem.conv1.weight", "timm", "efficientformer"),
    ("patch_embed.0.weight", "snap", None),
    ("blocks.0.", "native", None),
)


def detect(keys: list[str]) -> tuple[str, str | None] | None:
    """``(layout, family)`` told from key names (family ``None``: any / read from the model), or ``None``."""
    present = set(keys)
    for marker, layout, family in _MARKERS:
        found = any(k.startswith(marker) for k in keys) if marker.endswith(".") else marker in present
        if not found:
            continue
        if layout == "snap":  # every V2 block has a depthwise mid conv in its MLP; V1 blocks never do
            family = "efficientformer_v2" if any(k.endswith(".mlp.mid.weight") for k in keys) else "efficientformer"
        return layout, family
    return None
