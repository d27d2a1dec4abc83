"""A small ONNX interpreter in PyTorch: turns an ONNX graph into a differentiable ``torch.nn.Module``.

Float initializers become parameters and every other constant a buffer, so ``.to(device)`` moves the whole model;
nodes run in topological order with ``torch`` ops, so gradients flow to the inputs (and weights). The operator set
covers face-recognition encoders (MobileFaceNet, InsightFace ResNets); an unsupported operator is reported by
:func:`onnx_to_torch` before anything runs.

A graph exported with a fixed batch (say ``1 x 3 x 112 x 112``) often hard-codes that batch in its ``Reshape``
targets (``[1, -1]``); such a target is rewritten at run time to the actual batch, so the module accepts any batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import Tensor, nn

Inputs = list[Tensor | None]
OpFn = Callable[["_Node", Inputs], list[Tensor]]


@dataclass
class _Node:
    """One graph node, with attributes decoded to Python/numpy values."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    #: Reshape only: the target is a constant whose first entry is the graph's fixed batch.
    batch_fixup: int | None = None


# --------------------------------------------------------------------------------------------------- helpers


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda node, xs: [fn(xs[0])]  # type: ignore[arg-type]


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda node, xs: [fn(xs[0], xs[1])]  # type: ignore[arg-type]


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _spatial_pads(
    node: _Node, x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """ONNX ``pads`` (``[b1, b2, ..., e1, e2, ...]``) resolved from ``auto_pad`` for input ``x``."""
    nd = len(kernel)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(node.attrs.get("pads", [0] * (2 * nd)))
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX spatial pads ``[b1, b2, e1, e2]`` -> ``F.pad`` order ``(b_last, e_last, ..., b1, e1)``."""
    nd = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[i + nd]]
    return out


def _conv_fn(nd: int) -> Callable[..., Tensor]:
    fns = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    if nd not in fns:
        raise NotImplementedError(f"Conv over {nd} spatial dimensions")
    return fns[nd]


# --------------------------------------------------------------------------------------------------- operators


def _op_conv(node: _Node, xs: Inputs) -> list[Tensor]:
    x, w, b = xs[0], xs[1], xs[2] if len(xs) > 2 else None
    assert x is not None and w is not None
    nd = w.dim() - 2
    kernel = node.attrs.get("kernel_shape", list(w.shape[2:]))
    strides = node.attrs.get("strides", [1] * nd)
    dilations = node.attrs.get("dilations", [1] * nd)
    pads = _spatial_pads(node, x, kernel, strides, dilations)
    padding: Sequence[int] | int = pads[:nd]
    if pads[:nd] != pads[nd:]:
        x = F.pad(x, _torch_pad(pads))
        padding = 0
    return [_conv_fn(nd)(x, w, b, strides, padding, dilations, node.attrs.get("group", 1))]


def _op_clip(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    if node.opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
    else:
        lo = xs[1] if len(xs) > 1 else None
        hi = xs[2] if len(xs) > 2 else None
    return [x if lo is None and hi is None else torch.clamp(x, lo, hi)]


def _op_reshape(node: _Node, xs: Inputs) -> list[Tensor]:
    x, shape_t = xs[0], xs[1]
    assert x is not None
    shape = _ints(shape_t)
    if node.batch_fixup is not None and shape and shape[0] == node.batch_fixup and x.shape[0] != shape[0]:
        shape[0] = x.shape[0]
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _op_batchnorm(node: _Node, xs: Inputs) -> list[Tensor]:
    x, scale, bias, mean, var = xs[:5]
    assert x is not None and scale is not None and bias is not None and mean is not None and var is not None
    # Written out rather than F.batch_norm, which refuses running statistics that require grad.
    shape = (1, -1) + (1,) * (x.dim() - 2)
    factor = scale / torch.sqrt(var + node.attrs.get("epsilon", 1e-5))
    return [(x - mean.reshape(shape)) * factor.reshape(shape) + bias.reshape(shape)]


def _op_prelu(node: _Node, xs: Inputs) -> list[Tensor]:
    x, slope = xs[0], xs[1]
    assert x is not None and slope is not None
    return [torch.where(x >= 0, x, x * slope)]


def _op_leaky_relu(node: _Node, xs: Inputs) -> list[Tensor]:
    return [F.leaky_relu(xs[0], node.attrs.get("alpha", 0.01))]  # type: ignore[arg-type]


def _op_flatten(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    axis = _axis(node.attrs.get("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


def _op_gemm(node: _Node, xs: Inputs) -> list[Tensor]:
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    assert a is not None and b is not None
    if node.attrs.get("transA", 0):
        a = a.t()
    if node.attrs.get("transB", 0):
        b = b.t()
    y = (a @ b) * node.attrs.get("alpha", 1.0)
    if c is not None:
        y = y + c * node.attrs.get("beta", 1.0)
    return [y]


def _op_global_avg_pool(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


def _pool_setup(node: _Node, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(node.attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(node.attrs.get("strides", [1] * nd))
    dilations = list(node.attrs.get("dilations", [1] * nd))
    return kernel, strides, dilations, _spatial_pads(node, x, kernel, strides, dilations)


def _op_avg_pool(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    kernel, strides, _, pads = _pool_setup(node, x)
    nd = len(kernel)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    ceil = bool(node.attrs.get("ceil_mode", 0))
    if not any(pads):
        return [pool(x, kernel, strides, 0, ceil)]
    padded = F.pad(x, _torch_pad(pads))
    total = pool(padded, kernel, strides, 0, ceil)
    if node.attrs.get("count_include_pad", 0):
        return [total]
    # Exclude padding from the average: divide by the share of real (unpadded) pixels in each window.
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
    return [total / pool(ones, kernel, strides, 0, ceil)]


def _op_max_pool(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    kernel, strides, dilations, pads = _pool_setup(node, x)
    nd = len(kernel)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    ceil = bool(node.attrs.get("ceil_mode", 0))
    padding: list[int] | int = pads[:nd]
    if pads[:nd] != pads[nd:] or any(2 * p > k for p, k in zip(pads[:nd], kernel)):
        x = F.pad(x, _torch_pad(pads), value=-math.inf)
        padding = 0
    return [pool(x, kernel, strides, padding, dilations, ceil)]


def _op_transpose(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    perm = node.attrs.get("perm", list(reversed(range(x.dim()))))
    return [x.permute(*perm)]


def _op_shape(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    dims = list(x.shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)]


def _op_gather(node: _Node, xs: Inputs) -> list[Tensor]:
    x, idx = xs[0], xs[1]
    assert x is not None and idx is not None
    axis = _axis(node.attrs.get("axis", 0), x.dim())
    idx = idx.to(torch.int64) % x.shape[axis]
    flat = x.index_select(axis, idx.reshape(-1))
    return [flat.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))]


def _axes_arg(node: _Node, xs: Inputs, since: int) -> list[int] | None:
    """Axes from the attribute (opset < ``since``) or the optional second input."""
    if node.opset < since:
        axes = node.attrs.get("axes")
        return None if axes is None else list(axes)
    return _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else None


def _op_unsqueeze(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    axes = _axes_arg(node, xs, 13) or []
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


def _op_squeeze(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    axes = _axes_arg(node, xs, 13)
    if axes is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(_axis(a, x.dim()) for a in axes))]


def _op_concat(node: _Node, xs: Inputs) -> list[Tensor]:
    parts = [t for t in xs if t is not None]
    return [torch.cat(parts, dim=node.attrs["axis"])]


def _op_pad(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    mode = node.attrs.get("mode", "constant")
    if node.opset < 11:
        pads, value = list(node.attrs.get("pads", [])), float(node.attrs.get("value", 0.0))
        axes = list(range(x.dim()))
    else:
        pads = _ints(xs[1])
        value = float(xs[2].item()) if len(xs) > 2 and xs[2] is not None and xs[2].numel() else 0.0
        given = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(x.dim()))
        axes = [_axis(a, x.dim()) for a in given]
    n = len(axes)
    full = [0] * (2 * x.dim())
    for i, a in enumerate(axes):
        full[a], full[a + x.dim()] = pads[i], pads[i + n]
    # F.pad lists pads from the last dimension backwards; drop leading dimensions that are not padded.
    first = next((d for d in range(x.dim()) if full[d] or full[d + x.dim()]), x.dim())
    spec: list[int] = []
    for d in reversed(range(first, x.dim())):
        spec += [full[d], full[d + x.dim()]]
    if not spec:
        return [x]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise NotImplementedError(f"Pad mode {mode!r}")
    if torch_mode == "constant":
        return [F.pad(x, spec, value=value)]
    return [F.pad(x, spec, mode=torch_mode)]


def _op_reduce_mean(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    axes = _axes_arg(node, xs, 18)
    keep = bool(node.attrs.get("keepdims", 1))
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.dim()))
    return [x.mean(dim=tuple(_axis(a, x.dim()) for a in axes), keepdim=keep)]


def _op_dropout(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    return [x, torch.ones_like(x, dtype=torch.bool)]


def _op_cast(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    np_dtype = helper.tensor_dtype_to_np_dtype(node.attrs["to"])
    return [x.to(torch.from_numpy(np.empty(0, np_dtype)).dtype)]


def _op_softmax(node: _Node, xs: Inputs) -> list[Tensor]:
    x = xs[0]
    assert x is not None
    if node.opset >= 13:
        return [torch.softmax(x, dim=node.attrs.get("axis", -1))]
    axis = _axis(node.attrs.get("axis", 1), x.dim())  # opset < 13: softmax over the flattened tail
    return [torch.softmax(x.flatten(axis), dim=axis).reshape(x.shape)]


OPS: dict[str, OpFn] = {
    "Add": _binary(torch.add),
    "AveragePool": _op_avg_pool,
    "BatchNormalization": _op_batchnorm,
    "Cast": _op_cast,
    "Clip": _op_clip,
    "Concat": _op_concat,
    "Conv": _op_conv,
    "Div": _binary(_div),
    "Dropout": _op_dropout,
    "Flatten": _op_flatten,
    "Gather": _op_gather,
    "Gemm": _op_gemm,
    "GlobalAveragePool": _op_global_avg_pool,
    "Identity": _unary(lambda x: x),
    "LeakyRelu": _op_leaky_relu,
    "MatMul": _binary(torch.matmul),
    "MaxPool": _op_max_pool,
    "Mul": _binary(torch.mul),
    "Neg": _unary(torch.neg),
    "Pad": _op_pad,
    "PRelu": _op_prelu,
    "ReduceMean": _op_reduce_mean,
    "Relu": _unary(torch.relu),
    "Reshape": _op_reshape,
    "Shape": _op_shape,
    "Sigmoid": _unary(torch.sigmoid),
    "Softmax": _op_softmax,
    "Sqrt": _unary(torch.sqrt),
    "Squeeze": _op_squeeze,
    "Sub": _binary(torch.sub),
    "Tanh": _unary(torch.tanh),
    "Transpose": _op_transpose,
    "Unsqueeze": _op_unsqueeze,
}

#: Operators :func:`onnx_to_torch` converts (``Constant`` nodes become buffers at conversion).
SUPPORTED_OPS = frozenset(OPS) | {"Constant"}


# --------------------------------------------------------------------------------------------------- module


def _attr_value(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, bytes):
        return value.decode()
    return value


def _constant_array(node: onnx.NodeProto) -> np.ndarray:
    """The value of a ``Constant`` node."""
    attr = node.attribute[0]
    kinds = {
        "value": lambda: numpy_helper.to_array(attr.t),
        "value_float": lambda: np.asarray(attr.f, np.float32),
        "value_floats": lambda: np.asarray(list(attr.floats), np.float32),
        "value_int": lambda: np.asarray(attr.i, np.int64),
        "value_ints": lambda: np.asarray(list(attr.ints), np.int64),
    }
    if attr.name not in kinds:
        raise NotImplementedError(f"Constant node {node.name!r} with attribute {attr.name!r}")
    return kinds[attr.name]()


def _fixed_batch(value_info: onnx.ValueInfoProto) -> int | None:
    dims = value_info.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return int(dims[0].dim_value)
    return None


def _topological(nodes: Sequence[onnx.NodeProto], ready: set[str]) -> list[onnx.NodeProto]:
    """Nodes ordered so that every input is produced before use (ONNX files are usually sorted already)."""
    known = set(ready) | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        left = [n for n in pending if not all(i in known for i in n.input)]
        now = [n for n in pending if all(i in known for i in n.input)]
        if not now:
            missing = sorted({i for n in left for i in n.input if i not in known})
            raise ValueError(f"ONNX graph has a cycle or undefined inputs: {missing[:5]}")
        for n in now:
            ordered.append(n)
            known.update(n.output)
        pending = left
    return ordered


class OnnxModule(nn.Module):
    """An ONNX graph executed with torch ops; ``forward(*graph_inputs)`` returns one tensor or a tuple."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        unsupported = sorted(
            {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in graph.node}
            - SUPPORTED_OPS
        )
        if unsupported:
            raise NotImplementedError(f"ONNX operators not supported by onnx_to_torch: {', '.join(unsupported)}")

        self._slots: dict[str, str] = {}  # ONNX value name -> attribute name of its parameter/buffer
        for init in graph.initializer:
            self._add_constant(init.name, numpy_helper.to_array(init))
        constants = [n for n in graph.node if n.op_type == "Constant"]
        for node in constants:
            self._add_constant(node.output[0], _constant_array(node))

        self.input_names = [i.name for i in graph.input if i.name not in self._slots]
        self.output_names = [o.name for o in graph.output]
        fixed = {i.name: _fixed_batch(i) for i in graph.input if i.name in self.input_names}

        # Values that depend on a graph input (and so carry its batch); the rest are constant.
        dynamic = set(self.input_names)
        batch = next((b for b in fixed.values() if b is not None), None)
        self._nodes: list[_Node] = []
        for proto in _topological([n for n in graph.node if n.op_type != "Constant"], set(self._slots) | dynamic):
            node = _Node(
                op_type=proto.op_type,
                name=proto.name,
                inputs=list(proto.input),
                outputs=list(proto.output),
                attrs={a.name: _attr_value(a) for a in proto.attribute},
                opset=opset,
            )
            self._check(node)
            if (
                node.op_type == "Reshape"
                and batch is not None
                and node.inputs[0] in dynamic
                and node.inputs[1] in self._slots
            ):
                node.batch_fixup = batch
            if any(i in dynamic for i in node.inputs):
                dynamic.update(node.outputs)
            self._nodes.append(node)

    def _add_constant(self, name: str, array: np.ndarray) -> None:
        slot = f"c{len(self._slots)}"
        tensor = torch.from_numpy(np.array(array, copy=True))
        if tensor.is_floating_point():
            self.register_parameter(slot, nn.Parameter(tensor))
        else:
            self.register_buffer(slot, tensor)
        self._slots[name] = slot

    @staticmethod
    def _check(node: _Node) -> None:
        """Reject at conversion the variants of supported operators that are not implemented."""
        where = f"{node.op_type} node {node.name!r}"
        if node.op_type == "MaxPool" and len([o for o in node.outputs if o]) > 1:
            raise NotImplementedError(f"{where}: the Indices output")
        if node.op_type == "BatchNormalization" and node.attrs.get("training_mode", 0):
            raise NotImplementedError(f"{where}: training_mode=1")
        if node.op_type == "Pad" and node.attrs.get("mode", "constant") not in ("constant", "reflect", "edge"):
            raise NotImplementedError(f"{where}: mode {node.attrs['mode']!r}")

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(inputs)}"
            )
        values: dict[str, Tensor] = {name: getattr(self, slot) for name, slot in self._slots.items()}
        values.update(zip(self.input_names, inputs))
        for node in self._nodes:
            args = [values[i] if i else None for i in node.inputs]
            outs = OPS[node.op_type](node, args)
            for name, out in zip(node.outputs, outs):
                if name:
                    values[name] = out
        results = tuple(values[n] for n in self.output_names)
        return results[0] if len(results) == 1 else results


def onnx_to_torch(model: str | os.PathLike[str] | onnx.ModelProto) -> OnnxModule:
    """Convert an ONNX model (a path or a loaded ``ModelProto``) to an :class:`OnnxModule` in eval mode.

    Raises NotImplementedError naming every operator (or operator variant) that is not supported.
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    return OnnxModule(proto).eval()
