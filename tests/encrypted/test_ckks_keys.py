from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from advface.encrypted.keys import (
    SECRET_FILE,
    check_pair,
    generate_keys,
    load_binding_key,
    load_keyservice_folder,
    load_sidecar_folder,
    write_keyservice_folder,
    write_sidecar_folder,
)
from advface.errors import ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_folders_split_the_keys(tmp_path: Path, keys, binding_key: bytes) -> None:
    sidecar = write_sidecar_folder(tmp_path / "sidecar", keys, binding_key)
    service = write_keyservice_folder(tmp_path / "ks", keys, binding_key)
    assert not (sidecar / SECRET_FILE).exists()
    assert _mode(service / SECRET_FILE) == 0o600
    assert all(_mode(p) == 0o600 for p in sidecar.iterdir())
    assert _mode(sidecar) == 0o700
    public = load_sidecar_folder(sidecar)
    secret = load_keyservice_folder(service)
    assert public.fingerprint == secret.fingerprint == keys.fingerprint
    assert load_binding_key(sidecar) == load_binding_key(service) == binding_key
    with pytest.raises(ConfigError, match="not a key-service folder"):
        load_keyservice_folder(sidecar)


def test_refuses_to_overwrite(tmp_path: Path, keys, binding_key: bytes) -> None:
    write_sidecar_folder(tmp_path, keys, binding_key)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_keyservice_folder(tmp_path, keys, binding_key)


def test_altered_public_key_refused(tmp_path: Path, keys, binding_key: bytes) -> None:
    folder = write_sidecar_folder(tmp_path, keys, binding_key)
    other = write_sidecar_folder(tmp_path / "other", generate_keys(), binding_key)
    (folder / "ckks-public.seal").write_bytes((other / "ckks-public.seal").read_bytes())
    with pytest.raises(ConfigError, match="does not match the fingerprint"):
        load_sidecar_folder(folder)


def test_missing_or_foreign_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an encrypted-matching key folder"):
        load_sidecar_folder(tmp_path)
    (tmp_path / "ckks.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="key description"):
        load_sidecar_folder(tmp_path)


def test_wrong_key_pair_refused(tmp_path: Path, keys, binding_key: bytes) -> None:
    folder = write_keyservice_folder(tmp_path / "a", keys, binding_key)
    other = write_keyservice_folder(tmp_path / "b", generate_keys(), binding_key)
    secret = folder / SECRET_FILE
    secret.chmod(0o600)
    secret.write_bytes((other / SECRET_FILE).read_bytes())
    with pytest.raises(ConfigError, match="wrong key pair"):
        load_keyservice_folder(folder)


def test_secret_readable_by_others_refused(tmp_path: Path, keys, binding_key: bytes) -> None:
    folder = write_keyservice_folder(tmp_path, keys, binding_key)
    os.chmod(folder / SECRET_FILE, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_keyservice_folder(folder)


def test_check_pair_accepts_matching(keys) -> None:
    check_pair(keys)


def test_wrapped_secret_key(tmp_path: Path, keys, binding_key: bytes) -> None:
    from advface.encrypted.keys import WRAPPED_SECRET_FILE

    wrap, other = os.urandom(32), os.urandom(32)
    folder = write_keyservice_folder(tmp_path / "ks", keys, binding_key, wrap)
    assert not (folder / SECRET_FILE).exists()
    assert _mode(folder / WRAPPED_SECRET_FILE) == 0o600
    assert load_keyservice_folder(folder, wrap).fingerprint == keys.fingerprint
    with pytest.raises(ConfigError, match="is wrapped"):
        load_keyservice_folder(folder)
    with pytest.raises(ConfigError, match="cannot unwrap"):
        load_keyservice_folder(folder, other)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_keyservice_folder(tmp_path / "ks", keys, binding_key, wrap)
