"""The one step both engines run on a chunk: check the raw templates, protect them. Pure: no I/O, no state.

The protector is any :class:`~advface.protect.TemplateProtector` (plain ``advface`` or identity-aware
``advface-id``, built by :func:`advface.protect.load_protector`). A template's protected value depends only on its
float32 bytes and the protection parameters (both methods seed the random start by ``(seed, row bytes)`` and run
the shadows -- and advface-id the encoder module -- on exactly ``lanes`` rows, with a data-independent jitter
schedule), so the output does not depend on the chunk size, the order, or the engine.
"""

from __future__ import annotations

import numpy as np

from advface.errors import EmbeddingError
from advface.protect import TemplateProtector


def check_chunk(ids: list[str], vectors: np.ndarray, dim: int, where: str) -> np.ndarray:
    """``vectors`` as C-contiguous float32 after checking them; EmbeddingError naming the first bad id.

    Checks: one id per row, no empty or duplicate id within the chunk, dimension ``dim``, finite, non-zero.
    """
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] != len(ids):
        raise EmbeddingError(f"{where}: {len(ids)} ids for vectors of shape {v.shape}")
    if len(ids) and v.shape[1] != dim:
        raise EmbeddingError(f"{where}: id {ids[0]} has dimension {v.shape[1]}, expected {dim}")
    for row_id in ids:
        if not row_id:
            raise EmbeddingError(f"{where}: empty id")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for row_id in ids:
            if row_id in seen:
                raise EmbeddingError(f"{where}: duplicate id {row_id}")
            seen.add(row_id)
    finite = np.isfinite(v).all(axis=1)
    if not finite.all():
        raise EmbeddingError(
            f"{where}: id {ids[int(np.flatnonzero(~finite)[0])]} has NaN or Inf values "
            f"({int((~finite).sum())} such rows in this chunk)"
        )
    zero = ~v.any(axis=1)
    if zero.any():
        raise EmbeddingError(f"{where}: id {ids[int(np.flatnonzero(zero)[0])]} is an all-zero vector")
    return v


def reencode_chunk(ids: list[str], vectors: np.ndarray, protector: TemplateProtector) -> tuple[list[str], np.ndarray]:
    """Protect one chunk: ``(ids, protected float32 vectors)`` in the same order (ids unchanged)."""
    v = check_chunk(list(ids), vectors, protector.dim, "chunk")
    return list(ids), protector.protect(v)
