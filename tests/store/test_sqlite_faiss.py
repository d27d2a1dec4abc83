"""SQLiteFaissStore: storage, search, tenants, deletion, durability, validation and atomicity."""

from __future__ import annotations

import gc
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from advface.encoders.base import pair_scores
from advface.errors import AdvfaceError, ConfigError, EmbeddingError, NotFoundError
from advface.store import Match, SQLiteFaissStore, SubjectInfo
from advface.store import sqlite_faiss

DIM = 16
METRICS = ["euclidean", "cosine"]


def _vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    return rng.standard_normal((n, dim)).astype(np.float32)


@pytest.fixture(params=METRICS)
def metric(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "templates.sqlite"


@pytest.fixture
def store(path: Path, metric: str):
    with SQLiteFaissStore(path, DIM, metric) as s:
        yield s


def _brute_force(store: SQLiteFaissStore, tenant: str, probe: np.ndarray, k: int) -> list[tuple[str, float]]:
    """Best score per subject by pair_scores over every template, top k."""
    best: dict[str, float] = {}
    page_token = ""
    while True:
        page, page_token = store.list_subjects(tenant, page_size=7, page_token=page_token)
        for info in page:
            vectors = store.subject_vectors(tenant, info.subject_id)
            scores = pair_scores(np.repeat(probe[None], len(vectors), 0), vectors, store.metric)
            best[info.subject_id] = float(scores.max())
        if not page_token:
            break
    return sorted(best.items(), key=lambda kv: -kv[1])[:k]


def _snapshot(store: SQLiteFaissStore) -> tuple:
    """Everything observable about a store, to check that failed calls change nothing."""
    subjects = {}
    for tenant in store.tenants():
        page, _ = store.list_subjects(tenant, page_size=1000)
        subjects[tenant] = [(s.subject_id, s.metadata, s.template_ids) for s in page]
    return store.count(), store.count(subjects=True), store.index_size(), subjects


# --------------------------------------------------------------------------------------------------- basics


def test_add_get_list_and_vectors(store: SQLiteFaissStore) -> None:
    rng = np.random.default_rng(0)
    alice = _vectors(rng, 2)
    ids = store.add("t1", "alice", alice, {"name": "Alice", "team": "a"})
    assert len(ids) == 2 and len(set(ids)) == 2 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    info = store.get_subject("t1", "alice")
    assert isinstance(info, SubjectInfo)
    assert (info.subject_id, info.metadata, info.template_ids) == ("alice", {"name": "Alice", "team": "a"}, ids)
    assert info.created_at > 1e9
    np.testing.assert_array_equal(store.subject_vectors("t1", "alice"), alice)
    assert store.subject_vectors("t1", "alice").dtype == np.float32

    # appending merges metadata; a 1-d vector is one template; float64 input is stored as float32
    more = rng.standard_normal(DIM)
    ids2 = store.add("t1", "alice", more, {"team": "b", "x": "1"})
    info = store.get_subject("t1", "alice")
    assert info.template_ids == ids + ids2
    assert info.metadata == {"name": "Alice", "team": "b", "x": "1"}
    np.testing.assert_array_equal(store.subject_vectors("t1", "alice"), np.vstack([alice, more.astype(np.float32)]))

    # replace: old templates and metadata go, in one call
    new = _vectors(rng, 1)
    ids3 = store.add("t1", "alice", new, {"only": "this"}, replace=True)
    info = store.get_subject("t1", "alice")
    assert (info.template_ids, info.metadata) == (ids3, {"only": "this"})
    assert store.count("t1") == 1 == store.index_size("t1")
    top = store.search("t1", new[0], 1)[0]
    assert (top.subject_id, top.template_id) == ("alice", ids3[0])


def test_list_subjects_pages_in_subject_order(store: SQLiteFaissStore) -> None:
    rng = np.random.default_rng(1)
    names = ["zoe", "Bob", "alice", "émile", "carl", "bob", "Z 1"]
    store.add_many("t", [(n, _vectors(rng, 1 + i % 2), {"i": str(i)}) for i, n in enumerate(names)])
    seen, token, pages = [], "", 0
    while True:
        page, token = store.list_subjects("t", page_size=3, page_token=token)
        pages += 1
        seen.extend(page)
        if not token:
            break
    assert [s.subject_id for s in seen] == sorted(names)
    assert pages == 3
    for s in seen:
        assert s == store.get_subject("t", s.subject_id)
    assert store.list_subjects("t", page_size=7) == (seen, "")
    assert store.list_subjects("other") == ([], "")


def test_search_best_per_subject_top_k_order(store: SQLiteFaissStore) -> None:
    rng = np.random.default_rng(2)
    probe = _vectors(rng, 1)[0]
    items = [(f"s{i:03d}", _vectors(rng, 1 + i % 3), None) for i in range(60)]
    # one subject with many templates close to the probe: must appear once, and not crowd out the others
    items.append(("crowd", probe + 0.01 * _vectors(rng, 200), None))
    store.add_many("t", items)
    for k in (1, 5, 61, 100):
        matches = store.search("t", probe, k)
        assert all(isinstance(m, Match) for m in matches)
        expected = _brute_force(store, "t", probe, k)
        assert len(matches) == min(k, 61)
        assert [m.subject_id for m in matches] == [e[0] for e in expected]
        np.testing.assert_allclose([m.score for m in matches], [e[1] for e in expected], atol=2e-5)
        assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
        assert matches[0].subject_id == "crowd"
        # the template returned is the subject's best one
        for m in matches[:5]:
            info = store.get_subject("t", m.subject_id)
            vectors = store.subject_vectors("t", m.subject_id)
            scores = pair_scores(np.repeat(probe[None], len(vectors), 0), vectors, store.metric)
            assert info.template_ids[int(np.argmax(scores))] == m.template_id
    assert store.search("empty-tenant", probe, 3) == []


def test_exact_vector_scores(store: SQLiteFaissStore) -> None:
    v = np.array([3.0, 4.0] + [0.0] * (DIM - 2), np.float32)
    store.add("t", "a", v)
    store.add("t", "b", -v)
    matches = store.search("t", v * 2, 2)
    if store.metric == "euclidean":
        assert [m.subject_id for m in matches] == ["a", "b"]
        np.testing.assert_allclose([m.score for m in matches], [-5.0, -15.0], rtol=1e-6)
    else:
        np.testing.assert_allclose([m.score for m in matches], [1.0, -1.0], rtol=1e-6)


def test_tenants_are_isolated(store: SQLiteFaissStore) -> None:
    rng = np.random.default_rng(3)
    va, vb = _vectors(rng, 1), _vectors(rng, 1)
    ida = store.add("A", "same-id", va, {"tenant": "A"})
    idb = store.add("B", "same-id", vb, {"tenant": "B"})
    store.add("B", "only-b", _vectors(rng, 2))
    assert store.tenants() == ["A", "B"]
    assert (store.count("A"), store.count("B"), store.count()) == (1, 3, 4)
    assert (store.count("A", subjects=True), store.count(subjects=True)) == (1, 3)
    # searching A with B's exact vector still only finds A's template
    assert [(m.subject_id, m.template_id) for m in store.search("A", vb[0], 10)] == [("same-id", ida[0])]
    assert {m.subject_id for m in store.search("B", va[0], 10)} == {"same-id", "only-b"}
    assert store.get_subject("A", "same-id").metadata == {"tenant": "A"}
    with pytest.raises(NotFoundError):
        store.get_subject("A", "only-b")
    with pytest.raises(NotFoundError):
        store.delete_template("A", idb[0])  # B's template is unknown in A
    with pytest.raises(NotFoundError):
        store.subject_vectors("A", "only-b")
    assert store.delete_subject("A", "same-id") == 1
    assert store.tenants() == ["B"]
    assert store.get_subject("B", "same-id").template_ids == idb
    assert store.search("A", va[0], 5) == []
    assert store.search("B", vb[0], 1)[0].template_id == idb[0]


def test_deletes_remove_from_index_and_database(store: SQLiteFaissStore) -> None:
    rng = np.random.default_rng(4)
    alice, bob = _vectors(rng, 3), _vectors(rng, 2)
    ida = store.add("t", "alice", alice)
    idb = store.add("t", "bob", bob)
    assert store.count() == 5 == store.index_size()

    assert store.delete_template("t", ida[1]) == "alice"
    assert store.get_subject("t", "alice").template_ids == [ida[0], ida[2]]
    np.testing.assert_array_equal(store.subject_vectors("t", "alice"), alice[[0, 2]])
    assert all(m.template_id != ida[1] for m in store.search("t", alice[1], 2))
    assert store.count() == 4 == store.index_size()

    assert store.delete_subject("t", "alice") == 2
    with pytest.raises(NotFoundError):
        store.get_subject("t", "alice")
    assert [m.subject_id for m in store.search("t", alice[0], 5)] == ["bob"]
    assert store.count() == 2 == store.index_size()

    # removing the last template removes the subject
    store.delete_template("t", idb[0])
    assert store.delete_template("t", idb[1]) == "bob"
    with pytest.raises(NotFoundError):
        store.get_subject("t", "bob")
    assert store.count() == 0 == store.index_size()
    assert store.tenants() == [] and store.search("t", bob[0], 3) == []

    with pytest.raises(NotFoundError):
        store.delete_subject("t", "alice")
    with pytest.raises(NotFoundError):
        store.delete_template("t", ida[0])
    with sqlite3.connect(store.path) as conn:  # nothing left in SQLite either
        assert conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM subjects").fetchone()[0] == 0


# --------------------------------------------------------------------------------------------------- reopening


def test_reopen_rebuilds_identical_index(path: Path, metric: str) -> None:
    rng = np.random.default_rng(5)
    probes = _vectors(rng, 5)
    with SQLiteFaissStore(path, DIM, metric) as s:
        s.add_many("A", [(f"a{i}", _vectors(rng, 1 + i % 3), {"i": str(i)}) for i in range(40)])
        s.add_many("B", [(f"b{i}", _vectors(rng, 2), None) for i in range(10)])
        s.delete_subject("A", "a7")
        s.delete_template("A", s.get_subject("A", "a5").template_ids[0])
        before = [s.search(t, p, 8) for t in ("A", "B") for p in probes]
        listing = s.list_subjects("A", page_size=1000)
        counts = (s.count(), s.count("A"), s.tenants())
    with SQLiteFaissStore(path, DIM, metric) as s:
        assert [s.search(t, p, 8) for t in ("A", "B") for p in probes] == before
        assert s.list_subjects("A", page_size=1000) == listing
        assert (s.count(), s.count("A"), s.tenants()) == counts
        assert s.index_size() == s.count() and s.index_size("B") == 20
        # template row ids are never reused: a new template after reopening gets a fresh faiss id
        new = s.add("A", "new", probes[0])
        assert s.search("A", probes[0], 1)[0].template_id == new[0]


def test_reopen_with_other_dim_or_metric_fails(path: Path) -> None:
    SQLiteFaissStore(path, DIM, "cosine").close()
    with pytest.raises(ConfigError, match="16-d cosine"):
        SQLiteFaissStore(path, DIM + 1, "cosine")
    with pytest.raises(ConfigError, match="euclidean"):
        SQLiteFaissStore(path, DIM, "euclidean")
    SQLiteFaissStore(path, DIM, "cosine").close()  # the failed opens released the lock


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metric"):
        SQLiteFaissStore(tmp_path / "a.sqlite", DIM, "manhattan")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dim"):
        SQLiteFaissStore(tmp_path / "a.sqlite", 0, "cosine")
    with pytest.raises(ConfigError, match="use_gpu"):
        SQLiteFaissStore(tmp_path / "a.sqlite", DIM, "cosine", use_gpu="yes")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="not a usable SQLite database"):
        SQLiteFaissStore(junk, DIM, "cosine")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE x (y)")
    with pytest.raises(ConfigError, match="not an advface template store"):
        SQLiteFaissStore(other, DIM, "cosine")
    # one open store per database file
    s = SQLiteFaissStore(tmp_path / "b.sqlite", DIM, "cosine")
    with pytest.raises(ConfigError, match="already open"):
        SQLiteFaissStore(tmp_path / "b.sqlite", DIM, "cosine")
    s.close()
    s.close()  # twice is harmless
    with pytest.raises(ConfigError, match="closed"):
        s.count()
    with pytest.raises(ConfigError, match="closed"):
        s.add("t", "x", np.ones(DIM))
    # a store dropped without close() releases its lock when collected
    forgotten = SQLiteFaissStore(tmp_path / "c.sqlite", DIM, "cosine")
    del forgotten
    gc.collect()
    SQLiteFaissStore(tmp_path / "c.sqlite", DIM, "cosine").close()


