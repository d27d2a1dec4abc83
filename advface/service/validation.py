"""Checks of one request's values, before anything is computed or changed (ValidationError otherwise).

Ids and metadata follow the template store's rules (:mod:`advface.store.base`: ids of 1-128 printable characters
without leading or trailing whitespace; metadata of at most 32 keys); an empty tenant means :data:`DEFAULT_TENANT`.
Embeddings must have the encoder's dimension, be finite, not all zero, and have a norm of at most
:data:`MAX_REQUEST_NORM` (face encoders give norms of about 1 to 100: dlib's are near 1.4, unnormalised ArcFace
ones 10 to 50), far below the store's own last-line limit :data:`~advface.store.base.MAX_VECTOR_NORM`: a vector of
norm 1e14 would otherwise be stored and scored (-1e13), drowning every comparison it takes part in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from advface.errors import ValidationError
from advface.store import base as store_base

DEFAULT_TENANT = "default"
#: Largest norm of an embedding in a request (Enroll, Verify, Identify, Protect): 700x dlib's typical 1.4, 20x an
#: unnormalised ArcFace embedding's; the store's MAX_VECTOR_NORM (1e15) stays the last line.
MAX_REQUEST_NORM = 1e3
#: Smallest norm of an embedding in a request: below it a vector is zero for float32 matching (its squared norm
#: underflows), so every RPC refuses it the same way.
MIN_REQUEST_NORM = 1e-12


def check_id(value: str, what: str) -> str:
    """``value`` if it is a usable id (the store's rules); ValidationError naming ``what`` otherwise."""
    return store_base.check_id(value, what)


def check_tenant(value: str) -> str:
    """The request's tenant (empty -> ``"default"``), validated like an id."""
    return check_id(value or DEFAULT_TENANT, "tenant")


def check_metadata(metadata: Mapping[str, str], what: str = "metadata") -> dict[str, str]:
    """A plain dict copy of a metadata map within the store's limits; ValidationError otherwise."""
    return store_base.check_metadata(dict(metadata), what)


def check_embeddings(
    rows: Sequence[Sequence[float] | np.ndarray] | np.ndarray, dim: int, what: str = "embedding"
) -> np.ndarray:
    """``N x dim`` float32 from ``rows`` (N may be 0); ValidationError for a wrong dimension, NaN/Inf, zero rows or
    a norm above :data:`MAX_REQUEST_NORM`. Messages name the row when there are several."""
    if len(rows) == 0:
        return np.zeros((0, dim), np.float32)
    for i, row in enumerate(rows):
        if len(row) != dim:
            where = f"{what} {i}" if len(rows) > 1 else what
            raise ValidationError(f"{where} has dimension {len(row)}, expected {dim}")
    several = len(rows) > 1
    x = np.array(rows, dtype=np.float32).reshape(len(rows), dim)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))[:10].tolist()
        raise ValidationError(f"{what} rows {bad} contain NaN or Inf" if several else f"{what} contains NaN or Inf")
    x64 = x.astype(np.float64)
    norms = np.linalg.norm(x64, axis=1)
    x64.fill(0)  # a copy of the values: zeroed, not just freed (memory hygiene: docs/encrypted-matching.md)
    if (norms < MIN_REQUEST_NORM).any():  # zero, or so small that float32 arithmetic rounds it to zero
        bad = np.flatnonzero(norms < MIN_REQUEST_NORM)[:10].tolist()
        zero = f"{what} rows {bad} are zero (or vanishing) vectors" if several else None
        raise ValidationError(zero or f"{what} is a zero (or vanishing) vector")
    limit = min(MAX_REQUEST_NORM, store_base.MAX_VECTOR_NORM)
    if (norms > limit).any():
        bad = np.flatnonzero(norms > limit)[:10].tolist()
        which = f"{what} rows {bad} have norms" if several else f"{what} has a norm of {norms[0]:.3g},"
        raise ValidationError(
            f"{which} above the limit of {limit:g} for embeddings in requests (face encoders give norms of about "
            "1 to 100): send the encoder's embedding unscaled"
        )
    return x


def check_batch(size: int, limit: int, what: str) -> None:
    """ValidationError when a batch of ``size`` ``what`` is over ``limit``."""
    if size > limit:
        raise ValidationError(f"batch of {size} {what} is over the limit of {limit}")
