"""Connections of a :class:`~advface.store.postgres.PostgresStore`: DSNs (and their redaction in messages), the
connection pool, pgvector's binary ``vector`` type, running one transaction with retries and reading the value of a
one-row query (:func:`scalar`)."""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format, TransactionStatus

from advface.errors import ClosedError, DatabaseUnavailableError

log = logging.getLogger(__name__)

#: Attempts of one transaction (deadlocks, serialisation failures, a dead pooled connection).
WRITE_ATTEMPTS = 3

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------- DSNs


_URL_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/?]*):(?P<pw>[^?]*)@")
_KV_PASSWORD = re.compile(r"(?P<key>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password (URL user info, ``password=`` parameter or keyword) replaced by ``***``."""
    out = dsn
    match = _URL_USERINFO.match(out)
    if match:
        head, _, rest = out.partition("?")
        at = head.rfind("@")
        scheme_end = head.find("://") + 3
        userinfo = head[scheme_end:at]
        user = userinfo.split(":", 1)[0]
        out = head[:scheme_end] + user + ":***" + head[at:] + ("?" + rest if rest else "")
    return _KV_PASSWORD.sub(lambda m: m.group("key") + "***", out)


# --------------------------------------------------------------------------------------------------- vectors


class PgVector:
    """A float32 vector sent to PostgreSQL as pgvector's binary ``vector``."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


class VectorDumper(Dumper):
    """Sends a :class:`PgVector` in pgvector's binary format (registered with the ``vector`` type's oid)."""

    format = Format.BINARY

    def dump(self, obj: PgVector) -> bytes:
        a = np.ascontiguousarray(obj.array, dtype=">f4")
        return struct.pack(">HH", len(a), 0) + a.tobytes()


class VectorLoader(Loader):
    """Reads pgvector's binary ``vector`` as a float32 array."""

    format = Format.BINARY

    def load(self, data: Any) -> np.ndarray:
        dim, _ = struct.unpack_from(">HH", data)
        return np.frombuffer(bytes(data), dtype=">f4", count=dim, offset=4).astype(np.float32)


# --------------------------------------------------------------------------------------------------- pool


class ConnectionPool:
    """At most ``size`` connections, made on demand and reused; broken or dirty ones are dropped."""

    def __init__(self, connect: Callable[[], psycopg.Connection], size: int) -> None:
        self._connect = connect
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A connection for the ``with`` block (waits for a free slot); ClosedError after :meth:`close`."""
        self._slots.acquire()
        conn: psycopg.Connection | None = None
        try:
            with self._lock:
                if self._closed:
                    raise ClosedError("template store is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
            yield conn
        finally:
            if conn is not None:
                healthy = not conn.closed and not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE
                with self._lock:
                    if healthy and not self._closed:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._slots.release()

    def close(self) -> None:
        """Close the idle connections; those in use are closed when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()


# --------------------------------------------------------------------------------------------------- transactions


def scalar(cursor: psycopg.Cursor[Any]) -> Any:
    """The first column of the row of a query that always returns one (``SELECT COUNT(*)``, ``SELECT EXISTS``,
    ``UPDATE ... RETURNING`` of a row locked earlier in the transaction...)."""
    row = cursor.fetchone()
    assert row is not None, "the query returned no row"
    return row[0]


class PostgresConnection:
    """How a :class:`~advface.store.postgres.PostgresStore` talks to PostgreSQL (a mixin): new connections, the
    pool's transactions (``_run``) and the store's name in messages (``_where``, password redacted)."""

    dsn: str
    prefix: str
    _closed: bool
    _connect_timeout: float
    _vector_oid: int | None
    _pool: ConnectionPool

    def _where(self) -> str:
        """The store in messages: the DSN without its password, and the tables."""
        return f"{redact_dsn(self.dsn)} (tables {self.prefix}_*)"

    def _new_connection(self) -> psycopg.Connection:
        """A new connection (``synchronous_commit = on``, pgvector's type registered once known)."""
        try:
            conn = psycopg.connect(self.dsn, autocommit=False, connect_timeout=max(1, int(self._connect_timeout)))
        except psycopg.Error as exc:
            raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {redact_dsn(self.dsn)}: {exc}") from None
        try:
            conn.execute("SET synchronous_commit = on")
            conn.commit()
            if self._vector_oid is not None:
                self._register_vector(conn, self._vector_oid)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _register_vector(conn: psycopg.Connection, oid: int) -> None:
        """Send :class:`PgVector` and read ``vector`` columns (type ``oid``) in binary on ``conn``."""
        dumper = type("_BoundVectorDumper", (VectorDumper,), {"oid": oid})
        conn.adapters.register_dumper(PgVector, dumper)
        conn.adapters.register_loader(oid, VectorLoader)

    def _check_open(self) -> None:
        """ClosedError once the store is closed."""
        if self._closed:
            raise ClosedError(f"template store {self._where()} is closed")

    def _run(self, fn: Callable[[psycopg.Connection], T], *, what: str) -> T:
        """``fn(conn)`` in one transaction, committed; retried on deadlock/serialisation failures and on a broken
        connection found before the commit (a dead pooled connection); DatabaseUnavailableError otherwise."""
        self._check_open()
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            committing = False
            with self._pool.connection() as conn:
                try:
                    result = fn(conn)
                    committing = True
                    conn.commit()
                    return result
                except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                    self._rollback(conn)
                    if attempt == WRITE_ATTEMPTS:
                        raise DatabaseUnavailableError(f"{what}: too much contention, try again") from None
                except psycopg.OperationalError as exc:
                    self._rollback(conn)
                    if committing:
                        raise DatabaseUnavailableError(
                            f"{what}: the connection to PostgreSQL failed during COMMIT; the outcome is unknown "
                            f"({type(exc).__name__})"
                        ) from None
                    if attempt == WRITE_ATTEMPTS or not conn.broken:
                        raise DatabaseUnavailableError(f"{what}: PostgreSQL is unavailable: {exc}") from None
                    log.info("%s: connection lost before commit, retrying on a new one", what)
                except BaseException:
                    self._rollback(conn)
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _rollback(conn: psycopg.Connection) -> None:
        """Roll back ``conn``'s transaction if the connection still works."""
        if not conn.closed and not conn.broken:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
