"""Shared by the key-rotation tests of both stores (SQLite + FAISS, PostgreSQL): filling a store, and a rotation
killed with SIGKILL in the middle of a batch, then resumed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from advface.crypto import TemplateCipher, generate_key, load_key_file, write_key_file
from advface.errors import ConfigError

DIM = 16
REPO = Path(__file__).resolve().parents[2]


def fill(store: Any, n: int, seed: int = 0, tenant: str = "t") -> dict[str, np.ndarray]:
    """Enrol subjects ``s0 .. s<n-1>`` (one random ``DIM``-d template each) in ``tenant``; returns their vectors."""
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    store.add_many(tenant, [(f"s{i}", x[i : i + 1], {"k": "v"}) for i in range(n)])
    return {f"s{i}": x[i] for i in range(n)}


# argv: store module, store class, target (path or dsn), old key file, new key file, encryption call to die at
_KILLER = textwrap.dedent(
    """
    import importlib, os, signal, sys
    from advface.crypto import TemplateCipher, load_key_file
    store_cls = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])
    old, new = load_key_file(sys.argv[4]), load_key_file(sys.argv[5])
    calls = 0
    encrypt = TemplateCipher.encrypt
    def dying_encrypt(self, plaintext, aad):
        global calls
        calls += 1
        if calls == int(sys.argv[6]):  # in the middle of a batch, inside its transaction
            os.kill(os.getpid(), signal.SIGKILL)
        return encrypt(self, plaintext, aad)
    TemplateCipher.encrypt = dying_encrypt
    store = store_cls(sys.argv[3], 16, "cosine", cipher=TemplateCipher([new, old]))
    store.rotate(TemplateCipher(new), batch_size=10)
    print("not killed")
    """
)


def check_rotation_survives_kill_9(
    store_cls: type[Any], target: str | Path, tmp_path: Path, key_ids: Callable[[], list[str | None]]
) -> None:
    """Fill a ``store_cls`` store at ``target`` (95 templates, one key), kill a rotation to a new key (batches of
    10) with SIGKILL inside its 5th batch, then check: 4 batches committed, the unfinished rotation recorded,
    neither key alone opens the store, both together read every row and resume the rotation, and afterwards the
    new key alone finds every subject. ``key_ids()``: the key id of every template row, read from storage."""
    old_key, new_key = generate_key(), generate_key()
    old_file, new_file = write_key_file(tmp_path / "old.key", old_key), write_key_file(tmp_path / "new.key", new_key)
    old, new = TemplateCipher(old_key), TemplateCipher(new_key)
    with store_cls(target, DIM, "cosine", cipher=old) as s:
        vectors = fill(s, 95)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLER,
            store_cls.__module__,
            store_cls.__name__,
            str(target),
            str(old_file),
            str(new_file),
            "45",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    keys = key_ids()
    assert keys.count(new.key_id) == 40 and keys.count(old.key_id) == 55  # 4 batches committed, the 5th lost
    assert store_cls.read_meta(target)["rotation"] == new.key_id
    for alone in (new, old):  # neither key alone opens a half-rotated store
        with pytest.raises(ConfigError, match="rotation to key .* is unfinished"):
            store_cls(target, DIM, "cosine", cipher=alone)
    with store_cls(target, DIM, "cosine", cipher=new.with_previous(old)) as s:  # every row readable
        for sid in ("s0", "s44", "s94"):
            np.testing.assert_array_equal(s.subject_vectors("t", sid)[0], vectors[sid])
        assert s.rotate(new, batch_size=10) == 55  # resumes where it stopped
    with store_cls(target, DIM, "cosine", cipher=new) as s:
        assert s.index_size() == 95
        for sid, v in vectors.items():
            assert s.search("t", v, 1)[0].subject_id == sid


# argv: store module, store class, target (path or dsn), key file, sealed row to die at
_SEAL_KILLER = textwrap.dedent(
    """
    import importlib, os, signal, sys
    from advface.crypto import TemplateCipher, load_key_file
    from advface.store import sealing
    store_cls = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])
    cipher = TemplateCipher(load_key_file(sys.argv[4]))
    calls = 0
    seal = sealing.seal_plain_row
    def dying_seal(*args):
        global calls
        calls += 1
        if calls == int(sys.argv[5]):  # in the middle of a batch, inside its transaction
            os.kill(os.getpid(), signal.SIGKILL)
        return seal(*args)
    sealing.seal_plain_row = dying_seal
    store = store_cls(sys.argv[3], 16, "cosine", cipher=cipher, migrate_plaintext=True)
    store.rotate(cipher, batch_size=10)
    print("not killed")
    """
)


def named_fill(store: Any, n: int) -> dict[str, np.ndarray]:
    """Enrol ``Person 000`` .. (``n`` subjects, every third with a second template, metadata naming them) in tenant
    ``t``; returns each subject's first vector."""
    x = np.random.default_rng(7).standard_normal((n, 2, DIM)).astype(np.float32)
    store.add_many(
        "t",
        [(f"Person {i:03d}", x[i, : 1 + (i % 3 == 0)], {"badge": f"badge-{i:03d}"}) for i in range(n)],
    )
    return {f"Person {i:03d}": x[i, 0] for i in range(n)}


