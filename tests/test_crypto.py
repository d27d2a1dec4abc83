"""advface.crypto: AES-256-GCM blobs, keyring rotation, key sources (file, environment, KMS hook) and errors."""

from __future__ import annotations

import base64
import os
import sys
import types
from pathlib import Path

import pytest

from advface import crypto
from advface.crypto import TemplateCipher, blob_key_id, template_aad
from advface.errors import ConfigError, IntegrityError

AAD = template_aad("tenant", "0" * 32, "subject")


def test_round_trip_and_blob_layout() -> None:
    c = TemplateCipher.generate()
    blob = c.encrypt(b"x" * 512, AAD)
    assert len(blob) == 512 + crypto.ENCRYPTED_OVERHEAD
    assert blob[0] == crypto.BLOB_VERSION and blob[1:9].hex() == c.key_id == blob_key_id(blob)
    assert b"x" * 16 not in blob
    assert c.decrypt(blob, AAD) == b"x" * 512
    assert c.encrypt(b"x" * 512, AAD) != blob  # fresh nonce every time
    assert len(c.key_id) == 16 and c.key_id == crypto.key_fingerprint(c._keys[bytes.fromhex(c.key_id)])


@pytest.mark.parametrize("where", [0, 1, 5, 12, 30, -1])
def test_any_flipped_bit_is_rejected(where: int) -> None:
    c = TemplateCipher.generate()
    blob = bytearray(c.encrypt(b"template bytes", AAD))
    blob[where] ^= 0x01
    with pytest.raises(IntegrityError):
        c.decrypt(bytes(blob), AAD)


def test_wrong_aad_wrong_key_truncation() -> None:
    c, other = TemplateCipher.generate(), TemplateCipher.generate()
    blob = c.encrypt(b"v", AAD)
    with pytest.raises(IntegrityError, match="failed authentication"):
        c.decrypt(blob, template_aad("tenant", "1" * 32, "subject"))  # moved to another row
    with pytest.raises(IntegrityError, match="not in the keyring"):
        other.decrypt(blob, AAD)
    with pytest.raises(IntegrityError, match="truncated"):
        c.decrypt(blob[:20], AAD)
    with pytest.raises(IntegrityError):
        c.decrypt("not bytes", AAD)  # type: ignore[arg-type]
    # a forged header naming the right key id still fails (the header is authenticated)
    forged = bytes([crypto.BLOB_VERSION]) + bytes.fromhex(c.key_id) + os.urandom(40)
    with pytest.raises(IntegrityError):
        c.decrypt(forged, AAD)


def test_keyring_rotation() -> None:
    old, new = TemplateCipher.generate(), TemplateCipher.generate()
    blob = old.encrypt(b"v", AAD)
    ring = new.with_previous(old)
    assert ring.key_id == new.key_id and set(ring.key_ids) == {old.key_id, new.key_id}
    assert ring.decrypt(blob, AAD) == b"v"
    assert ring.needs_rotation(blob) and not old.needs_rotation(blob)
    fresh = ring.encrypt(b"v", AAD)
    assert blob_key_id(fresh) == new.key_id and not ring.needs_rotation(fresh)
    assert ring.primary_only().key_ids == (new.key_id,)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(ring)
    assert new.key_id in repr(ring) and "TemplateCipher" in repr(ring)


def test_key_validation() -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        TemplateCipher(b"short")
    with pytest.raises(ConfigError, match="degenerate"):
        TemplateCipher(bytes(32))
    with pytest.raises(ConfigError):
        TemplateCipher([])


def test_key_file_formats_and_permissions(tmp_path: Path) -> None:
    key = crypto.generate_key()
    path = crypto.write_key_file(tmp_path / "k", key)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert crypto.load_key_file(path) == key
    with pytest.raises(ConfigError, match="already exists"):
        crypto.write_key_file(path, key)
    for name, data in (("raw", key), ("hex", key.hex().encode() + b"\n"), ("b64", base64.b64encode(key))):
        p = tmp_path / name
        p.write_bytes(data)
        p.chmod(0o600)
        assert crypto.load_key_file(p) == key
    loose = tmp_path / "loose"
    loose.write_bytes(key)
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        crypto.load_key_file(loose)
    assert crypto.load_key_file(loose, allow_insecure_permissions=True) == key
    with pytest.raises(ConfigError, match="does not exist"):
        crypto.load_key_file(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_bytes(b"hello world")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="neither base64"):
        crypto.load_key_file(bad)
    short = tmp_path / "short"
    short.write_bytes(base64.b64encode(key[:16]))
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="16 bytes"):
        crypto.load_key_file(short)


