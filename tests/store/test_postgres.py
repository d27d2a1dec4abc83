"""PostgresStore on a real PostgreSQL + pgvector server, what only this backend has (the shared store contract is in
test_store_contract.py): rows left in the tables, the HNSW path, reopening with a cipher or another table prefix,
open errors, agreement with SQLiteFaissStore, HNSW search, the encrypted mode, erasure
by VACUUM FULL, concurrency (threads, and two store objects sharing one database like two replicas)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import psycopg
import pytest
from store_contract_helpers import (
    DIM,
    METRICS,
    check_add_get_list_and_vectors,
    check_add_many_is_atomic,
    check_deletes,
    check_search_best_per_subject,
    fill_for_reopen,
    search_until,
    vectors,
)

from advface.crypto import TemplateCipher
from advface.errors import ConfigError, DatabaseUnavailableError, IntegrityError
from advface.store import Match, SQLiteFaissStore
from advface.store.postgres import PostgresStore, redact_dsn


def _clustered(rng: np.random.Generator, subjects: int, per: int, dim: int = DIM) -> list[tuple[str, np.ndarray, None]]:
    """Subjects whose templates are perturbed copies of one centre (like several photos of one person)."""
    centres = vectors(rng, subjects, dim)
    return [(f"p{i:04d}", centres[i] + 0.3 * vectors(rng, per, dim), None) for i in range(subjects)]


@pytest.fixture(params=METRICS)
def metric(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(postgres_dsn: str, metric: str):
    with PostgresStore(postgres_dsn, DIM, metric) as s:
        yield s


def _table_rows(dsn: str, prefix: str = "advface") -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return {
            name: conn.execute(f"SELECT COUNT(*) FROM {prefix}_{name}").fetchone()[0]
            for name in ("tenants", "subjects", "templates")
        }


# --------------------------------------------------------------------------------------------------- basics


def test_replace_leaves_one_row_each(store: PostgresStore) -> None:
    check_add_get_list_and_vectors(store, after_replace=lambda: _rows_are(store, 1))


def _rows_are(store: PostgresStore, n: int) -> None:
    assert _table_rows(store.dsn) == {"tenants": n, "subjects": n, "templates": n}


def test_search_best_per_subject_on_the_hnsw_path(postgres_dsn: str, metric: str) -> None:
    """The contract's search test (run there on the exact path) on the approximate HNSW path."""
    with PostgresStore(postgres_dsn, DIM, metric, exact_max=0, ef_search=200) as store:
        check_search_best_per_subject(store)


def test_hnsw_path_uses_the_index(postgres_dsn: str) -> None:
    """The approximate path's query really is an HNSW index scan (EXPLAIN), even with fresh, unanalysed rows."""
    with PostgresStore(postgres_dsn, DIM, "cosine", exact_max=0) as store:
        rng = np.random.default_rng(15)  # every test has its own seed: the encrypted-mode test looks for its bytes
        store.add_many("t", [(f"s{i}", vectors(rng, 2), None) for i in range(300)])
        store.add("other", "x", np.ones(DIM))
        with store._pool.connection() as conn:
            store._hnsw_settings(conn, 40)
            q = vectors(rng, 1)[0]
            from advface.store.postgres.connection import PgVector

            store_vector = PgVector(q)
            params = (store_vector, "t", store_vector, 40)
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + store._hnsw_sql(), params))
            conn.rollback()
        assert "advface_templates_hnsw" in plan, plan


def test_deletes_remove_rows(store: PostgresStore) -> None:
    check_deletes(store)
    _rows_are(store, 0)


# --------------------------------------------------------------------------------------------------- reopening


def test_reopen_refuses_a_cipher_and_keeps_prefixes_apart(postgres_dsn: str, metric: str) -> None:
    """Reopening plaintext templates with a cipher is refused; another table prefix is another store (reopening
    itself, and the dim/metric checks: test_store_contract.py)."""
    rng = np.random.default_rng(5)
    with PostgresStore(postgres_dsn, DIM, metric) as s:
        count = fill_for_reopen(s, vectors(rng, 5), rng)[2][0]
    with pytest.raises(ConfigError, match="plaintext templates"):
        PostgresStore(postgres_dsn, DIM, metric, cipher=TemplateCipher.generate())
    other = "cosine" if metric == "euclidean" else "euclidean"
    with PostgresStore(postgres_dsn, DIM + 1, other, table_prefix="second") as s2:
        assert s2.count() == 0 and s2.tenants() == []
        s2.add("A", "x", np.ones(DIM + 1))
    with PostgresStore(postgres_dsn, DIM, metric) as s:
        assert s.count() == count


