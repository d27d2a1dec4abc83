"""Attacker B against encrypted matching: a thief with the database file and a memory dump of the sidecar process,
without the key service. How many enrolled templates (and probes) can they read in plaintext?

Usage (a minute or two; Linux, reads ``/proc/PID/mem`` of its own child)::

    python benchmarks/encrypted_memory_thief.py --templates 200 --probes 200

A child process plays the sidecar's storage path: it opens an :class:`EncryptedSQLiteStore` (public key and binding
key only: no secret key in its memory), and enrols ``--templates`` 128-d float32 templates one call at a time, as
Enroll does, each made fresh for its call (as a protector's output would be), then verifies ``--probes`` fresh
probes against them (``verify_encrypted``; the key service is a stub answering "no match", so that no secret key
is in the child's memory either). With ``caller_zeroes`` the caller overwrites each template's and probe's buffer
after the call, so that what remains comes from the store's own code path. Then it drops its references, collects
garbage and waits; the parent reads every readable and writable mapping of the child (``/proc/PID/maps``,
``/proc/PID/mem``) and the database files, and looks for

- each template and probe as exact float32 values (pairs of neighbouring coordinates, 8-byte aligned, as numpy lays
  them out) and as float64 values (what the gallery converts them to); for probes also the quantised float64
  coefficients the gallery encodes;
- each template column's SEAL plaintext (the CKKS encoding of the column vector holding the coordinate at the
  template's slot, which decodes without any key): its first two 64-bit coefficients.

A template or probe counts as *recovered* when at least half of its 128 coordinates are found exactly (or, for
``plaintexts``, half of its coordinate columns' encodings); ``full`` counts those with every coordinate found.

With ``--service`` a third case runs the sidecar's template service instead of the bare store: a
:class:`~advface.service.TemplateService` (dlib-torch encoder, AdvFace protection on with its defaults) over the same
store, enrolling raw embeddings (numpy arrays, zeroed by the caller after each call, as a careful library caller
does) and verifying probes; the thief then looks for the raw embeddings, the protected templates (computed again in
this process by the same deterministic protector) and the probes. That case covers the service layer with its
protector; what it does not cover is the gRPC transport (protobuf messages and wire buffers, made by grpcio outside
our code, holding each request's raw embedding: docs/encrypted-matching.md says why they cannot be wiped from
Python).
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
import asyncio, gc, sys, time
import numpy as np
from advface.encrypted.keys import generate_keys, new_binding_key
from advface.encrypted.keyservice import VerifyDecision
from advface.encrypted.store import EncryptedSQLiteStore

class NoMatch:
    def verify(self, request):
        return VerifyDecision(False)

n, zero, folder, dim, probes = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], int(sys.argv[5]), int(sys.argv[6])
service_config = sys.argv[7] if len(sys.argv) > 7 else ""
rng = np.random.default_rng(int(sys.argv[4]))
store = EncryptedSQLiteStore(folder + "/templates-encrypted.sqlite3", generate_keys().public, new_binding_key(),
                             dim, "euclidean", integrity_key=b"k" * 32, keyservice=NoMatch(), auto_erase=False)
if service_config:
    from advface.config import load_config
    from advface.service import TemplateService
    svc = TemplateService(load_config(service_config, env={}), store=store)
    add = lambda i, x: asyncio.run(svc.enroll("t", f"subject-{i}", x[0], {}))
    verify = lambda i, x: asyncio.run(svc.verify("t", f"subject-{i % n}", x[0]))
else:
    add = lambda i, x: store.add("t", f"subject-{i}", x)
    verify = lambda i, x: store.verify_encrypted("t", f"subject-{i % n}", x)
for i in range(n):
    x = (rng.standard_normal((1, dim)) * 0.05).astype(np.float32)
    add(i, x)
    if zero:
        x.fill(0)
    del x
for i in range(probes):
    x = (rng.standard_normal((1, dim)) * 0.05).astype(np.float32)
    verify(i, x)
    if zero:
        x.fill(0)
    del x
if service_config:
    svc.close()
else:
    store.close()
gc.collect()
print("ready", flush=True)
time.sleep(3600)
"""

_SERVICE_CONFIG = """
encoder: {name: dlib-torch}
server: {workers: 1}
store: {data_dir: DATA, use_gpu: false}
keys: {auto: false}
"""


