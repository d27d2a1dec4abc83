"""advface.protect.tenant_transform: norm resolution, per-tenant transforms, store markers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from advface.config import load_config
from advface.crypto import generate_key
from advface.errors import ConfigError
from advface.protect.keyed import KeyedTransform
from advface.protect.tenant_transform import CALIBRATED_NORMS, TenantTransforms, resolve_norm


def test_resolve_norm() -> None:
    assert resolve_norm("auto", "dlib") == CALIBRATED_NORMS["dlib"]
    assert resolve_norm(None, "dlib") is None and resolve_norm("off", "dlib") is None
    assert resolve_norm(2, "whatever") == 2.0
    with pytest.raises(ConfigError, match="no norm is calibrated for encoder 'onnx-x'"):
        resolve_norm("auto", "onnx-x")
    for bad in (0, -1.0, float("nan"), True, "big"):
        with pytest.raises(ConfigError, match="keyed_transform.norm"):
            resolve_norm(bad, "dlib")


def test_tenant_transforms_match_keyed_transform_and_hide_the_secret() -> None:
    secret = generate_key()
    tt = TenantTransforms(secret, 128, version=2, norm=1.5)
    x = np.random.default_rng(0).normal(size=(5, 128)).astype(np.float32)
    expected = KeyedTransform.from_secret(secret, "acme", 128, version=2, norm=1.5).apply(x)
    np.testing.assert_array_equal(tt.apply("acme", x), expected)
    assert tt.for_tenant("acme") is tt.for_tenant("acme")  # cached
    assert tt.key_id("acme") != tt.key_id("other") and tt.key_id("acme") != tt.for_tenant("acme", 1).key_id
    assert not np.allclose(tt.apply("acme", x), tt.apply("other", x))
    np.testing.assert_allclose(np.linalg.norm(tt.apply("acme", x), axis=1), 1.5, rtol=1e-5)
    assert tt.apply("acme", np.zeros((0, 128), np.float32)).shape == (0, 128)
    assert secret.hex() not in repr(tt)
    with pytest.raises(TypeError):
        pickle.dumps(tt)
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        TenantTransforms(b"short", 128)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "env", "match"),
    [
        ("keyed_transform: {enabled: true}\n", {}, "enabled is true but no secret is configured"),
        ("keyed_transform: {secret_env: X, enabled: false}\n", {}, "secret_env is set but .*enabled is false"),
        ("keyed_transform: {enabled: true, secret_env: X, kms_hook: 'a.b:c'}\n", {}, "set only one of"),
        ("keyed_transform: {enabled: true, secret_env: X, norm: -2}\n", {}, "keyed_transform.norm"),
        ("keyed_transform: {enabled: true, secret_env: X, norm: big}\n", {}, "keyed_transform.norm"),
        ("keyed_transform: {enabled: true, secret_env: X, version: 0}\n", {}, "keyed_transform.version"),
        ("keyed_transform: {enabled: true, secret_file: missing.key}\n", {}, "not found"),
        ("keyed_transform: {enable: true}\n", {}, "unknown key"),
        ("", {"ADVFACE_KEYED_TRANSFORM_ENABLED": "true"}, "no secret is configured"),
        ("", {"ADVFACE_KEYED_TRANSFORM_SECRET": "x"}, "unknown configuration key keyed_transform.secret"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, env: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path / "c.yaml", text), env=env)


def _store_with_templates(folder: Path, old: TenantTransforms, cipher=None):  # type: ignore[no-untyped-def]
    """An SQLite store in ``folder`` holding 7 templates of two tenants issued under ``old`` (and the originals)."""
    from advface.protect.tenant_transform import check_store_marker
    from advface.store.sqlite_faiss import SQLiteFaissStore

    store = SQLiteFaissStore(folder / "templates.sqlite3", 128, "euclidean", use_gpu=False, cipher=cipher)
    check_store_marker(folder, old, 0)
    z = np.random.default_rng(3).normal(size=(7, 128)).astype(np.float32)
    originals = {}
    for i, row in enumerate(z):
        tenant = "a" if i % 2 else "b"
        store.add(tenant, f"s{i}", old.apply(tenant, row[None]))
        originals[(tenant, f"s{i}")] = row
    return store, originals


def test_rotate_store_resumes_after_a_crash(tmp_path: Path) -> None:
    from advface.crypto import TemplateCipher
    from advface.protect.tenant_transform import check_store_marker, read_marker, rotate_store

    secret = generate_key()
    old = TenantTransforms(secret, 128, version=1, norm=1.4)
    new = TenantTransforms(secret, 128, version=2, norm=1.4)
    store, originals = _store_with_templates(tmp_path, old, cipher=TemplateCipher.generate())

    class Crash(TenantTransforms):
        calls = 0

        def for_tenant(self, tenant: str, version: int | None = None) -> KeyedTransform:
            Crash.calls += tenant in ("a", "b")
            if Crash.calls > 2:  # batch 1 (rows of tenants b and a) is committed, batch 2 dies
                raise KeyboardInterrupt("killed")
            return super().for_tenant(tenant, version)

    with pytest.raises(KeyboardInterrupt):
        rotate_store(store, tmp_path, old, Crash(secret, 128, version=2, norm=1.4), batch_size=2)
    assert "rotating_to" in read_marker(tmp_path)  # type: ignore[operator]
    for transforms in (old, new, None):  # the sidecar refuses a half-rotated store, whatever it is configured with
        with pytest.raises(ConfigError, match="unfinished `advface rotate-transform`"):
            check_store_marker(tmp_path, transforms, store.count())
    with pytest.raises(ConfigError, match="unfinished re-issue from version 1 to 2"):  # no other job over it
        rotate_store(store, tmp_path, old, TenantTransforms(secret, 128, version=3, norm=1.4), batch_size=2)
    assert rotate_store(store, tmp_path, old, new, batch_size=2) == 5  # the rest: 7 - 2
    assert read_marker(tmp_path) == {
        "enabled": True,
        "version": 2,
        "norm": 1.4,
        "dim": 128,
        "check_id": new.key_id("advface-transform-check"),
    }
    check_store_marker(tmp_path, new, store.count())
    assert store.transform_job() is None
    for (tenant, subject), z in originals.items():  # every row re-issued exactly once
        np.testing.assert_allclose(store.subject_vectors(tenant, subject)[0], new.apply(tenant, z[None])[0], atol=1e-5)
    hit = store.search("a", new.apply("a", originals[("a", "s3")][None])[0], 1)[0]  # the index was rebuilt
    assert hit.subject_id == "s3" and abs(hit.score) < 1e-4
    assert rotate_store(store, tmp_path, old, new) == 0  # done: a rerun does nothing
    with pytest.raises(ConfigError, match="not issued under the given old transform"):
        rotate_store(
            store,
            tmp_path,
            TenantTransforms(generate_key(), 128, version=2, norm=1.4),
            TenantTransforms(secret, 128, version=3, norm=1.4),
        )
    with pytest.raises(ConfigError, match="original norms are not stored"):
        rotate_store(store, tmp_path, new, TenantTransforms(secret, 128, version=3, norm=None))
    store.close()
