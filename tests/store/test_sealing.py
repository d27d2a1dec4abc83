"""Sealed subject ids and metadata (advface.store.sealing) in both template stores: SQLiteFaissStore (a file in
tmp_path) and PostgresStore (a fresh database on tests/conftest.py's embedded PostgreSQL + pgvector server).

Each scenario is written once and runs on both backends through the ``backend`` fixture: no plaintext id or
metadata value in storage, lookups / paging / search / deletes through keyed hashes, a sealed row moved to another
subject refused, key rotation re-wrapping the names key and re-sealing every subject row, a plain store's ids sealed
by its encryption migration (also after kill -9), an older store with plain ids sealed by its next rotation. Only the
replica test is PostgreSQL's alone: several processes on one database exist only there (SQLite: one at a time)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from rotation_helpers import DIM, check_sealing_a_plain_store, fill, named_fill

from advface.crypto import TemplateCipher, blob_key_id
from advface.errors import IntegrityError
from advface.store.postgres import PostgresStore
from advface.store.sealing import NAMES_KEY_META, NAMES_META, SEALED, sealed_blob
from advface.store.sqlite_faiss import SQLiteFaissStore

#: the tables of both stores (PostgreSQL: with the prefix ``advface_``)
TABLES = ("meta", "tenants", "subjects", "templates")


class SealingBackend:
    """One store backend as these tests see it: its store class and target (file or DSN), and its storage read and
    tampered with from outside the store, as a database thief or insider would."""

    def __init__(self, tmp_path: Path, dsn: str | None = None) -> None:
        self.cls: type[Any] = SQLiteFaissStore if dsn is None else PostgresStore
        self.target: str | Path = tmp_path / "templates.sqlite3" if dsn is None else dsn

    def open(self, metric: str, **options: Any) -> Any:
        """The store at ``target`` (``options``: the store class's keywords, e.g. ``cipher``)."""
        return self.cls(self.target, DIM, metric, **options)

    def _sql(self, statement: str, params: tuple = ()) -> list[tuple]:
        """One statement on the raw database, committed: tables named ``{subjects}`` etc., ``?`` parameters."""
        if isinstance(self.target, Path):
            conn = sqlite3.connect(self.target)
            try:
                rows = conn.execute(statement.format(**{t: t for t in TABLES}), params).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        with psycopg.connect(self.target) as pg:
            cursor = pg.execute(statement.format(**{t: f"advface_{t}" for t in TABLES}).replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def subject_columns(self) -> list[tuple[str, str]]:
        """``(id column, metadata column)`` of every subject row, in row order."""
        return [(r[0], r[1]) for r in self._sql("SELECT subject_id, metadata FROM {subjects} ORDER BY id")]

    def move_metadata(self, metadata: str, to_subject_column: str) -> None:
        """Write a subject row's metadata column onto the row whose id column is ``to_subject_column``."""
        self._sql("UPDATE {subjects} SET metadata = ? WHERE subject_id = ?", (metadata, to_subject_column))

    def stored_text(self) -> str:
        """All that storage holds: SQLite, the database and -wal files' bytes (as Latin-1 text; the -wal file holds
        an open store's recent writes); PostgreSQL, every row of every table in its text form (bytea as hex)."""
        if isinstance(self.target, Path):
            files = (self.target, Path(f"{self.target}-wal"))
            return b"".join(p.read_bytes() for p in files if p.exists()).decode("latin-1")
        return "\n".join(r[0] for t in TABLES for r in self._sql(f"SELECT t::text FROM {{{t}}} t"))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> SealingBackend:
    """Each template store: SQLite in tmp_path, or a fresh PostgreSQL database (the embedded server is started only
    for these cases; under CI=true a missing server fails the run instead of skipping)."""
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    return SealingBackend(tmp_path, dsn)


def _all_listed(store: Any, tenant: str, page_size: int) -> list[str]:
    """Every subject id of ``tenant``, page by page."""
    listed, token = [], ""
    while True:
        page, token = store.list_subjects(tenant, page_size=page_size, page_token=token)
        listed += [p.subject_id for p in page]
        if not token:
            return listed


def test_a_store_created_encrypted_keeps_no_plaintext_id_or_metadata(backend: SealingBackend) -> None:
    cipher = TemplateCipher.generate()
    rng = np.random.default_rng(3)
    names = [f"Jane Doe {i}" for i in range(12)]
    x = rng.standard_normal((12, DIM)).astype(np.float32)
    with backend.open("cosine", cipher=cipher) as s:
        assert s.sealed_names
        s.add_many("acme", [(n, x[i : i + 1], {"badge": f"B-{i:04d}-secret"}) for i, n in enumerate(names)])
        s.add("acme", names[0], x[:1] + 0.01, {"desk": "4th floor"})  # a second template, metadata merged
        assert s.get_subject("acme", names[0]).metadata == {"badge": "B-0000-secret", "desk": "4th floor"}
        assert s.delete_template("acme", s.get_subject("acme", names[1]).template_ids[0]) == names[1]
        s.add("acme", names[2], x[2:3], {"new": "value-after-replace"}, replace=True)
        assert s.get_subject("acme", names[2]).metadata == {"new": "value-after-replace"}
        stored = backend.stored_text()  # while open: SQLite's -wal file holds the recent writes
    columns = backend.subject_columns()
    assert "acme" in stored and columns[0][0] in stored  # the read sees the rows (tenant names are not sealed)
    for plain in [*names, "Jane Doe", "B-0005-secret", "4th floor", "badge", "desk", "value-after-replace"]:
        assert plain not in stored
    meta = backend.cls.read_meta(backend.target)
    assert meta[NAMES_META] == SEALED and NAMES_KEY_META in meta
    assert len(columns) == 11 and all(len(sid) == 32 and text.startswith('{"sealed": ') for sid, text in columns)
    with backend.open("cosine", cipher=cipher) as s:  # the index rebuilt from sealed rows
        assert s.search("acme", x[7], 1)[0].subject_id == names[7]
        np.testing.assert_array_equal(s.subject_vectors("acme", names[7])[0], x[7])
        assert sorted(_all_listed(s, "acme", 5)) == sorted(names[:1] + names[2:])
        assert s.delete_subject("acme", names[0]) == 2
        assert s.count("acme", subjects=True) == 10
    assert len(backend.subject_columns()) == 10


def test_a_sealed_row_moved_to_another_subject_is_refused(backend: SealingBackend) -> None:
    """A subject's sealed metadata copied onto another subject's row fails authentication: the store never opens it
    as the other subject."""
    cipher = TemplateCipher.generate()
    with backend.open("euclidean", cipher=cipher) as s:
        fill(s, 3)
    (_, a_meta), (b_id, _) = backend.subject_columns()[:2]
    backend.move_metadata(a_meta, b_id)
    with pytest.raises(IntegrityError, match="failed authentication"):
        with backend.open("euclidean", cipher=cipher) as s:  # PostgreSQL refuses at open (its index is built there)
            s.list_subjects("t", page_size=100)


def test_rotation_rewraps_the_names_key_and_reseals_subjects(backend: SealingBackend) -> None:
    old, new = TemplateCipher.generate(), TemplateCipher.generate()
    with backend.open("euclidean", cipher=old) as s:
        vectors = fill(s, 30)
    before = [sid for sid, _ in backend.subject_columns()]
    with backend.open("euclidean", cipher=new.with_previous(old)) as s:
        assert s.rotate(new, batch_size=8) == 30
        assert s.get_subject("t", "s3").metadata == {"k": "v"}
    assert [sid for sid, _ in backend.subject_columns()] == before  # lookups unchanged
    assert {blob_key_id(sealed_blob(text)) for _, text in backend.subject_columns()} == {new.key_id}
    with backend.open("euclidean", cipher=new) as s:  # the old key is not needed any more
        assert s.sealed_names
        assert s.get_subject("t", "s17").metadata == {"k": "v"}
        assert s.search("t", vectors["s17"], 1)[0].subject_id == "s17"
        assert s.delete_subject("t", "s17") == 1


def test_a_store_encrypted_after_it_held_subjects_is_sealed_by_the_migration(backend: SealingBackend) -> None:
    with backend.open("euclidean") as s:
        vectors = named_fill(s, 12)
    cipher = TemplateCipher.generate()
    with backend.open("euclidean", cipher=cipher, migrate_plaintext=True) as s:
        assert not s.sealed_names  # plain until the migration's rotate
        assert s.rotate(cipher, batch_size=5) == 16
        assert s.sealed_names and s.get_subject("t", "Person 004").metadata == {"badge": "badge-004"}
        assert s.search("t", vectors["Person 007"], 1)[0].subject_id == "Person 007"
        s.add("t", "Person 100", vectors["Person 001"] + 1.0, {"badge": "badge-100"})
    stored = backend.stored_text()
    assert backend.subject_columns()[0][0] in stored  # the read sees the rows
    for plain in ["Person 0", "Person 100", "badge-0"]:
        assert plain not in stored
    with backend.open("euclidean", cipher=cipher) as s:
        assert s.sealed_names and s.get_subject("t", "Person 100").metadata == {"badge": "badge-100"}
        assert s.search("t", vectors["Person 011"], 1)[0].subject_id == "Person 011"


def test_an_encrypted_store_with_plain_ids_is_sealed_by_its_next_rotation(
    backend: SealingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """A store migrated before migrations sealed ids (encrypted, plain ids) warns at open with the command, and is
    sealed by `advface rotate-key`."""
    with backend.open("euclidean") as s:
        vectors = named_fill(s, 6)
    cipher = TemplateCipher.generate()
    with backend.open("euclidean", cipher=cipher, migrate_plaintext=True) as s:
        s._seal_names = lambda batch_size: 0  # as an older advface migrated it
        s.rotate(cipher)
        assert not s.sealed_names
    assert {sid for sid, _ in backend.subject_columns()} == set(vectors)
    new = TemplateCipher.generate()
    with caplog.at_level("WARNING", logger="advface.store"):
        with backend.open("euclidean", cipher=new.with_previous(cipher)) as s:
            assert "seal them with `advface rotate-key`" in caplog.text
            assert s.rotate(new) == 8 and s.sealed_names
    assert not any(sid.startswith("Person") for sid, _ in backend.subject_columns())
    with backend.open("euclidean", cipher=new) as s:
        assert s.search("t", vectors["Person 005"], 1)[0].subject_id == "Person 005"


def test_sealing_a_plain_store_survives_kill_9_and_resumes(backend: SealingBackend, tmp_path: Path) -> None:
    check_sealing_a_plain_store(backend.cls, backend.target, tmp_path, backend.subject_columns)
    stored = backend.stored_text()
    assert backend.subject_columns()[0][0] in stored  # the read sees the rows
    assert "badge-0" not in stored and "Person 0" not in stored


def test_a_replica_opened_before_the_sealing_takes_the_sealed_ids_up(postgres_dsn: str) -> None:
    """PostgreSQL only: a second store object (another sidecar) on the database while a migration seals it."""
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
    columns = SealingBackend(Path(), postgres_dsn).subject_columns()
    assert len(columns) == 10 and not any(sid.startswith("Person") for sid, _ in columns)