def test_database_schema_and_pragmas(store: SQLiteFaissStore) -> None:
    store.add("t", "x", np.ones(DIM), {"k": "v"})
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    with sqlite3.connect(store.path) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        assert (meta["dim"], meta["metric"], meta["schema_version"]) == (str(DIM), store.metric, "1")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        blob = conn.execute("SELECT vector FROM templates").fetchone()[0]
        assert blob == np.ones(DIM, "<f4").tobytes()
        assert json.loads(conn.execute("SELECT metadata FROM subjects").fetchone()[0]) == {"k": "v"}
    assert store._conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


# --------------------------------------------------------------------------------------------------- bad input


def _bad_calls(dim: int) -> list[tuple[str, object, type[AdvfaceError]]]:
    good = np.ones((1, dim), np.float32)
    nan, inf, zero = good.copy(), good.copy(), np.zeros((1, dim), np.float32)
    nan[0, 3], inf[0, 1] = np.nan, np.inf
    two = np.vstack([good, nan])
    many = {f"k{i}": "v" for i in range(33)}
    return [
        ("nan", lambda s: s.add("t", "x", nan), EmbeddingError),
        ("inf", lambda s: s.add("t", "x", inf), EmbeddingError),
        ("one bad row of two", lambda s: s.add("t", "x", two), EmbeddingError),
        ("zero vector", lambda s: s.add("t", "x", zero), EmbeddingError),
        ("wrong dim", lambda s: s.add("t", "x", np.ones((1, dim + 1))), EmbeddingError),
        ("3-d array", lambda s: s.add("t", "x", np.ones((1, 1, dim))), EmbeddingError),
        ("no vectors", lambda s: s.add("t", "x", np.ones((0, dim))), EmbeddingError),
        ("integer vectors", lambda s: s.add("t", "x", np.ones((1, dim), np.int32)), EmbeddingError),
        ("huge vector", lambda s: s.add("t", "x", np.full((1, dim), 1e300)), EmbeddingError),
        ("float32 overflow", lambda s: s.add("t", "x", np.full((1, dim), 1e39)), EmbeddingError),
        ("float32 underflow", lambda s: s.add("t", "x", np.full((1, dim), 1e-50)), EmbeddingError),
        ("empty subject", lambda s: s.add("t", "", good), ConfigError),
        ("long subject", lambda s: s.add("t", "x" * 129, good), ConfigError),
        ("control char", lambda s: s.add("t", "a\nb", good), ConfigError),
        ("nul char", lambda s: s.add("t", "a\x00b", good), ConfigError),
        ("bidi override", lambda s: s.add("t", "a\u202eb", good), ConfigError),
        ("leading space", lambda s: s.add("t", " a", good), ConfigError),
        ("non-str subject", lambda s: s.add("t", 12, good), ConfigError),
        ("lone surrogate", lambda s: s.add("t", "a\ud800", good), ConfigError),
        ("empty tenant", lambda s: s.add("", "x", good), ConfigError),
        ("surrogate tenant", lambda s: s.add("t\udc80", "x", good), ConfigError),
        ("surrogate metadata value", lambda s: s.add("t", "x", good, {"k": "\udc80"}), ConfigError),
        ("long tenant", lambda s: s.add("t" * 129, "x", good), ConfigError),
        ("33 metadata keys", lambda s: s.add("t", "x", good, many), ConfigError),
        ("long metadata key", lambda s: s.add("t", "x", good, {"k" * 65: "v"}), ConfigError),
        ("long metadata value", lambda s: s.add("t", "x", good, {"k": "v" * 1025}), ConfigError),
        ("non-str metadata value", lambda s: s.add("t", "x", good, {"k": 1}), ConfigError),
        ("metadata not a mapping", lambda s: s.add("t", "x", good, [("k", "v")]), ConfigError),
        ("replace not bool", lambda s: s.add("t", "x", good, replace="yes"), ConfigError),
        ("merged metadata too large", lambda s: s.add("t", "full", good, {f"n{i}": "v" for i in range(3)}),
         ConfigError),
        ("unknown subject", lambda s: s.delete_subject("t", "nobody"), NotFoundError),
        ("unknown subject in get", lambda s: s.get_subject("t", "nobody"), NotFoundError),
        ("unknown template", lambda s: s.delete_template("t", "0" * 32), NotFoundError),
        ("bad template id", lambda s: s.delete_template("t", ""), ConfigError),
        ("unknown tenant", lambda s: s.delete_subject("nobody", "full"), NotFoundError),
        ("probe nan", lambda s: s.search("t", nan[0], 1), EmbeddingError),
        ("probe zero", lambda s: s.search("t", zero[0], 1), EmbeddingError),
        ("probe wrong dim", lambda s: s.search("t", np.ones(dim + 1), 1), EmbeddingError),
        ("two probes", lambda s: s.search("t", np.ones((2, dim)), 1), EmbeddingError),
        ("k zero", lambda s: s.search("t", good[0], 0), ConfigError),
        ("k bool", lambda s: s.search("t", good[0], True), ConfigError),
        ("k float", lambda s: s.search("t", good[0], 2.0), ConfigError),
        ("page size zero", lambda s: s.list_subjects("t", page_size=0), ConfigError),
        ("page size too big", lambda s: s.list_subjects("t", page_size=1001), ConfigError),
        ("page token junk", lambda s: s.list_subjects("t", page_token="!!junk"), ConfigError),
        ("page token base64 junk", lambda s: s.list_subjects("t", page_token="YWJjZA"), ConfigError),
        ("items not a list", lambda s: s.add_many("t", "abc"), ConfigError),
        ("item too short", lambda s: s.add_many("t", [("x",)]), ConfigError),
    ]


