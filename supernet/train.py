"""Supernet training: sandwich rule, in-place distillation, exact resume, data parallel.

Each step trains the largest subnet on the labels (label-smoothed cross-entropy), then the
smallest and ``num_random`` random subnets on the largest's soft predictions (in-place
distillation), accumulating gradients for one AdamW step. The architectures of a step derive
from ``(seed, step)`` alone, so every rank of a distributed run trains the same ones and a
resumed run replays the same sequence.

A run folder holds ``checkpoint.safetensors`` (weights, optimizer, RNG, step, log; written
atomically at each epoch end and every ``save_every`` steps) and, when training completes,
``supernet.safetensors``, ``supernet.json`` and ``train_log.csv``.

The loop itself lives in :mod:`supernet._train_loop`, the step's pure functions in
:mod:`supernet.sandwich`, the settings in :mod:`supernet.train_config`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .run_schema import SUPERNET_SCHEMA
from .sandwich import lr_at, sandwich_archs, sandwich_step
from .train_config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "train", "sandwich_archs", "sandwich_step", "lr_at", "SUPERNET_SCHEMA",
           "CHECKPOINT"]

CHECKPOINT = "checkpoint.safetensors"

#: One row of the training log (one per epoch): ``epoch``, ``step``, ``lr``, ``train_loss``,
#: ``epoch_seconds``, ``images_per_s``, ``val_acc_largest``, ``val_acc_smallest``.
LogRow = dict[str, float]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run folder.
        metrics: final validation and test accuracies (fractions) and ``train_seconds``.
        log: one row per epoch (see :data:`LogRow`).
        resumed_from_step: the step a checkpoint was resumed at (0: a fresh run).
        already_complete: the folder held a finished run of these settings; nothing was trained.
    """

    run_dir: Path
    metrics: dict[str, float]
    log: list[LogRow] = field(default_factory=list)
    resumed_from_step: int = 0
    already_complete: bool = False


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = True,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train a supernet into ``run_dir`` (resuming a checkpoint there when ``resume``).

    Args:
        cfg: the settings.
        run_dir: the run folder; created only once every setting has been checked.
        resume: continue a checkpoint of the same settings in ``run_dir``, and do nothing when
            ``run_dir`` holds a finished run of them.
        progress: show a progress bar (only on a terminal).
        on_step: called with the step number after every optimizer step.
        on_start: called once the run folder exists, before the first step.

    Returns:
        The run folder and final metrics (validation and test accuracy of the largest and
        smallest subnets, after BN recalibration).

    Raises:
        NasUserError: a bad setting, a missing dataset, or a run folder of a different config.
    """
    from ._train_loop import Trainer

    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg, Path(run_dir), progress=progress, on_step=on_step, on_start=on_start)
        trainer.prepare()
        done = trainer.completed() if resume else None
        if done is not None:
            return done
        trainer.build()
        if resume:
            trainer.resume()
        trainer.start()
        return trainer.run()
    finally:
        torch.set_num_threads(threads)
