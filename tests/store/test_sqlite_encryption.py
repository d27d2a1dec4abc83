"""SQLiteFaissStore with encryption at rest: round trip, no plaintext on disk, wrong/missing key, tampering,
plaintext migration and key rotation (including a kill -9 in the middle of a rotation). Sealed subject ids and
metadata: test_sealing.py (both stores)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from rotation_helpers import DIM, check_rotation_survives_kill_9, fill

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
