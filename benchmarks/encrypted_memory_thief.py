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

Reading the memory and counting what is recovered are the library's (:mod:`advface.audit.memory_dump`,
:mod:`advface.audit.recovered`), which the audit's encrypted-matching scenario (``advface audit --matching
encrypted``) uses too.

With ``--service`` a third case runs the sidecar's template service instead of the bare store: a
:class:`~advface.service.TemplateService` (dlib-torch encoder, AdvFace protection on with its defaults) over the same
store, enrolling raw embeddings (numpy arrays, zeroed by the caller after each call, as a careful library caller
does) and verifying probes; the thief then looks for the raw embeddings, the protected templates (computed again in
this process by the same deterministic protector) and the probes. That case covers the service layer with its
protector; the gRPC transport above it (protobuf messages and wire buffers, made by grpcio outside our code) is the
``--grpc`` case's.

With ``--grpc`` a case runs the real sidecar below its transport: the child serves the AdvFace gRPC API
(``server.app.Sidecar``, as ``advface serve`` builds it, on a loopback port; the same configuration, store and stub
key service as ``--service``) and this process is the client, enrolling the raw embeddings and verifying the probes
through ``advface.client.AdvFaceClient`` (nothing is zeroed by hand: the request objects are grpcio's). The thief
dumps the sidecar three times: serving (idle after the last call), serving after a ``malloc_trim(0)`` (glibc hands
free pages back, which then read as zeros), and after the sidecar stopped (worker threads gone, store closed).

``--locate`` prints (and stores under ``located``) where each recovered copy lies: its addresses, the mapping of
``/proc/PID/maps`` and, when the mapping holds a live thread's stack pointer, that thread; the form (float32 or
float64); and, when ``gdb`` is installed, which thread's vector registers (zmm0-zmm31) hold template, probe or raw
values. A diagnostic (slower: each mapping is searched on its own).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.audit.memory_dump import read_memory  # noqa: E402
from advface.audit.recovered import (  # noqa: E402
    WordIndex,
    forms,
    plaintext_words,
    plaintexts_recovered,
    probe_coefficients,
    recovered,
)
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


_GRPC_CHILD = r"""
import asyncio, ctypes, gc, sys, threading
from advface.config import load_config
from advface.encrypted.keys import generate_keys, new_binding_key
from advface.encrypted.keyservice import VerifyDecision
from advface.encrypted.store import EncryptedSQLiteStore
from advface.service import TemplateService
from server.app import Sidecar
from server.servicer import AdvFaceServicer

class NoMatch:
    def verify(self, request):
        return VerifyDecision(False)

folder, dim, config = sys.argv[1], int(sys.argv[2]), load_config(sys.argv[3], env={})
store = EncryptedSQLiteStore(folder + "/templates-encrypted.sqlite3", generate_keys().public, new_binding_key(),
                             dim, "euclidean", integrity_key=b"k" * 32, keyservice=NoMatch(), auto_erase=False)
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()

async def start():
    sidecar = Sidecar(config, servicer=AdvFaceServicer(config, service=TemplateService(config, store=store)))
    await sidecar.start()
    return sidecar

sidecar = asyncio.run_coroutine_threadsafe(start(), loop).result()
print("port", sidecar.port, flush=True)
for line in sys.stdin:  # "dump", "trim" (malloc_trim first) or "stop" (the sidecar stops first); then "ready"
    if line.strip() == "trim":
        ctypes.CDLL(None).malloc_trim(0)
    elif line.strip() == "stop":
        asyncio.run_coroutine_threadsafe(sidecar.stop(0), loop).result()
    gc.collect()
    print("ready", flush=True)
"""

_GRPC_CONFIG = """
server: {host: 127.0.0.1, port: 0}
metrics: {enabled: false}
"""

#: the gRPC case's dumps: (what the child does first, the case's name)
_GRPC_DUMPS = (
    ("dump", "gRPC sidecar (AdvFace on): serving"),
    ("trim", "gRPC sidecar (AdvFace on): serving, after malloc_trim(0)"),
    ("stop", "gRPC sidecar (AdvFace on): stopped"),
)


