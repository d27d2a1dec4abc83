"""Writers of raw-template sources for the tests (each layout the way an operator's database would hold it), and the
common ``advface reencode`` command line."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

DIM = 16


def reencode_args(shadow: Path, source: str, dest: str, *extra: str, steps: int = 2, chunk: int = 64) -> list[str]:
    """``advface reencode`` arguments: ``source`` to ``dest`` with the pixel ``shadow``, ``steps`` AdvFace steps,
    chunks of ``chunk`` templates, a lenient verification threshold, quiet; then ``extra``."""
    return [
        "reencode", "--source", source, "--dest", dest, "--shadow", str(shadow), "--steps", str(steps),
        "--chunk-size", str(chunk), "--match-threshold", "1.0", "-q", *extra,
    ]  # fmt: skip


def make_templates(n: int = 200, dim: int = DIM, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` ids and float32 templates (norm about 1.2, like dlib's)."""
    rng = np.random.default_rng(seed)
    return [f"person{i:05d}/img.jpg" for i in range(n)], (rng.standard_normal((n, dim)) * 0.3).astype(np.float32)


def write_parquet(
    path: Path, ids: list, vectors: list | np.ndarray, id_column: str = "id", vector_column: str = "embedding"
) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arr = pa.array([None if v is None else list(np.asarray(v, np.float32)) for v in vectors], pa.list_(pa.float32()))
    pq.write_table(pa.table({id_column: ids, vector_column: arr}), path, row_group_size=50)
    return f"parquet:{path}"


def write_npz(path: Path, ids: list[str], vectors: np.ndarray) -> str:
    np.savez(path, ids=np.asarray(ids), embeddings=np.asarray(vectors, np.float32))
    return f"npz:{path}"


def write_npy(path: Path, ids: list[str], vectors: np.ndarray) -> str:
    np.save(path, np.asarray(vectors, np.float32))
    path.with_name(path.name[:-4] + ".ids.txt").write_text("".join(i + "\n" for i in ids))
    return f"npy:{path}"


def write_sqlite(
    path: Path, ids: list, vectors: np.ndarray, table: str = "templates", fmt: str = "blob", extra_column: bool = False
) -> str:
    conn = sqlite3.connect(path)
    extra = ", subject TEXT" if extra_column else ""
    id_type = "INTEGER" if ids and isinstance(ids[0], int) else "TEXT"
    conn.execute(
        f"CREATE TABLE {table} (id {id_type} PRIMARY KEY, embedding {'TEXT' if fmt == 'json' else 'BLOB'}{extra})"
    )
    for i, v in zip(ids, vectors, strict=True):
        cell = json.dumps(np.asarray(v, np.float64).tolist()) if fmt == "json" else np.asarray(v, "<f4").tobytes()
        if extra_column:
            conn.execute(f"INSERT INTO {table} VALUES (?, ?, 's')", (i, cell))
        else:
            conn.execute(f"INSERT INTO {table} VALUES (?, ?)", (i, cell))
    conn.commit()
    conn.close()
    return f"sqlite:{path}?table={table}" + ("&vector_format=json" if fmt == "json" else "")


def write_postgres(dsn: str, ids: list, vectors: np.ndarray, table: str = "templates") -> str:
    import psycopg

    dim = np.asarray(vectors).shape[1]
    id_type = "bigint" if ids and isinstance(ids[0], int) else "text"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id {id_type} PRIMARY KEY, embedding vector({dim}))")
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} VALUES (%s, %s::vector)",
                [(i, "[" + ",".join(repr(float(x)) for x in v) + "]") for i, v in zip(ids, vectors, strict=True)],
            )
    return f"{dsn}?table={table}"


def read_all(uri: str) -> tuple[list[str], np.ndarray]:
    from advface.reencode.sources import open_source

    ids: list[str] = []
    vecs: list[np.ndarray] = []
    with open_source(uri) as src:
        for chunk in src.chunks(97):
            ids += chunk.ids
            vecs.append(chunk.vectors)
    return ids, np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)


def chunks_done(journal: Path) -> int:
    """Chunks a re-encoding run has committed to its journal (0 while the journal is missing or unreadable)."""
    if not journal.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT count(*) FROM chunks").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def kill_9_midway(args: list[str], work: Path, total: int, after: int = 4, timeout: float = 120.0) -> int:
    """Run ``advface <args>`` in a child process, SIGKILL it once its journal (``work/journal.sqlite``) holds
    ``after`` chunks; returns the chunks committed, checked to be at least ``after`` and fewer than ``total``."""
    import os
    import signal
    import subprocess
    import sys
    import time

    journal = work / "journal.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "advface.cli.main", *args],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    while chunks_done(journal) < after:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    done = chunks_done(journal)
    assert after <= done < total, f"killed too late ({done} of {total} chunks done)"
    return done