def test_open_errors(postgres_dsn: str, postgres_server) -> None:  # noqa: ANN001
    """PostgreSQL-only open errors (metric, dim and closing: test_store_contract.py)."""
    with pytest.raises(ConfigError, match="16000"):
        PostgresStore(postgres_dsn, 20_000, "cosine")
    with pytest.raises(ConfigError, match="table_prefix"):
        PostgresStore(postgres_dsn, DIM, "cosine", table_prefix="x; DROP TABLE y")
    with pytest.raises(ConfigError, match="DSN"):
        PostgresStore("", DIM, "cosine")
    with pytest.raises(ConfigError, match="cipher"):
        PostgresStore(postgres_dsn, DIM, "cosine", cipher=object())  # type: ignore[arg-type]
    # an unreachable server: a clear error, and the password is not in it
    with pytest.raises(DatabaseUnavailableError) as excinfo:
        PostgresStore("postgresql://u:hunter2secret@127.0.0.1:1/db", DIM, "cosine", connect_timeout=2)
    assert "hunter2secret" not in str(excinfo.value) and "u:***@" in str(excinfo.value)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE junk_meta (key text, value text)")
        conn.execute("INSERT INTO junk_meta VALUES ('format', 'something else')")
    with pytest.raises(ConfigError, match="not an advface template store"):
        PostgresStore(postgres_dsn, DIM, "cosine", table_prefix="junk")
    with_password = postgres_dsn.replace("postgres@", "postgres:hunter2secret@")  # trust auth ignores it
    with PostgresStore(with_password, DIM, "cosine") as s:
        assert "hunter2secret" not in repr(s) and "postgres:***@" in repr(s)


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://user:s3cr@t/x@db:5432/advface?sslmode=require") == (
        "postgresql://user:***@db:5432/advface?sslmode=require"
    )
    assert redact_dsn("postgresql://user@db/advface?password=s3cret&sslmode=require") == (
        "postgresql://user@db/advface?password=***&sslmode=require"
    )
    assert redact_dsn("host=db user=u password='a b\\' c' dbname=x") == "host=db user=u password=*** dbname=x"
    assert redact_dsn("host=db dbname=x") == "host=db dbname=x"


def test_durable_settings(store: PostgresStore) -> None:
    store.add("t", "x", np.ones(DIM))
    with store._pool.connection() as conn:
        assert conn.autocommit is False
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        conn.rollback()


def test_lost_connections_are_replaced(store: PostgresStore, postgres_dsn: str) -> None:
    """Pooled connections killed by the server (restart, failover, idle timeout) are retried on new ones."""
    rng = np.random.default_rng(11)
    v = vectors(rng, 1)
    store.add("t", "a", v)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    assert store.search("t", v[0], 1)[0].subject_id == "a"
    store.add("t", "b", vectors(rng, 1))
    assert store.count("t") == 2


# --------------------------------------------------------------------------------------------------- atomicity


def test_add_many_rollbacks_leave_no_rows(store: PostgresStore) -> None:
    check_add_many_is_atomic(store, after_rollbacks=lambda: _rows_are(store, 1))


# --------------------------------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("exact_max", [10_000, 0], ids=["exact", "hnsw"])
def test_agrees_with_sqlite_faiss(postgres_dsn: str, tmp_path: Path, metric: str, exact_max: int) -> None:
    """Same data, same probes: the exact path gives SQLiteFaissStore's results (subjects, templates, scores); the
    HNSW path (default parameters) finds nearly all of them on this small tenant."""
    rng = np.random.default_rng(12)
    items = _clustered(rng, 150, 3)
    probes = np.stack([items[i][1][0] + 0.2 * vectors(rng, 1)[0] for i in range(0, 150, 5)])
    probes = np.vstack([probes, vectors(rng, 10)])
    with (
        PostgresStore(postgres_dsn, DIM, metric, exact_max=exact_max) as pg,
        SQLiteFaissStore(tmp_path / "t.sqlite", DIM, metric, use_gpu=False) as lite,
    ):
        pg.add_many("t", items[:100])
        lite.add_many("t", items[:100])
        pg.add_many("t", items[100:])  # two transactions, like two enrolment batches
        lite.add_many("t", items[100:])
        for i in range(0, 150, 10):  # the same deletions
            pg.delete_subject("t", items[i][0])
            lite.delete_subject("t", items[i][0])
        found = total = 0
        for probe in probes:
            want = lite.search("t", probe, 10)
            got = pg.search("t", probe, 10)
            want_templates = {m.subject_id: pg_lookup(pg, lite, m) for m in want}
            if exact_max:
                assert [m.subject_id for m in got] == [m.subject_id for m in want]
                assert [want_templates[m.subject_id] for m in got] == [m.template_id for m in got]
                np.testing.assert_allclose([m.score for m in got], [m.score for m in want], atol=1e-5)
            else:
                found += len({m.subject_id for m in got} & {m.subject_id for m in want})
                total += len(want)
        if not exact_max:
            assert found / total >= 0.95, found / total


