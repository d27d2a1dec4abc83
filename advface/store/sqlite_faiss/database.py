"""The SQLite file of a :class:`~advface.store.sqlite_faiss.SQLiteFaissStore`: its process lock, the connection
and its pragmas (WAL, ``synchronous=FULL``, ``secure_delete``), the schema and ``meta`` table, transactions and WAL
checkpoints."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from advface.errors import ClosedError, ConfigError
from advface.store.base import StoreMetric

try:  # POSIX only; elsewhere the single-process check is skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT = "advface-template-store"
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE subjects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (tenant, subject_id)
);
CREATE TABLE templates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    template_id TEXT NOT NULL UNIQUE,
    subject INTEGER NOT NULL REFERENCES subjects (id) ON DELETE CASCADE,
    vector BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX templates_by_subject ON templates (subject);
"""


def acquire_process_lock(path: Path) -> int | None:
    """Lock ``<path>.lock`` (one process per database file; close the descriptor to release it); the lock file's
    descriptor (None where flock does not exist). ConfigError if another process, or this one, holds it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if fcntl is None:  # pragma: no cover
        return None
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"template store {path} is already open (in this or another process)") from None
    return fd


class SQLiteDatabase:
    """The database side of :class:`~advface.store.sqlite_faiss.SQLiteFaissStore` (a mixin): opening and checking
    the file, one transaction at a time on its connection, and its ``meta`` table."""

    path: Path
    dim: int
    metric: StoreMetric
    _conn: sqlite3.Connection | None
    _db_lock: threading.Lock  # the SQLite connection
    _closed: bool

    def _acquire_process_lock(self) -> int | None:
        """Lock ``<path>.lock`` (one process per database); the lock file's descriptor. ConfigError if held."""
        return acquire_process_lock(self.path)

    def _open_database(self) -> sqlite3.Connection:
        """Connect (creating the file with mode 0600) and set the pragmas; ConfigError if that fails."""
        if not self.path.exists():  # create it private before SQLite does (the -wal/-shm files copy its mode)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open template store {self.path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(f"template store {self.path}: cannot switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA foreign_keys=ON")
            if conn.execute("PRAGMA secure_delete").fetchone()[0] != 1:
                raise ConfigError(f"template store {self.path}: SQLite refuses secure_delete")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ConfigError(f"{self.path} is not a usable SQLite database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_meta(self) -> None:
        """Create the schema in an empty database, else check its format, version, dimension and metric."""
        conn = self._conn
        assert conn is not None
        try:
            with self._transaction():
                names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                names.discard("sqlite_sequence")
                if not names:
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [
                            ("format", FORMAT),
                            ("schema_version", str(SCHEMA_VERSION)),
                            ("dim", str(self.dim)),
                            ("metric", self.metric),
                            ("created_at", repr(time.time())),
                        ],
                    )
                elif "meta" not in names:
                    raise ConfigError(f"{self.path} is an SQLite database but not an advface template store")
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path} is not a usable SQLite database: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{self.path} is not an advface template store (format {meta.get('format')!r})")
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ConfigError(
                f"template store {self.path} has schema version {meta.get('schema_version')}; "
                f"this advface reads version {SCHEMA_VERSION}"
            )
        if meta.get("dim") != str(self.dim) or meta.get("metric") != self.metric:
            raise ConfigError(
                f"template store {self.path} holds {meta.get('dim')}-d {meta.get('metric')} templates; "
                f"it was opened for {self.dim}-d {self.metric} (an encoder change needs a new store)"
            )

    def _check_open(self) -> sqlite3.Connection:
        """The connection; ClosedError once the store is closed."""
        if self._closed or self._conn is None:
            raise ClosedError(f"template store {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the connection lock; ROLLBACK on any exception."""
        conn = self._check_open()
        with self._db_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it, so deleted bytes leave the -wal file too."""
        conn = self._check_open()
        with self._db_lock:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:  # pragma: no cover - only this connection uses the file
            log.warning("WAL checkpoint of %s did not complete (database busy)", self.path)

    def _meta(self, conn: sqlite3.Connection) -> dict[str, str]:
        """The ``meta`` table as a dict."""
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    def _set_meta(self, conn: sqlite3.Connection, values: Mapping[str, str | None]) -> None:
        """Set ``meta`` keys (None: remove the key), in the caller's transaction."""
        for key, value in values.items():
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @staticmethod
    def read_meta(path: str | os.PathLike[str]) -> dict[str, str]:
        """The ``meta`` table of a store's database file (format, dim, metric, encryption...) without opening it
        (read-only; a cleanly closed database gains no -wal / -shm files)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"template store {p} does not exist")
        # without a -wal file the database file holds everything: read it as immutable, creating no -wal / -shm
        immutable = "" if p.with_name(p.name + "-wal").exists() else "&immutable=1"
        try:
            conn = sqlite3.connect(f"file:{p}?mode=ro{immutable}", uri=True)
            try:
                return dict(conn.execute("SELECT key, value FROM meta").fetchall())
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise ConfigError(f"{p} is not an advface template store: {exc}") from None
