"""Thin access to Microsoft SEAL through TenSEAL's ``sealapi`` bindings: import check and bytes <-> objects.

TenSEAL's bindings save and load SEAL objects through file paths only; :func:`to_bytes` and :func:`from_bytes` go
through a private temporary folder (mode 0700, in ``/dev/shm`` when there is one) with one file per thread, unlinked
at once. Ciphertexts pass there, and a *wrapped* secret key while it is wrapped or unwrapped (a plain secret key is
written straight to its own 0600 file).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from advface.errors import ConfigError, IntegrityError

try:  # the optional "encrypted" extra
    import tenseal.sealapi as seal
except ImportError:  # pragma: no cover - exercised only without the extra
    seal = None

__all__ = ["from_bytes", "require", "to_bytes"]

_tmp_lock = threading.Lock()
_tmp_dir: Path | None = None


def require() -> Any:
    """The ``tenseal.sealapi`` module; ConfigError naming the extra when TenSEAL is not installed."""
    if seal is None:
        raise ConfigError("encrypted matching needs TenSEAL: pip install 'advface[encrypted]'")
    return seal


def _scratch() -> Path:
    global _tmp_dir
    with _tmp_lock:
        if _tmp_dir is None:
            shm = Path("/dev/shm")
            base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
            _tmp_dir = Path(tempfile.mkdtemp(prefix="advface-seal-", dir=base))
            atexit.register(shutil.rmtree, _tmp_dir, ignore_errors=True)
        return _tmp_dir


def _path() -> str:
    return str(_scratch() / f"{os.getpid()}-{threading.get_ident()}.bin")


def to_bytes(obj: Any) -> bytes:
    """The SEAL serialisation of ``obj`` (a ciphertext, public key, parameters...)."""
    path = _path()
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        _unlink(path)


def from_bytes(kind: Any, context: Any, data: bytes, what: str) -> Any:
    """A new ``kind`` (e.g. ``seal.Ciphertext``) loaded from ``data`` and checked against ``context``;
    IntegrityError naming ``what`` when SEAL rejects the bytes."""
    path = _path()
    obj = kind()
    try:
        with open(path, "wb") as f:
            f.write(data)
        obj.load(context, path)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise IntegrityError(f"{what}: not a valid SEAL object for these parameters ({exc})") from None
    finally:
        _unlink(path)
    return obj


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
