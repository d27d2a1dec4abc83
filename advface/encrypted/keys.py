"""Key pairs of encrypted matching and their two folders.

``advface`` splits the keys between two processes that never share a folder:

- the **sidecar folder** (:func:`write_sidecar_folder`): ``ckks.json`` (parameters and the key pair's
  fingerprint), ``ckks-public.seal`` (the public key: enough to encrypt templates and score probes) and
  ``binding.key`` (the HMAC key that binds requests to the key service; mode 0600);
- the **key-service folder** (:func:`write_keyservice_folder`): the same three files plus ``ckks-secret.seal``
  (mode 0600), the only copy of the secret key.

The fingerprint (SHA-256 of the parameters and the public key) names a key pair: galleries and requests carry it, so
a gallery or a sidecar of another key pair is refused before anything is decrypted. Loading re-computes it from the
files (a swapped or altered public key is refused), and the key service checks that its secret key decrypts what
the public key encrypts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advface.crypto import TemplateCipher, generate_key, load_key_file, write_key_file
from advface.encrypted._seal import from_bytes, require, to_bytes
from advface.encrypted.binding import BindingKeyring, binding_fingerprint
from advface.encrypted.params import CkksParams, make_context
from advface.errors import ConfigError, IntegrityError

__all__ = [
    "PublicKeys",
    "SecretKeys",
    "end_binding_grace",
    "generate_keys",
    "install_next_binding_key",
    "load_binding_key",
    "load_binding_keyring",
    "start_binding_rotation",
    "read_token",
    "load_keyservice_folder",
    "load_sidecar_folder",
    "write_keyservice_folder",
    "write_sidecar_folder",
]

META_FILE = "ckks.json"
PUBLIC_FILE = "ckks-public.seal"
SECRET_FILE = "ckks-secret.seal"
#: the secret key wrapped under a 32-byte key (AES-256-GCM), instead of SECRET_FILE
WRAPPED_SECRET_FILE = "ckks-secret.seal.enc"
_WRAP_AAD = b"advface ckks secret key\x00"
BINDING_FILE = "binding.key"
#: key-service folder, binding-key rotation: the new key of a started rotation (until it becomes binding.key), the
#: previous key and the end of its grace period
BINDING_NEW_FILE = "binding.key.new"
BINDING_PREVIOUS_FILE = "binding-previous.key"
BINDING_ROTATION_FILE = "binding-rotation.json"
#: sidecar folder: the new binding key, copied from the key-service host, until the store has switched to it
BINDING_NEXT_FILE = "binding.key.next"
#: the key service's bearer token (written by `advface keyservice keygen` into both folders)
TOKEN_FILE = "keyservice.token"
TOKEN_ENV = "ADVFACE_KEYSERVICE_TOKEN"
FORMAT = "advface.ckks.v1"


@dataclass
class PublicKeys:
    """Parameters, SEAL context, public key and the key pair's fingerprint (what the sidecar holds)."""

    params: CkksParams
    context: Any
    public_key: Any
    fingerprint: str

    def encryptor(self) -> Any:
        return require().Encryptor(self.context, self.public_key)


@dataclass
class SecretKeys:
    """The public half plus the secret key (what only the key service holds)."""

    public: PublicKeys
    secret_key: Any

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def decryptor(self) -> Any:
        return require().Decryptor(self.public.context, self.secret_key)


def _fingerprint(params: CkksParams, public_bytes: bytes) -> str:
    h = hashlib.sha256(b"advface ckks key pair\x00")
    h.update(params.digest().encode())
    h.update(public_bytes)
    return h.hexdigest()[:32]


