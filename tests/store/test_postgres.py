"""PostgresStore on a real PostgreSQL + pgvector server: the SQLite store's behaviours (storage, search, tenants,
deletion, validation, atomicity, reopening), agreement with SQLiteFaissStore, HNSW search, the encrypted mode, erasure
by VACUUM FULL, concurrency (threads, and two store objects sharing one database like two replicas)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import psycopg
import pytest
from test_sqlite_faiss import _bad_calls, _brute_force  # the SQLite store's cases, reused on this store

from advface.crypto import TemplateCipher
from advface.encoders.base import pair_scores
from advface.errors import ConfigError, DatabaseUnavailableError, EmbeddingError, IntegrityError, NotFoundError
from advface.store import Match, SQLiteFaissStore, SubjectInfo
from advface.store.postgres import PostgresStore, redact_dsn

DIM = 16
METRICS = ["euclidean", "cosine"]


def _vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    return rng.standard_normal((n, dim)).astype(np.float32)


def _clustered(rng: np.random.Generator, subjects: int, per: int, dim: int = DIM) -> list[tuple[str, np.ndarray, None]]:
    """Subjects whose templates are perturbed copies of one centre (like several photos of one person)."""
    centres = _vectors(rng, subjects, dim)
    return [(f"p{i:04d}", centres[i] + 0.3 * _vectors(rng, per, dim), None) for i in range(subjects)]


@pytest.fixture(params=METRICS)
def metric(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(postgres_dsn: str, metric: str):
    with PostgresStore(postgres_dsn, DIM, metric) as s:
        yield s


def _snapshot(store: PostgresStore) -> tuple:
    """Everything observable about a store, to check that failed calls change nothing."""
    subjects = {}
    for tenant in store.tenants():
        page, _ = store.list_subjects(tenant, page_size=1000)
        subjects[tenant] = [(s.subject_id, s.metadata, s.template_ids) for s in page]
    vectors = {
        (t, s[0]): store.subject_vectors(t, s[0]).tobytes() for t, page in subjects.items() for s in page
    }
    return store.count(), store.count(subjects=True), subjects, vectors


def _table_rows(dsn: str, prefix: str = "advface") -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return {
            name: conn.execute(f"SELECT COUNT(*) FROM {prefix}_{name}").fetchone()[0]
            for name in ("tenants", "subjects", "templates")
        }


# --------------------------------------------------------------------------------------------------- basics


def test_add_get_list_and_vectors(store: PostgresStore) -> None:
    rng = np.random.default_rng(0)
    alice = _vectors(rng, 2)
    ids = store.add("t1", "alice", alice, {"name": "Alice", "team": "a"})
    assert len(ids) == 2 and len(set(ids)) == 2 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    info = store.get_subject("t1", "alice")
    assert isinstance(info, SubjectInfo)
    assert (info.subject_id, info.metadata, info.template_ids) == ("alice", {"name": "Alice", "team": "a"}, ids)
    assert info.created_at > 1e9
    np.testing.assert_array_equal(store.subject_vectors("t1", "alice"), alice)  # bit-exact float32 round trip
    assert store.subject_vectors("t1", "alice").dtype == np.float32

    more = rng.standard_normal(DIM)  # float64 input is stored as float32; metadata is merged
    ids2 = store.add("t1", "alice", more, {"team": "b", "x": "1"})
    info = store.get_subject("t1", "alice")
    assert info.template_ids == ids + ids2 and info.metadata == {"name": "Alice", "team": "b", "x": "1"}
    np.testing.assert_array_equal(store.subject_vectors("t1", "alice"), np.vstack([alice, more.astype(np.float32)]))

    new = _vectors(rng, 1)  # replace: old templates and metadata go, in one call
    ids3 = store.add("t1", "alice", new, {"only": "this"}, replace=True)
    info = store.get_subject("t1", "alice")
    assert (info.template_ids, info.metadata) == (ids3, {"only": "this"})
    assert store.count("t1") == 1 and store.count("t1", subjects=True) == 1
    top = store.search("t1", new[0], 1)[0]
    assert (top.subject_id, top.template_id) == ("alice", ids3[0])
    assert _table_rows(store.dsn) == {"tenants": 1, "subjects": 1, "templates": 1}
    # metadata values may hold any text, also what JSON escapes (NUL, quotes)
    store.add("t1", "bob", new, {"odd": 'a\x00b"c\\'})
    assert store.get_subject("t1", "bob").metadata == {"odd": 'a\x00b"c\\'}


def test_list_subjects_pages_in_subject_order(store: PostgresStore) -> None:
    rng = np.random.default_rng(1)
    names = ["zoe", "Bob", "alice", "émile", "carl", "bob", "Z 1", "ß", "日本"]
    store.add_many("t", [(n, _vectors(rng, 1 + i % 2), {"i": str(i)}) for i, n in enumerate(names)])
    seen, token, pages = [], "", 0
    while True:
        page, token = store.list_subjects("t", page_size=4, page_token=token)
        pages += 1
        seen.extend(page)
        if not token:
            break
    assert [s.subject_id for s in seen] == sorted(names)  # code point order, whatever the database's collation
    assert pages == 3
    for s in seen:
        assert s == store.get_subject("t", s.subject_id)
    assert store.list_subjects("t", page_size=9) == (seen, "")
    assert store.list_subjects("other") == ([], "")


@pytest.mark.parametrize("exact_max", [10_000, 0], ids=["exact", "hnsw"])
def test_search_best_per_subject_top_k_order(postgres_dsn: str, metric: str, exact_max: int) -> None:
    rng = np.random.default_rng(2)
    probe = _vectors(rng, 1)[0]
    items = [(f"s{i:03d}", _vectors(rng, 1 + i % 3), None) for i in range(60)]
    # one subject with many templates close to the probe: must appear once, and not crowd out the others
    items.append(("crowd", probe + 0.01 * _vectors(rng, 200), None))
    with PostgresStore(postgres_dsn, DIM, metric, exact_max=exact_max, ef_search=200) as store:
        store.add_many("t", items)
        for k in (1, 5, 61, 100):
            matches = store.search("t", probe, k)
            assert all(isinstance(m, Match) for m in matches)
            expected = _brute_force(store, "t", probe, k)
            assert len(matches) == min(k, 61)
            assert [m.subject_id for m in matches] == [e[0] for e in expected]
            np.testing.assert_allclose([m.score for m in matches], [e[1] for e in expected], atol=2e-5)
            assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
            assert matches[0].subject_id == "crowd"
            for m in matches[:5]:  # the template returned is the subject's best one
                info = store.get_subject("t", m.subject_id)
                vectors = store.subject_vectors("t", m.subject_id)
                scores = pair_scores(np.repeat(probe[None], len(vectors), 0), vectors, store.metric)
                assert info.template_ids[int(np.argmax(scores))] == m.template_id
        assert store.search("empty-tenant", probe, 3) == []


def test_hnsw_path_uses_the_index(postgres_dsn: str) -> None:
    """The approximate path's query really is an HNSW index scan (EXPLAIN), even with fresh, unanalysed rows."""
    with PostgresStore(postgres_dsn, DIM, "cosine", exact_max=0) as store:
        rng = np.random.default_rng(15)  # every test has its own seed: the encrypted-mode test looks for its bytes
        store.add_many("t", [(f"s{i}", _vectors(rng, 2), None) for i in range(300)])
        store.add("other", "x", np.ones(DIM))
        with store._pool.connection() as conn:
            store._hnsw_settings(conn, 40)
            q = _vectors(rng, 1)[0]
            from advface.store.postgres import _PgVector

            store_vector = _PgVector(q)
            params = (store_vector, "t", store_vector, 40)
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + store._hnsw_sql(), params))
            conn.rollback()
        assert "advface_templates_hnsw" in plan, plan


