"""A template store on SQLite (the durable truth) with one in-memory faiss index per tenant (search).

Durability and deletion:

- SQLite runs in WAL mode with ``synchronous=FULL``: a write is on disk (fsync'ed) when its method returns;
- ``secure_delete=ON`` overwrites the bytes of deleted rows, and every deletion is followed by a
  ``wal_checkpoint(TRUNCATE)``, so a deleted template's vector is neither in the ``.sqlite`` file nor in its
  ``-wal`` file afterwards (it may linger in free disk blocks below the file system; use disk encryption);
- the database and its lock file are created with mode 0600; one process at a time may open a database (an
  exclusive ``flock`` on ``<path>.lock``), since every process holds its own index.

The ``meta`` table records the format, schema version, dimension and metric: opening a database with another
dimension or metric raises ConfigError. Templates are stored as little-endian float32 BLOBs; their SQLite row ids
(never reused: AUTOINCREMENT) are the faiss ids.

Indexes: ``IndexIDMap2`` over ``IndexFlatL2`` (euclidean) or over ``IndexFlatIP`` on L2-normalised copies of the
vectors (cosine); rebuilt from SQLite when the store opens. With ``IndexOptions(kind="ivf")``, tenants of at least
``min_rows`` templates are also indexed by an approximate ``IndexIVFFlat`` (trained on the tenant's templates,
retrained as it grows; deletions remove its entries too) that answers their searches; smaller tenants stay exact.
Writes commit to SQLite first, then update the index; a search sees a write once its method has returned. With
``use_gpu`` (``"auto"``: when faiss reports a GPU and a tenant holds at least :data:`GPU_MIN_ROWS` templates;
``True``: every tenant, when faiss reports a GPU; never required) searches run on a GPU copy of the flat index
(preferred over the IVF index), rebuilt lazily after deletions.

Encryption at rest (optional ``cipher``, a :class:`~advface.crypto.TemplateCipher`): every vector BLOB is then
AES-256-GCM ciphertext bound to its row (associated data: tenant, subject id, template id; see
:func:`advface.crypto.template_aad`), decrypted only in memory to build the index. The ``meta`` table records
``encryption`` (``aes-256-gcm``) and ``key_ids`` (JSON list of the ids of the keys rows may be under). Opening an
encrypted database without a cipher, with a keyring lacking a key some rows are under (wrong key, unfinished
rotation), or a plaintext database that holds templates with a cipher (without ``migrate_plaintext=True``) raises
ConfigError; a ciphertext that fails authentication makes the open fail with an IntegrityError naming every such
row (:meth:`SQLiteFaissStore.verify_integrity` lists them). :meth:`SQLiteFaissStore.rotate` re-encrypts every row
under a new key in batches of one transaction each: it resumes after a crash, and each row is always readable under
the old or the new key (blobs carry their key id). It also finishes a ``migrate_plaintext`` migration.

Thread safety: writers are serialised; searches run concurrently with each other (a readers-writer lock guards the
indexes, the SQLite connection has its own lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from advface.crypto import BLOB_VERSION, ENCRYPTED_OVERHEAD, ENCRYPTION_SCHEME, TemplateCipher, template_aad
from advface.errors import ConfigError, IntegrityError, NotFoundError
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

try:  # POSIX only; elsewhere the single-process check is skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT = "advface-template-store"
SCHEMA_VERSION = 1
#: With ``use_gpu="auto"``, tenants smaller than this are searched on the CPU (a GPU copy does not pay off).
GPU_MIN_ROWS = 20_000
#: Largest k of a faiss GPU search; larger candidate lists are searched on the CPU.
GPU_MAX_K = 2048
#: Search index kinds (:class:`IndexOptions`).
INDEX_KINDS = ("flat", "ivf")
#: Largest candidate list asked of an IVF index; longer ones are searched exactly.
IVF_MAX_K = 4096
_MAX_SEARCH_K = 10_000_000

_SCHEMA = """
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


