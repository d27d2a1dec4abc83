"""The encrypted store on both backends (SQLite file, PostgreSQL tables): enrolment, matching, sealing, deletion and
erasure, a key service that is down, failed writes, refusals, tampering; SQLite's process lock and PostgreSQL's
several processes on one database."""

from __future__ import annotations

import inspect
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from encrypted_helpers import Backend

from advface.encrypted.errors import KeyServiceUnavailableError
from advface.encrypted.keys import generate_keys, new_binding_key
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
from advface.encrypted.store import EncryptedStore, EncryptedStoreOptions, integrity_key_for
from advface.errors import (
    ConfigError,
    DatabaseUnavailableError,
    EmbeddingError,
    IntegrityError,
    NotFoundError,
    PreconditionError,
    ValidationError,
)

DIM = 8
KEY = b"i" * 32


class DownKeyService:
    """A key service that cannot be reached."""

    def verify(self, request):  # noqa: ANN001, ANN201
        raise KeyServiceUnavailableError("key service at test unavailable")

    identify = refresh = verify


@pytest.fixture
def core(keys, binding_key) -> KeyServiceCore:
    return KeyServiceCore(keys, binding_key, DecisionPolicy("euclidean", -0.3, top_k_max=5))


@pytest.fixture
def people(rng) -> np.ndarray:
    return rng.standard_normal((6, DIM)) * 0.3


def _open(backend: Backend, keys, binding_key, core=None, **kw) -> EncryptedStore:  # noqa: ANN001
    kw.setdefault("auto_erase", False)
    return backend.open(keys.public, binding_key, DIM, keyservice=core, integrity_key=KEY, **kw)


def test_enrol_verify_identify_and_reopen(backend: Backend, keys, binding_key, core, people, rng) -> None:
    with _open(backend, keys, binding_key, core) as store:
        ids = store.add("a", "alice", np.stack([people[0], people[0] + 0.01]), {"team": "x"})
        store.add_many("a", [(f"p{i}", people[i][None], None) for i in range(1, 6)])
        store.add("b", "bob", people[0][None])  # another tenant, same face
        assert store.count("a") == 7 and store.count(subjects=True) == 7 and store.tenants() == ["a", "b"]
        match, template_id, score = store.verify_encrypted("a", "alice", people[0] + 0.001)
        assert match and template_id in ids and score is None
        assert store.verify_encrypted("a", "p3", people[0])[0] is False
        found = store.identify_encrypted("a", people[2] + 0.001, 3)
        assert [m.subject_id for m in found][:1] == ["p2"] and np.isnan(found[0].score)
        assert all(m.subject_id != "bob" for m in found)
        with pytest.raises(PreconditionError):
            store.search("a", people[0], 1)
        with pytest.raises(PreconditionError):
            store.subject_vectors("a", "alice")
    with _open(backend, keys, binding_key, core) as again:
        assert again.get_subject("a", "alice").metadata == {"team": "x"}
        assert again.get_subject("a", "alice").template_ids == ids
        assert again.verify_encrypted("a", "alice", people[0])[0]
        assert again.live_slot_count("a") == 7


def test_replace_merge_and_listing(backend: Backend, keys, binding_key, core, people) -> None:
    with _open(backend, keys, binding_key, core) as store:
        store.add("a", "s1", people[1][None], {"k": "1"})
        store.add("a", "s1", people[2][None], {"j": "2"})
        assert store.get_subject("a", "s1").metadata == {"k": "1", "j": "2"}
        assert len(store.get_subject("a", "s1").template_ids) == 2
        new = store.add("a", "s1", people[3][None], None, replace=True)
        info = store.get_subject("a", "s1")
        assert info.template_ids == new and info.metadata == {}
        assert store.verify_encrypted("a", "s1", people[3])[0] and not store.verify_encrypted("a", "s1", people[1])[0]
        for i in range(4):
            store.add("a", f"z{i}", people[4][None])
        page, token = store.list_subjects("a", 2)  # ordered by sealed id: a fixed order, not the ids'
        assert len(page) == 2 and token
        rest, token = store.list_subjects("a", 10, token)
        assert sorted(s.subject_id for s in page + rest) == ["s1", "z0", "z1", "z2", "z3"] and token == ""
        with pytest.raises(ValidationError):
            store.add_many("a", [("d", people[0][None], None), ("d", people[1][None], None)], replace=True)
        with pytest.raises(EmbeddingError):
            store.add("a", "big", np.full((1, DIM), 50.0))
        assert store.count("a") == 5