def test_exact_vector_scores(store: PostgresStore) -> None:
    v = np.array([3.0, 4.0] + [0.0] * (DIM - 2), np.float32)
    store.add("t", "a", v)
    store.add("t", "b", -v)
    matches = store.search("t", v * 2, 2)
    if store.metric == "euclidean":
        assert [m.subject_id for m in matches] == ["a", "b"]
        np.testing.assert_allclose([m.score for m in matches], [-5.0, -15.0], rtol=1e-6)
    else:
        np.testing.assert_allclose([m.score for m in matches], [1.0, -1.0], rtol=1e-6)


def test_tenants_are_isolated(store: PostgresStore) -> None:
    rng = np.random.default_rng(3)
    va, vb = _vectors(rng, 1), _vectors(rng, 1)
    ida = store.add("A", "same-id", va, {"tenant": "A"})
    idb = store.add("B", "same-id", vb, {"tenant": "B"})
    store.add("B", "only-b", _vectors(rng, 2))
    assert store.tenants() == ["A", "B"]
    assert (store.count("A"), store.count("B"), store.count()) == (1, 3, 4)
    assert (store.count("A", subjects=True), store.count(subjects=True)) == (1, 3)
    assert [(m.subject_id, m.template_id) for m in store.search("A", vb[0], 10)] == [("same-id", ida[0])]
    assert {m.subject_id for m in store.search("B", va[0], 10)} == {"same-id", "only-b"}
    assert store.get_subject("A", "same-id").metadata == {"tenant": "A"}
    with pytest.raises(NotFoundError):
        store.get_subject("A", "only-b")
    with pytest.raises(NotFoundError):
        store.delete_template("A", idb[0])  # B's template is unknown in A
    with pytest.raises(NotFoundError):
        store.subject_vectors("A", "only-b")
    assert store.delete_subject("A", "same-id") == 1
    assert store.tenants() == ["B"]
    assert store.get_subject("B", "same-id").template_ids == idb
    assert store.search("A", va[0], 5) == []
    assert store.search("B", vb[0], 1)[0].template_id == idb[0]


