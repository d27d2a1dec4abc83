"""Sealed subject ids and metadata in PostgresStore (advface.store.sealing), on a real PostgreSQL + pgvector server:
no plaintext id or metadata value in any table, lookups / paging / search / deletes through keyed hashes, rows moved
between subjects refused, key rotation re-wrapping the names key and re-sealing every subject row; a plain store's
ids sealed by its encryption migration (kill -9 in the middle, resumed), and a replica opened before that."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
import pytest
from rotation_helpers import DIM, check_sealing_a_plain_store, fill, named_fill

from advface.crypto import TemplateCipher, blob_key_id
from advface.errors import IntegrityError
from advface.store.postgres import PostgresStore
from advface.store.sealing import NAMES_KEY_META, NAMES_META, SEALED, sealed_blob

TABLES = ("meta", "tenants", "subjects", "templates")


def _all_rows_text(dsn: str) -> str:
    """Every row of every table of the store, as PostgreSQL's text form of the row (bytea as hex)."""
    with psycopg.connect(dsn) as conn:
        parts = []
        for table in TABLES:
            parts += [r[0] for r in conn.execute(f"SELECT t::text FROM advface_{table} t")]
    return "\n".join(parts)


def _subject_columns(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return [(r[0], r[1]) for r in conn.execute("SELECT subject_id, metadata FROM advface_subjects ORDER BY id")]


def test_a_store_created_encrypted_keeps_no_plaintext_id_or_metadata(postgres_dsn: str) -> None:
    cipher = TemplateCipher.generate()
    rng = np.random.default_rng(3)
    names = [f"Jane Doe {i}" for i in range(12)]
    x = rng.standard_normal((12, DIM)).astype(np.float32)
    with PostgresStore(postgres_dsn, DIM, "cosine", cipher=cipher) as s:
        assert s.sealed_names
        s.add_many("acme", [(n, x[i : i + 1], {"badge": f"B-{i:04d}-secret"}) for i, n in enumerate(names)])
        s.add("acme", names[0], x[:1] + 0.01, {"desk": "4th floor"})  # a second template, metadata merged
        assert s.get_subject("acme", names[0]).metadata == {"badge": "B-0000-secret", "desk": "4th floor"}
        assert s.delete_template("acme", s.get_subject("acme", names[1]).template_ids[0]) == names[1]
        s.add("acme", names[2], x[2:3], {"new": "value-after-replace"}, replace=True)
        assert s.get_subject("acme", names[2]).metadata == {"new": "value-after-replace"}
    text = _all_rows_text(postgres_dsn)
    for plain in [*names, "Jane Doe", "B-0005-secret", "4th floor", "badge", "desk", "value-after-replace"]:
        assert plain not in text
    with psycopg.connect(postgres_dsn) as conn:
        meta: dict[str, str] = dict(conn.execute("SELECT key, value FROM advface_meta").fetchall())
    assert meta[NAMES_META] == SEALED and NAMES_KEY_META in meta
    stored = _subject_columns(postgres_dsn)
    assert len(stored) == 11 and all(len(sid) == 32 and meta.startswith('{"sealed": ') for sid, meta in stored)
    with PostgresStore(postgres_dsn, DIM, "cosine", cipher=cipher) as s:  # the index rebuilt from sealed rows
        assert s.search("acme", x[7], 1)[0].subject_id == names[7]
        np.testing.assert_array_equal(s.subject_vectors("acme", names[7])[0], x[7])
        listed, token = [], ""
        while True:
            page, token = s.list_subjects("acme", page_size=5, page_token=token)
            listed += [p.subject_id for p in page]
            if not token:
                break
        assert sorted(listed) == sorted(names[:1] + names[2:])
        assert s.delete_subject("acme", names[0]) == 2
        assert s.count("acme", subjects=True) == 10
    assert len(_subject_columns(postgres_dsn)) == 10


def test_a_sealed_row_moved_to_another_subject_is_refused(postgres_dsn: str) -> None:
    cipher = TemplateCipher.generate()
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=cipher) as s:
        fill(s, 3)
    (_, a_meta), (b_id, _) = _subject_columns(postgres_dsn)[:2]
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("UPDATE advface_subjects SET metadata = %s WHERE subject_id = %s", (a_meta, b_id))
    with pytest.raises(IntegrityError, match="failed authentication"):  # the index is built at open
        PostgresStore(postgres_dsn, DIM, "euclidean", cipher=cipher)


def test_rotation_rewraps_the_names_key_and_reseals_subjects(postgres_dsn: str) -> None:
    old, new = TemplateCipher.generate(), TemplateCipher.generate()
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=old) as s:
        vectors = fill(s, 30)
    before = [sid for sid, _ in _subject_columns(postgres_dsn)]
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=new.with_previous(old)) as s:
        assert s.rotate(new, batch_size=8) == 30
        assert s.get_subject("t", "s3").metadata == {"k": "v"}
    assert [sid for sid, _ in _subject_columns(postgres_dsn)] == before  # lookups unchanged
    assert {blob_key_id(sealed_blob(meta)) for _, meta in _subject_columns(postgres_dsn)} == {new.key_id}
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=new) as s:  # the old key is not needed any more
        assert s.sealed_names
        assert s.get_subject("t", "s17").metadata == {"k": "v"}
        assert s.search("t", vectors["s17"], 1)[0].subject_id == "s17"
        assert s.delete_subject("t", "s17") == 1


def test_sealing_a_plain_store_survives_kill_9_and_resumes(postgres_dsn: str, tmp_path: Path) -> None:
    check_sealing_a_plain_store(PostgresStore, postgres_dsn, tmp_path, lambda: _subject_columns(postgres_dsn))
    assert "badge-0" not in _all_rows_text(postgres_dsn) and "Person 0" not in _all_rows_text(postgres_dsn)


def test_a_replica_opened_before_the_sealing_takes_the_sealed_ids_up(postgres_dsn: str) -> None:
    with PostgresStore(postgres_dsn, DIM, "euclidean") as s:
        vectors = named_fill(s, 9)
    cipher = TemplateCipher.generate()
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=cipher, migrate_plaintext=True) as migrating:
        with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=cipher) as replica:  # plain ids when it opened
            assert not replica.sealed_names
            assert migrating.rotate(cipher, batch_size=4) == 12 and migrating.sealed_names
            assert replica.get_subject("t", "Person 002").metadata == {"badge": "badge-002"}
            assert replica.sealed_names  # taken up from meta at its first lookup
            replica.add("t", "Person 002", vectors["Person 002"] + 0.5)  # no duplicate row: found by its keyed hash
            replica.add("t", "Person 050", vectors["Person 001"] + 2.0, {"badge": "badge-050"})
            assert replica.count("t", subjects=True) == 10
            assert replica.search("t", vectors["Person 008"], 1)[0].subject_id == "Person 008"
        assert migrating.get_subject("t", "Person 050").template_ids
        assert len(migrating.get_subject("t", "Person 002").template_ids) == 2
    assert not any(sid.startswith("Person") for sid, _ in _subject_columns(postgres_dsn))