def pg_lookup(pg: PostgresStore, lite: SQLiteFaissStore, m: Match) -> str:
    """The PostgresStore template id at the same position of the subject as ``m``'s template in the SQLite store."""
    position = lite.get_subject("t", m.subject_id).template_ids.index(m.template_id)
    return pg.get_subject("t", m.subject_id).template_ids[position]


# --------------------------------------------------------------------------------------------------- encrypted mode


def _wal_position(dsn: str) -> str:
    """Start a new WAL segment; returns its name (the WAL written from now on is in it and later ones)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_switch_wal()")
        return conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]


def _stored_files(dsn: str, wal_from: str, prefix: str = "advface") -> dict[str, bytes]:
    """The bytes of the store's tables, indexes and TOAST relations in the data files, and of the WAL segments
    written from ``wal_from`` on (the server is shared by the test session: older WAL holds other tests' data)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        rels = conn.execute(
            "SELECT c.relname, pg_relation_filepath(c.oid) FROM pg_class c WHERE c.relname LIKE %s "
            "OR c.oid IN (SELECT reltoastrelid FROM pg_class WHERE relname LIKE %s) "
            "OR c.oid IN (SELECT indexrelid FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
            "  WHERE t.relname LIKE %s)",
            (f"{prefix}_%", f"{prefix}_%", f"{prefix}_%"),
        ).fetchall()
        out = {
            name: bytes(conn.execute("SELECT pg_read_binary_file(%s, true)", (path,)).fetchone()[0] or b"")
            for name, path in rels
            if path
        }
        end = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
        for (name,) in conn.execute("SELECT name FROM pg_ls_waldir() ORDER BY name").fetchall():
            if len(name) == 24 and wal_from[8:] <= name[8:] <= end[8:]:  # later names are recycled old segments
                wal = conn.execute("SELECT pg_read_binary_file('pg_wal/' || %s)", (name,)).fetchone()[0]
                out["wal " + name] = bytes(wal)
    assert any(k.startswith("wal ") for k in out), "no WAL read"
    return out


def _all_cells(dsn: str) -> bytes:
    """Every column of every row of the store's tables, in PostgreSQL's binary form."""
    out = b""
    with psycopg.connect(dsn) as conn:
        for table in ("advface_meta", "advface_tenants", "advface_subjects", "advface_templates"):
            with conn.cursor(binary=True) as cur:
                cur.execute(f"SELECT * FROM {table}")
                for row in cur:
                    out += b"".join(
                        v
                        if isinstance(v, bytes)
                        else np.asarray(v, ">f4").tobytes()
                        if isinstance(v, np.ndarray)
                        else str(v).encode()
                        for v in row
                    )
    return out


