"""The shadow model shipped for dlib: loadable, right encoder, small, and protecting real templates keeps matching."""

from pathlib import Path

import numpy as np
import pytest

from advface.encoders import create_encoder
from advface.faces import FaceChipper, create_detector
from advface.images import load_image
from advface.protect import AdvFaceConfig, Protector
from advface.protect.shipped import shipped_shadow_path


def test_shipped_dlib_shadow_is_small_and_for_dlib():
    path = shipped_shadow_path("dlib")
    assert path == shipped_shadow_path("dlib-torch")
    assert path.stat().st_size <= 25 * 1024 * 1024
    protector = Protector.from_checkpoint(path, encoder_fingerprint=create_encoder("dlib").fingerprint, dim=128)
    meta = protector.metadata
    assert meta["encoder_fingerprint"] == create_encoder("dlib-torch").fingerprint
    assert meta["role"] == "shadow" and meta["training_data"]["group"] == "defender"


@pytest.fixture(scope="module")
def real_templates(lfw_sample: list[Path]) -> tuple[np.ndarray, list[str]]:
    encoder = create_encoder("dlib-torch")
    chipper = FaceChipper(create_detector("dlib"), encoder.chip, "center")
    chips, people = [], []
    for path in lfw_sample[:40]:
        chips.append(chipper.chips(load_image(path), str(path))[0][1])
        people.append(path.parent.name)
    return encoder.embed(np.stack(chips)), people


def test_protection_keeps_matching_on_real_faces(real_templates):
    z, people = real_templates
    protector = Protector.from_checkpoint(shipped_shadow_path("dlib"))
    protected = protector.protect(z)
    assert protected.shape == z.shape and protected.dtype == np.float32
    rel = np.linalg.norm(protected - z, axis=1) / np.linalg.norm(z, axis=1)
    assert (rel <= AdvFaceConfig().rel_l2 * (1 + 1e-5)).all()
    assert np.array_equal(protector.protect(z), protected)  # deterministic
    # lfw_sample holds two photos per person: protected template of photo 1 vs raw probe of photo 2
    genuine = np.linalg.norm(protected[0::2] - z[1::2], axis=1)
    raw_genuine = np.linalg.norm(z[0::2] - z[1::2], axis=1)
    impostor = np.linalg.norm(protected[0::2] - np.roll(z[1::2], 1, axis=0), axis=1)
    threshold = 0.6  # dlib's published decision distance
    assert (genuine < threshold).mean() >= (raw_genuine < threshold).mean() - 0.05
    assert (impostor >= threshold).mean() >= 0.95
    assert people[0] == people[1]