def templates(n: int, probes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The templates and probes the child makes (the same random stream)."""
    rng = np.random.default_rng(SEED)
    draw = [(rng.standard_normal((1, DIM)) * 0.05).astype(np.float32) for _ in range(n + probes)]
    return np.concatenate(draw[:n]), np.concatenate(draw[n:]) if probes else np.zeros((0, DIM), np.float32)


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


def _words(data: bytes) -> np.ndarray:
    return np.frombuffer(data[: len(data) // 8 * 8], dtype=np.uint64)


def recovered(data: bytes, t: np.ndarray, extra: np.ndarray | None = None) -> dict[str, int]:
    """Rows of ``t`` found in ``data`` (at least half of the coordinates / all of them, exactly), each coordinate as
    float32 (in 8-byte aligned pairs), as float64, or as the float64 of ``extra`` (same shape: e.g. a probe's
    quantised coefficients)."""
    if len(t) == 0:
        return {"half": 0, "full": 0}
    words = _words(data)
    pairs = np.ascontiguousarray(t).view(np.uint64)  # n x DIM/2: two float32 coordinates per word
    forms = [t.astype(np.float64).view(np.uint64)]  # n x DIM
    if extra is not None:
        forms.append(np.ascontiguousarray(extra, np.float64).view(np.uint64))
    wanted = np.unique(np.concatenate([pairs.ravel(), *(f.ravel() for f in forms)]))
    found = np.unique(words[np.isin(words, wanted)])
    hit = np.repeat(np.isin(pairs, found), 2, axis=1)
    for f in forms:
        hit |= np.isin(f, found)
    coords = hit.sum(axis=1)
    return {"half": int((coords >= DIM // 2).sum()), "full": int((coords == DIM).sum())}


def plaintext_words(t: np.ndarray) -> np.ndarray:
    """``n x DIM x 2``: the first two coefficients of the SEAL plaintext of each template column as the gallery
    encodes it (template ``i`` alone in slot ``i`` of an otherwise zero column, the template scale)."""
    import tenseal.sealapi as seal

    from advface.encrypted.params import CkksParams, make_context

    params = CkksParams()
    context = make_context(params)
    encoder = seal.CKKSEncoder(context)
    out = np.zeros((len(t), DIM, 2), np.uint64)
    for i, row in enumerate(t.astype(np.float64)):
        for j, value in enumerate(row.tolist()):
            vec = [0.0] * params.slots
            vec[i % params.slots] = value
            plain = seal.Plaintext()
            encoder.encode(vec, context.first_parms_id(), params.template_scale, plain)
            out[i, j] = (plain.data(0), plain.data(1))
    return out


def plaintexts_recovered(data: bytes, words: np.ndarray) -> dict[str, int]:
    """Templates of which at least half (all) of the coordinate columns' plaintexts are found in ``data``."""
    found = np.isin(words, _words(data)).any(axis=2).sum(axis=1)
    return {"half": int((found >= DIM // 2).sum()), "full": int((found == DIM).sum())}


def probe_coefficients(p: np.ndarray) -> np.ndarray:
    """The quantised probe coefficients the Euclidean gallery encodes (``round(2 p 2^19) / 2^19``)."""
    from advface.encrypted.params import CkksParams

    scale = CkksParams().probe_scale
    return np.round(2.0 * p.astype(np.float64) * scale) / scale


def service_config(folder: Path) -> Path:
    """The service case's configuration file (AdvFace protection on with its defaults)."""
    path = folder / "advface.yaml"
    path.write_text(_SERVICE_CONFIG.replace("DATA", str(folder / "data")))
    return path


def protected_templates(raw: np.ndarray, config_path: Path) -> np.ndarray:
    """What the service stores for ``raw``: the same protector, rebuilt here (AdvFace is deterministic per row)."""
    from advface.config import load_config
    from advface.encoders import create_encoder
    from advface.service.protection import build_protector

    config = load_config(config_path, env={})
    protector = build_protector(config.protection, create_encoder(config.encoder.name))
    assert protector is not None
    return np.ascontiguousarray(protector.protect(raw), dtype=np.float32)


def run_case(n: int, probes: int, caller_zeroes: bool, folder: Path, service: bool = False) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    config = service_config(folder) if service else None
    command = [
        sys.executable,
        "-c",
        _CHILD,
        str(n),
        "1" if caller_zeroes else "0",
        str(folder),
        str(SEED),
        str(DIM),
        str(probes),
        *([str(config)] if config else []),
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"ready":
            raise RuntimeError("the child process failed")
        memory = read_memory(child.pid)
    finally:
        child.kill()
        child.wait()
    database = b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".yaml")
    raw, p = templates(n, probes)
    t = protected_templates(raw, config) if config else raw
    words = plaintext_words(t)
    extra = {"memory_raw_recovered": recovered(memory, raw)} if config else {}
    return {
        "case": "template service (AdvFace on)" if config else "store",
        "caller_zeroes": caller_zeroes,
        "templates": n,
        "probes": probes,
        "memory_mb": round(len(memory) / 1e6, 1),
        "memory_recovered": recovered(memory, t),
        "memory_plaintexts_recovered": plaintexts_recovered(memory, words),
        "memory_probes_recovered": recovered(memory, p, probe_coefficients(p)),
        "database_mb": round(len(database) / 1e6, 1),
        "database_recovered": recovered(database, t),
        "database_plaintexts_recovered": plaintexts_recovered(database, words),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templates", type=int, default=200)
    parser.add_argument("--probes", type=int, default=0, help="probes verified after the enrolment (default 0)")
    parser.add_argument("--service", action="store_true", help="add the template-service case (module docs)")
    parser.add_argument("--only-service", action="store_true", help="run the template-service case alone")
    parser.add_argument("--out", help="results file (default benchmarks/results/encrypted_memory_thief.json)")
    args = parser.parse_args(argv)
    runs = [] if args.only_service else [(False, False), (True, False)]
    if args.service or args.only_service:
        runs.append((True, True))
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for zero, service in runs:
            folder = Path(tmp) / f"zero-{int(zero)}-service-{int(service)}"
            case = run_case(args.templates, args.probes, zero, folder, service)
            print(case, flush=True)
            cases.append(case)
    payload = {
        "attacker": "database file + memory dump of the sidecar's storage path, no key service",
        "dim": DIM,
        "recovered_means": "at least half (half) / all (full) of a template's (probe's) coordinates found as exact "
        "float32 or float64 values (probes: or their quantised coefficients); plaintexts: of its coordinate columns' "
        "SEAL plaintext encodings",
        "cases": cases,
    }
    print("wrote", write_results("encrypted_memory_thief", payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
