"""On-disk embedding cache keyed by (pipeline fingerprint, image content), so benchmarks never recompute.

A cache holds raw embeddings of the images it was fed. It is meant for public benchmark datasets and is only used
when a caller asks for it (``advface embed --cache``, the benchmarks); never point it at enrolment photos.
Failures (no face, unreadable image) are cached too, with their reason.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advface.hashing import bytes_sha256
from advface.paths import cache_dir


@dataclass(frozen=True)
class CachedResult:
    """A cached outcome: an embedding, or the reason there is none."""

    embedding: np.ndarray | None
    error: str | None


class EmbeddingCache:
    """SQLite-backed map ``(pipeline, image sha256) -> embedding | error``. Safe to share between processes."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = cache_dir(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "embeddings.sqlite"
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS embeddings ("
            " pipeline TEXT NOT NULL, content TEXT NOT NULL, dim INTEGER, vector BLOB, error TEXT,"
            " PRIMARY KEY (pipeline, content))"
        )
        self._db.commit()

    @staticmethod
    def content_key(data: bytes) -> str:
        """The cache key of an image's bytes."""
        return bytes_sha256(data)

    def get_many(self, pipeline: str, contents: list[str]) -> dict[str, CachedResult]:
        """Cached results for the given content keys (missing keys are absent from the result)."""
        found: dict[str, CachedResult] = {}
        for start in range(0, len(contents), 500):
            chunk = contents[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT content, dim, vector, error FROM embeddings WHERE pipeline=? AND content IN ({marks})",
                [pipeline, *chunk],
            )
            for content, dim, vector, error in rows:
                emb = np.frombuffer(vector, dtype=np.float32).copy() if vector is not None else None
                if emb is not None and emb.shape != (dim,):
                    continue  # damaged row: recompute
                found[content] = CachedResult(emb, error)
        return found

    def put_many(self, pipeline: str, results: dict[str, CachedResult]) -> None:
        """Store results (one transaction)."""
        rows: list[tuple[str, str, int | None, bytes | None, str | None]] = []
        for content, result in results.items():
            if result.embedding is not None:
                vec = np.asarray(result.embedding, dtype=np.float32)
                rows.append((pipeline, content, int(vec.shape[0]), vec.tobytes(), None))
            else:
                rows.append((pipeline, content, None, None, result.error or "unknown error"))
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?, ?)", rows)

    def count(self, pipeline: str | None = None) -> int:
        """Number of cached entries, for one pipeline or all."""
        if pipeline is None:
            return int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM embeddings WHERE pipeline=?", [pipeline]).fetchone()[0])

    def clear(self, pipeline: str | None = None) -> None:
        """Delete cached entries (of one pipeline, or all) and reclaim the space."""
        with self._db:
            if pipeline is None:
                self._db.execute("DELETE FROM embeddings")
            else:
                self._db.execute("DELETE FROM embeddings WHERE pipeline=?", [pipeline])
        self._db.execute("VACUUM")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_cache_path() -> Path:
    """Where the default cache lives (``$ADVFACE_CACHE_DIR`` or ``~/.cache/advface``)."""
    return cache_dir() / "embeddings.sqlite"