@pytest.fixture(scope="module", params=METRICS)
def shared_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One store per metric for the bad-input cases (which must leave it unchanged)."""
    rng = np.random.default_rng(6)
    with SQLiteFaissStore(tmp_path_factory.mktemp("bad") / "t.sqlite", DIM, request.param) as s:
        s.add("t", "full", _vectors(rng, 2), {f"m{i}": "v" for i in range(30)})
        s.add("t", "x", _vectors(rng, 1), {"keep": "me"})
        yield s


@pytest.mark.parametrize("case", range(len(_bad_calls(DIM))), ids=[c[0] for c in _bad_calls(DIM)])
def test_bad_input_raises_and_changes_nothing(shared_store: SQLiteFaissStore, case: int) -> None:
    before = _snapshot(shared_store)
    assert before[:3] == (3, 2, 3)
    name, call, error = _bad_calls(DIM)[case]
    with pytest.raises(error):
        call(shared_store)
    assert _snapshot(shared_store) == before


def test_add_many_is_atomic(store: SQLiteFaissStore) -> None:
    rng = np.random.default_rng(7)
    store.add("t", "existing", _vectors(rng, 1), {f"m{i}": "v" for i in range(31)})
    before = _snapshot(store)
    bad = _vectors(rng, 2)
    bad[1, 0] = np.nan
    with pytest.raises(EmbeddingError, match=r"items\[2\]"):
        store.add_many("t", [("a", _vectors(rng, 1), None), ("b", _vectors(rng, 2), None), ("c", bad, None)])
    assert _snapshot(store) == before
    # a failure found inside the transaction (merged metadata too large) rolls back the earlier items too
    with pytest.raises(ConfigError, match="after merging"):
        store.add_many(
            "t", [("a", _vectors(rng, 1), None), ("existing", _vectors(rng, 1), {"n1": "1", "n2": "2"})]
        )
    assert _snapshot(store) == before
    with pytest.raises(NotFoundError):
        store.get_subject("t", "a")
    with pytest.raises(ConfigError, match="twice"):
        store.add_many("t", [("a", _vectors(rng, 1), None), ("a", _vectors(rng, 1), None)], replace=True)
    assert _snapshot(store) == before
    # without replace, a subject may appear twice (its templates are appended in order)
    ids = store.add_many("t", [("a", _vectors(rng, 1), {"x": "1"}), ("a", _vectors(rng, 2), {"y": "2"})])
    info = store.get_subject("t", "a")
    assert info.template_ids == ids[0] + ids[1] and info.metadata == {"x": "1", "y": "2"}
    assert store.add_many("t", []) == []


# --------------------------------------------------------------------------------------------------- durability


_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from advface.store import SQLiteFaissStore
    store = SQLiteFaissStore(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    ids = store.add("t", "acked", np.arange(1, int(sys.argv[2]) + 1, dtype=np.float32), {"k": "v"})
    print("ok", ids[0], flush=True)
    time.sleep(120)
    """
)


