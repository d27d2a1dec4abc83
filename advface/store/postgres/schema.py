"""Schema of a :class:`~advface.store.postgres.PostgresStore`: its tables created on first use and checked on every
open (format, schema version, dimension, metric, encryption mode), the ``meta`` table, the switch of a plaintext
store to encrypted mode and the keys check at open."""

from __future__ import annotations

import abc
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.types import TypeInfo

from advface.crypto import ENCRYPTION_SCHEME
from advface.errors import ConfigError, DatabaseUnavailableError
from advface.store import rotation
from advface.store.base import StoreMetric
from advface.store.postgres.connection import PostgresConnection, redact_dsn, scalar
from advface.store.sealing import (
    NAMES_META,
    PLAIN_NAMES_WARNING,
    RESUME_BATCH,
    SEALING,
    SubjectNames,
    names_from_meta,
    new_sealed_names,
)

log = logging.getLogger(__name__)

FORMAT = "advface-template-store-pg"
SCHEMA_VERSION = 1
#: pgvector's limits: ``vector`` columns up to 16000 dimensions, HNSW indexes up to 2000.
PGVECTOR_MAX_DIM = 16_000
HNSW_MAX_DIM = 2_000
#: What ``table_prefix`` may be: 1 to 40 lower-case letters, digits or ``_``, not starting with a digit.
TABLE_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")


def check_table_prefix(table_prefix: object) -> str:
    """``table_prefix`` when it is a valid prefix of a store's tables (:data:`TABLE_PREFIX_RE`); ConfigError if not."""
    if not isinstance(table_prefix, str) or not TABLE_PREFIX_RE.fullmatch(table_prefix):
        raise ConfigError(
            f"table_prefix must be 1 to 40 lower-case letters, digits or '_' (not starting with a digit), "
            f"got {table_prefix!r}"
        )
    return table_prefix


