"""Re-encoding at scale: throughput of the local and Ray engines, peak memory of a 1M-template streaming pass.

Usage (about 20 minutes on 2 shared CPU cores)::

    python benchmarks/reencode_scale.py --templates 1000000 --sample 2000

1. Builds ``--templates`` synthetic-but-realistic dlib templates in a Parquet file (cached): real LFW dlib
   embeddings from the benchmark cache (``~/.cache/advface/pairs/*.npz``, built by ``benchmarks/advface_lfw.py``),
   each copy perturbed by Gaussian noise of ``--noise`` x its norm / sqrt(D) and rescaled to its norm; without the
   cache, clustered random vectors with dlib-like norms (reported as such).
2. Throughput with full protection (shipped dlib shadow, default parameters) on the first ``--sample`` templates:
   local engine (one process, torch on ``--local-threads`` threads) and Ray engine (local Ray, ``--ray-cpus``
   single-thread actors), both through the full pipeline (read, protect, part files, journal, write, verify).
3. Peak RSS of a full streaming pass over all templates (and over a tenth of them, to show it does not grow with
   size) in a child process, protection with ``steps=0`` (random start only): **plumbing only**, not protection
   throughput -- the real protection of 1M templates takes hours on 2 cores.

Writes ``benchmarks/results/reencode_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.paths import cache_dir  # noqa: E402
from advface.protect.advface import AdvFaceConfig  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

DIM = 128
TARGET_PER_HOUR = 100_000_000


def lfw_embeddings() -> tuple[np.ndarray | None, str]:
    """Real LFW dlib embeddings (unflipped photos) from the benchmark cache, or None."""
    for path in sorted((cache_dir() / "pairs").glob("*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            if "embeddings" in npz and "flipped" in npz and npz["embeddings"].shape[1] == DIM:
                return npz["embeddings"][~npz["flipped"]].astype(np.float32), str(path)
    return None, "none"


def build_dataset(path: Path, n: int, noise: float, seed: int = 0) -> dict[str, Any]:
    """Write ``n`` synthetic templates to ``path`` (Parquet, id + embedding) unless already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, origin = lfw_embeddings()
    kind = "perturbed LFW dlib embeddings" if base is not None else "clustered random vectors (no LFW cache)"
    info = {"templates": n, "kind": kind, "base": origin, "noise": noise, "path": str(path)}
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == n:
        return info | {"cached": True}
    rng = np.random.default_rng(seed)
    if base is None:
        centres = rng.standard_normal((5000, DIM))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        base = (centres * rng.uniform(0.55, 0.65, (5000, 1))).astype(np.float32)
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, n, 65536):
            m = min(65536, n - start)
            rows = base[rng.integers(0, len(base), m)].astype(np.float64)
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows + noise * norms / np.sqrt(DIM) * rng.standard_normal(rows.shape)
            rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True) * norms).astype(np.float32)
            offsets = pa.array(np.arange(0, (m + 1) * DIM, DIM, dtype=np.int32))
            vec = pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))
            ids = pa.array([f"synthetic-{i:09d}" for i in range(start, start + m)], pa.string())
            writer.write_table(pa.Table.from_arrays([ids, vec], schema=schema))
    os.replace(tmp, path)
    return info | {"cached": False}


def head(path: Path, out: Path, n: int) -> Path:
    """The first ``n`` rows of ``path`` as a Parquet file."""
    import pyarrow.parquet as pq

    batch = next(pq.ParquetFile(path).iter_batches(batch_size=n))
    pq.write_table(pa_table(batch), out)
    return out


def pa_table(batch: Any) -> Any:
    import pyarrow as pa

    return pa.Table.from_batches([batch])


