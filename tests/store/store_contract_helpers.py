"""What every template store (SQLiteFaissStore, PostgresStore) must do, as helpers shared by the store tests.

``test_store_contract.py`` runs these checks on both backends; the backends' own test files call them again where
they add a check of their own storage (the faiss index, PostgreSQL rows, another search path) through the ``check``
hooks, so that no scenario is written twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from advface.encoders.base import pair_scores
from advface.errors import AdvfaceError, EmbeddingError, NotFoundError, ValidationError
from advface.store import Match, SubjectInfo

DIM = 16
METRICS = ["euclidean", "cosine"]

Store = Any  # SQLiteFaissStore | PostgresStore: the same public methods
Hook = Callable[[], None]


def _nothing() -> None:
    """The default hook: no backend-specific check."""


def vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """``n`` random float32 vectors of ``dim`` dimensions."""
    return rng.standard_normal((n, dim)).astype(np.float32)


def brute_force(store: Store, tenant: str, probe: np.ndarray, k: int) -> list[tuple[str, float]]:
    """Best score per subject by pair_scores over every template, top k."""
    best: dict[str, float] = {}
    page_token = ""
    while True:
        page, page_token = store.list_subjects(tenant, page_size=7, page_token=page_token)
        for info in page:
            stored = store.subject_vectors(tenant, info.subject_id)
            scores = pair_scores(np.repeat(probe[None], len(stored), 0), stored, store.metric)
            best[info.subject_id] = float(scores.max())
        if not page_token:
            break
    return sorted(best.items(), key=lambda kv: -kv[1])[:k]


def snapshot(store: Store) -> tuple:
    """Everything observable about a store (counts, index size, listings, vectors), to check that failed calls
    change nothing."""
    subjects = {}
    for tenant in store.tenants():
        page, _ = store.list_subjects(tenant, page_size=1000)
        subjects[tenant] = [(s.subject_id, s.metadata, s.template_ids) for s in page]
    stored = {(t, s[0]): store.subject_vectors(t, s[0]).tobytes() for t, page in subjects.items() for s in page}
    return store.count(), store.count(subjects=True), store.index_size(), subjects, stored


# --------------------------------------------------------------------------------------------------- basics


def check_add_get_list_and_vectors(store: Store, after_replace: Hook = _nothing) -> None:
    """add / get_subject / subject_vectors: ids, metadata merge, float32 round trip, replace, odd metadata text.
    ``after_replace`` runs when tenant t1 holds exactly one subject with one template."""
    rng = np.random.default_rng(0)
    alice = vectors(rng, 2)
    ids = store.add("t1", "alice", alice, {"name": "Alice", "team": "a"})
    assert len(ids) == 2 and len(set(ids)) == 2 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    info = store.get_subject("t1", "alice")
    assert isinstance(info, SubjectInfo)
    assert (info.subject_id, info.metadata, info.template_ids) == ("alice", {"name": "Alice", "team": "a"}, ids)
    assert info.created_at > 1e9
    np.testing.assert_array_equal(store.subject_vectors("t1", "alice"), alice)  # bit-exact float32 round trip
    assert store.subject_vectors("t1", "alice").dtype == np.float32

    # appending merges metadata; a 1-d vector is one template; float64 input is stored as float32
    more = rng.standard_normal(DIM)
    ids2 = store.add("t1", "alice", more, {"team": "b", "x": "1"})
    info = store.get_subject("t1", "alice")
    assert info.template_ids == ids + ids2 and info.metadata == {"name": "Alice", "team": "b", "x": "1"}
    np.testing.assert_array_equal(store.subject_vectors("t1", "alice"), np.vstack([alice, more.astype(np.float32)]))

    new = vectors(rng, 1)  # replace: old templates and metadata go, in one call
    ids3 = store.add("t1", "alice", new, {"only": "this"}, replace=True)
    info = store.get_subject("t1", "alice")
    assert (info.template_ids, info.metadata) == (ids3, {"only": "this"})
    assert store.count("t1") == 1 and store.count("t1", subjects=True) == 1
    top = store.search("t1", new[0], 1)[0]
    assert (top.subject_id, top.template_id) == ("alice", ids3[0])
    after_replace()
    # metadata values may hold any text, also what JSON escapes (NUL, quotes)
    store.add("t1", "bob", new, {"odd": 'a\x00b"c\\'})
    assert store.get_subject("t1", "bob").metadata == {"odd": 'a\x00b"c\\'}


def check_list_subjects_pages(store: Store, names: Sequence[str], page_size: int, pages: int) -> None:
    """list_subjects pages through ``names`` in code point order, ``page_size`` at a time, in ``pages`` pages."""
    rng = np.random.default_rng(1)
    store.add_many("t", [(n, vectors(rng, 1 + i % 2), {"i": str(i)}) for i, n in enumerate(names)])
    seen, token, got_pages = [], "", 0
    while True:
        page, token = store.list_subjects("t", page_size=page_size, page_token=token)
        got_pages += 1
        seen.extend(page)
        if not token:
            break
    if getattr(store, "sealed_names", False):  # keyed-hash order: every subject once, in a fixed order
        assert sorted(s.subject_id for s in seen) == sorted(names) and len(seen) == len(names)
    else:
        assert [s.subject_id for s in seen] == sorted(names)  # code point order, whatever the database's collation
    assert got_pages == pages
    for s in seen:
        assert s == store.get_subject("t", s.subject_id)
    assert store.list_subjects("t", page_size=len(names)) == (seen, "")
    assert store.list_subjects("other") == ([], "")


def check_search_best_per_subject(store: Store) -> None:
    """search returns each subject once (its best template), top k by score, equal to a brute-force search."""
    rng = np.random.default_rng(2)
    probe = vectors(rng, 1)[0]
    items = [(f"s{i:03d}", vectors(rng, 1 + i % 3), None) for i in range(60)]
    # one subject with many templates close to the probe: must appear once, and not crowd out the others
    items.append(("crowd", probe + 0.01 * vectors(rng, 200), None))
    store.add_many("t", items)
    for k in (1, 5, 61, 100):
        matches = store.search("t", probe, k)
        assert all(isinstance(m, Match) for m in matches)
        expected = brute_force(store, "t", probe, k)
        assert len(matches) == min(k, 61)
        assert [m.subject_id for m in matches] == [e[0] for e in expected]
        np.testing.assert_allclose([m.score for m in matches], [e[1] for e in expected], atol=2e-5)
        assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
        assert matches[0].subject_id == "crowd"
        for m in matches[:5]:  # the template returned is the subject's best one
            info = store.get_subject("t", m.subject_id)
            stored = store.subject_vectors("t", m.subject_id)
            scores = pair_scores(np.repeat(probe[None], len(stored), 0), stored, store.metric)
            assert info.template_ids[int(np.argmax(scores))] == m.template_id
    assert store.search("empty-tenant", probe, 3) == []


def check_deletes(store: Store, sized: Callable[[int], None] = lambda n: None) -> None:
    """delete_template / delete_subject: gone from reads, counts and search; the last template takes its subject
    along; unknown ids raise NotFoundError. ``sized(n)`` runs wherever the store holds ``n`` templates."""
    rng = np.random.default_rng(4)
    alice, bob = vectors(rng, 3), vectors(rng, 2)
    ida = store.add("t", "alice", alice)
    idb = store.add("t", "bob", bob)
    assert store.count() == 5
    sized(5)

    assert store.delete_template("t", ida[1]) == "alice"
    assert store.get_subject("t", "alice").template_ids == [ida[0], ida[2]]
    np.testing.assert_array_equal(store.subject_vectors("t", "alice"), alice[[0, 2]])
    assert all(m.template_id != ida[1] for m in store.search("t", alice[1], 2))
    assert store.count() == 4
    sized(4)

    assert store.delete_subject("t", "alice") == 2
    with pytest.raises(NotFoundError):
        store.get_subject("t", "alice")
    assert [m.subject_id for m in store.search("t", alice[0], 5)] == ["bob"]
    assert store.count() == 2
    sized(2)

    store.delete_template("t", idb[0])  # removing the last template removes the subject
    assert store.delete_template("t", idb[1]) == "bob"
    with pytest.raises(NotFoundError):
        store.get_subject("t", "bob")
    assert store.count() == 0 and store.tenants() == [] and store.search("t", bob[0], 3) == []
    sized(0)
    with pytest.raises(NotFoundError):
        store.delete_subject("t", "alice")
    with pytest.raises(NotFoundError):
        store.delete_template("t", ida[0])


def check_add_many_is_atomic(store: Store, after_rollbacks: Hook = _nothing) -> None:
    """A failing add_many (bad item, a failure inside the transaction, a subject twice with replace, a failing
    replace) changes nothing. ``after_rollbacks`` runs when tenant t holds one subject with one template."""
    rng = np.random.default_rng(7)
    store.add("t", "existing", vectors(rng, 1), {f"m{i}": "v" for i in range(31)})
    before = snapshot(store)
    bad = vectors(rng, 2)
    bad[1, 0] = np.nan
    with pytest.raises(EmbeddingError, match=r"items\[2\]"):
        store.add_many("t", [("a", vectors(rng, 1), None), ("b", vectors(rng, 2), None), ("c", bad, None)])
    assert snapshot(store) == before
    # a failure found inside the transaction (merged metadata too large) rolls back the earlier items too
    with pytest.raises(ValidationError, match="after merging"):
        store.add_many("t", [("a", vectors(rng, 1), None), ("existing", vectors(rng, 1), {"n1": "1", "n2": "2"})])
    assert snapshot(store) == before
    with pytest.raises(NotFoundError):
        store.get_subject("t", "a")
    with pytest.raises(ValidationError, match="twice"):
        store.add_many("t", [("a", vectors(rng, 1), None), ("a", vectors(rng, 1), None)], replace=True)
    assert snapshot(store) == before
    after_rollbacks()
    # without replace, a subject may appear twice (its templates are appended in order)
    ids = store.add_many("t", [("a", vectors(rng, 1), {"x": "1"}), ("a", vectors(rng, 2), {"y": "2"})])
    info = store.get_subject("t", "a")
    assert info.template_ids == ids[0] + ids[1] and info.metadata == {"x": "1", "y": "2"}
    assert store.add_many("t", []) == []
    # a replacing add that fails keeps the old templates
    before = snapshot(store)
    with pytest.raises(EmbeddingError):
        store.add_many("t", [("a", vectors(rng, 1), None), ("existing", bad, None)], replace=True)
    assert snapshot(store) == before


# --------------------------------------------------------------------------------------------------- reopening


def fill_for_reopen(store: Store, probes: np.ndarray, rng: np.random.Generator) -> tuple:
    """Two tenants with adds and deletes; returns what must read the same after reopening (see check_reopened)."""
    store.add_many("A", [(f"a{i}", vectors(rng, 1 + i % 3), {"i": str(i)}) for i in range(40)])
    store.add_many("B", [(f"b{i}", vectors(rng, 2), None) for i in range(10)])
    store.delete_subject("A", "a7")
    store.delete_template("A", store.get_subject("A", "a5").template_ids[0])
    return _reopen_state(store, probes)


def _reopen_state(store: Store, probes: np.ndarray) -> tuple:
    searches = [store.search(t, p, 8) for t in ("A", "B") for p in probes]
    counts = (store.count(), store.count("A"), store.count(subjects=True), store.tenants())
    return searches, store.list_subjects("A", page_size=1000), counts


def check_reopened(store: Store, probes: np.ndarray, state: tuple) -> None:
    """The reopened ``store`` gives the same searches, listing and counts as when fill_for_reopen returned."""
    searches, listing, counts = _reopen_state(store, probes)
    assert searches == state[0]
    assert listing == state[1]
    assert counts == state[2]


# --------------------------------------------------------------------------------------------------- concurrency


def search_until(store: Store, probes: np.ndarray, stop: threading.Event, errors: list[BaseException]) -> None:
    """Search ``store`` with every probe until ``stop`` is set; every result must hold 5 distinct subjects. An
    exception is appended to ``errors`` (run this in a thread)."""
    try:
        while not stop.is_set():
            for p in probes:
                matches = store.search("t", p, 5)
                assert len({m.subject_id for m in matches}) == len(matches) == 5
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)


# --------------------------------------------------------------------------------------------------- bad input


def fill_for_bad_input(store: Store, rng: np.random.Generator) -> None:
    """The store that bad_calls run against: subject "full" (30 metadata keys, 2 templates) and "x" (1)."""
    store.add("t", "full", vectors(rng, 2), {f"m{i}": "v" for i in range(30)})
    store.add("t", "x", vectors(rng, 1), {"keep": "me"})


def bad_calls(dim: int) -> list[tuple[str, Callable[[Store], object], type[AdvfaceError]]]:
    """(name, call, error) for calls that must raise ``error`` and change nothing (on a fill_for_bad_input store)."""
    good = np.ones((1, dim), np.float32)
    nan, inf, zero = good.copy(), good.copy(), np.zeros((1, dim), np.float32)
    nan[0, 3], inf[0, 1] = np.nan, np.inf
    two = np.vstack([good, nan])
    many = {f"k{i}": "v" for i in range(33)}
    return [
        ("nan", lambda s: s.add("t", "x", nan), EmbeddingError),
        ("inf", lambda s: s.add("t", "x", inf), EmbeddingError),
        ("one bad row of two", lambda s: s.add("t", "x", two), EmbeddingError),
        ("zero vector", lambda s: s.add("t", "x", zero), EmbeddingError),
        ("wrong dim", lambda s: s.add("t", "x", np.ones((1, dim + 1))), EmbeddingError),
        ("3-d array", lambda s: s.add("t", "x", np.ones((1, 1, dim))), EmbeddingError),
        ("no vectors", lambda s: s.add("t", "x", np.ones((0, dim))), EmbeddingError),
        ("integer vectors", lambda s: s.add("t", "x", np.ones((1, dim), np.int32)), EmbeddingError),
        ("huge vector", lambda s: s.add("t", "x", np.full((1, dim), 1e300)), EmbeddingError),
        ("float32 overflow", lambda s: s.add("t", "x", np.full((1, dim), 1e39)), EmbeddingError),
        ("float32 underflow", lambda s: s.add("t", "x", np.full((1, dim), 1e-50)), EmbeddingError),
        ("empty subject", lambda s: s.add("t", "", good), ValidationError),
        ("long subject", lambda s: s.add("t", "x" * 129, good), ValidationError),
        ("control char", lambda s: s.add("t", "a\nb", good), ValidationError),
        ("nul char", lambda s: s.add("t", "a\x00b", good), ValidationError),
        ("bidi override", lambda s: s.add("t", "a\u202eb", good), ValidationError),
        ("leading space", lambda s: s.add("t", " a", good), ValidationError),
        ("non-str subject", lambda s: s.add("t", 12, good), ValidationError),
        ("lone surrogate", lambda s: s.add("t", "a\ud800", good), ValidationError),
        ("empty tenant", lambda s: s.add("", "x", good), ValidationError),
        ("surrogate tenant", lambda s: s.add("t\udc80", "x", good), ValidationError),
        ("surrogate metadata value", lambda s: s.add("t", "x", good, {"k": "\udc80"}), ValidationError),
        ("long tenant", lambda s: s.add("t" * 129, "x", good), ValidationError),
        ("33 metadata keys", lambda s: s.add("t", "x", good, many), ValidationError),
        ("long metadata key", lambda s: s.add("t", "x", good, {"k" * 65: "v"}), ValidationError),
        ("long metadata value", lambda s: s.add("t", "x", good, {"k": "v" * 1025}), ValidationError),
        ("non-str metadata value", lambda s: s.add("t", "x", good, {"k": 1}), ValidationError),
        ("metadata not a mapping", lambda s: s.add("t", "x", good, [("k", "v")]), ValidationError),
        ("replace not bool", lambda s: s.add("t", "x", good, replace="yes"), ValidationError),
        (
            "merged metadata too large",
            lambda s: s.add("t", "full", good, {f"n{i}": "v" for i in range(3)}),
            ValidationError,
        ),
        ("unknown subject", lambda s: s.delete_subject("t", "nobody"), NotFoundError),
        ("unknown subject in get", lambda s: s.get_subject("t", "nobody"), NotFoundError),
        ("unknown template", lambda s: s.delete_template("t", "0" * 32), NotFoundError),
        ("bad template id", lambda s: s.delete_template("t", ""), ValidationError),
        ("unknown tenant", lambda s: s.delete_subject("nobody", "full"), NotFoundError),
        ("probe nan", lambda s: s.search("t", nan[0], 1), EmbeddingError),
        ("probe zero", lambda s: s.search("t", zero[0], 1), EmbeddingError),
        ("probe wrong dim", lambda s: s.search("t", np.ones(dim + 1), 1), EmbeddingError),
        ("two probes", lambda s: s.search("t", np.ones((2, dim)), 1), EmbeddingError),
        ("k zero", lambda s: s.search("t", good[0], 0), ValidationError),
        ("k bool", lambda s: s.search("t", good[0], True), ValidationError),
        ("k float", lambda s: s.search("t", good[0], 2.0), ValidationError),
        ("page size zero", lambda s: s.list_subjects("t", page_size=0), ValidationError),
        ("page size too big", lambda s: s.list_subjects("t", page_size=1001), ValidationError),
        ("page token junk", lambda s: s.list_subjects("t", page_token="!!junk"), ValidationError),
        ("page token base64 junk", lambda s: s.list_subjects("t", page_token="YWJjZA"), ValidationError),
        ("items not a list", lambda s: s.add_many("t", "abc"), ValidationError),
        ("item too short", lambda s: s.add_many("t", [("x",)]), ValidationError),
    ]
