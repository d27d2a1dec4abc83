"""Synthetic embeddings for tests and benchmarks that need identities but no photos."""

from __future__ import annotations

import numpy as np


def dlib_like_people(people: int, seed: int = 0, dim: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(enrolment, probe) embeddings, ``people x dim`` float32 each, of synthetic identities with dlib's geometry:
    norms about 1.4, distances between two photos of a person about 0.4, between people about 0.8."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim)
    mean *= 1.35 / np.linalg.norm(mean)
    centres = mean + rng.normal(scale=0.05, size=(people, dim))
    photos = centres[:, None, :] + rng.normal(scale=0.0275, size=(people, 2, dim))
    return photos[:, 0].astype(np.float32), photos[:, 1].astype(np.float32)
