"""``advface audit --store``: the store is read the way the sidecar opens it (advface.audit.store, via
advface.reencode.store_io), encrypted and keyed-transform stores included, and the database thief without keys
(advface.audit.thief) recovers nothing from an encrypted store and everything from a plaintext one.

Unit tests use 16-d random templates; one end-to-end quick audit (one cached decoder, no GAN) runs on an encrypted,
keyed-transform ``advface:`` store of real LFW embeddings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from audit_helpers import run_quick_audit

from advface.audit import thief
from advface.audit.results import FORMAT_VERSION
from advface.audit.store import load_templates_store
from advface.errors import ConfigError

DIM = 16
TENANT = "acme"


def _config(tmp_path: Path, *, encrypted: bool, keyed: bool, store: dict[str, Any] | None = None) -> Path:
    """A sidecar configuration (SQLite store in tmp_path/store unless ``store``), optionally with an encryption key
    and a keyed transform without norm equalisation (a pure rotation)."""
    from advface.crypto import generate_key, write_key_file

    cfg: dict[str, Any] = {
        "store": store or {"backend": "sqlite", "data_dir": str(tmp_path / "store"), "use_gpu": False},
        "protection": {"enabled": False},
    }  # _enrol stores the vectors it is given
    if encrypted:
        write_key_file(tmp_path / "at-rest.key", generate_key())
        cfg["encryption"] = {"key_file": str(tmp_path / "at-rest.key")}
    if keyed:
        write_key_file(tmp_path / "transform.key", generate_key())
        cfg["keyed_transform"] = {"enabled": True, "secret_file": str(tmp_path / "transform.key"), "norm": None}
    path = tmp_path / "advface.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _enrol(config: Path, ids: list[str], raw: np.ndarray, dim: int = DIM, *, extra: bool = False) -> np.ndarray:
    """Store ``raw`` as the sidecar does (its store, its keyed transform, its marker); returns what is stored.
    ``extra``: also a second template for the first subject (the audit must use the first one)."""
    from advface.config import load_config
    from advface.service import open_checked_store, transforms_from_config

    conf = load_config(config)
    transforms = transforms_from_config(conf.keyed_transform, dim, "dlib")
    stored = raw if transforms is None else transforms.apply(TENANT, raw)
    with open_checked_store(conf, dim, "euclidean", transforms) as store:
        store.add_many(TENANT, [(i, stored[k : k + 1], None) for k, i in enumerate(ids)])
        if extra:
            store.add(TENANT, ids[0], stored[1:2] + 5.0)
    return np.asarray(stored, np.float32)


def _templates(n: int = 12) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(7)
    return [f"P{i:02d}/P{i:02d}_0001.jpg" for i in range(n)], (0.1 * rng.normal(size=(n, DIM))).astype(np.float32)


def _reference(raw: np.ndarray, stored: np.ndarray) -> thief.Reference:
    # victims = the raw embeddings themselves; threshold: a tenth of the typical inter-template distance
    return thief.Reference(victims=raw, threshold=-0.04, metric="euclidean", stored=stored)


def test_encrypted_keyed_store_loads_decrypted_vectors(tmp_path: Path) -> None:
    ids, raw = _templates()
    config = _config(tmp_path, encrypted=True, keyed=True)
    stored = _enrol(config, ids, raw, extra=True)
    db = load_templates_store(
        f"advface:{tmp_path / 'store'}?tenant={TENANT}", None, DIM, "euclidean", config_path=config
    )
    assert db.ids == ids  # subject ids (photo ids), first template of each subject
    np.testing.assert_allclose(db.vectors, stored, atol=1e-6)
    np.testing.assert_allclose(db.untransformed, raw, atol=1e-5)  # through T_tenant^-1
    assert not np.allclose(db.vectors, raw, atol=1e-3)
    info = db.store.describe()
    assert info["encrypted_at_rest"] and info["keyed_transform"]["version"] == 1 and info["tenant_templates"] == 13
    # the sqlite: alias with --tenant is the same store, opened the same way
    alias = load_templates_store(f"sqlite:{tmp_path / 'store'}", TENANT, DIM, "euclidean", config_path=config)
    assert alias.ids == db.ids and np.array_equal(alias.vectors, db.vectors)


def test_store_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVFACE_KEYS_DIR", str(tmp_path / "empty-key-folder"))  # the defaults' key folder: no key
    ids, raw = _templates()
    config = _config(tmp_path, encrypted=True, keyed=False)
    _enrol(config, ids, raw)
    store = f"advface:{tmp_path / 'store'}?tenant={TENANT}"
    before = sorted(p.name for p in (tmp_path / "store").iterdir())
    with pytest.raises(ConfigError, match=r"is encrypted .* holds no encryption.key.*--config"):
        load_templates_store(store, None, DIM, "euclidean")  # no configuration: no key
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == before  # nothing written
    with pytest.raises(ConfigError, match="differs from the tenant"):
        load_templates_store(store, "other", DIM, "euclidean", config_path=config)
    with pytest.raises(ConfigError, match="needs --tenant"):
        load_templates_store(f"sqlite:{tmp_path / 'store'}", None, DIM, "euclidean", config_path=config)
    with pytest.raises(ConfigError, match="unsupported --store"):
        load_templates_store("mysql://x", TENANT, DIM, "euclidean")
    # another dimension than the encoder's
    with pytest.raises(Exception, match="dimension 16"):
        load_templates_store(store, None, 128, "euclidean", config_path=config)


def test_store_audit_protects_as_its_configuration(tmp_path: Path) -> None:
    """With --store the audit's own protection (unlinkability, renewal, adaptive enrolments) is the store
    configuration's protection section; protection flags are refused rather than silently ignored."""
    from types import SimpleNamespace

    from advface.audit.config import AuditConfig
    from advface.audit.stages.protection import choose_protection
    from advface.config import ProtectionConfig

    base = dict(data=tmp_path, out=tmp_path / "out", store=f"advface:{tmp_path}?tenant={TENANT}")
    for flag, value in (("protection", "advface"), ("rel_l2", 0.2), ("steps", 5), ("shadows", (tmp_path,))):
        with pytest.raises(ConfigError, match="protection section of --config"):
            AuditConfig(**base, **{flag: value}).check()
    config = AuditConfig(**base)
    store = SimpleNamespace(protection=ProtectionConfig(rel_l2=0.05, steps=2))  # what StoreInfo.protection holds
    spec, source = choose_protection(config, store)
    assert spec.method == "advface" and (spec.config.rel_l2, spec.config.steps) == (0.05, 2)
    assert "configuration" in source
    spec, _ = choose_protection(config, SimpleNamespace(protection=ProtectionConfig(enabled=False)))
    assert spec is None