class _RWLock:
    """Many readers or one writer; waiting writers go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # pragma: no cover - a broken CUDA setup means no GPU
        return 0


class _GpuBackend:
    """Copies flat indexes to GPU 0 (one ``StandardGpuResources`` per store)."""

    def __init__(self) -> None:  # pragma: no cover - needs faiss-gpu and a GPU
        self.resources = faiss.StandardGpuResources()

    def clone(self, flat: faiss.Index) -> faiss.Index:  # pragma: no cover - needs faiss-gpu and a GPU
        return faiss.index_cpu_to_gpu(self.resources, 0, flat)


@dataclass(frozen=True)
class IndexOptions:
    """How tenants are searched: ``kind`` ``"flat"`` (exact, brute force) or ``"ivf"`` (an approximate
    ``IndexIVFFlat`` for tenants of at least ``min_rows`` templates; smaller tenants stay exact).

    IVF: ``nlist`` inverted lists (0: about ``sqrt(n)``), ``nprobe`` lists visited per search; trained on (a sample
    of) the tenant's templates when it reaches ``min_rows`` and retrained whenever it has grown ``retrain_factor``
    times since; dropped again below ``min_rows / 2``. It holds a second copy of the vectors (the exact index stays:
    it is what the IVF is trained from and what answers when the IVF finds too few candidates).
    """

    kind: str = "flat"
    min_rows: int = 100_000
    nlist: int = 0
    nprobe: int = 128
    retrain_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.kind!r}")
        for name, lo in (("min_rows", 1), ("nlist", 0), ("nprobe", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ConfigError(f"index option {name} must be an integer >= {lo}, got {value!r}")
        if not self.retrain_factor > 1:
            raise ConfigError(f"index option retrain_factor must be > 1, got {self.retrain_factor!r}")

    def nlist_for(self, n: int) -> int:
        """Inverted lists for a tenant of ``n`` templates (at least 39 training points per list)."""
        wanted = self.nlist or int(round(math.sqrt(n)))
        return max(1, min(wanted, n // 39, 65536))


class _TenantIndex:
    """One tenant's faiss index, the labels of its ids, an optional approximate (IVF) index and an optional GPU
    copy for search."""

    def __init__(self, dim: int, metric: StoreMetric, options: IndexOptions | None = None) -> None:
        self.dim, self.metric = dim, metric
        self.flat = faiss.IndexFlatL2(dim) if metric == "euclidean" else faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIDMap2(self.flat)
        self.labels: dict[int, tuple[str, str]] = {}  # row id -> (subject id, template id)
        self.gpu: faiss.Index | None = None  # copy of self.flat: positions, not row ids
        self.gpu_ids: np.ndarray | None = None  # position -> row id, valid with self.gpu
        self.options = options or IndexOptions()
        self.ivf: faiss.Index | None = None  # approximate index over the same row ids (IndexOptions.kind "ivf")
        self.ivf_trained_rows = 0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        """``"ivf"`` when searches use the approximate index, else ``"flat"``."""
        return "ivf" if self.ivf is not None else "flat"

    def add(self, rowids: np.ndarray, vectors: np.ndarray, labels: Sequence[tuple[str, str]], *,
            update_approx: bool = True) -> None:
        self.index.add_with_ids(vectors, rowids)
        self.labels.update(zip(rowids.tolist(), labels))
        if self.ivf is not None:
            self.ivf.add_with_ids(vectors, rowids)
        if update_approx:
            self.update_approx()
        if self.gpu is not None:
            try:
                self.gpu.add(vectors)
                self.gpu_ids = np.concatenate([self.gpu_ids, rowids])
            except Exception:  # pragma: no cover - the copy is rebuilt on the next search
                self.drop_gpu()
                raise

    def remove(self, rowids: np.ndarray) -> None:
        self.drop_gpu()
        if len(rowids):
            ids = np.ascontiguousarray(rowids, dtype=np.int64)
            self.index.remove_ids(ids)
            if self.ivf is not None:
                self.ivf.remove_ids(ids)
        for rowid in rowids.tolist():
            self.labels.pop(rowid, None)
        self.update_approx()

    def update_approx(self) -> None:
        """Build, retrain or drop the IVF index as the tenant's size asks (see :class:`IndexOptions`)."""
        opts = self.options
        n = self.ntotal
        if opts.kind != "ivf" or n < opts.min_rows // 2:
            self.ivf, self.ivf_trained_rows = None, 0
            return
        if n < opts.min_rows and self.ivf is None:
            return
        if self.ivf is not None and n < opts.retrain_factor * self.ivf_trained_rows:
            return
        vectors = self.flat.reconstruct_n(0, n)
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        nlist = opts.nlist_for(n)
        sample = vectors
        if n > 64 * nlist:  # faiss k-means uses at most 256 points per centroid; 64 are plenty
            sample = vectors[np.sort(np.random.default_rng(0).choice(n, 64 * nlist, replace=False))]
        if self.metric == "euclidean":
            quantizer, metric = faiss.IndexFlatL2(self.dim), faiss.METRIC_L2
        else:
            quantizer, metric = faiss.IndexFlatIP(self.dim), faiss.METRIC_INNER_PRODUCT
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, metric)
        ivf.train(np.ascontiguousarray(sample))
        ivf.add_with_ids(vectors, ids)
        ivf.nprobe = min(opts.nprobe, nlist)
        self.ivf, self.ivf_trained_rows = ivf, n
        self._quantizer = quantizer  # the IVF index uses it: keep it alive as long as the index

    def drop_gpu(self) -> None:
        self.gpu = None
        self.gpu_ids = None


