"""The PostgreSQL rows of an encrypted store (:class:`PostgresBlockDatabase`, a
:class:`~advface.encrypted.database.BlockDatabase`): the same tables as the SQLite file, named ``<prefix>_meta``,
``_subjects``, ``_templates``, ``_blocks``, ``_rotated`` (default prefix ``advface_enc``: apart from the plaintext
store's ``advface_*`` tables), plus ``<prefix>_tenants`` (one generation per tenant, from a sequence).

Several processes may open one database (:attr:`shared`): each write transaction locks its tenant's row first
(``SELECT ... FOR UPDATE``), so writers of a tenant are serialised across processes, and bumps the tenant's
generation; a process finding a generation other than the one its copy was loaded at reloads the tenant (in
:class:`~advface.encrypted.store.EncryptedStore`). Every process holds a shared advisory lock on the store while it is
open; rotations and compaction take it exclusively (:meth:`PostgresBlockDatabase.exclusive`: refused while another
process has the store open) and a store cannot be opened while one of them runs.

One connection per store (autocommit; explicit transactions), used under the store's lock; ``synchronous_commit`` is
``on``, so a change is in the server's WAL when its call returns. A lost connection is made again on the next call
(the advisory lock with it); the call that found it lost raises DatabaseUnavailableError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import psycopg
from psycopg.pq import TransactionStatus

from advface.encrypted.database import BlockDatabase, SubjectRow, TemplateRow
from advface.errors import ClosedError, ConfigError, DatabaseUnavailableError, PreconditionError
from advface.store.postgres.connection import redact_dsn
from advface.store.postgres.schema import check_table_prefix

__all__ = ["PostgresBlockDatabase", "TABLE_PREFIX_DEFAULT"]

#: the tables' prefix unless one is given (the plaintext PostgreSQL store uses ``advface``)
TABLE_PREFIX_DEFAULT = "advface_enc"


class PostgresBlockDatabase(BlockDatabase):
    """An encrypted store's rows in the PostgreSQL database at ``dsn`` (tables created on first use).
    DatabaseUnavailableError when the server cannot be reached; ConfigError for a bad prefix, or while a rotation
    or compaction of the store runs in another process."""

    shared = True

    def __init__(self, dsn: str, *, table_prefix: str = TABLE_PREFIX_DEFAULT, connect_timeout: float = 10.0) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigError("the PostgreSQL encrypted store needs a DSN (store.dsn / ADVFACE_STORE_DSN)")
        check_table_prefix(table_prefix)
        self.dsn = dsn
        self.prefix = table_prefix
        self.where = f"{redact_dsn(dsn)} (tables {table_prefix}_*)"
        self._t = {n: f"{table_prefix}_{n}" for n in ("meta", "tenants", "subjects", "templates", "blocks", "rotated")}
        self._seq = f"{table_prefix}_generation"
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection | None = None
        self._closed = False
        self._create_schema()

    # ------------------------------------------------------------------ connection

    @property
    def _advisory_key(self) -> str:
        return f"advface-encrypted-store:{self.prefix}"

    def _connection(self) -> psycopg.Connection:
        """The live connection (made again when lost, outside a transaction); ClosedError after :meth:`close`."""
        if self._closed:
            raise ClosedError(f"encrypted store {self.where} is closed")
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
            self._conn = None
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self._connect_timeout)))
        except psycopg.Error as exc:
            raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {redact_dsn(self.dsn)}: {exc}") from None
        try:
            conn.execute("SET synchronous_commit = on")
            held = conn.execute("SELECT pg_try_advisory_lock_shared(hashtext(%s))", (self._advisory_key,)).fetchone()
            if not held or not held[0]:
                raise ConfigError(
                    f"encrypted store {self.where}: a rotation or compaction is running in another process; "
                    "open it when that is done"
                )
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        """Run one statement; DatabaseUnavailableError when the server is lost."""
        try:
            return self._connection().execute(sql, params)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"{self.where}: PostgreSQL is unavailable: {exc}") from None

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        try:
            with self._connection().cursor() as cur:
                cur.executemany(sql, rows)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"{self.where}: PostgreSQL is unavailable: {exc}") from None

    def _create_schema(self) -> None:
        t = self._t
        statements = [
            f"CREATE TABLE IF NOT EXISTS {t['meta']} (key text PRIMARY KEY, value text NOT NULL)",
            f"CREATE SEQUENCE IF NOT EXISTS {self._seq}",
            f"""CREATE TABLE IF NOT EXISTS {t["tenants"]} (tenant text COLLATE "C" PRIMARY KEY,
                generation bigint NOT NULL)""",
            f"""CREATE TABLE IF NOT EXISTS {t["subjects"]} (tenant text COLLATE "C" NOT NULL,
                subject_id text COLLATE "C" NOT NULL, metadata text NOT NULL, created_at double precision NOT NULL,
                PRIMARY KEY (tenant, subject_id))""",
            f"""CREATE TABLE IF NOT EXISTS {t["templates"]} (template_id text PRIMARY KEY,
                tenant text COLLATE "C" NOT NULL, subject_id text COLLATE "C" NOT NULL, seq bigint NOT NULL,
                block integer NOT NULL, slot integer NOT NULL, UNIQUE (tenant, block, slot))""",
            f"CREATE INDEX IF NOT EXISTS {t['templates']}_subject ON {t['templates']} (tenant, subject_id, seq)",
            f"""CREATE TABLE IF NOT EXISTS {t["blocks"]} (tenant text COLLATE "C" NOT NULL, block integer NOT NULL,
                data bytea NOT NULL, PRIMARY KEY (tenant, block))""",
            f"""CREATE TABLE IF NOT EXISTS {t["rotated"]} (tenant text COLLATE "C" NOT NULL, block integer NOT NULL,
                source_generation bigint NOT NULL, data bytea NOT NULL, PRIMARY KEY (tenant, block))""",
            # ciphertexts do not compress: stored out of line without trying
            f"ALTER TABLE {t['blocks']} ALTER COLUMN data SET STORAGE EXTERNAL",
            f"ALTER TABLE {t['rotated']} ALTER COLUMN data SET STORAGE EXTERNAL",
        ]
        with self.transaction():
            self._execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"advface-schema:{self.prefix}",))
            if self._execute("SELECT to_regclass(%s)", (t["rotated"],)).fetchone() == (None,):
                for statement in statements:
                    self._execute(statement)

    # ------------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        conn = self._connection()
        try:
            with conn.transaction():
                yield
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(
                f"{self.where}: the connection to PostgreSQL failed; the change may or may not be committed ({exc})"
            ) from None

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        conn = self._connection()
        if conn.info.transaction_status != TransactionStatus.IDLE:
            yield  # inside a transaction (its tenant locked): its reads are consistent
            return
        try:
            with conn.transaction():
                self._execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"{self.where}: PostgreSQL is unavailable: {exc}") from None

    def lock_meta(self) -> None:
        self._execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"advface-meta:{self.prefix}",))

    def lock_tenant(self, tenant: str) -> int | None:
        t = self._t["tenants"]
        self._execute(f"INSERT INTO {t} (tenant, generation) VALUES (%s, 0) ON CONFLICT DO NOTHING", (tenant,))
        row = self._execute(f"SELECT generation FROM {t} WHERE tenant = %s FOR UPDATE", (tenant,)).fetchone()
        return None if row is None else int(row[0])

    def bump_generation(self, tenant: str) -> int | None:
        row = self._execute(
            f"UPDATE {self._t['tenants']} SET generation = nextval('{self._seq}') WHERE tenant = %s "
            "RETURNING generation",
            (tenant,),
        ).fetchone()
        return None if row is None else int(row[0])

    def generation(self, tenant: str) -> int | None:
        row = self._execute(f"SELECT generation FROM {self._t['tenants']} WHERE tenant = %s", (tenant,)).fetchone()
        return None if row is None else int(row[0])

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        held = self._execute("SELECT pg_try_advisory_lock(hashtext(%s))", (self._advisory_key,)).fetchone()
        if not held or not held[0]:
            raise ConfigError(
                f"{what} of encrypted store {self.where} needs it open in this process only: stop the sidecars "
                "(and other advface commands) using it first"
            )
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error, DatabaseUnavailableError):
                self._execute("SELECT pg_advisory_unlock(hashtext(%s))", (self._advisory_key,))

    # ------------------------------------------------------------------ meta

    def meta(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._execute(f"SELECT key, value FROM {self._t['meta']}")}

    def put_meta(self, items: Iterable[tuple[str, str]]) -> None:
        self._executemany(
            f"INSERT INTO {self._t['meta']} (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            list(items),
        )

    def delete_meta(self, key: str) -> None:
        self._execute(f"DELETE FROM {self._t['meta']} WHERE key = %s", (key,))

    # ------------------------------------------------------------------ blocks

    def tenants_with_rows(self) -> list[str]:
        sql = f"SELECT tenant FROM {self._t['blocks']} UNION SELECT tenant FROM {self._t['templates']}"
        return [str(r[0]) for r in self._execute(sql)]

    def blocks(self, tenant: str) -> list[tuple[int, bytes]]:
        sql = f"SELECT block, data FROM {self._t['blocks']} WHERE tenant = %s ORDER BY block"
        return [(int(b), bytes(d)) for b, d in self._execute(sql, (tenant,))]

    def block(self, tenant: str, block: int) -> bytes | None:
        sql = f"SELECT data FROM {self._t['blocks']} WHERE tenant = %s AND block = %s"
        row = self._execute(sql, (tenant, block)).fetchone()
        return None if row is None else bytes(row[0])

    def block_numbers(self, tenant: str) -> list[int]:
        sql = f"SELECT block FROM {self._t['blocks']} WHERE tenant = %s ORDER BY block"
        return [int(r[0]) for r in self._execute(sql, (tenant,))]

    def put_blocks(self, tenant: str, blocks: Sequence[tuple[int, bytes]]) -> None:
        self._executemany(
            f"INSERT INTO {self._t['blocks']} (tenant, block, data) VALUES (%s, %s, %s) "
            "ON CONFLICT (tenant, block) DO UPDATE SET data = EXCLUDED.data",
            [(tenant, block, data) for block, data in blocks],
        )

    # ------------------------------------------------------------------ templates

    def template_rows(self, tenant: str) -> list[tuple[str, str, int, int]]:
        sql = f"SELECT template_id, subject_id, block, slot FROM {self._t['templates']} WHERE tenant = %s"
        return [(str(t), str(s), int(b), int(x)) for t, s, b, x in self._execute(sql, (tenant,))]

    def insert_templates(self, rows: Sequence[TemplateRow]) -> None:
        self._executemany(
            f"INSERT INTO {self._t['templates']} (template_id, tenant, subject_id, seq, block, slot) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            rows,
        )

    def delete_templates_at(self, tenant: str, refs: Sequence[tuple[int, int]]) -> None:
        self._executemany(
            f"DELETE FROM {self._t['templates']} WHERE tenant = %s AND block = %s AND slot = %s",
            [(tenant, b, s) for b, s in refs],
        )

    def max_seq(self, tenant: str, stored: str) -> int:
        sql = f"SELECT COALESCE(MAX(seq), 0) FROM {self._t['templates']} WHERE tenant = %s AND subject_id = %s"
        row = self._execute(sql, (tenant, stored)).fetchone()
        return int(row[0]) if row else 0

    def template_ids(self, tenant: str, stored: str) -> list[str]:
        sql = f"SELECT template_id FROM {self._t['templates']} WHERE tenant = %s AND subject_id = %s ORDER BY seq"
        return [str(r[0]) for r in self._execute(sql, (tenant, stored))]

    # ------------------------------------------------------------------ subjects

    def subject_rows(self, tenant: str) -> list[tuple[str, str]]:
        sql = f"SELECT subject_id, metadata FROM {self._t['subjects']} WHERE tenant = %s"
        return [(str(s), str(t)) for s, t in self._execute(sql, (tenant,))]

    def subject(self, tenant: str, stored: str) -> tuple[str, float] | None:
        sql = f"SELECT metadata, created_at FROM {self._t['subjects']} WHERE tenant = %s AND subject_id = %s"
        row = self._execute(sql, (tenant, stored)).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    def insert_subject(self, tenant: str, stored: str, text: str, created_at: float) -> None:
        self._execute(
            f"INSERT INTO {self._t['subjects']} (tenant, subject_id, metadata, created_at) VALUES (%s, %s, %s, %s)",
            (tenant, stored, text, created_at),
        )

    def update_subjects(self, tenant: str, rows: Sequence[tuple[str, str]]) -> None:
        self._executemany(
            f"UPDATE {self._t['subjects']} SET metadata = %s WHERE tenant = %s AND subject_id = %s",
            [(text, tenant, stored) for stored, text in rows],
        )

    def delete_subjects(self, tenant: str, stored: Sequence[str]) -> None:
        self._executemany(
            f"DELETE FROM {self._t['subjects']} WHERE tenant = %s AND subject_id = %s", [(tenant, s) for s in stored]
        )

    def has_subjects(self) -> bool:
        return self._execute(f"SELECT 1 FROM {self._t['subjects']} LIMIT 1").fetchone() is not None

    def subject_page(self, tenant: str, after: str, limit: int) -> list[SubjectRow]:
        rows = self._execute(
            f"SELECT subject_id, metadata, created_at FROM {self._t['subjects']} WHERE tenant = %s "
            "AND subject_id > %s ORDER BY subject_id LIMIT %s",
            (tenant, after, limit),
        )
        return [(str(s), str(t), float(c)) for s, t, c in rows]

    def count(self, table: Literal["subjects", "templates"], tenant: str | None) -> int:
        if table not in ("subjects", "templates"):
            raise ValueError(f"no table {table!r}")
        sql = f"SELECT COUNT(*) FROM {self._t[table]}"
        row = self._execute(sql, ()) if tenant is None else self._execute(sql + " WHERE tenant = %s", (tenant,))
        return int(row.fetchone()[0])  # type: ignore[index]

    def subject_tenants(self) -> list[str]:
        return [str(r[0]) for r in self._execute(f"SELECT DISTINCT tenant FROM {self._t['subjects']} ORDER BY tenant")]

    # ------------------------------------------------------------------ key-pair rotation

    def rotated_generation(self, tenant: str, block: int) -> int | None:
        sql = f"SELECT source_generation FROM {self._t['rotated']} WHERE tenant = %s AND block = %s"
        row = self._execute(sql, (tenant, block)).fetchone()
        return None if row is None else int(row[0])

    def put_rotated(self, tenant: str, block: int, source_generation: int, data: bytes) -> None:
        self._execute(
            f"INSERT INTO {self._t['rotated']} (tenant, block, source_generation, data) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (tenant, block) DO UPDATE SET source_generation = EXCLUDED.source_generation, "
            "data = EXCLUDED.data",
            (tenant, block, source_generation, data),
        )

    def rotation_rows(self) -> bool:
        return self._execute(f"SELECT 1 FROM {self._t['rotated']} LIMIT 1").fetchone() is not None

    def swap_rotated(self, fingerprint: str) -> None:
        b, r = self._t["blocks"], self._t["rotated"]
        missing = self._execute(
            f"SELECT COUNT(*) FROM {b} WHERE NOT EXISTS "
            f"(SELECT 1 FROM {r} WHERE {r}.tenant = {b}.tenant AND {r}.block = {b}.block)"
        ).fetchone()
        if missing and missing[0]:
            raise PreconditionError(
                f"{self.where}: {missing[0]} block(s) were not re-encrypted; run the rotation again"
            )
        self._execute(
            f"UPDATE {b} SET data = {r}.data FROM {r} WHERE {r}.tenant = {b}.tenant AND {r}.block = {b}.block"
        )
        self._execute(f"DELETE FROM {r}")
        self._execute(f"UPDATE {self._t['meta']} SET value = %s WHERE key = 'fingerprint'", (fingerprint,))
        self._execute(f"UPDATE {self._t['tenants']} SET generation = nextval('{self._seq}')")

    # ------------------------------------------------------------------ erasure and closing

    def compact(self) -> int:
        """``VACUUM FULL`` of the store's tables (new files; the old ones are removed: their bytes may remain in free
        disk blocks and in WAL segments until recycled); the tables' total size afterwards."""
        tables = [self._t[n] for n in ("blocks", "rotated", "templates", "subjects", "tenants", "meta")]
        for table in tables:
            self._execute(f"VACUUM FULL {table}")
        row = self._execute("SELECT " + " + ".join(["pg_total_relation_size(%s)"] * len(tables)), tables).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()  # the session's advisory lock goes with it


def read_meta(dsn: str, table_prefix: str = TABLE_PREFIX_DEFAULT) -> dict[str, str]:
    """The ``meta`` rows of the encrypted store at ``dsn`` without opening it (empty when its tables do not exist);
    DatabaseUnavailableError when the server cannot be reached."""
    table = f"{check_table_prefix(table_prefix)}_meta"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
                return {}
            return {str(k): str(v) for k, v in conn.execute(f"SELECT key, value FROM {table}")}
    except psycopg.Error as exc:
        raise DatabaseUnavailableError(f"cannot read {redact_dsn(dsn)} (tables {table_prefix}_*): {exc}") from None