@pytest.mark.parametrize("encrypted", [True, False])
def test_thief_without_keys_sqlite(tmp_path: Path, encrypted: bool) -> None:
    ids, raw = _templates()
    config = _config(tmp_path, encrypted=encrypted, keyed=False)
    _enrol(config, ids, raw)
    db = load_templates_store(
        f"advface:{tmp_path / 'store'}?tenant={TENANT}", None, DIM, "euclidean", config_path=config
    )
    scan = thief.scan_sqlite(db.store.database_file, _reference(raw, db.vectors))
    assert scan["rows"] == len(ids)
    if encrypted:
        assert scan["vectors_recovered"] == 0 and scan["rows_matching_a_victim"] == 0
        assert scan["file_bytes"]["audited_templates_found"] == 0
        assert scan["file_bytes"]["windows_matching_a_victim"] == 0
    else:
        assert scan["vectors_recovered"] == len(ids) == scan["rows_equal_to_a_stored_template"]
        assert scan["rows_matching_a_victim"] == len(ids)
        assert scan["file_bytes"]["audited_templates_found"] == len(ids)  # the plain bytes are in the file


def test_thief_without_keys_postgres(tmp_path: Path, postgres_server: Any, postgres_dsn: str) -> None:
    """Encrypted: the configuration's own PostgreSQL store (advface:?tenant=T), 0 recovered; a plaintext store
    through the postgresql:// alias: every row recovered from the raw vector column."""
    import uuid

    ids, raw = _templates(8)
    enc_dir, plain_dir = tmp_path / "enc", tmp_path / "plain"
    enc_dir.mkdir()
    plain_dir.mkdir()
    config = _config(enc_dir, encrypted=True, keyed=True, store={"backend": "postgresql", "dsn": postgres_dsn})
    stored = _enrol(config, ids, raw)
    db = load_templates_store(f"advface:?tenant={TENANT}", None, DIM, "euclidean", config_path=config)
    np.testing.assert_allclose(db.vectors, stored, atol=1e-6)
    np.testing.assert_allclose(db.untransformed, raw, atol=1e-5)
    scan = thief.scan_postgres(postgres_dsn, _reference(raw, db.vectors))
    assert scan["rows"] == len(ids) and scan["vectors_recovered"] == 0

    plain_dsn = postgres_server.create_database(f"audit_plain_{uuid.uuid4().hex[:8]}")
    _enrol(
        _config(plain_dir, encrypted=False, keyed=False, store={"backend": "postgresql", "dsn": plain_dsn}), ids, raw
    )
    db = load_templates_store(plain_dsn, TENANT, DIM, "euclidean")
    assert db.ids == ids and db.store.encrypted is False
    scan = thief.scan_postgres(plain_dsn, _reference(raw, db.vectors))
    assert scan["vectors_recovered"] == len(ids) == scan["rows_matching_a_victim"]


