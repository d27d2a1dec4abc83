"""Attacker B against encrypted matching: a thief with the database file and a memory dump of the sidecar process,
without the key service. How many enrolled templates can they read in plaintext?

Usage (a minute or two; Linux, reads ``/proc/PID/mem`` of its own child)::

    python benchmarks/encrypted_memory_thief.py --templates 200

A child process plays the sidecar's storage path: it opens an :class:`EncryptedSQLiteStore` (public key and binding
key only: no secret key in its memory), and enrols ``--templates`` 128-d float32 templates one call at a time, as
Enroll does, each made fresh for its call (as a protector's output would be). With ``caller_zeroes`` the caller
overwrites each template's buffer after the call, so that what remains comes from the store's own code path. Then
it drops its references, collects garbage and waits; the parent reads every readable and writable mapping of the
child (``/proc/PID/maps``, ``/proc/PID/mem``) and the database files, and looks for each template as exact
float32 values (pairs of neighbouring coordinates, 8-byte aligned, as numpy lays them out) and as float64 values
(what the gallery converts them to). A template counts as *recovered* when at least half of its 128 coordinates are
found exactly; ``full`` counts templates with every coordinate found.

What it does not cover: the rest of the sidecar (gRPC buffers, the protector's tensors, image decoding), which
hold the raw and protected vectors of recent requests as well, so the numbers are a lower bound for a real sidecar.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_results  # noqa: E402

DIM = 128
SEED = 7

_CHILD = r"""
import gc, sys, tempfile, time
import numpy as np
from advface.encrypted.keys import generate_keys, new_binding_key
from advface.encrypted.store import EncryptedSQLiteStore

n, zero, folder = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
rng = np.random.default_rng(int(sys.argv[4]))
store = EncryptedSQLiteStore(folder + "/templates-encrypted.sqlite3", generate_keys().public, new_binding_key(),
                             int(sys.argv[5]), "euclidean", integrity_key=b"k" * 32)
for i in range(n):
    x = (rng.standard_normal((1, int(sys.argv[5]))) * 0.05).astype(np.float32)
    store.add("t", f"subject-{i}", x)
    if zero:
        x.fill(0)
    del x
store.close()
gc.collect()
print("ready", flush=True)
time.sleep(3600)
"""


def templates(n: int) -> np.ndarray:
    """The templates the child enrols (the same random stream)."""
    rng = np.random.default_rng(SEED)
    return np.concatenate([(rng.standard_normal((1, DIM)) * 0.05).astype(np.float32) for _ in range(n)])


def read_memory(pid: int) -> bytes:
    """Every readable and writable mapping of process ``pid``."""
    parts = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            match = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            if match is None or "r" not in match[3] or "w" not in match[3]:
                continue
            try:
                mem.seek(int(match[1], 16))
                parts.append(mem.read(int(match[2], 16) - int(match[1], 16)))
            except (OSError, ValueError):
                continue
    return b"".join(parts)


def recovered(data: bytes, t: np.ndarray) -> dict[str, int]:
    """Templates of ``t`` found in ``data`` (at least half of the coordinates / all of them, exactly)."""
    words = np.frombuffer(data[: len(data) // 8 * 8], dtype=np.uint64)
    pairs = np.ascontiguousarray(t).view(np.uint64)  # n x DIM/2: two float32 coordinates per word
    doubles = t.astype(np.float64).view(np.uint64)  # n x DIM
    wanted = np.unique(np.concatenate([pairs.ravel(), doubles.ravel()]))
    found = np.unique(words[np.isin(words, wanted)])
    coords = np.maximum(np.repeat(np.isin(pairs, found), 2, axis=1), np.isin(doubles, found)).sum(axis=1)
    return {"half": int((coords >= DIM // 2).sum()), "full": int((coords == DIM).sum())}


def run_case(n: int, caller_zeroes: bool, folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", _CHILD, str(n), "1" if caller_zeroes else "0", str(folder), str(SEED), str(DIM)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"ready":
            raise RuntimeError("the child process failed")
        memory = read_memory(child.pid)
    finally:
        child.kill()
        child.wait()
    database = b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())
    t = templates(n)
    return {
        "caller_zeroes": caller_zeroes,
        "templates": n,
        "memory_mb": round(len(memory) / 1e6, 1),
        "memory_recovered": recovered(memory, t),
        "database_mb": round(len(database) / 1e6, 1),
        "database_recovered": recovered(database, t),
    }


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templates", type=int, default=200)
    parser.add_argument("--out", help="results file (default benchmarks/results/encrypted_memory_thief.json)")
    args = parser.parse_args(argv)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for zero in (False, True):
            case = run_case(args.templates, zero, Path(tmp) / f"zero-{int(zero)}")
            print(case, flush=True)
            cases.append(case)
    payload = {
        "attacker": "database file + memory dump of the sidecar's storage path, no key service",
        "dim": DIM,
        "recovered_means": "at least half (half) / all (full) of a template's coordinates found as exact float32 "
        "or float64 values",
        "cases": cases,
    }
    print("wrote", write_results("encrypted_memory_thief", payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