def test_subject_ids_and_metadata_are_sealed_on_disk(backend: Backend, keys, binding_key, core, people) -> None:
    names = [f"Jane Doe {i}" for i in range(4)]
    with _open(backend, keys, binding_key, core) as store:
        assert store.sealed_names
        store.add_many("acme", [(n, people[i][None], {"badge": f"B-{i:04d}-secret"}) for i, n in enumerate(names)])
        store.add("acme", names[0], people[0][None] + 0.01, {"desk": "4th floor"})  # metadata merged
        assert store.get_subject("acme", names[0]).metadata == {"badge": "B-0000-secret", "desk": "4th floor"}
        assert store.delete_subject("acme", names[3]) == 1
        assert store.identify_encrypted("acme", people[2], 1)[0].subject_id == names[2]
        on_disk = backend.stored_bytes()  # while open: the -wal file holds the recent writes
    for text in [*names, "Jane", "B-0001-secret", "4th floor", "badge", "desk"]:
        assert text.encode() not in on_disk and text.encode() not in backend.stored_bytes()
    subjects = backend.sql("SELECT subject_id, metadata FROM subjects ORDER BY subject_id")
    stored = {r[0] for r in backend.sql("SELECT subject_id FROM templates")}
    assert len(subjects) == 3 and all(len(sid) == 32 and meta.startswith('{"sealed": ') for sid, meta in subjects)
    assert stored == {sid for sid, _ in subjects}
    with _open(backend, keys, binding_key, core) as again:  # reopened: ids come back from the sealed rows
        assert again.verify_encrypted("acme", names[0], people[0])[0]
        assert again.get_subject("acme", names[1]).metadata == {"badge": "B-0001-secret"}
        assert sorted(s.subject_id for s in again.list_subjects("acme")[0]) == names[:3]
    with pytest.raises(ConfigError, match="under binding key"):  # under another binding key: refused, nothing read
        backend.open(keys.public, b"x" * 32, DIM, integrity_key=KEY)
    backend.sql("DELETE FROM meta WHERE key='binding_fingerprint'")  # a store made before the fingerprint was kept
    with pytest.raises(IntegrityError, match="names key"):  # still refused: the names key does not unwrap
        backend.open(keys.public, b"x" * 32, DIM, integrity_key=KEY)
    # a sealed row moved to another subject's place fails authentication, never opens as the other
    backend.sql("UPDATE subjects SET metadata=? WHERE subject_id=?", (subjects[0][1], subjects[1][0]))
    with pytest.raises(IntegrityError, match="tenant 'acme': a subject row fails to open"):
        _open(backend, keys, binding_key, core)


def test_an_empty_store_made_before_sealing_is_sealed(backend: Backend, keys, binding_key, people) -> None:
    _open(backend, keys, binding_key).close()
    backend.sql("DELETE FROM meta WHERE key IN ('subject_names', 'names_key')")
    with _open(backend, keys, binding_key) as store:
        assert store.sealed_names
        store.add("a", "Jane Doe", people[0][None], {"k": "v"})
    assert b"Jane Doe" not in backend.stored_bytes()


def test_delete_then_erase(backend: Backend, keys, binding_key, core, people) -> None:
    with _open(backend, keys, binding_key, core) as store:
        ids = store.add("a", "alice", np.stack([people[0], people[1]]))
        store.add("a", "bob", people[2][None])
        assert store.delete_template("a", ids[0]) == "alice"
        assert not store.verify_encrypted("a", "alice", people[0])[0]
        assert store.delete_subject("a", "bob") == 1
        with pytest.raises(NotFoundError):
            store.verify_encrypted("a", "bob", people[2])
        with pytest.raises(NotFoundError):
            store.delete_template("a", ids[0])
        assert store.delete_template("a", ids[1]) == "alice"  # the last template removes the subject
        with pytest.raises(NotFoundError):
            store.get_subject("a", "alice")
        assert store.erase("a") == 3
        assert store.add("a", "carol", people[3][None]) and store.count("a") == 1
    with _open(backend, keys, binding_key, core) as again:
        assert again.verify_encrypted("a", "carol", people[3])[0]