def check_sealing_a_plain_store(
    store_cls: type[Any], target: str | Path, tmp_path: Path, subject_columns: Callable[[], list[tuple[str, str]]]
) -> None:
    """A plain ``store_cls`` store holding 35 subjects is encrypted by ``rotate`` (as ``advface rotate-key
    --new-key-file KEY`` does) with its subject ids sealed too; the pass is killed with SIGKILL inside its second
    batch of 10 subject rows, then: 10 rows sealed, 25 plain, every subject readable; opening with the key finishes
    the pass; no plain id or metadata value left; every subject found once; rotating again changes nothing.
    ``subject_columns()``: ``(id column, metadata column)`` of every subject row, read from storage."""
    with store_cls(target, DIM, "cosine") as s:
        vectors = named_fill(s, 35)
    key_file = write_key_file(tmp_path / "store.key", generate_key())
    cipher = TemplateCipher(load_key_file(key_file))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [store_cls.__module__, store_cls.__name__, str(target), str(key_file), "15"]
    proc = subprocess.run(
        [sys.executable, "-c", _SEAL_KILLER, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    columns = subject_columns()
    plain = [sid for sid, _ in columns if sid.startswith("Person ")]
    assert len(columns) == 35 and len(plain) == 25  # the first batch committed, the second rolled back
    assert store_cls.read_meta(target)["subject_names"] == "sealing"
    with store_cls(target, DIM, "cosine", cipher=cipher) as s:  # opening finishes the pass
        assert s.sealed_names
        assert s.count("t", subjects=True) == 35 and s.count("t") == 47
        for sid, v in vectors.items():
            assert s.search("t", v, 1)[0].subject_id == sid
            assert s.get_subject("t", sid).metadata == {"badge": f"badge-{sid[-3:]}"}
        listed, token = [], ""
        while True:
            page, token = s.list_subjects("t", page_size=8, page_token=token)
            listed += [p.subject_id for p in page]
            if not token:
                break
        assert sorted(listed) == sorted(vectors)  # every subject once
    columns = subject_columns()
    assert all(len(sid) == 32 and meta.startswith('{"sealed": ') for sid, meta in columns)
    assert not any("Person" in sid or "badge" in meta for sid, meta in columns)
    with store_cls(target, DIM, "cosine", cipher=cipher) as s:  # idempotent: nothing left to do
        assert s.rotate(cipher) == 0
        assert s.delete_subject("t", "Person 000") == 2
    assert [c for c in subject_columns() if c not in columns] == []
    assert store_cls.read_meta(target)["subject_names"] == "sealed"