@pytest.mark.slow
def test_end_to_end_encrypted_keyed_store(audit_dataset: Path, audit_cache: Path, tmp_path: Path) -> None:
    """One quick audit (deconv only) of an encrypted store whose templates went through the keyed transform."""
    from advface.encoders import create_encoder
    from advface.image_embedder import ImageEmbedder

    people = sorted(p for p in audit_dataset.iterdir() if p.is_dir() and not p.name.startswith("Zz_"))
    multi = [p for p in people if len(list(p.iterdir())) >= 2][:4]
    files = [(f, f.relative_to(audit_dataset).as_posix()) for p in multi for f in sorted(p.iterdir())[:2]]
    data = ImageEmbedder(create_encoder("dlib-torch"), "dlib", "largest").embed_files(files, progress=False)
    config = _config(tmp_path, encrypted=True, keyed=True)
    _enrol(config, list(data.ids), np.asarray(data.embeddings, np.float32), dim=128)
    out = tmp_path / "out"
    store = f"advface:{tmp_path / 'store'}?tenant={TENANT}"
    extra = ("--store", store, "--config", str(config), "--attackers", "deconv", "--no-images")
    assert run_quick_audit(audit_dataset, audit_cache, out, *extra) == 0
    report = json.loads((out / "report.json").read_text())
    n = len(data.ids)
    assert report["data"]["database"]["encrypted_at_rest"] is True
    assert report["data"]["database"]["audited"] == n
    assert report["protection"]["store_keyed_transform"] is True
    assert report["protection"]["method"] == "none" and "configuration" in report["protection"]["source"]
    assert report["thief_without_keys"]["vectors_recovered"] == 0 and report["thief_without_keys"]["rows"] == n
    attack = report["attacks"]["deconv"]
    # stored raw embeddings through a pure rotation: un-transformed they are the raw ones again
    assert attack["protected"]["type1_success"] == attack["raw"]["type1_success"]
    assert attack["protected"]["psnr"] == pytest.approx(attack["raw"]["psnr"], abs=1e-3)
    assert attack["protected+key"]["psnr"] != pytest.approx(attack["raw"]["psnr"], abs=1e-3)  # rotated: other faces
    # the verification of stored templates uses probes through the store's own transform: a rotation keeps scores
    v = report["verification"]
    assert v["protected+key"]["accuracy_mean"] == pytest.approx(v["protected"]["accuracy_mean"], abs=1e-9)
    layers = {layer["attacker"]: layer for layer in report["layers"]}
    assert layers["database thief without keys"]["vectors_recovered"] == 0
    page = (out / "report.html").read_text()
    assert f"vectors recovered without keys: 0 of {n} rows" in page
    # the format-1 keys of the parts only a store audit writes (the store's and the thief's own entries aside)
    assert report["format_version"] == FORMAT_VERSION == 7
    assert list(report["data"]) == [
        "dataset",
        "photos",
        "identities",
        "photos_with_face",
        "photos_failed",
        "failed_examples",
        "encoder",
        "database",
        "split",
        "victims",
        "single_photo_identities",
    ]
    assert list(report["data"]["database"])[:4] == ["source", "templates", "audited", "not_audited"]
    assert list(report["protection"]) == [
        "method",
        "source",
        "key",
        "key_norm_equalisation",
        "templates",
        "store_keyed_transform",
    ]
    assert list(report["thief_without_keys"])[-3:] == ["encrypted_at_rest", "threshold_fmr", "summary"]
    assert list(report["layers"][0]) == [
        "attacker",
        "holds",
        "layer",
        "vectors_recovered",
        "rows",
        "encrypted_at_rest",
        "note",
    ]