def test_key_service_down_changes_nothing(backend: Backend, keys, binding_key, people) -> None:
    with _open(backend, keys, binding_key, DownKeyService()) as store:
        store.add("a", "alice", people[0][None])  # enrolment needs no key service
        store.delete_subject("a", "alice")
        store.add("a", "alice", people[0][None])
        with pytest.raises(KeyServiceUnavailableError):
            store.verify_encrypted("a", "alice", people[0])
        with pytest.raises(KeyServiceUnavailableError):
            store.identify_encrypted("a", people[0], 1)
        with pytest.raises(KeyServiceUnavailableError):
            store.erase("a")
        assert store.count("a") == 1 and store.count(subjects=True) == 1
    with _open(backend, keys, binding_key, None, name="u") as store:
        store.add("a", "alice", people[0][None])
        with pytest.raises(PreconditionError, match="no key service"):
            store.verify_encrypted("a", "alice", people[0])


def test_failed_write_leaves_memory_as_the_database(
    backend: Backend, keys, binding_key, core, people, monkeypatch
) -> None:
    with _open(backend, keys, binding_key, core) as store:
        store.add("a", "alice", people[0][None])

        def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise OSError("disk full")

        monkeypatch.setattr(store, "_write_blocks", broken)
        with pytest.raises(OSError, match="disk full"):
            store.add("a", "bob", people[1][None])
        with pytest.raises(OSError, match="disk full"):
            store.delete_subject("a", "alice")
        monkeypatch.undo()
        assert store.count("a") == 1 and store.live_slot_count("a") == 1
        assert store.verify_encrypted("a", "alice", people[0])[0]


def test_wrong_key_pair_or_shape_refused(backend: Backend, keys, binding_key, people) -> None:
    _open(backend, keys, binding_key).close()
    with pytest.raises(ConfigError, match="wrong key pair"):
        backend.open(generate_keys().public, binding_key, DIM)
    with pytest.raises(ConfigError, match="dim"):
        backend.open(keys.public, binding_key, DIM + 1)