def test_encrypted_mode_stores_no_vector_bytes(postgres_dsn: str, metric: str) -> None:
    rng = np.random.default_rng(13)
    cipher = TemplateCipher.generate()
    items = [(f"s{i}", vectors(rng, 1 + i % 2, 128), {"i": str(i)}) for i in range(30)]
    raws = [v.astype("<f4").tobytes() for _, vs, _ in items for v in vs]
    wal_from = _wal_position(postgres_dsn)
    with PostgresStore(postgres_dsn, 128, metric, cipher=cipher) as enc:
        assert enc.encrypted
        ids = enc.add_many("t", items)
        probe = items[3][1][0]
        assert enc.search("t", probe, 1)[0].template_id == ids[3][0]
        np.testing.assert_array_equal(enc.subject_vectors("t", "s5"), items[5][1])
        places = {"cells": _all_cells(postgres_dsn), **_stored_files(postgres_dsn, wal_from)}
        for raw in raws:  # neither little- nor big-endian floats, whole or in part, in any cell, file or WAL
            big = np.frombuffer(raw, "<f4").astype(">f4").tobytes()
            found = [name for name, blob in places.items() if raw[:32] in blob or big[:32] in blob or raw[-32:] in blob]
            assert not found, f"vector bytes found in {found}"
        with psycopg.connect(postgres_dsn) as conn:
            assert conn.execute("SELECT COUNT(*) FROM advface_templates WHERE vector IS NOT NULL").fetchone()[0] == 0
            mode = conn.execute("SELECT value FROM advface_meta WHERE key = 'encryption'").fetchone()[0]
            assert mode == "aes-256-gcm"
        before = [enc.search("t", p, 5) for p in (items[0][1][0], items[7][1][0])]
    # reopening rebuilds the same index from decrypted rows; the wrong key or no key is refused
    with PostgresStore(postgres_dsn, 128, metric, cipher=cipher) as enc:
        assert [enc.search("t", p, 5) for p in (items[0][1][0], items[7][1][0])] == before
        assert enc.index_size() == enc.count() == len(raws)
    with pytest.raises(ConfigError, match="wrong key"):
        PostgresStore(postgres_dsn, 128, metric, cipher=TemplateCipher.generate())
    with pytest.raises(ConfigError, match="encrypted templates"):
        PostgresStore(postgres_dsn, 128, metric)
    # a ciphertext moved to another row fails authentication (AAD binds tenant, subject and template id)
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(
            "UPDATE advface_templates SET ciphertext = "
            "(SELECT ciphertext FROM advface_templates WHERE template_id = %s) WHERE template_id = %s",
            (ids[1][0], ids[2][0]),
        )
    with pytest.raises(IntegrityError, match=ids[2][0]):
        PostgresStore(postgres_dsn, 128, metric, cipher=cipher)


def test_encrypted_mode_matches_plaintext_and_refreshes(
    postgres_dsn: str,
    postgres_server,
    metric: str,  # noqa: ANN001
) -> None:
    """Encrypted search equals plaintext search; a second store object (another replica) sees the first one's
    writes and deletions at its next search."""
    rng = np.random.default_rng(14)
    cipher = TemplateCipher.generate()
    items = _clustered(rng, 60, 2)
    plain_dsn = postgres_server.create_database(f"plain_{metric}_{rng.integers(1 << 30)}")
    with (
        PostgresStore(postgres_dsn, DIM, metric, cipher=cipher) as a,
        PostgresStore(postgres_dsn, DIM, metric, cipher=cipher) as b,
        PostgresStore(plain_dsn, DIM, metric) as plain,
    ):
        a.add_many("t", items)
        plain.add_many("t", items)
        probes = vectors(rng, 6)
        for p in probes:
            got, want = b.search("t", p, 7), plain.search("t", p, 7)  # b: refreshed from a's writes
            assert [m.subject_id for m in got] == [m.subject_id for m in want]
            np.testing.assert_allclose([m.score for m in got], [m.score for m in want], atol=1e-5)
        b.delete_subject("t", items[0][0])
        b.add("u", "new", probes[0])
        assert items[0][0] not in {m.subject_id for m in a.search("t", items[0][1][0], 5)}
        assert a.search("u", probes[0], 1)[0].subject_id == "new"
        a.add("t", "late", probes[1])  # a was refreshed, so its own write is applied incrementally
        assert a.search("t", probes[1], 1)[0].subject_id == "late" == b.search("t", probes[1], 1)[0].subject_id
        assert a.index_size() == b.index_size() == a.count() == 2 * 59 + 2
        b.delete_subject("u", "new")
        assert a.search("u", probes[0], 1) == [] and a.tenants() == ["t"]


# --------------------------------------------------------------------------------------------------- erasure


