"""Search in a :class:`~advface.store.postgres.PostgresStore`.

Plaintext mode: in SQL, an exact scan of the tenant's rows or (large tenants) the HNSW index, over-fetched and
reduced to each subject's best template. Encrypted mode: one in-memory :class:`~advface.store.faiss_index.TenantIndex`
per tenant, built from decrypted rows, applied every committed write of this process and rebuilt when the tenant's
generation shows another process's write; searched with :func:`~advface.store.faiss_index.nearest_subjects`.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import psycopg

from advface.errors import IntegrityError
from advface.store.base import MAX_SEARCH_K, Match, StoreMetric, check_id, check_positive_int, check_probe
from advface.store.faiss_index import RWLock, TenantIndex, apply_write, nearest_subjects, templates_indexed
from advface.store.postgres.connection import PgVector, PostgresConnection
from advface.store.sealing import SubjectNames

log = logging.getLogger(__name__)

#: Largest ``hnsw.ef_search`` (pgvector's limit).
MAX_EF_SEARCH = 1000


class PostgresSearch(PostgresConnection):
    """Search of a :class:`~advface.store.postgres.PostgresStore` (a mixin over its connections): SQL in plaintext
    mode, in-memory faiss indexes (``_tenants``, their ``_generations``, guarded by ``_index_lock``) in encrypted
    mode, built from the rows the store decodes (:meth:`_decode`)."""

    dim: int
    metric: StoreMetric
    cipher: Any
    exact_max: int
    ef_search: int
    _t: dict[str, str]
    _has_hnsw: bool
    _write_mutex: threading.Lock
    _index_lock: RWLock
    _tenants: dict[str, TenantIndex]
    _generations: dict[str, int]
    _names: SubjectNames  # how subject ids and metadata are kept (advface.store.sealing)
    _current_names: Callable[[psycopg.Connection], SubjectNames]  # the store's: _names, re-read when sealed meanwhile

    @abc.abstractmethod
    def _decode(
        self, tenant: str, subject_id: str, template_id: str, vector: np.ndarray | None, blob: bytes | None
    ) -> np.ndarray:
        """One template's float32 vector, from its ``vector`` or (decrypted) ``ciphertext`` column (the store's)."""

    def _new_tenant_index(self) -> TenantIndex:
        """An empty index for one tenant (exact: flat, on the CPU)."""
        return TenantIndex(self.dim, self.metric)

    def _distance_op(self) -> str:
        """pgvector's distance operator of the store's metric: cosine ``<=>`` or Euclidean ``<->``."""
        return "<=>" if self.metric == "cosine" else "<->"

    def search(self, tenant: str, probe: np.ndarray, k: int) -> list[Match]:
        check_id(tenant, "tenant")
        k = check_positive_int(k, "k", MAX_SEARCH_K)
        query = check_probe(probe, self.dim)
        self._check_open()
        if self.cipher is not None:
            return self._search_index(tenant, query, k)
        return self._run(lambda conn: self._search_sql(conn, tenant, query[0], k), what="search")

    def _score(self, distance: float) -> float:
        """The score of a pgvector distance: cosine similarity, or minus the Euclidean distance."""
        return 1.0 - float(distance) if self.metric == "cosine" else -float(distance)

    def _hnsw_settings(self, conn: psycopg.Connection, candidates: int) -> None:
        """Transaction settings of an HNSW search for ``candidates`` rows: ``hnsw.ef_search``, iterative scans in
        strict distance order (the tenant filter cannot starve the result), and no sorts: the tenant is known to
        be large, so the planner must take the index even when its statistics are stale."""
        conn.execute(
            "SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', 'strict_order', true),"
            " set_config('enable_sort', 'off', true)",
            (str(min(MAX_EF_SEARCH, max(self.ef_search, candidates))),),
        )

    def _hnsw_sql(self) -> str:
        """The HNSW candidate query; parameters: probe, tenant, probe, number of candidates."""
        op = self._distance_op()
        tt, s = self._t["templates"], self._t["subjects"]
        return (
            f"SELECT s.subject_id, c.template_id, c.d FROM ("
            f"SELECT id, subject, template_id, vector {op} %b AS d FROM {tt} WHERE tenant = %s "
            f"ORDER BY vector {op} %b LIMIT %s) c JOIN {s} s ON s.id = c.subject ORDER BY c.d, c.id"
        )

    def _exact_sql(self) -> str:
        """The exact candidate query (a top-N sort of the tenant's distances; ``OFFSET 0`` keeps the planner off
        the HNSW index); parameters: probe, tenant, number of candidates."""
        op = self._distance_op()
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
        q = PgVector(query)
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
        op = self._distance_op()
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
        """The tenant's write generation in the database (0: no such tenant)."""
        sql = f"SELECT generation FROM {self._t['tenants']} WHERE tenant = %s"
        row = self._run(lambda conn: conn.execute(sql, (tenant,)).fetchone(), what="search")
        return 0 if row is None else int(row[0])

    def _search_index(self, tenant: str, query: np.ndarray, k: int) -> list[Match]:
        """Encrypted mode: search the tenant's in-memory index, rebuilt first when another process changed it."""
        generation = self._tenant_generation(tenant)
        with self._index_lock.read():
            fresh = self._generations.get(tenant, 0) == generation
            if fresh:
                return nearest_subjects(self._tenants.get(tenant), query, k)
        with self._write_mutex:  # a write of this process finishes first; then rebuild if still stale
            if self._tenant_generation(tenant) != self._generations.get(tenant, 0):
                self._rebuild_tenants([tenant])
        with self._index_lock.read():
            return nearest_subjects(self._tenants.get(tenant), query, k)

    def _rebuild_all(self) -> None:
        """Rebuild every tenant's index (encrypted mode), dropping those of tenants gone meanwhile."""
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
            self._current_names(conn)  # the labels open sealed subject rows
            out: dict[str, tuple[int, list[tuple]]] = {}
            for tenant in tenants:
                row = conn.execute(f"SELECT generation FROM {tn} WHERE tenant = %s", (tenant,)).fetchone()
                with conn.cursor(binary=True) as cur:
                    cur.execute(
                        f"SELECT t.id, s.subject_id, t.template_id, t.vector, t.ciphertext, s.id, s.metadata "
                        f"FROM {tt} t JOIN {s} s ON s.id = t.subject WHERE t.tenant = %s ORDER BY t.id",
                        (tenant,),
                    )
                    out[tenant] = (0 if row is None else int(row[0]), cur.fetchall())
            return out

        snapshot = self._run(read, what="rebuilding the index")
        built: dict[str, tuple[TenantIndex | None, int]] = {}
        for tenant, (generation, rows) in snapshot.items():
            ti = None
            if rows:
                ti = self._new_tenant_index()
                vectors = np.stack([self._decode(tenant, r[1], r[2], r[3], r[4]) for r in rows])
                rowids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                ti.add(rowids, vectors, self._labels(tenant, rows))
            built[tenant] = (ti, generation)
        with self._index_lock.write():
            if replace_all:
                self._tenants, self._generations = {}, {}
            for tenant, (ti, generation) in built.items():
                self._store_index(tenant, ti, generation)

    def _labels(self, tenant: str, rows: Sequence[tuple]) -> list[tuple[str, str]]:
        """``(subject id, template id)`` of rows ``(id, stored id, template id, vector, ciphertext, subject row,
        metadata)``: sealed subject rows are opened, once per subject."""
        if not self._names.sealed:
            return [(r[1], r[2]) for r in rows]
        names: dict[int, str] = {}
        for r in rows:
            if r[5] not in names:
                try:
                    names[r[5]] = self._names.unpack(tenant, r[1], r[6])[0]
                except IntegrityError as exc:
                    raise IntegrityError(
                        f"the sealed subject row {r[5]} of tenant {tenant!r} failed authentication ({exc}: tampered, "
                        "or moved between rows); restore the store from a backup"
                    ) from None
        return [(names[r[5]], r[2]) for r in rows]

    def _store_index(self, tenant: str, ti: TenantIndex | None, generation: int) -> None:
        """Keep ``ti`` (None or empty: drop the tenant's index) as built at ``generation`` (0: forget it)."""
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
                    ti = apply_write(self._tenants, tenant, removed, added, added_vectors, self._new_tenant_index)
                    self._store_index(tenant, ti, new)
                    return
                except Exception:
                    log.exception("index update of tenant %r failed; rebuilding it", tenant)
        self._rebuild_tenants([tenant])  # another process wrote to the tenant in between (or the update failed)

    def index_size(self, tenant: str | None = None) -> int:
        """Templates held by the in-memory indexes (encrypted mode; 0 in plaintext mode, which searches in SQL)."""
        with self._index_lock.read():
            return templates_indexed(self._tenants, tenant)