def test_the_backends_pass_the_options_to_the_one_constructor(backend: Backend, keys, binding_key) -> None:
    """EncryptedSQLiteStore / EncryptedPostgresStore are thin wrappers of EncryptedStore's constructor:
    EncryptedStoreOptions names exactly its keyword options, each given one reaches the store, an unknown one is
    refused."""
    params = inspect.signature(EncryptedStore.__init__).parameters
    keyword_only = {name for name, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(EncryptedStoreOptions.__annotations__) == keyword_only
    with pytest.raises(TypeError, match="threds"):
        backend.open(keys.public, binding_key, DIM, threds=2)
    with _open(backend, keys, binding_key, threads=3, erase_retry_s=7.5) as store:
        assert (store.threads, store.erase_retry_s, store._integrity_key, store._eraser) == (3, 7.5, KEY, None)


def test_sqlite_one_process_at_a_time_and_a_private_file(tmp_path: Path, keys, binding_key) -> None:
    sqlite = Backend("sqlite", tmp_path)
    db = tmp_path / "t.sqlite3"
    with _open(sqlite, keys, binding_key):
        with pytest.raises(ConfigError, match="already open"):
            _open(sqlite, keys, binding_key)
        assert db.stat().st_mode & 0o077 == 0
    _open(sqlite, keys, binding_key).close()  # released on close


def test_tampering_detected_and_named(backend: Backend, keys, binding_key, people) -> None:
    with _open(backend, keys, binding_key) as store:
        store.add("a", "alice", people[0][None])
        store.add("b", "bob", people[1][None])
    data = bytearray(backend.sql("SELECT data FROM blocks WHERE tenant='a'")[0][0])
    data[len(data) // 3] ^= 0x40
    backend.sql("UPDATE blocks SET data=? WHERE tenant='a'", (bytes(data),))
    with pytest.raises(IntegrityError, match="tenant 'a' block 0: authentication failed"):
        _open(backend, keys, binding_key)
    # a block moved to another tenant fails that tenant's key
    good = backend.sql("SELECT data FROM blocks WHERE tenant='b'")[0][0]
    backend.sql("UPDATE blocks SET data=? WHERE tenant='a'", (good,))
    with pytest.raises(IntegrityError, match="tenant 'a'"):
        _open(backend, keys, binding_key)
    backend.sql("DELETE FROM blocks WHERE tenant='a'")
    backend.sql("DELETE FROM templates WHERE tenant='b'")
    with pytest.raises(IntegrityError, match="slots differ"):
        _open(backend, keys, binding_key)


def test_postgres_several_processes_on_one_database(
    tmp_path: Path, postgres_dsn: str, keys, binding_key, core, people
) -> None:
    """Two stores on one PostgreSQL database (as two sidecars): each sees the other's committed changes before it
    scores or changes a tenant, concurrent enrolments never take the same slot, rotations need one process."""
    pg = Backend("postgresql", tmp_path, postgres_dsn)
    with _open(pg, keys, binding_key, core) as one, _open(pg, keys, binding_key, core) as two:
        one.add("a", "alice", people[0][None])
        assert two.verify_encrypted("a", "alice", people[0])[0]  # two reloads tenant a, new to it
        two.add("a", "bob", people[1][None])
        one.add("a", "carol", people[2][None])  # one's copy is older: reloaded under the tenant's lock first
        assert one.live_slot_count("a") == 3 and one.verify_encrypted("a", "bob", people[1])[0]
        assert two.identify_encrypted("a", people[2], 1)[0].subject_id == "carol"
        two.delete_subject("a", "alice")
        with pytest.raises(NotFoundError):
            one.verify_encrypted("a", "alice", people[0])

        def enrol(store: EncryptedStore, who: str) -> None:
            for i in range(4):
                store.add("b", f"{who}{i}", people[i][None] + 0.001 * (1 if who == "x" else -1))

        threads = [threading.Thread(target=enrol, args=(s, w)) for s, w in ((one, "x"), (two, "y"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert one.count("b") == 8 and two.verify_encrypted("b", "x3", people[3])[0]
        assert one.verify_encrypted("b", "y2", people[2])[0] and two.live_slot_count("b") == 8
        with pytest.raises(ConfigError, match="in this process only"):
            one.rotate_binding_key(new_binding_key(), integrity_key_for(new_binding_key()))
    with _open(pg, keys, binding_key, core) as again:  # every block and slot consistent
        assert again.count() == 10 and again.live_slot_count("b") == 8 and again.live_slot_count("a") == 2


def test_postgres_lost_connection_fails_the_call_then_reconnects(
    tmp_path: Path, postgres_dsn: str, keys, binding_key, core, people
) -> None:
    pg = Backend("postgresql", tmp_path, postgres_dsn)
    with _open(pg, keys, binding_key, core) as store:
        store.add("a", "alice", people[0][None])
        pg.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        with pytest.raises(DatabaseUnavailableError):
            store.add("a", "bob", people[1][None])
        assert store.count("a") == 1 and store.live_slot_count("a") == 1  # reconnected; nothing half-written
        store.add("a", "bob", people[1][None])
        assert store.verify_encrypted("a", "bob", people[1])[0] and store.verify_encrypted("a", "alice", people[0])[0]


def _wait(condition, seconds: float = 20.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_deletions_are_erased_in_the_background(backend: Backend, keys, binding_key, core, people) -> None:
    flaky = FlakyKeyService(core)
    with _open(backend, keys, binding_key, flaky, auto_erase=True, erase_retry_s=0.2) as store:
        store.add("a", "alice", np.stack([people[0], people[1]]))
        store.add("a", "bob", people[2][None])
        store.delete_subject("a", "alice")  # key service down: the slots stay dead, retried later
        assert _wait(lambda: flaky.refused > 0)
        assert store._galleries["a"].dirty_blocks() == [0]
        flaky.up = True
        assert _wait(lambda: store._galleries["a"].dirty_blocks() == [])
        assert store.add("a", "carol", people[3][None]) and store.verify_encrypted("a", "bob", people[2])[0]
        assert sorted(r.slot for r in store._slots["a"]) == [0, 2]  # carol took a freed slot


class FlakyKeyService:
    """The in-process key service, unreachable until ``up`` is set."""

    def __init__(self, core: KeyServiceCore) -> None:
        self.core = core
        self.up = False
        self.refused = 0

    def _check(self) -> None:
        if not self.up:
            self.refused += 1
            raise KeyServiceUnavailableError("down")

    def verify(self, request):  # noqa: ANN001, ANN201
        self._check()
        return self.core.verify(request)

    def identify(self, request):  # noqa: ANN001, ANN201
        self._check()
        return self.core.identify(request)

    def refresh(self, request):  # noqa: ANN001, ANN201
        self._check()
        return self.core.refresh(request)
