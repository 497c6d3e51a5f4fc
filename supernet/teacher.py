"""Teachers for hard distillation (``--teacher`` of ``nas-train`` and ``nas-extract``).

A teacher is either an extracted model folder (``runs/extract-abc123``: ``model.safetensors``
carries its config) or a preset with weights (``efficientformerv2_s0=weights.pth``, any layout
:mod:`supernet.pretrained` reads). It must take the student's input (channels, size) and predict
the same classes; it runs in eval mode under ``torch.no_grad``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from search_spaces import LoweringSetup, get_preset, list_presets
from search_spaces.errors import NasUserError

__all__ = ["load_teacher"]


def load_teacher(spec: str, setup: LoweringSetup, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The teacher named by ``spec``, checked against the student's ``setup``, in eval mode.

    Raises:
        NasUserError: no such folder or preset, or a teacher of other classes or input channels.
    """
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if name not in list_presets():
            raise NasUserError(f"--teacher {spec!r}: {name!r} is not a preset; known presets: {', '.join(list_presets())}")
        from .model import build_model

        teacher = build_model(get_preset(name), setup.replace(task="classify", distillation=None), pretrained=path)
    else:
        folder = Path(spec)
        if not (folder / "model.safetensors").is_file():
            raise NasUserError(f"--teacher {spec!r} is neither an extracted model folder (with model.safetensors) nor "
                               f"PRESET=WEIGHTS (e.g. efficientformerv2_s0=weights.pth)")
        from .model import load_extracted

        teacher = load_extracted(folder)
        if getattr(teacher, "num_classes", None) != setup.num_classes or teacher.in_chans != setup.in_chans:
            raise NasUserError(f"--teacher {spec!r} predicts {teacher.num_classes} classes from {teacher.in_chans} "
                               f"channels; the student has {setup.num_classes} classes and {setup.in_chans} channels")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()