def child_pass(source: Path, dest: Path, extra: list[str]) -> dict[str, Any]:
    """Run ``advface reencode`` in a child process; its wall time and peak RSS (GNU time)."""
    for p in (dest, dest.with_name(dest.name + ".verify.json")):
        p.unlink(missing_ok=True)
    cmd = [
        "/usr/bin/time",
        "-f",
        "MAXRSS_KB=%M",
        sys.executable,
        "-m",
        "advface.cli.main",
        "reencode",
        "--source",
        f"parquet:{source}",
        "--dest",
        f"parquet:{dest}",
        "--restart",
        "-q",
        *extra,
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-3000:]}")
    rss_kb = int(next(line.split("=")[1] for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB=")))
    summary = json.loads(dest.with_name(dest.name + ".verify.json").read_text())
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(rss_kb / 1024, 1),
        "verified": summary["passed"],
        "protect_seconds": summary["reencode"]["protect_seconds"],
        "verify_seconds": summary["seconds"],
        "command": " ".join(cmd[3:]),
    }


def engine_run(source: Path, dest: Path, engine: str, cpus: int, threads: int, chunk: int) -> dict[str, Any]:
    """Full protection of ``source`` with one engine, in this process."""
    import torch

    from advface.cli.main import build_parser
    from advface.cli.reencode import build_job

    torch.set_num_threads(threads)
    for p in (dest, dest.with_name(dest.name + ".verify.json")):
        p.unlink(missing_ok=True)
    args = build_parser().parse_args(
        [
            "reencode",
            "--source",
            f"parquet:{source}",
            "--dest",
            f"parquet:{dest}",
            "--engine",
            engine,
            "--num-cpus",
            str(cpus),
            "--chunk-size",
            str(chunk),
            "--restart",
        ]
    )
    started = time.perf_counter()
    summary = build_job(args).run()
    seconds = time.perf_counter() - started
    r = summary["reencode"]
    return {
        "engine": engine,
        "workers": cpus if engine == "ray" else 1,
        "torch_threads": 1 if engine == "ray" else threads,
        "templates": r["templates"],
        "protect_seconds": r["protect_seconds"],
        "templates_per_second": r["templates_per_second"],
        "total_seconds": round(seconds, 1),
        "verified": summary["passed"],
        "rel_l2_max": summary["rel_l2_max"],
        "match_fraction": summary["matching"].get("match_fraction"),
    }


def compare_outputs(a: Path, b: Path) -> dict[str, Any]:
    """Rows whose vectors differ between two re-encoded Parquet files (same ids in the same order)."""
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    if ta.column("id").to_pylist() != tb.column("id").to_pylist():
        return {"same_ids": False}
    va = np.asarray(ta.column("embedding").to_pylist(), np.float64)
    vb = np.asarray(tb.column("embedding").to_pylist(), np.float64)
    diff = np.abs(va - vb).max(axis=1)
    return {
        "same_ids": True,
        "rows": len(va),
        "rows_differing": int((diff > 0).sum()),
        "max_abs_difference": float(diff.max()) if len(diff) else 0.0,
    }


def main() -> None:
    """Run the benchmark and write benchmarks/results/reencode_scale.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--templates", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=2000, help="templates protected per engine (full protection)")
    parser.add_argument("--noise", type=float, default=0.3, help="relative noise of the synthetic copies")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--plumbing-chunk-size", type=int, default=4096)
    parser.add_argument("--local-threads", type=int, default=2)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--workdir", default=str(cache_dir() / "reencode_scale"))
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--shared-machine", action="store_true", help="record that other jobs shared the CPU")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    data = build_dataset(work / f"templates-{args.templates}.parquet", args.templates, args.noise)
    print(f"dataset: {data}", file=sys.stderr)
    full = Path(data["path"])
    tenth = head(full, work / "tenth.parquet", max(args.templates // 10, 1))

    plumbing = {
        "note": "plumbing only: --steps 0 (random start, no shadow ascent); measures streaming I/O, "
        "journal, part files, final write and verification, not protection speed"
    }
    for name, src in (("tenth", tenth), ("full", full)):
        plumbing[name] = child_pass(
            src, work / f"plumbing-{name}.parquet", ["--steps", "0", "--chunk-size", str(args.plumbing_chunk_size)]
        )
        plumbing[name]["templates"] = args.templates // 10 if name == "tenth" else args.templates
        print(f"plumbing {name}: {plumbing[name]}", file=sys.stderr)
        (work / f"plumbing-{name}.parquet").unlink(missing_ok=True)

    throughput: list[dict[str, Any]] = []
    identical = None
    if not args.skip_throughput:
        sample = head(full, work / "sample.parquet", args.sample)
        outs = {}
        for engine in ("local", "ray"):
            outs[engine] = work / f"sample-{engine}.parquet"
            row = engine_run(sample, outs[engine], engine, args.ray_cpus, args.local_threads, args.chunk_size)
            throughput.append(row)
            print(f"throughput: {row}", file=sys.stderr)
        identical = outs["local"].read_bytes() == outs["ray"].read_bytes()
        differing = compare_outputs(outs["local"], outs["ray"])

    # per CPU core: a worker with 2 torch threads occupies 2 cores
    per_core = {
        r["engine"]: round(r["templates_per_second"] / (r["workers"] * r["torch_threads"]), 3) for r in throughput
    }
    best = max(per_core.values(), default=None)
    estimate = None
    if best:
        need = TARGET_PER_HOUR / 3600
        estimate = {
            "target_templates_per_second": round(need, 1),
            "best_measured_per_core": round(best, 3),
            "cpu_cores_needed": int(np.ceil(need / best)),
            "gpu": "not measured (no GPU in this session)",
        }
    write_results(
        "reencode_scale",
        {
            "dataset": data,
            "plumbing_peak_memory": plumbing,
            "throughput_full_protection": throughput,
            "per_core_templates_per_second": per_core,
            "local_and_ray_outputs_byte_identical": identical,
            "local_vs_ray_rows": differing if not args.skip_throughput else None,
            "estimate_100M_in_1h": estimate,
            "protection": f"shipped dlib shadow, AdvFaceConfig defaults (steps {AdvFaceConfig.steps}, "
            f"rel_l2 {AdvFaceConfig.rel_l2}, lanes {AdvFaceConfig.lanes})",
            "machine_shared": args.shared_machine,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "maxrss_self_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
