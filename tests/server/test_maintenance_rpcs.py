"""The admin maintenance RPCs of an encrypted sidecar (RotateKeyPair, EraseNow, MaintenanceStatus): a key-pair
rotation while a client keeps verifying, admin-only, idempotent, resumable after the sidecar stopped mid-way, and a
restart on the old key folder refused once the store has swapped."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from sidecar_harness import ServerThread, make_config, random_embedding

from advface.api.v1 import advface_pb2 as pb
from advface.api.v1 import advface_pb2_grpc as pb_grpc
from advface.cli.main import main
from advface.errors import ConfigError

pytest.importorskip("tenseal")
from advface.encrypted.keys import load_binding_key, load_keyservice_folder  # noqa: E402
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore  # noqa: E402
from advface.encrypted.ratelimit import RateLimiter  # noqa: E402
from advface.service.maintenance import MaintenanceService  # noqa: E402
from server.keyservice import build_keyservice_server  # noqa: E402

ADMIN = "admin-token-0123456789abcdef"
CLIENT = "client-token-0123456789abcdef"
TOKENS = {ADMIN: {"tenants": "*", "role": "admin"}, CLIENT: {"tenants": "*", "role": "client"}}
TENANTS = ("t0", "t1")  # one block each


def _keys(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """The current key pair's folders and the next pair's (``keygen --next-of``)."""
    side, ks, side2, ks2 = (tmp_path / n for n in ("sidecar", "keyservice", "sidecar-2", "keyservice-2"))
    assert main(["keyservice", "keygen", "--sidecar-dir", str(side), "--keyservice-dir", str(ks)]) == 0
    assert (
        main(
            ["keyservice", "keygen", "--sidecar-dir", str(side2), "--keyservice-dir", str(ks2), "--next-of", str(side)]
        )
        == 0
    )
    return side, ks, side2, ks2


def _keyservice(ks: Path, ks2: Path, limiter: RateLimiter | None = None) -> tuple[grpc.Server, int]:
    """A key service on the current secret key that rotates into, and decides under, the next key pair."""
    core = KeyServiceCore(
        load_keyservice_folder(ks),
        load_binding_key(ks),
        DecisionPolicy("euclidean", -0.6),
        next_keys=load_keyservice_folder(ks2),
        limiter=limiter,
    )
    server, port = build_keyservice_server(core, (ks / "keyservice.token").read_text().strip())
    server.start()
    return server, port


def _config(tmp_path: Path, keys_dir: Path, port: int) -> Any:
    store = {
        "matching": "encrypted",
        "encrypted_keys_dir": str(keys_dir),
        "keyservice_address": f"127.0.0.1:{port}",
        "keyservice_timeout_s": 20.0,  # a Rotate of a block shares this busy process's CPU with the Verify loop
    }
    return make_config(tmp_path / "srv", store=store, auth={"enabled": True, "tokens": TOKENS})


def _call(server: ServerThread, token: str, rpc: str, request: Any) -> Any:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.AdvFaceStub(channel)
        return getattr(stub, rpc)(request, timeout=60, metadata=(("authorization", f"Bearer {token}"),))


def _status(server: ServerThread) -> pb.MaintenanceJob:
    return _call(server, ADMIN, "MaintenanceStatus", pb.MaintenanceStatusRequest())


def _wait(server: ServerThread, until: Any, timeout_s: float = 300.0) -> pb.MaintenanceJob:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        job = _status(server)
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"maintenance job did not get there: {job}")


def _enrol(server: ServerThread, people: dict[tuple[str, str], np.ndarray]) -> None:
    with server.client(token=ADMIN) as client:
        for tenant in TENANTS:
            items = [(name, vector) for (t, name), vector in people.items() if t == tenant]
            client.enroll_batch([{"subject_id": name, "embedding": v} for name, v in items], tenant=tenant)


def _people() -> dict[tuple[str, str], np.ndarray]:
    return {(t, f"person-{t}-{i}"): random_embedding(10 * k + i) for k, t in enumerate(TENANTS) for i in range(2)}


@pytest.mark.slow
def test_rotate_while_serving(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    side, ks, side2, ks2 = _keys(tmp_path)
    # the key service lets one Rotate through per second: the job waits for it instead of failing
    keyservice, port = _keyservice(ks, ks2, RateLimiter({"rotate": (1.0, 1.0)}))
    people = _people()
    try:
        server: ServerThread = start_server(_config(tmp_path, side, port))
        _enrol(server, people)
        request = pb.RotateKeyPairRequest(new_keys_dir=str(side2), blocks_per_second=100)
        with pytest.raises(grpc.RpcError) as info:
            _call(server, CLIENT, "RotateKeyPair", request)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for rpc, message in (("EraseNow", pb.EraseNowRequest()), ("MaintenanceStatus", pb.MaintenanceStatusRequest())):
            with pytest.raises(grpc.RpcError) as info:
                _call(server, CLIENT, rpc, message)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:  # not a key folder: refused, nothing started
            _call(server, ADMIN, "RotateKeyPair", pb.RotateKeyPairRequest(new_keys_dir=str(tmp_path)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _status(server).state == "idle"

        results: list[tuple[bool, str]] = []  # (matched, the job's state just after)
        errors: list[BaseException] = []
        done = threading.Event()

        def verify_meanwhile() -> None:
            with server.client(token=CLIENT) as client:
                while not done.is_set():
                    for (tenant, name), vector in people.items():
                        try:
                            match = client.verify(name, embedding=vector, tenant=tenant).match
                        except Exception as exc:  # noqa: BLE001 - reported below
                            errors.append(exc)
                            return
                        results.append((match, _status(server).state))

        thread = threading.Thread(target=verify_meanwhile)
        thread.start()
        try:
            _wait(server, lambda job: True)
            started = _call(server, ADMIN, "RotateKeyPair", request)
            assert started.state == "running" and started.operation == "rotate_key_pair"
            again = _call(server, ADMIN, "RotateKeyPair", request)  # the same request: the running job
            assert again.already_running and again.target_fingerprint == started.target_fingerprint
            with pytest.raises(grpc.RpcError) as info:  # another job while one runs
                _call(server, ADMIN, "EraseNow", pb.EraseNowRequest())
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            with server.client(token=ADMIN) as admin:  # a write during the rotation: its block is done again
                admin.enroll("late", embedding=random_embedding(99), tenant="t1")
            job = _wait(server, lambda job: job.state != "running")
            time.sleep(1.0)  # a few more Verify calls after the swap
        finally:
            done.set()
            thread.join(120)
        assert job.state == "done", job.last_error
        assert job.blocks_done == job.blocks_total == len(TENANTS) and job.blocks_this_job >= len(TENANTS)
        assert job.fingerprint == started.target_fingerprint and job.unfinished_rotation == ""
        assert not errors, errors  # no failed call, before, during or after the swap
        assert results and all(match for match, _ in results)
        assert {"running", "done"} <= {state for _, state in results}  # calls during the rotation and after the swap
        with server.client(token=ADMIN) as admin:  # after the swap: genuine probes match, others do not
            for (tenant, name), vector in people.items():
                assert admin.verify(name, embedding=vector, tenant=tenant).match
            assert admin.verify("late", embedding=random_embedding(99), tenant="t1").match
            assert not admin.verify("person-t0-0", embedding=random_embedding(7), tenant="t0").match
        server.stop()
        # a restart with the config still on the old key folder is refused, saying what to do
        with pytest.raises(ConfigError, match="wrong key pair.*encrypted_keys_dir"):
            start_server(_config(tmp_path, side, port))
    finally:
        keyservice.stop(0)


@pytest.mark.slow
def test_stopped_rotation_resumes_and_erase_now(  # type: ignore[no-untyped-def]
    tmp_path: Path, start_server, capsys: pytest.CaptureFixture[str]
) -> None:
    side, ks, side2, ks2 = _keys(tmp_path)
    keyservice, port = _keyservice(ks, ks2)
    people = _people()
    try:
        server: ServerThread = start_server(_config(tmp_path, side, port))
        _enrol(server, people)
        request = pb.RotateKeyPairRequest(new_keys_dir=str(side2), blocks_per_second=0.01)  # a block per 100 s
        _call(server, ADMIN, "RotateKeyPair", request)
        running = _wait(server, lambda job: job.blocks_this_job >= 1)
        assert running.blocks_total == len(TENANTS) and running.state == "running"
        server.stop()  # the sidecar stops mid-way (its job is stopped; a kill -9 leaves the same rows)
        server = start_server(_config(tmp_path, side, port))  # still under the old key pair
        status = _status(server)
        assert status.state == "idle" and status.unfinished_rotation == running.target_fingerprint
        # resumed and erased through `advface maintenance` (the admin client's CLI), which waits for each job
        tokens = {}
        for name, token in (("admin", ADMIN), ("client", CLIENT)):
            tokens[name] = tmp_path / f"{name}.token"
            tokens[name].write_text(token + "\n")
            tokens[name].chmod(0o600)

        def cli(token: str, *action: str) -> tuple[int, dict[str, Any]]:
            common = ["--target", server.address, "--token-file", str(tokens[token])]
            code = main(["maintenance", *action, *common])
            captured = capsys.readouterr()
            return code, (json.loads(captured.out) if code == 0 else {"stderr": captured.err})

        code, refused = cli("client", "status")
        assert code == 2 and "PERMISSION_DENIED" in refused["stderr"]  # a client token
        code, job = cli("admin", "rotate-key-pair", "--new-keys-dir", str(side2), "--wait", "--poll-s", "0.05", "-q")
        assert code == 0 and job["state"] == "done", job
        assert job["blocks_done"] == len(TENANTS) and 1 <= job["blocks_this_job"] < len(TENANTS)  # resumed, not redone
        assert job["fingerprint"] == running.target_fingerprint and job["unfinished_rotation"] == ""
        assert job["started_at"] and job["finished_at"]
        with server.client(token=ADMIN) as admin:
            assert admin.verify("person-t1-1", embedding=people[("t1", "person-t1-1")], tenant="t1").match
            admin.delete("person-t0-0", tenant="t0")
        code, job = cli("admin", "erase-now", "--wait", "--poll-s", "0.05", "-q")
        assert code == 0 and job["operation"] == "erase" and job["state"] == "done" and job["pending"] == 0, job
        assert cli("admin", "status")[1]["operation"] == "erase"
        wal = tmp_path / "srv" / "data" / "templates-encrypted.sqlite3-wal"
        assert not wal.exists() or wal.stat().st_size == 0  # the database rewritten, the WAL truncated
        server.stop()
        server = start_server(_config(tmp_path, side2, port))  # the config now on the new key folder
        with server.client(token=ADMIN) as admin:
            assert admin.verify("person-t1-0", embedding=people[("t1", "person-t1-0")], tenant="t1").match
    finally:
        keyservice.stop(0)


def test_maintenance_needs_an_encrypted_store() -> None:
    class Plain:
        matching = "plain"

    service = MaintenanceService(Plain())  # type: ignore[arg-type]
    from advface.errors import PreconditionError

    with pytest.raises(PreconditionError, match="encrypted store"):
        service.erase_now()
    with pytest.raises(PreconditionError, match="encrypted store"):
        service.rotate_key_pair("/nowhere")
    assert service.status().state == "idle"


class _FlakyStore:
    """An encrypted store whose key service is unavailable for the first ``outages`` erasure passes."""

    matching = "encrypted"

    def __init__(self, outages: int) -> None:
        self.outages = outages
        self.calls = 0
        self.keys = type("Keys", (), {"fingerprint": "fp"})()

    def unfinished_rotation(self) -> None:
        return None

    def compact(self, progress: Any = None) -> dict[str, int]:
        from advface.encrypted.errors import KeyServiceUnavailableError

        self.calls += 1
        if self.calls <= self.outages:
            raise KeyServiceUnavailableError("key service at 127.0.0.1:1 unavailable (DEADLINE_EXCEEDED)")
        return {"erased": 3, "pending": 0}


def test_a_short_key_service_outage_is_waited_out_a_long_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from advface.service import maintenance

    monkeypatch.setattr(maintenance, "RATE_LIMIT_WAIT_S", 0.001)
    short = _FlakyStore(outages=2)
    service = MaintenanceService(short)  # type: ignore[arg-type]
    service.erase_now()
    job = service.wait(30)
    assert job.state == "done" and job.erased == 3 and short.calls == 3, job  # two outages, then through
    long = _FlakyStore(outages=maintenance.UNAVAILABLE_RETRIES + 1)
    service = MaintenanceService(long)  # type: ignore[arg-type]
    service.erase_now()
    job = service.wait(30)
    assert job.state == "failed" and "unavailable" in job.last_error
    assert long.calls == maintenance.UNAVAILABLE_RETRIES + 1  # tried again that many times, then gave up