def test_deletes_remove_rows(store: PostgresStore) -> None:
    rng = np.random.default_rng(4)
    alice, bob = _vectors(rng, 3), _vectors(rng, 2)
    ida = store.add("t", "alice", alice)
    idb = store.add("t", "bob", bob)
    assert store.count() == 5

    assert store.delete_template("t", ida[1]) == "alice"
    assert store.get_subject("t", "alice").template_ids == [ida[0], ida[2]]
    np.testing.assert_array_equal(store.subject_vectors("t", "alice"), alice[[0, 2]])
    assert all(m.template_id != ida[1] for m in store.search("t", alice[1], 2))
    assert store.count() == 4

    assert store.delete_subject("t", "alice") == 2
    with pytest.raises(NotFoundError):
        store.get_subject("t", "alice")
    assert [m.subject_id for m in store.search("t", alice[0], 5)] == ["bob"]

    store.delete_template("t", idb[0])  # removing the last template removes the subject
    assert store.delete_template("t", idb[1]) == "bob"
    with pytest.raises(NotFoundError):
        store.get_subject("t", "bob")
    assert store.count() == 0 and store.tenants() == [] and store.search("t", bob[0], 3) == []
    with pytest.raises(NotFoundError):
        store.delete_subject("t", "alice")
    with pytest.raises(NotFoundError):
        store.delete_template("t", ida[0])
    assert _table_rows(store.dsn) == {"tenants": 0, "subjects": 0, "templates": 0}


# --------------------------------------------------------------------------------------------------- reopening


