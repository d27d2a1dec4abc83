"""A template store on PostgreSQL + pgvector: several sidecar replicas can share one database (scale-out).

Tables (``<prefix>`` is ``table_prefix``, default ``advface``)::

    <prefix>_meta        key -> value: format, schema version, dimension, metric, encryption mode
    <prefix>_tenants     one row per tenant holding subjects: a write generation and template/subject counts
    <prefix>_subjects    (tenant, subject_id) unique, metadata (JSON text), created_at (Unix seconds)
    <prefix>_templates   template_id (32 hex), tenant, subject, vector vector(dim) or ciphertext bytea, created_at

The schema is created on first use (the ``vector`` extension too, when the role may create it) and checked on every
open: another format, schema version, dimension, metric or encryption mode raises ConfigError.

Search, plaintext mode (no ``cipher``): done in SQL, so every replica sees every committed write at once. Tenants
with at most ``exact_max`` templates are searched exactly (a scan of the tenant's rows: the same results as faiss's
flat index, up to float rounding); larger tenants through the HNSW index on ``vector`` (``vector_cosine_ops`` or
``vector_l2_ops``), with iterative index scans so that the tenant filter never starves the result: candidates are
over-fetched and reduced to each subject's best template; when the index yields fewer distinct subjects than asked
(and the tenant has more), the search falls back to an exact scan. HNSW search is approximate: see the benchmark
(``benchmarks/store_postgres.py``) for its recall. Scores: cosine similarity (``1 - (v <=> q)``) or minus the
Euclidean distance (``-(v <-> q)``), as in :class:`~advface.store.sqlite_faiss.SQLiteFaissStore`.

Encrypted mode (``cipher`` given, e.g. :class:`advface.crypto.TemplateCipher`): vectors are stored only as
ciphertext (``bytea``; AAD = tenant, subject and template id: a ciphertext moved to another row fails to decrypt)
and the ``vector`` column stays NULL: a stolen database (or its backups, WAL, replicas) yields no vectors. Search then
runs on an in-memory faiss index per tenant, rebuilt from decrypted rows at open, like the SQLite store. Each write
bumps the tenant's ``generation`` (from a sequence); a search first reads it (one primary-key lookup) and rebuilds
the tenant's index when another process changed the tenant. Several replicas may therefore share an encrypted
database, but each keeps a full copy of the index and rebuilds a tenant after every foreign write: it is meant for
one replica per database (or rarely-written tenants).

Keys and maintenance jobs (as in the SQLite store; rules shared in :mod:`advface.store.rotation`): ``meta`` records
``key_ids`` (keys rows may be under; a cipher lacking one of the keys in use is refused at open, naming the missing
key and an unfinished rotation), ``rotation`` (target of an unfinished :meth:`PostgresStore.rotate`),
``plaintext_rows`` (a plaintext store opened with ``migrate_plaintext=True`` until ``rotate`` has encrypted it),
``transform_job`` (progress of :meth:`PostgresStore.transform_vectors`) and ``keyed_transform`` (what the templates
were issued under). Jobs run one batch per transaction, serialised across processes by an advisory lock. A
re-issue (``transform_vectors``) locks each batch's tenants and bumps their generations, so other replicas rebuild
their in-memory indexes; they must not enrol while it runs (their writes would use the old transform).
:meth:`PostgresStore.bulk_add` loads large batches with COPY and an HNSW rebuild.

Durability: autocommit is off and every method is one transaction; ``synchronous_commit`` is set to ``on`` on every
connection (PostgreSQL's default), so a write is flushed to the server's WAL when its method returns.

Deletion: ``DELETE`` removes the rows at once for every reader, but PostgreSQL keeps the old tuples' bytes (dead
tuples) in the table, index and WAL files until VACUUM reclaims the space and later writes overwrite it; autovacuum
does this eventually, without erasing the bytes. :meth:`PostgresStore.vacuum` runs ``VACUUM FULL`` on the subject
and template tables, which rewrites them and their indexes into new files (the old files are removed: the bytes may
remain in free disk blocks and in WAL segments until they are recycled; use disk encryption, or the encrypted mode,
where deleted rows only ever held ciphertext).

Thread safety: connections come from a small pool (one per concurrent call, at most ``pool_size``); writes of one
tenant are serialised by a row lock on the tenant's row (taken first in every write transaction, in every replica),
so concurrent writers cannot deadlock or miscount. In encrypted mode the writes of one store object are also
serialised in-process (the index update follows the commit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format, TransactionStatus
from psycopg.types import TypeInfo

from advface.crypto import BLOB_VERSION, ENCRYPTED_OVERHEAD, ENCRYPTION_SCHEME, TemplateCipher, template_aad
from advface.errors import ConfigError, IntegrityError, NotFoundError, DatabaseUnavailableError
from advface.store import rotation
from advface.store.base import (
    MAX_PAGE_SIZE,
    Match,
    StoreMetric,
    SubjectInfo,
    TemplateStore,
    check_dim_metric,
    check_id,
    check_add_many,
    check_metadata,
    check_positive_int,
    check_probe,
    decode_page_token,
    encode_page_token,
)
from advface.store.sqlite_faiss import _RWLock, _TenantIndex

log = logging.getLogger(__name__)

FORMAT = "advface-template-store-pg"
SCHEMA_VERSION = 1
#: Tenants with at most this many templates are searched exactly (no HNSW) by default.
EXACT_MAX_DEFAULT = 10_000
#: pgvector's limits: ``vector`` columns up to 16000 dimensions, HNSW indexes up to 2000.
PGVECTOR_MAX_DIM = 16_000
HNSW_MAX_DIM = 2_000
_MAX_SEARCH_K = 10_000_000
_MAX_EF_SEARCH = 1000
_WRITE_ATTEMPTS = 3
#: Passes of :meth:`PostgresStore.rotate` over rows written under an old key meanwhile (by other replicas).
_ROTATION_PASSES = 5
#: :meth:`PostgresStore.bulk_add` rebuilds the HNSW index when a load adds at least this share of the table's rows
#: (building the graph once cost about 1/20 per row of maintaining it row by row in the benchmark's side check:
#: benchmarks/RESULTS.md, PostgreSQL store).
BULK_REBUILD_FRACTION = 0.1
#: ``maintenance_work_mem`` of a bulk load's index build (the graph is built in memory when it fits).
BULK_MAINTENANCE_WORK_MEM = "512MB"
#: ``meta`` key of the keyed-transform marker (what the templates were issued under; see tenant_transform).
TRANSFORM_MARKER_KEY = "keyed_transform"
_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")

T = TypeVar("T")


class Cipher(Protocol):
    """What the encrypted mode needs of a cipher (:class:`advface.crypto.TemplateCipher` has it)."""

    @property
    def key_id(self) -> str: ...

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def decrypt(self, blob: bytes, aad: bytes) -> bytes: ...


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


class _PgVector:
    """A float32 vector sent to PostgreSQL as pgvector's binary ``vector``."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


