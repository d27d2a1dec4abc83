"""onnx_to_torch: synthetic graphs against onnxruntime, and MobileFaceNet on real LFW crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from advface.encoders.onnx_encoder import OnnxEncoder
from advface.encoders.onnx_torch import SUPPORTED_OPS, onnx_to_torch
from advface.images import load_image

RNG = np.random.default_rng(0)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _rand(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _ort_run(model: onnx.ModelProto, *xs: np.ndarray) -> list[np.ndarray]:
    """Run with onnxruntime; row by row when the graph declares a fixed batch of 1."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if session.get_inputs()[0].shape[0] == 1 and len(xs[0]) > 1:
        rows = [session.run(None, dict(zip(names, [x[i : i + 1] for x in xs]))) for i in range(len(xs[0]))]
        return [np.concatenate(parts) for parts in zip(*rows)]
    return session.run(None, dict(zip(names, xs)))


def _agree(model: onnx.ModelProto, *xs: np.ndarray, atol: float = 1e-5) -> torch.nn.Module:
    module = onnx_to_torch(model)
    expected = _ort_run(model, *xs)
    with torch.no_grad():
        got = module(*(torch.from_numpy(x) for x in xs))
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert tuple(g.shape) == e.shape
        np.testing.assert_allclose(g.numpy(), e, atol=atol, rtol=1e-4)
    return module


def _conv_net(batch: int | str) -> onnx.ModelProto:
    """A small CNN with the layer types of InsightFace ResNets, ending in a Reshape to ``[1, -1]`` when batch is 1."""
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mu", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("PRelu", ["bn", "slope"], ["pr"]),
        helper.make_node("MaxPool", ["pr"], ["mp"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["mp", "wd"], ["dw"], group=c, kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        helper.make_node("Clip", ["dw", "lo", "hi"], ["clip"]),
        # A constant reshaped with a leading 1: must not be touched by the batch rewrite.
        helper.make_node("Reshape", ["scale", "scale_shape"], ["scale4"]),
        helper.make_node("Mul", ["clip", "scale4"], ["scaled"]),
        helper.make_node("AveragePool", ["scaled"], ["ap"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("LeakyRelu", ["ap"], ["lr"], alpha=0.2),
        helper.make_node("Add", ["lr", "ap"], ["res"]),
        helper.make_node("Conv", ["res", "w2"], ["c2"], kernel_shape=[1, 1], pads=[0, 1, 1, 0]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], transB=1, alpha=0.5),
        helper.make_node("BatchNormalization", ["fc", "g6", "beta6", "mu6", "var6"], ["feat"]),
        helper.make_node("Sigmoid", ["feat"], ["sig"]),
        helper.make_node("Sub", ["sig", "half"], ["centred"]),
        helper.make_node("Constant", [], ["out_shape"], value=numpy_helper.from_array(np.array([1, -1], np.int64))),
        helper.make_node("Reshape", ["centred", "out_shape"], ["y"]),
    ]
    inits = [
        _init("w1", _rand(c, 3, 3, 3)),
        _init("b1", _rand(c)),
        _init("g", 1 + _rand(c)),
        _init("beta", _rand(c)),
        _init("mu", _rand(c)),
        _init("var", 0.5 + np.abs(_rand(c))),
        _init("slope", np.abs(_rand(c, 1, 1))),
        _init("wd", _rand(c, 1, 3, 3)),
        _init("lo", np.array(0.0, np.float32)),
        _init("hi", np.array(6.0, np.float32)),
        _init("scale", 1 + _rand(c)),
        _init("scale_shape", np.array([1, c, 1, 1], np.int64)),
        _init("w2", _rand(6, c, 1, 1)),
        _init("fc_w", _rand(5, 6)),
        _init("fc_b", _rand(5)),
        _init("g6", 1 + _rand(5)),
        _init("beta6", _rand(5)),
        _init("mu6", _rand(5)),
        _init("var6", 1 + np.abs(_rand(5))),
        _init("half", np.array([0.5], np.float32)),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 15, 15])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])
    return _model(nodes, [x], [y], inits)


def test_conv_net_fixed_batch_one_runs_with_batch_four() -> None:
    model = _conv_net(1)
    x = _rand(4, 3, 15, 15, scale=1.0)
    module = _agree(model, x)
    assert module(torch.from_numpy(x[:1])).shape == (1, 5)


def test_conv_net_dynamic_batch_and_gradients() -> None:
    model = _conv_net("N")
    x = _rand(3, 3, 15, 15, scale=1.0)
    module = _agree(model, x)
    xt = torch.from_numpy(x).requires_grad_()
    module(xt).square().sum().backward()
    assert xt.grad is not None and torch.isfinite(xt.grad).all() and xt.grad.abs().sum() > 0
    weights = dict(module.named_parameters())
    assert all(p.grad is not None for p in weights.values() if p.dim() == 4)