def test_reopen_keeps_data_and_checks_dim_metric(postgres_dsn: str, metric: str) -> None:
    rng = np.random.default_rng(5)
    probes = _vectors(rng, 5)
    with PostgresStore(postgres_dsn, DIM, metric) as s:
        s.add_many("A", [(f"a{i}", _vectors(rng, 1 + i % 3), {"i": str(i)}) for i in range(40)])
        s.add_many("B", [(f"b{i}", _vectors(rng, 2), None) for i in range(10)])
        s.delete_subject("A", "a7")
        s.delete_template("A", s.get_subject("A", "a5").template_ids[0])
        before = [s.search(t, p, 8) for t in ("A", "B") for p in probes]
        listing = s.list_subjects("A", page_size=1000)
        counts = (s.count(), s.count("A"), s.count(subjects=True), s.tenants())
    with PostgresStore(postgres_dsn, DIM, metric) as s:
        assert [s.search(t, p, 8) for t in ("A", "B") for p in probes] == before
        assert s.list_subjects("A", page_size=1000) == listing
        assert (s.count(), s.count("A"), s.count(subjects=True), s.tenants()) == counts
    other = "cosine" if metric == "euclidean" else "euclidean"
    with pytest.raises(ConfigError, match=f"16-d {metric}"):
        PostgresStore(postgres_dsn, DIM + 1, metric)
    with pytest.raises(ConfigError, match=other):
        PostgresStore(postgres_dsn, DIM, other)
    with pytest.raises(ConfigError, match="plaintext templates"):
        PostgresStore(postgres_dsn, DIM, metric, cipher=TemplateCipher.generate())
    # another table prefix is another store in the same database
    with PostgresStore(postgres_dsn, DIM + 1, other, table_prefix="second") as s2:
        assert s2.count() == 0 and s2.tenants() == []
        s2.add("A", "x", np.ones(DIM + 1))
    with PostgresStore(postgres_dsn, DIM, metric) as s:
        assert s.count() == counts[0]


def test_open_errors_and_closing(postgres_dsn: str, postgres_server) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="metric"):
        PostgresStore(postgres_dsn, DIM, "manhattan")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dim"):
        PostgresStore(postgres_dsn, 0, "cosine")
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
    s = PostgresStore(with_password, DIM, "cosine")
    assert "hunter2secret" not in repr(s) and "postgres:***@" in repr(s)
    s.close()
    s.close()  # twice is harmless
    with pytest.raises(ConfigError, match="closed"):
        s.count()
    with pytest.raises(ConfigError, match="closed"):
        s.add("t", "x", np.ones(DIM))


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
    v = _vectors(rng, 1)
    store.add("t", "a", v)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    assert store.search("t", v[0], 1)[0].subject_id == "a"
    store.add("t", "b", _vectors(rng, 1))
    assert store.count("t") == 2


# --------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module", params=METRICS)
def shared_store(request: pytest.FixtureRequest, postgres_server):  # noqa: ANN001
    """One store per metric for the bad-input cases (which must leave it unchanged)."""
    import uuid

    rng = np.random.default_rng(6)
    dsn = postgres_server.create_database(f"bad_{request.param}_{uuid.uuid4().hex[:8]}")
    with PostgresStore(dsn, DIM, request.param) as s:
        s.add("t", "full", _vectors(rng, 2), {f"m{i}": "v" for i in range(30)})
        s.add("t", "x", _vectors(rng, 1), {"keep": "me"})
        yield s


@pytest.mark.parametrize("case", range(len(_bad_calls(DIM))), ids=[c[0] for c in _bad_calls(DIM)])
def test_bad_input_raises_and_changes_nothing(shared_store: PostgresStore, case: int) -> None:
    before = _snapshot(shared_store)
    assert before[:2] == (3, 2)
    name, call, error = _bad_calls(DIM)[case]
    with pytest.raises(error):
        call(shared_store)
    assert _snapshot(shared_store) == before


