"""A block's ONNX graph, recorded from one run of its own forward: the fast path of a LUT build.

The TorchScript exporter spends about 100 ms on one block at 224 px (tracing, its ONNX passes,
BatchNorm folding, shape inference), and a LUT of the full V2 space has 1,239 blocks. Here the
block's ``forward`` runs once, on the CPU, under a :class:`~torch.overrides.TorchFunctionMode`
that writes each torch call on a tensor computed from the input as the ONNX nodes the
TorchScript exporter writes for that call: opset 17, static shapes, calls on weights alone
folded into constants, BatchNorm folded into the convolution that feeds it. That takes about
15 ms.

It is a lowering of the very modules the rest of the toolkit runs, not a second description of
the blocks. A call it has no lowering for raises :class:`Unsupported`, and the caller falls back
to the TorchScript exporter. ``tests/test_onnx_record.py`` checks, for every block kind of every
space, that the recorded graph computes what the module computes and that ONNX Runtime
optimizes it to the same operators, with the same weight shapes, as the exported graph.
"""
from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch.overrides import TorchFunctionMode

__all__ = ["Unsupported", "record_onnx", "OPSET"]

OPSET = 17  # the TorchScript exporter's opset in latency.runtime.export_onnx
_IR_VERSION = 8


class Unsupported(Exception):
    """The block calls something the recorder does not lower; use the TorchScript exporter."""


class _Graph:
    """Nodes, initializers and the ONNX names of the live tensors (those computed from the input)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, torch.Tensor] = {}
        self.names: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # holds live tensors so that their ids stay theirs
        self.producer: dict[str, onnx.NodeProto] = {}
        self.counter = 0

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    def live(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.names

    def bind(self, t: torch.Tensor, name: str) -> None:
        self.names[id(t)] = name
        self.keep.append(t)

    def name(self, t: Any) -> str:
        """The ONNX name of ``t``: a live tensor's, or a new initializer for a constant (tensor or number)."""
        if self.live(t):
            return self.names[id(t)]
        if isinstance(t, bool) or not isinstance(t, (torch.Tensor, int, float)):
            raise Unsupported(f"operand of type {type(t).__name__}")
        value = t.detach() if isinstance(t, torch.Tensor) else torch.tensor(float(t))
        if value.dtype != torch.float32:
            raise Unsupported(f"constant of dtype {value.dtype}")
        return self.const(value)

    def const(self, value: torch.Tensor) -> str:
        name = self.fresh("const")
        self.inits[name] = value
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(torch.tensor(list(values), dtype=torch.int64))

    def op(self, op_type: str, inputs: Sequence[str], out: torch.Tensor | None = None, **attrs: Any) -> str:
        name = self.fresh(op_type.lower())
        node = helper.make_node(op_type, list(inputs), [name], name=f"n{self.counter}", **attrs)
        self.nodes.append(node)
        self.producer[name] = node
        if out is not None:
            self.bind(out, name)
        return name


# ------------------------------------------------------------------------------------- argument reading
def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, key: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def _pair(v: Any) -> list[int]:
    if isinstance(v, str):
        raise Unsupported(f"padding {v!r}")
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# ------------------------------------------------------------------------------------- op lowerings
Lowering = Callable[[_Graph, Any, tuple, dict], None]


