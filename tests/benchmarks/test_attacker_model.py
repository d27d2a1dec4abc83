"""benchmarks/models/generator_attacker.pt: the attacker model the diffusion benchmarks run on is committed, loads,
and is the attacker-group model of the recorded training command (never the defender surrogate)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from advface.generative.model import load_generator
from advface.generative.threats import generate_from_embeddings

ATTACKER = Path(__file__).resolve().parents[2] / "benchmarks" / "models" / "generator_attacker.pt"
ATTACKER_128 = ATTACKER.with_name("generator_attacker128.pt")
SURROGATE = Path(__file__).resolve().parents[2] / "advface" / "models" / "generator_defender_dlib.pt"


def test_attacker_model_is_the_attacker_group_s_finished_model() -> None:
    model = load_generator(ATTACKER)
    meta = model.metadata
    assert meta["role"] == "attacker" and meta["encoder"] == "dlib"
    assert meta["training_data"]["group"] == "attacker"
    assert meta["steps"] == {"autoencoder": 1200, "denoiser": 6000}  # the finished schedule (a snapshot says less)
    assert meta["seed"] == 1
    surrogate = hashlib.sha256(SURROGATE.read_bytes()).digest()
    for attacker in (ATTACKER, ATTACKER_128):  # protection never runs on a model the benchmarks attack with
        assert hashlib.sha256(attacker.read_bytes()).digest() != surrogate


def test_attacker_model_generates_faces() -> None:
    model = load_generator(ATTACKER)
    condition = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
    condition /= np.linalg.norm(condition)
    faces = generate_from_embeddings(model, condition, 2, steps=3, seed=0)
    assert faces.shape == (1, 2, model.image_size, model.image_size, 3) and faces.dtype == np.uint8
    assert faces.std() > 5  # not a blank image


def test_the_128_px_attacker_model_is_the_same_recipe_at_twice_the_size() -> None:
    model, small = load_generator(ATTACKER_128), load_generator(ATTACKER)
    meta = model.metadata
    assert model.image_size == 128 and model.latent_shape() == (4, 32, 32)
    assert meta["role"] == "attacker" and meta["training_data"]["group"] == "attacker" and meta["seed"] == 1
    assert meta["steps"] == {"autoencoder": 1200, "denoiser": 6000}
    for key in ("identities_sha256", "photos", "faces", "split"):  # the same people and photos as the 64-px model
        assert meta["training_data"][key] == small.metadata["training_data"][key]
    condition = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
    faces = generate_from_embeddings(model, condition / np.linalg.norm(condition), 1, steps=3, seed=0)
    assert faces.shape == (1, 1, 128, 128, 3) and faces.std() > 5
