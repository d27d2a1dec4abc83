"""The per-tenant faiss indexes shared by both stores (advface.store.faiss_index): the over-fetch / dedupe-by-subject
kNN search, flat and IVF indexes, the GPU search path (with a stand-in for the GPU), applying committed writes and
the readers-writer lock."""

from __future__ import annotations

import logging
import threading
import time

import faiss
import numpy as np
import pytest

from advface.encoders.base import pair_scores
from advface.store.base import Match
from advface.store.faiss_index import (
    GPU_MAX_K,
    GPU_MIN_ROWS,
    GpuSearch,
    IndexOptions,
    RWLock,
    TenantIndex,
    apply_write,
    index_vectors,
    nearest_subjects,
    templates_indexed,
)

DIM = 16
METRICS = ["euclidean", "cosine"]


@pytest.fixture(params=METRICS)
def metric(request: pytest.FixtureRequest) -> str:
    return request.param


def filled(
    metric: str, rows: list[tuple[str, np.ndarray]], options: IndexOptions | None = None, first_rowid: int = 1
) -> tuple[TenantIndex, list[tuple[int, str, str, np.ndarray]]]:
    """A TenantIndex holding ``(subject id, vectors)`` rows; returns it and ``(row id, subject, template, vector)``
    of every template, row ids counting from ``first_rowid``."""
    templates = []
    rowid = first_rowid
    for subject_id, vectors in rows:
        for j, v in enumerate(vectors):
            templates.append((rowid, subject_id, f"{subject_id}-t{j}", v))
            rowid += 3  # row ids need not be dense
    index = TenantIndex(DIM, metric, options)
    index.add(
        np.array([t[0] for t in templates], np.int64),
        np.stack([t[3] for t in templates]).astype(np.float32),
        [(t[1], t[2]) for t in templates],
    )
    return index, templates


def brute_force(
    templates: list[tuple[int, str, str, np.ndarray]], probe: np.ndarray, metric: str, k: int
) -> list[tuple[str, str, float]]:
    """(subject, best template, score) of the k best subjects, by pair_scores over every template."""
    vectors = np.stack([t[3] for t in templates])
    scores = pair_scores(np.repeat(probe[None], len(templates), 0), vectors, metric)
    best: dict[str, tuple[float, str]] = {}
    for (_, subject_id, template_id, _), score in zip(templates, scores.tolist()):
        if subject_id not in best or score > best[subject_id][0]:
            best[subject_id] = (score, template_id)
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
    return [(subject_id, template_id, score) for subject_id, (score, template_id) in ranked]


