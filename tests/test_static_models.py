"""Static models (``supernet.build_model``): forward, backward, ONNX export and CoreML conversion.

Cases: the smallest preset of each family at 64x64 with 10 classes (V1's bias table follows
the grid, so it lowers at any resolution; V2 needs an even stage-3 map, which 64 gives),
and the smallest and largest configs of each demo space at 32x32 on one input channel.
Everything runs for real on the CPU; CoreML conversion runs everywhere, only CoreML
prediction needs macOS.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from search_spaces import ArchConfig, BlockConfig, StageConfig, count_params, get_preset, get_space, lower
from supernet import StaticNet, build_model


def _lite_variant(arch: ArchConfig) -> ArchConfig:
    """``arch`` with every softmax-attention block switched to LiteMLA."""
    stages = [StageConfig(s.width, tuple(BlockConfig("lite" if b.mixer == "attn" else b.mixer, b.expansion)
                                         for b in s.blocks)) for s in arch.stages]
    return ArchConfig(arch.family, tuple(stages), arch.stem_stride, arch.head_widths, arch.head_dim)


def _cases() -> dict[str, tuple[ArchConfig, dict[str, int]]]:
    preset_kw = {"resolution": 64, "in_chans": 3, "num_classes": 10}
    demo_kw = {"resolution": 32, "in_chans": 1, "num_classes": 10}
    cases = {name: (get_preset(name), preset_kw)
             for name in ("efficientformer_l1", "efficientformerv2_s0", "efficientvit_b0")}
    for space_name in ("efficientformer_demo", "efficientformer_v2_demo"):
        space = get_space(space_name)
        cases[f"{space_name}-smallest"] = (space.smallest(), demo_kw)
        cases[f"{space_name}-largest"] = (space.largest(), demo_kw)
    # the largest demo V2 config uses softmax attention; cover the LiteMLA mixer of the V2 space too
    cases["efficientformer_v2_demo-largest-lite"] = (_lite_variant(get_space("efficientformer_v2_demo").largest()),
                                                     demo_kw)
    return cases


CASES = _cases()
COREML_CASES = ["efficientformer_l1", "efficientformerv2_s0", "efficientvit_b0"]


def make(case: str, seed: int = 0) -> tuple[StaticNet, torch.Tensor]:
    arch, kw = CASES[case]
    torch.manual_seed(seed)
    model = build_model(arch, **kw)
    x = torch.randn(2, kw["in_chans"], kw["resolution"], kw["resolution"])
    return model, x


@pytest.fixture(autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("case", CASES)
def test_forward_shape_and_finite(case: str) -> None:
    model, x = make(case)
    arch, kw = CASES[case]
    assert model.specs == lower(arch, **kw)
    assert sum(p.numel() for p in model.parameters()) == count_params(model.specs)
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, kw["num_classes"])
        assert torch.isfinite(y).all()
    # the batch dimension is free
    with torch.no_grad():
        assert model(x[:1]).shape == (1, kw["num_classes"])


@pytest.mark.parametrize("case", CASES)
def test_backward_reaches_every_parameter(case: str) -> None:
    model, x = make(case)
    model.train()
    y = model(x)
    loss = torch.nn.functional.cross_entropy(y, torch.arange(2) % y.shape[1])
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    zero = [n for n, p in model.named_parameters() if not p.grad.any()]
    assert not zero, f"all-zero gradient for {zero}"
    biases = [n for n, _ in model.named_parameters() if "attention_biases" in n]
    arch, _ = CASES[case]
    if any(b.mixer == "attn" for _, _, b in arch.blocks()):
        assert biases  # attention-bias tables exist and (above) received gradients


@pytest.mark.parametrize("case", CASES)
def test_onnx_export_matches_torch(case: str, tmp_path: Path) -> None:
    model, x = make(case)
    model.eval()
    path = tmp_path / "model.onnx"
    with torch.no_grad():
        ref = model(x).numpy()
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def _convert_coreml(model: StaticNet, x: torch.Tensor, path: Path) -> Path:
    """The shipped conversion (latency.runtime.convert_coreml: mlprogram, fp16, iOS16), as nas-extract uses it."""
    from latency.runtime import convert_coreml

    model.eval()
    return convert_coreml(model, tuple(x.shape), path)


@pytest.mark.parametrize("case", COREML_CASES)
def test_coreml_conversion_writes_an_mlpackage(case: str, tmp_path: Path) -> None:
    import coremltools as ct

    model, x = make(case)
    path = _convert_coreml(model, x[:1], tmp_path / f"{case}.mlpackage")
    assert path == tmp_path / f"{case}.mlpackage" and path.is_dir()
    assert (path / "Manifest.json").is_file()
    assert any(p.suffix == ".mlmodel" for p in path.rglob("*"))
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    (inp,), (out,) = spec.description.input, spec.description.output
    assert list(inp.type.multiArrayType.shape) == list(x[:1].shape)
    with torch.no_grad():
        assert list(out.type.multiArrayType.shape) == list(model(x[:1]).shape)


@pytest.mark.macos_only
@pytest.mark.parametrize("case", COREML_CASES)
def test_coreml_prediction_matches_torch(case: str, tmp_path: Path) -> None:
    import coremltools as ct

    model, x = make(case)
    x = x[:1]
    path = _convert_coreml(model, x, tmp_path / f"{case}.mlpackage")
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    mlmodel = ct.models.MLModel(str(path))
    fp16 = mlmodel.get_spec().description.input[0].type.multiArrayType.dataType == \
        ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16   # fp16 in and out (convert_coreml's default)
    out = mlmodel.predict({"input": x.numpy().astype(np.float16 if fp16 else np.float32)})["output"]
    out = np.asarray(out, dtype=np.float32)
    # FP16 compute: compare against the output scale
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-2 * max(1.0, float(np.abs(ref).max())))
