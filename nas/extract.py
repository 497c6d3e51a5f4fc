"""Extraction: a searched subnet becomes a standalone, exported, measured model (``nas-extract``).

The static model is built by :func:`supernet.build_model`'s classes and receives the supernet's
sliced weights; its output is checked against the supernet's (within 1e-5). BN is recalibrated,
optionally the model is fine-tuned (from a teacher, too), and it is exported to
``model.safetensors`` (config in the metadata), ``model.onnx`` (checked, ORT within 1e-4 of
torch) and ``model.mlpackage``. :func:`load_subnet` rebuilds the model from the folder alone.

The deployed model follows ``subnet.json``'s setup: a classifier at the supernet's input size,
or a backbone (``task`` ``backbone``, or ``--features-only``) that returns one feature map per
stage, at the input size it was searched for. Accuracy is always measured on the classifier at
the supernet's input size (the proxy the search ranked by); a deployment at another size gets
the same weights with its attention-bias tables resampled to the new grids.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from search_spaces import format_resolution
from search_spaces.errors import NasUserError
from search_spaces.fileio import atomic_write_json, atomic_write_text
from search_spaces.subnet_file import SubnetFile

from ._export import export_formats, measure_latencies, model_card

if TYPE_CHECKING:
    from supernet.data import DatasetSplits
    from supernet.elastic import Supernet
    from supernet.model import StaticNet
    from supernet.run import SupernetRun

__all__ = ["ExtractResult", "extract", "load_subnet", "PARITY_ATOL", "ONNX_ATOL", "FORMATS"]

logger = logging.getLogger(__name__)

PARITY_ATOL = 1e-5
ONNX_ATOL = 1e-4
FORMATS = ("safetensors", "onnx", "coreml")


@dataclass
class ExtractResult:
    out: Path
    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _resolve_run(sub: SubnetFile, supernet: str | None, say: Callable[[str], None]) -> SupernetRun:
    from supernet.run import load_run

    prov = sub.provenance
    if supernet is None:
        if "supernet_run" not in prov:
            raise NasUserError("subnet.json names no supernet in its provenance; pass --supernet RUN_DIR")
        supernet = str(prov["supernet_run"])
        say(f"nas-extract: using supernet {supernet} (from subnet.json's provenance; set --supernet to choose)")
    run = load_run(supernet)
    want = prov.get("supernet_sha256")
    if want and want != run.weights_sha256:
        raise NasUserError(f"subnet.json was searched on another supernet (weights {str(want)[:12]}) than "
                           f"{run.path} (weights {run.hash}); pass the matching --supernet")
    reason = run.space.why_not(sub.arch)
    if reason is not None:
        raise NasUserError(f"subnet.json is not a config of the supernet's space {run.space.name!r}: {reason}")
    for name in ("num_classes", "in_chans"):
        if getattr(sub, name) != getattr(run, name):
            raise NasUserError(f"subnet.json {name} {getattr(sub, name)} differs from the supernet's "
                               f"{getattr(run, name)}")
    return run


def _check_options(formats: tuple[str, ...], finetune_epochs: int, teacher: str | None) -> None:
    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        raise NasUserError(f"--formats must be a comma list of {list(FORMATS)}, got {list(formats)}")
    if finetune_epochs < 0:
        raise NasUserError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    if teacher is not None and not finetune_epochs:
        raise NasUserError("--teacher distils during fine-tuning: give --finetune-epochs N as well")


def _extract_checked(net: Supernet, sub: SubnetFile, calib: list[torch.Tensor], metrics: dict[str, Any],
                     say: Callable[[str], None]) -> StaticNet:
    """The subnet's static model with the supernet's weights, its output checked against the supernet's."""
    model = net.get_active_subnet(sub.arch).eval()
    metrics["params"] = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        x = calib[0][:16]
        diff = float((net(x, sub.arch) - model(x)).abs().max())
    metrics["supernet_parity_max_abs"] = diff
    if not diff <= PARITY_ATOL:
        raise RuntimeError(f"extracted model differs from the supernet by {diff:.3g} (> {PARITY_ATOL})")
    say(f"nas-extract: weights copied; output equals the supernet's (max abs diff {diff:.2g})")
    return model


def _train_and_score(model: StaticNet, splits: DatasetSplits, calib: list[torch.Tensor], metrics: dict[str, Any], *,
                     finetune_epochs: int, finetune_lr: float, teacher: torch.nn.Module | None,
                     progress: Callable[[str], None] | None, seed: int = 0) -> StaticNet:
    """Recalibrate BN, score on validation, optionally fine-tune (from a teacher), score on test."""
    from supernet.bn import evaluate, recalibrate_bn
    from supernet.data import make_loader
    from supernet.static_train import StaticRecipe, train_static

    model = recalibrate_bn(model, None, calib)
    val = make_loader(splits.val, batch_size=256, shuffle=False, seed=0)
    metrics["val_accuracy_inherited"] = evaluate(model, val)
    if finetune_epochs:
        recipe = StaticRecipe(epochs=finetune_epochs, lr=finetune_lr, min_lr=finetune_lr / 100, warmup_epochs=0.25,
                              seed=1000 + seed, channels_last=False)
        torch.manual_seed(seed)
        train_static(model, splits, recipe, teacher=teacher, progress=progress, label="fine-tune")
        model.eval()
        metrics["val_accuracy_finetuned"] = evaluate(model, val)
        metrics["finetune_epochs"] = finetune_epochs
        metrics["finetune_seed"] = seed
        if teacher is not None:
            metrics["teacher"] = "hard distillation" + (" through head_dist" if model.has_dist_head else "")
    metrics["test_accuracy"] = evaluate(model, make_loader(splits.test, batch_size=256, shuffle=False, seed=0))
    return model.eval()


