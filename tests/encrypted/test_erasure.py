"""Forced erasure: after ``compact`` no byte of a deleted template's block ciphertexts is left in the database files;
the wiping of plaintext buffers never touches the caller's arrays."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from encrypted_helpers import Backend

from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
from advface.encrypted.memory import wipe, wipe_floats
from advface.encrypted.store import EncryptedSQLiteStore
from advface.errors import PreconditionError

DIM = 8
KEY = b"i" * 32


def _on_disk(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")) if not p.name.endswith(".lock"))


def _samples(data: bytes, n: int = 40, size: int = 48) -> list[bytes]:
    """Pieces of a block row from its ciphertext part (past the header and slot states)."""
    start = len(data) // 10
    step = (len(data) - start - size) // n
    return [data[start + i * step : start + i * step + size] for i in range(n)]


def test_compact_leaves_no_trace_of_a_deleted_templates_ciphertexts(tmp_path: Path, keys, binding_key, rng) -> None:
    db = tmp_path / "t.sqlite3"
    people = rng.standard_normal((2, DIM)) * 0.3
    core = KeyServiceCore(keys, binding_key, DecisionPolicy("euclidean", -0.3))
    store = EncryptedSQLiteStore(
        db, keys.public, binding_key, DIM, "euclidean", keyservice=core, integrity_key=KEY, auto_erase=False
    )
    with store:
        store.add("t", "alice", people[0][None])
        store.add("t", "bob", people[1][None])
        (before,) = store._db.execute("SELECT data FROM blocks").fetchone()  # the block holding alice
        pieces = _samples(bytes(before))
        store.delete_subject("t", "alice")
        assert all(p in _on_disk(db) for p in pieces)  # only marked dead: her ciphertexts are still on disk
        report = store.compact()
        assert report == {"erased": 1, "pending": 0, "bytes": db.stat().st_size}
        disk = _on_disk(db)
        assert not any(p in disk for p in pieces)
        assert store.verify_encrypted("t", "bob", people[1])[0]
        assert store.count("t") == 1 and store.live_slot_count("t") == 1
    assert _on_disk(db).count(b"ADVFACE-CKKS-BLOCK1") == 1  # one block version left


def test_compact_needs_the_key_service_and_changes_nothing_without_it(tmp_path: Path, keys, binding_key, rng) -> None:
    db = tmp_path / "t.sqlite3"
    with EncryptedSQLiteStore(db, keys.public, binding_key, DIM, "euclidean", integrity_key=KEY) as store:
        store.add("t", "alice", rng.standard_normal((1, DIM)) * 0.3)
        store.delete_subject("t", "alice")
        before = _on_disk(db)
        with pytest.raises(PreconditionError, match="no key service"):
            store.compact()
        assert _on_disk(db) == before


def test_wiping_zeroes_our_buffers_and_never_the_callers(tmp_path: Path, keys, binding_key, rng) -> None:
    a, b = np.arange(1.0, 5.0), bytearray(b"secret")
    wipe(a, b, None)
    assert not a.any() and b == bytearray(6)
    floats = (np.arange(3) + 0.5).tolist()
    first = floats[0]
    wipe_floats(floats)
    assert floats == [0.0, 0.0, 0.0] and first == 0.0  # the objects themselves changed
    assert ctypes.c_double.from_address(id(first) + 16).value == 0.0

    vectors = {
        "float32": (rng.standard_normal((2, DIM)) * 0.3).astype(np.float32),
        "float64": rng.standard_normal((2, DIM)) * 0.3,
    }
    core = KeyServiceCore(keys, binding_key, DecisionPolicy("euclidean", -0.3))
    with EncryptedSQLiteStore(
        tmp_path / "t.sqlite3", keys.public, binding_key, DIM, "euclidean", keyservice=core, integrity_key=KEY
    ) as store:
        for name, x in vectors.items():
            kept = x.copy()
            store.add("t", name, x)
            assert store.verify_encrypted("t", name, x[0])[0]
            store.identify_encrypted("t", x[1], 3)
            np.testing.assert_array_equal(x, kept)  # the caller's arrays are the caller's to wipe


def test_postgres_compact_leaves_no_trace_in_the_tables_files(
    tmp_path: Path, postgres_server, postgres_dsn: str, keys, binding_key, rng
) -> None:
    """PostgreSQL: after ``compact`` (erasure, then VACUUM FULL) no piece of the deleted template's block version is
    left in the rows or in the database's relation files (WAL segments are outside: docs/encrypted-matching.md)."""
    pg = Backend("postgresql", tmp_path, postgres_dsn)
    people = rng.standard_normal((2, DIM)) * 0.3
    core = KeyServiceCore(keys, binding_key, DecisionPolicy("euclidean", -0.3))
    with pg.open(keys.public, binding_key, DIM, keyservice=core, integrity_key=KEY, auto_erase=False) as store:
        store.add("t", "alice", people[0][None])
        store.add("t", "bob", people[1][None])
        ((before,),) = pg.sql("SELECT data FROM blocks")
        pieces = _samples(before)
        ((oid,),) = pg.sql("SELECT oid FROM pg_database WHERE datname = current_database()")

        def files() -> bytes:
            pg.sql("CHECKPOINT")  # dirty pages written out
            folder = postgres_server.pgdata / "base" / str(oid)
            return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())

        store.delete_subject("t", "alice")
        assert all(p in pg.stored_bytes() for p in pieces)  # only marked dead: her ciphertexts are still stored
        on_disk = files()
        assert sum(p in on_disk for p in pieces) > len(pieces) // 2  # (a piece may straddle two TOAST chunks)
        report = store.compact()
        assert report["erased"] == 1 and report["pending"] == 0 and report["bytes"] > len(before)
        assert not any(p in pg.stored_bytes() for p in pieces)
        assert not any(p in files() for p in pieces)
        assert store.verify_encrypted("t", "bob", people[1])[0] and store.live_slot_count("t") == 1
