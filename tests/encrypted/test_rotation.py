"""Rotation of an encrypted store to a new key pair through the key service: resumable, swapped at once, removed
templates erased on the way; the key service refuses rotations it was not set up for."""

from __future__ import annotations

from pathlib import Path

import pytest
from encrypted_helpers import Backend

from advface.encrypted.errors import KeyServiceUnavailableError, RefusedError
from advface.encrypted.keys import generate_keys
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
from advface.encrypted.requests import prepare_rotate
from advface.encrypted.store import EncryptedStore
from advface.errors import ConfigError

DIM = 8
KEY = b"i" * 32
POLICY = DecisionPolicy("euclidean", -0.3, top_k_max=5)


def _open(backend: Backend, public, binding_key, core=None) -> EncryptedStore:  # noqa: ANN001
    return backend.open(public, binding_key, DIM, keyservice=core, integrity_key=KEY, auto_erase=False)


class FailingAfter:
    """The rotating key service, unreachable after ``n`` rotate calls (an interrupted rotation)."""

    def __init__(self, core: KeyServiceCore, n: int) -> None:
        self.core, self.n = core, n

    def rotate(self, request):  # noqa: ANN001, ANN201
        if self.n <= 0:
            raise KeyServiceUnavailableError("down")
        self.n -= 1
        return self.core.rotate(request)


def test_rotation_is_resumable_and_swaps_at_once(backend: Backend, keys, binding_key, rng) -> None:
    new = generate_keys()
    people = rng.standard_normal((6, DIM)) * 0.3
    old_core = KeyServiceCore(keys, binding_key, POLICY)
    rotating = KeyServiceCore(keys, binding_key, POLICY, next_keys=new.public)
    new_core = KeyServiceCore(new, binding_key, POLICY)
    with _open(backend, keys.public, binding_key, old_core) as store:
        store.add_many("a", [(f"p{i}", people[i][None], {"k": str(i)}) for i in range(4)])
        store.add("b", "bob", people[4][None])
        store.add("c", "carol", people[5][None])
        store.delete_subject("a", "p3")  # a dead slot: erased by the rotation
        with pytest.raises(KeyServiceUnavailableError):  # tenant a done, then the key service goes down
            store.rotate_key_pair(new.public, FailingAfter(rotating, 1))
        assert store.keys.fingerprint == keys.fingerprint and store.verify_encrypted("a", "p1", people[1])[0]
    assert backend.sql("SELECT tenant FROM rotated") == [("a",)]
    with pytest.raises(ConfigError, match="unfinished"):  # the new key pair cannot open it before the swap
        _open(backend, new.public, binding_key)
    with _open(backend, keys.public, binding_key, old_core) as store:  # still served under the old key pair
        assert store.verify_encrypted("b", "bob", people[4])[0]
        store.add("c", "dave", people[0][None])  # tenant c changes before the rotation resumes
        with pytest.raises(ConfigError, match="same CKKS parameters|already under"):
            store.rotate_key_pair(keys.public, rotating)
        assert store.rotate_key_pair(new.public, rotating) == 2  # a skipped (unchanged), b and c done
        assert store.keys.fingerprint == new.fingerprint
        store.keyservice = new_core
        assert store.verify_encrypted("a", "p1", people[1])[0] and not store.verify_encrypted("a", "p1", people[2])[0]
        assert store.identify_encrypted("c", people[0], 2)[0].subject_id == "dave"
        assert store._galleries["a"].dirty_blocks() == []  # p3's slot erased on the way
    with pytest.raises(ConfigError, match="wrong key pair"):
        _open(backend, keys.public, binding_key)
    with _open(backend, new.public, binding_key, new_core) as store:
        assert store.get_subject("a", "p2").metadata == {"k": "2"}  # sealed names unchanged
        assert store.identify_encrypted("a", people[2], 1)[0].subject_id == "p2"
        assert store.verify_encrypted("c", "carol", people[5])[0]
        assert store.count() == 6
    assert backend.sql("SELECT COUNT(*) FROM rotated")[0][0] == 0


def test_key_service_rotates_only_to_its_next_key_pair(tmp_path: Path, keys, binding_key, rng) -> None:
    new = generate_keys()
    with _open(Backend("sqlite", tmp_path), keys.public, binding_key) as store:
        store.add("a", "alice", (rng.standard_normal(DIM) * 0.3)[None])
        gallery = store._galleries["a"]
        job = gallery.refresh_job(0)
    plain = KeyServiceCore(keys, binding_key, POLICY)
    with pytest.raises(RefusedError, match="no next key pair"):
        plain.rotate(prepare_rotate(gallery, binding_key, "a", job, new.fingerprint))
    rotating = KeyServiceCore(keys, binding_key, POLICY, next_keys=new.public)
    with pytest.raises(RefusedError, match="rotation to key pair"):
        rotating.rotate(prepare_rotate(gallery, binding_key, "a", job, generate_keys().fingerprint))
    request = prepare_rotate(gallery, binding_key, "a", job, new.fingerprint)
    forged = type(request)(**{**request.__dict__, "target": generate_keys().fingerprint})
    with pytest.raises(RefusedError):  # the target is MAC'd: changing it breaks the binding
        rotating.rotate(forged)
    assert len(rotating.rotate(request)) == gallery.columns


def test_rotation_while_serving_redoes_a_block_changed_meanwhile(backend: Backend, keys, binding_key, rng) -> None:
    new = generate_keys()
    people = rng.standard_normal((4, DIM)) * 0.3
    core = KeyServiceCore(keys, binding_key, POLICY, next_keys=new)  # the next secret key too: decides under both
    calls: list[str] = []
    with _open(backend, keys.public, binding_key, core) as store:

        class ServingMeanwhile:
            """The key service; while it works on the first block, the store serves a Verify and an enrolment."""

            def rotate(self, request):  # noqa: ANN001, ANN201
                calls.append(request.tenant)
                if len(calls) == 1:
                    assert store.verify_encrypted("a", "p0", people[0])[0]  # the lock is free meanwhile
                    store.add("a", "late", people[3][None])  # block a changes: its copy is thrown away
                return core.rotate(request)

        store.add_many("a", [(f"p{i}", people[i][None], None) for i in range(2)])
        store.add("b", "bob", people[2][None])
        progress: list[tuple[int, int, int]] = []
        assert store.rotate_key_pair(new.public, ServingMeanwhile(), progress=lambda *p: progress.append(p)) == 2
        assert calls == ["a", "b", "a"]  # a done again on the second pass
        assert progress[0] == (0, 2, 0) and progress[-1] == (2, 2, 2)
        assert store.keys.fingerprint == new.fingerprint
        assert core.holds(new.fingerprint) and not core.holds(generate_keys().fingerprint)
        assert store.verify_encrypted("a", "late", people[3])[0]  # the enrolment made meanwhile is in the new blocks
        assert store.verify_encrypted("b", "bob", people[2])[0] and not store.verify_encrypted("b", "bob", people[0])[0]
        with pytest.raises(RefusedError, match="current key pair"):  # rotations start from the service's own pair
            gallery = store._galleries["a"]
            core.rotate(prepare_rotate(gallery, binding_key, "a", gallery.refresh_job(0), new.fingerprint))
    assert backend.sql("SELECT COUNT(*) FROM rotated")[0][0] == 0
