"""Identification at scale: top-k search latency of the SQLite + faiss template store with 10k and 1M templates.

Usage::

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/identify_scale.py --sizes 10000 1000000

For each size a store (``SQLiteFaissStore``, one tenant, one template per subject) is filled through ``add_many``
with synthetic dlib-like templates (``benchmarks/face_vectors.py``: a Gaussian identity model fit on cached LFW dlib
embeddings). Then, for each index kind (``flat``: exact; ``ivf``: the approximate ``store.index: ivf`` option), a
fresh process opens the store (the index is rebuilt from SQLite, as at server start) and runs ``--queries`` top-k
searches one at a time, each a new photo of a stored identity: latency p50/p99, open time, peak RSS of that process
(``VmHWM``), recall@k of the IVF lists against the exact ones (subject-level) and rank-1 identification rate.
Timings are of :meth:`SQLiteFaissStore.search` (what ``Identify`` runs after parsing the request).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.store.sqlite_faiss import IndexOptions, SQLiteFaissStore  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.face_vectors import SyntheticFaces  # noqa: E402

TENANT = "bench"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "max_ms": round(float(ms.max()), 3),
    }


def build(db: Path, size: int, batch: int, seed: int) -> dict[str, Any]:
    """Fill a new store with ``size`` subjects (one template each); saves the identity centres for probes."""
    from tqdm import tqdm

    model, _ = SyntheticFaces.load()
    rng = np.random.default_rng(seed)
    centres = model.centres(size, rng)
    np.save(db.with_suffix(".centres.npy"), centres)
    started = time.perf_counter()
    with SQLiteFaissStore(db, 128, "euclidean", use_gpu=False, index=IndexOptions("flat")) as store:
        for start in tqdm(range(0, size, batch), desc=f"insert {size}", unit="batch", file=sys.stderr):
            stop = min(start + batch, size)
            photos = model.photos(centres[start:stop], rng)
            store.add_many(TENANT, [(f"s{start + i:08d}", photos[i : i + 1], None) for i in range(stop - start)])
        count = store.count(TENANT)
    seconds = time.perf_counter() - started
    return {
        "templates": count,
        "insert_seconds": round(seconds, 1),
        "insert_per_second": round(count / seconds),
        "database_mib": round(db.stat().st_size / 2**20, 1),
        "vectors": model.source,
    }


def measure(db: Path, kind: str, queries: int, k: int, seed: int, nprobe: int, min_rows: int) -> dict[str, Any]:
    """Open the store with index ``kind`` and time ``queries`` searches (run in a fresh process)."""
    model, _ = SyntheticFaces.load()
    centres = np.load(db.with_suffix(".centres.npy"))
    rng = np.random.default_rng(seed + 1)
    targets = rng.choice(len(centres), size=queries, replace=False)
    probes = model.photos(centres[targets], rng)
    rss_before = _status_kib("VmRSS")
    started = time.perf_counter()
    store = SQLiteFaissStore(
        db, 128, "euclidean", use_gpu=False, index=IndexOptions(kind, min_rows=min_rows, nprobe=nprobe)
    )
    open_seconds = time.perf_counter() - started
    try:
        for probe in probes[: min(20, queries)]:  # warm-up
            store.search(TENANT, probe, k)
        times, cpu_times, results = [], [], []
        for probe in probes:
            t0, c0 = time.perf_counter(), time.thread_time()
            matches = store.search(TENANT, probe, k)
            cpu_times.append(time.thread_time() - c0)
            times.append(time.perf_counter() - t0)
            results.append([m.subject_id for m in matches])
        kind_used = store.index_kind(TENANT)
        rss_open = _status_kib("VmRSS") - rss_before
    finally:
        store.close()
    rank1 = float(np.mean([r[:1] == [f"s{t:08d}"] for r, t in zip(results, targets)]))
    return {
        "index": kind_used,
        "nprobe": nprobe if kind_used == "ivf" else None,
        "open_seconds": round(open_seconds, 2),
        "latency": _percentiles(times),
        # CPU time of the searching thread: what a query costs on a core of its own (the machine is shared)
        "cpu_time": _percentiles(cpu_times),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "queries": queries,
        "rank1_identification_rate": round(rank1, 4),
        "rss_mib_open": round(rss_open / 1024, 1),
        "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
        "results": results,
    }


def _child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument(
        "--min-rows",
        type=int,
        default=IndexOptions().min_rows,
        help="store.ivf_min_rows: smaller tenants are searched exactly",
    )
    parser.add_argument("--batch", type=int, default=50_000, help="templates per add_many call")
    parser.add_argument("--work-dir", help="where the stores are built (default: a temporary folder, removed)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the stores in --work-dir and reuse them on the next run (same sizes and seed)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one phase in its own process, so its peak RSS is its own
        what, db = args.child[0], Path(args.child[1])
        if what == "build":
            out = build(db, int(args.child[2]), args.batch, args.seed)
        else:
            out = measure(db, what, args.queries, args.k, args.seed, int(args.child[2]), args.min_rows)
        print(json.dumps(out))
        return

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="advface-identify-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for size in args.sizes:
            db = work / f"store-{size}.sqlite3"
            built_file = db.with_suffix(".build.json")
            if args.reuse and built_file.is_file() and db.with_suffix(".centres.npy").is_file():
                built = {**json.loads(built_file.read_text()), "reused": True}
            else:
                for path in work.glob(f"store-{size}.*"):
                    path.unlink()
                print(f"building {size} templates...", file=sys.stderr, flush=True)
                built = _child(
                    ["--batch", str(args.batch), "--seed", str(args.seed), "--child", "build", str(db), str(size)]
                )
                built_file.write_text(json.dumps(built))
            common = [
                "--queries",
                str(args.queries),
                "--k",
                str(args.k),
                "--seed",
                str(args.seed),
                "--min-rows",
                str(args.min_rows),
            ]
            exact = _child([*common, "--child", "flat", str(db), str(IndexOptions().nprobe)])
            run: dict[str, Any] = {"templates": size, "build": built, "flat": exact, "ivf": []}
            print(
                f"{size}: flat p50 {exact['latency']['p50_ms']} ms p99 {exact['latency']['p99_ms']} ms",
                file=sys.stderr,
                flush=True,
            )
            for nprobe in args.nprobe:
                approx = _child([*common, "--child", "ivf", str(db), str(nprobe)])
                recall = np.mean(
                    [len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(approx["results"], exact["results"])]
                )
                approx["recall_at_k_vs_exact"] = round(float(recall), 4)
                del approx["results"]
                run["ivf"].append(approx)
                print(
                    f"{size}: {approx['index']} nprobe {nprobe} p50 {approx['latency']['p50_ms']} ms "
                    f"p99 {approx['latency']['p99_ms']} ms recall {recall:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
            del exact["results"]
            runs.append(run)
            if not args.reuse:
                for path in work.glob(f"store-{size}.*"):
                    path.unlink()
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    target_ms = 20.0
    largest = max(runs, key=lambda r: r["templates"])
    default_nprobe = IndexOptions().nprobe
    default_run = next((r for r in largest["ivf"] if r["nprobe"] == default_nprobe), None)
    payload = {
        "benchmark": "identify_scale",
        "k": args.k,
        "store": "SQLiteFaissStore (SQLite WAL + faiss), one tenant, one template per subject, euclidean",
        "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "nice": os.nice(0),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "shared_machine": True,
        "ivf_min_rows": args.min_rows,
        "runs": runs,
        "target": {
            "identify_top10_p99_ms_at_1M": target_ms,
            "templates": largest["templates"],
            "flat_p99_ms": largest["flat"]["latency"]["p99_ms"],
            "flat_met": largest["flat"]["latency"]["p99_ms"] <= target_ms,
            "default_ivf_nprobe": default_nprobe,
            "ivf_p99_ms": default_run["latency"]["p99_ms"] if default_run else None,
            "ivf_cpu_p99_ms": default_run["cpu_time"]["p99_ms"] if default_run else None,
            "ivf_recall_at_k": default_run["recall_at_k_vs_exact"] if default_run else None,
            "ivf_met": bool(default_run and default_run["latency"]["p99_ms"] <= target_ms),
        },
    }
    path = write_results("identify_scale", payload, args.out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
