"""The supernet training loop behind :func:`supernet.train.train`, in pieces.

A :class:`Trainer` holds one run's state. :func:`~supernet.train.train` calls, in order:

1. :meth:`Trainer.prepare`: device, threads, search space, dataset and run metadata; every
   user mistake is found here, before anything is written.
2. :meth:`Trainer.completed`: a finished run of the same settings is not trained again.
3. :meth:`Trainer.build`: the supernet (seeded) and its optimizer (:class:`~supernet.optim.SharedAdamW`).
4. :meth:`Trainer.resume`: weights, optimizer, RNG, step and log from ``checkpoint.safetensors``.
5. :meth:`Trainer.start`: BN calibration batches, the run folder, the forward function.
6. :meth:`Trainer.run`: epochs of :meth:`Trainer.step`, each closed by :meth:`Trainer.end_epoch`
   (validation, log row, checkpoint), then :meth:`Trainer.finish` (test accuracy, outputs).

The order of every random draw is that of an uninterrupted run, so a resumed run ends with
the same weights, bit for bit.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from search_spaces import ArchConfig, SearchSpace, get_space
from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.fileio import atomic_write_json, atomic_write_text, read_json
from search_spaces.schema import validate

from .bn import evaluate, recalibrate_bn
from .compile import CompiledSupernet
from .checkpoint import load_tensors, optimizer_from_tensors, optimizer_to_tensors, save_tensors
from .optim import SharedAdamW, forget_slices, used_region
from .data import DatasetSplits, calibration_batches, load_dataset, make_loader
from .elastic import SUPPORTED_FAMILIES, Supernet
from .run_schema import SUPERNET_SCHEMA, CheckpointMeta, EpochSums, RunMeta, SupernetFile
from .sandwich import lr_at, sandwich_archs, sandwich_step
from .train import CHECKPOINT, LogRow, TrainResult
from .train_config import TrainConfig

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, ArchConfig], torch.Tensor]


def _check_backend(name: str) -> None:
    from torch._dynamo import list_backends

    known = sorted(set(list_backends(exclude_tags=())) | {"inductor"})
    if name not in known:
        raise NasUserError(f"--compile-backend {name!r} is not a torch.compile backend; known: {known}")


def _square_side(cfg: TrainConfig) -> int:
    height, width = cfg.resolution
    if height != width:
        raise NasUserError(f"--resolution {cfg.resolution_text}: training takes square inputs for now (the data "
                           f"loaders and the supernet are square-only); use e.g. --resolution {max(height, width)}")
    return height


def _resolve_space(cfg: TrainConfig, side: int) -> SearchSpace:
    space = get_space(cfg.space)
    if space.family not in SUPPORTED_FAMILIES:
        raise NasUserError(f"--space {cfg.space!r} is of family {space.family!r}; supernets exist for "
                           f"{list(SUPPORTED_FAMILIES)} (e.g. efficientformer_v2, efficientformer_v2_demo)")
    stride = cfg.stem_stride or (2 if side <= 64 else space.stem_stride)
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
            forget_slices(module.parameters())  # those writes bypass the version counters the slice copies trust

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (mean) the gradients this step used; ranks train the same archs, so the same exist."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None and used_region(p) is not None]
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


@dataclass
class _EpochSums:
    """Running sums of the current epoch (saved in mid-epoch checkpoints, so a resume keeps them)."""

    loss_sum: float = 0.0
    loss_n: int = 0
    seen: int = 0
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.loss_n, 1)


def _run_meta(cfg: TrainConfig, space: SearchSpace, splits: DatasetSplits, side: int) -> RunMeta:
    return RunMeta.model_validate({
        "schema": SUPERNET_SCHEMA, "space": space.to_dict(), "space_name": space.name, "space_hash": space.hash,
        "family": space.family, "resolution": side, "num_classes": splits.num_classes, "in_chans": splits.in_chans,
        "distillation": None, "dataset": splits.describe(), "recipe": cfg.to_dict()})


def _warm_starts(cfg: TrainConfig, space: SearchSpace) -> list[tuple[ArchConfig, Path]]:
    """The ``--init PRESET=WEIGHTS`` items as (config of the space, file), checked before anything is written."""
    from dataclasses import replace

    from search_spaces import get_preset, list_presets

    out = []
    for item in cfg.init:
        name, _, path = item.partition("=")
        if name not in list_presets():
            raise NasUserError(f"--init {item!r}: {name!r} is not a preset; known presets: {', '.join(list_presets())}")
        if not Path(path).is_file():
            raise NasUserError(f"--init {item!r}: no weights file {path!r}")
        arch = replace(get_preset(name), stem_stride=space.stem_stride)  # the same weights at the space's stem stride
        reason = space.why_not(arch)
        if reason is not None:
            raise NasUserError(f"--init {item!r}: {name} is not in the space {space.name!r} ({reason}); warm-start "
                               f"from a preset the space contains")
        out.append((arch, Path(path)))
    return out


class Trainer:
    """One supernet training run; see the module docstring for the order of the calls."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, *, progress: bool,
                 on_step: Callable[[int], None] | None, on_start: Callable[[], None] | None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.progress, self.on_step, self.on_start = progress, on_step, on_start
        self.ddp = _Dist(cfg.device)
        self.step_no = 0
        self.log: list[LogRow] = []
        self.sums = _EpochSums()
        self.resumed_from = 0
        self._t0 = time.perf_counter()  # start of the current epoch's timing
        self._bar: tqdm | None = None

    # ------------------------------------------------------------------ 1. prepare
    def prepare(self) -> None:
        """Check the device and settings, load the dataset; raise on any user mistake."""
        cfg, ddp = self.cfg, self.ddp
        self.device = torch.device(cfg.device if not cfg.device.startswith("cuda") or ddp.world == 1
                                   else f"cuda:{ddp.local_rank}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise NasUserError("--device cuda was given but no CUDA GPU is available; use --device cpu")
        if cfg.compile:
            _check_backend(cfg.compile_backend)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else self.device.type == "cuda"
        if cfg.batch_size % ddp.world:
            raise NasUserError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes "
                               f"({ddp.world})")
        self.side = _square_side(cfg)
        self.space = _resolve_space(cfg, self.side)
        self.splits = load_dataset(cfg.dataset, resolution=self.side, seed=cfg.seed, val_size=cfg.val_size,
                                   train_subset=cfg.train_subset)
        n_train = len(self.splits.train)
        if n_train < cfg.batch_size:
            raise NasUserError(f"--batch-size {cfg.batch_size} is larger than the training split of {cfg.dataset} "
                               f"({n_train} images); use a --batch-size of at most {n_train}")
        self.meta = _run_meta(cfg, self.space, self.splits, self.side)
        self.inits = _warm_starts(cfg, self.space)
        self.teacher: torch.nn.Module | None = None
        if cfg.teacher is not None:
            from search_spaces import LoweringSetup

            from .teacher import load_teacher

            setup = LoweringSetup(resolution=self.side, num_classes=self.splits.num_classes,
                                  in_chans=self.splits.in_chans)
            self.teacher = load_teacher(cfg.teacher, setup, device=self.device)

    # ------------------------------------------------------------------ 2. completed
    def completed(self) -> TrainResult | None:
        """The finished run of these settings in the run folder, if there is one."""
        final = self.run_dir / "supernet.json"
        if not (final.is_file() and (self.run_dir / "supernet.safetensors").is_file()):
            return None
        raw = read_json(final, what="supernet.json")
        done = validate(SupernetFile, raw, source=f"{final} (use --restart to discard the run)")
        recipe = TrainConfig.from_dict(done.recipe, source=str(final)) if done.recipe else None
        if recipe is not None and recipe.identity() == self.cfg.identity():
            logger.info("run %s is already complete; nothing to do (use --restart to train again)", self.run_dir)
            return TrainResult(self.run_dir, dict(done.metrics), list(raw.get("log", [])), already_complete=True)
        return None

    # ------------------------------------------------------------------ 3. build
    def build(self) -> None:
        """The seeded supernet, its optimizer, and the step counts of the schedule."""
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        net = Supernet(self.space, num_classes=self.splits.num_classes, resolution=self.side,
                       in_chans=self.splits.in_chans)
        net.to(device)
        for arch, path in self.inits:
            from .pretrained import init_supernet_from

            n = init_supernet_from(net, arch, path)
            logger.info("warm start: %d tensors of %s from %s", n, arch.to_string(), path)
        if cfg.channels_last:
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (the stubs lack it)
        no_decay = net.no_weight_decay()
        named = list(net.named_parameters())
        self.net, self.params = net, [p for _, p in named]
        # AdamW over the used regions of the shared tensors (exactly AdamW where a step uses a tensor whole)
        self.opt = SharedAdamW(
            [{"params": [p for n, p in named if n not in no_decay], "weight_decay": cfg.weight_decay},
             {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.999),
        )
        loader = make_loader(self.splits.train, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
        self.steps_per_epoch = loader.batches_per_epoch
        self.total = self.steps_per_epoch * cfg.epochs
        self.warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))

    # ------------------------------------------------------------------ 4. resume
    def resume(self) -> None:
        """Continue the run folder's checkpoint, if there is one (it must be of the same settings)."""
        ckpt = self.run_dir / CHECKPOINT
        if not ckpt.is_file():
            return
        tensors, raw = load_tensors(ckpt)
        state = validate(CheckpointMeta, raw, source=f"{ckpt} (use --restart to discard it)")
        if TrainConfig.from_dict(state.config, source=str(ckpt)).identity() != self.cfg.identity():
            raise NasUserError(f"{self.run_dir} holds a checkpoint of different training settings; use another "
                               f"--out or --restart to discard it")
        if state.total != self.total or "rng.torch" not in tensors:
            raise FileFormatError(f"{ckpt} does not fit these settings ({state.total} steps, not {self.total}) or "
                                  f"lacks its RNG state; use --restart to discard it")
        self.net.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_from_tensors(self.opt, tensors, state.optimizer.model_dump())
        torch.set_rng_state(tensors["rng.torch"])
        self.step_no, self.log = state.step, [row.model_dump(exclude_none=True) for row in state.log]
        if self.step_no % self.steps_per_epoch:
            self.sums = _EpochSums(**state.epoch_running.model_dump())
        logger.info("resuming %s at step %d of %d (epoch %d)", self.run_dir, self.step_no, self.total,
                    self.step_no // self.steps_per_epoch + 1)

    # ------------------------------------------------------------------ 5. start
    def start(self) -> None:
        """Calibration batches, the run folder (only now is anything written), the forward function."""
        cfg, splits = self.cfg, self.splits
        calib_bs = min(cfg.batch_size, 256)
        self.calib = calibration_batches(splits.train, batch_size=calib_bs,
                                         num_batches=max(1, min(cfg.calib_batches, len(splits.train) // calib_bs)),
                                         seed=cfg.seed, channels_last=cfg.channels_last, device=self.device)
        self.resumed_from = self.step_no
        self.ddp.broadcast_params(self.net)
        if self.ddp.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.on_start is not None:
                self.on_start()
        self.forward: Forward = self.net
        self.compiled: CompiledSupernet | None = None
        if cfg.compile:
            self.compiled = CompiledSupernet(self.net, backend=cfg.compile_backend)
            self.forward = self.compiled
        if self.progress and self.ddp.main:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=self.step_no, unit="step", dynamic_ncols=True,
                             disable=not sys.stderr.isatty())

    # ------------------------------------------------------------------ 6. run
    def run(self) -> TrainResult:
        """Train to the last step, then :meth:`finish`."""
        cfg = self.cfg
        self.net.train()
        self._t_run = time.perf_counter()
        while self.step_no < self.total:
            epoch = self.step_no // self.steps_per_epoch
            loader = make_loader(self.splits.train, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                                 epoch=epoch, augment=True, rank=self.ddp.rank, world_size=self.ddp.world,
                                 start_batch=self.step_no % self.steps_per_epoch, channels_last=cfg.channels_last,
                                 device=self.device)
            self._t0 = time.perf_counter()
            for x, y in loader:
                self.step(x, y, epoch=epoch)
            self.end_epoch(epoch)
        if self._bar is not None:
            self._bar.close()
        return self.finish()

    def step(self, x: torch.Tensor, y: torch.Tensor, *, epoch: int) -> None:
        """One optimizer step over the sandwich of subnets for batch ``x`` ``(B, C, H, W)``, labels ``y``."""
        cfg = self.cfg
        lr = lr_at(self.step_no, total=self.total, warmup=self.warmup, lr=cfg.lr, min_lr=cfg.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.compiled is not None:
            self.compiled.begin_step()
        self.opt.zero_grad()  # zeroes the regions the last step used; gradients stay allocated
        archs = sandwich_archs(self.space, seed=cfg.seed, step=self.step_no, num_random=cfg.num_random)
        teacher_classes = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_classes = self.teacher(x).argmax(dim=-1)
        loss = sandwich_step(self.forward, archs, x, y, label_smoothing=cfg.label_smoothing, distill=cfg.distill,
                             bf16=self.bf16, teacher_classes=teacher_classes,
                             distilled_head=self.net.set_distilled_training if self.net.setup.distillation else None)
        self.sums.loss_sum += float(loss)
        self.sums.loss_n += 1
        self.ddp.average_grads(self.params)
        self.opt.step()
        self.step_no += 1
        self.sums.seen += x.shape[0] * self.ddp.world
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{self.sums.mean_loss:.3f}")
        if self.on_step is not None:
            self.on_step(self.step_no)
        if cfg.save_every and self.step_no % cfg.save_every == 0 and self.step_no % self.steps_per_epoch:
            self.save_checkpoint()

    def end_epoch(self, epoch: int) -> None:
        """Log row (with validation accuracy on the main rank) and checkpoint at an epoch's end."""
        cfg, sums = self.cfg, self.sums
        seconds = sums.seconds + time.perf_counter() - self._t0
        self.ddp.barrier()
        row: LogRow = {"epoch": epoch + 1, "step": self.step_no,
                       "lr": lr_at(self.step_no - 1, total=self.total, warmup=self.warmup, lr=cfg.lr,
                                   min_lr=cfg.min_lr),
                       "train_loss": sums.mean_loss, "epoch_seconds": seconds,
                       "images_per_s": sums.seen / max(seconds, 1e-9)}
        self.sums = _EpochSums()
        if self.ddp.main:
            row.update(self.validate("val"))
            logger.info("epoch %d/%d: loss %.4f, val acc largest %.4f smallest %.4f, %.0f img/s", epoch + 1,
                        cfg.epochs, row["train_loss"], row["val_acc_largest"], row["val_acc_smallest"],
                        row["images_per_s"])
        if self.compiled is not None and self.ddp.main:
            logger.info("compile: %s", self.compiled.update_counts().summary())
        self.log.append(row)
        self.save_checkpoint()
        self.ddp.barrier()

    def save_checkpoint(self) -> None:
        """Weights, optimizer, RNG, step, log and the epoch's running sums, atomically (main rank)."""
        if not self.ddp.main:
            return
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        opt_tensors, opt_meta = optimizer_to_tensors(self.opt)
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        running = EpochSums(**{**asdict(self.sums), "seconds": self.sums.seconds + time.perf_counter() - self._t0})
        meta = CheckpointMeta.model_validate({"config": self.cfg.to_dict(), "step": self.step_no, "total": self.total,
                                              "log": self.log, "optimizer": opt_meta, "meta": self.meta,
                                              "epoch_running": running})
        save_tensors(self.run_dir / CHECKPOINT, tensors, meta.model_dump(mode="json", by_alias=True))

    def validate(self, split_name: str) -> dict[str, float]:
        """Accuracy of the largest and smallest subnets on ``split_name`` after BN recalibration."""
        split = getattr(self.splits, split_name)
        out = {}
        for tag, arch in (("largest", self.space.largest()), ("smallest", self.space.smallest())):
            model = recalibrate_bn(self.net, arch, self.calib)
            loader = make_loader(split, batch_size=256, shuffle=False, seed=self.cfg.seed, device=self.device,
                                 channels_last=self.cfg.channels_last)
            out[f"{split_name}_acc_{tag}"] = evaluate(model, loader,
                                                      autocast_dtype=torch.bfloat16 if self.bf16 else None)
        self.net.train()
        return out

    # ------------------------------------------------------------------ 7. finish
    def finish(self) -> TrainResult:
        """Test accuracy and the final outputs (main rank)."""
        metrics: dict[str, float] = {}
        if self.ddp.main:
            metrics.update({k: v for k, v in self.log[-1].items() if k.startswith("val_acc")} if self.log else {})
            metrics.update(self.validate("test"))
            metrics["train_seconds"] = time.perf_counter() - self._t_run
            _write_outputs(self.run_dir, self.net, self.meta, metrics, self.log)
        self.ddp.barrier()
        return TrainResult(self.run_dir, metrics, self.log, resumed_from_step=self.resumed_from)


def _write_outputs(run_dir: Path, net: Supernet, meta: RunMeta, metrics: dict[str, float], log: list[LogRow]) -> None:
    weights = dict(net.state_dict())
    save_tensors(run_dir / "supernet.safetensors", weights, {"space": meta.space, "resolution": meta.resolution})
    digest = hashlib.sha256((run_dir / "supernet.safetensors").read_bytes()).hexdigest()
    buf = io.StringIO()
    if log:
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in log for k in row)))
        writer.writeheader()
        writer.writerows(log)
    atomic_write_text(run_dir / "train_log.csv", buf.getvalue())
    final = SupernetFile.model_validate({**dict(meta), "weights_sha256": digest, "metrics": metrics, "log": log,
                                         "complete": True})
    atomic_write_json(run_dir / "supernet.json", final.to_json())
