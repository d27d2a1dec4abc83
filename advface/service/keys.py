"""The configuration's secrets as objects: the encryption-at-rest cipher and the keyed per-tenant transforms.

Both come from the same key sources (:mod:`advface.crypto`'s loaders: a key file written by ``advface keygen``, an
environment variable holding base64 / hex, or a KMS hook). A missing or unusable secret is a ConfigError when the
service starts, never a silent fallback to plaintext or to no transform.
"""

from __future__ import annotations

from collections.abc import Mapping

from advface.config import EncryptionConfig, KeyedTransformConfig
from advface.crypto import TemplateCipher, key_from_env, key_from_kms_hook, load_cipher, load_key_file
from advface.errors import ConfigError
from advface.protect.tenant_transform import TenantTransforms, resolve_norm


def cipher_from_config(section: EncryptionConfig, env: Mapping[str, str] | None = None) -> TemplateCipher | None:
    """The cipher of the ``encryption`` section; None when no key source is set (templates are then stored
    unencrypted). Key problems raise ConfigError."""
    if not section.enabled:
        if section.previous_key_files:
            raise ConfigError("encryption.previous_key_files is set but no current key (key_file, key_env, kms_hook)")
        return None
    return load_cipher(
        key_file=section.key_file,
        key_env=section.key_env,
        kms_hook=section.kms_hook,
        previous_key_files=section.previous_key_files,
        allow_insecure_permissions=section.allow_insecure_key_file,
        env=env,
    )


def load_transform_secret(section: KeyedTransformConfig, env: Mapping[str, str] | None = None) -> bytes:
    """The 32-byte deployment secret of the ``keyed_transform`` section (exactly one of ``secret_file``,
    ``secret_env``, ``kms_hook``). ConfigError naming the section."""
    given = [k for k in ("secret_file", "secret_env", "kms_hook") if getattr(section, k)]
    if len(given) != 1:
        raise ConfigError(
            "keyed_transform needs exactly one secret source: secret_file, secret_env or kms_hook"
            + (f" (got {', '.join(given)})" if given else " (none given)")
        )
    try:
        if section.secret_file:
            return load_key_file(section.secret_file, allow_insecure_permissions=section.allow_insecure_secret_file)
        if section.secret_env:
            return key_from_env(section.secret_env, env)
        return key_from_kms_hook(str(section.kms_hook))
    except ConfigError as exc:
        raise ConfigError(f"keyed_transform secret: {exc}") from None


def transforms_from_config(
    section: KeyedTransformConfig, dim: int, encoder_name: str, env: Mapping[str, str] | None = None
) -> TenantTransforms | None:
    """The tenant transforms of the ``keyed_transform`` section (None when ``enabled`` is false). Enabled without a
    usable secret, or with ``norm: auto`` for an uncalibrated encoder: ConfigError (never silently off)."""
    if not section.enabled:
        return None
    secret = load_transform_secret(section, env)
    norm = resolve_norm(section.norm, encoder_name)
    version = section.version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"keyed_transform.version must be an integer >= 1, got {version!r}")
    return TenantTransforms(secret, dim, version=version, norm=norm)
