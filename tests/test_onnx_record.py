"""The recorded ONNX graphs of blocks (latency.onnx_record) against the torch modules and the TorchScript exporter.

For every block kind of every space, the first and last spec of the kind (and the first of the
backbone lowering, on a non-square map): the recorded graph must compute what the module computes
(random weights and BatchNorm statistics, so that folding is exercised), and ONNX Runtime must
optimize it to the same operators, with the same weight shapes, as the graph the TorchScript
exporter writes. That is what makes a LUT built from recorded graphs time the same kernels.
"""
from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from latency._private import entry_item, onnx_bytes
from latency.onnx_record import Unsupported, record_onnx
from latency.runtime import export_onnx, ort_session
from latency.specs import lut_specs
from search_spaces import get_space, list_spaces
from supernet.blocks import build_block

CLASSIFY, BACKBONE = dict(resolution=32), dict(resolution="64x96", task="backbone")
# The full V1 space has its demo's kinds, and enumerating it costs seconds at collection.
SETUPS = {"efficientformer_demo": [CLASSIFY, BACKBONE], "efficientformer_v2_demo": [CLASSIFY, BACKBONE],
          "efficientformer_v2": [CLASSIFY], "efficientvit": [CLASSIFY, BACKBONE]}


def _cases() -> list:
    cases = {}
    for name, setups in SETUPS.items():
        space = get_space(name)
        for setup in setups:
            by_kind = collections.defaultdict(list)
            for spec in lut_specs(space, **setup):
                by_kind[spec.kind].append(spec)
            for specs in by_kind.values():  # the backbone lowering adds non-square maps: one spec per kind
                for spec in (specs[0], specs[-1]) if setup is CLASSIFY else specs[:1]:
                    cases.setdefault(spec.key, spec)
    return list(cases.values())


CASES = _cases()


def _randomize(module: nn.Module) -> None:
    """Weights far from their initial values: BatchNorm statistics, layer scales and attention biases."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-1, 1, generator=g)
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1] in ("ls1", "ls2", "attention_biases"):
                p.uniform_(-1, 1, generator=g)


def _optimized(data: bytes, tmp_path, tag: str) -> tuple[object, onnx.ModelProto]:
    path = tmp_path / f"{tag}.onnx"
    session = ort_session(data, threads=1, graph_optimization="all", save_optimized=path)
    return session, onnx.load(path)


def _signature(model: onnx.ModelProto) -> tuple[collections.Counter, collections.Counter]:
    ops = collections.Counter(n.op_type for n in model.graph.node)
    shapes = collections.Counter(tuple(i.dims) for i in model.graph.initializer if len(i.dims) > 1)
    return ops, shapes


def test_cases_cover_every_kind_of_every_family():
    families = {get_space(name).family for name in list_spaces()}
    assert families == {get_space(name).family for name in SETUPS}
    assert {spec.kind for spec in CASES} == {spec.kind for name in SETUPS for spec in lut_specs(get_space(name), **CLASSIFY)}
    assert len(CASES) >= 30


@pytest.mark.parametrize("spec", CASES, ids=lambda s: s.key)
def test_recorded_graph_matches_module_and_exporter(spec, tmp_path):
    item = entry_item(spec, 1)
    module = build_block(spec).eval()
    _randomize(module)
    recorded = onnx_bytes(item, module)
    model = onnx.load_model_from_string(recorded)
    assert model.producer_name == "nas-toolkit", "the block fell back to the TorchScript exporter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export_onnx(module, item.input_shape, check=False)

    x = torch.randn(item.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(x).numpy()
    session, opt_recorded = _optimized(recorded, tmp_path, "recorded")
    got = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())

    _, opt_exported = _optimized(exported, tmp_path, "exported")
    assert _signature(opt_recorded) == _signature(opt_exported)


class _SharedConvOutput(nn.Module):
    """A BatchNorm whose convolution's output is used again: it must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) * 0.5 + y


def test_batch_norm_not_folded_into_a_shared_convolution():
    module = _SharedConvOutput().eval()
    _randomize(module)
    data = record_onnx(module, (1, 4, 6, 6))
    assert [n.op_type for n in onnx.load_model_from_string(data).graph.node].count("BatchNormalization") == 1
    x = torch.randn(1, 4, 6, 6)
    got = ort_session(data, threads=1).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-5, atol=1e-5)


class _Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) + 1


class _ReadsValues(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.sum())


class _ImplicitSoftmax(nn.Module):
    """Arguments the softmax lowering does not expect (no ``dim``): a refusal, not a crash."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.nn.functional.softmax(x + 1)


@pytest.mark.parametrize("module", [_Sine(), _ReadsValues(), nn.ReLU(inplace=True), nn.Identity(),
                                    _ImplicitSoftmax()],
                         ids=["no-lowering", "reads-values", "in-place", "returns-input", "unexpected-arguments"])
def test_unsupported_forward_is_refused(module):
    with pytest.raises(Unsupported):
        record_onnx(module.eval(), (1, 3, 4, 4))


def test_unsupported_block_falls_back_to_the_exporter():
    item = entry_item(CASES[0], 1)  # any entry item; the module is what matters
    data = onnx_bytes(item.__class__("entry", "sine", (1, 3, 4, 4)), _Sine().eval())
    model = onnx.load_model_from_string(data)
    assert model.producer_name == "pytorch"
    x = np.zeros((1, 3, 4, 4), np.float32)
    np.testing.assert_allclose(ort_session(data, threads=1).run(None, {"input": x})[0], np.ones_like(x))
