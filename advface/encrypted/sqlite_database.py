"""The SQLite rows of an encrypted store (:class:`SQLiteBlockDatabase`, a
:class:`~advface.encrypted.database.BlockDatabase`): one file, one process at a time (``<file>.lock``), WAL,
``synchronous=FULL``, ``secure_delete=ON``; each transaction is ``BEGIN IMMEDIATE`` ... ``COMMIT``."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from advface.encrypted.database import BlockDatabase, SubjectRow, TemplateRow
from advface.store.sqlite_faiss.database import acquire_process_lock

__all__ = ["SQLiteBlockDatabase"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subjects (
    tenant TEXT NOT NULL, subject_id TEXT NOT NULL, metadata TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (tenant, subject_id));
CREATE TABLE IF NOT EXISTS templates (
    template_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, subject_id TEXT NOT NULL, seq INTEGER NOT NULL,
    block INTEGER NOT NULL, slot INTEGER NOT NULL, UNIQUE (tenant, block, slot));
CREATE INDEX IF NOT EXISTS templates_subject ON templates (tenant, subject_id, seq);
CREATE TABLE IF NOT EXISTS blocks (tenant TEXT NOT NULL, block INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (tenant, block));
CREATE TABLE IF NOT EXISTS rotated (tenant TEXT NOT NULL, block INTEGER NOT NULL, source_generation INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (tenant, block));
"""