def test_acknowledged_write_survives_sigkill(path: Path, metric: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(DIM), metric],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("ok "), (line, proc.stderr.read() if proc.poll() is not None else "")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    template_id = line.split()[1]
    with SQLiteFaissStore(path, DIM, metric) as s:  # the killed process's lock is gone with it
        info = s.get_subject("t", "acked")
        assert info.template_ids == [template_id] and info.metadata == {"k": "v"}
        probe = np.arange(1, DIM + 1, dtype=np.float32)
        assert s.search("t", probe, 1)[0].template_id == template_id


def _on_disk(path: Path) -> bytes:
    data = b""
    for suffix in ("", "-wal", "-journal"):
        f = path.with_name(path.name + suffix)
        if f.exists():
            data += f.read_bytes()
    return data


def test_deleted_vectors_leave_no_bytes_on_disk(path: Path, metric: str) -> None:
    rng = np.random.default_rng(8)
    with SQLiteFaissStore(path, 128, metric) as s:
        s.add_many("t", [(f"keep{i}", _vectors(rng, 2, 128), None) for i in range(20)])
        gone = _vectors(rng, 3, 128)
        s.add("t", "gone", gone, {"secret": "MARKER-private-metadata-value"})
        kept = _vectors(rng, 2, 128)
        kept_ids = s.add("t", "half", kept)
        s.add_many("t", [(f"late{i}", _vectors(rng, 1, 128), None) for i in range(5)])
        disk = _on_disk(path)
        assert all(v.astype("<f4").tobytes() in disk for v in [*gone, *kept])  # the search itself works
        assert b"MARKER-private-metadata-value" in disk

        s.delete_subject("t", "gone")
        s.delete_template("t", kept_ids[0])
        disk = _on_disk(path)
        for v in [*gone, kept[0]]:
            raw = v.astype("<f4").tobytes()
            assert raw not in disk
            assert raw[:32] not in disk and raw[-32:] not in disk
        assert b"MARKER-private-metadata-value" not in disk
        assert kept[1].astype("<f4").tobytes() in disk
        assert not path.with_name(path.name + "-wal").exists() or path.with_name(path.name + "-wal").stat().st_size == 0
        # replacing a subject's templates removes the old bytes too
        s.add("t", "keep3", _vectors(rng, 1, 128), replace=True)
    with SQLiteFaissStore(path, 128, metric) as s:
        assert s.count() == 20 * 2 - 1 + 1 + 5 and "gone" not in {x.subject_id for x in s.list_subjects("t", 1000)[0]}


