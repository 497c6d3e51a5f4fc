"""Supernet training: sandwich rule, in-place distillation, exact resume, data parallel.

Each step trains the largest subnet on the labels (label-smoothed cross-entropy), then the
smallest and ``num_random`` random subnets on the largest's soft predictions (in-place
distillation), accumulating gradients for one AdamW step. The architectures of a step derive
from ``(seed, step)`` alone, so every rank of a distributed run trains the same ones and a
resumed run replays the same sequence.

A run folder holds ``checkpoint.safetensors`` (weights, optimizer, RNG, step, log; written
atomically at each epoch end and every ``save_every`` steps) and, when training completes,
``supernet.safetensors``, ``supernet.json`` and ``train_log.csv``.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from search_spaces import ArchConfig, SearchSpace, get_space
from search_spaces.errors import NasUserError
from search_spaces.fileio import atomic_write_json, atomic_write_text

from .bn import evaluate, recalibrate_bn
from .checkpoint import load_tensors, optimizer_from_tensors, optimizer_to_tensors, save_tensors
from .data import DatasetSplits, calibration_batches, load_dataset, make_loader
from .elastic import SUPPORTED_FAMILIES, Supernet

__all__ = ["TrainConfig", "TrainResult", "train", "sandwich_archs", "lr_at", "SUPERNET_SCHEMA"]

logger = logging.getLogger(__name__)

SUPERNET_SCHEMA = 1
CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a supernet training run (each field is one ``nas-train`` flag).

    Args:
        space: registered search space (V1 or V2 family).
        dataset: ``fashion-mnist``, ``imagefolder:PATH`` or ``synthetic[:N]``.
        resolution: train and deployment input side in pixels.
        stem_stride: 0 = automatic (2 for resolutions up to 64, else the space's), or 2 / 4.
        epochs: passes over the training split.
        batch_size: global batch (split across ranks).
        lr: peak AdamW learning rate, reached after ``warmup_epochs``; cosine decay to ``min_lr``.
        num_random: random subnets per step besides the largest and the smallest.
        distill: train non-largest subnets on the largest's soft predictions.
        train_subset: keep this many training images (seeded), for quick runs.
        val_size: images carved from the training set for validation.
        calib_batches: batches used to recalibrate BN before each evaluation.
        save_every: also checkpoint every this many steps (0: epoch ends only).
        device: ``cpu`` or ``cuda``.
        channels_last: NHWC memory format.
        bf16: bfloat16 autocast (``None``: on for CUDA, off on CPU).
        compile: ``torch.compile`` the supernet forward (GPU; one graph per architecture).
        threads: torch intra-op threads (0: leave torch's default).
    """

    space: str = "efficientformer_v2_demo"
    dataset: str = "fashion-mnist"
    resolution: int = 32
    stem_stride: int = 0
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.1
    num_random: int = 1
    distill: bool = True
    seed: int = 0
    train_subset: int | None = None
    val_size: int | None = None
    calib_batches: int = 8
    save_every: int = 0
    device: str = "cpu"
    channels_last: bool = True
    bf16: bool | None = None
    compile: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        kinds = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
                 "bool": ((bool,), "true or false")}
        for f in fields(self):  # a --config file may hold anything: check the types before the values
            value, annotation = getattr(self, f.name), str(f.type)
            if value is None and annotation.endswith("| None"):
                continue
            types, what = kinds[annotation.removesuffix(" | None")]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise NasUserError(f"`{f.name}` must be {what}, got {value!r}")
        checks: list[tuple[str, bool, str]] = [
            ("resolution", self.resolution >= 16, ">= 16"),
            ("stem_stride", self.stem_stride in (0, 2, 4), "0 (auto), 2 or 4"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 2, ">= 2"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive finite number"),
            ("min_lr", math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr, "within [0, lr]"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
             "within [0, epochs]"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "within [0, 1)"),
            ("num_random", 0 <= self.num_random <= 16, "within [0, 16]"),
            ("calib_batches", self.calib_batches >= 1, ">= 1"),
            ("save_every", self.save_every >= 0, ">= 0"),
            ("device", self.device in ("cpu", "cuda") or self.device.startswith("cuda:"), "cpu or cuda"),
            ("threads", self.threads >= 0, ">= 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise NasUserError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(self, name)!r}")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise NasUserError(f"--train-subset must be at least --batch-size ({self.batch_size}), got {self.train_subset}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NasUserError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """The settings that must match for a run folder to be resumed (not device or threads)."""
        d = self.to_dict()
        for k in ("device", "threads", "save_every", "compile"):
            d.pop(k)
        return d


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]
    log: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int = 0
    already_complete: bool = False


def lr_at(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``.

    >>> lr_at(0, total=100, warmup=10, lr=1.0, min_lr=0.0)
    0.1
    >>> round(lr_at(100, total=100, warmup=10, lr=1.0, min_lr=0.0), 6)
    0.0
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def sandwich_archs(space: SearchSpace, *, seed: int, step: int, num_random: int) -> list[ArchConfig]:
    """Largest, smallest, then ``num_random`` random configs; a pure function of ``(seed, step)``."""
    archs = [space.largest(), space.smallest()]
    archs += [space.sample(random.Random(f"sandwich:{seed}:{step}:{k}")) for k in range(num_random)]
    return archs


def _resolve_space(cfg: TrainConfig) -> SearchSpace:
    space = get_space(cfg.space)
    if space.family not in SUPPORTED_FAMILIES:
        raise NasUserError(f"--space {cfg.space!r} is of family {space.family!r}; supernets exist for "
                           f"{list(SUPPORTED_FAMILIES)} (e.g. efficientformer_v2, efficientformer_v2_demo)")
    stride = cfg.stem_stride or (2 if cfg.resolution <= 64 else space.stem_stride)
    return space.with_stem_stride(stride)


class _Dist:
    """Rank, world size and gradient averaging; a no-op outside ``torchrun``."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast_params(self, module: torch.nn.Module) -> None:
        if self.world > 1:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (mean) every gradient; ranks train the same archs, so the same grads exist."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _run_meta(cfg: TrainConfig, space: SearchSpace, splits: DatasetSplits) -> dict[str, Any]:
    return {
        "schema": SUPERNET_SCHEMA,
        "space": space.to_dict(),
        "space_name": space.name,
        "space_hash": space.hash,
        "family": space.family,
        "resolution": cfg.resolution,
        "num_classes": splits.num_classes,
        "in_chans": splits.in_chans,
        "distillation": None,
        "dataset": splits.describe(),
        "recipe": cfg.to_dict(),
    }


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

    Returns:
        The run folder and final metrics (validation and test accuracy of the largest and
        smallest subnets, after BN recalibration).

    Raises:
        NasUserError: a bad setting, a missing dataset, or a run folder of a different config.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, Path(run_dir), resume=resume, progress=progress, on_step=on_step, on_start=on_start)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, run_dir: Path, *, resume: bool, progress: bool,
           on_step: Callable[[int], None] | None, on_start: Callable[[], None] | None) -> TrainResult:
    ddp = _Dist(cfg.device)
    device = torch.device(cfg.device if not cfg.device.startswith("cuda") or ddp.world == 1
                          else f"cuda:{ddp.local_rank}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NasUserError("--device cuda was given but no CUDA GPU is available; use --device cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    if cfg.batch_size % ddp.world:
        raise NasUserError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({ddp.world})")

    space = _resolve_space(cfg)
    splits = load_dataset(cfg.dataset, resolution=cfg.resolution, seed=cfg.seed, val_size=cfg.val_size,
                          train_subset=cfg.train_subset)
    if len(splits.train) < cfg.batch_size:
        raise NasUserError(f"--batch-size {cfg.batch_size} is larger than the training split of {cfg.dataset} "
                           f"({len(splits.train)} images); use a --batch-size of at most {len(splits.train)}")
    meta = _run_meta(cfg, space, splits)

    final = run_dir / "supernet.json"
    if resume and final.is_file() and (run_dir / "supernet.safetensors").is_file():
        from search_spaces.fileio import read_json
        done = read_json(final, what="supernet.json")
        if done.get("recipe", {}) and TrainConfig.from_dict(done["recipe"]).identity() == cfg.identity():
            logger.info("run %s is already complete; nothing to do (use --restart to train again)", run_dir)
            return TrainResult(run_dir, done.get("metrics", {}), done.get("log", []), already_complete=True)

    torch.manual_seed(cfg.seed)
    net = Supernet(space, num_classes=splits.num_classes, resolution=cfg.resolution, in_chans=splits.in_chans)
    net.to(device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    no_decay = net.no_weight_decay()
    named = list(net.named_parameters())
    params = [p for _, p in named]
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if n not in no_decay], "weight_decay": cfg.weight_decay},
         {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda" or None,
    )

    spe = make_loader(splits.train, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed).batches_per_epoch
    total = spe * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * spe))
    step, log = 0, []
    acc = {"loss_sum": 0.0, "loss_n": 0, "seen": 0, "seconds": 0.0}  # running sums of the current epoch
    ckpt = run_dir / CHECKPOINT
    if resume and ckpt.is_file():
        tensors, state = load_tensors(ckpt)
        if TrainConfig.from_dict(state["config"]).identity() != cfg.identity():
            raise NasUserError(f"{run_dir} holds a checkpoint of different training settings; use another --out "
                               f"or --restart to discard it")
        net.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_from_tensors(opt, tensors, state["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        step, log = int(state["step"]), list(state["log"])
        if step % spe:
            acc.update(state.get("epoch_running", {}))
        logger.info("resuming %s at step %d of %d (epoch %d)", run_dir, step, total, step // spe + 1)
    calib_bs = min(cfg.batch_size, 256)
    calib = calibration_batches(splits.train, batch_size=calib_bs,
                                num_batches=max(1, min(cfg.calib_batches, len(splits.train) // calib_bs)),
                                seed=cfg.seed, channels_last=cfg.channels_last, device=device)
    resumed_from = step
    ddp.broadcast_params(net)
    if ddp.main:  # everything is validated: only now does the run folder get written
        run_dir.mkdir(parents=True, exist_ok=True)
        if on_start is not None:
            on_start()

    def save_checkpoint() -> None:
        if not ddp.main:
            return
        tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
        opt_tensors, opt_meta = optimizer_to_tensors(opt)
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        running = {**acc, "seconds": acc["seconds"] + time.perf_counter() - t0}
        save_tensors(ckpt, tensors, {"config": cfg.to_dict(), "step": step, "total": total, "log": log,
                                     "optimizer": opt_meta, "meta": meta, "epoch_running": running})

    forward: Callable[..., torch.Tensor] = net
    if cfg.compile:
        from torch import _dynamo
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
        forward = torch.compile(net)


    def validate(split_name: str) -> dict[str, float]:
        split = getattr(splits, split_name)
        out = {}
        for tag, arch in (("largest", space.largest()), ("smallest", space.smallest())):
            model = recalibrate_bn(net, arch, calib)
            loader = make_loader(split, batch_size=256, shuffle=False, seed=cfg.seed, device=device,
                                 channels_last=cfg.channels_last)
            out[f"{split_name}_acc_{tag}"] = evaluate(model, loader, autocast_dtype=torch.bfloat16 if bf16 else None)
        net.train()
        return out

    bar = None
    if progress and ddp.main:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, disable=not sys.stderr.isatty())
    net.train()
    t_run = time.perf_counter()
    while step < total:
        epoch = step // spe
        loader = make_loader(splits.train, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                             augment=True, rank=ddp.rank, world_size=ddp.world, start_batch=step % spe,
                             channels_last=cfg.channels_last, device=device)
        t0 = time.perf_counter()
        for x, y in loader:
            lr = lr_at(step, total=total, warmup=warmup, lr=cfg.lr, min_lr=cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            teacher = None
            for k, arch in enumerate(sandwich_archs(space, seed=cfg.seed, step=step, num_random=cfg.num_random)):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = forward(x, arch)
                    if k == 0:
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                        teacher = logits.detach().float().softmax(dim=-1)
                        acc["loss_sum"] += float(loss.detach())
                        acc["loss_n"] += 1
                    elif cfg.distill:
                        loss = torch.sum(-teacher * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                    else:
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                loss.backward()
            ddp.average_grads(params)
            opt.step()
            step += 1
            acc["seen"] += x.shape[0] * ddp.world
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{acc['loss_sum'] / max(acc['loss_n'], 1):.3f}")
            if on_step is not None:
                on_step(step)
            if cfg.save_every and step % cfg.save_every == 0 and step % spe:
                save_checkpoint()
        seconds = acc["seconds"] + time.perf_counter() - t0
        ddp.barrier()
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": lr_at(step - 1, total=total, warmup=warmup,
                                                                                lr=cfg.lr, min_lr=cfg.min_lr),
                               "train_loss": acc["loss_sum"] / max(acc["loss_n"], 1), "epoch_seconds": seconds,
                               "images_per_s": acc["seen"] / max(seconds, 1e-9)}
        acc.update(loss_sum=0.0, loss_n=0, seen=0, seconds=0.0)
        if ddp.main:
            row.update(validate("val"))
            logger.info("epoch %d/%d: loss %.4f, val acc largest %.4f smallest %.4f, %.0f img/s", epoch + 1,
                        cfg.epochs, row["train_loss"], row["val_acc_largest"], row["val_acc_smallest"],
                        row["images_per_s"])
        log.append(row)
        save_checkpoint()
        ddp.barrier()
    if bar is not None:
        bar.close()

    metrics: dict[str, float] = {}
    if ddp.main:
        metrics.update({k: v for k, v in log[-1].items() if k.startswith("val_acc")} if log else {})
        metrics.update(validate("test"))
        metrics["train_seconds"] = time.perf_counter() - t_run
        _write_outputs(run_dir, net, meta, cfg, metrics, log)
    ddp.barrier()
    return TrainResult(run_dir, metrics, log, resumed_from_step=resumed_from)


def _write_outputs(run_dir: Path, net: Supernet, meta: dict[str, Any], cfg: TrainConfig,
                   metrics: dict[str, float], log: list[dict[str, Any]]) -> None:
    weights = {k: v for k, v in net.state_dict().items()}
    save_tensors(run_dir / "supernet.safetensors", weights, {"space": meta["space"], "resolution": cfg.resolution})
    import hashlib
    digest = hashlib.sha256((run_dir / "supernet.safetensors").read_bytes()).hexdigest()
    buf = io.StringIO()
    if log:
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in log for k in row)))
        writer.writeheader()
        writer.writerows(log)
    atomic_write_text(run_dir / "train_log.csv", buf.getvalue())
    atomic_write_json(run_dir / "supernet.json", {**meta, "weights_sha256": digest, "metrics": metrics,
                                                  "log": log, "complete": True})