def _conv2d(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x, w, b = args[0], _arg(args, kw, 1, "weight"), _arg(args, kw, 2, "bias")
    stride, pad = _pair(_arg(args, kw, 3, "stride", 1)), _pair(_arg(args, kw, 4, "padding", 0))
    dil, groups = _pair(_arg(args, kw, 5, "dilation", 1)), int(_arg(args, kw, 6, "groups", 1))
    if g.live(w) or g.live(b):
        raise Unsupported("a convolution with computed weights")
    inputs = [g.name(x), g.const(w.detach())] + ([g.const(b.detach())] if b is not None else [])
    g.op("Conv", inputs, out, kernel_shape=list(w.shape[2:]), strides=stride, pads=pad + pad,
         dilations=dil, group=groups)


def _batch_norm(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x = args[0]
    mean, var = _arg(args, kw, 1, "running_mean"), _arg(args, kw, 2, "running_var")
    weight, bias = _arg(args, kw, 3, "weight"), _arg(args, kw, 4, "bias")
    training, momentum, eps = _arg(args, kw, 5, "training", False), _arg(args, kw, 6, "momentum", 0.1), \
        float(_arg(args, kw, 7, "eps", 1e-5))
    if training or mean is None or var is None or any(g.live(t) for t in (mean, var, weight, bias)):
        raise Unsupported("batch norm in training mode or with computed statistics")
    c = x.shape[1]
    weight = torch.ones(c) if weight is None else weight.detach()
    bias = torch.zeros(c) if bias is None else bias.detach()
    g.op("BatchNormalization", [g.name(x), g.const(weight), g.const(bias), g.const(mean.detach()),
                                g.const(var.detach())], out, epsilon=eps, momentum=1.0 - float(momentum),
         training_mode=0)


def _fold_batch_norms(g: _Graph, output: str) -> None:
    """Fold each BatchNormalization into the convolution that feeds it and nothing else, as the exporter does."""
    consumers = collections.Counter(i for node in g.nodes for i in node.input)
    keep = []
    for node in g.nodes:
        conv = g.producer.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv" or consumers[node.input[0]] != 1 or node.input[0] == output:
            keep.append(node)
            continue
        gamma, beta, mean, var = (g.inits.pop(i) for i in node.input[1:5])
        eps = next(a.f for a in node.attribute if a.name == "epsilon")
        scale = gamma / torch.sqrt(var + eps)
        w = g.inits[conv.input[1]]
        b = g.inits[conv.input[2]] if len(conv.input) > 2 else torch.zeros_like(mean)
        g.inits[conv.input[1]] = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        if len(conv.input) > 2:
            g.inits[conv.input[2]] = (b - mean) * scale + beta
        else:
            conv.input.append(g.const((b - mean) * scale + beta))
        conv.output[0] = node.output[0]
    g.nodes[:] = keep


def _gelu(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    if _arg(args, kw, 1, "approximate", "none") != "none":
        raise Unsupported("tanh-approximated GELU")
    x = g.name(args[0])
    erf = g.op("Erf", [g.op("Div", [x, g.const(torch.tensor(math.sqrt(2.0)))])])
    g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, g.const(torch.tensor(1.0))])]), g.const(torch.tensor(0.5))], out)


