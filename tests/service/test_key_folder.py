"""The key folder (advface.service.key_folder): what a first start on the defaults creates and stores, and how
stores made without it keep opening."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from advface.config import Config, load_config
from advface.crypto import generate_key, key_fingerprint, load_key_file, write_key_file
from advface.errors import ConfigError
from advface.protect.tenant_transform import read_marker
from advface.service import TemplateService
from advface.service.key_folder import (
    ENCRYPTION_KEY,
    KEY_NAMES,
    SEED_KEY,
    TRANSFORM_KEY,
    KeyFolder,
    resolve_key_folder,
)
from advface.store.sqlite_faiss import SQLiteFaissStore
from advface.testing.synthetic import dlib_like_people


def _config(folder: Path, **sections: dict) -> Config:
    """The embedded defaults but a fast encoder and protection, data in ``folder/data``, keys in ``folder/keys``."""
    base: dict = {
        "encoder": {"name": "dlib-torch"},
        "protection": {"steps": 1},
        "store": {"data_dir": str(folder / "data"), "use_gpu": False},
        "keys": {"dir": str(folder / "keys")},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "advface.yaml").write_text(yaml.safe_dump(base))
    return load_config(folder / "advface.yaml", env={})


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def _files_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_private_keys_and_stores_only_ciphertext(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path)
    assert config.keys.auto and config.encryption.key_file is None and config.keyed_transform.enabled is None
    enrolled, probes = dlib_like_people(2, seed=11)
    with caplog.at_level(logging.WARNING, logger="advface.service.key_folder"):
        svc = TemplateService(config)
    try:
        keys = tmp_path / "keys"
        assert sorted(p.name for p in keys.iterdir()) == sorted(KEY_NAMES)
        assert _mode(keys) == 0o700 and all(_mode(keys / name) == 0o600 for name in KEY_NAMES)
        assert "back it up apart from the data folder" in caplog.text and str(keys) in caplog.text
        assert svc.transforms is not None and svc.protection_method == "advface"
        assert svc.config.protection.seed == KeyFolder(keys).seed() != 0
        for i, z in enumerate(enrolled):
            run(svc.enroll("acme", f"Jane Q Public {i}", z, {"employee_no": f"E-{i:05d}-77"}))
        stored = np.asarray(svc.store.subject_vectors("acme", "Jane Q Public 0"))[0]
        assert run(svc.verify("acme", "Jane Q Public 1", probes[1])).match
    finally:
        svc.close()
    data = tmp_path / "data"
    meta = SQLiteFaissStore.read_meta(data / "templates.sqlite3")
    assert meta["encryption"] == "aes-256-gcm"
    assert key_fingerprint(load_key_file(keys / ENCRYPTION_KEY)) in meta["key_ids"]
    assert (read_marker(data) or {}).get("enabled") is True
    on_disk = _files_bytes(data)
    for vector in (enrolled[0], stored):  # neither the raw embedding nor the stored template, in any byte order
        for dtype in ("<f4", ">f4", "<f8"):
            assert np.asarray(vector, dtype).tobytes() not in on_disk
    for text in ("Jane Q Public", "E-00001-77", "employee_no"):  # subject ids and metadata sealed too
        assert text.encode() not in on_disk
    assert not any(secret in on_disk for secret in (load_key_file(keys / n) for n in KEY_NAMES))


def test_a_second_start_reuses_the_keys(tmp_path: Path) -> None:
    config = _config(tmp_path)
    z, probe = (a[0] for a in dlib_like_people(1, seed=12))
    svc = TemplateService(config)
    try:
        run(svc.enroll("t", "p", z, {}))
    finally:
        svc.close()
    before = {n: (tmp_path / "keys" / n).read_bytes() for n in KEY_NAMES}
    svc = TemplateService(config)
    try:
        assert run(svc.verify("t", "p", probe)).match
    finally:
        svc.close()
    assert before == {n: (tmp_path / "keys" / n).read_bytes() for n in KEY_NAMES}


def test_two_deployments_issue_unlinkable_templates(tmp_path: Path) -> None:
    z = dlib_like_people(1, seed=13)[0]
    out = []
    for name in ("a", "b"):
        svc = TemplateService(_config(tmp_path / name))
        try:
            out.append(run(svc.protect(z, tenant=None))[0])
            assert np.array_equal(out[-1], run(svc.protect(z, tenant=None))[0])  # deterministic per deployment
        finally:
            svc.close()
    assert not np.allclose(out[0], out[1], atol=1e-4)


def test_a_store_made_without_the_folder_keeps_opening_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    z, probe = (a[0] for a in dlib_like_people(1, seed=14))
    legacy = _config(tmp_path, keys={"auto": False})
    svc = TemplateService(legacy)
    try:
        run(svc.enroll("t", "p", z, {}))
    finally:
        svc.close()
    with caplog.at_level(logging.WARNING, logger="advface.service.key_folder"):
        svc = TemplateService(_config(tmp_path))
    try:
        assert svc.transforms is None and run(svc.verify("t", "p", probe)).match
    finally:
        svc.close()
    assert SQLiteFaissStore.read_meta(tmp_path / "data" / "templates.sqlite3").get("encryption", "none") == "none"
    assert "advface rotate-key" in caplog.text and "without the keyed transform" in caplog.text
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [SEED_KEY]  # no key it does not use


def test_an_encrypted_store_without_its_key_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    TemplateService(config).close()
    (tmp_path / "keys" / ENCRYPTION_KEY).unlink()
    with pytest.raises(ConfigError, match="restore the key folder"):
        resolve_key_folder(config)
    assert not (tmp_path / "keys" / ENCRYPTION_KEY).exists()  # never replaced by a new, useless key
    (tmp_path / "keys" / TRANSFORM_KEY).unlink()
    write_key_file(tmp_path / "k", generate_key())
    with pytest.raises(ConfigError, match="restore the key folder"):
        resolve_key_folder(_config(tmp_path, encryption={"key_file": str(tmp_path / "k")}, keys={}))


def test_sections_that_name_their_own_keys_keep_them(tmp_path: Path) -> None:
    write_key_file(tmp_path / "own.key", generate_key())
    config = _config(tmp_path, encryption={"key_file": str(tmp_path / "own.key")}, protection={"seed": 7})
    resolved = resolve_key_folder(config)
    assert resolved.encryption.key_file == str(tmp_path / "own.key") and resolved.protection.seed == 7
    assert resolved.keyed_transform.secret_file == str(tmp_path / "keys" / TRANSFORM_KEY)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [TRANSFORM_KEY]
    off = resolve_key_folder(_config(tmp_path / "off", keyed_transform={"enabled": False}, keys={"auto": False}))
    assert off.keyed_transform.enabled is False and off.encryption.key_file is None and off.protection.seed is None
    assert not (tmp_path / "off" / "keys").exists()


def test_the_folder_must_be_private_and_apart_from_the_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="overlap"):
        resolve_key_folder(_config(tmp_path, keys={"dir": str(tmp_path / "data" / "keys")}))
    with pytest.raises(ConfigError, match="overlap"):
        resolve_key_folder(_config(tmp_path, store={"data_dir": str(tmp_path / "keys" / "data")}))
    (tmp_path / "keys").mkdir(mode=0o755)
    (tmp_path / "keys").chmod(0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        resolve_key_folder(_config(tmp_path))
    assert list((tmp_path / "keys").iterdir()) == []


def test_tools_that_read_a_store_never_create_keys(tmp_path: Path) -> None:
    nothing = resolve_key_folder(_config(tmp_path), create=False)  # no store: nothing demanded, nothing made
    assert nothing.encryption.key_file is None and nothing.keyed_transform.enabled is False
    assert not (tmp_path / "keys").exists()
    config = _config(tmp_path)
    TemplateService(config).close()
    (tmp_path / "keys" / TRANSFORM_KEY).unlink()
    with pytest.raises(ConfigError, match="transform.key"):
        resolve_key_folder(config, create=False)
    assert not (tmp_path / "keys" / TRANSFORM_KEY).exists()


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    folders = [KeyFolder(tmp_path / "keys") for _ in range(8)]

    async def ensure_all() -> list[list[str]]:
        return list(await asyncio.gather(*(asyncio.to_thread(f.ensure) for f in folders)))

    created = run(ensure_all())
    assert sorted(name for names in created for name in names) == sorted(KEY_NAMES)  # each made exactly once
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.endswith(".tmp")]
    assert len({load_key_file(tmp_path / "keys" / ENCRYPTION_KEY) for _ in folders}) == 1