def _deployable(model: StaticNet, sub: SubnetFile, metrics: dict[str, Any],
                say: Callable[[str], None]) -> StaticNet:
    """``model`` itself, or the same weights as a backbone and/or at the deployment input size."""
    from supernet import build_model
    from supernet.pretrained import transfer_weights

    if sub.hw == model.hw and sub.task == "classify":
        return model
    deploy = build_model(sub.arch, sub.setup).eval()
    resized = transfer_weights(model, deploy)
    metrics["deployed_as"] = f"{sub.task} at {format_resolution(sub.hw)}"
    if resized:
        metrics["resampled_bias_tables"] = len(resized)
    say(f"nas-extract: deploying as a {sub.task} at {format_resolution(sub.hw)}"
        + (f" ({len(resized)} attention-bias tables resampled from the supernet's input size)" if resized else ""))
    return deploy


def extract(subnet_path: str | Path, *, supernet: str | None = None, out: str | Path | None = None,
            finetune_epochs: int = 0, finetune_lr: float = 5e-4, formats: tuple[str, ...] = FORMATS,
            measure: bool = True, features_only: bool = False, teacher: str | None = None, seed: int = 0,
            notify: Callable[[str], None] | None = None,
            progress: Callable[[str], None] | None = None) -> ExtractResult:
    """Extract, check, optionally fine-tune, export and measure the subnet of ``subnet_path``.

    Args:
        subnet_path: the ``subnet.json``.
        supernet: the supernet run folder (default: the one in ``subnet.json``'s provenance).
        out: the output folder (default: ``runs/extract-<arch hash>``).
        finetune_epochs: fine-tuning epochs on the run's training split (0: none).
        finetune_lr: peak fine-tuning learning rate.
        formats: any of :data:`FORMATS`.
        measure: measure the local-cpu latency.
        features_only: deploy a backbone without the head, whatever ``subnet.json`` says.
        teacher: an extracted model folder or ``PRESET=WEIGHTS`` to distil from while fine-tuning.
        seed: seed of the fine-tuning (initial state and data order).
        notify: receives each default chosen for the user.
        progress: receives progress lines.

    Raises:
        NasUserError: bad subnet.json, missing or mismatched supernet, bad formats or teacher.
        RuntimeError: a parity check failed (a bug, never a user mistake).
    """
    from supernet.data import calibration_batches
    from supernet.run import load_supernet

    from .accuracy import load_run_splits

    say = notify or logger.info
    _check_options(formats, finetune_epochs, teacher)
    sub = SubnetFile.load(subnet_path)
    if features_only:
        sub = replace(sub, task="backbone")
    run = _resolve_run(sub, supernet, say)
    out = Path(out) if out is not None else Path("runs") / f"extract-{sub.arch.hash}"
    if notify is not None and out == Path("runs") / f"extract-{sub.arch.hash}":
        say(f"nas-extract: writing the model to {out} (set --out to choose)")
    net = load_supernet(run)
    teacher_model = None
    if teacher is not None:
        from supernet.teacher import load_teacher

        teacher_model = load_teacher(teacher, net.setup)
    splits = load_run_splits(run)
    calib = calibration_batches(splits.train, batch_size=128, num_batches=max(1, min(16, len(splits.train) // 128)),
                                seed=0)
    metrics: dict[str, Any] = {}
    model = _extract_checked(net, sub, calib, metrics, say)
    model = _train_and_score(model, splits, calib, metrics, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                             teacher=teacher_model, progress=progress, seed=seed)
    model = _deployable(model, sub, metrics, say)
    metrics["params"] = sum(p.numel() for p in model.parameters())   # as deployed (a backbone has no head)
    out.mkdir(parents=True, exist_ok=True)
    files = export_formats(model, sub, metrics, formats, out, onnx_atol=ONNX_ATOL)
    if measure:
        metrics["latency_ms"] = measure_latencies(model, sub, run)
    files["model.md"] = atomic_write_text(out / "model.md", model_card(sub, metrics, files, subnet_path))
    files["subnet.json"] = replace(sub, metrics={**sub.metrics, **metrics}).save(out / "subnet.json")
    files["extract.json"] = atomic_write_json(out / "extract.json", {"metrics": metrics,
                                                                     "files": {k: str(v) for k, v in files.items()}})
    return ExtractResult(out, metrics, files)


def load_subnet(folder: str | Path, *, map_location: str = "cpu") -> StaticNet:
    """Rebuild an extracted model from its folder alone (``model.safetensors`` carries the config).

    >>> # model = load_subnet("runs/extract-abc123"); model(torch.zeros(1, 1, 32, 32))
    """
    from supernet.model import load_extracted

    return load_extracted(folder, map_location=map_location)
