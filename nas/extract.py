"""Extraction: a searched subnet becomes a standalone, exported, measured model (``nas-extract``).

The static model is built by :func:`supernet.build_model`'s classes and receives the supernet's
sliced weights; its output is checked against the supernet's (within 1e-5). BN is recalibrated,
optionally the model is fine-tuned, and it is exported to ``model.safetensors`` (config in the
metadata), ``model.onnx`` (checked, ORT within 1e-4 of torch) and ``model.mlpackage``.
:func:`load_subnet` rebuilds the model from the folder alone.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from search_spaces.errors import FileFormatError, NasUserError
from search_spaces.fileio import atomic_write_json, atomic_write_text
from search_spaces.subnet_file import SubnetFile

__all__ = ["ExtractResult", "extract", "load_subnet", "PARITY_ATOL", "ONNX_ATOL"]

logger = logging.getLogger(__name__)

PARITY_ATOL = 1e-5
ONNX_ATOL = 1e-4
FORMATS = ("safetensors", "onnx", "coreml")
MEASURE_ROUNDS = 3


@dataclass
class ExtractResult:
    out: Path
    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _resolve_run(sub: SubnetFile, supernet: str | None, say: Callable[[str], None]) -> Any:
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
    for name in ("resolution", "num_classes", "in_chans"):
        if getattr(sub, name) != getattr(run, name):
            raise NasUserError(f"subnet.json {name} {getattr(sub, name)} differs from the supernet's "
                               f"{getattr(run, name)}")
    return run


def _finetune(model: torch.nn.Module, splits: Any, *, epochs: int, lr: float, seed: int,
              progress: Callable[[str], None] | None) -> None:
    from supernet.data import make_loader
    from supernet.train import lr_at

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    spe = make_loader(splits.train, batch_size=128, shuffle=True, seed=seed).batches_per_epoch
    total = epochs * spe
    step = 0
    for epoch in range(epochs):
        model.train()
        t0, loss_sum = time.perf_counter(), 0.0
        for x, y in make_loader(splits.train, batch_size=128, shuffle=True, seed=seed + 1000, epoch=epoch,
                                augment=True):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total=total, warmup=spe // 4, lr=lr, min_lr=lr / 100)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            step += 1
        msg = f"fine-tune epoch {epoch + 1}/{epochs}: loss {loss_sum / spe:.4f} ({time.perf_counter() - t0:.0f} s)"
        logger.info(msg)
        if progress is not None:
            progress(msg)


def extract(subnet_path: str | Path, *, supernet: str | None = None, out: str | Path | None = None,
            finetune_epochs: int = 0, finetune_lr: float = 5e-4, formats: tuple[str, ...] = FORMATS,
            measure: bool = True, notify: Callable[[str], None] | None = None,
            progress: Callable[[str], None] | None = None) -> ExtractResult:
    """Extract, check, optionally fine-tune, export and measure the subnet of ``subnet_path``.

    Raises:
        NasUserError: bad subnet.json, missing or mismatched supernet, bad formats.
        RuntimeError: a parity check failed (a bug, never a user mistake).
    """
    from supernet.bn import evaluate, recalibrate_bn
    from supernet.data import calibration_batches, make_loader
    from supernet.run import load_supernet

    from .accuracy import load_run_splits

    say = notify or logger.info
    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        raise NasUserError(f"--formats must be a comma list of {list(FORMATS)}, got {list(formats)}")
    if finetune_epochs < 0:
        raise NasUserError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    sub = SubnetFile.load(subnet_path)
    run = _resolve_run(sub, supernet, say)
    out = Path(out) if out is not None else Path("runs") / f"extract-{sub.arch.hash}"
    if notify is not None and out == Path("runs") / f"extract-{sub.arch.hash}":
        say(f"nas-extract: writing the model to {out} (set --out to choose)")
    net = load_supernet(run)
    splits = load_run_splits(run)
    calib = calibration_batches(splits.train, batch_size=128,
                                num_batches=max(1, min(16, len(splits.train) // 128)), seed=0)
    model = net.get_active_subnet(sub.arch).eval()
    metrics: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        x = calib[0][:16]
        diff = float((net(x, sub.arch) - model(x)).abs().max())
    metrics["supernet_parity_max_abs"] = diff
    if not diff <= PARITY_ATOL:
        raise RuntimeError(f"extracted model differs from the supernet by {diff:.3g} (> {PARITY_ATOL})")
    say(f"nas-extract: weights copied; output equals the supernet's (max abs diff {diff:.2g})")

    model = recalibrate_bn(model, None, calib)
    val = make_loader(splits.val, batch_size=256, shuffle=False, seed=0)
    metrics["val_accuracy_inherited"] = evaluate(model, val)
    if finetune_epochs:
        _finetune(model, splits, epochs=finetune_epochs, lr=finetune_lr, seed=0, progress=progress)
        model.eval()
        metrics["val_accuracy_finetuned"] = evaluate(model, val)
        metrics["finetune_epochs"] = finetune_epochs
    metrics["test_accuracy"] = evaluate(model, make_loader(splits.test, batch_size=256, shuffle=False, seed=0))
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    shape = (1, sub.in_chans, sub.resolution, sub.resolution)
    sample = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    record = SubnetFile(sub.arch, sub.resolution, sub.num_classes, sub.in_chans, sub.distillation,
                        {**sub.metrics, **{k: v for k, v in metrics.items()}}, sub.provenance)
    if "safetensors" in formats:
        from supernet.checkpoint import save_tensors

        files["model.safetensors"] = save_tensors(out / "model.safetensors", dict(model.state_dict()),
                                                  {"subnet": record.to_dict()})
    if "onnx" in formats:
        import onnxruntime as ort

        from latency.runtime import export_onnx

        export_onnx(model, shape, out / "model.onnx")
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: sample.numpy()})[0]
        with torch.no_grad():
            want = model(sample).numpy()
        metrics["onnx_max_abs"] = float(abs(got - want).max())
        if not metrics["onnx_max_abs"] <= ONNX_ATOL:
            raise RuntimeError(f"ONNX Runtime output differs from torch by {metrics['onnx_max_abs']:.3g}")
        files["model.onnx"] = out / "model.onnx"
    if "coreml" in formats:
        from latency.runtime import convert_coreml, coreml_predict_available

        t0 = time.perf_counter()
        files["model.mlpackage"] = convert_coreml(model, shape, out / "model.mlpackage")
        metrics["coreml_convert_seconds"] = time.perf_counter() - t0
        metrics["coreml_prediction"] = ("available (macOS)" if coreml_predict_available() else
                                        "not run: CoreML prediction needs macOS; the .mlpackage converted here")
    if measure:
        metrics["latency_ms"] = _latencies(model, shape, sub, run)
    card = _model_card(sub, metrics, files, subnet_path)
    files["model.md"] = atomic_write_text(out / "model.md", card)
    final = SubnetFile(sub.arch, sub.resolution, sub.num_classes, sub.in_chans, sub.distillation,
                       {**sub.metrics, **metrics}, sub.provenance)
    files["subnet.json"] = final.save(out / "subnet.json")
    files["extract.json"] = atomic_write_json(out / "extract.json", {"metrics": metrics,
                                                                     "files": {k: str(v) for k, v in files.items()}})
    return ExtractResult(out, metrics, files)


def _latencies(model: torch.nn.Module, shape: tuple[int, ...], sub: SubnetFile, run: Any) -> dict[str, Any]:
    """Measured local-cpu latency (ORT, 1 thread) next to every LUT prediction available."""
    from latency import LatencyTable, predict_latency
    from latency.lut import default_lut_path
    from latency.profiles import get_profile
    from latency.runtime import measure_module

    out: dict[str, Any] = {}
    # As the LUT validation times whole networks: a few rounds, the quietest (lowest median) counts, so
    # a burst of other work on a shared machine does not decide the figure.
    profile = get_profile("local-cpu")
    stats = min((measure_module(model, shape, profile) for _ in range(MEASURE_ROUNDS)), key=lambda st: st.median_ms)
    out["local-cpu"] = {"measured": stats.median_ms, "measured_median": stats.median_ms, "measured_min": stats.min_ms,
                        "iqr": stats.iqr_ms, "statistic": "median",
                        "source": f"measured (ORT, 1 thread, best of {MEASURE_ROUNDS} rounds)"}
    luts = {d: Path(v["path"]) for d, v in sub.provenance.get("luts", {}).items()}
    local = default_lut_path("local-cpu", sub.resolution)
    if "local-cpu" not in luts and local.is_file():
        luts["local-cpu"] = local
    for device, path in luts.items():
        if not path.is_file():
            continue
        try:
            lut = LatencyTable.load(path)
            lut.check_compatible(device=device, resolution=sub.resolution, space_hash=run.space.hash)
            value = predict_latency(sub.arch, lut)
        except NasUserError as exc:
            logger.warning("LUT %s not used: %s", path, exc)
            continue
        entry = out.setdefault(device, {})
        entry["lut"] = value
        entry["lut_source"] = "predicted" if lut.predicted else "measured-lut"
        if "measured" in entry:  # compare like with like: the statistic the LUT sums
            entry["statistic"] = lut.statistic
            entry["measured"] = entry["measured_min"] if lut.statistic == "min" else entry["measured_median"]
            entry["measured_over_lut"] = entry["measured"] / value
    return out


def _model_card(sub: SubnetFile, metrics: dict[str, Any], files: dict[str, Path], subnet_path: Any) -> str:
    lines = [f"# Subnet {sub.arch.hash}", "",
             f"Family `{sub.arch.family}`, input {sub.in_chans}x{sub.resolution}x{sub.resolution}, "
             f"{sub.num_classes} classes.", "", f"Architecture: `{sub.arch.to_string()}`", "",
             "| stage | width | blocks (mixer x expansion) |", "|---|---|---|"]
    for i, st in enumerate(sub.arch.stages):
        lines.append(f"| {i + 1} | {st.width} | {', '.join(f'{b.mixer} x{b.expansion:g}' for b in st.blocks)} |")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        if k == "latency_ms":
            continue
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "## Latency (ms)", "", "| device | measured | LUT | LUT source |", "|---|---|---|---|"]
    for d, v in metrics.get("latency_ms", {}).items():
        m = f"{v['measured']:.3f}" if "measured" in v else "-"
        lut = f"{v['lut']:.3f}" if "lut" in v else "-"
        lines.append(f"| {d} | {m} | {lut} | {v.get('lut_source', '-')} |")
    lines += ["", "Accuracies are top-1 fractions; `val` is the held-out validation split, `test` the test split.",
              "", "## Reproduce", "", "```", f"nas-extract {subnet_path}", "```", "",
              "Load it anywhere with `from nas.extract import load_subnet; model = load_subnet('<this folder>')`.",
              "", "Files: " + ", ".join(sorted(files)), ""]
    if metrics.get("coreml_prediction", "").startswith("not run"):
        lines += [f"Note: {metrics['coreml_prediction']}.", ""]
    return "\n".join(lines)


def load_subnet(folder: str | Path, *, map_location: str = "cpu") -> torch.nn.Module:
    """Rebuild an extracted model from its folder alone (``model.safetensors`` carries the config).

    >>> # model = load_subnet("runs/extract-abc123"); model(torch.zeros(1, 1, 32, 32))
    """
    from supernet.checkpoint import load_tensors
    from supernet.model import StaticNet

    path = Path(folder) / "model.safetensors"
    tensors, meta = load_tensors(path, what="model")
    if "subnet" not in meta:
        raise FileFormatError(f"{path} carries no subnet config in its metadata")
    sub = SubnetFile.from_dict(meta["subnet"], source=str(path))
    model = StaticNet(sub.arch, sub.specs(), resolution=sub.resolution)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise FileFormatError(f"{path}: weights do not fit the config ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected tensors)")
    return model.to(map_location).eval()
