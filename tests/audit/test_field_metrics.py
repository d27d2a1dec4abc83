"""Metrics as the field reports them (advface.audit.field_metrics): FNMR at FMR with counts and a Wilson interval,
every pair's scores, and BTPBench's renewability (largest set of mutually non-matching templates)."""

from __future__ import annotations

import numpy as np
import pytest

from advface.audit.field_metrics import (
    all_pair_scores,
    fnmr_at_fmr,
    largest_nonmatching_set,
    renewability_sets,
    wilson_interval,
)


def test_wilson_interval_brackets_the_rate() -> None:
    lo, hi = wilson_interval(10, 100)
    assert lo < 0.1 < hi and hi - lo < 0.13
    assert wilson_interval(0, 50)[0] == 0.0 and 0 < wilson_interval(0, 50)[1] < 0.08
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_fnmr_at_fmr_keeps_the_false_match_rate_and_counts_comparisons() -> None:
    rng = np.random.default_rng(0)
    impostor = rng.normal(0.0, 1.0, 20_000)
    genuine = rng.normal(3.0, 1.0, 500)
    m = fnmr_at_fmr(genuine, impostor, 1e-3)
    assert m.fmr_achieved <= 1e-3 and m.impostors_sufficient
    assert m.genuine_comparisons == 500 and m.impostor_comparisons == 20_000
    assert m.fnmr == pytest.approx((genuine <= m.threshold).mean())
    assert m.fnmr_ci95[0] <= m.fnmr <= m.fnmr_ci95[1]
    strict = fnmr_at_fmr(genuine, impostor, 1e-4)
    assert strict.threshold >= m.threshold and strict.fnmr >= m.fnmr


def test_fnmr_at_fmr_with_too_few_impostors_says_so() -> None:
    m = fnmr_at_fmr(np.array([0.9, 0.5]), np.array([0.1, 0.2, 0.6]), 1e-4)
    assert not m.impostors_sufficient and m.threshold == 0.6 and m.fmr_achieved == 0.0 and m.fnmr == 0.5


def test_all_pair_scores_splits_every_pair_once() -> None:
    emb = np.eye(4, dtype=np.float32)
    genuine, impostor = all_pair_scores(emb, emb, np.array(["a", "a", "b", "b"]), "cosine", block=3)
    assert len(genuine) == 2 and len(impostor) == 4  # 6 pairs a < b


def test_largest_nonmatching_set_is_the_maximum_independent_set() -> None:
    none = np.zeros((4, 4), bool)
    assert largest_nonmatching_set(none) == 4
    all_match = np.ones((3, 3), bool)
    assert largest_nonmatching_set(all_match) == 1
    path = np.zeros((4, 4), bool)  # 0-1-2-3 path: {0, 2} or {1, 3} or {0, 3}
    for a, b in ((0, 1), (1, 2), (2, 3)):
        path[a, b] = path[b, a] = True
    assert largest_nonmatching_set(path) == 2


def test_renewability_sets_over_people() -> None:
    rng = np.random.default_rng(1)
    unrelated = rng.normal(size=(3, 5, 32))  # 5 random templates per person: none match at 0.9
    sets = renewability_sets(unrelated, "cosine", 0.9, "random")
    assert sets.min == 5 and sets.all_keys_fraction == 1.0 and sets.keys == 5 and sets.people == 3
    same = np.repeat(rng.normal(size=(2, 1, 32)), 4, axis=1)  # the same template under 4 "keys": all match
    assert renewability_sets(same, "cosine", 0.9, "same").min == 1