class SQLiteBlockDatabase(BlockDatabase):
    """An encrypted store's rows in the SQLite file ``path`` (created private, mode 0600); ConfigError when another
    process (or this one) has it open."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self._lock_fd = acquire_process_lock(self.path)  # one process at a time (a sidecar, or `advface reencode`)
        try:
            if not self.path.exists():  # private before SQLite creates it (the -wal/-shm files copy its mode)
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except BaseException:
            self._release_process_lock()
            raise
        try:
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON", "foreign_keys=ON"):
                self.conn.execute(f"PRAGMA {pragma}")
            self.conn.executescript(_SCHEMA)
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        yield  # one process, one connection, serialised by the store: every read is consistent

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def put_meta(self, items: Iterable[tuple[str, str]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(items))

    def delete_meta(self, key: str) -> None:
        self.conn.execute("DELETE FROM meta WHERE key=?", (key,))

    def tenants_with_rows(self) -> list[str]:
        return [t for (t,) in self.conn.execute("SELECT tenant FROM blocks UNION SELECT tenant FROM templates")]

    def blocks(self, tenant: str) -> list[tuple[int, bytes]]:
        rows = self.conn.execute("SELECT block, data FROM blocks WHERE tenant=? ORDER BY block", (tenant,))
        return [(int(b), bytes(d)) for b, d in rows]

    def block(self, tenant: str, block: int) -> bytes | None:
        row = self.conn.execute("SELECT data FROM blocks WHERE tenant=? AND block=?", (tenant, block)).fetchone()
        return None if row is None else bytes(row[0])

    def block_numbers(self, tenant: str) -> list[int]:
        return [
            int(b) for (b,) in self.conn.execute("SELECT block FROM blocks WHERE tenant=? ORDER BY block", (tenant,))
        ]

    def put_blocks(self, tenant: str, blocks: Sequence[tuple[int, bytes]]) -> None:
        for block, data in blocks:
            self.conn.execute("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)", (tenant, block, data))

    def template_rows(self, tenant: str) -> list[tuple[str, str, int, int]]:
        rows = self.conn.execute("SELECT template_id, subject_id, block, slot FROM templates WHERE tenant=?", (tenant,))
        return [(str(t), str(s), int(b), int(x)) for t, s, b, x in rows]

    def insert_templates(self, rows: Sequence[TemplateRow]) -> None:
        self.conn.executemany("INSERT INTO templates VALUES (?, ?, ?, ?, ?, ?)", rows)

    def delete_templates_at(self, tenant: str, refs: Sequence[tuple[int, int]]) -> None:
        self.conn.executemany(
            "DELETE FROM templates WHERE tenant=? AND block=? AND slot=?", [(tenant, b, s) for b, s in refs]
        )

    def max_seq(self, tenant: str, stored: str) -> int:
        sql = "SELECT COALESCE(MAX(seq), 0) FROM templates WHERE tenant=? AND subject_id=?"
        return int(self.conn.execute(sql, (tenant, stored)).fetchone()[0])

    def template_ids(self, tenant: str, stored: str) -> list[str]:
        sql = "SELECT template_id FROM templates WHERE tenant=? AND subject_id=? ORDER BY seq"
        return [str(r[0]) for r in self.conn.execute(sql, (tenant, stored))]

    def subject_rows(self, tenant: str) -> list[tuple[str, str]]:
        rows = self.conn.execute("SELECT subject_id, metadata FROM subjects WHERE tenant=?", (tenant,))
        return [(str(s), str(t)) for s, t in rows]

    def subject(self, tenant: str, stored: str) -> tuple[str, float] | None:
        row = self.conn.execute(
            "SELECT metadata, created_at FROM subjects WHERE tenant=? AND subject_id=?", (tenant, stored)
        ).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    def insert_subject(self, tenant: str, stored: str, text: str, created_at: float) -> None:
        self.conn.execute("INSERT INTO subjects VALUES (?, ?, ?, ?)", (tenant, stored, text, created_at))

    def update_subjects(self, tenant: str, rows: Sequence[tuple[str, str]]) -> None:
        self.conn.executemany(
            "UPDATE subjects SET metadata=? WHERE tenant=? AND subject_id=?", [(t, tenant, s) for s, t in rows]
        )

    def delete_subjects(self, tenant: str, stored: Sequence[str]) -> None:
        self.conn.executemany("DELETE FROM subjects WHERE tenant=? AND subject_id=?", [(tenant, s) for s in stored])

    def has_subjects(self) -> bool:
        return self.conn.execute("SELECT 1 FROM subjects LIMIT 1").fetchone() is not None

    def subject_page(self, tenant: str, after: str, limit: int) -> list[SubjectRow]:
        rows = self.conn.execute(
            "SELECT subject_id, metadata, created_at FROM subjects WHERE tenant=? AND subject_id > ? "
            "ORDER BY subject_id LIMIT ?",
            (tenant, after, limit),
        )
        return [(str(s), str(t), float(c)) for s, t, c in rows]

    def count(self, table: Literal["subjects", "templates"], tenant: str | None) -> int:
        if table not in ("subjects", "templates"):
            raise ValueError(f"no table {table!r}")
        if tenant is None:
            return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {table} WHERE tenant=?", (tenant,)).fetchone()[0])

    def subject_tenants(self) -> list[str]:
        return [str(r[0]) for r in self.conn.execute("SELECT DISTINCT tenant FROM subjects ORDER BY tenant")]

    def rotated_generation(self, tenant: str, block: int) -> int | None:
        row = self.conn.execute(
            "SELECT source_generation FROM rotated WHERE tenant=? AND block=?", (tenant, block)
        ).fetchone()
        return None if row is None else int(row[0])

    def put_rotated(self, tenant: str, block: int, source_generation: int, data: bytes) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO rotated VALUES (?, ?, ?, ?)", (tenant, block, source_generation, data)
        )

    def rotation_rows(self) -> bool:
        return self.conn.execute("SELECT 1 FROM rotated LIMIT 1").fetchone() is not None

    def swap_rotated(self, fingerprint: str) -> None:
        self.conn.execute(
            "UPDATE blocks SET data = (SELECT r.data FROM rotated r WHERE r.tenant = blocks.tenant "
            "AND r.block = blocks.block)"
        )
        self.conn.execute("DELETE FROM rotated")
        self.conn.execute("UPDATE meta SET value=? WHERE key='fingerprint'", (fingerprint,))

    def compact(self) -> int:
        """``VACUUM`` between truncating WAL checkpoints (``secure_delete`` already zeroes freed pages)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.execute("VACUUM")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return self.path.stat().st_size

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.conn.close()
        self._release_process_lock()

    def _release_process_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
