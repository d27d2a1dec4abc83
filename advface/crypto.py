"""Authenticated encryption of stored templates (AES-256-GCM) with a keyring for key rotation.

A :class:`TemplateCipher` holds one *primary* key (used to encrypt) and any number of *previous* keys (accepted
when decrypting, so that a database can be re-encrypted row by row while it stays readable). Every blob it writes
is self-describing::

    version (1 byte, 0x01) | key id (8 bytes) | nonce (12 random bytes) | ciphertext + 16-byte GCM tag

The header (version and key id) is authenticated together with the caller's associated data (``aad``; the stores
pass tenant and template id, so a ciphertext moved to another row is rejected). Decryption failures of any kind
(tampered bytes, wrong key, wrong ``aad``, unknown key id, truncated blob) raise
:class:`~advface.errors.IntegrityError`; nothing ever falls back to plaintext.

Key sources (each gives 32 bytes; see :func:`load_cipher`):

* a key file: 32 raw bytes, or a text file holding the key as base64 or 64 hex digits. Files readable or writable by
  group or others are refused unless ``allow_insecure_permissions=True`` (``advface keygen`` writes mode 0600);
* an environment variable (default ``ADVFACE_ENCRYPTION_KEY``) holding the key as base64 (or 64 hex digits);
* a KMS hook: ``"package.module:function"``; the function is imported and called with no arguments and must return
  the key as 32 bytes (or a base64 / hex ``str``). Use it to fetch or unwrap the key from a KMS / HSM / vault at start.

Key ids are short public fingerprints (first 8 bytes of HMAC-SHA256(key, "advface key id"), 16 hex digits); they
identify a key without revealing it and are safe to log and to store beside the data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib
import os
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from advface.errors import ConfigError, IntegrityError

__all__ = [
    "BLOB_VERSION",
    "DEFAULT_KEY_ENV",
    "ENCRYPTED_OVERHEAD",
    "ENCRYPTION_SCHEME",
    "KEY_BYTES",
    "TemplateCipher",
    "blob_key_id",
    "generate_key",
    "key_fingerprint",
    "key_from_env",
    "key_from_kms_hook",
    "load_cipher",
    "load_key_file",
    "parse_key_text",
    "template_aad",
    "write_key_file",
]

#: Length of every key (AES-256).
KEY_BYTES = 32
#: First byte of every blob written by this version.
BLOB_VERSION = 1
#: Name of the scheme, recorded by the stores.
ENCRYPTION_SCHEME = "aes-256-gcm"
#: Bytes a blob adds to its plaintext (version, key id, nonce, tag).
ENCRYPTED_OVERHEAD = 1 + 8 + 12 + 16
#: Environment variable read by default for the key.
DEFAULT_KEY_ENV = "ADVFACE_ENCRYPTION_KEY"

_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = 1 + _KEY_ID_BYTES
_MIN_BLOB = _HEADER_BYTES + _NONCE_BYTES + _TAG_BYTES
assert _MIN_BLOB == ENCRYPTED_OVERHEAD
_KEY_ID_LABEL = b"advface key id"


def _key_id_bytes(key: bytes) -> bytes:
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).digest()[:_KEY_ID_BYTES]


def key_fingerprint(key: bytes) -> str:
    """The public id of ``key``: 16 hex digits (first 8 bytes of HMAC-SHA256(key, "advface key id"))."""
    return _key_id_bytes(_check_key(key, "key")).hex()


def _check_key(key: bytes, source: str) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise ConfigError(f"{source}: an encryption key must be bytes, got {type(key).__name__}")
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{source}: an encryption key must be {KEY_BYTES} bytes, got {len(key)}")
    if len(set(key)) <= 2:
        raise ConfigError(
            f"{source}: the encryption key is degenerate (almost all bytes equal); generate one with `advface keygen`"
        )
    return key


def parse_key_text(text: str, source: str) -> bytes:
    """A key written as text: 64 hex digits or base64 (standard or URL-safe) of 32 bytes. Errors name ``source``."""
    s = "".join(text.split())
    if not s:
        raise ConfigError(f"{source}: the encryption key is empty")
    if len(s) == 2 * KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in s):
        return _check_key(bytes.fromhex(s), source)
    try:
        raw = base64.b64decode(s.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source}: the encryption key is neither base64 nor 64 hex digits") from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{source}: the encryption key decodes to {len(raw)} bytes, expected {KEY_BYTES}")
    return _check_key(raw, source)


def generate_key() -> bytes:
    """32 fresh random bytes from the OS's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def load_key_file(path: str | os.PathLike[str], *, allow_insecure_permissions: bool = False) -> bytes:
    """Read a key file (32 raw bytes, or base64 / hex text). Refuses files group- or world-accessible (POSIX)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(f"encryption key file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"encryption key file {p}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"encryption key file {p} is not a regular file")
    if os.name == "posix" and st.st_mode & 0o066 and not allow_insecure_permissions:
        raise ConfigError(
            f"encryption key file {p} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {p}` (or allow it explicitly)"
        )
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"encryption key file {p}: {exc.strerror or exc}") from None
    if len(data) == KEY_BYTES:
        return _check_key(data, f"encryption key file {p}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(
            f"encryption key file {p}: {len(data)} bytes that are neither a raw {KEY_BYTES}-byte key "
            "nor base64/hex text"
        ) from None
    return parse_key_text(text, f"encryption key file {p}")


def write_key_file(path: str | os.PathLike[str], key: bytes, *, overwrite: bool = False) -> Path:
    """Write ``key`` as base64 text to a new file created with mode 0600 (refuses to replace one unless told)."""
    key = _check_key(key, "key")
    p = Path(path).expanduser()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"{p} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise ConfigError(f"cannot create key file {p}: {exc.strerror or exc}") from None
    try:
        if os.name == "posix":
            os.fchmod(fd, 0o600)
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return p


def key_from_env(name: str = DEFAULT_KEY_ENV, env: Mapping[str, str] | None = None) -> bytes:
    """The key held (base64 or hex) by environment variable ``name``; a clear error if unset or malformed."""
    env = os.environ if env is None else env
    value = env.get(name)
    if value is None or not value.strip():
        raise ConfigError(f"environment variable {name} (the encryption key) is not set")
    return parse_key_text(value, f"environment variable {name}")


def key_from_kms_hook(spec: str) -> bytes:
    """Import ``module:function``, call it without arguments, and check that it returns a key (bytes or text)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"encryption KMS hook {spec!r} must be 'package.module:function'")
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"encryption KMS hook {spec!r}: cannot import {module_name!r}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"encryption KMS hook {spec!r}: {module_name} has no callable {func_name!r}")
    try:
        value = func()
    except Exception as exc:  # noqa: BLE001 - any failure of the hook is a configuration failure at start
        raise ConfigError(f"encryption KMS hook {spec!r} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(value, str):
        return parse_key_text(value, f"encryption KMS hook {spec!r}")
    return _check_key(value, f"encryption KMS hook {spec!r}")


def template_aad(tenant: str, template_id: str, subject_id: str = "") -> bytes:
    """The associated data binding an encrypted template to its row: tenant, subject id and template id.

    Stores pass it to :meth:`TemplateCipher.encrypt` / :meth:`~TemplateCipher.decrypt`, so a ciphertext copied to
    another tenant, subject or template row fails authentication. (Ids are printable text: NUL separates them.)
    """
    return b"advface-template-v1\x00" + "\x00".join((tenant, subject_id, template_id)).encode("utf-8")


def blob_key_id(blob: bytes) -> str:
    """The key id a blob was encrypted under (IntegrityError if it is not an advface blob of a known version)."""
    _check_blob(blob)
    return bytes(blob[1:_HEADER_BYTES]).hex()


def _check_blob(blob: bytes) -> None:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise IntegrityError(f"an encrypted template must be bytes, got {type(blob).__name__}")
    if len(blob) < _MIN_BLOB:
        raise IntegrityError(f"encrypted template is truncated ({len(blob)} bytes, at least {_MIN_BLOB} expected)")
    if blob[0] != BLOB_VERSION:
        raise IntegrityError(f"encrypted template has unknown format version {blob[0]} (expected {BLOB_VERSION})")


class TemplateCipher:
    """AES-256-GCM over a keyring: ``keys[0]`` encrypts, every key decrypts (blobs name their key id)."""

    def __init__(self, keys: bytes | Sequence[bytes]) -> None:
        if isinstance(keys, (bytes, bytearray, memoryview)):
            keys = [bytes(keys)]
        keys = [_check_key(k, f"key #{i}") for i, k in enumerate(keys)]
        if not keys:
            raise ConfigError("a TemplateCipher needs at least one key")
        self._ring: dict[bytes, AESGCM] = {}
        self._keys: dict[bytes, bytes] = {}
        for k in keys:
            kid = _key_id_bytes(k)
            if kid not in self._ring:
                self._ring[kid] = AESGCM(k)
                self._keys[kid] = k
        self._primary = _key_id_bytes(keys[0])

    @classmethod
    def generate(cls) -> TemplateCipher:
        """A cipher with one fresh random key (tests, benchmarks)."""
        return cls(generate_key())

    @property
    def key_id(self) -> str:
        """Id of the primary (encrypting) key."""
        return self._primary.hex()

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of every key in the ring, primary first."""
        return tuple(kid.hex() for kid in self._ring)

    def with_previous(self, *others: TemplateCipher) -> TemplateCipher:
        """A cipher encrypting with this one's primary and decrypting with every key of this one and ``others``."""
        keys = list(self._keys.values())
        keys.insert(0, keys.pop(list(self._keys).index(self._primary)))
        for other in others:
            keys.extend(other._keys.values())
        return TemplateCipher(keys)

    def primary_only(self) -> TemplateCipher:
        """A cipher holding only this one's primary key."""
        return TemplateCipher(self._keys[self._primary])

    def has_key(self, key_id: str) -> bool:
        """Whether the ring holds the key with this id."""
        try:
            return bytes.fromhex(key_id) in self._ring
        except ValueError:
            return False

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt under the primary key with a fresh random 96-bit nonce; ``aad`` is authenticated, not stored."""
        header = bytes([BLOB_VERSION]) + self._primary
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + self._ring[self._primary].encrypt(nonce, bytes(plaintext), header + bytes(aad))

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt ``blob`` with the key it names; IntegrityError on any mismatch."""
        _check_blob(blob)
        blob = bytes(blob)
        header, kid = blob[:_HEADER_BYTES], blob[1:_HEADER_BYTES]
        aead = self._ring.get(kid)
        if aead is None:
            raise IntegrityError(
                f"encrypted template is under key id {kid.hex()}, which is not in the keyring "
                f"({', '.join(self.key_ids)})"
            )
        nonce = blob[_HEADER_BYTES : _HEADER_BYTES + _NONCE_BYTES]
        try:
            return aead.decrypt(nonce, blob[_HEADER_BYTES + _NONCE_BYTES :], header + bytes(aad))
        except InvalidTag:
            raise IntegrityError(
                f"encrypted template failed authentication under key id {kid.hex()} "
                "(tampered data, or stored under another record)"
            ) from None

    def needs_rotation(self, blob: bytes) -> bool:
        """True when ``blob`` is not encrypted under the primary key (or is not a valid blob at all)."""
        try:
            _check_blob(blob)
        except IntegrityError:
            return True
        return bytes(blob[1:_HEADER_BYTES]) != self._primary

    def __repr__(self) -> str:
        return f"TemplateCipher(primary={self.key_id}, keys={list(self.key_ids)})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("TemplateCipher holds secret keys and cannot be pickled")


def load_cipher(
    *,
    key_file: str | os.PathLike[str] | None = None,
    key_env: str | None = None,
    kms_hook: str | None = None,
    previous_key_files: Iterable[str | os.PathLike[str]] = (),
    allow_insecure_permissions: bool = False,
    env: Mapping[str, str] | None = None,
) -> TemplateCipher:
    """The cipher of exactly one primary key source plus previous key files (decrypt-only, for rotation)."""
    given = [name for name, v in (("key_file", key_file), ("key_env", key_env), ("kms_hook", kms_hook)) if v]
    if len(given) != 1:
        raise ConfigError(
            "encryption needs exactly one of key_file, key_env, kms_hook"
            + (f" (got {', '.join(given)})" if given else " (none given)")
        )
    if key_file:
        primary = load_key_file(key_file, allow_insecure_permissions=allow_insecure_permissions)
    elif key_env:
        primary = key_from_env(key_env, env)
    else:
        primary = key_from_kms_hook(str(kms_hook))
    keys = [primary]
    for path in previous_key_files:
        keys.append(load_key_file(path, allow_insecure_permissions=allow_insecure_permissions))
    return TemplateCipher(keys)