def test_vacuum_erases_deleted_vector_bytes(store: PostgresStore) -> None:
    rng = np.random.default_rng(8)
    store.add_many("t", [(f"keep{i}", vectors(rng, 2), None) for i in range(20)])
    gone = vectors(rng, 3)
    store.add("t", "gone", gone, {"secret": "MARKER-private-metadata-value"})
    kept = vectors(rng, 1)
    store.add("t", "half", kept)

    def files() -> bytes:  # data files only: the WAL keeps history until its segments are recycled
        with psycopg.connect(store.dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
            paths = [
                r[0]
                for r in conn.execute(
                    "SELECT pg_relation_filepath(oid) FROM pg_class WHERE relname LIKE 'advface_%' "
                    "AND relkind IN ('r', 'i', 't')"
                )
            ]
            return b"".join(bytes(conn.execute("SELECT pg_read_binary_file(%s)", (p,)).fetchone()[0]) for p in paths)

    def as_stored(v: np.ndarray) -> bytes:  # pgvector's on-disk floats are the machine's (little-endian) float4
        return v.astype("<f4").tobytes()

    disk = files()
    assert all(as_stored(v) in disk for v in [*gone, *kept])  # the check can see stored vectors
    store.delete_subject("t", "gone")
    assert any(as_stored(v) in files() for v in gone)  # DELETE alone leaves dead tuples behind
    store.vacuum()
    disk = files()
    for v in gone:
        assert as_stored(v)[:32] not in disk and as_stored(v)[-32:] not in disk
    assert b"MARKER-private-metadata-value" not in disk
    assert as_stored(kept[0]) in disk
    assert store.count() == 41 and store.search("t", kept[0], 1)[0].subject_id == "half"


# --------------------------------------------------------------------------------------------------- concurrency


def test_concurrent_writers_and_searchers(postgres_dsn: str) -> None:
    """Threads adding, deleting and searching, on two store objects sharing the database (two replicas)."""
    rng = np.random.default_rng(10)
    a = PostgresStore(postgres_dsn, DIM, "cosine", pool_size=4)
    b = PostgresStore(postgres_dsn, DIM, "cosine", pool_size=4)
    a.add_many("t", [(f"s{i}", vectors(rng, 2), None) for i in range(50)])
    probes = vectors(rng, 8)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(store: PostgresStore, name: str, seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            for i in range(8):
                store.add("t", f"{name}{i}", r.standard_normal((2, DIM)))
                store.add("t", "shared", r.standard_normal(DIM), {name: str(i)})  # same subject from every writer
                store.add("t", f"{name}{i}", r.standard_normal(DIM))
                store.delete_subject("t", f"{name}{i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=search_until, args=(s, probes, stop, errors)) for s in (a, b)]
    threads += [threading.Thread(target=writer, args=(s, f"w{j}", 100 + j)) for j, s in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join()
    stop.set()
    for t in threads[:2]:
        t.join()
    try:
        assert not errors, errors
        shared = a.get_subject("t", "shared")
        assert len(shared.template_ids) == 4 * 8 and set(shared.metadata) == {"w0", "w1", "w2", "w3"}
        assert a.count("t") == b.count("t") == 100 + 32 and a.count("t", subjects=True) == 51
        with psycopg.connect(postgres_dsn) as conn:  # the maintained counts equal the rows
            assert conn.execute("SELECT COUNT(*) FROM advface_templates").fetchone()[0] == 132
            assert conn.execute("SELECT COUNT(*) FROM advface_subjects").fetchone()[0] == 51
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------------------------------- configuration


def test_config_store_backend_and_dsn(tmp_path: Path) -> None:
    from advface.config import load_config

    secret = "postgresql://advface:hunter2secret@db.example:5432/advface?sslmode=require"
    cfg = load_config(None, env={"ADVFACE_STORE_BACKEND": "postgresql", "ADVFACE_STORE_DSN": secret})
    assert (cfg.store.backend, cfg.store.dsn) == ("postgresql", secret)
    assert "hunter2secret" not in repr(cfg)
    shown = cfg.to_dict(redact_secrets=True)["store"]["dsn"]
    assert shown == "postgresql://advface:***@db.example:5432/advface?sslmode=require"
    assert cfg.to_dict()["store"]["dsn"] == secret  # the loadable form keeps it
    path = tmp_path / "advface.yaml"
    path.write_text("store:\n  backend: postgresql\n")
    with pytest.raises(ConfigError, match="store.dsn is not set"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="must be one of sqlite, postgresql"):
        load_config(None, env={"ADVFACE_STORE_BACKEND": "mysql"})
    with pytest.raises(ConfigError, match="not a valid PostgreSQL connection string") as excinfo:
        load_config(None, env={"ADVFACE_STORE_DSN": "host=db password=hunter2secret ="})
    assert "hunter2secret" not in str(excinfo.value)
    assert load_config(None, env={}).store.dsn is None
