"""``advface serve`` as a real process: ready line, health, concurrent enrolment, kill -9 and restart (every
acknowledged enrolment is there exactly once, the index agrees with the database), graceful SIGTERM, JSON logs
without biometric data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sidecar_harness import random_embedding

from advface.client import AdvFaceClient, AdvFaceRpcError
from advface.testing.serve import wait_ready


class ServeProcess:
    def __init__(self, data_dir: Path, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADVFACE_") or k.endswith("_DIR")}
        env.update(
            ADVFACE_ENCODER_NAME="dlib-torch",
            ADVFACE_PROTECTION_STEPS="2",
            OMP_NUM_THREADS="1",
            ADVFACE_SERVER_GRACE_SECONDS="2",
            ADVFACE_METRICS_PORT="0",
        )
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "advface.cli.main",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--data-dir",
                str(data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        self.address = self._wait_ready()

    def _wait_ready(self) -> str:
        address = wait_ready(self.proc, 120)
        if address is None:
            self.proc.kill()
            pytest.fail(f"advface serve did not become ready; log:\n{self.log_path.read_text()[-3000:]}")
        return address

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


@pytest.mark.slow
def test_serve_crash_restart_and_graceful_stop(tmp_path: Path) -> None:
    data_dir, log_path = tmp_path / "data", tmp_path / "serve.log"
    first = ServeProcess(data_dir, log_path)
    acked: dict[str, tuple[list[str], np.ndarray]] = {}
    lock = threading.Lock()
    try:
        with AdvFaceClient(first.address, timeout=30) as c:
            assert c.health() == "SERVING" and c.health("advface.v1.AdvFace") == "SERVING"
            info = c.info()
            assert info["encoder"]["name"] == "dlib-torch" and info["protection"]["steps"] == 2
            assert info["protection"]["shadow_model"] == "shadow_dlib.pt"

        stop = threading.Event()

        def enrol(worker: int) -> None:
            with AdvFaceClient(first.address, timeout=30) as client:
                for i in range(1000):
                    if stop.is_set():
                        return
                    sid, vector = f"w{worker}-{i}", random_embedding(1000 * worker + i)
                    try:
                        ids = client.enroll(sid, embedding=vector, metadata={"worker": str(worker)})
                    except AdvFaceRpcError:
                        return  # the server died under us: not acknowledged
                    with lock:
                        acked[sid] = (ids, vector)

        workers = [threading.Thread(target=enrol, args=(w,)) for w in range(4)]
        for t in workers:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.proc.send_signal(signal.SIGKILL)  # crash in the middle of concurrent enrolment
        first.proc.wait(30)
        stop.set()
        for t in workers:
            t.join(60)
    finally:
        first.close()
    assert len(acked) >= 12

    second = ServeProcess(data_dir, log_path)
    try:
        with AdvFaceClient(second.address, timeout=30) as c:
            subjects = list(c.iter_subjects(page_size=50))
            stored = {s.subject_id: s for s in subjects}
            assert set(acked) <= set(stored)  # every acknowledged enrolment survived
            assert len(stored) <= len(acked) + 4  # at most the in-flight ones besides
            for sid, (ids, vector) in acked.items():
                assert stored[sid].template_ids == ids  # exactly once
                best = c.identify(embedding=vector, top_k=1)[0]  # the index agrees with the database
                assert best.subject_id == sid and best.template_id == ids[0] and best.match
            counts = c.info()["counts"]
            assert counts["tenant_templates"] == counts["tenant_subjects"] == len(stored)
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0  # graceful stop
    finally:
        second.close()

    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    rpcs = [r for r in records if r.get("msg") == "rpc"]
    assert {"Enroll", "Identify", "ListSubjects", "Info"} <= {r["rpc"] for r in rpcs}
    assert all(set(r) <= {"ts", "level", "logger", "msg", "rpc", "code", "latency_ms", "tenant", "items"} for r in rpcs)
    assert any(r.get("msg") == "stopped" for r in records)
    text = log_path.read_text()
    assert "w0-0" not in text  # no subject ids ...
    vector = acked["w0-0"][1] if "w0-0" in acked else next(iter(acked.values()))[1]
    assert not any(f"{x:.6f}" in text for x in vector[:8])  # ... and no vector values in the logs
