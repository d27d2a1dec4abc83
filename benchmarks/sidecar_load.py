"""Load generator for the sidecar: enrolment and identification latency and throughput on loopback.

Usage::

    nice -n 5 python benchmarks/sidecar_load.py --clients 1 8 32 --duration 20

For each server variant (``--modes``: ``protected`` = the default configuration, AdvFace with its default steps;
``plain`` = ``protection.enabled: false``) it starts the real sidecar (``python -m advface.cli.main serve`` on
127.0.0.1 with a temporary data folder and config file), fills a gallery of ``--gallery`` subjects with
``EnrollBatch``, then drives it with N concurrent closed-loop clients (``--clients``; each sends its next request
when the previous one is answered) for ``--duration`` seconds (or ``--max-requests``) per phase:

- ``identify``: ``Identify`` top-10 with a new photo of a gallery identity (embedding given);
- ``enroll``: ``Enroll`` of a new subject (embedding given).

Embeddings are synthetic dlib-like templates (``benchmarks/face_vectors.py``: fit on cached LFW dlib embeddings).
Clients are grpc.aio stubs in this process (one event loop, one channel per client). Latency is measured at the
client (p50 / p99 / max, ms); throughput is completed requests per second. ``--variant`` adds server variants as
``name:KEY=VALUE,...`` of ``ADVFACE_*`` overrides (e.g. ``slots1:ADVFACE_PROTECTION_SLOTS=1``).
The metrics endpoint of each server is scraped at the end for the protection batch sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.api.v1 import advface_pb2 as pb  # noqa: E402
from advface.api.v1 import advface_pb2_grpc as pb_grpc  # noqa: E402
from advface.testing.serve import wait_ready  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.face_vectors import SyntheticFaces  # noqa: E402

TENANT = "load"
ENROL_TARGET_MS = 250.0


class Server:
    """``advface serve`` in a subprocess with a config file in a temporary folder."""

    def __init__(self, folder: Path, protection: bool, env_overrides: dict[str, str], encoder: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "server": {"host": "127.0.0.1", "port": 0, "max_batch": 1000},
            "encoder": {"name": encoder},
            "protection": {"enabled": protection},
            "store": {"data_dir": str(folder / "data"), "use_gpu": False},
            "metrics": {"host": "127.0.0.1", "port": 0},
            "logging": {"level": "INFO", "json": True},
        }
        self.config_path = folder / "advface.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADVFACE_") or k.endswith("_DIR")}
        env.update(env_overrides)
        self.log_path = folder / "serve.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "advface.cli.main", "serve", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        self.address = self._wait_ready()
        self.metrics_url = self._metrics_url()

    def _wait_ready(self) -> str:
        address = wait_ready(self.proc, 300)
        if address is None:
            self.close()
            raise RuntimeError(f"advface serve did not start; log:\n{self.log_path.read_text()[-3000:]}")
        return address

    def _metrics_url(self) -> str | None:
        for _ in range(50):
            match = re.search(r'"msg": "metrics serving".*?"url": "([^"]+)"', self.log_path.read_text())
            if match:
                return match.group(1)
            time.sleep(0.1)
        return None

    def scrape(self) -> dict[str, float]:
        """Unlabelled protection metrics of the server (sums and counts)."""
        if self.metrics_url is None:
            return {}
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("advface_protection_batch_") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()


def _stats(latencies: list[float], seconds: float, errors: dict[str, int]) -> dict[str, Any]:
    ms = np.asarray(latencies) * 1000.0
    if not len(ms):
        return {"requests": 0, "errors": errors}
    return {
        "requests": int(len(ms)),
        "errors": errors,
        "seconds": round(seconds, 2),
        "throughput_per_s": round(len(ms) / seconds, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
        "mean_ms": round(float(ms.mean()), 1),
    }


def _embedding(vector: np.ndarray) -> pb.Embedding:
    return pb.Embedding(values=vector.tolist())


async def _phase(server: Server, clients: int, duration: float, max_requests: int, make_call: Any) -> dict[str, Any]:
    """Run ``clients`` closed-loop clients; ``make_call(stub, client, i)`` sends one request."""
    import grpc

    channels = [grpc.aio.insecure_channel(server.address) for _ in range(clients)]
    stubs = [pb_grpc.AdvFaceStub(ch) for ch in channels]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = [0]
    # warm-up: one request per client, not counted
    await asyncio.gather(*(make_call(stubs[c], c, -1 - c) for c in range(clients)))
    start = time.perf_counter()
    cpu_start = server.cpu_seconds()
    deadline = start + duration

    async def client(c: int) -> None:
        while time.perf_counter() < deadline and counter[0] < max_requests:
            i = counter[0]
            counter[0] += 1
            t0 = time.perf_counter()
            try:
                await make_call(stubs[c], c, i)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client(c) for c in range(clients)))
    seconds = time.perf_counter() - start
    cpu = server.cpu_seconds() - cpu_start
    for ch in channels:
        await ch.close()
    out = _stats(latencies, seconds, errors)
    if latencies:
        cores = os.cpu_count() or 1
        out["server_cpu_cores_used"] = round(cpu / seconds, 2)  # of os.cpu_count(); < cores: CPU shared or idle
        out["server_cpu_ms_per_request"] = round(1000 * cpu / len(latencies), 1)
        # What the server's own CPU time allows on an otherwise idle machine (Little's law, CPU-bound server):
        # throughput cores / cpu_per_request, mean latency clients / throughput. An estimate, not a measurement.
        per_request = cpu / len(latencies)
        out["idle_machine_estimate"] = {
            "throughput_per_s": round(cores / per_request, 1),
            "mean_latency_ms": round(1000 * max(clients * per_request / cores, per_request), 1),
        }
        out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


async def run_server(
    server: Server,
    args: argparse.Namespace,
    model: SyntheticFaces,
    name: str,
    identify_clients: list[int],
    enrol_clients: list[int],
) -> dict[str, Any]:
    import grpc

    rng = np.random.default_rng(args.seed)
    gallery_size = args.gallery if identify_clients else 0
    centres = model.centres(max(gallery_size, 1), rng)
    gallery = model.photos(centres, rng)
    out: dict[str, Any] = {"gallery": gallery_size, "phases": []}
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.AdvFaceStub(channel)
        info = await stub.Info(pb.InfoRequest(tenant=TENANT), timeout=60)
        out["protection"] = {
            "enabled": info.protection.enabled,
            "steps": info.protection.steps,
            "rel_l2": round(info.protection.rel_l2, 4),
            "lanes": info.protection.lanes,
        }
        started = time.perf_counter()
        for start in range(0, gallery_size, 100):
            items = [
                pb.EnrollItem(subject_id=f"g{start + i:07d}", face=pb.Face(embedding=_embedding(v)))
                for i, v in enumerate(gallery[start : start + 100])
            ]
            await stub.EnrollBatch(pb.EnrollBatchRequest(tenant=TENANT, items=items), timeout=600)
        out["gallery_fill_seconds"] = round(time.perf_counter() - started, 1)
    print(f"[{name}] gallery of {gallery_size} filled in {out['gallery_fill_seconds']} s", file=sys.stderr, flush=True)

    probe_rng = np.random.default_rng(args.seed + 1)
    enrol_rng = np.random.default_rng(args.seed + 2)
    for clients in identify_clients:
        probes = model.photos(centres[probe_rng.integers(0, gallery_size, 4096)], probe_rng)

        async def identify(stub: Any, c: int, i: int, probes: np.ndarray = probes) -> None:
            request = pb.IdentifyRequest(
                tenant=TENANT, probe=pb.Face(embedding=_embedding(probes[i % len(probes)])), top_k=10
            )
            await stub.Identify(request, timeout=60)

        result = await _phase(server, clients, args.duration, args.max_requests, identify)
        out["phases"].append({"rpc": "Identify", "clients": clients, **result})
        print(f"[{name}] Identify x{clients}: {result}", file=sys.stderr, flush=True)

    for clients in enrol_clients:
        new = model.photos(model.centres(4096, enrol_rng), enrol_rng)

        async def enroll(stub: Any, c: int, i: int, new: np.ndarray = new, clients: int = clients) -> None:
            request = pb.EnrollRequest(
                tenant=TENANT, subject_id=f"e{clients}-{i}", face=pb.Face(embedding=_embedding(new[i % len(new)]))
            )
            await stub.Enroll(request, timeout=120)

        before = server.scrape()
        result = await _phase(server, clients, args.duration, args.max_requests, enroll)
        after = server.scrape()
        count = "advface_protection_batch_rows_count"
        calls = after.get(count, 0) - before.get(count, 0)
        if calls:
            rows = after["advface_protection_batch_rows_sum"] - before["advface_protection_batch_rows_sum"]
            secs = (
                after["advface_protection_batch_duration_seconds_sum"]
                - before["advface_protection_batch_duration_seconds_sum"]
            )
            result["protection_calls"] = int(calls)
            result["protection_rows_per_call"] = round(rows / calls, 2)
            result["protection_ms_per_call"] = round(1000 * secs / calls, 1)
        out["phases"].append({"rpc": "Enroll", "clients": clients, **result})
        print(f"[{name}] Enroll x{clients}: {result}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--max-requests", type=int, default=100_000, help="most requests per phase")
    parser.add_argument("--gallery", type=int, default=1000, help="subjects enrolled before the Identify phases")
    parser.add_argument("--modes", nargs="+", default=["protected", "plain"], choices=["protected", "plain"])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra protected server, Enroll phases only: NAME:ADVFACE_KEY=VALUE[,KEY=VALUE...] "
        "(environment of the server)",
    )
    parser.add_argument("--variant-clients", type=int, nargs="+", default=[8], help="clients of the variants")
    parser.add_argument("--encoder", default="dlib")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()

    model, _ = SyntheticFaces.load()
    servers: list[tuple[str, bool, dict[str, str], list[int], list[int]]] = [
        (m, m == "protected", {}, args.clients, args.clients) for m in args.modes
    ]
    for spec in args.variant:
        name, _, assignments = spec.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
        servers.append((name, True, env, [], args.variant_clients))

    runs = []
    with tempfile.TemporaryDirectory(prefix="advface-load-") as tmp:
        for name, protection, env, identify_clients, enrol_clients in servers:
            print(f"[{name}] starting server ({env or 'defaults'})", file=sys.stderr, flush=True)
            server = Server(Path(tmp) / name, protection, env, args.encoder)
            try:
                result = asyncio.run(run_server(server, args, model, name, identify_clients, enrol_clients))
            finally:
                server.close()
            runs.append({"server": name, "env": env, **result})

    def enrol_p99(run: dict[str, Any], clients: int) -> float | None:
        for phase in run["phases"]:
            if phase["rpc"] == "Enroll" and phase["clients"] == clients:
                return phase.get("p99_ms")
        return None

    protected = next((r for r in runs if r["server"] == "protected"), None)
    p99 = enrol_p99(protected, 8) if protected else None
    payload = {
        "benchmark": "sidecar_load",
        "transport": "gRPC over 127.0.0.1, server = `advface serve` subprocess, clients = grpc.aio in one process",
        "vectors": model.source,
        "shared_machine": True,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "nice": os.nice(0),
        "duration_per_phase_s": args.duration,
        "runs": runs,
        "target": {
            "enroll_p99_ms_at_8_clients": ENROL_TARGET_MS,
            "protected_p99_ms": p99,
            "met": p99 is not None and p99 <= ENROL_TARGET_MS,
            "best_variant_p99_ms": min(
                (enrol_p99(r, 8) for r in runs if r["phases"] and enrol_p99(r, 8) and r["server"] != "plain"),
                default=None,
            ),
        },
    }
    path = write_results("sidecar_load", payload, args.out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
