"""SQLiteFaissStore with encryption at rest: round trip, no plaintext on disk, wrong/missing key, tampering,
plaintext migration and key rotation (including a kill -9 in the middle of a rotation)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from rotation_helpers import DIM, check_rotation_survives_kill_9, check_sealing_a_plain_store, fill, named_fill

from advface.crypto import TemplateCipher, blob_key_id
from advface.errors import ConfigError, IntegrityError
from advface.store import SQLiteFaissStore


def _file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def _blobs(path: Path) -> list[bytes]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT vector FROM templates ORDER BY id")]
    finally:
        conn.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "templates.sqlite3"


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_round_trip_search_and_no_plaintext_on_disk(path: Path, metric: str) -> None:
    cipher = TemplateCipher.generate()
    with SQLiteFaissStore(path, DIM, metric, cipher=cipher) as s:  # type: ignore[arg-type]
        vectors = fill(s, 60)
        assert s.search("t", vectors["s7"], 1)[0].subject_id == "s7"
        np.testing.assert_array_equal(s.subject_vectors("t", "s7")[0], vectors["s7"])
        info = s.encryption_info()
        assert info["encrypted"] and info["key_ids"] == [cipher.key_id]
        on_disk = _file_bytes(path)  # while open: the -wal file holds the recent writes
        assert Path(f"{path}-wal").exists()
        for v in vectors.values():
            raw = v.astype("<f4").tobytes()
            assert raw not in on_disk and raw[:16] not in on_disk and raw[-16:] not in on_disk
    assert all(len(b) == 4 * DIM + 37 and blob_key_id(b) == cipher.key_id for b in _blobs(path))
    with SQLiteFaissStore(path, DIM, metric, cipher=cipher) as s:  # type: ignore[arg-type]
        assert s.index_size("t") == 60
        assert s.search("t", vectors["s59"], 1)[0].subject_id == "s59"


def test_missing_wrong_key_and_plaintext_store(path: Path) -> None:
    cipher = TemplateCipher.generate()
    with SQLiteFaissStore(path, DIM, "cosine", cipher=cipher) as s:
        fill(s, 5)
    with pytest.raises(ConfigError, match="is encrypted .* no encryption key is configured"):
        SQLiteFaissStore(path, DIM, "cosine")
    with pytest.raises(ConfigError, match=f"encrypted under key id\\(s\\) {cipher.key_id}.*wrong key"):
        SQLiteFaissStore(path, DIM, "cosine", cipher=TemplateCipher.generate())
    SQLiteFaissStore(path, DIM, "cosine", cipher=cipher).close()  # the failed opens released the lock
    plain = path.with_name("plain.sqlite3")
    with SQLiteFaissStore(plain, DIM, "cosine") as s:
        fill(s, 5)
    with pytest.raises(ConfigError, match="unencrypted templates but an encryption key is configured"):
        SQLiteFaissStore(plain, DIM, "cosine", cipher=cipher)
    assert SQLiteFaissStore.read_meta(plain).get("encryption") is None  # the refused open changed nothing
    with pytest.raises(ConfigError, match="must be a TemplateCipher"):
        SQLiteFaissStore(plain, DIM, "cosine", cipher=b"k" * 32)  # type: ignore[arg-type]


def test_tampered_or_moved_ciphertext_is_reported_at_open(path: Path) -> None:
    cipher = TemplateCipher.generate()
    with SQLiteFaissStore(path, DIM, "cosine", cipher=cipher) as s:
        fill(s, 10)
        ids = {sid: s.get_subject("t", sid).template_ids[0] for sid in ("s2", "s4", "s5")}
    conn = sqlite3.connect(path)
    blob = bytearray(conn.execute("SELECT vector FROM templates WHERE template_id = ?", (ids["s2"],)).fetchone()[0])
    blob[40] ^= 0x80
    conn.execute("UPDATE templates SET vector = ? WHERE template_id = ?", (bytes(blob), ids["s2"]))
    # a valid ciphertext copied onto another row (an attacker swapping templates between subjects)
    good = conn.execute("SELECT vector FROM templates WHERE template_id = ?", (ids["s4"],)).fetchone()[0]
    conn.execute("UPDATE templates SET vector = ? WHERE template_id = ?", (good, ids["s5"]))
    conn.commit()
    conn.close()
    with pytest.raises(IntegrityError) as err:
        SQLiteFaissStore(path, DIM, "cosine", cipher=cipher)
    message = str(err.value)
    assert "2 encrypted template(s) failed authentication" in message
    assert ids["s2"] in message and ids["s5"] in message and ids["s4"] not in message


def test_plaintext_migration_leaves_no_plaintext(path: Path) -> None:
    with SQLiteFaissStore(path, DIM, "euclidean") as s:
        vectors = fill(s, 200)
    cipher = TemplateCipher.generate()
    with SQLiteFaissStore(path, DIM, "euclidean", cipher=cipher, migrate_plaintext=True) as s:
        assert s.encryption_info()["plaintext_rows"]
        assert s.search("t", vectors["s3"], 1)[0].subject_id == "s3"  # readable during the migration
        assert s.rotate(cipher, batch_size=64) == 200
        assert not s.encryption_info()["plaintext_rows"]
        on_disk = _file_bytes(path)
        assert not any(v.astype("<f4").tobytes()[:16] in on_disk for v in vectors.values())
    with SQLiteFaissStore(path, DIM, "euclidean", cipher=cipher) as s:
        np.testing.assert_array_equal(s.subject_vectors("t", "s9")[0], vectors["s9"])
    with pytest.raises(ConfigError, match="not encrypted"):
        with SQLiteFaissStore(path.with_name("p2.sqlite3"), DIM, "euclidean") as s:
            s.rotate(cipher)


def test_rotation_online(path: Path) -> None:
    old, new = TemplateCipher.generate(), TemplateCipher.generate()
    with SQLiteFaissStore(path, DIM, "cosine", cipher=old) as s:
        vectors = fill(s, 50)
    with SQLiteFaissStore(path, DIM, "cosine", cipher=new.with_previous(old)) as s:
        assert set(s.encryption_info()["key_ids"]) == {old.key_id, new.key_id}  # type: ignore[call-overload]
        vectors.update(fill(s, 3, seed=9, tenant="u"))  # new rows already under the new key
        assert s.rotate(new, batch_size=7) == 50
        assert s.rotate(new) == 0  # nothing left
        assert s.encryption_info()["key_ids"] == [new.key_id] and s.encryption_info()["rotation"] is None
    assert {blob_key_id(b) for b in _blobs(path)} == {new.key_id}
    with pytest.raises(ConfigError, match="wrong key"):
        SQLiteFaissStore(path, DIM, "cosine", cipher=old)
    with SQLiteFaissStore(path, DIM, "cosine", cipher=new) as s:
        np.testing.assert_array_equal(s.subject_vectors("t", "s49")[0], vectors["s49"])


def test_rotation_survives_kill_9_and_resumes(path: Path, tmp_path: Path) -> None:
    check_rotation_survives_kill_9(SQLiteFaissStore, path, tmp_path, lambda: [blob_key_id(b) for b in _blobs(path)])


def test_cli_keygen_and_rotate_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from advface.cli.main import main

    data = tmp_path / "data"
    data.mkdir()
    db = data / "templates.sqlite3"
    with SQLiteFaissStore(db, DIM, "cosine") as s:
        vectors = fill(s, 30)
    assert main(["keygen", "--out", str(tmp_path / "a.key")]) == 0
    assert (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    assert main(["keygen", "--out", str(tmp_path / "a.key")]) == 2  # never overwrites a key
    assert main(["keygen", "--out", str(tmp_path / "b.key")]) == 0
    capsys.readouterr()
    # encrypt the plaintext store, then rotate a -> b
    assert main(["rotate-key", "--data-dir", str(data), "--new-key-file", str(tmp_path / "a.key"), "-q"]) == 0
    assert "encrypted 30 templates" in capsys.readouterr().out
    assert main(["rotate-key", "--db", str(db), "--new-key-file", str(tmp_path / "b.key")]) == 2  # old key missing
    assert "a.key" not in capsys.readouterr().err
    assert (
        main(
            [
                "rotate-key",
                "--data-dir",
                str(data),
                "--old-key-file",
                str(tmp_path / "a.key"),
                "--new-key-file",
                str(tmp_path / "b.key"),
                "--batch-size",
                "4",
                "-q",
            ]
        )
        == 0
    )
    assert "re-encrypted 30 templates" in capsys.readouterr().out
    from advface.crypto import load_key_file

    b = TemplateCipher(load_key_file(tmp_path / "b.key"))
    with SQLiteFaissStore(db, DIM, "cosine", cipher=b) as s:
        np.testing.assert_array_equal(s.subject_vectors("t", "s3")[0], vectors["s3"])
    (tmp_path / "b.key").chmod(0o644)
    assert main(["rotate-key", "--db", str(db), "--new-key-file", str(tmp_path / "b.key")]) == 2
    assert "chmod 600" in capsys.readouterr().err


def _subject_columns(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return [(r[0], r[1]) for r in conn.execute("SELECT subject_id, metadata FROM subjects ORDER BY id")]
    finally:
        conn.close()


def test_a_store_created_encrypted_seals_subject_ids_and_metadata(path: Path) -> None:
    cipher = TemplateCipher.generate()
    rng = np.random.default_rng(3)
    names = [f"Jane Doe {i}" for i in range(12)]
    x = rng.standard_normal((12, DIM)).astype(np.float32)
    with SQLiteFaissStore(path, DIM, "cosine", cipher=cipher) as s:
        assert s.sealed_names
        s.add_many("acme", [(n, x[i : i + 1], {"badge": f"B-{i:04d}-secret"}) for i, n in enumerate(names)])
        s.add("acme", names[0], x[:1] + 0.01, {"desk": "4th floor"})  # a second template, metadata merged
        assert s.get_subject("acme", names[0]).metadata == {"badge": "B-0000-secret", "desk": "4th floor"}
        assert s.delete_template("acme", s.get_subject("acme", names[1]).template_ids[0]) == names[1]
        on_disk = _file_bytes(path)
    for text in [*names, "B-0005-secret", "4th floor", "badge"]:
        assert text.encode() not in on_disk
    stored = _subject_columns(path)
    assert all(len(sid) == 32 and meta.startswith('{"sealed": ') for sid, meta in stored)
    with SQLiteFaissStore(path, DIM, "cosine", cipher=cipher) as s:  # the index rebuilt from sealed rows
        assert s.search("acme", x[7], 1)[0].subject_id == names[7]
        listed = []
        page, token = s.list_subjects("acme", page_size=5)
        while True:
            listed += [p.subject_id for p in page]
            if not token:
                break
            page, token = s.list_subjects("acme", page_size=5, page_token=token)
        assert sorted(listed) == sorted(names[:1] + names[2:])
        assert s.delete_subject("acme", names[0]) == 2
    conn = sqlite3.connect(path)
    try:  # a sealed row moved to another subject's place fails authentication, never opens as the other
        (a_id, a_meta), (b_id, _) = _subject_columns(path)[:2]
        conn.execute("UPDATE subjects SET metadata = ? WHERE subject_id = ?", (a_meta, b_id))
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(IntegrityError):
        with SQLiteFaissStore(path, DIM, "cosine", cipher=cipher) as s:
            s.list_subjects("acme", page_size=100)


def test_rotation_reseals_subjects_and_keeps_their_ids(path: Path) -> None:
    old, new = TemplateCipher.generate(), TemplateCipher.generate()
    with SQLiteFaissStore(path, DIM, "euclidean", cipher=old) as s:
        vectors = fill(s, 30)
    before = [sid for sid, _ in _subject_columns(path)]
    with SQLiteFaissStore(path, DIM, "euclidean", cipher=new.with_previous(old)) as s:
        assert s.rotate(new, batch_size=8) == 30
    from advface.store.sealing import sealed_blob

    assert [sid for sid, _ in _subject_columns(path)] == before  # lookups unchanged
    assert {blob_key_id(sealed_blob(meta)) for _, meta in _subject_columns(path)} == {new.key_id}
    with SQLiteFaissStore(path, DIM, "euclidean", cipher=new) as s:
        assert s.get_subject("t", "s17").metadata == {"k": "v"}
        assert s.search("t", vectors["s17"], 1)[0].subject_id == "s17"


def test_a_store_encrypted_after_it_held_subjects_is_sealed_by_the_migration(path: Path) -> None:
    with SQLiteFaissStore(path, DIM, "euclidean") as s:
        vectors = named_fill(s, 12)
    cipher = TemplateCipher.generate()
    with SQLiteFaissStore(path, DIM, "euclidean", cipher=cipher, migrate_plaintext=True) as s:
        assert not s.sealed_names  # plain until the migration's rotate
        assert s.rotate(cipher, batch_size=5) == 16
        assert s.sealed_names and s.get_subject("t", "Person 004").metadata == {"badge": "badge-004"}
        assert s.search("t", vectors["Person 007"], 1)[0].subject_id == "Person 007"
        s.add("t", "Person 100", vectors["Person 001"] + 1.0, {"badge": "badge-100"})
    on_disk = _file_bytes(path)
    for text in ["Person 0", "Person 100", "badge-0"]:
        assert text.encode() not in on_disk
    with SQLiteFaissStore(path, DIM, "euclidean", cipher=cipher) as s:
        assert s.sealed_names and s.get_subject("t", "Person 100").metadata == {"badge": "badge-100"}
        assert s.search("t", vectors["Person 011"], 1)[0].subject_id == "Person 011"


def test_an_encrypted_store_with_plain_ids_is_sealed_by_its_next_rotation(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store migrated before migrations sealed ids (encrypted, plain ids) warns at open with the command, and is
    sealed by `advface rotate-key`."""
    with SQLiteFaissStore(path, DIM, "euclidean") as s:
        vectors = named_fill(s, 6)
    cipher = TemplateCipher.generate()
    with SQLiteFaissStore(path, DIM, "euclidean", cipher=cipher, migrate_plaintext=True) as s:
        s._seal_names = lambda batch_size: 0  # type: ignore[method-assign]  # as an older advface migrated it
        s.rotate(cipher)
        assert not s.sealed_names
    assert {sid for sid, _ in _subject_columns(path)} == set(vectors)
    new = TemplateCipher.generate()
    with caplog.at_level("WARNING", logger="advface.store"):
        with SQLiteFaissStore(path, DIM, "euclidean", cipher=new.with_previous(cipher)) as s:
            assert "seal them with `advface rotate-key`" in caplog.text
            assert s.rotate(new) == 8 and s.sealed_names
    assert not any(sid.startswith("Person") for sid, _ in _subject_columns(path))
    with SQLiteFaissStore(path, DIM, "euclidean", cipher=new) as s:
        assert s.search("t", vectors["Person 005"], 1)[0].subject_id == "Person 005"


def test_sealing_a_plain_store_survives_kill_9_and_resumes(path: Path, tmp_path: Path) -> None:
    check_sealing_a_plain_store(SQLiteFaissStore, path, tmp_path, lambda: _subject_columns(path))
