"""The :class:`PostgresStore` itself: options, opening, the tenant rows (locks, generations, counts), writes
(including :meth:`~PostgresStore.bulk_add`), reads and closing; its connections, schema, search and maintenance are
mixins (see :mod:`advface.store.postgres`)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import psycopg

from advface.crypto import template_aad
from advface.errors import ConfigError, DatabaseUnavailableError, IntegrityError, NotFoundError, ValidationError
from advface.store.base import (
    MAX_PAGE_SIZE,
    StoreMetric,
    SubjectInfo,
    TemplateStore,
    check_add_many,
    check_config_int,
    check_dim_metric,
    check_id,
    check_metadata,
    check_positive_int,
    decode_page_token,
    encode_page_token,
)
from advface.store.faiss_index import RWLock, TenantIndex
from advface.store.postgres.connection import ConnectionPool, PgVector, PostgresConnection, redact_dsn, scalar
from advface.store.postgres.maintenance import PostgresMaintenance
from advface.store.postgres.schema import HNSW_MAX_DIM, PGVECTOR_MAX_DIM, PostgresSchema, check_table_prefix
from advface.store.postgres.search import MAX_EF_SEARCH, PostgresSearch
from advface.store.sealing import NAMES_META, SEALING, PlainNames, SubjectNames, names_from_meta

log = logging.getLogger(__name__)

#: Tenants with at most this many templates are searched exactly (no HNSW) by default.
EXACT_MAX_DEFAULT = 10_000
#: :meth:`PostgresStore.bulk_add` rebuilds the HNSW index when a load adds at least this share of the table's rows
#: (building the graph once cost about 1/20 per row of maintaining it row by row in the benchmark's side check:
#: benchmarks/RESULTS.md, PostgreSQL store).
BULK_REBUILD_FRACTION = 0.1
#: ``maintenance_work_mem`` of a bulk load's index build (the graph is built in memory when it fits).
BULK_MAINTENANCE_WORK_MEM = "512MB"


class Cipher(Protocol):
    """What the encrypted mode needs of a cipher (:class:`advface.crypto.TemplateCipher` has it)."""

    @property
    def key_id(self) -> str: ...

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def decrypt(self, blob: bytes, aad: bytes) -> bytes: ...


class PostgresStore(PostgresMaintenance, PostgresSearch, PostgresSchema, PostgresConnection, TemplateStore):
    """Templates in PostgreSQL + pgvector at ``dsn`` (tables created on first use); see :mod:`advface.store.postgres`.

    ``dim`` and ``metric`` must match those the tables were made with. ``cipher``: keep vectors only as ciphertext
    (encrypted mode). ``table_prefix``: lower-case letters, digits and ``_`` (several stores in one database).
    ``pool_size``: most connections held at once. ``exact_max``: tenants with at most this many templates are
    searched exactly. ``ef_search``: the smallest ``hnsw.ef_search`` used (raised to the candidates fetched, at
    most 1000; the default 200 gave recall@10 0.978 against exact search at 100k dlib-like templates, 100 gave
    0.936: ``benchmarks/RESULTS.md``). ``hnsw_m`` / ``hnsw_ef_construction``: index parameters, used when the
    index is created (or rebuilt by :meth:`bulk_add`). ``migrate_plaintext``: with a cipher, open a plaintext store
    and switch it to encrypted mode (existing rows stay readable until :meth:`rotate` has encrypted them).
    Opening problems raise ConfigError (DatabaseUnavailableError when the server cannot be reached); a closed
    store, ClosedError.
    """

    def __init__(
        self,
        dsn: str,
        dim: int,
        metric: StoreMetric,
        *,
        cipher: Cipher | None = None,
        table_prefix: str = "advface",
        pool_size: int = 8,
        exact_max: int = EXACT_MAX_DEFAULT,
        ef_search: int = 200,
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 64,
        connect_timeout: float = 10.0,
        migrate_plaintext: bool = False,
    ) -> None:
        self.dim, self.metric = check_dim_metric(dim, metric)
        if self.dim > PGVECTOR_MAX_DIM:
            raise ConfigError(f"pgvector stores at most {PGVECTOR_MAX_DIM} dimensions, got dim={self.dim}")
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigError("the PostgreSQL store needs a DSN (store.dsn / ADVFACE_STORE_DSN)")
        check_table_prefix(table_prefix)
        if cipher is not None and not all(hasattr(cipher, a) for a in ("encrypt", "decrypt", "key_id")):
            raise ConfigError(f"cipher must have encrypt(), decrypt() and key_id, got {type(cipher).__name__}")
        self.pool_size = check_config_int(pool_size, "pool_size", 1000)
        if not isinstance(exact_max, int) or isinstance(exact_max, bool) or exact_max < 0:
            raise ConfigError(f"exact_max must be an integer >= 0, got {exact_max!r}")
        self.exact_max = exact_max
        self.ef_search = check_config_int(ef_search, "ef_search", MAX_EF_SEARCH)
        self._hnsw_m = check_config_int(hnsw_m, "hnsw_m", 100)
        self._hnsw_ef_construction = check_config_int(hnsw_ef_construction, "hnsw_ef_construction", 1000)
        self.dsn = dsn
        self.cipher = cipher
        self.prefix = table_prefix
        self._connect_timeout = connect_timeout
        self._migrate_plaintext = bool(migrate_plaintext)
        self._plaintext_rows = False  # an encryption migration is under way: rows with a `vector` are plaintext
        self._names: SubjectNames = PlainNames()  # sealed in stores created encrypted (set when the schema is checked)
        self._has_hnsw = self.dim <= HNSW_MAX_DIM
        self._t = {name: f"{table_prefix}_{name}" for name in ("meta", "tenants", "subjects", "templates")}
        self._seq = f"{table_prefix}_generation"
        self._vector_oid: int | None = None
        self._closed = False
        # encrypted mode: in-memory indexes and the generation each was built at
        self._write_mutex = threading.Lock()
        self._index_lock = RWLock()
        self._tenants: dict[str, TenantIndex] = {}
        self._generations: dict[str, int] = {}
        self._pool = ConnectionPool(self._new_connection, self.pool_size)
        try:
            self._create_or_check_schema()
            if self.cipher is not None:
                started = time.perf_counter()
                self._rebuild_all()
                log.debug(
                    "opened encrypted store %s: %d templates in %d tenants, indexes built in %.3f s",
                    self._where(),
                    sum(t.ntotal for t in self._tenants.values()),
                    len(self._tenants),
                    time.perf_counter() - started,
                )
        except BaseException:
            self._pool.close()
            self._closed = True
            raise

    @property
    def encrypted(self) -> bool:
        """Whether vectors are kept only as ciphertext."""
        return self.cipher is not None

    @property
    def sealed_names(self) -> bool:
        """Whether subject ids and metadata are sealed at rest (:mod:`advface.store.sealing`: stores created
        encrypted); :meth:`list_subjects` then pages in the order of their keyed hashes."""
        return self._names.sealed

    # ----------------------------------------------------------------------------------------------- tenant rows

    def _lock_tenant(self, conn: psycopg.Connection, tenant: str, *, create: bool) -> tuple[int, int]:
        """Lock the tenant's row (serialising its writers) and give it a new generation: ``(old, new)``;
        ``old`` is 0 for a new tenant. Without ``create``, an unknown tenant raises NotFoundError."""
        t = self._t["tenants"]
        while True:
            row = conn.execute(f"SELECT generation FROM {t} WHERE tenant = %s FOR UPDATE", (tenant,)).fetchone()
            if row is not None:
                new = scalar(
                    conn.execute(
                        f"UPDATE {t} SET generation = nextval('{self._seq}') WHERE tenant = %s RETURNING generation",
                        (tenant,),
                    )
                )
                return int(row[0]), int(new)
            if not create:
                raise NotFoundError(f"tenant {tenant!r} holds no subjects")
            new_row = conn.execute(
                f"INSERT INTO {t} (tenant, generation) VALUES (%s, nextval('{self._seq}')) "
                "ON CONFLICT (tenant) DO NOTHING RETURNING generation",
                (tenant,),
            ).fetchone()
            if new_row is not None:
                return 0, int(new_row[0])
            # another transaction created it meanwhile: lock that row

    def _update_counts(self, conn: psycopg.Connection, tenant: str, templates: int, subjects: int) -> bool:
        """Apply count deltas to the (locked) tenant row; removes the row when no subject is left. True if
        the tenant still exists."""
        t = self._t["tenants"]
        left = scalar(
            conn.execute(
                f"UPDATE {t} SET templates = templates + %s, subjects = subjects + %s WHERE tenant = %s "
                "RETURNING subjects",
                (templates, subjects, tenant),
            )
        )
        if left <= 0:
            conn.execute(f"DELETE FROM {t} WHERE tenant = %s", (tenant,))
            return False
        return True

    def _current_names(self, conn: psycopg.Connection) -> SubjectNames:
        """How subject ids are kept now (call it in every transaction that reads or writes them, after the tenant
        lock in writes). An encrypted store with plain ids may have been sealed by another process (``advface
        rotate-key``): ``meta`` is then re-read (one primary-key lookup, only in that case) and the sealed names
        taken up; while that pass runs, DatabaseUnavailableError (try again)."""
        names = self._names
        if names.sealed or self.cipher is None:
            return names
        row = conn.execute(f"SELECT value FROM {self._t['meta']} WHERE key = %s", (NAMES_META,)).fetchone()
        if row is None:
            return names
        if row[0] == SEALING:
            raise DatabaseUnavailableError(
                f"{self._where()}: its subject ids are being sealed (advface rotate-key); try again when it is done"
            )
        self._names = names_from_meta(self._meta(conn), self.cipher, self._where())
        return self._names

    def _subject_row(self, conn: psycopg.Connection, tenant: str, subject_id: str, *, lock: bool = False) -> tuple:
        """``(id, metadata column, created_at, stored id)`` of a subject (``lock``: FOR UPDATE); NotFoundError if
        unknown."""
        stored = self._current_names(conn).stored_id(tenant, subject_id)
        row = conn.execute(
            f"SELECT id, metadata, created_at FROM {self._t['subjects']} WHERE tenant = %s AND subject_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (tenant, stored),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"subject {subject_id!r} not found in tenant {tenant!r}")
        return (*row, stored)

    # ----------------------------------------------------------------------------------------------- writes

    def add_many(
        self,
        tenant: str,
        items: Sequence[tuple[str, np.ndarray, Mapping[str, str] | None]],
        *,
        replace: bool = False,
    ) -> list[list[str]]:
        return self._add_many(tenant, items, replace=replace, bulk=None)

    def bulk_add(
        self,
        tenant: str,
        items: Sequence[tuple[str, np.ndarray, Mapping[str, str] | None]],
        *,
        rebuild_index: bool | None = None,
    ) -> list[list[str]]:
        """:meth:`add_many` (appending; one transaction, all or nothing) for large loads: the template rows go in
        with one binary ``COPY ... FROM STDIN`` and, in plaintext mode, the HNSW index may be dropped before and
        re-created after the load in the same transaction (a graph build is much cheaper per row than
        maintaining the graph row by row; ``benchmarks/store_postgres.py --bulk``).

        ``rebuild_index``: True / False, or None (default) to rebuild when the load adds at least
        :data:`BULK_REBUILD_FRACTION` of the table's rows after it (the build covers the whole table, every
        tenant). While the index is rebuilt the template table is locked exclusively: every replica's reads and
        writes of it wait until the load commits (never see a missing index). Meant for initial loads and
        migrations; small or frequent enrolments should use :meth:`add_many`. Errors as :meth:`add_many` (a
        ``rebuild_index`` of another type: ValidationError).
        """
        if rebuild_index is not None and not isinstance(rebuild_index, bool):
            raise ValidationError(f"rebuild_index must be a bool or None, got {rebuild_index!r}")
        return self._add_many(tenant, items, replace=False, bulk=rebuild_index if rebuild_index is not None else "auto")

    def _add_many(
        self,
        tenant: str,
        items: Sequence[tuple[str, np.ndarray, Mapping[str, str] | None]],
        *,
        replace: bool,
        bulk: bool | str | None,
    ) -> list[list[str]]:
        """add_many; ``bulk`` None: pipelined INSERTs, else COPY with an index rebuild (True, False or "auto")."""
        checked = check_add_many(tenant, items, self.dim, replace)
        self._check_open()
        if not checked:
            return []
        s, tt = self._t["subjects"], self._t["templates"]

        def write(conn: psycopg.Connection) -> tuple[list[list[str]], list[int], list[tuple[int, str, str]], tuple]:
            # a fixed number of statements per call, whatever the number of items (inserts are pipelined)
            now = time.time()
            generations = self._lock_tenant(conn, tenant, create=True)
            sealing = self._current_names(conn)
            names = list(dict.fromkeys(c[0] for c in checked))
            stored_of = {n: sealing.stored_id(tenant, n) for n in names}  # the id column (a keyed hash when sealed)
            name_of = {v: k for k, v in stored_of.items()}
            existing = {
                name_of[r[1]]: (r[0], sealing.unpack(tenant, r[1], r[2])[1])
                for r in conn.execute(
                    f"SELECT id, subject_id, metadata FROM {s} WHERE tenant = %s AND subject_id = ANY(%s) "
                    "ORDER BY subject_id FOR UPDATE",
                    (tenant, list(stored_of.values())),
                )
            }
            metadata_of: dict[str, dict[str, str]] = {}
            for subject_id, _, metadata in checked:  # items of one subject merge in order (never with replace)
                if subject_id in metadata_of:
                    base = metadata_of[subject_id]
                elif subject_id in existing and not replace:
                    base = existing[subject_id][1]
                else:
                    base = {}
                metadata_of[subject_id] = {**base, **(metadata or {})}
            for subject_id, merged in metadata_of.items():
                check_metadata(merged, f"metadata of subject {subject_id!r} after merging")
            pks = {name: existing[name][0] for name in existing}
            removed: list[int] = []
            if replace and existing:
                removed = [
                    r[0]
                    for r in conn.execute(
                        f"DELETE FROM {tt} WHERE subject = ANY(%s) RETURNING id", (list(pks.values()),)
                    )
                ]
            if existing:
                conn.execute(
                    f"UPDATE {s} AS s SET metadata = u.metadata "
                    "FROM unnest(%s::bigint[], %s::text[]) AS u(id, metadata) WHERE s.id = u.id",
                    (list(pks.values()), [sealing.pack(tenant, stored_of[n], n, metadata_of[n]) for n in pks]),
                )
            new = [n for n in names if n not in existing]
            if new:
                for pk, subject_id in conn.execute(
                    f"INSERT INTO {s} (tenant, subject_id, metadata, created_at) "
                    "SELECT %s, u.subject_id, u.metadata, %s FROM unnest(%s::text[], %s::text[]) "
                    "AS u(subject_id, metadata) RETURNING id, subject_id",
                    (
                        tenant,
                        now,
                        [stored_of[n] for n in new],
                        [sealing.pack(tenant, stored_of[n], n, metadata_of[n]) for n in new],
                    ),
                ):
                    pks[name_of[subject_id]] = pk
            result: list[list[str]] = []
            labels: list[tuple[str, str]] = []
            params: list[tuple] = []
            for subject_id, vectors, _ in checked:
                ids = [uuid.uuid4().hex for _ in range(len(vectors))]
                result.append(ids)
                for template_id, vector in zip(ids, vectors):
                    labels.append((subject_id, template_id))
                    columns = self._vector_columns(tenant, stored_of[subject_id], template_id, vector)
                    params.append((template_id, tenant, pks[subject_id], *columns, now))
            added: list[tuple[int, str, str]] = []
            if bulk is not None and self.cipher is None:
                self._copy_templates(conn, params, bulk)
                self._update_counts(conn, tenant, len(params) - len(removed), len(new))
                return result, removed, added, generations
            with conn.cursor() as cur:
                sql = (
                    f"INSERT INTO {tt} (template_id, tenant, subject, vector, ciphertext, created_at) "
                    "VALUES (%s, %s, %s, %b, %b, %s)"
                )
                if self.cipher is None:
                    cur.executemany(sql, params)
                else:  # the row ids are the faiss ids
                    cur.executemany(sql + " RETURNING id", params, returning=True)
                    rowids: list[int] = []
                    while True:
                        rowids.append(int(scalar(cur)))
                        if not cur.nextset():
                            break
                    added = [(rowid, *label) for rowid, label in zip(rowids, labels)]
            self._update_counts(conn, tenant, len(params) - len(removed), len(new))
            return result, removed, added, generations

        if self.cipher is None:
            return self._run(write, what="add")[0]
        with self._write_mutex:
            result, removed, added, generations = self._run(write, what="add")
            vectors_all = np.concatenate([c[1] for c in checked])
            self._apply(tenant, generations, removed, added, vectors_all)
        return result

    def _copy_templates(self, conn: psycopg.Connection, params: Sequence[tuple], rebuild: bool | str) -> None:
        """Insert plaintext template rows with one binary COPY, dropping and re-creating the HNSW index around it
        when ``rebuild`` is True (or "auto" and the rows are a large enough part of the table)."""
        tt = self._t["templates"]
        hnsw = f"{tt}_hnsw"
        if rebuild == "auto":
            # reltuples: the planner's row estimate (-1: never analysed); a cheap, good enough size
            estimate = conn.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)", (tt,)).fetchone()
            rows = max(0.0, float(estimate[0])) if estimate else 0.0
            rebuild = len(params) >= BULK_REBUILD_FRACTION * (rows + len(params))
        rebuild = bool(rebuild) and self._has_hnsw
        if rebuild:
            conn.execute(f"LOCK TABLE {tt} IN ACCESS EXCLUSIVE MODE")
            conn.execute(f"DROP INDEX IF EXISTS {hnsw}")
        columns = "template_id, tenant, subject, vector, ciphertext, created_at"
        vector_oid = self._vector_oid
        assert vector_oid is not None  # learnt when the store opened
        with conn.cursor() as cur:
            with cur.copy(f"COPY {tt} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "text", "int8", vector_oid, "bytea", "float8"])
                for row in params:
                    copy.write_row(row)
        if rebuild:
            conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (BULK_MAINTENANCE_WORK_MEM,))
            conn.execute(self._hnsw_index_sql())
            conn.execute(f"ANALYZE {tt}")

    def _vector_columns(self, tenant: str, subject_id: str, template_id: str, vector: np.ndarray) -> tuple[Any, Any]:
        """``(vector, ciphertext)`` column values of one template (AAD: tenant, stored subject id, template id)."""
        if self.cipher is None:
            return PgVector(vector), None
        blob = self.cipher.encrypt(vector.astype("<f4").tobytes(), template_aad(tenant, template_id, subject_id))
        return None, bytes(blob)

    def delete_subject(self, tenant: str, subject_id: str) -> int:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        self._check_open()

        def write(conn: psycopg.Connection) -> tuple[list[int], tuple[int, int], bool]:
            try:
                generations = self._lock_tenant(conn, tenant, create=False)
            except NotFoundError:
                raise NotFoundError(f"subject {subject_id!r} not found in tenant {tenant!r}") from None
            pk = self._subject_row(conn, tenant, subject_id, lock=True)[0]
            deleted = conn.execute(f"DELETE FROM {self._t['templates']} WHERE subject = %s RETURNING id", (pk,))
            rowids = [r[0] for r in deleted]
            conn.execute(f"DELETE FROM {self._t['subjects']} WHERE id = %s", (pk,))
            alive = self._update_counts(conn, tenant, -len(rowids), -1)
            return rowids, generations, alive

        if self.cipher is None:
            return len(self._run(write, what="delete_subject")[0])
        with self._write_mutex:
            rowids, generations, alive = self._run(write, what="delete_subject")
            self._apply(tenant, generations if alive else (generations[0], 0), rowids, [], None)
        return len(rowids)

    def delete_template(self, tenant: str, template_id: str) -> str:
        check_id(tenant, "tenant")
        check_id(template_id, "template_id")
        self._check_open()
        tt, s = self._t["templates"], self._t["subjects"]

        def write(conn: psycopg.Connection) -> tuple[str, int, tuple[int, int], bool]:
            try:
                generations = self._lock_tenant(conn, tenant, create=False)
            except NotFoundError:
                raise NotFoundError(f"template {template_id!r} not found in tenant {tenant!r}") from None
            row = conn.execute(
                f"SELECT t.id, t.subject, s.subject_id, s.metadata FROM {tt} t JOIN {s} s ON s.id = t.subject "
                "WHERE t.template_id = %s AND t.tenant = %s FOR UPDATE OF t, s",
                (template_id, tenant),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"template {template_id!r} not found in tenant {tenant!r}")
            rowid, pk = row[0], row[1]
            subject_id = self._current_names(conn).unpack(tenant, row[2], row[3])[0]
            conn.execute(f"DELETE FROM {tt} WHERE id = %s", (rowid,))
            gone = 0
            if scalar(conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {tt} WHERE subject = %s)", (pk,))):
                conn.execute(f"DELETE FROM {s} WHERE id = %s", (pk,))
                gone = 1
            alive = self._update_counts(conn, tenant, -1, -gone)
            return subject_id, rowid, generations, alive

        if self.cipher is None:
            return self._run(write, what="delete_template")[0]
        with self._write_mutex:
            subject_id, rowid, generations, alive = self._run(write, what="delete_template")
            self._apply(tenant, generations if alive else (generations[0], 0), [rowid], [], None)
        return subject_id

    # ----------------------------------------------------------------------------------------------- reads

    def get_subject(self, tenant: str, subject_id: str) -> SubjectInfo:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")

        def read(conn: psycopg.Connection) -> SubjectInfo:
            pk, metadata, created_at, stored = self._subject_row(conn, tenant, subject_id)
            ids = [
                r[0]
                for r in conn.execute(
                    f"SELECT template_id FROM {self._t['templates']} WHERE subject = %s ORDER BY id", (pk,)
                )
            ]
            return SubjectInfo(subject_id, self._names.unpack(tenant, stored, metadata)[1], ids, float(created_at))

        return self._run(read, what="get_subject")

    def list_subjects(self, tenant: str, page_size: int = 100, page_token: str = "") -> tuple[list[SubjectInfo], str]:
        check_id(tenant, "tenant")
        page_size = check_positive_int(page_size, "page_size", MAX_PAGE_SIZE)
        after = decode_page_token(page_token)

        def read(conn: psycopg.Connection) -> tuple[list[SubjectInfo], str]:
            names = self._current_names(conn)
            rows = conn.execute(
                f"SELECT id, subject_id, metadata, created_at FROM {self._t['subjects']} "
                "WHERE tenant = %s AND subject_id > %s ORDER BY subject_id LIMIT %s",
                (tenant, after, page_size + 1),
            ).fetchall()
            more = len(rows) > page_size
            rows = rows[:page_size]
            templates: dict[int, list[str]] = {r[0]: [] for r in rows}
            if rows:
                for pk, template_id in conn.execute(
                    f"SELECT subject, template_id FROM {self._t['templates']} WHERE subject = ANY(%s) ORDER BY id",
                    ([r[0] for r in rows],),
                ):
                    templates[pk].append(template_id)
            page = []
            for pk, stored, metadata, created_at in rows:  # sealed: in keyed-hash order, the token a keyed hash
                subject_id, values = names.unpack(tenant, stored, metadata)
                page.append(SubjectInfo(subject_id, values, templates[pk], float(created_at)))
            return page, (encode_page_token(rows[-1][1]) if more else "")

        return self._run(read, what="list_subjects")

    def subject_vectors(self, tenant: str, subject_id: str) -> np.ndarray:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")

        def read(conn: psycopg.Connection) -> tuple[str, list[tuple]]:
            pk, _, _, stored = self._subject_row(conn, tenant, subject_id)  # the templates' AAD names the stored id
            with conn.cursor(binary=True) as cur:
                cur.execute(
                    f"SELECT template_id, vector, ciphertext FROM {self._t['templates']} "
                    "WHERE subject = %s ORDER BY id",
                    (pk,),
                )
                return stored, cur.fetchall()

        stored, rows = self._run(read, what="subject_vectors")
        return np.stack([self._decode(tenant, stored, r[0], r[1], r[2]) for r in rows]).astype(np.float32)

    def _decode(
        self, tenant: str, subject_id: str, template_id: str, vector: np.ndarray | None, blob: bytes | None
    ) -> np.ndarray:
        """One template's float32 vector, from its ``vector`` or (decrypted) ``ciphertext`` column."""
        if vector is not None:
            if self.cipher is not None and not self._plaintext_rows:
                raise IntegrityError(f"template {template_id!r} is stored in plaintext in an encrypted store")
            return vector
        if self.cipher is None or blob is None:
            raise IntegrityError(f"template {template_id!r} is encrypted but this store has no cipher")
        try:
            raw = self.cipher.decrypt(bytes(blob), template_aad(tenant, template_id, subject_id))
        except IntegrityError as exc:
            raise IntegrityError(f"template {template_id!r} of tenant {tenant!r} failed to decrypt: {exc}") from None
        if len(raw) != 4 * self.dim:
            raise IntegrityError(f"template {template_id!r} decrypted to {len(raw)} bytes, expected {4 * self.dim}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)

    def count(self, tenant: str | None = None, *, subjects: bool = False) -> int:
        if tenant is not None:
            check_id(tenant, "tenant")
        column = "subjects" if subjects else "templates"
        sql = f"SELECT COALESCE(SUM({column}), 0) FROM {self._t['tenants']}"
        args: tuple[str, ...] = ()
        if tenant is not None:
            sql, args = sql + " WHERE tenant = %s", (tenant,)
        return int(self._run(lambda conn: scalar(conn.execute(sql, args)), what="count"))

    def tenants(self) -> list[str]:
        sql = f"SELECT tenant FROM {self._t['tenants']} WHERE subjects > 0 ORDER BY tenant"
        return self._run(lambda conn: [r[0] for r in conn.execute(sql)], what="tenants")

    # ----------------------------------------------------------------------------------------------- closing

    def close(self) -> None:
        with self._write_mutex:
            if self._closed:
                return
            self._closed = True
            with self._index_lock.write():
                self._tenants, self._generations = {}, {}
            self._pool.close()

    def __repr__(self) -> str:
        mode = ", encrypted" if self.cipher is not None else ""
        return f"PostgresStore({redact_dsn(self.dsn)!r}, dim={self.dim}, metric={self.metric!r}{mode})"
