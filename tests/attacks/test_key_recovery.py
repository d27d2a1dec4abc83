"""Key-recovery attacks on the keyed transform: they must work where the theory says they do."""

from __future__ import annotations

import numpy as np
import pytest

from advface.attacks.key_recovery import evaluate_recovery, procrustes, recover_from_pairs, recover_from_statistics
from advface.errors import EmbeddingError
from advface.protect.keyed import KeyedTransform


def _cloud(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Anisotropic, skewed, off-centre data (like face embeddings): distinct variances per axis."""
    scales = np.linspace(3.0, 0.3, dim)
    mixing = np.linalg.qr(np.random.default_rng(99).normal(size=(dim, dim)))[0]
    return (rng.gamma(2.0, size=(n, dim)) * scales) @ mixing.T + 2.0


def test_insider_with_known_pairs_recovers_the_key() -> None:
    rng = np.random.default_rng(0)
    x = _cloud(rng, 300, 16)
    t = KeyedTransform.from_secret(b"k" * 32, "acme", 16)
    y = t.apply(x) + rng.normal(scale=0.01, size=x.shape)  # AdvFace-like noise on the stored side
    rec = recover_from_pairs(x[:40], y[:40])
    report = evaluate_recovery(rec, t.matrix, y[40:], x[40:], threshold=0.5)
    assert report["matrix_rel_error"] < 0.01 and report["share_within_threshold_of_template"] == 1.0
    with pytest.raises(EmbeddingError, match="pair up"):
        recover_from_pairs(x[:5], y[:6])


def test_thief_recovers_an_anisotropic_cloud_and_fails_on_an_isotropic_one() -> None:
    rng = np.random.default_rng(1)
    dim = 8
    t = KeyedTransform.from_secret(b"k" * 32, "acme", dim)
    stolen_raw, public = _cloud(rng, 2000, dim), _cloud(rng, 2000, dim)  # same distribution, other samples
    y = t.apply(stolen_raw)
    rec = recover_from_statistics(y, public, refine_steps=10)
    assert evaluate_recovery(rec, t.matrix, y, stolen_raw)["matrix_rel_error"] < 0.2
    # isotropic Gaussian data: no statistic singles out a rotation, the estimate is no better than a random one
    iso, iso_public = rng.normal(size=(2000, dim)), rng.normal(size=(2000, dim))
    y_iso = t.apply(iso)
    rec_iso = recover_from_statistics(y_iso, iso_public, refine_steps=10)
    assert evaluate_recovery(rec_iso, t.matrix, y_iso, iso)["matrix_rel_error"] > 0.8


def test_procrustes_exact() -> None:
    rng = np.random.default_rng(2)
    q = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    x = rng.normal(size=(30, 8))
    np.testing.assert_allclose(procrustes(x, x @ q.T), q, atol=1e-10)
