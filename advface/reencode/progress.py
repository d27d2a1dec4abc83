"""Progress of a re-encoding run, committed per chunk, so that a killed run resumes where it stopped.

A work folder holds:

- ``part-NNNNNNNN.npz``: the protected templates of chunk N (ids + vectors; never raw templates), each written to
  a temporary name, flushed and renamed, so a part is either whole or absent;
- ``journal.sqlite``: the run's parameters (a rerun with other ones is refused), one row per finished chunk
  (rows, the source cursor after it, its part file) and every id seen so far (a unique index: duplicate ids are
  caught across chunks without holding them in memory).

A chunk counts as done only once its journal row is committed, after its part file is in place; a crash between
the two just redoes that chunk. The destination is written from the parts at the end (see ``job.finalize``).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advface.errors import ConfigError, EmbeddingError

JOURNAL = "journal.sqlite"


def part_path(work_dir: Path, index: int) -> Path:
    """The part file of chunk ``index``."""
    return work_dir / f"part-{index:08d}.npz"


def write_part(work_dir: Path, index: int, ids: list[str], vectors: np.ndarray) -> Path:
    """Write chunk ``index``'s protected templates atomically (temporary file, fsync, rename)."""
    path = part_path(work_dir, index)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    with tmp.open("wb") as f:
        np.savez(f, ids=np.asarray(ids, dtype=np.str_), vectors=np.asarray(vectors, np.float32))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_part(path: Path) -> tuple[list[str], np.ndarray]:
    """A part file's ids and vectors."""
    with np.load(path, allow_pickle=False) as npz:
        return [str(x) for x in npz["ids"].tolist()], npz["vectors"]


@dataclass(frozen=True)
class Resume:
    """Where a run stands: chunks and rows done, and the source cursor after the last done chunk."""

    chunks: int
    rows: int
    cursor: Any


class Journal:
    """The journal of one run in ``work_dir`` (created if needed). ``params``: what must match to resume."""

    def __init__(self, work_dir: Path, params: dict[str, Any]) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.work_dir / JOURNAL, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS chunks (idx INTEGER PRIMARY KEY, rows INTEGER NOT NULL,"
            " cursor TEXT NOT NULL, part TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY, chunk INTEGER NOT NULL) WITHOUT ROWID;"
        )
        wanted = json.dumps(params, sort_keys=True)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'params'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('params', ?)", (wanted,))
        elif row[0] != wanted:
            old = json.loads(row[0])
            diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
            self.close()
            raise ConfigError(
                f"{self.work_dir} holds an unfinished run with other parameters ({', '.join(diff)} differ); "
                "rerun with the same parameters to resume it, or pass --restart to discard it"
            )

    # ------------------------------------------------------------------ state

    def get(self, key: str) -> Any:
        """A value saved with :meth:`put` (None if absent)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        """Save a JSON value (``dim``, ``id_kind``, ``state``...)."""
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def resume(self) -> Resume:
        """Chunks done so far (always a prefix 0..k-1) and the source cursor after them."""
        n, rows = self._db.execute("SELECT count(*), coalesce(sum(rows), 0) FROM chunks").fetchone()
        cursor = None
        if n:
            last = self._db.execute("SELECT idx, cursor FROM chunks ORDER BY idx DESC LIMIT 1").fetchone()
            if last[0] != n - 1:
                raise ConfigError(f"{self.work_dir}: journal has gaps; remove the folder (or --restart)")
            cursor = json.loads(last[1])
        return Resume(int(n), int(rows), cursor)

    def commit_chunk(self, index: int, ids: list[str], cursor: Any, part: Path) -> None:
        """Record chunk ``index`` as done (its part file must be in place); EmbeddingError on an id seen before."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            try:
                self._db.executemany("INSERT INTO ids VALUES (?, ?)", ((i, index) for i in ids))
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                dup = self._first_seen(ids)
                raise EmbeddingError(
                    f"duplicate id {dup[0]} (rows of chunks {dup[1]} and {index}, chunk size "
                    f"{self.get('chunk_size')}); ids must be unique -- fix the source, then rerun with --restart"
                ) from None
            self._db.execute("INSERT INTO chunks VALUES (?, ?, ?, ?)", (index, len(ids), json.dumps(cursor), part.name))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _first_seen(self, ids: list[str]) -> tuple[str, int]:
        for start in range(0, len(ids), 500):
            batch = ids[start : start + 500]
            row = self._db.execute(
                f"SELECT id, chunk FROM ids WHERE id IN ({','.join('?' * len(batch))}) LIMIT 1", batch
            ).fetchone()
            if row:
                return str(row[0]), int(row[1])
        return "?", -1  # pragma: no cover - the insert failed, so one exists

    def max_id_chars(self) -> int:
        """Longest id seen (characters)."""
        return int(self._db.execute("SELECT coalesce(max(length(id)), 0) FROM ids").fetchone()[0])

    def parts(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """The done chunks' protected templates, in order."""
        for (name,) in self._db.execute("SELECT part FROM chunks ORDER BY idx").fetchall():
            path = self.work_dir / name
            if not path.is_file():
                raise ConfigError(f"{path} is missing; the work folder was changed -- rerun with --restart")
            yield read_part(path)

    def close(self) -> None:
        """Close the journal database."""
        self._db.close()