def generate_keys(params: CkksParams | None = None) -> SecretKeys:
    """A fresh key pair for ``params`` (defaults: :class:`CkksParams`)."""
    seal = require()
    params = params or CkksParams()
    context = make_context(params)
    keygen = seal.KeyGenerator(context)
    public_key = seal.PublicKey()
    keygen.create_public_key(public_key)
    public = PublicKeys(params, context, public_key, _fingerprint(params, to_bytes(public_key)))
    return SecretKeys(public, keygen.secret_key())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (META_FILE, PUBLIC_FILE, SECRET_FILE, BINDING_FILE):
        if (path / name).exists():
            raise ConfigError(f"{path / name} already exists; refusing to overwrite keys")
    return path


def _write_public_files(path: Path, keys: PublicKeys, binding_key: bytes) -> None:
    meta = {"format": FORMAT, "params": keys.params.to_dict(), "fingerprint": keys.fingerprint}
    _write_private(path / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    _write_private(path / PUBLIC_FILE, to_bytes(keys.public_key))
    write_key_file(path / BINDING_FILE, binding_key)


def write_sidecar_folder(folder: str | os.PathLike[str], keys: PublicKeys | SecretKeys, binding_key: bytes) -> Path:
    """Write the sidecar's folder (no secret key, whatever ``keys`` holds); refuses to overwrite key files."""
    public = keys.public if isinstance(keys, SecretKeys) else keys
    path = _new_folder(folder)
    _write_public_files(path, public, binding_key)
    return path


def write_keyservice_folder(
    folder: str | os.PathLike[str], keys: SecretKeys, binding_key: bytes, wrap_key: bytes | None = None
) -> Path:
    """Write the key service's folder, secret key included (mode 0600); refuses to overwrite key files. With
    ``wrap_key`` (32 bytes: from a file, the environment or a KMS hook) the secret key is stored only wrapped
    (AES-256-GCM, ``ckks-secret.seal.enc``) and needs the same key to load."""
    path = _new_folder(folder)
    if (path / WRAPPED_SECRET_FILE).exists():
        raise ConfigError(f"{path / WRAPPED_SECRET_FILE} already exists; refusing to overwrite keys")
    _write_public_files(path, keys.public, binding_key)
    secret_path = path / SECRET_FILE
    if wrap_key is not None:
        blob = TemplateCipher(wrap_key).encrypt(to_bytes(keys.secret_key), _WRAP_AAD + keys.fingerprint.encode())
        _write_private(path / WRAPPED_SECRET_FILE, blob)
        return path
    _write_private(secret_path, b"")  # created 0600 before SEAL writes the key into it
    keys.secret_key.save(str(secret_path))
    return path


def new_binding_key() -> bytes:
    """32 random bytes for the request binding (HMAC-SHA256)."""
    return generate_key()


def load_binding_key(folder: str | os.PathLike[str]) -> bytes:
    """The binding key of a sidecar or key-service folder (a 0600 file)."""
    return load_key_file(Path(folder).expanduser() / BINDING_FILE)


def load_binding_keyring(folder: str | os.PathLike[str], now: float | None = None) -> BindingKeyring:
    """The binding keys a key service with this folder accepts: ``binding.key``, and during a rotation's grace period
    (``binding-rotation.json``) the previous key until its end. ConfigError for unreadable or mismatched files."""
    path = Path(folder).expanduser()
    current = load_binding_key(path)
    rotation = path / BINDING_ROTATION_FILE
    if not rotation.exists():
        return BindingKeyring(current)
    try:
        doc = json.loads(rotation.read_text())
        until = float(doc["previous_until"])
        previous_fp = str(doc["previous"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{rotation}: unreadable ({exc})") from None
    if (now if now is not None else time.time()) >= until:
        return BindingKeyring(current)  # the grace period is over: the previous key is refused
    previous = load_key_file(path / BINDING_PREVIOUS_FILE)
    if binding_fingerprint(previous) != previous_fp:
        raise ConfigError(f"{path / BINDING_PREVIOUS_FILE} does not match {rotation}")
    if previous == current:  # a rotation interrupted before its new key became current
        return BindingKeyring(current)
    return BindingKeyring(current, previous, until)


def start_binding_rotation(
    folder: str | os.PathLike[str], grace_s: float, *, now: float | None = None, force: bool = False
) -> bytes:
    """Make a new binding key current in a key-service folder and accept the previous one for ``grace_s`` more
    seconds; returns the new key (for the sidecar host). Resumable: an interrupted run is finished with the same new
    key. ConfigError while the grace period of an earlier rotation runs (unless ``force``: that earlier previous
    key is then refused at once)."""
    if not grace_s >= 0:
        raise ConfigError(f"the grace period must be >= 0 seconds, got {grace_s}")
    path = Path(folder).expanduser()
    now = time.time() if now is None else now
    current = load_binding_key(path)
    new_path = path / BINDING_NEW_FILE
    if new_path.exists():
        new = load_key_file(new_path)  # resume an interrupted run with its key
    else:
        keyring = load_binding_keyring(path, now)
        if keyring.previous is not None and not force:
            raise ConfigError(
                f"the grace period of the previous binding-key rotation of {path} runs until "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(keyring.previous_until))}: end it first "
                "(`advface keyservice rotate-binding finish`) once the sidecar uses the current key"
            )
        new = new_binding_key()
        _replace_private(new_path, base64.b64encode(new) + b"\n")
    if current != new:  # else: interrupted after the swap; only the clean-up is left
        _replace_private(path / BINDING_PREVIOUS_FILE, base64.b64encode(current) + b"\n")
        doc = {
            "previous": binding_fingerprint(current),
            "current": binding_fingerprint(new),
            "previous_until": now + float(grace_s),
            "started": now,
        }
        _replace_private(path / BINDING_ROTATION_FILE, (json.dumps(doc, indent=2) + "\n").encode())
        os.replace(new_path, path / BINDING_FILE)
        _fsync_dir(path)
    elif new_path.exists():
        os.unlink(new_path)
    return new


def end_binding_grace(folder: str | os.PathLike[str]) -> bool:
    """Refuse the previous binding key of a key-service folder from now on (delete it); whether there was one."""
    path = Path(folder).expanduser()
    if (path / BINDING_NEW_FILE).exists():
        raise ConfigError(f"a binding-key rotation of {path} is unfinished: run `rotate-binding start` again first")
    found = False
    for name in (BINDING_ROTATION_FILE, BINDING_PREVIOUS_FILE):  # the marker first: a crash leaves no grace
        try:
            os.unlink(path / name)
            found = True
        except FileNotFoundError:
            pass
    _fsync_dir(path)
    return found


def install_next_binding_key(folder: str | os.PathLike[str]) -> bytes:
    """Sidecar folder: make ``binding.key.next`` the binding key (atomic rename); returns it."""
    path = Path(folder).expanduser()
    new = load_key_file(path / BINDING_NEXT_FILE)
    os.replace(path / BINDING_NEXT_FILE, path / BINDING_FILE)
    _fsync_dir(path)
    return new


def _replace_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (0600 temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by an interrupted write
    _write_private(tmp, data)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_sidecar_folder(folder: str | os.PathLike[str]) -> PublicKeys:
    """The public keys of a folder; ConfigError when a file is missing, altered or of another key pair."""
    path = Path(folder).expanduser()
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{meta_path} does not exist: not an encrypted-matching key folder") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{meta_path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{meta_path}: not an {FORMAT} key description")
    params = CkksParams.from_dict(meta.get("params"))
    context = make_context(params)
    public_path = path / PUBLIC_FILE
    try:
        public_bytes = public_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{public_path}: {exc.strerror or exc}") from None
    fingerprint = _fingerprint(params, public_bytes)
    if not secrets.compare_digest(fingerprint, str(meta.get("fingerprint", ""))):
        raise ConfigError(
            f"{public_path} does not match the fingerprint in {meta_path}: altered, or from another key pair"
        )
    try:
        public_key = from_bytes(require().PublicKey, context, public_bytes, str(public_path))
    except IntegrityError as exc:
        raise ConfigError(str(exc)) from None
    return PublicKeys(params, context, public_key, fingerprint)


def load_keyservice_folder(folder: str | os.PathLike[str], wrap_key: bytes | None = None) -> SecretKeys:
    """The key service's keys; ConfigError when the secret key is missing, readable by others, wrapped under another
    key (or ``wrap_key`` is missing), or not the secret half of the folder's public key."""
    seal = require()
    public = load_sidecar_folder(folder)
    secret_path = Path(folder).expanduser() / SECRET_FILE
    wrapped_path = Path(folder).expanduser() / WRAPPED_SECRET_FILE
    if not secret_path.exists() and wrapped_path.exists():
        return _load_wrapped(public, wrapped_path, wrap_key)
    try:
        mode = secret_path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{secret_path} does not exist: not a key-service folder") from None
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(
            f"secret key {secret_path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {secret_path}`"
        )
    secret_key = seal.SecretKey()
    try:
        secret_key.load(public.context, str(secret_path))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{secret_path}: not a secret key for these parameters ({exc})") from None
    keys = SecretKeys(public, secret_key)
    check_pair(keys)
    return keys


def _load_wrapped(public: PublicKeys, path: Path, wrap_key: bytes | None) -> SecretKeys:
    if wrap_key is None:
        raise ConfigError(f"the secret key {path} is wrapped: give its wrapping key (file, environment or KMS hook)")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ConfigError(f"wrapped secret key {path} is accessible by group or others; run `chmod 600 {path}`")
    try:
        data = TemplateCipher(wrap_key).decrypt(path.read_bytes(), _WRAP_AAD + public.fingerprint.encode())
    except IntegrityError:
        raise ConfigError(f"{path}: cannot unwrap the secret key (another wrapping key, or altered)") from None
    try:
        secret_key = from_bytes(require().SecretKey, public.context, data, str(path))
    except IntegrityError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        del data
    keys = SecretKeys(public, secret_key)
    check_pair(keys)
    return keys


def check_pair(keys: SecretKeys) -> None:
    """ConfigError unless the secret key decrypts what the public key encrypts."""
    seal = require()
    context = keys.public.context
    encoder = seal.CKKSEncoder(context)
    probe = np.random.default_rng(secrets.randbits(64)).uniform(-1, 1, 16)
    plain = seal.Plaintext()
    encoder.encode(probe.tolist(), context.first_parms_id(), keys.public.params.template_scale, plain)
    cipher = seal.Ciphertext(context)
    keys.public.encryptor().encrypt(plain, cipher)
    out = seal.Plaintext()
    keys.decryptor().decrypt(cipher, out)
    back = np.asarray(encoder.decode_double(out))[:16]
    if not np.allclose(back, probe, atol=1e-3):
        raise ConfigError("the secret key is not the secret half of the public key (wrong key pair)")


def read_token(
    path: str | os.PathLike[str] | None,
    folder: str | os.PathLike[str] | None = None,
    *,
    env: str = TOKEN_ENV,
    what: str = "key service token",
) -> str:
    """A bearer token (default: the key service's): ``path``, else ``folder/keyservice.token`` if it exists, else
    the environment variable ``env``. Files accessible by group or others are refused; so are tokens of fewer than
    16 characters."""
    candidate = Path(path) if path else (Path(folder) / TOKEN_FILE if folder else None)
    if candidate is not None and (path or candidate.exists()):
        try:
            mode = candidate.stat().st_mode
            text = candidate.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{what} file {candidate}: {exc.strerror or exc}") from None
        if os.name == "posix" and mode & 0o077:
            raise ConfigError(f"{what} file {candidate} is accessible by group or others: chmod 600 it")
    else:
        text = os.environ.get(env, "").strip()
        if not text:
            raise ConfigError(f"no {what}: pass --token-file or set {env}")
    if len(text) < 16:
        raise ConfigError(f"the {what} must be at least 16 characters")
    return text
