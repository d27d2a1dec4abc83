"""OnnxEncoder: MobileFaceNet on real LFW crops, batching modes, normalisation presets, errors, registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from advface.encoders import create_encoder, onnx_encoder, pair_scores
from advface.encoders.onnx_encoder import NORMALIZATIONS, OnnxEncoder, default_providers
from advface.errors import ConfigError
from advface.images import load_image


def _crop(path: Path) -> np.ndarray:
    """A rough 112x112 face crop of a 250x250 LFW photo (no alignment)."""
    return np.asarray(Image.fromarray(load_image(path)[68:182, 68:182]).resize((112, 112), Image.BILINEAR))


def _tiny_encoder_file(
    tmp_path: Path,
    name: str = "tiny.onnx",
    batch: int | str = "N",
    size: int = 8,
    channels: int = 3,
    sub_mul_head: bool = False,
) -> Path:
    """A small conv -> pool -> linear ONNX encoder (6-d output) saved under ``tmp_path``."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((5, channels, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "fc"),
    ]
    if sub_mul_head:  # MXNet-style graph that normalises its input itself
        nodes[0].input[0] = "xm"
        nodes = [helper.make_node("Sub", ["x", "m"], ["xs"]), helper.make_node("Mul", ["xs", "s"], ["xm"])] + nodes
        inits += [
            numpy_helper.from_array(np.array(127.5, np.float32), "m"),
            numpy_helper.from_array(np.array(1 / 128, np.float32), "s"),
        ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 6])
    model = helper.make_model(
        helper.make_graph(nodes, "tiny", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _chips(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mobilefacenet(models_dir: Path) -> OnnxEncoder:
    return OnnxEncoder(models_dir / "mobilefacenet_128d.onnx")


# ------------------------------------------------------------------------------------------------ real model


def test_mobilefacenet_metadata(mobilefacenet: OnnxEncoder) -> None:
    assert mobilefacenet.name == "onnx:mobilefacenet_128d.onnx"
    assert (mobilefacenet.dim, mobilefacenet.metric) == (128, "cosine")
    assert (mobilefacenet.chip.kind, mobilefacenet.chip.size) == ("arcface", 112)
    assert mobilefacenet.fixed_batch == 1
    assert mobilefacenet.normalization == "imagenet"
    assert mobilefacenet.fingerprint.startswith("onnx:") and mobilefacenet.fingerprint.endswith(":imagenet")
    assert "CPUExecutionProvider" in mobilefacenet.providers


def test_mobilefacenet_on_lfw_crops(mobilefacenet: OnnxEncoder, lfw_sample: list[Path]) -> None:
    chips = np.stack([_crop(p) for p in lfw_sample])  # 2 photos each of 30 people, in pairs
    vectors = mobilefacenet.embed(chips)
    assert vectors.shape == (len(chips), 128) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all() and (np.linalg.norm(vectors, axis=1) > 0).all()

    singles = np.concatenate([mobilefacenet.embed(c) for c in chips[:6]])
    np.testing.assert_allclose(vectors[:6], singles, atol=1e-5)

    first, second = vectors[0::2], vectors[1::2]
    same = pair_scores(first, second, "cosine")
    different = pair_scores(first, np.roll(second, 1, axis=0), "cosine")
    assert same.mean() > different.mean() + 0.1, (same.mean(), different.mean())


def test_mobilefacenet_rejects_wrong_chips(mobilefacenet: OnnxEncoder) -> None:
    from advface.errors import ImageError

    with pytest.raises(ImageError):
        mobilefacenet.embed(np.zeros((2, 150, 150, 3), np.uint8))


# ------------------------------------------------------------------------------------------------ batching


def test_dynamic_batch_runs_in_batches(tmp_path: Path) -> None:
    path = _tiny_encoder_file(tmp_path)
    encoder = OnnxEncoder(path, batch_size=3)
    assert encoder.fixed_batch is None and encoder.dim == 6 and encoder.chip.size == 8
    chips = _chips(7)
    batched = encoder.embed(chips)
    singles = np.concatenate([encoder.embed(c) for c in chips])
    np.testing.assert_allclose(batched, singles, rtol=1e-5, atol=1e-5)


def test_fixed_batch_larger_than_one_is_padded(tmp_path: Path) -> None:
    fixed = OnnxEncoder(_tiny_encoder_file(tmp_path, "fixed.onnx", batch=4))
    dynamic = OnnxEncoder(_tiny_encoder_file(tmp_path, "dynamic.onnx"))
    assert fixed.fixed_batch == 4
    chips = _chips(6)
    np.testing.assert_allclose(fixed.embed(chips), dynamic.embed(chips), rtol=1e-5, atol=1e-5)


def test_torch_module_matches_embed(tmp_path: Path) -> None:
    import torch

    encoder = OnnxEncoder(_tiny_encoder_file(tmp_path))
    chips = _chips(5)
    module = encoder.torch_module("cpu")
    with torch.no_grad():
        got = module(torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255.0).numpy()
    np.testing.assert_allclose(got, encoder.embed(chips), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ normalisation


def test_normalization_presets(tmp_path: Path) -> None:
    path = _tiny_encoder_file(tmp_path)
    auto = OnnxEncoder(path)
    assert auto.normalization == "arcface"
    x = auto.preprocess(np.array([[[[0, 255, 127]]]], np.uint8).repeat(8, 1).repeat(8, 2))
    np.testing.assert_allclose(x[0, :, 0, 0], [-1.0, 1.0, -0.5 / 127.5], atol=1e-6)

    imagenet = OnnxEncoder(path, normalization="imagenet")
    mean, std = NORMALIZATIONS["imagenet"]
    assert imagenet.normalization == "imagenet"
    np.testing.assert_allclose(imagenet.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(imagenet.std, std, rtol=1e-6)
    assert imagenet.fingerprint != auto.fingerprint
    assert not np.allclose(imagenet.embed(_chips(2)), auto.embed(_chips(2)))

    custom = OnnxEncoder(path, mean=[0, 0, 0], std=[255, 255, 255])
    assert custom.normalization == "mean=0,0,0/std=255,255,255"

    renamed = _tiny_encoder_file(tmp_path, "MobileFaceNet_v2.onnx")
    assert OnnxEncoder(renamed).normalization == "imagenet"
    assert OnnxEncoder(_tiny_encoder_file(tmp_path, "mx.onnx", sub_mul_head=True)).normalization == "none"

    with pytest.raises(ConfigError, match="normalization"):
        OnnxEncoder(path, normalization="zscore")


def test_bgr_channel_order(tmp_path: Path) -> None:
    path = _tiny_encoder_file(tmp_path)
    chips = _chips(3)
    rgb, bgr = OnnxEncoder(path), OnnxEncoder(path, channel_order="bgr")
    np.testing.assert_allclose(bgr.embed(chips), rgb.embed(chips[..., ::-1].copy()), rtol=1e-5, atol=1e-5)
    assert bgr.fingerprint.endswith(":bgr")


def test_cuda_provider_chosen_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnx_encoder.ort, "get_available_providers", lambda: both)
    assert default_providers() == both
    monkeypatch.setattr(onnx_encoder.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_providers() == ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        OnnxEncoder(tmp_path / "absent.onnx")


def test_text_file_is_not_onnx(tmp_path: Path) -> None:
    fake = tmp_path / "fake.onnx"
    fake.write_text("this is not a model\n")
    with pytest.raises(ConfigError, match="not a loadable ONNX model"):
        OnnxEncoder(fake)


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, None)])
def test_input_must_be_n_3_s_s(tmp_path: Path, channels: int, size: int | None) -> None:
    if size is None:  # non-square: patch the declared width
        path = _tiny_encoder_file(tmp_path)
        model = onnx.load(str(path))
        model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 9
        onnx.save(model, str(path))
    else:
        path = _tiny_encoder_file(tmp_path, channels=channels, size=size)
    with pytest.raises(ConfigError, match="N x 3 x S x S|square"):
        OnnxEncoder(path)


# ------------------------------------------------------------------------------------------------ registry


def test_create_encoder_onnx_spec(tmp_path: Path) -> None:
    path = _tiny_encoder_file(tmp_path)
    encoder = create_encoder(f"onnx:{path}")
    assert isinstance(encoder, OnnxEncoder) and encoder.name == "onnx:tiny.onnx"
    encoder = create_encoder({"name": "onnx", "path": str(path), "normalization": "imagenet", "batch_size": 2})
    assert encoder.normalization == "imagenet" and encoder.batch_size == 2
    with pytest.raises(ConfigError):
        create_encoder(f"onnx:{tmp_path / 'absent.onnx'}")


def test_create_encoder_mobilefacenet(models_dir: Path, tmp_path: Path) -> None:
    encoder = create_encoder("mobilefacenet", models_dir=str(models_dir))
    assert isinstance(encoder, OnnxEncoder) and encoder.dim == 128 and encoder.normalization == "imagenet"
    with pytest.raises(ConfigError, match="not found"):
        create_encoder("mobilefacenet", models_dir=str(tmp_path))
