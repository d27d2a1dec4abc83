"""SQLiteFaissStore: what only this backend has (the shared store contract is in test_store_contract.py): the faiss
index kept equal to the database, rebuilding it on reopening, the file lock, schema and pragmas, durability after
SIGKILL, erasure on disk, the GPU search path, threads."""

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
from store_contract_helpers import (
    DIM,
    METRICS,
    check_add_get_list_and_vectors,
    check_deletes,
    check_reopened,
    fill_for_reopen,
    search_until,
    vectors,
)

from advface.errors import ConfigError
from advface.store import SQLiteFaissStore, faiss_index


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


# --------------------------------------------------------------------------------------------------- the faiss index


def test_replace_leaves_one_template_in_the_index(store: SQLiteFaissStore) -> None:
    check_add_get_list_and_vectors(store, after_replace=lambda: _index_holds(store, 1, "t1"))


def _index_holds(store: SQLiteFaissStore, n: int, tenant: str | None = None) -> None:
    assert store.count(tenant) == n == store.index_size(tenant)


def test_deletes_remove_from_index_and_database(store: SQLiteFaissStore) -> None:
    check_deletes(store, sized=lambda n: _index_holds(store, n))
    with sqlite3.connect(store.path) as conn:  # nothing left in SQLite either
        assert conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM subjects").fetchone()[0] == 0


# --------------------------------------------------------------------------------------------------- reopening


def test_reopen_rebuilds_identical_index(path: Path, metric: str) -> None:
    rng = np.random.default_rng(5)
    probes = vectors(rng, 5)
    with SQLiteFaissStore(path, DIM, metric) as s:
        state = fill_for_reopen(s, probes, rng)
    with SQLiteFaissStore(path, DIM, metric) as s:
        check_reopened(s, probes, state)
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
    """SQLite-only open errors (metric, dim and closing: test_store_contract.py)."""
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
    SQLiteFaissStore(tmp_path / "b.sqlite", DIM, "cosine").close()  # close() released the lock
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
        s.add_many("t", [(f"keep{i}", vectors(rng, 2, 128), None) for i in range(20)])
        gone = vectors(rng, 3, 128)
        s.add("t", "gone", gone, {"secret": "MARKER-private-metadata-value"})
        kept = vectors(rng, 2, 128)
        kept_ids = s.add("t", "half", kept)
        s.add_many("t", [(f"late{i}", vectors(rng, 1, 128), None) for i in range(5)])
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
        s.add("t", "keep3", vectors(rng, 1, 128), replace=True)
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
    items = [(f"s{i}", vectors(rng, 1 + i % 2), None) for i in range(30)]
    probes = vectors(rng, 4)
    cpu = SQLiteFaissStore(tmp_path / "cpu.sqlite", DIM, metric, use_gpu=False)
    monkeypatch.setattr(faiss_index, "gpu_count", lambda: 1)
    monkeypatch.setattr(faiss_index, "GpuBackend", _FakeGpu)
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
    store.add_many("t", [(f"s{i}", vectors(rng, 2), None) for i in range(50)])
    probes = vectors(rng, 8)
    errors: list[BaseException] = []
    stop = threading.Event()

    threads = [threading.Thread(target=search_until, args=(store, probes, stop, errors)) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            store.add("t", f"w{i}", vectors(rng, 2))
            store.delete_subject("t", f"w{i}")
            store.delete_template("t", store.get_subject("t", f"s{i}").template_ids[0])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert store.count() == 90 == store.index_size()
