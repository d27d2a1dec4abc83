"""Rotation of the binding key: the key service accepts the previous key for a grace period only, the folder steps
resume after a crash, and the store re-tags its blocks resumably under the new key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from encrypted_helpers import Backend

import advface.encrypted.store as store_module
from advface.crypto import load_key_file
from advface.encrypted.binding import BindingKeyring, binding_fingerprint
from advface.encrypted.errors import RefusedError
from advface.encrypted.keys import (
    BINDING_NEW_FILE,
    end_binding_grace,
    load_binding_key,
    load_binding_keyring,
    new_binding_key,
    start_binding_rotation,
    write_keyservice_folder,
)
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
from advface.encrypted.requests import prepare_scores
from advface.encrypted.store import EncryptedSQLiteStore, EncryptedStore, integrity_key_for
from advface.errors import ConfigError, IntegrityError

DIM = 8
POLICY = DecisionPolicy("euclidean", -0.3, top_k_max=5)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _request(store: EncryptedSQLiteStore, key: bytes, probe: np.ndarray, clock: Clock):  # noqa: ANN202
    gallery = store._galleries["t"]
    return prepare_scores(gallery, key, "verify", "t", probe, refs=gallery.live_slots(), clock=clock).request


def test_previous_key_is_accepted_for_the_grace_period_only(tmp_path: Path, keys, rng) -> None:
    old, new, other = new_binding_key(), new_binding_key(), new_binding_key()
    clock = Clock(1000.0)
    people = rng.standard_normal((2, DIM)) * 0.3
    with EncryptedSQLiteStore(tmp_path / "t.sqlite3", keys.public, old, DIM, "euclidean", auto_erase=False) as store:
        store.add("t", "alice", people[0][None])
        keyring = BindingKeyring(new, old, previous_until=1060.0)
        core = KeyServiceCore(keys, keyring, POLICY, clock=clock, window_s=1e9)
        assert core.verify(_request(store, new, people[0], clock)).match
        assert core.verify(_request(store, old, people[0], clock)).match  # within the grace period
        with pytest.raises(RefusedError, match="MAC mismatch"):
            core.verify(_request(store, other, people[0], clock))
        clock.now = 1060.0
        with pytest.raises(RefusedError, match="grace period has ended"):
            core.verify(_request(store, old, people[0], clock))
        assert core.verify(_request(store, new, people[0], clock)).match


def test_folder_rotation_resumes_and_a_running_service_picks_it_up(tmp_path: Path, keys, rng) -> None:
    folder = write_keyservice_folder(tmp_path / "k", keys, new_binding_key())
    old = load_binding_key(folder)
    clock = Clock(5000.0)
    core = KeyServiceCore(
        keys,
        load_binding_keyring(folder, clock.now),
        POLICY,
        clock=clock,
        window_s=1e9,
        reload_binding=lambda: load_binding_keyring(folder, clock.now),
    )
    new = start_binding_rotation(folder, 100.0, now=clock.now)
    assert load_binding_key(folder) == new != old
    assert not (folder / BINDING_NEW_FILE).exists()
    ring = load_binding_keyring(folder, clock.now)
    assert (ring.current, ring.previous, ring.previous_until) == (new, old, 5100.0)
    with pytest.raises(ConfigError, match="grace period"):  # no second rotation while the first one's grace runs
        start_binding_rotation(folder, 100.0, now=clock.now)

    people = rng.standard_normal((1, DIM)) * 0.3
    with EncryptedSQLiteStore(tmp_path / "t.sqlite3", keys.public, new, DIM, "euclidean", auto_erase=False) as store:
        store.add("t", "alice", people)
        assert core.verify(_request(store, new, people[0], clock)).match  # reloaded on the unknown MAC
        assert core.verify(_request(store, old, people[0], clock)).match
        assert end_binding_grace(folder)
        core._reloaded_at = -1e9  # let the next mismatch reload at once
        with pytest.raises(RefusedError):
            core.verify(_request(store, old, people[0], clock))
        assert load_binding_keyring(folder).previous is None


def test_interrupted_folder_rotation_is_finished_with_the_same_key(tmp_path: Path, keys, monkeypatch) -> None:
    folder = write_keyservice_folder(tmp_path / "k", keys, new_binding_key())
    old = load_binding_key(folder)
    import advface.encrypted.keys as keys_module

    real = keys_module.os.replace

    def crash_on_swap(src, dst):  # noqa: ANN001, ANN202
        if str(dst).endswith("/binding.key"):
            raise OSError("crash")  # the new key is written, the previous one recorded, the swap not done
        return real(src, dst)

    monkeypatch.setattr(keys_module.os, "replace", crash_on_swap)
    with pytest.raises(OSError, match="crash"):
        start_binding_rotation(folder, 60.0, now=0.0)
    monkeypatch.setattr(keys_module.os, "replace", real)
    assert load_binding_key(folder) == old and load_binding_keyring(folder, 1.0).previous is None  # nothing active
    pending = load_key_file(folder / BINDING_NEW_FILE)
    new = start_binding_rotation(folder, 60.0, now=1.0)
    assert load_binding_key(folder) == new == pending != old  # finished with the key written before the crash
    assert load_binding_keyring(folder, 2.0).previous == old


def test_store_rotation_is_resumable_and_refuses_the_old_key_after(backend: Backend, keys, rng, monkeypatch) -> None:
    old, new = new_binding_key(), new_binding_key()
    people = rng.standard_normal((3, DIM)) * 0.3

    def open_(binding: bytes, next_binding: tuple[bytes, bytes] | None = None, core=None) -> EncryptedStore:  # noqa: ANN001
        return backend.open(
            keys.public,
            binding,
            DIM,
            keyservice=core,
            integrity_key=integrity_key_for(binding),
            auto_erase=False,
            next_binding=next_binding,
        )

    with open_(old) as store:
        for i, tenant in enumerate(("a", "b", "c")):
            store.add(tenant, f"p{i}", people[i][None], {"badge": f"B{i}"})
    real = store_module.retag_block
    calls = {"n": 0}

    def crash_after_one(*args):  # noqa: ANN002, ANN202
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt  # as a kill: the first block's transaction is committed, the rest not
        return real(*args)

    monkeypatch.setattr(store_module, "retag_block", crash_after_one)
    with open_(old) as store, pytest.raises(KeyboardInterrupt):
        store.rotate_binding_key(new, integrity_key_for(new))
    monkeypatch.setattr(store_module, "retag_block", real)
    with pytest.raises(ConfigError, match="unfinished"):
        open_(old)
    with pytest.raises(ConfigError, match="goes to"):  # resuming needs the same new key
        open_(old, (new_binding_key(), integrity_key_for(new)))
    with open_(old, (new, integrity_key_for(new))) as store:  # blocks under both keys are accepted meanwhile
        assert store.rotate_binding_key(new, integrity_key_for(new)) == 2  # the two blocks left
    with pytest.raises(ConfigError, match="under binding key"):
        open_(old)
    core = KeyServiceCore(keys, new, POLICY)
    with open_(new, core=core) as store:  # names key re-wrapped, blocks re-tagged: everything opens and matches
        assert store.get_subject("b", "p1").metadata == {"badge": "B1"}
        assert store.verify_encrypted("c", "p2", people[2])[0]
        assert not store.verify_encrypted("c", "p2", people[0])[0]
    assert dict(backend.sql("SELECT key, value FROM meta"))["binding_fingerprint"] == binding_fingerprint(new)


def test_store_rotation_names_a_tampered_block(backend: Backend, keys, rng) -> None:
    old, new = new_binding_key(), new_binding_key()
    with backend.open(keys.public, old, DIM, integrity_key=integrity_key_for(old)) as store:
        store.add("a", "p", rng.standard_normal((1, DIM)) * 0.3)
        ((data,),) = backend.sql("SELECT data FROM blocks")
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 1
        backend.sql("UPDATE blocks SET data=?", (bytes(flipped),))
        with pytest.raises(IntegrityError, match="tenant 'a' block 0"):
            store.rotate_binding_key(new, integrity_key_for(new))