def test_add_many_is_atomic(store: PostgresStore) -> None:
    rng = np.random.default_rng(7)
    store.add("t", "existing", _vectors(rng, 1), {f"m{i}": "v" for i in range(31)})
    before = _snapshot(store)
    bad = _vectors(rng, 2)
    bad[1, 0] = np.nan
    with pytest.raises(EmbeddingError, match=r"items\[2\]"):
        store.add_many("t", [("a", _vectors(rng, 1), None), ("b", _vectors(rng, 2), None), ("c", bad, None)])
    assert _snapshot(store) == before
    # a failure found inside the transaction (merged metadata too large) rolls back the earlier items too
    with pytest.raises(ConfigError, match="after merging"):
        store.add_many("t", [("a", _vectors(rng, 1), None), ("existing", _vectors(rng, 1), {"n1": "1", "n2": "2"})])
    assert _snapshot(store) == before
    with pytest.raises(NotFoundError):
        store.get_subject("t", "a")
    with pytest.raises(ConfigError, match="twice"):
        store.add_many("t", [("a", _vectors(rng, 1), None), ("a", _vectors(rng, 1), None)], replace=True)
    assert _snapshot(store) == before
    assert _table_rows(store.dsn) == {"tenants": 1, "subjects": 1, "templates": 1}
    ids = store.add_many("t", [("a", _vectors(rng, 1), {"x": "1"}), ("a", _vectors(rng, 2), {"y": "2"})])
    info = store.get_subject("t", "a")
    assert info.template_ids == ids[0] + ids[1] and info.metadata == {"x": "1", "y": "2"}
    assert store.add_many("t", []) == []
    # a replacing add that fails keeps the old templates
    before = _snapshot(store)
    with pytest.raises(EmbeddingError):
        store.add_many("t", [("a", _vectors(rng, 1), None), ("existing", bad, None)], replace=True)
    assert _snapshot(store) == before


# --------------------------------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("exact_max", [10_000, 0], ids=["exact", "hnsw"])
def test_agrees_with_sqlite_faiss(postgres_dsn: str, tmp_path: Path, metric: str, exact_max: int) -> None:
    """Same data, same probes: the exact path gives SQLiteFaissStore's results (subjects, templates, scores); the
    HNSW path (default parameters) finds nearly all of them on this small tenant."""
    rng = np.random.default_rng(12)
    items = _clustered(rng, 150, 3)
    probes = np.stack([items[i][1][0] + 0.2 * _vectors(rng, 1)[0] for i in range(0, 150, 5)])
    probes = np.vstack([probes, _vectors(rng, 10)])
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
                        v if isinstance(v, bytes) else np.asarray(v, ">f4").tobytes() if isinstance(v, np.ndarray)
                        else str(v).encode() for v in row
                    )
    return out


def test_encrypted_mode_stores_no_vector_bytes(postgres_dsn: str, metric: str) -> None:
    rng = np.random.default_rng(13)
    cipher = TemplateCipher.generate()
    items = [(f"s{i}", _vectors(rng, 1 + i % 2, 128), {"i": str(i)}) for i in range(30)]
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
    postgres_dsn: str, postgres_server, metric: str  # noqa: ANN001
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
        probes = _vectors(rng, 6)
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
    store.add_many("t", [(f"keep{i}", _vectors(rng, 2), None) for i in range(20)])
    gone = _vectors(rng, 3)
    store.add("t", "gone", gone, {"secret": "MARKER-private-metadata-value"})
    kept = _vectors(rng, 1)
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
    a.add_many("t", [(f"s{i}", _vectors(rng, 2), None) for i in range(50)])
    probes = _vectors(rng, 8)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(store: PostgresStore) -> None:
        try:
            while not stop.is_set():
                for p in probes:
                    matches = store.search("t", p, 5)
                    assert len({m.subject_id for m in matches}) == len(matches) == 5
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

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

    threads = [threading.Thread(target=reader, args=(s,)) for s in (a, b)]
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
