from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from advface.encrypted.errors import KeyServiceUnavailableError
from advface.encrypted.keys import generate_keys
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
from advface.encrypted.store import EncryptedSQLiteStore
from advface.errors import (
    ConfigError,
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


def _open(path: Path, keys, binding_key, core=None, **kw) -> EncryptedSQLiteStore:  # noqa: ANN001
    kw.setdefault("auto_erase", False)
    return EncryptedSQLiteStore(
        path, keys.public, binding_key, DIM, "euclidean", keyservice=core, integrity_key=KEY, **kw
    )


def test_enrol_verify_identify_and_reopen(tmp_path: Path, keys, binding_key, core, people, rng) -> None:
    db = tmp_path / "t.sqlite3"
    with _open(db, keys, binding_key, core) as store:
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
    with _open(db, keys, binding_key, core) as again:
        assert again.get_subject("a", "alice").metadata == {"team": "x"}
        assert again.get_subject("a", "alice").template_ids == ids
        assert again.verify_encrypted("a", "alice", people[0])[0]
        assert again.live_slot_count("a") == 7


def test_replace_merge_and_listing(tmp_path: Path, keys, binding_key, core, people) -> None:
    with _open(tmp_path / "t.sqlite3", keys, binding_key, core) as store:
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


def _database_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def test_subject_ids_and_metadata_are_sealed_on_disk(tmp_path: Path, keys, binding_key, core, people) -> None:
    db = tmp_path / "t.sqlite3"
    names = [f"Jane Doe {i}" for i in range(4)]
    with _open(db, keys, binding_key, core) as store:
        assert store.sealed_names
        store.add_many("acme", [(n, people[i][None], {"badge": f"B-{i:04d}-secret"}) for i, n in enumerate(names)])
        store.add("acme", names[0], people[0][None] + 0.01, {"desk": "4th floor"})  # metadata merged
        assert store.get_subject("acme", names[0]).metadata == {"badge": "B-0000-secret", "desk": "4th floor"}
        assert store.delete_subject("acme", names[3]) == 1
        assert store.identify_encrypted("acme", people[2], 1)[0].subject_id == names[2]
        on_disk = _database_bytes(db)  # while open: the -wal file holds the recent writes
    for text in [*names, "Jane", "B-0001-secret", "4th floor", "badge", "desk"]:
        assert text.encode() not in on_disk and text.encode() not in _database_bytes(db)
    raw = sqlite3.connect(db)
    subjects = raw.execute("SELECT subject_id, metadata FROM subjects ORDER BY subject_id").fetchall()
    stored = {r[0] for r in raw.execute("SELECT subject_id FROM templates")}
    assert len(subjects) == 3 and all(len(sid) == 32 and meta.startswith('{"sealed": ') for sid, meta in subjects)
    assert stored == {sid for sid, _ in subjects}
    with _open(db, keys, binding_key, core) as again:  # reopened: ids come back from the sealed rows
        assert again.verify_encrypted("acme", names[0], people[0])[0]
        assert again.get_subject("acme", names[1]).metadata == {"badge": "B-0001-secret"}
        assert sorted(s.subject_id for s in again.list_subjects("acme")[0]) == names[:3]
    with pytest.raises(ConfigError, match="under binding key"):  # under another binding key: refused, nothing read
        EncryptedSQLiteStore(db, keys.public, b"x" * 32, DIM, "euclidean", integrity_key=KEY)
    raw.execute("DELETE FROM meta WHERE key='binding_fingerprint'")  # a store made before the fingerprint was kept
    raw.commit()
    with pytest.raises(IntegrityError, match="names key"):  # still refused: the names key does not unwrap
        EncryptedSQLiteStore(db, keys.public, b"x" * 32, DIM, "euclidean", integrity_key=KEY)
    # a sealed row moved to another subject's place fails authentication, never opens as the other
    raw.execute("UPDATE subjects SET metadata=? WHERE subject_id=?", (subjects[0][1], subjects[1][0]))
    raw.commit()
    raw.close()
    with pytest.raises(IntegrityError, match="tenant 'acme': a subject row fails to open"):
        _open(db, keys, binding_key, core)


def test_an_empty_store_made_before_sealing_is_sealed(tmp_path: Path, keys, binding_key, people) -> None:
    db = tmp_path / "t.sqlite3"
    _open(db, keys, binding_key).close()
    raw = sqlite3.connect(db)
    raw.execute("DELETE FROM meta WHERE key IN ('subject_names', 'names_key')")
    raw.commit()
    raw.close()
    with _open(db, keys, binding_key) as store:
        assert store.sealed_names
        store.add("a", "Jane Doe", people[0][None], {"k": "v"})
    assert b"Jane Doe" not in _database_bytes(db)


def test_delete_then_erase(tmp_path: Path, keys, binding_key, core, people) -> None:
    db = tmp_path / "t.sqlite3"
    with _open(db, keys, binding_key, core) as store:
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
    with _open(db, keys, binding_key, core) as again:
        assert again.verify_encrypted("a", "carol", people[3])[0]


def test_key_service_down_changes_nothing(tmp_path: Path, keys, binding_key, people) -> None:
    with _open(tmp_path / "t.sqlite3", keys, binding_key, DownKeyService()) as store:
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
    with _open(tmp_path / "u.sqlite3", keys, binding_key, None) as store:
        store.add("a", "alice", people[0][None])
        with pytest.raises(PreconditionError, match="no key service"):
            store.verify_encrypted("a", "alice", people[0])


def test_failed_write_leaves_memory_as_the_database(
    tmp_path: Path, keys, binding_key, core, people, monkeypatch
) -> None:
    with _open(tmp_path / "t.sqlite3", keys, binding_key, core) as store:
        store.add("a", "alice", people[0][None])

        def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise sqlite3.OperationalError("disk full")

        monkeypatch.setattr(store, "_write_blocks", broken)
        with pytest.raises(sqlite3.OperationalError):
            store.add("a", "bob", people[1][None])
        with pytest.raises(sqlite3.OperationalError):
            store.delete_subject("a", "alice")
        monkeypatch.undo()
        assert store.count("a") == 1 and store.live_slot_count("a") == 1
        assert store.verify_encrypted("a", "alice", people[0])[0]


def test_wrong_key_pair_or_shape_refused(tmp_path: Path, keys, binding_key, people) -> None:
    db = tmp_path / "t.sqlite3"
    _open(db, keys, binding_key).close()
    with pytest.raises(ConfigError, match="wrong key pair"):
        EncryptedSQLiteStore(db, generate_keys().public, binding_key, DIM, "euclidean")
    with pytest.raises(ConfigError, match="dim"):
        EncryptedSQLiteStore(db, keys.public, binding_key, DIM + 1, "euclidean")


def test_one_process_at_a_time_and_a_private_file(tmp_path: Path, keys, binding_key) -> None:
    db = tmp_path / "t.sqlite3"
    with _open(db, keys, binding_key):
        with pytest.raises(ConfigError, match="already open"):
            _open(db, keys, binding_key)
        assert db.stat().st_mode & 0o077 == 0
    _open(db, keys, binding_key).close()  # released on close


def test_tampering_detected_and_named(tmp_path: Path, keys, binding_key, people) -> None:
    db = tmp_path / "t.sqlite3"
    with _open(db, keys, binding_key) as store:
        store.add("a", "alice", people[0][None])
        store.add("b", "bob", people[1][None])
    raw = sqlite3.connect(db)
    data = bytearray(raw.execute("SELECT data FROM blocks WHERE tenant='a'").fetchone()[0])
    data[len(data) // 3] ^= 0x40
    raw.execute("UPDATE blocks SET data=? WHERE tenant='a'", (bytes(data),))
    raw.commit()
    with pytest.raises(IntegrityError, match="tenant 'a' block 0: authentication failed"):
        _open(db, keys, binding_key)
    # a block moved to another tenant fails that tenant's key
    good = raw.execute("SELECT data FROM blocks WHERE tenant='b'").fetchone()[0]
    raw.execute("UPDATE blocks SET data=? WHERE tenant='a'", (good,))
    raw.commit()
    with pytest.raises(IntegrityError, match="tenant 'a'"):
        _open(db, keys, binding_key)
    raw.execute("DELETE FROM blocks WHERE tenant='a'")
    raw.execute("DELETE FROM templates WHERE tenant='b'")
    raw.commit()
    raw.close()
    with pytest.raises(IntegrityError, match="slots differ"):
        _open(db, keys, binding_key)


def _wait(condition, seconds: float = 20.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_deletions_are_erased_in_the_background(tmp_path: Path, keys, binding_key, core, people) -> None:
    flaky = FlakyKeyService(core)
    with _open(tmp_path / "t.sqlite3", keys, binding_key, flaky, auto_erase=True, erase_retry_s=0.2) as store:
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
