"""advface.service.keys: the encryption cipher and the keyed-transform secret and transforms of a configuration."""

from __future__ import annotations

import base64
import sys
import types
from pathlib import Path

import pytest
import yaml

from advface import crypto
from advface.config import EncryptionConfig, KeyedTransformConfig, load_config
from advface.crypto import generate_key, write_key_file
from advface.errors import ConfigError
from advface.protect.tenant_transform import CALIBRATED_NORMS
from advface.service.keys import cipher_from_config, load_transform_secret, transforms_from_config


def test_cipher_from_the_encryption_section(tmp_path: Path) -> None:
    new, old = crypto.generate_key(), crypto.generate_key()
    crypto.write_key_file(tmp_path / "new", new)
    crypto.write_key_file(tmp_path / "old", old)
    assert cipher_from_config(EncryptionConfig()) is None
    cipher = cipher_from_config(
        EncryptionConfig(key_file=str(tmp_path / "new"), previous_key_files=(str(tmp_path / "old"),))
    )
    assert cipher is not None and cipher.key_id == crypto.key_fingerprint(new)
    assert crypto.key_fingerprint(old) in cipher.key_ids
    env = {"MY_KEY": base64.b64encode(new).decode()}
    assert cipher_from_config(EncryptionConfig(key_env="MY_KEY"), env=env).key_id == cipher.key_id  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="previous_key_files"):
        cipher_from_config(EncryptionConfig(previous_key_files=(str(tmp_path / "old"),)))


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_key()
    write_key_file(tmp_path / "t.key", key)
    assert load_transform_secret(KeyedTransformConfig(secret_file=str(tmp_path / "t.key"))) == key
    assert (
        load_transform_secret(KeyedTransformConfig(secret_env="MY_T"), env={"MY_T": base64.b64encode(key).decode()})
        == key
    )
    hook = types.ModuleType("_advface_test_transform_hook")
    hook.secret = lambda: key  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, hook.__name__, hook)
    assert load_transform_secret(KeyedTransformConfig(kms_hook=f"{hook.__name__}:secret")) == key
    with pytest.raises(ConfigError, match="exactly one secret source.*none given"):
        load_transform_secret(KeyedTransformConfig())
    with pytest.raises(ConfigError, match="got secret_file, secret_env"):
        load_transform_secret(KeyedTransformConfig(secret_file=str(tmp_path / "t.key"), secret_env="MY_T"))
    with pytest.raises(ConfigError, match="keyed_transform secret: environment variable MY_T"):
        load_transform_secret(KeyedTransformConfig(secret_env="MY_T"), env={})
    (tmp_path / "open.key").write_text(base64.b64encode(key).decode())
    (tmp_path / "open.key").chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        load_transform_secret(KeyedTransformConfig(secret_file=str(tmp_path / "open.key")))
    assert (
        load_transform_secret(
            KeyedTransformConfig(secret_file=str(tmp_path / "open.key"), allow_insecure_secret_file=True)
        )
        == key
    )


def test_transforms_from_the_keyed_transform_section(tmp_path: Path) -> None:
    write_key_file(tmp_path / "t.key", generate_key())
    (tmp_path / "a.yaml").write_text("keyed_transform: {enabled: true, secret_file: t.key, version: 3}\n")
    cfg = load_config(tmp_path / "a.yaml", env={})
    kt = cfg.keyed_transform
    assert kt.enabled and kt.secret_file == str(tmp_path / "t.key") and kt.norm == "auto" and kt.version == 3
    tt = transforms_from_config(kt, 128, "dlib")
    assert tt is not None and tt.version == 3 and tt.norm == CALIBRATED_NORMS["dlib"]
    assert transforms_from_config(load_config(None, env={}).keyed_transform, 128, "dlib") is None
    assert load_config(None, env={}).keyed_transform.enabled is None  # unset: the key folder decides
    # environment overrides (section name with an underscore)
    env = {
        "ADVFACE_KEYED_TRANSFORM_ENABLED": "yes",
        "ADVFACE_KEYED_TRANSFORM_SECRET_ENV": "ADVFACE_TRANSFORM_SECRET",
        "ADVFACE_KEYED_TRANSFORM_NORM": "null",
        "ADVFACE_KEYED_TRANSFORM_VERSION": "7",
        "ADVFACE_TRANSFORM_SECRET": base64.b64encode(generate_key()).decode(),
    }
    kt = load_config(None, env=env).keyed_transform
    assert (kt.enabled, kt.secret_env, kt.norm, kt.version) == (True, "ADVFACE_TRANSFORM_SECRET", None, 7)
    assert transforms_from_config(kt, 128, "dlib", env=env).norm is None  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="no norm is calibrated"):
        transforms_from_config(KeyedTransformConfig(enabled=True, secret_file=str(tmp_path / "t.key")), 128, "onnx-x")
    # round trip
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(tmp_path / "b.yaml", env={}) == cfg
