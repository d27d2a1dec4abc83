"""The PyTorch port of dlib's ResNet against dlib itself, on real LFW face chips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from advface.encoders import create_encoder
from advface.encoders.dlib_runtime import DLIB_RESNET_FILE
from advface.encoders.dlib_torch import DlibResNet, DlibTorchEncoder, add_prev, load_dlib_resnet
from advface.images import load_image
from advface.paths import dlib_model_file

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def chips(lfw_sample: list[Path]) -> np.ndarray:
    """dlib face chips (150x150, padding 0.25) of the first detected face of each sample photo."""
    import dlib

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
    out = []
    for path in lfw_sample:
        image = load_image(path)
        faces = detector(image, 1)
        if faces:
            out.append(dlib.get_face_chip(image, predictor(image, faces[0]), size=150, padding=0.25))
    assert len(out) >= 50, f"only {len(out)} faces found in {len(lfw_sample)} LFW photos"
    return np.stack(out)


@pytest.fixture(scope="module")
def dlib_descriptors(chips: np.ndarray) -> np.ndarray:
    import dlib

    model = dlib.face_recognition_model_v1(str(dlib_model_file(DLIB_RESNET_FILE)))
    return np.array([np.asarray(model.compute_face_descriptor(chip)) for chip in chips], dtype=np.float32)


@pytest.fixture(scope="module")
def model() -> DlibResNet:
    return load_dlib_resnet(device="cpu")


def _to_input(chips: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float().div(255.0).to(device)


@pytest.mark.slow
def test_matches_dlib_on_lfw(model: DlibResNet, chips: np.ndarray, dlib_descriptors: np.ndarray) -> None:
    with torch.inference_mode():
        ours = model(_to_input(chips)).numpy()
    assert ours.shape == (len(chips), 128)
    diff = np.abs(ours - dlib_descriptors).max()
    assert diff <= TOLERANCE, f"max abs difference {diff:.2e} over {len(chips)} faces"
    norms = np.linalg.norm(ours, axis=1)
    assert ((norms > 1.0) & (norms < 2.0)).all()  # dlib's descriptors are not normalised


def test_batch_equals_single(model: DlibResNet, chips: np.ndarray) -> None:
    x = _to_input(chips[:6])
    with torch.inference_mode():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batch, single, atol=1e-6, rtol=0)


def test_gradients_flow(model: DlibResNet, chips: np.ndarray) -> None:
    x = _to_input(chips[:2]).requires_grad_(True)
    target = torch.zeros(2, 128)
    loss = (model(x) - target).pow(2).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.abs().amax(dim=(1, 2, 3)) > 0).all()
    assert all(not p.requires_grad for p in model.parameters())


def test_add_prev_pads_at_the_end() -> None:
    a = torch.ones(1, 4, 2, 2)
    b = torch.full((1, 2, 3, 1), 10.0)
    out = add_prev(a, b)
    assert out.shape == (1, 4, 3, 2)
    expected = torch.zeros(1, 4, 3, 2)
    expected[:, :, :2, :2] += 1
    expected[:, :2, :, :1] += 10
    torch.testing.assert_close(out, expected)


def test_rejects_wrong_input_shape(model: DlibResNet) -> None:
    with pytest.raises(ValueError, match="150"):
        model(torch.zeros(1, 3, 112, 112))


def test_load_is_cached() -> None:
    a, b = load_dlib_resnet(device="cpu"), load_dlib_resnet(device="cpu")
    assert a is not b  # separate modules ...
    assert torch.equal(a.net[0].weight, b.net[0].weight)  # ... from the same parsed file
    from advface.encoders.dlib_torch import _parsed

    assert _parsed.cache_info().hits >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_matches_dlib(chips: np.ndarray, dlib_descriptors: np.ndarray) -> None:
    cuda_model = load_dlib_resnet(device="cuda")
    with torch.inference_mode():
        ours = cuda_model(_to_input(chips, "cuda")).cpu().numpy()
    assert np.abs(ours - dlib_descriptors).max() <= TOLERANCE
    x = _to_input(chips[:2], "cuda").requires_grad_(True)
    cuda_model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.slow
def test_registered_encoder_matches_dlib_encoder(chips: np.ndarray) -> None:
    port = create_encoder("dlib-torch", device="cpu", batch_size=16)
    runtime = create_encoder("dlib")
    assert isinstance(port, DlibTorchEncoder)
    assert (port.name, port.dim, port.metric, port.chip) == ("dlib-torch", 128, "euclidean", runtime.chip)
    assert port.default_threshold == runtime.default_threshold
    assert port.fingerprint == runtime.fingerprint and port.fingerprint.startswith("dlib-resnet-v1:")
    ours, theirs = port.embed(chips), runtime.embed(chips)
    assert ours.dtype == np.float32 and ours.shape == (len(chips), 128)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    np.testing.assert_allclose(port.embed(chips[0]), ours[:1], atol=1e-6, rtol=0)
    assert isinstance(port.torch_module(), DlibResNet)
    assert isinstance(runtime.torch_module("cpu"), DlibResNet)
