"""The defender surrogate shipped in the package: present, loadable, trained on the defender group for dlib, at the
128-px attacker model's size with its finished schedule."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from advface.errors import ConfigError
from advface.generative.model import load_generator
from advface.generative.shipped import shipped_surrogate_path, surrogate_digest


def test_the_shipped_surrogate_is_the_defender_model_for_dlib() -> None:
    path = shipped_surrogate_path("dlib-torch")  # dlib-torch shares dlib's embeddings
    assert path == shipped_surrogate_path("dlib") and path.stat().st_size < 60e6
    generator = load_generator(path)
    meta = generator.metadata
    assert meta["role"] == "defender" and meta["encoder"] == "dlib" and generator.dim == 128
    assert meta["training_data"]["group"] == "defender"
    assert generator.image_size == 128 and meta["steps"] == {"autoencoder": 1200, "denoiser": 6000}
    faces = generator.generate(np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32), 1, steps=2)
    assert faces.shape == (1, 1, generator.image_size, generator.image_size, 3) and faces.std() > 1


def test_no_surrogate_for_other_encoders_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="train-generator"):
        shipped_surrogate_path("mobilefacenet")
    with pytest.raises(ConfigError):
        shipped_surrogate_path("../../etc/passwd")


def test_the_surrogate_digest_names_a_file_by_its_contents(tmp_path: Path) -> None:
    shipped = hashlib.sha256(shipped_surrogate_path().read_bytes()).hexdigest()[:16]
    assert surrogate_digest() == surrogate_digest(shipped_surrogate_path()) == shipped
    other = tmp_path / "other.pt"
    other.write_bytes(b"another surrogate")
    assert surrogate_digest(other) == hashlib.sha256(b"another surrogate").hexdigest()[:16]
    with pytest.raises(ConfigError, match="missing.pt not found"):
        surrogate_digest(tmp_path / "missing.pt")