class SQLiteFaissStore(rotation.TemplateReissue, TemplateStore):
    """Templates in the SQLite database ``path`` (created if missing), searched with faiss; see the module docs.

    ``dim`` and ``metric`` must match those the database was made with. ``use_gpu``: ``"auto"`` (default),
    ``True`` or ``False``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        dim: int,
        metric: StoreMetric,
        *,
        use_gpu: bool | str = "auto",
        index: IndexOptions | None = None,
        cipher: TemplateCipher | None = None,
        migrate_plaintext: bool = False,
    ) -> None:
        self.dim, self.metric = check_dim_metric(dim, metric)
        if cipher is not None and not isinstance(cipher, TemplateCipher):
            raise ConfigError(f"cipher must be a TemplateCipher, got {type(cipher).__name__}")
        self._cipher = cipher
        self._migrate_plaintext = bool(migrate_plaintext)
        self._plaintext_rows = False  # an encryption migration is under way: rows of 4*dim bytes are plaintext
        if use_gpu not in ("auto", True, False):
            raise ConfigError(f"use_gpu must be 'auto', true or false, got {use_gpu!r}")
        self.path = Path(path).expanduser()
        self._use_gpu = use_gpu
        self.index_options = index if index is not None else IndexOptions()
        if not isinstance(self.index_options, IndexOptions):
            raise ConfigError(f"index must be an IndexOptions, got {type(index).__name__}")
        self._write_mutex = threading.Lock()  # one writer at a time, SQL and index together
        self._db_lock = threading.Lock()  # the SQLite connection
        self._index_lock = _RWLock()  # self._tenants
        self._gpu_lock = threading.Lock()  # GPU indexes and resources are not thread-safe
        self._tenants: dict[str, _TenantIndex] = {}
        self._closed = False
        self._gpu: _GpuBackend | None = None
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        try:
            self._lock_fd = self._acquire_process_lock()
            self._conn = self._open_database()
            self._check_meta()
            self._check_encryption()
            if use_gpu is not False and _gpu_count() > 0:
                self._gpu = _GpuBackend()
            elif use_gpu is True:
                log.warning("use_gpu=true but faiss sees no GPU: searching on the CPU")
            started = time.perf_counter()
            try:
                self._rebuild()
            except IntegrityError:
                raise self._integrity_report() from None
            log.debug(
                "opened %s: %d templates, %d tenants, index built in %.3f s",
                self.path,
                sum(t.ntotal for t in self._tenants.values()),
                len(self._tenants),
                time.perf_counter() - started,
            )
        except BaseException:
            self._release()
            raise

    # ----------------------------------------------------------------------------------------------- opening

    def _acquire_process_lock(self) -> int | None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if fcntl is None:  # pragma: no cover
            return None
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"template store {self.path} is already open (in this or another process)") from None
        return fd

    def _open_database(self) -> sqlite3.Connection:
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
        conn = self._conn
        assert conn is not None
        try:
            with self._transaction():
                names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                names.discard("sqlite_sequence")
                if not names:
                    for statement in _SCHEMA.split(";"):
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

    def _rebuild(self) -> None:
        """Build every tenant's index from SQLite."""
        conn = self._conn
        assert conn is not None
        tenants: dict[str, _TenantIndex] = {}
        with self._db_lock:
            cursor = conn.execute(
                "SELECT s.tenant, t.id, s.subject_id, t.template_id, t.vector "
                "FROM templates t JOIN subjects s ON s.id = t.subject ORDER BY s.tenant, t.id"
            )
            while rows := cursor.fetchmany(16384):
                start = 0
                while start < len(rows):  # one run of a single tenant at a time
                    tenant = rows[start][0]
                    end = start
                    while end < len(rows) and rows[end][0] == tenant:
                        end += 1
                    run = rows[start:end]
                    ti = tenants.get(tenant) or tenants.setdefault(tenant, self._new_tenant_index())
                    vectors = self._blobs_to_array([r[4] for r in run], tenant, [(r[2], r[3]) for r in run])
                    rowids = np.fromiter((r[1] for r in run), dtype=np.int64, count=len(run))
                    ti.add(rowids, self._index_vectors(vectors), [(r[2], r[3]) for r in run], update_approx=False)
                    start = end
        for ti in tenants.values():
            ti.update_approx()
        self._tenants = tenants

    def _rebuild_tenant(self, tenant: str) -> None:
        """Rebuild one tenant's index from SQLite (after a failed index update)."""
        conn = self._conn
        assert conn is not None
        with self._db_lock:
            rows = conn.execute(
                "SELECT t.id, s.subject_id, t.template_id, t.vector FROM templates t "
                "JOIN subjects s ON s.id = t.subject WHERE s.tenant = ? ORDER BY t.id",
                (tenant,),
            ).fetchall()
        ti = self._new_tenant_index()
        if rows:
            vectors = self._blobs_to_array([r[3] for r in rows], tenant, [(r[1], r[2]) for r in rows])
            ti.add(np.array([r[0] for r in rows], np.int64), self._index_vectors(vectors), [(r[1], r[2]) for r in rows])
            self._tenants[tenant] = ti
        else:
            self._tenants.pop(tenant, None)

    # ----------------------------------------------------------------------------------------------- helpers

    def _blobs_to_array(
        self, blobs: Sequence[bytes], tenant: str = "", labels: Sequence[tuple[str, str]] = ()
    ) -> np.ndarray:
        """Stored BLOBs -> ``N x dim`` float32 (decrypted first when the store is encrypted; ``labels``: the
        (subject id, template id) of each BLOB, needed then)."""
        if self._cipher is not None:
            blobs = self._decrypt_blobs(blobs, tenant, labels)
        size = 4 * self.dim
        for blob in blobs:
            if len(blob) != size:
                raise ConfigError(f"template store {self.path} is corrupt: a {len(blob)}-byte vector, expected {size}")
        joined = b"".join(blobs)
        return np.frombuffer(joined, dtype="<f4").astype(np.float32).reshape(len(blobs), self.dim)

    def _new_tenant_index(self) -> _TenantIndex:
        return _TenantIndex(self.dim, self.metric, self.index_options)

    def _index_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """What the index holds for ``vectors``: themselves, or their L2-normalised copies for cosine."""
        if self.metric == "cosine":
            v64 = vectors.astype(np.float64)
            vectors = v64 / np.linalg.norm(v64, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _check_open(self) -> sqlite3.Connection:
        if self._closed or self._conn is None:
            raise ConfigError(f"template store {self.path} is closed")
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

    def _update_index(
        self,
        tenant: str,
        removed: Sequence[int],
        added: Sequence[tuple[int, str, str]],
        added_vectors: np.ndarray | None,
    ) -> None:
        """Apply a committed write to the tenant's index; on failure rebuild it from SQLite."""
        with self._index_lock.write():
            try:
                ti = self._tenants.get(tenant)
                if removed and ti is not None:
                    ti.remove(np.asarray(removed, np.int64))
                if added:
                    if ti is None:
                        ti = self._tenants[tenant] = self._new_tenant_index()
                    rowids = np.array([a[0] for a in added], np.int64)
                    assert added_vectors is not None
                    ti.add(rowids, self._index_vectors(added_vectors), [(a[1], a[2]) for a in added])
                if ti is not None and ti.ntotal == 0:
                    del self._tenants[tenant]
            except Exception:
                log.exception("index update of tenant %r failed; rebuilding it from %s", tenant, self.path)
                self._rebuild_tenant(tenant)

    def _subject_row(self, conn: sqlite3.Connection, tenant: str, subject_id: str) -> tuple[int, str, float]:
        row = conn.execute(
            "SELECT id, metadata, created_at FROM subjects WHERE tenant = ? AND subject_id = ?", (tenant, subject_id)
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
        checked = check_add_many(tenant, items, self.dim, replace)
        if not checked:
            self._check_open()
            return []
        result: list[list[str]] = []
        added: list[tuple[int, str, str]] = []
        removed: list[int] = []
        now = time.time()
        with self._write_mutex:
            with self._transaction() as conn:
                for subject_id, vectors, metadata in checked:
                    row = conn.execute(
                        "SELECT id, metadata FROM subjects WHERE tenant = ? AND subject_id = ?", (tenant, subject_id)
                    ).fetchone()
                    if row is None:
                        pk = conn.execute(
                            "INSERT INTO subjects (tenant, subject_id, metadata, created_at) VALUES (?, ?, ?, ?)",
                            (tenant, subject_id, json.dumps(metadata or {}, sort_keys=True), now),
                        ).lastrowid
                    else:
                        pk = row[0]
                        if replace:
                            old = [r[0] for r in conn.execute("SELECT id FROM templates WHERE subject = ?", (pk,))]
                            conn.execute("DELETE FROM templates WHERE subject = ?", (pk,))
                            removed.extend(old)
                            merged = dict(metadata or {})
                        else:
                            merged = {**json.loads(row[1]), **(metadata or {})}
                        merged = check_metadata(merged, f"metadata of subject {subject_id!r} after merging")
                        conn.execute(
                            "UPDATE subjects SET metadata = ? WHERE id = ?", (json.dumps(merged, sort_keys=True), pk)
                        )
                    ids: list[str] = []
                    for vector in vectors:
                        template_id = uuid.uuid4().hex
                        rowid = conn.execute(
                            "INSERT INTO templates (template_id, subject, vector, created_at) VALUES (?, ?, ?, ?)",
                            (template_id, pk, self._encode_vector(vector, tenant, subject_id, template_id), now),
                        ).lastrowid
                        ids.append(template_id)
                        added.append((int(rowid), subject_id, template_id))
                    result.append(ids)
            vectors_all = np.concatenate([c[1] for c in checked])
            self._update_index(tenant, removed, added, vectors_all)
            if removed:
                self._checkpoint()
        return result

    def delete_subject(self, tenant: str, subject_id: str) -> int:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        with self._write_mutex:
            with self._transaction() as conn:
                pk = self._subject_row(conn, tenant, subject_id)[0]
                rowids = [r[0] for r in conn.execute("SELECT id FROM templates WHERE subject = ?", (pk,))]
                conn.execute("DELETE FROM templates WHERE subject = ?", (pk,))
                conn.execute("DELETE FROM subjects WHERE id = ?", (pk,))
            self._update_index(tenant, rowids, [], None)
            self._checkpoint()
        return len(rowids)

    def delete_template(self, tenant: str, template_id: str) -> str:
        check_id(tenant, "tenant")
        check_id(template_id, "template_id")
        with self._write_mutex:
            with self._transaction() as conn:
                row = conn.execute(
                    "SELECT t.id, t.subject, s.subject_id FROM templates t JOIN subjects s ON s.id = t.subject "
                    "WHERE t.template_id = ? AND s.tenant = ?",
                    (template_id, tenant),
                ).fetchone()
                if row is None:
                    raise NotFoundError(f"template {template_id!r} not found in tenant {tenant!r}")
                rowid, pk, subject_id = row
                conn.execute("DELETE FROM templates WHERE id = ?", (rowid,))
                if conn.execute("SELECT COUNT(*) FROM templates WHERE subject = ?", (pk,)).fetchone()[0] == 0:
                    conn.execute("DELETE FROM subjects WHERE id = ?", (pk,))
            self._update_index(tenant, [rowid], [], None)
            self._checkpoint()
        return subject_id

    # ----------------------------------------------------------------------------------------------- reads

    def get_subject(self, tenant: str, subject_id: str) -> SubjectInfo:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        conn = self._check_open()
        with self._db_lock:
            pk, metadata, created_at = self._subject_row(conn, tenant, subject_id)
            ids = [r[0] for r in conn.execute("SELECT template_id FROM templates WHERE subject = ? ORDER BY id", (pk,))]
        return SubjectInfo(subject_id, json.loads(metadata), ids, float(created_at))

    def list_subjects(self, tenant: str, page_size: int = 100, page_token: str = "") -> tuple[list[SubjectInfo], str]:
        check_id(tenant, "tenant")
        page_size = check_positive_int(page_size, "page_size", MAX_PAGE_SIZE)
        after = decode_page_token(page_token)
        conn = self._check_open()
        with self._db_lock:
            rows = conn.execute(
                "SELECT id, subject_id, metadata, created_at FROM subjects "
                "WHERE tenant = ? AND subject_id > ? ORDER BY subject_id LIMIT ?",
                (tenant, after, page_size + 1),
            ).fetchall()
            more = len(rows) > page_size
            rows = rows[:page_size]
            templates: dict[int, list[str]] = {r[0]: [] for r in rows}
            if rows:
                marks = ",".join("?" * len(rows))
                for pk, template_id in conn.execute(
                    f"SELECT subject, template_id FROM templates WHERE subject IN ({marks}) ORDER BY id",
                    [r[0] for r in rows],
                ):
                    templates[pk].append(template_id)
        page = [SubjectInfo(r[1], json.loads(r[2]), templates[r[0]], float(r[3])) for r in rows]
        return page, (encode_page_token(rows[-1][1]) if more else "")

    def subject_vectors(self, tenant: str, subject_id: str) -> np.ndarray:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        conn = self._check_open()
        with self._db_lock:
            pk = self._subject_row(conn, tenant, subject_id)[0]
            rows = conn.execute(
                "SELECT vector, template_id FROM templates WHERE subject = ? ORDER BY id", (pk,)
            ).fetchall()
        return self._blobs_to_array([r[0] for r in rows], tenant, [(subject_id, r[1]) for r in rows])

    def search(self, tenant: str, probe: np.ndarray, k: int) -> list[Match]:
        check_id(tenant, "tenant")
        k = check_positive_int(k, "k", _MAX_SEARCH_K)
        query = self._index_vectors(check_probe(probe, self.dim))
        self._check_open()
        with self._index_lock.read():
            ti = self._tenants.get(tenant)
            if ti is None or ti.ntotal == 0:
                return []
            n = ti.ntotal
            kk = min(n, max(2 * k, k + 16))
            while True:
                distances, ids = self._knn(ti, query, kk)
                out: list[Match] = []
                seen: set[str] = set()
                for d, rowid in zip(distances.tolist(), ids.tolist()):
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

    def _knn(self, ti: _TenantIndex, query: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``kk`` nearest templates: (faiss distances, row ids), best first."""
        gpu = self._gpu
        if gpu is not None and kk <= GPU_MAX_K and (self._use_gpu is True or ti.ntotal >= GPU_MIN_ROWS):
            with self._gpu_lock:
                if ti.gpu is None:
                    ti.gpu = gpu.clone(ti.flat)
                    ti.gpu_ids = faiss.vector_to_array(ti.index.id_map).astype(np.int64)
                distances, positions = ti.gpu.search(query, kk)
                assert ti.gpu_ids is not None
                ids = np.where(positions >= 0, ti.gpu_ids[np.maximum(positions, 0)], -1)
            return distances[0], ids[0]
        if ti.ivf is not None and kk <= IVF_MAX_K:
            distances, ids = ti.ivf.search(query, kk)
            if (ids[0] >= 0).all():  # else the probed lists held fewer than kk templates: search exactly
                return distances[0], ids[0]
        distances, ids = ti.index.search(query, kk)
        return distances[0], ids[0]

    def count(self, tenant: str | None = None, *, subjects: bool = False) -> int:
        if tenant is not None:
            check_id(tenant, "tenant")
        conn = self._check_open()
        if subjects:
            sql, args = "SELECT COUNT(*) FROM subjects", ()
            if tenant is not None:
                sql, args = sql + " WHERE tenant = ?", (tenant,)
        else:
            sql, args = "SELECT COUNT(*) FROM templates", ()
            if tenant is not None:
                sql = "SELECT COUNT(*) FROM templates t JOIN subjects s ON s.id = t.subject WHERE s.tenant = ?"
                args = (tenant,)
        with self._db_lock:
            return int(conn.execute(sql, args).fetchone()[0])

    def tenants(self) -> list[str]:
        conn = self._check_open()
        with self._db_lock:
            return [r[0] for r in conn.execute("SELECT DISTINCT tenant FROM subjects ORDER BY tenant")]

    def index_kind(self, tenant: str) -> str:
        """``"ivf"`` when ``tenant`` is searched approximately, ``"flat"`` when exactly (or when it is empty)."""
        with self._index_lock.read():
            ti = self._tenants.get(tenant)
            return "flat" if ti is None else ti.kind

    def index_size(self, tenant: str | None = None) -> int:
        """Templates held by the in-memory index (of ``tenant``, or all); equals :meth:`count` (for tests)."""
        with self._index_lock.read():
            if tenant is not None:
                ti = self._tenants.get(tenant)
                return 0 if ti is None else ti.ntotal
            return sum(t.ntotal for t in self._tenants.values())

    # ----------------------------------------------------------------------------------------------- encryption

    def _encode_vector(self, vector: np.ndarray, tenant: str, subject_id: str, template_id: str) -> bytes:
        """The BLOB stored for ``vector``: little-endian float32, encrypted when the store has a cipher."""
        raw = np.asarray(vector).astype("<f4").tobytes()
        if self._cipher is None:
            return raw
        return self._cipher.encrypt(raw, template_aad(tenant, template_id, subject_id))

    def _decrypt_blobs(self, blobs: Sequence[bytes], tenant: str, labels: Sequence[tuple[str, str]]) -> list[bytes]:
        cipher = self._cipher
        assert cipher is not None and len(labels) == len(blobs), "encrypted BLOBs need their labels"
        plain_size = 4 * self.dim
        out: list[bytes] = []
        bad: list[str] = []
        for blob, (subject_id, template_id) in zip(blobs, labels):
            if self._plaintext_rows and len(blob) == plain_size:  # not yet migrated
                out.append(blob)
                continue
            try:
                out.append(cipher.decrypt(blob, template_aad(tenant, template_id, subject_id)))
            except IntegrityError as exc:
                bad.append(f"{rotation.row_label(tenant, subject_id, template_id)}: {exc}")
        if bad:
            raise IntegrityError(f"template store {self.path}: {len(bad)} template(s) failed authentication: "
                                 + "; ".join(bad[:10]))
        return out

    def _meta(self, conn: sqlite3.Connection) -> dict[str, str]:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    def _set_meta(self, conn: sqlite3.Connection, values: Mapping[str, str | None]) -> None:
        for key, value in values.items():
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _row_key_ids(self, conn: sqlite3.Connection) -> set[str]:
        """Ids of the keys the encrypted rows are under (a full scan)."""
        rows = conn.execute(
            "SELECT DISTINCT hex(substr(vector, 2, 8)) FROM templates WHERE length(vector) = ?",
            (4 * self.dim + ENCRYPTED_OVERHEAD,),
        )
        return {r[0].lower() for r in rows}

    def _check_encryption(self) -> None:
        """Match the database's encryption state (``meta``) with the cipher given; ConfigError on a mismatch."""
        conn = self._check_open()
        cipher = self._cipher
        with self._transaction():
            meta = self._meta(conn)
            state = meta.get("encryption", "none")
            has_rows = conn.execute("SELECT EXISTS (SELECT 1 FROM templates)").fetchone()[0] == 1
            if state == "none":
                if cipher is None:
                    return
                if has_rows and not self._migrate_plaintext:
                    raise ConfigError(
                        f"template store {self.path} holds unencrypted templates but an encryption key is configured; "
                        "encrypt it first with `advface rotate-key --new-key-file KEY` (or open it without a key)"
                    )
                self._set_meta(conn, {
                    "encryption": ENCRYPTION_SCHEME,
                    "key_ids": json.dumps([cipher.key_id]),
                    "plaintext_rows": "1" if has_rows else None,
                })
                self._plaintext_rows = has_rows
                if has_rows:
                    log.warning("template store %s: encrypting its existing templates (migration started)", self.path)
                return
            if state != ENCRYPTION_SCHEME:
                raise ConfigError(f"template store {self.path} uses unknown encryption {state!r}")
            key_ids = [str(k) for k in json.loads(meta.get("key_ids", "[]"))]
            if cipher is None:
                raise ConfigError(
                    f"template store {self.path} is encrypted (key id(s) {', '.join(key_ids) or '?'}) but no "
                    "encryption key is configured (section `encryption`)"
                )
            self._plaintext_rows = meta.get("plaintext_rows") == "1"
            if any(not cipher.has_key(k) for k in key_ids):
                used = self._row_key_ids(conn)
                rotation.check_keys_present(used, cipher.has_key, cipher.key_ids, meta, str(self.path))
                key_ids = [k for k in key_ids if k in used]
            recorded = rotation.key_ids_at_open(meta, key_ids, cipher.key_id, str(self.path))
            if recorded is not None:
                self._set_meta(conn, {"key_ids": recorded})

    def encryption_info(self) -> dict[str, object]:
        """The store's encryption state: ``encrypted``, ``key_ids`` (rows may be under), ``primary_key_id``,
        ``rotation`` (target key id of an unfinished rotation, or None), ``plaintext_rows`` (migration unfinished)."""
        conn = self._check_open()
        with self._db_lock:
            meta = self._meta(conn)
        return rotation.encryption_state(meta, self._cipher)

    def verify_integrity(self) -> list[tuple[str, str, str, str]]:
        """Decrypt every row; ``(tenant, subject id, template id, reason)`` of each one that fails (empty: all good,
        or the store is not encrypted)."""
        conn = self._check_open()
        cipher = self._cipher
        if cipher is None:
            return []
        bad: list[tuple[str, str, str, str]] = []
        with self._db_lock:
            cursor = conn.execute(
                "SELECT s.tenant, s.subject_id, t.template_id, t.vector FROM templates t "
                "JOIN subjects s ON s.id = t.subject ORDER BY t.id"
            )
            while rows := cursor.fetchmany(4096):
                for tenant, subject_id, template_id, blob in rows:
                    if self._plaintext_rows and len(blob) == 4 * self.dim:
                        continue
                    try:
                        cipher.decrypt(blob, template_aad(tenant, template_id, subject_id))
                    except IntegrityError as exc:
                        bad.append((tenant, subject_id, template_id, str(exc)))
        return bad

    def _integrity_report(self) -> IntegrityError:
        bad = self.verify_integrity()
        listed = "; ".join(rotation.row_label(t, s, i) for t, s, i, _ in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        return IntegrityError(
            f"template store {self.path}: {len(bad)} encrypted template(s) failed authentication (tampered, "
            f"truncated or moved between rows): {listed}{more}. The store was not opened; restore it from a backup "
            "or delete these templates"
        )

    def rotate(self, new_cipher: TemplateCipher, *, batch_size: int = 1000, progress: bool = False) -> int:
        """Re-encrypt every template under ``new_cipher``'s primary key; returns the number of rows rewritten.

        The store's keyring (old keys) is kept for reading until the end, and new writes use the new key at once.
        Each batch of ``batch_size`` rows is one transaction, so a crash loses at most the batch under way; running
        ``rotate`` again (with a keyring holding the old and the new key) resumes. Also encrypts the plaintext rows
        of a store opened with ``migrate_plaintext=True``. IntegrityError (naming the row) if a row fails
        authentication; the batch is then rolled back.
        """
        batch_size, current = rotation.check_rotation(new_cipher, batch_size, self._cipher, str(self.path))
        from tqdm.auto import tqdm

        with self._write_mutex:
            ring = new_cipher.with_previous(current)
            with self._transaction() as conn:
                key_ids = rotation.merged_key_ids(self._meta(conn), ring.key_id)
                self._set_meta(conn, {"key_ids": key_ids, "rotation": ring.key_id})
            self._cipher = ring
        target = bytes.fromhex("%02x" % BLOB_VERSION + ring.key_id)
        pending_sql = "NOT (length(t.vector) = ? AND substr(t.vector, 1, ?) = ?)"
        pending_args = (4 * self.dim + ENCRYPTED_OVERHEAD, len(target), target)
        with self._db_lock:
            total = self._check_open().execute(
                f"SELECT COUNT(*) FROM templates t WHERE {pending_sql}", pending_args
            ).fetchone()[0]
        done = 0
        last = 0
        with tqdm(total=total, desc="re-encrypting templates", unit="tpl", disable=not progress) as bar:
            while True:
                with self._write_mutex, self._transaction() as conn:
                    rows = conn.execute(
                        "SELECT t.id, s.tenant, s.subject_id, t.template_id, t.vector FROM templates t "
                        f"JOIN subjects s ON s.id = t.subject WHERE t.id > ? AND {pending_sql} ORDER BY t.id LIMIT ?",
                        (last, *pending_args, batch_size),
                    ).fetchall()
                    updates = []
                    for rowid, tenant, subject_id, template_id, blob in rows:
                        aad = template_aad(tenant, template_id, subject_id)
                        if self._plaintext_rows and len(blob) == 4 * self.dim:
                            updates.append((ring.encrypt(blob, aad), rowid))
                        else:
                            row = rotation.row_label(tenant, subject_id, template_id)
                            updates.append((rotation.reencrypt(ring, blob, aad, row, str(self.path)), rowid))
                    conn.executemany("UPDATE templates SET vector = ? WHERE id = ?", updates)
                if not rows:
                    break
                last = rows[-1][0]
                done += len(rows)
                bar.update(len(rows))
        with self._write_mutex:
            with self._transaction() as conn:
                self._set_meta(conn, {"key_ids": json.dumps([ring.key_id]), "rotation": None, "plaintext_rows": None})
            self._plaintext_rows = False
            self._cipher = new_cipher
            self._checkpoint()  # old ciphertexts / plaintexts leave the -wal file (secure_delete clears the pages)
        log.info("template store %s: %d templates re-encrypted under key %s", self.path, done, ring.key_id)
        return done

    def _reissue_start(self, job: str) -> int:
        with self._write_mutex, self._transaction() as conn:
            resumed = rotation.resume_point(self._meta(conn).get("transform_job"), job, str(self.path))
            if resumed is None:
                self._set_meta(conn, {"transform_job": rotation.job_state(job, 0)})
            return int(conn.execute("SELECT COUNT(*) FROM templates WHERE id > ?", (resumed or 0,)).fetchone()[0])

    def _reissue_batch(self, fn: Callable[[str, np.ndarray], np.ndarray], job: str, batch_size: int) -> int:
        with self._write_mutex, self._transaction() as conn:
            last = rotation.resume_point(self._meta(conn).get("transform_job"), job, str(self.path))
            if last is None:
                raise ConfigError(f"template store {self.path}: re-issue job {job!r} was finished meanwhile")
            rows = conn.execute(
                "SELECT t.id, s.tenant, s.subject_id, t.template_id, t.vector FROM templates t "
                "JOIN subjects s ON s.id = t.subject WHERE t.id > ? ORDER BY t.id LIMIT ?",
                (last, batch_size),
            ).fetchall()
            if not rows:
                return 0
            updates = []
            for tenant, items in rotation.group_by_tenant(rows, lambda r: r[1]).items():
                labels = [(i[2], i[3]) for i in items]
                vectors = self._blobs_to_array([i[4] for i in items], tenant, labels)
                out = rotation.apply_transform(fn, tenant, vectors)
                for (rowid, _, subject_id, template_id, _), vec in zip(items, out):
                    updates.append((self._encode_vector(vec, tenant, subject_id, template_id), rowid))
            conn.executemany("UPDATE templates SET vector = ? WHERE id = ?", updates)
            self._set_meta(conn, {"transform_job": rotation.job_state(job, rows[-1][0])})
        return len(rows)

    def _reissue_end(self) -> None:
        with self._write_mutex:
            self._rebuild()
            self._checkpoint()

    def transform_job(self) -> str | None:
        """The unfinished (or finished but not yet closed) :meth:`transform_vectors` job, if any."""
        with self._db_lock:
            state = self._meta(self._check_open()).get("transform_job")
        return rotation.recorded_job(state)

    def finish_transform_job(self, job: str) -> None:
        """Forget ``job``'s progress record (after every row was rewritten and the caller recorded the result)."""
        with self._write_mutex, self._transaction() as conn:
            rotation.check_finish(self._meta(conn).get("transform_job"), job, str(self.path))
            self._set_meta(conn, {"transform_job": None})

    @staticmethod
    def read_meta(path: str | os.PathLike[str]) -> dict[str, str]:
        """The ``meta`` table of a store's database file (format, dim, metric, encryption...) without opening it."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"template store {p} does not exist")
        try:
            conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                return dict(conn.execute("SELECT key, value FROM meta").fetchall())
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise ConfigError(f"{p} is not an advface template store: {exc}") from None

    # ----------------------------------------------------------------------------------------------- closing

    def close(self) -> None:
        with self._write_mutex:
            if self._closed:
                return
            self._closed = True
            with self._index_lock.write():
                self._release()

    def _release(self) -> None:
        self._tenants = {}
        self._gpu = None
        if self._conn is not None:
            with self._db_lock:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._closed = True

    def __del__(self) -> None:  # a forgotten store still releases its lock file
        with contextlib.suppress(Exception):
            if not getattr(self, "_closed", True):
                self._release()

    def __repr__(self) -> str:
        return f"SQLiteFaissStore({str(self.path)!r}, dim={self.dim}, metric={self.metric!r})"
