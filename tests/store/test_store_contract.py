"""The template-store contract, run on both backends (SQLiteFaissStore, PostgresStore) and both metrics: storage,
paging, search, exact scores, tenants, deletion, reopening, open errors, bad input, add_many atomicity.

What only one backend has (the faiss index, PostgreSQL rows, the HNSW path, on-disk erasure) is tested in that
backend's own file, with the helpers of store_contract_helpers."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from store_contract_helpers import (
    DIM,
    METRICS,
    Store,
    bad_calls,
    check_add_get_list_and_vectors,
    check_add_many_is_atomic,
    check_deletes,
    check_list_subjects_pages,
    check_reopened,
    check_search_best_per_subject,
    fill_for_bad_input,
    fill_for_reopen,
    snapshot,
    vectors,
)

from advface.crypto import TemplateCipher
from advface.errors import ClosedError, ConfigError, NotFoundError
from advface.store.postgres import PostgresStore
from advface.store.sqlite_faiss import SQLiteFaissStore

BACKENDS = [
    "sqlite",
    "sqlite-sealed",
    "postgresql",
    "postgres-sealed",
]  # sealed: encrypted from creation (advface.store.sealing)


@pytest.fixture(params=METRICS)
def metric(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path, metric: str) -> Callable[..., Store]:
    """Opens the backend's store (the same one each call): ``open_store(dim=..., metric=...)``."""
    if request.param == "sqlite":
        path = tmp_path / "store" / "templates.sqlite"
        return lambda dim=DIM, metric=metric: SQLiteFaissStore(path, dim, metric, use_gpu=False)
    if request.param == "sqlite-sealed":
        path, cipher = tmp_path / "store" / "templates.sqlite", TemplateCipher.generate()
        return lambda dim=DIM, metric=metric: SQLiteFaissStore(path, dim, metric, use_gpu=False, cipher=cipher)
    dsn = request.getfixturevalue("postgres_dsn")  # only PostgreSQL cases need the server
    if request.param == "postgres-sealed":
        cipher = TemplateCipher.generate()
        return lambda dim=DIM, metric=metric: PostgresStore(dsn, dim, metric, cipher=cipher)
    return lambda dim=DIM, metric=metric: PostgresStore(dsn, dim, metric)


@pytest.fixture
def store(open_store: Callable[..., Store]):  # noqa: ANN201
    with open_store() as s:
        yield s


# --------------------------------------------------------------------------------------------------- basics


def test_add_get_list_and_vectors(store: Store) -> None:
    check_add_get_list_and_vectors(store)


@pytest.mark.parametrize(
    ("names", "page_size", "pages"),
    [
        (["zoe", "Bob", "alice", "émile", "carl", "bob", "Z 1"], 3, 3),
        (["zoe", "Bob", "alice", "émile", "carl", "bob", "Z 1", "ß", "日本"], 4, 3),
    ],
    ids=["7-by-3", "9-by-4"],
)
def test_list_subjects_pages_in_subject_order(store: Store, names: list[str], page_size: int, pages: int) -> None:
    check_list_subjects_pages(store, names, page_size, pages)


def test_search_best_per_subject_top_k_order(store: Store) -> None:
    check_search_best_per_subject(store)


def test_exact_vector_scores(store: Store) -> None:
    v = np.array([3.0, 4.0] + [0.0] * (DIM - 2), np.float32)
    store.add("t", "a", v)
    store.add("t", "b", -v)
    matches = store.search("t", v * 2, 2)
    if store.metric == "euclidean":
        assert [m.subject_id for m in matches] == ["a", "b"]
        np.testing.assert_allclose([m.score for m in matches], [-5.0, -15.0], rtol=1e-6)
    else:
        np.testing.assert_allclose([m.score for m in matches], [1.0, -1.0], rtol=1e-6)


def test_tenants_are_isolated(store: Store) -> None:
    rng = np.random.default_rng(3)
    va, vb = vectors(rng, 1), vectors(rng, 1)
    ida = store.add("A", "same-id", va, {"tenant": "A"})
    idb = store.add("B", "same-id", vb, {"tenant": "B"})
    store.add("B", "only-b", vectors(rng, 2))
    assert store.tenants() == ["A", "B"]
    assert (store.count("A"), store.count("B"), store.count()) == (1, 3, 4)
    assert (store.count("A", subjects=True), store.count(subjects=True)) == (1, 3)
    # searching A with B's exact vector still only finds A's template
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


def test_deletes(store: Store) -> None:
    check_deletes(store)


# --------------------------------------------------------------------------------------------------- reopening


def test_reopen_keeps_data_and_checks_dim_metric(open_store: Callable[..., Store], metric: str) -> None:
    rng = np.random.default_rng(5)
    probes = vectors(rng, 5)
    with open_store() as s:
        state = fill_for_reopen(s, probes, rng)
    with open_store() as s:
        check_reopened(s, probes, state)
    other = "cosine" if metric == "euclidean" else "euclidean"
    with pytest.raises(ConfigError, match=f"16-d {metric}"):
        open_store(dim=DIM + 1)
    with pytest.raises(ConfigError, match=other):
        open_store(metric=other)


def test_open_errors_and_closing(open_store: Callable[..., Store]) -> None:
    with pytest.raises(ConfigError, match="metric"):
        open_store(metric="manhattan")
    with pytest.raises(ConfigError, match="dim"):
        open_store(dim=0)
    s = open_store()
    s.close()
    s.close()  # twice is harmless
    with pytest.raises(ClosedError, match="closed"):
        s.count()
    with pytest.raises(ClosedError, match="closed"):
        s.add("t", "x", np.ones(DIM))


# --------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module", params=[(b, m) for b in BACKENDS for m in METRICS], ids="-".join)
def shared_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """One store per backend and metric for the bad-input cases (which must leave it unchanged)."""
    backend, metric = request.param
    s: SQLiteFaissStore | PostgresStore
    if backend.startswith("sqlite"):
        cipher = TemplateCipher.generate() if backend == "sqlite-sealed" else None
        s = SQLiteFaissStore(tmp_path_factory.mktemp("bad") / "t.sqlite", DIM, metric, use_gpu=False, cipher=cipher)
    else:
        dsn = request.getfixturevalue("postgres_server").create_database(f"bad_{metric}_{uuid.uuid4().hex[:8]}")
        s = PostgresStore(dsn, DIM, metric, cipher=TemplateCipher.generate() if backend == "postgres-sealed" else None)
    with s:
        fill_for_bad_input(s, np.random.default_rng(6))
        yield s


@pytest.mark.parametrize("case", range(len(bad_calls(DIM))), ids=[c[0] for c in bad_calls(DIM)])
def test_bad_input_raises_and_changes_nothing(shared_store: Store, case: int) -> None:
    before = snapshot(shared_store)
    assert before[:2] == (3, 2)
    name, call, error = bad_calls(DIM)[case]
    with pytest.raises(error):
        call(shared_store)
    assert snapshot(shared_store) == before


def test_add_many_is_atomic(store: Store) -> None:
    check_add_many_is_atomic(store)