class PostgresSchema(PostgresConnection):
    """The tables of a :class:`~advface.store.postgres.PostgresStore` (a mixin over its connections): schema,
    ``meta`` and the checks made when the store opens (ConfigError on a mismatch)."""

    dim: int
    metric: StoreMetric
    cipher: Any
    _t: dict[str, str]  # table names: meta, tenants, subjects, templates
    _seq: str  # the generation sequence
    _has_hnsw: bool
    _hnsw_m: int
    _hnsw_ef_construction: int
    _migrate_plaintext: bool
    _plaintext_rows: bool
    _names: SubjectNames  # how subject ids and metadata are kept (advface.store.sealing)

    @abc.abstractmethod
    def _seal_names(self, batch_size: int) -> int:
        """Seal plain subject ids (resumable; the store's maintenance)."""

    def _schema(self) -> list[str]:
        """The statements that create the store's tables, sequence and indexes."""
        t, dim = self._t, self.dim
        statements = [
            f"CREATE TABLE {t['meta']} (key text PRIMARY KEY, value text NOT NULL)",
            f"CREATE SEQUENCE {self._seq}",
            f"""CREATE TABLE {t["tenants"]} (
                tenant text COLLATE "C" PRIMARY KEY,
                generation bigint NOT NULL,
                templates bigint NOT NULL DEFAULT 0,
                subjects bigint NOT NULL DEFAULT 0)""",
            f"""CREATE TABLE {t["subjects"]} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tenant text COLLATE "C" NOT NULL,
                subject_id text COLLATE "C" NOT NULL,
                metadata text NOT NULL,
                created_at double precision NOT NULL,
                UNIQUE (tenant, subject_id))""",
            f"""CREATE TABLE {t["templates"]} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                template_id text NOT NULL UNIQUE,
                tenant text COLLATE "C" NOT NULL,
                subject bigint NOT NULL REFERENCES {t["subjects"]} (id) ON DELETE CASCADE,
                vector vector({dim}),
                ciphertext bytea,
                created_at double precision NOT NULL,
                CHECK ((vector IS NULL) <> (ciphertext IS NULL)))""",
            f"CREATE INDEX {t['templates']}_by_subject ON {t['templates']} (subject, id)",
            f"CREATE INDEX {t['templates']}_by_tenant ON {t['templates']} (tenant, id)",
        ]
        if self._has_hnsw:
            statements.append(self._hnsw_index_sql())
        return statements

    def _hnsw_index_sql(self) -> str:
        """The statement that creates the HNSW index of the templates' ``vector`` column (``<templates>_hnsw``)."""
        tt = self._t["templates"]
        ops = "vector_cosine_ops" if self.metric == "cosine" else "vector_l2_ops"
        return (
            f"CREATE INDEX {tt}_hnsw ON {tt} USING hnsw (vector {ops}) "
            f"WITH (m = {self._hnsw_m}, ef_construction = {self._hnsw_ef_construction})"
        )

    def _create_or_check_schema(self) -> None:
        """Create the tables on first use, else check them against this store's options; ConfigError (or
        DatabaseUnavailableError) when they do not fit. Learns the ``vector`` type's oid."""
        meta_table = self._t["meta"]
        encryption = ENCRYPTION_SCHEME if self.cipher is not None else "none"

        def create_or_read(conn: psycopg.Connection) -> dict[str, str]:
            # one creator at a time, across processes and replicas
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"advface-schema:{self.prefix}",))
            has_vector = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
            if not has_vector:
                try:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.Error as exc:
                    raise ConfigError(
                        f"PostgreSQL at {redact_dsn(self.dsn)} lacks the pgvector extension and it cannot be "
                        f"created ({type(exc).__name__}: {exc}); install pgvector and run CREATE EXTENSION vector"
                    ) from None
            exists = scalar(conn.execute("SELECT to_regclass(%s)", (meta_table,)))
            if exists is None:
                for statement in self._schema():
                    conn.execute(statement)
                # a store created encrypted seals subject ids and metadata too (advface.store.sealing)
                sealed = new_sealed_names(self.cipher)[1] if self.cipher is not None else {}
                with conn.cursor() as cur:
                    cur.executemany(
                        f"INSERT INTO {meta_table} (key, value) VALUES (%s, %s)",
                        [
                            ("format", FORMAT),
                            ("schema_version", str(SCHEMA_VERSION)),
                            ("dim", str(self.dim)),
                            ("metric", self.metric),
                            ("encryption", encryption),
                            ("created_at", repr(time.time())),
                            *sealed.items(),
                        ],
                    )
                log.info("created template store tables in %s", self._where())
            return dict(conn.execute(f"SELECT key, value FROM {meta_table}").fetchall())

        conn = self._new_connection()  # not pooled: pooled connections are made once the vector type is known
        try:
            try:
                meta = create_or_read(conn)
                conn.commit()
                info = TypeInfo.fetch(conn, "vector")
                conn.rollback()
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailableError(f"cannot open {self._where()}: {exc}") from None
            except psycopg.Error as exc:
                raise ConfigError(f"cannot use {self._where()}: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        if info is None:  # pragma: no cover - the extension was checked above
            raise ConfigError(f"{self._where()}: the pgvector type 'vector' is not visible")
        self._vector_oid = info.oid
        where = self._where()
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{where}: {meta_table} is not an advface template store (format {meta.get('format')!r})")
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ConfigError(
                f"{where} has schema version {meta.get('schema_version')}; this advface reads version {SCHEMA_VERSION}"
            )
        if meta.get("dim") != str(self.dim) or meta.get("metric") != self.metric:
            raise ConfigError(
                f"{where} holds {meta.get('dim')}-d {meta.get('metric')} templates; it was opened for "
                f"{self.dim}-d {self.metric} (an encoder change needs a new store)"
            )
        if meta.get("encryption") != encryption:
            if encryption == "none":
                raise ConfigError(f"{where} holds encrypted templates: open it with a cipher (the store's key)")
            if not self._migrate_plaintext:
                raise ConfigError(
                    f"{where} holds plaintext templates: it cannot be opened in encrypted mode; encrypt it first with "
                    "`advface rotate-key --new-key-file KEY` (or open it without a key)"
                )
            self._start_migration()
        if self.cipher is not None:
            self._check_keys()

    # ----------------------------------------------------------------------------------------------- meta / keys

    def _meta(self, conn: psycopg.Connection, *, lock: bool = False) -> dict[str, str]:
        """The ``meta`` table as a dict; ``lock``: first take the advisory lock of the maintenance jobs."""
        if lock:  # serialises the store's maintenance jobs (rotation, re-issue) across processes
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"advface-meta:{self.prefix}",))
        return dict(conn.execute(f"SELECT key, value FROM {self._t['meta']}").fetchall())

    def _set_meta(self, conn: psycopg.Connection, values: Mapping[str, str | None]) -> None:
        """Set ``meta`` keys (None: remove the key), in the caller's transaction."""
        for key, value in values.items():
            if value is None:
                conn.execute(f"DELETE FROM {self._t['meta']} WHERE key = %s", (key,))
            else:
                conn.execute(
                    f"INSERT INTO {self._t['meta']} (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    (key, value),
                )

    def _start_migration(self) -> None:
        """Switch a plaintext store to encrypted mode (``migrate_plaintext``); its rows stay readable as plaintext
        until :meth:`rotate` has encrypted them."""
        assert self.cipher is not None

        def write(conn: psycopg.Connection) -> bool:
            meta = self._meta(conn, lock=True)
            if meta.get("encryption") != "none":
                return meta.get("plaintext_rows") == "1"
            has_rows = scalar(conn.execute(f"SELECT EXISTS (SELECT 1 FROM {self._t['templates']})"))
            values = {
                "encryption": ENCRYPTION_SCHEME,
                "key_ids": json.dumps([self.cipher.key_id]),
                "plaintext_rows": "1" if has_rows else None,
            }
            if not has_rows:  # no subject yet: sealed from now on, as a store created encrypted
                values.update(new_sealed_names(self.cipher)[1])
            self._set_meta(conn, values)
            return bool(has_rows)

        if self._run(write, what="encryption migration"):
            log.warning("template store %s: encrypting its existing templates (migration started)", self._where())

    def _check_keys(self) -> None:
        """ConfigError when rows are under keys the cipher lacks (wrong key, unfinished rotation); records the
        cipher's primary key among ``key_ids`` (the keys rows may be under)."""
        cipher = self.cipher
        has_key = getattr(cipher, "has_key", None)
        tt = self._t["templates"]

        def check(conn: psycopg.Connection) -> bool:
            meta = self._meta(conn)
            self._plaintext_rows = meta.get("plaintext_rows") == "1"
            key_ids = [str(k) for k in json.loads(meta.get("key_ids", "[]"))]
            if has_key is not None and ("key_ids" not in meta or any(not has_key(k) for k in key_ids)):
                used = {
                    bytes(r[0]).hex()
                    for r in conn.execute(
                        f"SELECT DISTINCT substring(ciphertext from 2 for 8) FROM {tt} WHERE ciphertext IS NOT NULL"
                    )
                }
                configured = getattr(cipher, "key_ids", (cipher.key_id,))
                rotation.check_keys_present(used, has_key, configured, meta, self._where())
                key_ids = [k for k in key_ids if k in used] if "key_ids" in meta else sorted(used)
            recorded = rotation.key_ids_at_open(meta, key_ids, cipher.key_id, self._where())
            if recorded is not None:
                self._set_meta(conn, {"key_ids": recorded})
            if meta.get(NAMES_META) == SEALING:
                return True
            self._names = names_from_meta(meta, cipher, self._where())
            if not self._names.sealed and not self._plaintext_rows:
                log.warning(PLAIN_NAMES_WARNING, self._where())
            return False

        if self._run(check, what="open"):  # a sealing pass was interrupted (rotate-key killed): finish it first
            log.warning("template store %s: resuming the sealing of its subject ids", self._where())
            self._seal_names(RESUME_BATCH)

    @staticmethod
    def read_meta(dsn: str, table_prefix: str = "advface", connect_timeout: float = 10.0) -> dict[str, str]:
        """The ``meta`` table of a store (format, dim, metric, encryption...) without opening it."""
        table = f"{check_table_prefix(table_prefix)}_meta"
        try:
            with psycopg.connect(dsn, connect_timeout=max(1, int(connect_timeout))) as conn:
                if scalar(conn.execute("SELECT to_regclass(%s)", (table,))) is None:
                    raise ConfigError(f"{redact_dsn(dsn)} holds no advface template store (no table {table})")
                return dict(conn.execute(f"SELECT key, value FROM {table}").fetchall())
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {exc}") from None
