"""Keyed per-tenant transform: a secret random orthogonal matrix applied on top of AdvFace templates.

``KeyedTransform.from_secret(secret, tenant, dim)`` derives a ``dim x dim`` orthogonal matrix ``Q`` from a deployment
secret and the tenant's name: HKDF-SHA256 (salt ``advface keyed transform v1``; info: tenant, dimension, key version)
gives a 256-bit seed, a seeded Gaussian matrix is QR-factorised and the signs of ``R``'s diagonal are folded into
``Q`` (so ``Q`` is Haar-distributed and fully determined by the seed). Templates are stored as ``Q z`` and probes
are transformed the same way before matching: inner products, euclidean distances and cosines between transformed
vectors equal those between the originals, so verification accuracy is unchanged (up to float32 rounding).

What it gives (measured in ``benchmarks/keyed_transform.py``; see ``docs/threat-model.md``):

* **unlinkability / renewability**: templates of the same person in two tenants (or before and after a key rotation)
  are compared through an unknown random rotation, so comparison scores no longer tell mated from non-mated pairs;
  re-issuing templates under a new key version (:func:`rekey`, or re-encoding) revokes the old ones;
* **not secrecy against a thief**: the transform is an isometry, and the statistics of face embeddings are
  anisotropic, so a thief holding many transformed templates of one tenant and public raw embeddings can estimate
  ``Q`` (``advface.attacks.key_recovery``); an insider who can enrol known faces and read back stored templates solves
  for ``Q`` directly. Encryption at rest (``advface.crypto``) is the layer that stops a database thief.

``key_id`` (16 hex digits, derived from secret, tenant, dimension and version) names a transform without revealing it.

``norm`` (optional, recommended for unlinkability): every vector is first scaled to this fixed norm (norm
equalisation), then rotated. A rotation keeps each template's norm, and template norms are identity-dependent, so
without it the system's own scores (euclidean distances) and a linker comparing norms still link templates of a
person across tenants a little (measured D_sys 0.08 and 0.26 on LFW/dlib). With it both drop to the noise floor;
scores are then those of the norm-equalised vectors (on LFW/dlib, with ``norm`` the mean norm of public dlib
embeddings, View-2 accuracy and TAR@FAR move by less than 0.1 points / up by a few points, see the benchmark).
:meth:`KeyedTransform.invert` then returns the norm-equalised vector (the original norm is not kept).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from advface.errors import ConfigError, EmbeddingError

__all__ = ["KeyedTransform", "derive_seed", "rekey"]

_SALT = b"advface keyed transform v1"
MIN_SECRET_BYTES = 16


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with SHA-256."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _info(tenant: str, dim: int, version: int, purpose: str) -> bytes:
    return f"{purpose}\x00tenant={tenant}\x00dim={dim}\x00version={version}".encode()


def _check(secret: bytes, tenant: str, dim: int, version: int) -> bytes:
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise ConfigError(f"the keyed-transform secret must be bytes, got {type(secret).__name__}")
    secret = bytes(secret)
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the keyed-transform secret must have at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
    if not isinstance(tenant, str) or not tenant:
        raise ConfigError(f"tenant must be a non-empty string, got {tenant!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 4096:
        raise ConfigError(f"dim must be an integer in [1, 4096], got {dim!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"version must be an integer >= 1, got {version!r}")
    return secret


def derive_seed(secret: bytes, tenant: str, dim: int, version: int = 1) -> int:
    """The 256-bit seed of a tenant's matrix: HKDF-SHA256(secret; tenant, dim, version)."""
    secret = _check(secret, tenant, dim, version)
    return int.from_bytes(_hkdf_sha256(secret, _SALT, _info(tenant, dim, version, "matrix"), 32), "big")


def _orthogonal(seed: int, dim: int) -> np.ndarray:
    gaussian = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))).standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return np.ascontiguousarray(q * signs)


@dataclass(frozen=True, eq=False)
class KeyedTransform:
    """A tenant's secret orthogonal matrix (``matrix``, float64) with its public ``key_id`` and ``version``."""

    matrix: np.ndarray = field(repr=False)
    tenant: str
    version: int
    key_id: str
    norm: float | None = None

    @classmethod
    def from_secret(
        cls, secret: bytes, tenant: str, dim: int, *, version: int = 1, norm: float | None = None
    ) -> KeyedTransform:
        """The transform of ``tenant`` for ``dim``-d templates under the deployment ``secret`` (>= 16 bytes) and
        key ``version`` (bump it to re-issue every template of the tenant with a fresh matrix); ``norm``: scale
        every vector to this norm before rotating it (see the module notes), None: keep norms."""
        secret = _check(secret, tenant, dim, version)
        if norm is not None and not (
            isinstance(norm, (int, float)) and not isinstance(norm, bool) and np.isfinite(norm) and norm > 0
        ):
            raise ConfigError(f"norm must be a positive number or None, got {norm!r}")
        q = _orthogonal(derive_seed(secret, tenant, dim, version), dim)
        key_id = _hkdf_sha256(secret, _SALT, _info(tenant, dim, version, "key id"), 8).hex()
        q.setflags(write=False)
        return cls(q, tenant, version, key_id, None if norm is None else float(norm))

    @property
    def dim(self) -> int:
        """Dimension of the templates it transforms."""
        return int(self.matrix.shape[0])

    def _rows(self, x: np.ndarray) -> np.ndarray:
        a = np.asarray(x)
        if a.ndim not in (1, 2) or a.shape[-1] != self.dim:
            raise EmbeddingError(f"expected vectors of dimension {self.dim} (shape (N, {self.dim})), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise EmbeddingError("vectors contain NaN or Inf")
        return a.astype(np.float64, copy=False)

    def _equalise(self, x: np.ndarray) -> np.ndarray:
        if self.norm is None:
            return x
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        if np.any(norms == 0):
            raise EmbeddingError("zero vectors cannot be norm-equalised")
        return x * (self.norm / norms)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``Q x`` (``Q (norm * x / |x|)`` with ``norm``) for each row of ``x`` (``N x dim`` or one vector), float32."""
        return (self._equalise(self._rows(x)) @ self.matrix.T).astype(np.float32)

    def invert(self, x: np.ndarray) -> np.ndarray:
        """``Q^T y``: undoes :meth:`apply` (up to float32 rounding)."""
        return (self._rows(x) @ self.matrix).astype(np.float32)

    def __repr__(self) -> str:
        norm = "" if self.norm is None else f", norm={self.norm:g}"
        return (
            f"KeyedTransform(tenant={self.tenant!r}, dim={self.dim}, version={self.version}, "
            f"key_id={self.key_id}{norm})"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("KeyedTransform holds a secret matrix and cannot be pickled")


def rekey(vectors: np.ndarray, old: KeyedTransform, new: KeyedTransform) -> np.ndarray:
    """Re-issue templates stored under ``old`` under ``new`` (``new.apply(old.invert(v))`` in one product).

    Scores between re-issued templates and probes transformed with ``new`` equal the old ones; the re-issued
    templates are unlinkable to the revoked ones for anyone who knows neither matrix.
    """
    if old.dim != new.dim:
        raise ConfigError(f"cannot rekey {old.dim}-d templates to a {new.dim}-d transform")
    if old.norm != new.norm:
        raise ConfigError(
            f"cannot rekey between transforms with different norm equalisation ({old.norm} vs {new.norm})"
        )
    return (old._rows(vectors) @ (new.matrix @ old.matrix.T).T).astype(np.float32)
