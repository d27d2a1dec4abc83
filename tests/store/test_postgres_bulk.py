"""PostgresStore.bulk_add on a real PostgreSQL + pgvector server: COPY-loaded rows equal add_many's, the HNSW index
is rebuilt (or kept) and still used, bad input changes nothing, the encrypted mode takes the ordinary path."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from advface.crypto import TemplateCipher
from advface.errors import EmbeddingError, ValidationError
from advface.store.postgres import PostgresStore

DIM = 16


def _items(n: int, seed: int, per: int = 2) -> list[tuple[str, np.ndarray, dict[str, str]]]:
    x = np.random.default_rng(seed).standard_normal((n, per, DIM)).astype(np.float32)
    return [(f"p{seed}_{i:04d}", x[i], {"i": str(i)}) for i in range(n)]


def _hnsw_exists(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass('advface_templates_hnsw')").fetchone()[0] is not None


@pytest.mark.parametrize("rebuild", [None, True, False])
def test_bulk_add_equals_add_many(postgres_dsn: str, rebuild: bool | None) -> None:
    first, second = _items(300, 1), _items(40, 2)
    with (
        PostgresStore(postgres_dsn, DIM, "cosine", exact_max=0, table_prefix="bulk") as bulk,
        PostgresStore(postgres_dsn, DIM, "cosine", exact_max=0, table_prefix="plain") as plain,
    ):
        ids = bulk.bulk_add("t", first, rebuild_index=rebuild)
        assert [len(i) for i in ids] == [2] * 300 and len({t for i in ids for t in i}) == 600
        bulk.bulk_add("t", second, rebuild_index=rebuild)  # appends, merging metadata of a known subject too
        bulk.bulk_add("t", [("p1_0000", first[0][1][:1], {"x": "y"})], rebuild_index=rebuild)
        plain.add_many("t", first)
        plain.add_many("t", second)
        plain.add_many("t", [("p1_0000", first[0][1][:1], {"x": "y"})])
        assert bulk.count("t") == plain.count("t") == 681 and bulk.count("t", subjects=True) == 340
        info = bulk.get_subject("t", "p1_0000")
        assert info.metadata == {"i": "0", "x": "y"} and len(info.template_ids) == 3
        for sid, vectors, _ in first[:5] + second[:5]:
            np.testing.assert_array_equal(bulk.subject_vectors("t", sid)[:2], vectors)  # bit-exact
        probes = np.random.default_rng(3).standard_normal((20, DIM)).astype(np.float32)
        for q in probes:  # the (rebuilt or maintained) HNSW index answers like the row-by-row one
            a = [m.subject_id for m in bulk.search("t", q, 5)]
            b = [m.subject_id for m in plain.search("t", q, 5)]
            assert len(set(a) & set(b)) >= 4
        assert bulk.search("t", first[7][1][0], 1)[0].subject_id == first[7][0]
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT to_regclass('bulk_templates_hnsw')").fetchone()[0] is not None


def test_bulk_add_bad_input_changes_nothing(postgres_dsn: str) -> None:
    with PostgresStore(postgres_dsn, DIM, "euclidean") as s:
        s.bulk_add("t", _items(10, 1))
        bad = _items(5, 2)
        bad[3] = (bad[3][0], np.full((1, DIM), np.nan, np.float32), None)
        with pytest.raises(EmbeddingError):
            s.bulk_add("t", bad)
        with pytest.raises(ValidationError, match="rebuild_index"):
            s.bulk_add("t", _items(2, 3), rebuild_index="yes")  # type: ignore[arg-type]
        assert s.count("t") == 20 and _hnsw_exists(postgres_dsn)


def test_bulk_add_encrypted_mode(postgres_dsn: str) -> None:
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=TemplateCipher.generate()) as s:
        items = _items(30, 4)
        s.bulk_add("t", items)
        assert s.index_size("t") == 60
        assert s.search("t", items[9][1][1], 1)[0].subject_id == items[9][0]
        with psycopg.connect(postgres_dsn) as conn:
            assert conn.execute("SELECT COUNT(*) FROM advface_templates WHERE vector IS NOT NULL").fetchone()[0] == 0