def crowded(rng: np.random.Generator, probe: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """40 subjects of 1 to 3 templates, and one subject whose 120 templates all lie next to ``probe`` (they crowd
    the first candidate lists: the search must fetch more to find other subjects)."""
    rows = [(f"s{i:02d}", rng.standard_normal((1 + i % 3, DIM)).astype(np.float32)) for i in range(40)]
    rows.append(("crowd", (probe + 0.01 * rng.standard_normal((120, DIM))).astype(np.float32)))
    return rows


# --------------------------------------------------------------------------------------------------- kNN + dedupe


@pytest.mark.parametrize("k", [1, 5, 41, 100])
def test_nearest_subjects_one_per_subject_best_template_first(metric: str, k: int) -> None:
    rng = np.random.default_rng(0)
    probe = rng.standard_normal(DIM).astype(np.float32)
    index, templates = filled(metric, crowded(rng, probe))
    matches = nearest_subjects(index, probe[None], k)
    want = brute_force(templates, probe, metric, k)
    assert all(isinstance(m, Match) for m in matches)
    assert len(matches) == min(k, 41)
    assert len({m.subject_id for m in matches}) == len(matches)  # each subject once
    assert [(m.subject_id, m.template_id) for m in matches] == [(w[0], w[1]) for w in want]  # its best template
    np.testing.assert_allclose([m.score for m in matches], [w[2] for w in want], atol=2e-5)
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    assert matches[0].subject_id == "crowd"


def test_nearest_subjects_scores_follow_the_metric() -> None:
    v = np.array([3.0, 4.0] + [0.0] * (DIM - 2), np.float32)
    rows = [("a", v[None]), ("b", -v[None])]
    euclidean, _ = filled("euclidean", rows)
    got = nearest_subjects(euclidean, 2 * v[None], 2)
    assert [m.subject_id for m in got] == ["a", "b"]
    np.testing.assert_allclose([m.score for m in got], [-5.0, -15.0], rtol=1e-6)  # minus the distance
    cosine, _ = filled("cosine", rows)
    got = nearest_subjects(cosine, 2 * v[None], 2)  # the probe is normalised too
    assert [m.subject_id for m in got] == ["a", "b"]
    np.testing.assert_allclose([m.score for m in got], [1.0, -1.0], rtol=1e-6)


def test_nearest_subjects_of_no_index_or_an_empty_one(metric: str) -> None:
    probe = np.ones((1, DIM), np.float32)
    assert nearest_subjects(None, probe, 3) == []
    index, _ = filled(metric, [("a", np.ones((2, DIM), np.float32))])
    index.remove(np.array([1, 4], np.int64))
    assert index.ntotal == 0 and index.labels == {}
    assert nearest_subjects(index, probe, 3) == []


def test_index_vectors_normalises_only_for_cosine() -> None:
    x = np.array([[3.0, 4.0] + [0.0] * (DIM - 2)], np.float64)
    np.testing.assert_array_equal(index_vectors(x, "euclidean"), x.astype(np.float32))
    np.testing.assert_allclose(index_vectors(x, "cosine")[0, :2], [0.6, 0.8], rtol=1e-7)
    assert index_vectors(x, "cosine").dtype == np.float32 and index_vectors(x, "cosine").flags.c_contiguous


# --------------------------------------------------------------------------------------------------- flat vs IVF


def test_ivf_probing_every_list_equals_flat(metric: str) -> None:
    rng = np.random.default_rng(1)
    rows = [(f"s{i:03d}", rng.standard_normal((2, DIM)).astype(np.float32)) for i in range(300)]
    flat, _ = filled(metric, rows, IndexOptions("flat"))
    ivf, _ = filled(metric, rows, IndexOptions("ivf", min_rows=500, nlist=8, nprobe=8))
    assert flat.kind == "flat" and flat.ivf is None
    assert ivf.kind == "ivf" and ivf.ivf.nlist == 8 and ivf.ivf.nprobe == 8 and ivf.ivf.ntotal == 600
    for probe in rng.standard_normal((10, DIM)).astype(np.float32):
        want = nearest_subjects(flat, probe[None], 10)
        got = nearest_subjects(ivf, probe[None], 10)
        assert [(m.subject_id, m.template_id) for m in got] == [(m.subject_id, m.template_id) for m in want]
        np.testing.assert_allclose([m.score for m in got], [m.score for m in want], atol=1e-5)


def test_ivf_only_from_min_rows_and_dropped_below_half() -> None:
    rng = np.random.default_rng(2)
    opts = IndexOptions("ivf", min_rows=400, nlist=4, nprobe=100)
    small, _ = filled("euclidean", [(f"s{i}", rng.standard_normal((1, DIM))) for i in range(399)], opts)
    assert small.kind == "flat"
    index, templates = filled("euclidean", [(f"s{i}", rng.standard_normal((1, DIM))) for i in range(400)], opts)
    assert index.kind == "ivf" and index.ivf.nprobe == 4  # nprobe is capped at nlist
    index.remove(np.array([t[0] for t in templates[:200]], np.int64))
    assert index.kind == "ivf" and index.ivf.ntotal == 200  # min_rows / 2 left: kept
    index.remove(np.array([templates[200][0]], np.int64))
    assert index.kind == "flat" and index.ntotal == 199  # below min_rows / 2: exact again


def test_a_short_ivf_answer_falls_back_to_exact() -> None:
    """When the probed lists hold fewer than the candidates asked, the flat index answers (nothing is missed)."""
    rng = np.random.default_rng(3)
    rows = [(f"s{i:03d}", rng.standard_normal((1, DIM))) for i in range(400)]
    index, templates = filled("euclidean", rows, IndexOptions("ivf", min_rows=400, nlist=10, nprobe=1))
    assert index.kind == "ivf"
    probe = rng.standard_normal(DIM).astype(np.float32)
    matches = nearest_subjects(index, probe[None], 200)  # one list of ~40 cannot hold 216 candidates
    assert [m.subject_id for m in matches] == [w[0] for w in brute_force(templates, probe, "euclidean", 200)]


# --------------------------------------------------------------------------------------------------- GPU path


class FakeGpuBackend:
    """Stands in for faiss GPU cloning: a CPU copy of the flat index (searched by position, like the GPU copy)."""

    def __init__(self) -> None:
        self.clones = 0

    def clone(self, flat: faiss.Index) -> faiss.Index:
        self.clones += 1
        return faiss.clone_index(flat)


def test_gpu_search_matches_the_cpu_and_follows_writes(metric: str) -> None:
    rng = np.random.default_rng(4)
    probe = rng.standard_normal(DIM).astype(np.float32)
    index, _ = filled(metric, crowded(rng, probe), first_rowid=100)
    backend = FakeGpuBackend()
    gpu = GpuSearch(backend, every_tenant=True)  # type: ignore[arg-type]
    assert gpu.serves(index, GPU_MAX_K) and not gpu.serves(index, GPU_MAX_K + 1)
    assert not GpuSearch(backend, every_tenant=False).serves(index, 10)  # "auto": too small a tenant
    probes = np.vstack([probe, rng.standard_normal((3, DIM)).astype(np.float32)])

    def same() -> None:
        for p in probes:
            got, want = nearest_subjects(index, p[None], 6, gpu), nearest_subjects(index, p[None], 6)
            assert [(m.subject_id, m.template_id) for m in got] == [(m.subject_id, m.template_id) for m in want]
            np.testing.assert_allclose([m.score for m in got], [m.score for m in want], atol=1e-6)

    same()
    assert backend.clones == 1 and index.gpu is not None
    index.add(np.array([10_000], np.int64), probe[None] + 0.001, [("late", "late-t0")])  # appended to the copy
    assert backend.clones == 1 and index.gpu_ids is not None and index.gpu_ids[-1] == 10_000
    assert nearest_subjects(index, probe[None], 1, gpu)[0].subject_id == "late"
    index.remove(np.array([10_000], np.int64))  # drops the copy: made again at the next search
    assert index.gpu is None
    same()
    assert backend.clones == 2


def test_gpu_search_serves_large_tenants_in_auto_mode() -> None:
    class Sized:
        ntotal = GPU_MIN_ROWS

    auto = GpuSearch(FakeGpuBackend(), every_tenant=False)  # type: ignore[arg-type]
    assert auto.serves(Sized(), 10)  # type: ignore[arg-type]
    Sized.ntotal = GPU_MIN_ROWS - 1
    assert not auto.serves(Sized(), 10)  # type: ignore[arg-type]


def test_gpu_search_open(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from advface.store import faiss_index

    monkeypatch.setattr(faiss_index, "gpu_count", lambda: 0)
    assert GpuSearch.open(False) is None and GpuSearch.open("auto") is None
    with caplog.at_level(logging.WARNING, logger="advface.store.faiss_index"):
        assert GpuSearch.open(True) is None
    assert "faiss sees no GPU" in caplog.text
    monkeypatch.setattr(faiss_index, "gpu_count", lambda: 1)
    monkeypatch.setattr(faiss_index, "GpuBackend", FakeGpuBackend)
    assert GpuSearch.open(False) is None
    opened = GpuSearch.open("auto")
    assert isinstance(opened, GpuSearch) and isinstance(opened.backend, FakeGpuBackend) and not opened.every_tenant
    assert GpuSearch.open(True).every_tenant  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------- writes


def test_apply_write_adds_removes_and_makes_missing_indexes(metric: str) -> None:
    rng = np.random.default_rng(5)
    indexes: dict[str, TenantIndex] = {}
    made: list[TenantIndex] = []

    def new_index() -> TenantIndex:
        made.append(TenantIndex(DIM, metric))
        return made[-1]

    assert apply_write(indexes, "t", [], [], None, new_index) is None and indexes == {} and not made
    a, b = rng.standard_normal((2, DIM)).astype(np.float32), rng.standard_normal((1, DIM)).astype(np.float32)
    index = apply_write(indexes, "t", [], [(7, "alice", "a0"), (9, "alice", "a1")], a, new_index)
    assert index is indexes["t"] is made[0] and index.ntotal == 2
    assert index.labels == {7: ("alice", "a0"), 9: ("alice", "a1")}
    assert nearest_subjects(index, a[1:2], 1)[0].template_id == "a1"
    # one write may remove and add (a replacing add): the removed row is gone from search and labels
    assert apply_write(indexes, "t", [9], [(12, "bob", "b0")], b, new_index) is index and len(made) == 1
    assert index.labels == {7: ("alice", "a0"), 12: ("bob", "b0")}
    assert {m.template_id for m in nearest_subjects(index, a[1:2], 5)} == {"a0", "b0"}  # a1 is not found
    assert templates_indexed(indexes) == 2 == templates_indexed(indexes, "t")
    assert templates_indexed(indexes, "other") == 0
    # removing from a tenant without an index changes nothing
    assert apply_write(indexes, "other", [1, 2], [], None, new_index) is None and "other" not in indexes


# --------------------------------------------------------------------------------------------------- the lock


def test_rwlock_readers_share_and_writers_wait() -> None:
    lock = RWLock()
    events: list[str] = []
    inside = threading.Barrier(2, timeout=5)

    def reader(name: str) -> None:
        with lock.read():
            inside.wait()  # both readers hold the lock at once, or this times out
            events.append(name)
            time.sleep(0.05)

    def writer() -> None:
        with lock.write():
            events.append("writer")

    readers = [threading.Thread(target=reader, args=(f"r{i}",)) for i in range(2)]
    for t in readers:
        t.start()
    while len(events) < 2:
        time.sleep(0.001)
    w = threading.Thread(target=writer)
    w.start()
    for t in [*readers, w]:
        t.join(5)
    assert sorted(events[:2]) == ["r0", "r1"] and events[2] == "writer"


def test_rwlock_a_waiting_writer_goes_before_new_readers() -> None:
    lock = RWLock()
    order: list[str] = []
    first_reader_in, release_first = threading.Event(), threading.Event()

    def first_reader() -> None:
        with lock.read():
            first_reader_in.set()
            release_first.wait(5)
        order.append("r1 out")

    def writer() -> None:
        with lock.write():
            order.append("writer")

    def late_reader() -> None:
        with lock.read():
            order.append("late reader")

    r1 = threading.Thread(target=first_reader)
    r1.start()
    first_reader_in.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    while not lock._writers_waiting:  # the writer is queued behind the first reader
        time.sleep(0.001)
    r2 = threading.Thread(target=late_reader)
    r2.start()
    time.sleep(0.05)
    assert order == []  # the late reader waits for the queued writer
    release_first.set()
    for t in (r1, w, r2):
        t.join(5)
    assert order.index("writer") < order.index("late reader")
