"""Search in a :class:`~advface.store.sqlite_faiss.SQLiteFaissStore`: one
:class:`~advface.store.faiss_index.TenantIndex` per tenant, built from SQLite when the store opens, kept in step with
every committed write, and searched for the best template of each subject
(:func:`~advface.store.faiss_index.nearest_subjects`)."""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence

import numpy as np

from advface.errors import IntegrityError
from advface.store.base import MAX_SEARCH_K, Match, check_id, check_positive_int, check_probe
from advface.store.faiss_index import (
    GpuSearch,
    IndexOptions,
    RWLock,
    TenantIndex,
    apply_write,
    nearest_subjects,
    templates_indexed,
)
from advface.store.sealing import SubjectNames
from advface.store.sqlite_faiss.database import SQLiteDatabase

log = logging.getLogger(__name__)


class SealedRowError(IntegrityError):
    """A sealed subject row failed authentication while the index was built (reported as it is)."""


class SQLiteSearch(SQLiteDatabase):
    """The faiss side of :class:`~advface.store.sqlite_faiss.SQLiteFaissStore` (a mixin over its database): the
    per-tenant indexes (``_tenants``, guarded by ``_index_lock``) and search. Uses the store's
    :meth:`_blobs_to_array` to read vectors."""

    index_options: IndexOptions
    _index_lock: RWLock  # self._tenants
    _tenants: dict[str, TenantIndex]
    _gpu: GpuSearch | None
    _names: SubjectNames  # how subject ids and metadata are kept (advface.store.sealing)

    @abc.abstractmethod
    def _blobs_to_array(
        self, blobs: Sequence[bytes], tenant: str = "", labels: Sequence[tuple[str, str]] = ()
    ) -> np.ndarray:
        """Stored BLOBs -> ``N x dim`` float32, decrypted first when the store is encrypted (the store's)."""

    def _new_tenant_index(self) -> TenantIndex:
        """An empty index for one tenant, with the store's index options."""
        return TenantIndex(self.dim, self.metric, self.index_options)

    def _rebuild(self) -> None:
        """Build every tenant's index from SQLite."""
        conn = self._conn
        assert conn is not None
        tenants: dict[str, TenantIndex] = {}
        with self._db_lock:
            cursor = conn.execute(
                "SELECT s.tenant, t.id, s.subject_id, t.template_id, t.vector, s.id, s.metadata "
                "FROM templates t JOIN subjects s ON s.id = t.subject ORDER BY s.tenant, t.id"
            )
            names: dict[int, str] = {}  # subject row -> subject id (sealed rows are opened once)
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
                    labels = [(self._subject_name(names, tenant, r[5], r[2], r[6]), r[3]) for r in run]
                    ti.add(rowids, vectors, labels, update_approx=False)
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
                "SELECT t.id, s.subject_id, t.template_id, t.vector, s.id, s.metadata FROM templates t "
                "JOIN subjects s ON s.id = t.subject WHERE s.tenant = ? ORDER BY t.id",
                (tenant,),
            ).fetchall()
        ti = self._new_tenant_index()
        if rows:
            vectors = self._blobs_to_array([r[3] for r in rows], tenant, [(r[1], r[2]) for r in rows])
            names: dict[int, str] = {}
            labels = [(self._subject_name(names, tenant, r[4], r[1], r[5]), r[2]) for r in rows]
            ti.add(np.array([r[0] for r in rows], np.int64), vectors, labels)
            self._tenants[tenant] = ti
        else:
            self._tenants.pop(tenant, None)

    def _subject_name(self, names: dict[int, str], tenant: str, pk: int, stored: str, metadata: str) -> str:
        """The subject id of subject row ``pk`` (memoised in ``names``; sealed rows are decrypted)."""
        if not self._names.sealed:
            return stored
        if pk not in names:
            try:
                names[pk] = self._names.unpack(tenant, stored, metadata)[0]
            except IntegrityError as exc:
                raise SealedRowError(
                    f"template store {self.path}: the sealed subject row {pk} of tenant {tenant!r} failed "
                    f"authentication ({exc}: tampered, or moved between rows). The store was not opened; restore it "
                    "from a backup"
                ) from None
        return names[pk]

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
                ti = apply_write(self._tenants, tenant, removed, added, added_vectors, self._new_tenant_index)
                if ti is not None and ti.ntotal == 0:
                    del self._tenants[tenant]
            except Exception:
                log.exception("index update of tenant %r failed; rebuilding it from %s", tenant, self.path)
                self._rebuild_tenant(tenant)

    def search(self, tenant: str, probe: np.ndarray, k: int) -> list[Match]:
        check_id(tenant, "tenant")
        k = check_positive_int(k, "k", MAX_SEARCH_K)
        query = check_probe(probe, self.dim)
        self._check_open()
        with self._index_lock.read():
            return nearest_subjects(self._tenants.get(tenant), query, k, self._gpu)

    def index_kind(self, tenant: str) -> str:
        """``"ivf"`` when ``tenant`` is searched approximately, ``"flat"`` when exactly (or when it is empty)."""
        with self._index_lock.read():
            ti = self._tenants.get(tenant)
            return "flat" if ti is None else ti.kind

    def index_size(self, tenant: str | None = None) -> int:
        """Templates held by the in-memory index (of ``tenant``, or all); equals :meth:`count` (for tests)."""
        with self._index_lock.read():
            return templates_indexed(self._tenants, tenant)