def _unary(op_type: str) -> Lowering:
    def lower(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
        if _arg(args, kw, 1, "inplace", False):
            raise Unsupported(f"in-place {op_type}")
        g.op(op_type, [g.name(args[0])], out)
    return lower


def _binary(op_type: str, swap: bool = False) -> Lowering:
    def lower(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
        a, b = args[0], _arg(args, kw, 1, "other")
        if kw.get("alpha", 1) != 1:
            raise Unsupported(f"{op_type} with alpha")
        if swap:
            a, b = b, a
        g.op(op_type, [g.name(a), g.name(b)], out)
    return lower


def _alias(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    """Same numbers, same dtype (``float()`` of a float, ``contiguous``, dropout in eval)."""
    x = args[0]
    if isinstance(out, torch.Tensor) and (out.dtype != x.dtype or out.shape != x.shape):
        raise Unsupported("a cast to another dtype")
    if out is not x:
        g.bind(out, g.name(x))


def _dropout(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    if _arg(args, kw, 2, "training", True):
        raise Unsupported("dropout in training mode")
    _alias(g, out, args, kw)


def _reshape(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    g.op("Reshape", [g.name(args[0]), g.ints(out.shape)], out, allowzero=0)


def _flatten(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x = args[0]
    start, end = _dim(_arg(args, kw, 1, "start_dim", 0), x.dim()), _dim(_arg(args, kw, 2, "end_dim", -1), x.dim())
    if start == 1 and end == x.dim() - 1:
        g.op("Flatten", [g.name(x)], out, axis=1)
    else:
        _reshape(g, out, args, kw)


def _permute(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x = args[0]
    dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:] or kw["dims"]
    g.op("Transpose", [g.name(x)], out, perm=[_dim(int(d), x.dim()) for d in dims])


def _transpose(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x = args[0]
    a, b = _dim(_arg(args, kw, 1, "dim0"), x.dim()), _dim(_arg(args, kw, 2, "dim1"), x.dim())
    perm = list(range(x.dim()))
    perm[a], perm[b] = perm[b], perm[a]
    g.op("Transpose", [g.name(x)], out, perm=perm)


def _softmax(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x = args[0]
    if kw.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args[2:]):
        raise Unsupported("softmax with a dtype")
    g.op("Softmax", [g.name(x)], out, axis=_dim(int(_arg(args, kw, 1, "dim")), x.dim()))


def _slices(g: _Graph, x_name: str, ranges: list[tuple[int, int, int, int]], out: Any) -> None:
    """One Slice per sliced dimension ``(dim, start, end, step)``, as the exporter writes them."""
    for i, (d, start, end, step) in enumerate(ranges):
        x_name = g.op("Slice", [x_name, g.ints([start]), g.ints([end]), g.ints([d]), g.ints([step])],
                      out if i == len(ranges) - 1 else None)


def _getitem(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x, index = args[0], args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (x.dim() - len(index) + 1) + index[at + 1:]
    ranges = []
    for d, s in enumerate(index):
        if not isinstance(s, slice):
            raise Unsupported(f"indexing with {type(s).__name__}")
        start, stop, step = s.indices(x.shape[d])
        if (start, stop, step) != (0, x.shape[d], 1):
            ranges.append((d, start, stop, step))
    if not ranges:
        _alias(g, out, (x,), {})
        return
    _slices(g, g.name(x), ranges, out)


def _chunk(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x, dim = args[0], _dim(int(_arg(args, kw, 2, "dim", 0)), args[0].dim())
    start, src = 0, g.name(x)
    for part in out:  # the exporter slices each chunk
        size = part.shape[dim]
        _slices(g, src, [(dim, start, start + size, 1)], part)
        start += size


def _split(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x, dim = args[0], _dim(int(_arg(args, kw, 2, "dim", 0)), args[0].dim())
    names = [g.fresh("split") for _ in out]
    g.nodes.append(helper.make_node("Split", [g.name(x), g.ints([p.shape[dim] for p in out])], names,
                                    name=f"n{g.counter}", axis=dim))
    for part, name in zip(out, names):
        g.bind(part, name)


def _cat(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    tensors, dim = args[0], int(_arg(args, kw, 1, "dim", 0))
    g.op("Concat", [g.name(t) for t in tensors], out, axis=_dim(dim, out.dim()))


def _pad(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x, pad = args[0], list(_arg(args, kw, 1, "pad"))
    if _arg(args, kw, 2, "mode", "constant") != "constant":
        raise Unsupported("non-constant padding")
    value = _arg(args, kw, 3, "value", None)
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i in range(len(pad) // 2):
        begins[x.dim() - 1 - i], ends[x.dim() - 1 - i] = pad[2 * i], pad[2 * i + 1]
    g.op("Pad", [g.name(x), g.ints(begins + ends), g.const(torch.tensor(float(value or 0.0)))], out,
         mode="constant")


def _mean(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x, dims = args[0], _arg(args, kw, 1, "dim")
    if dims is None or kw.get("dtype") is not None:
        raise Unsupported("mean over all dimensions or with a dtype")
    dims = [dims] if isinstance(dims, int) else list(dims)
    g.op("ReduceMean", [g.name(x)], out, axes=[_dim(d, x.dim()) for d in dims],
         keepdims=int(bool(_arg(args, kw, 2, "keepdim", False))))


def _linear(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x, w, b = args[0], _arg(args, kw, 1, "weight"), _arg(args, kw, 2, "bias")
    if g.live(w) or g.live(b):
        raise Unsupported("a linear layer with computed weights")
    if x.dim() == 2 and b is not None:
        g.op("Gemm", [g.name(x), g.const(w.detach()), g.const(b.detach())], out, alpha=1.0, beta=1.0, transB=1)
        return
    y = g.op("MatMul", [g.name(x), g.const(w.detach().t())], None if b is not None else out)
    if b is not None:
        g.op("Add", [y, g.const(b.detach())], out)


def _layer_norm(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x, shape = args[0], list(_arg(args, kw, 1, "normalized_shape"))
    w, b, eps = _arg(args, kw, 2, "weight"), _arg(args, kw, 3, "bias"), float(_arg(args, kw, 4, "eps", 1e-5))
    w = torch.ones(shape) if w is None else w.detach()
    b = torch.zeros(shape) if b is None else b.detach()
    g.op("LayerNormalization", [g.name(x), g.const(w), g.const(b)], out, axis=-len(shape), epsilon=eps)


def _avg_pool2d(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x, k = args[0], _pair(_arg(args, kw, 1, "kernel_size"))
    stride = _arg(args, kw, 2, "stride", None)
    stride = k if stride in (None, []) else _pair(stride)
    pad = _pair(_arg(args, kw, 3, "padding", 0))
    if _arg(args, kw, 6, "divisor_override") is not None:
        raise Unsupported("avg_pool2d with divisor_override")
    g.op("AveragePool", [g.name(x)], out, kernel_shape=k, strides=stride, pads=pad + pad,
         ceil_mode=int(bool(_arg(args, kw, 4, "ceil_mode", False))),
         count_include_pad=int(bool(_arg(args, kw, 5, "count_include_pad", True))))


def _interpolate(g: _Graph, out: Any, args: tuple, kw: dict) -> None:
    x = args[0]
    mode, corners = _arg(args, kw, 3, "mode", "nearest"), _arg(args, kw, 4, "align_corners")
    if mode != "bilinear" or corners:
        raise Unsupported(f"interpolate mode {mode!r} (align_corners={corners})")
    scales = [1.0, 1.0] + [o / i for o, i in zip(out.shape[2:], x.shape[2:])]
    g.op("Resize", [g.name(x), "", g.const(torch.tensor(scales))], out, coordinate_transformation_mode="half_pixel",
         cubic_coeff_a=-0.75, mode="linear", nearest_mode="floor")


T = torch.Tensor
_LOWERINGS: dict[Any, Lowering] = {
    torch.conv2d: _conv2d, F.conv2d: _conv2d,
    F.batch_norm: _batch_norm,
    F.gelu: _gelu,
    F.relu: _unary("Relu"), torch.relu: _unary("Relu"), T.relu: _unary("Relu"),
    F.hardswish: _unary("HardSwish"),
    T.__add__: _binary("Add"), T.__radd__: _binary("Add"), T.add: _binary("Add"), torch.add: _binary("Add"),
    T.__sub__: _binary("Sub"), T.__rsub__: _binary("Sub", swap=True), T.sub: _binary("Sub"),
    T.__mul__: _binary("Mul"), T.__rmul__: _binary("Mul"), T.mul: _binary("Mul"), torch.mul: _binary("Mul"),
    T.__truediv__: _binary("Div"), T.__rtruediv__: _binary("Div", swap=True), T.div: _binary("Div"),
    T.__matmul__: _binary("MatMul"), T.matmul: _binary("MatMul"), torch.matmul: _binary("MatMul"),
    T.float: _alias, T.to: _alias, T.contiguous: _alias, F.dropout: _dropout,
    T.reshape: _reshape, T.view: _reshape, torch.reshape: _reshape, T.unflatten: _reshape,
    T.flatten: _flatten, torch.flatten: _flatten,
    T.permute: _permute, torch.permute: _permute, T.transpose: _transpose, torch.transpose: _transpose,
    T.softmax: _softmax, F.softmax: _softmax, torch.softmax: _softmax,
    T.__getitem__: _getitem, T.chunk: _chunk, torch.chunk: _chunk, T.split: _split, torch.split: _split,
    torch.cat: _cat, F.pad: _pad, T.mean: _mean, torch.mean: _mean,
    F.linear: _linear, F.layer_norm: _layer_norm, F.avg_pool2d: _avg_pool2d, F.interpolate: _interpolate,
}


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []


_DATA_DEPENDENT = {T.item, T.tolist, T.numpy, T.__bool__, T.__int__, T.__float__, T.__index__}


class _Recorder(TorchFunctionMode):
    """Writes each torch call on a live tensor as ONNX nodes; calls on constants alone run as they are."""

    def __init__(self, graph: _Graph) -> None:
        super().__init__()
        self.g = graph

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _DATA_DEPENDENT:
            raise Unsupported(f"a forward that reads tensor values ({func.__name__})")
        out = func(*args, **kwargs)
        if not any(self.g.live(t) for t in _tensors((args, kwargs))) or not _tensors(out):
            return out  # constant folding (the exporter folds these too), or a shape query
        name = getattr(func, "__qualname__", func)
        lower = _LOWERINGS.get(func)
        if lower is None:
            raise Unsupported(f"no ONNX lowering for {name!r}")
        try:
            lower(self.g, out, args, kwargs)
        except Unsupported:
            raise
        except Exception as exc:  # arguments a lowering does not expect: the exporter still can
            raise Unsupported(f"lowering {name!r} failed: {exc!r}") from exc
        return out


def record_onnx(module: torch.nn.Module, input_shape: Sequence[int]) -> bytes:
    """The ONNX model of ``module`` (eval mode, on the CPU) at ``input_shape``, with its weights.

    Opset 17, one input ``input`` and one output ``output``: the model that
    :func:`latency.runtime.export_onnx` writes for the module, with the same operators. The
    forward runs once on a random input, with one torch thread.

    Raises:
        Unsupported: the forward calls something without a lowering here, or does not return
            one tensor computed from its input; export with the TorchScript exporter instead.
    """
    from latency.runtime import torch_threads

    if module.training:
        raise Unsupported("a module in training mode")
    if any(p.device.type != "cpu" for p in module.parameters()):
        raise Unsupported("a module with weights off the CPU")
    g = _Graph()
    x = torch.randn(tuple(input_shape))
    g.bind(x, "input")
    with torch.no_grad(), torch_threads(1), _Recorder(g):
        y = module(x)
    if not isinstance(y, torch.Tensor) or not g.live(y) or g.names[id(y)] == "input":
        raise Unsupported("a forward that does not return one tensor computed from its input")
    last = g.names[id(y)]
    _fold_batch_norms(g, last)
    for node in g.nodes:
        node.input[:] = ["output" if i == last else i for i in node.input]
        node.output[:] = ["output" if o == last else o for o in node.output]
    graph = helper.make_graph(
        g.nodes, "block",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(y.shape))],
        initializer=[numpy_helper.from_array(v.detach().numpy(), name) for name, v in g.inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="nas-toolkit", ir_version=_IR_VERSION)
    return model.SerializeToString()