def test_key_from_env() -> None:
    key = crypto.generate_key()
    assert crypto.key_from_env(env={crypto.DEFAULT_KEY_ENV: base64.b64encode(key).decode()}) == key
    with pytest.raises(ConfigError, match="is not set"):
        crypto.key_from_env(env={})
    with pytest.raises(ConfigError, match="ADVFACE_ENCRYPTION_KEY"):
        crypto.key_from_env(env={crypto.DEFAULT_KEY_ENV: "not a key!"})


def test_kms_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    key = crypto.generate_key()
    module = types.ModuleType("fake_kms_for_tests")
    module.get_key = lambda: key  # type: ignore[attr-defined]
    module.get_text = lambda: base64.b64encode(key).decode()  # type: ignore[attr-defined]
    module.broken = lambda: (_ for _ in ()).throw(RuntimeError("kms down"))  # type: ignore[attr-defined]
    module.short = lambda: b"123"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_kms_for_tests", module)
    assert crypto.key_from_kms_hook("fake_kms_for_tests:get_key") == key
    assert crypto.key_from_kms_hook("fake_kms_for_tests:get_text") == key
    with pytest.raises(ConfigError, match="kms down"):
        crypto.key_from_kms_hook("fake_kms_for_tests:broken")
    with pytest.raises(ConfigError, match="32 bytes"):
        crypto.key_from_kms_hook("fake_kms_for_tests:short")
    with pytest.raises(ConfigError, match="no callable"):
        crypto.key_from_kms_hook("fake_kms_for_tests:nothing")
    with pytest.raises(ConfigError, match="cannot import"):
        crypto.key_from_kms_hook("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="package.module:function"):
        crypto.key_from_kms_hook("no-colon")


def test_load_cipher(tmp_path: Path) -> None:
    new, old = crypto.generate_key(), crypto.generate_key()
    crypto.write_key_file(tmp_path / "new", new)
    crypto.write_key_file(tmp_path / "old", old)
    c = crypto.load_cipher(key_file=tmp_path / "new", previous_key_files=[tmp_path / "old"])
    assert c.key_id == crypto.key_fingerprint(new) and crypto.key_fingerprint(old) in c.key_ids
    with pytest.raises(ConfigError, match="exactly one"):
        crypto.load_cipher()
    with pytest.raises(ConfigError, match="exactly one"):
        crypto.load_cipher(key_file=tmp_path / "new", key_env="X")


def test_config_section(tmp_path: Path) -> None:
    from advface.config import load_config

    crypto.write_key_file(tmp_path / "k", crypto.generate_key())
    cfg = tmp_path / "a.yaml"
    cfg.write_text("encryption:\n  key_file: k\n")
    c = load_config(cfg, env={})
    assert c.encryption.enabled and c.encryption.key_file == str(tmp_path / "k")
    assert not load_config(None, env={}).encryption.enabled
    cfg.write_text("encryption:\n  key_file: k\n  key_env: ADVFACE_ENCRYPTION_KEY\n")
    with pytest.raises(ConfigError, match="only one"):
        load_config(cfg, env={})
    cfg.write_text("encryption:\n  kms_hook: not a hook\n")
    with pytest.raises(ConfigError, match="kms_hook"):
        load_config(cfg, env={})
    cfg.write_text("encryption:\n  previous_key_files: [k]\n")
    with pytest.raises(ConfigError, match="needs a current key"):
        load_config(cfg, env={})
    # the key variable itself is no override, but setting it without configuring encryption is an error
    with pytest.raises(ConfigError, match="encryption is not configured"):
        load_config(None, env={"ADVFACE_ENCRYPTION_KEY": "x"})
    c = load_config(None, env={"ADVFACE_ENCRYPTION_KEY": "x", "ADVFACE_ENCRYPTION_KEY_ENV": "ADVFACE_ENCRYPTION_KEY"})
    assert c.encryption.key_env == "ADVFACE_ENCRYPTION_KEY"
