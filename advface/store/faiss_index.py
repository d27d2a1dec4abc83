"""In-memory faiss search indexes, one per tenant, shared by the template stores.

:class:`~advface.store.sqlite_faiss.SQLiteFaissStore` searches every tenant this way; the PostgreSQL store does in
its encrypted mode (:mod:`advface.store.postgres`), where SQL cannot see the vectors. Row ids of the stores' template
tables are the faiss ids.

- :class:`TenantIndex`: ``IndexIDMap2`` over ``IndexFlatL2`` (euclidean) or over ``IndexFlatIP`` on L2-normalised
  copies of the vectors (cosine), the (subject id, template id) label of each row id, optionally an approximate
  ``IndexIVFFlat`` (:class:`IndexOptions`) and a GPU copy of the flat index (:class:`GpuSearch`);
- :func:`nearest_subjects`: the kNN search of both stores: over-fetch templates, keep each subject's best one;
- :func:`apply_write`: a committed write (rows removed and added) applied to a tenant's index;
- :class:`RWLock`: the readers-writer lock that guards a store's indexes (searches share it, writers take it alone).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from advface._faiss import faiss
from advface.errors import ConfigError
from advface.store.base import Match, StoreMetric

log = logging.getLogger(__name__)

#: With ``use_gpu="auto"``, tenants smaller than this are searched on the CPU (a GPU copy does not pay off).
GPU_MIN_ROWS = 20_000
#: Largest k of a faiss GPU search; larger candidate lists are searched on the CPU.
GPU_MAX_K = 2048
#: Search index kinds (:class:`IndexOptions`).
INDEX_KINDS = ("flat", "ivf")
#: Largest candidate list asked of an IVF index; longer ones are searched exactly.
IVF_MAX_K = 4096


class RWLock:
    """Many readers or one writer; waiting writers go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared (with other readers) for the ``with`` block."""
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
        """Hold the lock alone for the ``with`` block."""
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


def index_vectors(vectors: np.ndarray, metric: StoreMetric) -> np.ndarray:
    """What a faiss index holds for ``vectors`` (and is searched with): themselves, or L2-normalised copies for
    cosine, as C-contiguous float32."""
    if metric == "cosine":
        v64 = vectors.astype(np.float64)
        vectors = v64 / np.linalg.norm(v64, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def score_of(distance: float, metric: StoreMetric) -> float:
    """A store's score (higher = more similar) of a faiss result: minus the Euclidean distance (faiss gives its
    square) or the cosine similarity (the inner product of normalised vectors)."""
    return -float(np.sqrt(max(distance, 0.0))) if metric == "euclidean" else float(distance)


# --------------------------------------------------------------------------------------------------- GPU


def gpu_count() -> int:
    """GPUs faiss can use (0 with a CPU-only faiss or a broken CUDA setup)."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # pragma: no cover - a broken CUDA setup means no GPU
        return 0


class GpuBackend:
    """Copies flat indexes to GPU 0 (one ``StandardGpuResources`` per store)."""

    def __init__(self) -> None:  # pragma: no cover - needs faiss-gpu and a GPU
        self.resources = faiss.StandardGpuResources()

    def clone(self, flat: faiss.Index) -> faiss.Index:  # pragma: no cover - needs faiss-gpu and a GPU
        """A GPU copy of ``flat``."""
        return faiss.index_cpu_to_gpu(self.resources, 0, flat)


