"""Keyed per-tenant orthogonal transform: orthogonality, determinism, tenant/version separation, preserved scores."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from advface.errors import ConfigError, EmbeddingError
from advface.protect.keyed import KeyedTransform, derive_seed, rekey

SECRET = bytes(range(32))


def test_orthogonal_and_deterministic() -> None:
    t = KeyedTransform.from_secret(SECRET, "acme", 128)
    q = t.matrix
    np.testing.assert_allclose(q @ q.T, np.eye(128), atol=1e-12)
    again = KeyedTransform.from_secret(SECRET, "acme", 128)
    np.testing.assert_array_equal(again.matrix, q)
    assert again.key_id == t.key_id and len(t.key_id) == 16
    assert not q.flags.writeable
    assert abs(abs(np.linalg.det(q)) - 1) < 1e-9
    # far from the identity and from any signed permutation: a dense random rotation
    assert np.abs(q).max() < 0.5 and abs(np.trace(q)) < 40


def test_tenants_versions_secrets_differ() -> None:
    base = KeyedTransform.from_secret(SECRET, "acme", 64)
    others = [
        KeyedTransform.from_secret(SECRET, "acme2", 64),
        KeyedTransform.from_secret(SECRET, "acme", 64, version=2),
        KeyedTransform.from_secret(SECRET[::-1], "acme", 64),
    ]
    for other in others:
        assert other.key_id != base.key_id
        # the relative rotation between the two keys is itself a generic rotation (no shared structure)
        rel = base.matrix.T @ other.matrix
        assert np.abs(rel - np.eye(64)).max() > 0.3 and np.abs(rel).max() < 0.6
    assert derive_seed(SECRET, "acme", 64) != derive_seed(SECRET, "acme", 65)


def test_scores_preserved_and_invertible() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 128)).astype(np.float32), rng.normal(size=(50, 128)).astype(np.float32)
    t = KeyedTransform.from_secret(SECRET, "acme", 128)
    tx, ty = t.apply(x), t.apply(y)
    assert tx.dtype == np.float32 and tx.shape == x.shape
    assert np.abs(tx - x).max() > 0.5  # really transformed
    np.testing.assert_allclose(np.linalg.norm(tx - ty, axis=1), np.linalg.norm(x - y, axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.sum(tx * ty, 1), np.sum(x * y, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(t.invert(tx), x, atol=1e-5)
    np.testing.assert_allclose(t.apply(x[0]), tx[0], atol=1e-6)  # one vector


def test_rekey_equals_invert_then_apply() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 32))
    old = KeyedTransform.from_secret(SECRET, "acme", 32)
    new = KeyedTransform.from_secret(SECRET, "acme", 32, version=2)
    stored = old.apply(x)
    np.testing.assert_allclose(rekey(stored, old, new), new.apply(x), atol=1e-5)
    with pytest.raises(ConfigError, match="cannot rekey"):
        rekey(stored, old, KeyedTransform.from_secret(SECRET, "acme", 16))


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        KeyedTransform.from_secret(b"short", "acme", 8)
    with pytest.raises(ConfigError, match="tenant"):
        KeyedTransform.from_secret(SECRET, "", 8)
    with pytest.raises(ConfigError, match="dim"):
        KeyedTransform.from_secret(SECRET, "acme", 0)
    with pytest.raises(ConfigError, match="version"):
        KeyedTransform.from_secret(SECRET, "acme", 8, version=0)
    t = KeyedTransform.from_secret(SECRET, "acme", 8)
    with pytest.raises(EmbeddingError, match="dimension 8"):
        t.apply(np.zeros((2, 9)))
    with pytest.raises(EmbeddingError, match="NaN"):
        t.apply(np.full((1, 8), np.nan))
    with pytest.raises(TypeError):
        pickle.dumps(t)
    assert "key_id" in repr(t) and "matrix" not in repr(t)


def test_norm_equalisation() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 16)) * rng.uniform(0.5, 2.0, size=(10, 1))
    t = KeyedTransform.from_secret(SECRET, "acme", 16, norm=1.5)
    y = t.apply(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.5, rtol=1e-6)  # norms no longer tell people apart
    np.testing.assert_allclose(t.invert(y), 1.5 * x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-5)
    plain = KeyedTransform.from_secret(SECRET, "acme", 16)
    np.testing.assert_array_equal(plain.matrix, t.matrix)  # same rotation, same key id
    assert plain.key_id == t.key_id and "norm=1.5" in repr(t)
    with pytest.raises(ConfigError, match="different norm"):
        rekey(y, t, plain)
    with pytest.raises(ConfigError, match="norm must be"):
        KeyedTransform.from_secret(SECRET, "acme", 16, norm=0)
    with pytest.raises(EmbeddingError, match="zero"):
        t.apply(np.zeros((1, 16)))