class _VectorDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: _PgVector) -> bytes:
        a = np.ascontiguousarray(obj.array, dtype=">f4")
        return struct.pack(">HH", len(a), 0) + a.tobytes()


class _VectorLoader(Loader):
    format = Format.BINARY

    def load(self, data: Any) -> np.ndarray:
        dim, _ = struct.unpack_from(">HH", data)
        return np.frombuffer(bytes(data), dtype=">f4", count=dim, offset=4).astype(np.float32)


def _index_vectors(vectors: np.ndarray, metric: StoreMetric) -> np.ndarray:
    """What a faiss index holds for ``vectors``: themselves, or L2-normalised copies for cosine."""
    if metric == "cosine":
        v64 = vectors.astype(np.float64)
        vectors = v64 / np.linalg.norm(v64, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors, dtype=np.float32)


# --------------------------------------------------------------------------------------------------- pool


class _Pool:
    """At most ``size`` connections, made on demand and reused; broken or dirty ones are dropped."""

    def __init__(self, connect: Callable[[], psycopg.Connection], size: int) -> None:
        self._connect = connect
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        self._slots.acquire()
        conn: psycopg.Connection | None = None
        try:
            with self._lock:
                if self._closed:
                    raise ConfigError("template store is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
            yield conn
        finally:
            if conn is not None:
                healthy = (
                    not conn.closed
                    and not conn.broken
                    and conn.info.transaction_status == TransactionStatus.IDLE
                )
                with self._lock:
                    if healthy and not self._closed:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()


# --------------------------------------------------------------------------------------------------- store


class PostgresStore(rotation.TemplateReissue, TemplateStore):
    """Templates in PostgreSQL + pgvector at ``dsn`` (tables created on first use); see the module docs.

    ``dim`` and ``metric`` must match those the tables were made with. ``cipher``: keep vectors only as ciphertext
    (encrypted mode). ``table_prefix``: lower-case letters, digits and ``_`` (several stores in one database).
    ``pool_size``: most connections held at once. ``exact_max``: tenants with at most this many templates are
    searched exactly. ``ef_search``: the smallest ``hnsw.ef_search`` used (raised to the candidates fetched, at
    most 1000; the default 200 gave recall@10 0.978 against exact search at 100k dlib-like templates, 100 gave
    0.936: ``benchmarks/RESULTS.md``). ``hnsw_m`` / ``hnsw_ef_construction``: index parameters, used when the
    index is created (or rebuilt by :meth:`bulk_add`). ``migrate_plaintext``: with a cipher, open a plaintext store
    and switch it to encrypted mode (existing rows stay readable until :meth:`rotate` has encrypted them).
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
        if not isinstance(table_prefix, str) or not _PREFIX_RE.fullmatch(table_prefix):
            raise ConfigError(
                f"table_prefix must be 1 to 40 lower-case letters, digits or '_' (not starting with a digit), "
                f"got {table_prefix!r}"
            )
        if cipher is not None and not all(hasattr(cipher, a) for a in ("encrypt", "decrypt", "key_id")):
            raise ConfigError(f"cipher must have encrypt(), decrypt() and key_id, got {type(cipher).__name__}")
        self.pool_size = check_positive_int(pool_size, "pool_size", 1000)
        if not isinstance(exact_max, int) or isinstance(exact_max, bool) or exact_max < 0:
            raise ConfigError(f"exact_max must be an integer >= 0, got {exact_max!r}")
        self.exact_max = exact_max
        self.ef_search = check_positive_int(ef_search, "ef_search", _MAX_EF_SEARCH)
        self._hnsw_m = check_positive_int(hnsw_m, "hnsw_m", 100)
        self._hnsw_ef_construction = check_positive_int(hnsw_ef_construction, "hnsw_ef_construction", 1000)
        self.dsn = dsn
        self.cipher = cipher
        self.prefix = table_prefix
        self._connect_timeout = connect_timeout
        self._migrate_plaintext = bool(migrate_plaintext)
        self._plaintext_rows = False  # an encryption migration is under way: rows with a `vector` are plaintext
        self._has_hnsw = self.dim <= HNSW_MAX_DIM
        self._t = {name: f"{table_prefix}_{name}" for name in ("meta", "tenants", "subjects", "templates")}
        self._seq = f"{table_prefix}_generation"
        self._vector_oid: int | None = None
        self._closed = False
        # encrypted mode: in-memory indexes and the generation each was built at
        self._write_mutex = threading.Lock()
        self._index_lock = _RWLock()
        self._tenants: dict[str, _TenantIndex] = {}
        self._generations: dict[str, int] = {}
        self._pool = _Pool(self._new_connection, self.pool_size)
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

    # ----------------------------------------------------------------------------------------------- plumbing

    @property
    def encrypted(self) -> bool:
        """Whether vectors are kept only as ciphertext."""
        return self.cipher is not None

    def _where(self) -> str:
        return f"{redact_dsn(self.dsn)} (tables {self.prefix}_*)"

    def _new_connection(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.dsn, autocommit=False, connect_timeout=max(1, int(self._connect_timeout)))
        except psycopg.Error as exc:
            raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {redact_dsn(self.dsn)}: {exc}") from None
        try:
            conn.execute("SET synchronous_commit = on")
            conn.commit()
            if self._vector_oid is not None:
                self._register_vector(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _register_vector(self, conn: psycopg.Connection) -> None:
        dumper = type("_BoundVectorDumper", (_VectorDumper,), {"oid": self._vector_oid})
        conn.adapters.register_dumper(_PgVector, dumper)
        conn.adapters.register_loader(self._vector_oid, _VectorLoader)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"template store {self._where()} is closed")

    def _run(self, fn: Callable[[psycopg.Connection], T], *, what: str) -> T:
        """``fn(conn)`` in one transaction, committed; retried on deadlock/serialisation failures and on a broken
        connection found before the commit (a dead pooled connection); DatabaseUnavailableError otherwise."""
        self._check_open()
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            committing = False
            with self._pool.connection() as conn:
                try:
                    result = fn(conn)
                    committing = True
                    conn.commit()
                    return result
                except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                    self._rollback(conn)
                    if attempt == _WRITE_ATTEMPTS:
                        raise DatabaseUnavailableError(f"{what}: too much contention, try again") from None
                except psycopg.OperationalError as exc:
                    self._rollback(conn)
                    if committing:
                        raise DatabaseUnavailableError(
                            f"{what}: the connection to PostgreSQL failed during COMMIT; the outcome is unknown "
                            f"({type(exc).__name__})"
                        ) from None
                    if attempt == _WRITE_ATTEMPTS or not conn.broken:
                        raise DatabaseUnavailableError(f"{what}: PostgreSQL is unavailable: {exc}") from None
                    log.info("%s: connection lost before commit, retrying on a new one", what)
                except BaseException:
                    self._rollback(conn)
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _rollback(conn: psycopg.Connection) -> None:
        if not conn.closed and not conn.broken:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()

    # ----------------------------------------------------------------------------------------------- schema

    def _schema(self) -> list[str]:
        t, dim = self._t, self.dim
        statements = [
            f"CREATE TABLE {t['meta']} (key text PRIMARY KEY, value text NOT NULL)",
            f"CREATE SEQUENCE {self._seq}",
            f"""CREATE TABLE {t['tenants']} (
                tenant text COLLATE "C" PRIMARY KEY,
                generation bigint NOT NULL,
                templates bigint NOT NULL DEFAULT 0,
                subjects bigint NOT NULL DEFAULT 0)""",
            f"""CREATE TABLE {t['subjects']} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tenant text COLLATE "C" NOT NULL,
                subject_id text COLLATE "C" NOT NULL,
                metadata text NOT NULL,
                created_at double precision NOT NULL,
                UNIQUE (tenant, subject_id))""",
            f"""CREATE TABLE {t['templates']} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                template_id text NOT NULL UNIQUE,
                tenant text COLLATE "C" NOT NULL,
                subject bigint NOT NULL REFERENCES {t['subjects']} (id) ON DELETE CASCADE,
                vector vector({dim}),
                ciphertext bytea,
                created_at double precision NOT NULL,
                CHECK ((vector IS NULL) <> (ciphertext IS NULL)))""",
            f"CREATE INDEX {t['templates']}_by_subject ON {t['templates']} (subject, id)",
            f"CREATE INDEX {t['templates']}_by_tenant ON {t['templates']} (tenant, id)",
        ]
        if self._has_hnsw:
            ops = "vector_cosine_ops" if self.metric == "cosine" else "vector_l2_ops"
            statements.append(
                f"CREATE INDEX {t['templates']}_hnsw ON {t['templates']} USING hnsw (vector {ops}) "
                f"WITH (m = {self._hnsw_m}, ef_construction = {self._hnsw_ef_construction})"
            )
        return statements

    def _create_or_check_schema(self) -> None:
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
            exists = conn.execute("SELECT to_regclass(%s)", (meta_table,)).fetchone()[0]
            if exists is None:
                for statement in self._schema():
                    conn.execute(statement)
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
        if lock:  # serialises the store's maintenance jobs (rotation, re-issue) across processes
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"advface-meta:{self.prefix}",))
        return dict(conn.execute(f"SELECT key, value FROM {self._t['meta']}").fetchall())

    def _set_meta(self, conn: psycopg.Connection, values: Mapping[str, str | None]) -> None:
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
            has_rows = conn.execute(f"SELECT EXISTS (SELECT 1 FROM {self._t['templates']})").fetchone()[0]
            self._set_meta(conn, {
                "encryption": ENCRYPTION_SCHEME,
                "key_ids": json.dumps([self.cipher.key_id]),
                "plaintext_rows": "1" if has_rows else None,
            })
            return bool(has_rows)

        if self._run(write, what="encryption migration"):
            log.warning("template store %s: encrypting its existing templates (migration started)", self._where())

    def _check_keys(self) -> None:
        """ConfigError when rows are under keys the cipher lacks (wrong key, unfinished rotation); records the
        cipher's primary key among ``key_ids`` (the keys rows may be under)."""
        cipher = self.cipher
        has_key = getattr(cipher, "has_key", None)
        tt = self._t["templates"]

        def check(conn: psycopg.Connection) -> None:
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

        self._run(check, what="open")

    # ----------------------------------------------------------------------------------------------- tenant rows

    def _lock_tenant(self, conn: psycopg.Connection, tenant: str, *, create: bool) -> tuple[int, int]:
        """Lock the tenant's row (serialising its writers) and give it a new generation: ``(old, new)``;
        ``old`` is 0 for a new tenant. Without ``create``, an unknown tenant raises NotFoundError."""
        t = self._t["tenants"]
        while True:
            row = conn.execute(f"SELECT generation FROM {t} WHERE tenant = %s FOR UPDATE", (tenant,)).fetchone()
            if row is not None:
                new = conn.execute(
                    f"UPDATE {t} SET generation = nextval('{self._seq}') WHERE tenant = %s RETURNING generation",
                    (tenant,),
                ).fetchone()[0]
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
        left = conn.execute(
            f"UPDATE {t} SET templates = templates + %s, subjects = subjects + %s WHERE tenant = %s RETURNING subjects",
            (templates, subjects, tenant),
        ).fetchone()[0]
        if left <= 0:
            conn.execute(f"DELETE FROM {t} WHERE tenant = %s", (tenant,))
            return False
        return True

    def _subject_row(self, conn: psycopg.Connection, tenant: str, subject_id: str, *, lock: bool = False) -> tuple:
        row = conn.execute(
            f"SELECT id, metadata, created_at FROM {self._t['subjects']} WHERE tenant = %s AND subject_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (tenant, subject_id),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"subject {subject_id!r} not found in tenant {tenant!r}")
        return row

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
        migrations; small or frequent enrolments should use :meth:`add_many`.
        """
        if rebuild_index is not None and not isinstance(rebuild_index, bool):
            raise ConfigError(f"rebuild_index must be a bool or None, got {rebuild_index!r}")
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
            names = list(dict.fromkeys(c[0] for c in checked))
            existing = {
                r[1]: (r[0], json.loads(r[2]))
                for r in conn.execute(
                    f"SELECT id, subject_id, metadata FROM {s} WHERE tenant = %s AND subject_id = ANY(%s) "
                    "ORDER BY subject_id FOR UPDATE",
                    (tenant, names),
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
                    (list(pks.values()), [json.dumps(metadata_of[n], sort_keys=True) for n in pks]),
                )
            new = [n for n in names if n not in existing]
            if new:
                for pk, subject_id in conn.execute(
                    f"INSERT INTO {s} (tenant, subject_id, metadata, created_at) "
                    "SELECT %s, u.subject_id, u.metadata, %s FROM unnest(%s::text[], %s::text[]) "
                    "AS u(subject_id, metadata) RETURNING id, subject_id",
                    (tenant, now, new, [json.dumps(metadata_of[n], sort_keys=True) for n in new]),
                ):
                    pks[subject_id] = pk
            result: list[list[str]] = []
            labels: list[tuple[str, str]] = []
            params: list[tuple] = []
            for subject_id, vectors, _ in checked:
                ids = [uuid.uuid4().hex for _ in range(len(vectors))]
                result.append(ids)
                for template_id, vector in zip(ids, vectors):
                    labels.append((subject_id, template_id))
                    columns = self._vector_columns(tenant, subject_id, template_id, vector)
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
                        rowids.append(int(cur.fetchone()[0]))
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
        with conn.cursor() as cur:
            with cur.copy(f"COPY {tt} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "text", "int8", self._vector_oid, "bytea", "float8"])
                for row in params:
                    copy.write_row(row)
        if rebuild:
            ops = "vector_cosine_ops" if self.metric == "cosine" else "vector_l2_ops"
            conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (BULK_MAINTENANCE_WORK_MEM,))
            conn.execute(
                f"CREATE INDEX {hnsw} ON {tt} USING hnsw (vector {ops}) "
                f"WITH (m = {self._hnsw_m}, ef_construction = {self._hnsw_ef_construction})"
            )
            conn.execute(f"ANALYZE {tt}")

    def _vector_columns(self, tenant: str, subject_id: str, template_id: str, vector: np.ndarray) -> tuple[Any, Any]:
        """``(vector, ciphertext)`` column values of one template (AAD: tenant, subject id, template id)."""
        if self.cipher is None:
            return _PgVector(vector), None
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
                f"SELECT t.id, t.subject, s.subject_id FROM {tt} t JOIN {s} s ON s.id = t.subject "
                "WHERE t.template_id = %s AND t.tenant = %s FOR UPDATE OF t, s",
                (template_id, tenant),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"template {template_id!r} not found in tenant {tenant!r}")
            rowid, pk, subject_id = row
            conn.execute(f"DELETE FROM {tt} WHERE id = %s", (rowid,))
            gone = 0
            if conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {tt} WHERE subject = %s)", (pk,)).fetchone()[0]:
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

    def vacuum(self) -> None:
        """``VACUUM FULL`` the subject and template tables: rewrites them and their indexes without the dead
        tuples of deleted or replaced rows (see the module docs). Locks the tables exclusively while it runs."""
        self._check_open()
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self._connect_timeout))) as conn:
                for table in (self._t["templates"], self._t["subjects"]):
                    conn.execute(f"VACUUM FULL {table}")
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"vacuum: PostgreSQL is unavailable: {exc}") from None

    # ----------------------------------------------------------------------------------------------- reads

    def get_subject(self, tenant: str, subject_id: str) -> SubjectInfo:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")

        def read(conn: psycopg.Connection) -> SubjectInfo:
            pk, metadata, created_at = self._subject_row(conn, tenant, subject_id)
            ids = [
                r[0]
                for r in conn.execute(
                    f"SELECT template_id FROM {self._t['templates']} WHERE subject = %s ORDER BY id", (pk,)
                )
            ]
            return SubjectInfo(subject_id, json.loads(metadata), ids, float(created_at))

        return self._run(read, what="get_subject")

    def list_subjects(self, tenant: str, page_size: int = 100, page_token: str = "") -> tuple[list[SubjectInfo], str]:
        check_id(tenant, "tenant")
        page_size = check_positive_int(page_size, "page_size", MAX_PAGE_SIZE)
        after = decode_page_token(page_token)

        def read(conn: psycopg.Connection) -> tuple[list[SubjectInfo], str]:
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
            page = [SubjectInfo(r[1], json.loads(r[2]), templates[r[0]], float(r[3])) for r in rows]
            return page, (encode_page_token(rows[-1][1]) if more else "")

        return self._run(read, what="list_subjects")

    def subject_vectors(self, tenant: str, subject_id: str) -> np.ndarray:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")

        def read(conn: psycopg.Connection) -> list[tuple]:
            pk = self._subject_row(conn, tenant, subject_id)[0]
            with conn.cursor(binary=True) as cur:
                cur.execute(
                    f"SELECT template_id, vector, ciphertext FROM {self._t['templates']} "
                    "WHERE subject = %s ORDER BY id",
                    (pk,),
                )
                return cur.fetchall()

        rows = self._run(read, what="subject_vectors")
        return np.stack([self._decode(tenant, subject_id, r[0], r[1], r[2]) for r in rows]).astype(np.float32)

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
        sql, args = f"SELECT COALESCE(SUM({column}), 0) FROM {self._t['tenants']}", ()
        if tenant is not None:
            sql, args = sql + " WHERE tenant = %s", (tenant,)
        return int(self._run(lambda conn: conn.execute(sql, args).fetchone()[0], what="count"))

    def tenants(self) -> list[str]:
        sql = f"SELECT tenant FROM {self._t['tenants']} WHERE subjects > 0 ORDER BY tenant"
        return self._run(lambda conn: [r[0] for r in conn.execute(sql)], what="tenants")

    # ----------------------------------------------------------------------------------------------- search

    def search(self, tenant: str, probe: np.ndarray, k: int) -> list[Match]:
        check_id(tenant, "tenant")
        k = check_positive_int(k, "k", _MAX_SEARCH_K)
        query = check_probe(probe, self.dim)
        self._check_open()
        if self.cipher is not None:
            return self._search_index(tenant, _index_vectors(query, self.metric), k)
        return self._run(lambda conn: self._search_sql(conn, tenant, query[0], k), what="search")

    def _score(self, distance: float) -> float:
        return 1.0 - float(distance) if self.metric == "cosine" else -float(distance)

    def _hnsw_settings(self, conn: psycopg.Connection, candidates: int) -> None:
        """Transaction settings of an HNSW search for ``candidates`` rows: ``hnsw.ef_search``, iterative scans in
        strict distance order (the tenant filter cannot starve the result), and no sorts: the tenant is known to
        be large, so the planner must take the index even when its statistics are stale."""
        conn.execute(
            "SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', 'strict_order', true),"
            " set_config('enable_sort', 'off', true)",
            (str(min(_MAX_EF_SEARCH, max(self.ef_search, candidates))),),
        )

    def _hnsw_sql(self) -> str:
        """The HNSW candidate query; parameters: probe, tenant, probe, number of candidates."""
        op = "<=>" if self.metric == "cosine" else "<->"
        tt, s = self._t["templates"], self._t["subjects"]
        return (
            f"SELECT s.subject_id, c.template_id, c.d FROM ("
            f"SELECT id, subject, template_id, vector {op} %b AS d FROM {tt} WHERE tenant = %s "
            f"ORDER BY vector {op} %b LIMIT %s) c JOIN {s} s ON s.id = c.subject ORDER BY c.d, c.id"
        )

    def _exact_sql(self) -> str:
        """The exact candidate query (a top-N sort of the tenant's distances; ``OFFSET 0`` keeps the planner off
        the HNSW index); parameters: probe, tenant, number of candidates."""
        op = "<=>" if self.metric == "cosine" else "<->"
        tt, s = self._t["templates"], self._t["subjects"]
        return (
            f"SELECT s.subject_id, c.template_id, c.d FROM ("
            f"SELECT * FROM (SELECT id, subject, template_id, vector {op} %b AS d FROM {tt} WHERE tenant = %s "
            f"OFFSET 0) a ORDER BY d, id LIMIT %s) c JOIN {s} s ON s.id = c.subject ORDER BY c.d, c.id"
        )

    def _search_sql(self, conn: psycopg.Connection, tenant: str, query: np.ndarray, k: int) -> list[Match]:
        """Over-fetch the nearest templates (HNSW for large tenants, exact otherwise) and keep each subject's best;
        more candidates while duplicates crowd the list, then an exact best-per-subject scan if still short."""
        row = conn.execute(
            f"SELECT templates, subjects FROM {self._t['tenants']} WHERE tenant = %s", (tenant,)
        ).fetchone()
        if row is None or row[0] == 0:
            return []
        n_templates, n_subjects = int(row[0]), int(row[1])
        q = _PgVector(query)
        hnsw = self._has_hnsw and n_templates > self.exact_max
        first = min(n_templates, max(2 * k, k + 16))
        kk = first
        while True:
            if hnsw:
                self._hnsw_settings(conn, kk)
                rows = conn.execute(self._hnsw_sql(), (q, tenant, q, kk)).fetchall()
            else:
                rows = conn.execute(self._exact_sql(), (q, tenant, kk)).fetchall()
            out: list[Match] = []
            seen: set[str] = set()
            for subject_id, template_id, d in rows:
                if subject_id not in seen:
                    seen.add(subject_id)
                    out.append(Match(subject_id, template_id, self._score(d)))
                    if len(out) == k:
                        return out
            if len(out) >= n_subjects or (not hnsw and (len(rows) < kk or kk >= n_templates)):
                return out  # every subject found, or (exact) every template seen
            if hnsw and (len(rows) < kk or kk >= 16 * first):
                break  # the index yields no more (or too many duplicates): an exact scan settles it
            kk = min(n_templates, 4 * kk)
        conn.execute("SELECT set_config('enable_sort', 'on', true)")
        op = "<=>" if self.metric == "cosine" else "<->"
        tt, s = self._t["templates"], self._t["subjects"]
        rows = conn.execute(
            f"SELECT s.subject_id, b.template_id, b.d FROM ("
            f"SELECT DISTINCT ON (subject) subject, template_id, vector {op} %b AS d, id FROM {tt} "
            f"WHERE tenant = %s ORDER BY subject, d, id) b JOIN {s} s ON s.id = b.subject "
            "ORDER BY b.d, b.id LIMIT %s",
            (q, tenant, k),
        ).fetchall()
        return [Match(r[0], r[1], self._score(r[2])) for r in rows]

    # ----------------------------------------------------------------------------------------------- encrypted mode

    def _tenant_generation(self, tenant: str) -> int:
        sql = f"SELECT generation FROM {self._t['tenants']} WHERE tenant = %s"
        row = self._run(lambda conn: conn.execute(sql, (tenant,)).fetchone(), what="search")
        return 0 if row is None else int(row[0])

    def _search_index(self, tenant: str, query: np.ndarray, k: int) -> list[Match]:
        generation = self._tenant_generation(tenant)
        with self._index_lock.read():
            fresh = self._generations.get(tenant, 0) == generation
            if fresh:
                return self._knn_dedup(tenant, query, k)
        with self._write_mutex:  # a write of this process finishes first; then rebuild if still stale
            if self._tenant_generation(tenant) != self._generations.get(tenant, 0):
                self._rebuild_tenants([tenant])
        with self._index_lock.read():
            return self._knn_dedup(tenant, query, k)

    def _knn_dedup(self, tenant: str, query: np.ndarray, k: int) -> list[Match]:
        """Best template of each of the ``k`` best subjects (faiss over-fetch and dedupe, as the SQLite store)."""
        ti = self._tenants.get(tenant)
        if ti is None or ti.ntotal == 0:
            return []
        n = ti.ntotal
        kk = min(n, max(2 * k, k + 16))
        while True:
            distances, ids = ti.index.search(query, kk)
            out: list[Match] = []
            seen: set[str] = set()
            for d, rowid in zip(distances[0].tolist(), ids[0].tolist()):
                if rowid < 0:
                    continue
                subject_id, template_id = ti.labels[rowid]
                if subject_id in seen:
                    continue
                seen.add(subject_id)
                score = -float(np.sqrt(max(d, 0.0))) if self.metric == "euclidean" else float(d)
                out.append(Match(subject_id, template_id, score))
                if len(out) == k:
                    return out
            if kk >= n:
                return out
            kk = min(n, 4 * kk)

    def _rebuild_all(self) -> None:
        tenants = self._run(
            lambda conn: [r[0] for r in conn.execute(f"SELECT tenant FROM {self._t['tenants']} ORDER BY tenant")],
            what="open",
        )
        self._rebuild_tenants(tenants, replace_all=True)

    def _rebuild_tenants(self, tenants: Sequence[str], *, replace_all: bool = False) -> None:
        """Rebuild the indexes of ``tenants`` from decrypted rows, read in one snapshot with their generations."""
        tt, s, tn = self._t["templates"], self._t["subjects"], self._t["tenants"]

        def read(conn: psycopg.Connection) -> dict[str, tuple[int, list[tuple]]]:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            out: dict[str, tuple[int, list[tuple]]] = {}
            for tenant in tenants:
                row = conn.execute(f"SELECT generation FROM {tn} WHERE tenant = %s", (tenant,)).fetchone()
                with conn.cursor(binary=True) as cur:
                    cur.execute(
                        f"SELECT t.id, s.subject_id, t.template_id, t.vector, t.ciphertext FROM {tt} t "
                        f"JOIN {s} s ON s.id = t.subject WHERE t.tenant = %s ORDER BY t.id",
                        (tenant,),
                    )
                    out[tenant] = (0 if row is None else int(row[0]), cur.fetchall())
            return out

        snapshot = self._run(read, what="rebuilding the index")
        built: dict[str, tuple[_TenantIndex | None, int]] = {}
        for tenant, (generation, rows) in snapshot.items():
            ti = None
            if rows:
                ti = _TenantIndex(self.dim, self.metric)
                vectors = np.stack([self._decode(tenant, r[1], r[2], r[3], r[4]) for r in rows])
                rowids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                ti.add(rowids, _index_vectors(vectors, self.metric), [(r[1], r[2]) for r in rows])
            built[tenant] = (ti, generation)
        with self._index_lock.write():
            if replace_all:
                self._tenants, self._generations = {}, {}
            for tenant, (ti, generation) in built.items():
                self._store_index(tenant, ti, generation)

    def _store_index(self, tenant: str, ti: _TenantIndex | None, generation: int) -> None:
        if ti is None or ti.ntotal == 0:
            self._tenants.pop(tenant, None)
        else:
            self._tenants[tenant] = ti
        if generation:
            self._generations[tenant] = generation
        else:
            self._generations.pop(tenant, None)

    def _apply(
        self,
        tenant: str,
        generations: tuple[int, int],
        removed: Sequence[int],
        added: Sequence[tuple[int, str, str]],
        added_vectors: np.ndarray | None,
    ) -> None:
        """Apply a committed write to the tenant's index when the index was current before it (else rebuild)."""
        old, new = generations
        with self._index_lock.write():
            current = self._generations.get(tenant, 0) == old
            if current:
                try:
                    ti = self._tenants.get(tenant)
                    if removed and ti is not None:
                        ti.remove(np.asarray(removed, np.int64))
                    if added:
                        if ti is None:
                            ti = self._tenants[tenant] = _TenantIndex(self.dim, self.metric)
                        assert added_vectors is not None
                        rowids = np.array([a[0] for a in added], np.int64)
                        ti.add(rowids, _index_vectors(added_vectors, self.metric), [(a[1], a[2]) for a in added])
                    self._store_index(tenant, ti, new)
                    return
                except Exception:
                    log.exception("index update of tenant %r failed; rebuilding it", tenant)
        self._rebuild_tenants([tenant])  # another process wrote to the tenant in between (or the update failed)

    def index_size(self, tenant: str | None = None) -> int:
        """Templates held by the in-memory indexes (encrypted mode; 0 in plaintext mode, which searches in SQL)."""
        with self._index_lock.read():
            if tenant is not None:
                ti = self._tenants.get(tenant)
                return 0 if ti is None else ti.ntotal
            return sum(t.ntotal for t in self._tenants.values())

    # ----------------------------------------------------------------------------------------------- maintenance

    def encryption_info(self) -> dict[str, object]:
        """The store's encryption state: ``encrypted``, ``key_ids`` (rows may be under), ``primary_key_id``,
        ``rotation`` (target key id of an unfinished rotation, or None), ``plaintext_rows`` (migration unfinished)."""
        return rotation.encryption_state(self._run(self._meta, what="encryption_info"), self.cipher)

    def rotate(self, new_cipher: TemplateCipher, *, batch_size: int = 1000, progress: bool = False) -> int:
        """Re-encrypt every template under ``new_cipher``'s primary key; returns the number of rows rewritten.

        As :meth:`SQLiteFaissStore.rotate <advface.store.sqlite_faiss.SQLiteFaissStore.rotate>`: the store's
        keyring stays readable until the end and new writes use the new key at once; each batch of ``batch_size``
        rows (locked ``FOR UPDATE``) is one transaction, so a crash (even kill -9) loses at most the batch under way
        and running ``rotate`` again (keyring with old and new key) resumes: rows already under the new key are
        skipped. Also encrypts the plaintext rows of a store opened with ``migrate_plaintext=True``. Rows written
        under an old key meanwhile by another replica are picked up by further passes; the rotation is recorded
        as finished (``meta``: ``key_ids`` = the new key only) only when no row is left under another key. Vectors
        do not change, so other replicas' indexes stay valid (no generation is bumped); they need both keys until
        the end. IntegrityError (naming the row) if a row fails authentication; that batch is rolled back.
        """
        self._check_open()
        batch_size, current = rotation.check_rotation(new_cipher, batch_size, self.cipher, self._where())
        from tqdm.auto import tqdm

        ring = new_cipher.with_previous(current)
        tt, s = self._t["templates"], self._t["subjects"]
        where = self._where()

        def start(conn: psycopg.Connection) -> None:
            meta = self._meta(conn, lock=True)
            self._set_meta(conn, {"key_ids": rotation.merged_key_ids(meta, ring.key_id), "rotation": ring.key_id})

        with self._write_mutex:
            self._run(start, what="rotate")
            self.cipher = ring
        target = bytes([BLOB_VERSION]) + bytes.fromhex(ring.key_id)
        pending = "(t.ciphertext IS NULL OR length(t.ciphertext) <> %s OR substring(t.ciphertext from 1 for 9) <> %s)"
        pending_args = (4 * self.dim + ENCRYPTED_OVERHEAD, target)
        count_sql = f"SELECT COUNT(*) FROM {tt} t WHERE {pending}"
        total = int(self._run(lambda conn: conn.execute(count_sql, pending_args).fetchone()[0], what="rotate"))

        def batch(conn: psycopg.Connection, last: int) -> list[int]:
            self._meta(conn, lock=True)  # one maintenance job at a time
            with conn.cursor(binary=True) as cur:
                cur.execute(
                    f"SELECT t.id, t.tenant, s.subject_id, t.template_id, t.vector, t.ciphertext FROM {tt} t "
                    f"JOIN {s} s ON s.id = t.subject WHERE t.id > %s AND {pending} ORDER BY t.id LIMIT %s "
                    "FOR UPDATE OF t",
                    (last, *pending_args, batch_size),
                )
                rows = cur.fetchall()
                updates = []
                for rowid, tenant, subject_id, template_id, vector, blob in rows:
                    aad = template_aad(tenant, template_id, subject_id)
                    row = rotation.row_label(tenant, subject_id, template_id)
                    if vector is not None:
                        if not self._plaintext_rows:
                            raise IntegrityError(f"template store {where}: {row} is stored in plaintext")
                        updates.append((ring.encrypt(vector.astype("<f4").tobytes(), aad), rowid))
                    else:
                        updates.append((rotation.reencrypt(ring, blob, aad, row, where), rowid))
                if updates:
                    cur.executemany(f"UPDATE {tt} SET vector = NULL, ciphertext = %b WHERE id = %s", updates)
            return [r[0] for r in rows]

        def finish(conn: psycopg.Connection) -> int:
            self._meta(conn, lock=True)
            left = int(conn.execute(count_sql, pending_args).fetchone()[0])
            if not left:
                self._set_meta(conn, {"key_ids": json.dumps([ring.key_id]), "rotation": None, "plaintext_rows": None})
            return left

        done = 0
        with tqdm(total=total, desc="re-encrypting templates", unit="tpl", disable=not progress) as bar:
            for _ in range(_ROTATION_PASSES):
                last = 0
                while ids := self._run(lambda conn: batch(conn, last), what="rotate"):
                    last = ids[-1]
                    done += len(ids)
                    bar.update(len(ids))
                left = self._run(finish, what="rotate")
                if not left:
                    break
                bar.total = (bar.total or 0) + left
            else:
                raise ConfigError(
                    f"template store {where}: {left} template(s) keep being written under another key during the "
                    "rotation; configure every replica with the new key (and the old one as previous) and run again"
                )
        self._plaintext_rows = False
        self.cipher = new_cipher
        log.info("template store %s: %d templates re-encrypted under key %s", where, done, ring.key_id)
        return done

    def _reissue_start(self, job: str) -> int:
        self._check_open()
        tt, where = self._t["templates"], self._where()

        def start(conn: psycopg.Connection) -> int:
            resumed = rotation.resume_point(self._meta(conn, lock=True).get("transform_job"), job, where)
            if resumed is None:
                self._set_meta(conn, {"transform_job": rotation.job_state(job, 0)})
            return int(conn.execute(f"SELECT COUNT(*) FROM {tt} WHERE id > %s", (resumed or 0,)).fetchone()[0])

        return int(self._run(start, what="transform_vectors"))

    def _reissue_batch(self, fn: Callable[[str, np.ndarray], np.ndarray], job: str, batch_size: int) -> int:
        """Also locks the rows' tenants (as writers do) and bumps their generations, so other replicas rebuild their
        in-memory indexes (encrypted mode) and plaintext-mode searches see each batch atomically. Other replicas
        must not enrol while a re-issue runs (their writes would use the old transform)."""
        tt, s = self._t["templates"], self._t["subjects"]
        where = self._where()

        def batch(conn: psycopg.Connection) -> int:
            last = rotation.resume_point(self._meta(conn, lock=True).get("transform_job"), job, where)
            if last is None:
                raise ConfigError(f"template store {where}: re-issue job {job!r} was finished by another process")
            head = conn.execute(
                f"SELECT id, tenant FROM {tt} WHERE id > %s ORDER BY id LIMIT %s", (last, batch_size)
            ).fetchall()
            if not head:
                return 0
            hi = int(head[-1][0])
            locked: set[str] = set()

            def lock(tenants: set[str]) -> None:
                for tenant in sorted(tenants - locked):  # tenant rows first, as every writer does
                    with contextlib.suppress(NotFoundError):  # deleted meanwhile: its rows are gone too
                        self._lock_tenant(conn, tenant, create=False)
                    locked.add(tenant)

            lock({r[1] for r in head})
            with conn.cursor(binary=True) as cur:
                cur.execute(
                    f"SELECT t.id, t.tenant, s.subject_id, t.template_id, t.vector, t.ciphertext FROM {tt} t "
                    f"JOIN {s} s ON s.id = t.subject WHERE t.id > %s AND t.id <= %s ORDER BY t.id FOR UPDATE OF t",
                    (last, hi),
                )
                rows = cur.fetchall()
                lock({r[1] for r in rows})
                updates = []
                for tenant, items in rotation.group_by_tenant(rows, lambda r: r[1]).items():
                    vectors = np.stack([self._decode(tenant, r[2], r[3], r[4], r[5]) for r in items])
                    out = rotation.apply_transform(fn, tenant, vectors)
                    for r, vec in zip(items, out):
                        updates.append((*self._vector_columns(tenant, r[2], r[3], vec), r[0]))
                if updates:
                    cur.executemany(f"UPDATE {tt} SET vector = %b, ciphertext = %b WHERE id = %s", updates)
            self._set_meta(conn, {"transform_job": rotation.job_state(job, hi)})
            return len(rows) or -1  # -1: an empty id range (rows deleted meanwhile), go on

        return int(self._run(batch, what="transform_vectors"))

    def _reissue_end(self) -> None:
        if self.cipher is not None:
            with self._write_mutex:
                self._rebuild_all()

    def transform_job(self) -> str | None:
        """The unfinished (or finished but not yet closed) :meth:`transform_vectors` job, if any."""
        return rotation.recorded_job(self._run(self._meta, what="transform_job").get("transform_job"))

    def finish_transform_job(self, job: str) -> None:
        """Forget ``job``'s progress record (after every row was rewritten and the caller recorded the result)."""

        def write(conn: psycopg.Connection) -> None:
            rotation.check_finish(self._meta(conn, lock=True).get("transform_job"), job, self._where())
            self._set_meta(conn, {"transform_job": None})

        self._run(write, what="finish_transform_job")

    def read_transform_marker(self) -> dict[str, Any] | None:
        """What the templates were issued under (keyed-transform marker, kept in ``meta``; None: never recorded)."""
        value = self._run(self._meta, what="read_transform_marker").get(TRANSFORM_MARKER_KEY)
        if value is None:
            return None
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"{self._where()}: unreadable keyed-transform marker ({exc})") from None

    def write_transform_marker(self, value: Mapping[str, Any] | None) -> None:
        """Record (None: remove) the keyed-transform marker in ``meta``, durably."""
        text = None if value is None else json.dumps(dict(value), sort_keys=True)
        self._run(lambda conn: self._set_meta(conn, {TRANSFORM_MARKER_KEY: text}), what="write_transform_marker")

    @staticmethod
    def read_meta(dsn: str, table_prefix: str = "advface", connect_timeout: float = 10.0) -> dict[str, str]:
        """The ``meta`` table of a store (format, dim, metric, encryption...) without opening it."""
        if not isinstance(table_prefix, str) or not _PREFIX_RE.fullmatch(table_prefix):
            raise ConfigError(f"invalid table_prefix {table_prefix!r}")
        table = f"{table_prefix}_meta"
        try:
            with psycopg.connect(dsn, connect_timeout=max(1, int(connect_timeout))) as conn:
                if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
                    raise ConfigError(f"{redact_dsn(dsn)} holds no advface template store (no table {table})")
                return dict(conn.execute(f"SELECT key, value FROM {table}").fetchall())
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {exc}") from None

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