class GpuSearch:
    """Searches tenants on GPU copies of their flat indexes, made lazily (and again after deletions drop them).

    ``every_tenant``: every tenant (``use_gpu=True``), else only tenants of at least :data:`GPU_MIN_ROWS` templates
    (``"auto"``). GPU indexes and resources are not thread-safe: searches on the GPU take turns.
    """

    def __init__(self, backend: GpuBackend, *, every_tenant: bool) -> None:
        self.backend = backend
        self.every_tenant = every_tenant
        self._lock = threading.Lock()

    @classmethod
    def open(cls, use_gpu: bool | str) -> GpuSearch | None:
        """The GPU search that ``use_gpu`` (``"auto"``, True or False) asks for, or None (no GPU, or not wanted)."""
        if use_gpu is not False and gpu_count() > 0:
            return cls(GpuBackend(), every_tenant=use_gpu is True)
        if use_gpu is True:
            log.warning("use_gpu=true but faiss sees no GPU: searching on the CPU")
        return None

    def serves(self, index: TenantIndex, kk: int) -> bool:
        """Whether a search of ``kk`` candidates in ``index`` runs on the GPU."""
        return kk <= GPU_MAX_K and (self.every_tenant or index.ntotal >= GPU_MIN_ROWS)

    def search(self, index: TenantIndex, query: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``kk`` nearest templates on the GPU copy of ``index`` (made first if missing): (distances, row ids)."""
        with self._lock:
            if index.gpu is None:
                index.gpu = self.backend.clone(index.flat)
                index.gpu_ids = faiss.vector_to_array(index.index.id_map).astype(np.int64)
            distances, positions = index.gpu.search(query, kk)
            assert index.gpu_ids is not None
            ids = np.where(positions >= 0, index.gpu_ids[np.maximum(positions, 0)], -1)
        return distances[0], ids[0]


# --------------------------------------------------------------------------------------------------- one tenant


class TenantIndex:
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
        """Templates held."""
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        """``"ivf"`` when searches use the approximate index, else ``"flat"``."""
        return "ivf" if self.ivf is not None else "flat"

    def add(
        self, rowids: np.ndarray, vectors: np.ndarray, labels: Sequence[tuple[str, str]], *, update_approx: bool = True
    ) -> None:
        """Add templates: their row ids, vectors (as stored: normalised here for cosine) and (subject id, template
        id) labels. ``update_approx=False`` leaves the IVF index to a later :meth:`update_approx` (bulk loads)."""
        vectors = index_vectors(vectors, self.metric)
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
        """Remove templates by row id (unknown ids are ignored); drops the GPU copy."""
        self.drop_gpu()
        if len(rowids):
            ids = np.ascontiguousarray(rowids, dtype=np.int64)
            # faiss's Python wrapper takes an id array (its stubs only list the IDSelector overload)
            self.index.remove_ids(ids)  # type: ignore[arg-type]
            if self.ivf is not None:
                self.ivf.remove_ids(ids)  # type: ignore[arg-type]
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
        quantizer: faiss.IndexFlat
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
        """Forget the GPU copy (the next GPU search makes a new one)."""
        self.gpu = None
        self.gpu_ids = None

    def search(self, query: np.ndarray, kk: int, gpu: GpuSearch | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``kk`` nearest templates of ``query`` (``1 x dim``, normalised for cosine): (faiss distances, row
        ids), best first; ids of -1 pad a short result. On the GPU when ``gpu`` serves this search, else on the
        IVF index when there is one and it finds ``kk`` templates, else exactly."""
        if gpu is not None and gpu.serves(self, kk):
            return gpu.search(self, query, kk)
        if self.ivf is not None and kk <= IVF_MAX_K:
            distances, ids = self.ivf.search(query, kk)
            if (ids[0] >= 0).all():  # else the probed lists held fewer than kk templates: search exactly
                return distances[0], ids[0]
        distances, ids = self.index.search(query, kk)
        return distances[0], ids[0]


# --------------------------------------------------------------------------------------------------- store helpers


def nearest_subjects(index: TenantIndex | None, probe: np.ndarray, k: int, gpu: GpuSearch | None = None) -> list[Match]:
    """The ``k`` subjects of ``index`` nearest to ``probe`` (``1 x dim``, as given to the store), best first, each
    with its best template; fewer when the tenant has fewer subjects (none for a missing or empty index).

    Candidates are over-fetched (``2k``, at least ``k + 16``) and reduced to each subject's best template; while
    one subject's templates crowd the list, four times as many are fetched, up to every template."""
    if index is None or index.ntotal == 0:
        return []
    query = index_vectors(probe, index.metric)
    n = index.ntotal
    kk = min(n, max(2 * k, k + 16))
    while True:
        distances, ids = index.search(query, kk, gpu)
        out: list[Match] = []
        seen: set[str] = set()
        for d, rowid in zip(distances.tolist(), ids.tolist()):
            if rowid < 0:
                continue
            subject_id, template_id = index.labels[rowid]
            if subject_id in seen:
                continue
            seen.add(subject_id)
            out.append(Match(subject_id, template_id, score_of(d, index.metric)))
            if len(out) == k:
                return out
        if kk >= n:
            return out
        kk = min(n, 4 * kk)


def apply_write(
    indexes: dict[str, TenantIndex],
    tenant: str,
    removed: Sequence[int],
    added: Sequence[tuple[int, str, str]],
    added_vectors: np.ndarray | None,
    new_index: Callable[[], TenantIndex],
) -> TenantIndex | None:
    """Apply a committed write to ``tenant``'s index in ``indexes``: row ids ``removed``, then rows ``added``
    (``(row id, subject id, template id)``, vectors ``added_vectors`` as stored; a missing index is made by
    ``new_index`` and put in ``indexes``). Returns the tenant's index (None when it has none); an index left empty
    stays in ``indexes``: the caller drops it."""
    index = indexes.get(tenant)
    if removed and index is not None:
        index.remove(np.asarray(removed, np.int64))
    if added:
        if index is None:
            index = indexes[tenant] = new_index()
        assert added_vectors is not None
        rowids = np.array([a[0] for a in added], np.int64)
        index.add(rowids, added_vectors, [(a[1], a[2]) for a in added])
    return index


def templates_indexed(indexes: Mapping[str, TenantIndex], tenant: str | None = None) -> int:
    """Templates held by ``indexes`` (of ``tenant``, or of all tenants)."""
    if tenant is not None:
        index = indexes.get(tenant)
        return 0 if index is None else index.ntotal
    return sum(index.ntotal for index in indexes.values())
