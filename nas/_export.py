"""The files and figures of an extracted model: exports with parity checks, latency, model card."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from search_spaces import format_resolution
from search_spaces.errors import NasUserError
from search_spaces.subnet_file import SubnetFile

if TYPE_CHECKING:
    from supernet.model import StaticNet
    from supernet.run import SupernetRun

__all__ = ["export_formats", "measure_latencies", "model_card", "MEASURE_ROUNDS"]

logger = logging.getLogger(__name__)

MEASURE_ROUNDS = 3


def _outputs(model: StaticNet, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    return [t.numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]


def export_formats(model: StaticNet, sub: SubnetFile, metrics: dict[str, Any], formats: tuple[str, ...], out: Path,
                   *, onnx_atol: float) -> dict[str, Path]:
    """Write ``model`` in each of ``formats`` into ``out``; ONNX is checked against torch in ONNX Runtime.

    Raises:
        RuntimeError: ONNX Runtime's outputs differ from torch's by more than ``onnx_atol``.
    """
    files: dict[str, Path] = {}
    shape = (1, sub.in_chans, *sub.hw)
    if "safetensors" in formats:
        from supernet.checkpoint import save_tensors

        record = SubnetFile(sub.arch, sub.resolution, sub.num_classes, sub.in_chans, sub.distillation,
                            {**sub.metrics, **metrics}, sub.provenance, sub.task)
        files["model.safetensors"] = save_tensors(out / "model.safetensors", dict(model.state_dict()),
                                                  {"subnet": record.to_dict()})
    if "onnx" in formats:
        import onnxruntime as ort

        from latency.runtime import export_onnx

        export_onnx(model, shape, out / "model.onnx", outputs=1 if model.has_head else len(model.out_indices))
        sample = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: sample.numpy()})
        want = _outputs(model, sample)
        if len(got) != len(want):
            raise RuntimeError(f"model.onnx has {len(got)} outputs, the model {len(want)}")
        metrics["onnx_max_abs"] = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        if not metrics["onnx_max_abs"] <= onnx_atol:
            raise RuntimeError(f"ONNX Runtime output differs from torch by {metrics['onnx_max_abs']:.3g}")
        files["model.onnx"] = out / "model.onnx"
    if "coreml" in formats:
        from latency.runtime import convert_coreml, coreml_predict_available

        t0 = time.perf_counter()
        files["model.mlpackage"] = convert_coreml(model, shape, out / "model.mlpackage")
        metrics["coreml_convert_seconds"] = time.perf_counter() - t0
        metrics["coreml_prediction"] = ("available (macOS)" if coreml_predict_available() else
                                        "not run: CoreML prediction needs macOS; the .mlpackage converted here")
    return files


def _lut_paths(sub: SubnetFile) -> dict[str, Path]:
    from latency.lut import default_lut_path

    luts = {d: Path(v["path"]) for d, v in sub.provenance.get("luts", {}).items()}
    local = default_lut_path("local-cpu", sub.hw, task=sub.task)
    if "local-cpu" not in luts and local.is_file():
        luts["local-cpu"] = local
    return luts


def measure_latencies(model: StaticNet, sub: SubnetFile, run: SupernetRun) -> dict[str, Any]:
    """Measured local-cpu latency (ORT, 1 thread) next to every LUT prediction available."""
    from latency import LatencyTable, predict_latency
    from latency.profiles import get_profile
    from latency.runtime import measure_module

    out: dict[str, Any] = {}
    # As the LUT validation times whole networks: a few rounds, the quietest (lowest median) counts, so
    # a burst of other work on a shared machine does not decide the figure.
    shape = (1, sub.in_chans, *sub.hw)
    profile = get_profile("local-cpu")
    stats = min((measure_module(model, shape, profile) for _ in range(MEASURE_ROUNDS)), key=lambda st: st.median_ms)
    out["local-cpu"] = {"measured": stats.median_ms, "measured_median": stats.median_ms, "measured_min": stats.min_ms,
                        "iqr": stats.iqr_ms, "statistic": "median",
                        "source": f"measured (ORT, 1 thread, best of {MEASURE_ROUNDS} rounds)"}
    for device, path in _lut_paths(sub).items():
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
        entry["lut_source"] = getattr(lut, "source_label", "predicted" if lut.predicted else "measured-lut")
        if "measured" in entry:  # compare like with like: the statistic the LUT sums
            entry["statistic"] = lut.statistic
            entry["measured"] = entry["measured_min"] if lut.statistic == "min" else entry["measured_median"]
            entry["measured_over_lut"] = entry["measured"] / value
    return out


def model_card(sub: SubnetFile, metrics: dict[str, Any], files: dict[str, Path], subnet_path: Any) -> str:
    """The extracted model's ``model.md``."""
    task = "classifier" if sub.task == "classify" else "backbone (one feature map per stage, no classifier head)"
    lines = [f"# Subnet {sub.arch.hash}", "",
             f"Family `{sub.arch.family}`, input {sub.in_chans}x{format_resolution(sub.hw)}, {sub.num_classes} "
             f"classes; deployed as a {task}.", "", f"Architecture: `{sub.arch.to_string()}`", "",
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
    lines += ["", "Accuracies are top-1 fractions of the classifier at the supernet's input size; `val` is the "
              "held-out validation split, `test` the test split.",
              "", "## Reproduce", "", "```", f"nas-extract {subnet_path}", "```", "",
              "Load it anywhere with `from nas.extract import load_subnet; model = load_subnet('<this folder>')`.",
              "", "Files: " + ", ".join(sorted(files)), ""]
    if str(metrics.get("coreml_prediction", "")).startswith("not run"):
        lines += [f"Note: {metrics['coreml_prediction']}.", ""]
    return "\n".join(lines)
