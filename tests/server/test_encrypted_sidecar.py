"""The sidecar with ``store.matching: encrypted``: Verify/Identify decided by the key service over gRPC, and
UNAVAILABLE (nothing stored or lost) while the key service is down."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest
from sidecar_harness import ServerThread, make_config, random_embedding

from advface.cli.main import main
from advface.client import AdvFaceRpcError

pytest.importorskip("tenseal")
from advface.encrypted.keys import load_binding_key, load_keyservice_folder  # noqa: E402
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore  # noqa: E402
from server.keyservice import build_keyservice_server  # noqa: E402


def test_encrypted_sidecar_end_to_end(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    sidecar_dir, service_dir = tmp_path / "sidecar", tmp_path / "keyservice"
    assert main(["keyservice", "keygen", "--sidecar-dir", str(sidecar_dir), "--keyservice-dir", str(service_dir)]) == 0
    core = KeyServiceCore(
        load_keyservice_folder(service_dir), load_binding_key(service_dir), DecisionPolicy("euclidean", -0.6)
    )
    ks, port = build_keyservice_server(core, (service_dir / "keyservice.token").read_text().strip())
    ks.start()
    store = {
        "matching": "encrypted",
        "encrypted_keys_dir": str(sidecar_dir),
        "keyservice_address": f"127.0.0.1:{port}",
        "keyservice_timeout_s": 2.0,
    }
    server: ServerThread = start_server(make_config(tmp_path / "srv", store=store))
    raws = [random_embedding(s) for s in range(4)]
    names = [f"Firstname Lastname-{i}" for i in range(4)]
    try:
        with server.client() as client:
            for i, raw in enumerate(raws):
                client.enroll(names[i], embedding=raw, tenant="enc", metadata={"email": f"{i}.person@example.org"})
            result = client.verify(names[2], embedding=raws[2], tenant="enc")
            assert result.match and np.isnan(result.score)  # decisions only
            assert not client.verify(names[2], embedding=raws[1], tenant="enc").match
            assert client.identify(embedding=raws[3], top_k=1, tenant="enc")[0].subject_id == names[3]
            ks.stop(0).wait()
            for call in (
                lambda: client.verify(names[2], embedding=raws[2], tenant="enc"),
                lambda: client.identify(embedding=raws[2], top_k=1, tenant="enc"),
            ):
                with pytest.raises(AdvFaceRpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            client.enroll("Second Person", embedding=raws[0], tenant="enc")  # enrolment needs no key service
            assert sorted(s.subject_id for s in client.iter_subjects("enc")) == sorted([*names, "Second Person"])
    finally:
        ks.stop(0)
    server.stop()
    database = tmp_path / "srv" / "data" / "templates-encrypted.sqlite3"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 5
        blocks = b"".join(row[0] for row in conn.execute("SELECT data FROM blocks"))
    for raw in raws:  # no raw vector bytes in the database
        assert raw.astype("<f4").tobytes()[:16] not in blocks
    on_disk = b"".join(p.read_bytes() for p in sorted((tmp_path / "srv" / "data").rglob("*")) if p.is_file())
    for text in [*names, "Second Person", "person@example.org", "email"]:  # subject ids and metadata sealed
        assert text.encode() not in on_disk