def templates(n: int, probes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The templates and probes the child makes (the same random stream)."""
    rng = np.random.default_rng(SEED)
    draw = [(rng.standard_normal((1, DIM)) * 0.05).astype(np.float32) for _ in range(n + probes)]
    return np.concatenate(draw[:n]), np.concatenate(draw[n:]) if probes else np.zeros((0, DIM), np.float32)


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


def run_case(
    n: int, probes: int, caller_zeroes: bool, folder: Path, service: bool = False, locate: bool = False
) -> dict[str, Any]:
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
        snapshot = _snapshot(child.pid) if locate else None
    finally:
        child.kill()
        child.wait()
    database = b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".yaml")
    memory_mb, database_mb = round(len(memory) / 1e6, 1), round(len(database) / 1e6, 1)
    raw, p = templates(n, probes)
    t = protected_templates(raw, config) if config else raw
    words = plaintext_words(t)
    wanted = (*forms(raw), *forms(t), *forms(p, (probe_coefficients(p),)), words)
    mem, db = WordIndex(memory).narrowed(*wanted), WordIndex(database).narrowed(*wanted)  # one pass each
    del memory, database
    extra: dict[str, Any] = {"memory_raw_recovered": recovered(mem, raw)} if config else {}
    if snapshot is not None:
        extra["located"] = _locate(snapshot, {"raw": raw, "template": t, "probe": p}, probe_coefficients(p))
    return {
        "case": "template service (AdvFace on)" if config else "store",
        "caller_zeroes": caller_zeroes,
        "templates": n,
        "probes": probes,
        "memory_mb": memory_mb,
        "memory_recovered": recovered(mem, t),
        "memory_plaintexts_recovered": plaintexts_recovered(mem, words),
        "memory_probes_recovered": recovered(mem, p, probe_coefficients(p)),
        "database_mb": database_mb,
        "database_recovered": recovered(db, t),
        "database_plaintexts_recovered": plaintexts_recovered(db, words),
        **extra,
    }


def run_grpc_case(n: int, probes: int, folder: Path, locate: bool = False) -> list[dict[str, Any]]:
    """The ``--grpc`` case (module docs): one sidecar child, three dumps; one result per dump."""
    from advface.client import AdvFaceClient

    folder.mkdir(parents=True, exist_ok=True)
    config = service_config(folder)
    config.write_text(config.read_text() + _GRPC_CONFIG)
    raw, p = templates(n, probes)
    command = [sys.executable, "-c", _GRPC_CHILD, str(folder), str(DIM), str(config)]
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
    dumps: list[tuple[str, bytes, Any]] = []
    try:
        assert child.stdin is not None and child.stdout is not None
        line = child.stdout.readline().split()
        if line[:1] != ["port"]:
            raise RuntimeError("the sidecar child failed to start")
        with AdvFaceClient(f"127.0.0.1:{line[1]}", timeout=600.0) as client:
            for i in range(n):
                client.enroll(f"subject-{i}", embedding=raw[i])
            for i in range(probes):
                client.verify(f"subject-{i % n}", embedding=p[i])
        for step, name in _GRPC_DUMPS:
            child.stdin.write(step + "\n")
            child.stdin.flush()
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the sidecar child failed at {step!r}")
            dumps.append((name, read_memory(child.pid), _snapshot(child.pid) if locate else None))
    finally:
        child.kill()
        child.wait()
    database = b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".yaml")
    t = protected_templates(raw, config)
    words = plaintext_words(t)
    coefficients = probe_coefficients(p)
    wanted = (*forms(raw), *forms(t), *forms(p, (coefficients,)), words)
    db = WordIndex(database).narrowed(*wanted)
    cases = []
    for name, memory, snapshot in dumps:
        mem = WordIndex(memory).narrowed(*wanted)
        case: dict[str, Any] = {
            "case": name,
            "caller_zeroes": None,  # the caller is another process; the sidecar's request objects are grpcio's
            "templates": n,
            "probes": probes,
            "memory_mb": round(len(memory) / 1e6, 1),
            "memory_recovered": recovered(mem, t),
            "memory_plaintexts_recovered": plaintexts_recovered(mem, words),
            "memory_probes_recovered": recovered(mem, p, coefficients),
            "database_mb": round(len(database) / 1e6, 1),
            "database_recovered": recovered(db, t),
            "database_plaintexts_recovered": plaintexts_recovered(db, words),
            "memory_raw_recovered": recovered(mem, raw),
        }
        if snapshot is not None:
            case["located"] = _locate(snapshot, {"raw": raw, "template": t, "probe": p}, coefficients)
        cases.append(case)
    return cases


# ---------------------------------------------------------------------- --locate (a diagnostic)


def _snapshot(pid: int) -> dict[str, Any]:
    """What :func:`_locate` needs of a live process: each readable and writable mapping (address, line, bytes), each
    thread's stack pointer (``/proc/PID/task/TID/syscall``) and, with gdb, its vector registers."""
    import re
    import shutil

    mappings = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            match = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            if match is None or "r" not in match[3] or "w" not in match[3]:
                continue
            start, stop = int(match[1], 16), int(match[2], 16)
            try:
                mem.seek(start)
                mappings.append((start, stop, line.strip(), mem.read(stop - start)))
            except (OSError, ValueError, OverflowError):
                continue
    stacks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "syscall").read_text().split()
        if len(fields) >= 3 and fields[0] != "running":
            stacks[int(task.name)] = int(fields[-2], 16)
    registers: dict[tuple[int, str], list[int]] | str = "gdb not installed"
    if shutil.which("gdb"):
        out = subprocess.run(
            ["gdb", "-p", str(pid), "-batch", "-ex", "set pagination off"]
            + [arg for i in range(32) for arg in ("-ex", f"thread apply all p/x $zmm{i}.v8_int64")],
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
        registers = _parse_registers(out)
    return {"mappings": mappings, "stacks": stacks, "registers": registers}


def _parse_registers(out: str) -> dict[tuple[int, str], list[int]]:
    """``(thread id, register) -> its eight 64-bit words`` from gdb's ``thread apply all p/x $zmmN.v8_int64`` output
    (one command per register, in order, each printing every thread)."""
    import re

    registers: dict[tuple[int, str], list[int]] = {}
    tid, index, seen = 0, -1, set[int]()
    for line in out.splitlines():
        match = re.match(r"Thread \S+ \(Thread \S+ \(LWP (\d+)\)", line)
        if match:
            tid = int(match[1])
            if tid in seen or index < 0:  # the first thread again: the next register
                index, seen = index + 1, set()
            seen.add(tid)
            continue
        match = re.match(r"\$\d+ = \{(.*)\}", line)
        if match and index >= 0:
            registers[(tid, f"zmm{index}")] = [int(word, 16) for word in match[1].split(", ")]
    return registers


def _locate(snapshot: dict[str, Any], rows: dict[str, np.ndarray], coefficients: np.ndarray) -> list[str]:
    """Where copies of ``rows`` (at least 8 coordinates of one row in one mapping or register) are, one line each."""
    table: dict[int, tuple[str, int, str]] = {}
    for what, values in rows.items():
        for i, row in enumerate(values):
            for word in np.ascontiguousarray(row, np.float32).view(np.uint64).tolist():
                table[word] = (what, i, "float32")
            for word in np.ascontiguousarray(row, np.float64).view(np.uint64).tolist():
                table.setdefault(word, (what, i, "float64"))
    for i, row in enumerate(coefficients):
        for word in np.ascontiguousarray(row, np.float64).view(np.uint64).tolist():
            table.setdefault(word, ("probe", i, "quantised coefficient"))
    wanted = np.array(sorted(table), np.uint64)
    lines = []
    for start, stop, line, data in snapshot["mappings"]:
        words = np.frombuffer(data, np.uint64, count=len(data) // 8)
        at = np.flatnonzero(np.isin(words, wanted))
        groups: dict[tuple[str, int, str], list[int]] = {}
        for k in at.tolist():
            groups.setdefault(table[int(words[k])], []).append(start + 8 * k)
        owner = [tid for tid, sp in snapshot["stacks"].items() if start <= sp < stop]
        for (what, i, form), addresses in sorted(groups.items()):
            coords = len(addresses) * (2 if form == "float32" else 1)
            if coords >= 8:
                where = f"stack of live thread {owner[0]}" if owner else "no live thread's stack"
                lines.append(
                    f"{what} {i} ({form}): ~{coords} coordinates at {min(addresses):#x}-{max(addresses) + 8:#x} "
                    f"({stop - max(addresses) - 8} bytes below the mapping's end) in [{line}] ({where})"
                )
    registers = snapshot["registers"]
    if isinstance(registers, str):
        lines.append(f"registers not read: {registers}")
    else:
        for (tid, name), register in sorted(registers.items()):
            hits = [table[w] for w in register if w in table]
            if hits:
                what, i, form = hits[0]
                lines.append(f"{what} {i} ({form}): {len(hits)} words in register {name} of thread {tid}")
    for line in lines:
        print("located:", line, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templates", type=int, default=200)
    parser.add_argument("--probes", type=int, default=0, help="probes verified after the enrolment (default 0)")
    parser.add_argument("--service", action="store_true", help="add the template-service case (module docs)")
    parser.add_argument("--only-service", action="store_true", help="run the template-service case alone")
    parser.add_argument("--grpc", action="store_true", help="add the gRPC sidecar case (module docs)")
    parser.add_argument("--only-grpc", action="store_true", help="run the gRPC sidecar case alone")
    parser.add_argument("--locate", action="store_true", help="print where each copy found lies (module docs)")
    parser.add_argument("--out", help="results file (default benchmarks/results/encrypted_memory_thief.json)")
    args = parser.parse_args(argv)
    runs = [] if args.only_service or args.only_grpc else [(False, False), (True, False)]
    if args.service or args.only_service:
        runs.append((True, True))
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for zero, service in runs:
            folder = Path(tmp) / f"zero-{int(zero)}-service-{int(service)}"
            case = run_case(args.templates, args.probes, zero, folder, service, args.locate)
            print(case, flush=True)
            cases.append(case)
        if args.grpc or args.only_grpc:
            for case in run_grpc_case(args.templates, args.probes, Path(tmp) / "grpc", args.locate):
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
