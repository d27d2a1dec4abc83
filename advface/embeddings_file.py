"""The embeddings-file format used everywhere in advface: an ``.npz`` with ``ids`` and ``embeddings``.

- ``ids``: unicode array (N,), unique;
- ``embeddings``: float32 array (N, D);
- optional ``encoder`` (0-d string: the encoder's name) and ``fingerprint`` (0-d string);
- optional ``failed_ids`` / ``failed_reasons``: inputs that produced no embedding, and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from advface.errors import EmbeddingError


@dataclass
class EmbeddingsFile:
    """In-memory content of an embeddings file."""

    ids: list[str]
    embeddings: np.ndarray
    encoder: str | None = None
    fingerprint: str | None = None
    failed: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.ids):
            raise EmbeddingError(f"{len(self.ids)} ids but embeddings of shape {self.embeddings.shape}")
        if len(set(self.ids)) != len(self.ids):
            raise EmbeddingError("ids are not unique")


def save_embeddings(path: str | os.PathLike[str], data: EmbeddingsFile) -> Path:
    """Write ``data`` to ``path`` (atomically: a temporary file renamed into place)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    arrays: dict[str, np.ndarray] = {
        "ids": np.asarray(data.ids, dtype=np.str_),
        "embeddings": data.embeddings,
        "failed_ids": np.asarray(list(data.failed), dtype=np.str_),
        "failed_reasons": np.asarray(list(data.failed.values()), dtype=np.str_),
    }
    if data.encoder:
        arrays["encoder"] = np.asarray(data.encoder)
    if data.fingerprint:
        arrays["fingerprint"] = np.asarray(data.fingerprint)
    np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy stub: **kwds could bind keyword-only allow_pickle
    os.replace(tmp, path)
    return path


def load_embeddings(path: str | os.PathLike[str]) -> EmbeddingsFile:
    """Read an embeddings file; raise EmbeddingError if it lacks ``ids``/``embeddings`` or they disagree."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "ids" not in npz or "embeddings" not in npz:
                raise EmbeddingError(f"{path}: not an embeddings file (needs 'ids' and 'embeddings')")
            failed_ids = npz["failed_ids"].tolist() if "failed_ids" in npz else []
            reasons = npz["failed_reasons"].tolist() if "failed_reasons" in npz else []
            return EmbeddingsFile(
                ids=[str(i) for i in npz["ids"].tolist()],
                embeddings=npz["embeddings"],
                encoder=str(npz["encoder"]) if "encoder" in npz else None,
                fingerprint=str(npz["fingerprint"]) if "fingerprint" in npz else None,
                failed=dict(zip(failed_ids, reasons, strict=False)),
            )
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"{path}: cannot read embeddings file ({exc})") from exc
