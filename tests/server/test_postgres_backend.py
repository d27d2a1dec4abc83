"""The real sidecar on the PostgreSQL + pgvector store (``store.backend: postgresql``): enrol, verify, identify and
delete; two sidecars sharing one database (scale-out); the encrypted mode from the ``encryption`` section."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from sidecar_harness import ServerThread, make_config, random_embedding

from advface.client import AdvFaceRpcError
from advface.config import Config
from advface.crypto import generate_key, write_key_file
from advface.store.postgres import PostgresStore


def _rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT tenant, template_id, vector::text, ciphertext FROM advface_templates ORDER BY id"
        ).fetchall()


def test_sidecar_on_postgres_enrols_identifies_deletes(
    postgres_dsn: str, tmp_path: Path, start_server: Callable[[Config], ServerThread]
) -> None:
    config = make_config(tmp_path / "a", store={"backend": "postgresql", "dsn": postgres_dsn})
    assert config.store.backend == "postgresql"
    first = start_server(config)
    second = start_server(make_config(tmp_path / "b", store={"backend": "postgresql", "dsn": postgres_dsn}))
    assert isinstance(first.servicer.service.store, PostgresStore)
    assert not (tmp_path / "a" / "data" / "templates.sqlite3").exists()  # nothing went to SQLite
    raws = {f"person{i}": random_embedding(200 + i) for i in range(6)}
    with first.client() as a, second.client() as b:
        ids = {name: a.enroll(name, embedding=raw, metadata={"n": name}, tenant="pg") for name, raw in raws.items()}
        b.enroll_batch([("late", random_embedding(300))], tenant="pg")  # the other replica writes too

        # what is stored is the protected template, not the raw embedding
        rows = _rows(postgres_dsn)
        assert len(rows) == 7 and {r[0] for r in rows} == {"pg"}
        stored = {r[1]: np.array([float(x) for x in r[2].strip("[]").split(",")], np.float32) for r in rows}
        for name, raw in raws.items():
            (template_id,) = ids[name]
            assert not np.array_equal(stored[template_id], raw)
            assert np.linalg.norm(stored[template_id] - raw) <= 0.1 * np.linalg.norm(raw) * (1 + 1e-4)

        # both replicas see every enrolment at once: identify, verify, listing, counts
        for client in (a, b):
            top = client.identify(embedding=raws["person3"], top_k=3, tenant="pg")
            assert top[0].subject_id == "person3" and top[0].template_id == ids["person3"][0] and top[0].match
            assert len({m.subject_id for m in top}) == 3
            assert client.verify("person1", embedding=raws["person1"], tenant="pg").match
            assert not client.verify("person1", embedding=raws["person2"], tenant="pg").match
            assert int(client.info("pg")["counts"]["tenant_templates"]) == 7
            assert [s.subject_id for s in client.iter_subjects("pg", page_size=3)] == sorted([*raws, "late"])
        assert a.identify(embedding=raws["person3"], top_k=3, tenant="other") == []  # tenants are isolated

        # deleting on one replica erases for both
        assert b.delete(subject_id="person3", tenant="pg") == 1
        assert a.delete(template_id=ids["person4"][0], tenant="pg") == 1
        for client in (a, b):
            assert {m.subject_id for m in client.identify(embedding=raws["person3"], top_k=10, tenant="pg")} == (
                set(raws) - {"person3", "person4"}
            ) | {"late"}
            with pytest.raises(AdvFaceRpcError) as err:
                client.get_subject("person3", tenant="pg")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert {r[1] for r in _rows(postgres_dsn)} == {r[1] for r in rows} - {ids["person3"][0], ids["person4"][0]}


def test_sidecar_on_postgres_encrypted(
    postgres_dsn: str, tmp_path: Path, start_server: Callable[[Config], ServerThread]
) -> None:
    key_file = write_key_file(tmp_path / "store.key", generate_key())
    config = make_config(
        tmp_path / "s", store={"backend": "postgresql", "dsn": postgres_dsn}, encryption={"key_file": str(key_file)}
    )
    server = start_server(config)
    assert server.servicer.service.store.encrypted
    raw = random_embedding(400)
    with server.client() as client:
        (template_id,) = client.enroll("secret", embedding=raw, tenant="enc")
        client.enroll("other", embedding=random_embedding(401), tenant="enc")
        assert client.identify(embedding=raw, top_k=2, tenant="enc")[0].template_id == template_id
        protected = client.protect(raw)
        rows = _rows(postgres_dsn)
        assert [r[2] for r in rows] == [None, None] and all(isinstance(r[3], bytes) for r in rows)
        for row in rows:  # neither the raw nor the protected vector is in the ciphertext
            for vector in (raw, protected):
                assert vector.astype("<f4").tobytes()[:32] not in row[3]
        assert client.delete(subject_id="secret", tenant="enc") == 1
        assert [m.subject_id for m in client.identify(embedding=raw, top_k=2, tenant="enc")] == ["other"]