# --------------------------------------------------------------------------------------------------- GPU path, threads


class _FakeGpu:
    """Stands in for faiss GPU cloning: a CPU copy of the flat index (exercises the position -> id mapping)."""

    clones = 0

    def clone(self, flat: faiss.Index) -> faiss.Index:
        _FakeGpu.clones += 1
        return faiss.clone_index(flat)


def test_gpu_search_path_matches_cpu(tmp_path: Path, metric: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    items = [(f"s{i}", _vectors(rng, 1 + i % 2), None) for i in range(30)]
    probes = _vectors(rng, 4)
    cpu = SQLiteFaissStore(tmp_path / "cpu.sqlite", DIM, metric, use_gpu=False)
    monkeypatch.setattr(sqlite_faiss, "_gpu_count", lambda: 1)
    monkeypatch.setattr(sqlite_faiss, "_GpuBackend", _FakeGpu)
    gpu = SQLiteFaissStore(tmp_path / "gpu.sqlite", DIM, metric, use_gpu=True)
    auto = SQLiteFaissStore(tmp_path / "auto.sqlite", DIM, metric)  # "auto": small tenants stay on the CPU
    _FakeGpu.clones = 0

    def same() -> None:
        for p in probes:
            want = [(m.subject_id, round(m.score, 5)) for m in cpu.search("t", p, 6)]
            assert [(m.subject_id, round(m.score, 5)) for m in gpu.search("t", p, 6)] == want
            assert [(m.subject_id, round(m.score, 5)) for m in auto.search("t", p, 6)] == want

    for s in (cpu, gpu, auto):
        s.add_many("t", items)
    same()
    assert _FakeGpu.clones == 1
    for s in (cpu, gpu, auto):
        s.add("t", "late", probes[0] + 0.01)  # appended to the GPU copy
        s.delete_subject("t", "s3")  # drops the GPU copy
    same()
    assert _FakeGpu.clones == 2
    for s in (cpu, gpu, auto):
        s.close()


def test_concurrent_searches_and_writes(store: SQLiteFaissStore) -> None:
    rng = np.random.default_rng(10)
    store.add_many("t", [(f"s{i}", _vectors(rng, 2), None) for i in range(50)])
    probes = _vectors(rng, 8)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                for p in probes:
                    matches = store.search("t", p, 5)
                    assert len({m.subject_id for m in matches}) == len(matches) == 5
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            store.add("t", f"w{i}", _vectors(rng, 2))
            store.delete_subject("t", f"w{i}")
            store.delete_template("t", store.get_subject("t", f"s{i}").template_ids[0])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert store.count() == 90 == store.index_size()