def test_shape_ops_dynamic_batch() -> None:
    """Shape/Gather/Unsqueeze/Concat-built reshape targets, Transpose, MatMul, Div, Pad, ReduceMean, Squeeze."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Div", ["mm", "two"], ["half"]),
        helper.make_node("Dropout", ["half"], ["drop"]),
        helper.make_node("Identity", ["drop"], ["ident"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]),
        helper.make_node("Pad", ["xt", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Pad", ["padded", "pads2", "padval"], ["padded2"], mode="constant"),
        helper.make_node("ReduceMean", ["padded2"], ["rm"], axes=[1, 2], keepdims=1),
        helper.make_node("Squeeze", ["rm", "axes12"], ["sq"]),
        helper.make_node("Gather", ["sq", "cols"], ["picked"], axis=1),
        helper.make_node("Concat", ["ident", "picked"], ["y"], axis=1),
    ]
    inits = [
        _init("zero", np.array(0, np.int64)),
        _init("axes0", np.array([0], np.int64)),
        _init("minus1", np.array([-1], np.int64)),
        _init("w", _rand(36, 3)),
        _init("two", np.array(2.0, np.float32)),
        _init("pads", np.array([0, 1, 1, 0, 0, 1, 0, 0], np.int64)),
        _init("pads2", np.array([0, 2, 0, 0, 0, 0, 1, 0], np.int64)),
        _init("padval", np.array(0.5, np.float32)),
        _init("axes12", np.array([1, 2], np.int64)),
        _init("cols", np.array([3, -1], np.int64)),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    _agree(_model(nodes, [x], [y], inits), _rand(5, 4, 3, 3, scale=1.0))


def test_opset_11_attribute_forms() -> None:
    """Squeeze/Unsqueeze/ReduceMean axes as attributes, Clip with inputs, Pad with inputs (opset 11)."""
    nodes = [
        helper.make_node("Unsqueeze", ["x"], ["u"], axes=[1]),
        helper.make_node("Squeeze", ["u"], ["s"], axes=[1]),
        helper.make_node("Clip", ["s", "", "hi"], ["c"]),
        helper.make_node("Pad", ["c", "pads"], ["p"]),
        helper.make_node("ReduceMean", ["p"], ["y"], axes=[-1], keepdims=0),
    ]
    inits = [_init("hi", np.array(0.3, np.float32)), _init("pads", np.array([0, 1, 0, 2], np.int64))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])
    _agree(_model(nodes, [x], [y], inits, opset=11), _rand(3, 6, scale=1.0))


def test_unsupported_op_fails_at_conversion() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Erf", ["r"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    with pytest.raises(NotImplementedError, match="Erf"):
        onnx_to_torch(_model(nodes, [x], [y], []))
    assert "Erf" not in SUPPORTED_OPS


def test_unsupported_variant_fails_at_conversion() -> None:
    nodes = [helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 3, 3])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1, 3, 3])
    with pytest.raises(NotImplementedError, match="Indices"):
        onnx_to_torch(_model(nodes, [x], [y, idx], []))


# ------------------------------------------------------------------------------------------------ real model


def _crop(path: Path) -> np.ndarray:
    """A rough 112x112 face crop of a 250x250 LFW photo (no alignment)."""
    return np.asarray(Image.fromarray(load_image(path)[68:182, 68:182]).resize((112, 112), Image.BILINEAR))


@pytest.fixture(scope="module")
def mobilefacenet(models_dir: Path) -> OnnxEncoder:
    return OnnxEncoder(models_dir / "mobilefacenet_128d.onnx")


def test_mobilefacenet_conversion_matches_onnxruntime(mobilefacenet: OnnxEncoder, lfw_sample: list[Path]) -> None:
    chips = np.stack([_crop(p) for p in lfw_sample[:20]])
    expected = mobilefacenet.embed(chips)
    module = mobilefacenet.torch_module("cpu")
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).float().div(255.0).requires_grad_()
    got = module(x)  # one batch of 20
    assert got.shape == (20, 128)
    rel = np.abs(got.detach().numpy() - expected).max(axis=1) / np.linalg.norm(expected, axis=1)
    assert rel.max() <= 1e-4, rel.max()

    got.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(dim=1) > 0).all()
    assert not any(p.requires_grad for p in module.parameters())


def test_mobilefacenet_core_accepts_any_batch(models_dir: Path) -> None:
    path = models_dir / "mobilefacenet_128d.onnx"
    module = onnx_to_torch(path)
    proto = onnx.load(str(path))
    constants = len(proto.graph.initializer) + sum(n.op_type == "Constant" for n in proto.graph.node)
    assert len(module.state_dict()) == constants
    x = _rand(3, 3, 112, 112, scale=1.0)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    expected = _ort_run(proto, x)[0]
    assert got.shape == (3, 128)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.linalg.norm(expected, axis=1).min())
