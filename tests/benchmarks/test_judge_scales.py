"""judge_scales.pair_cosines: genuine pairs are every pair within a person, impostors never share a person."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.judge_scales import pair_cosines


def test_pair_cosines_separates_genuine_from_impostor_pairs() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16))
    identities = np.repeat(np.array(list("abcde")), [1, 2, 3, 4, 5])
    embeddings = centres[np.searchsorted(np.array(list("abcde")), identities)] + 0.1 * rng.standard_normal((15, 16))
    out = pair_cosines(embeddings * 7.0, identities, impostors=2000, seed=1)  # scale does not matter
    assert out["genuine_pairs"] == 0 + 1 + 3 + 6 + 10
    assert out["genuine_mean"] > 0.95 and abs(out["impostor_mean"]) < 0.5
    assert 0 < out["impostor_pairs"] <= 2000
    same = pair_cosines(np.ones((4, 3)), np.array(list("xxyy")), impostors=50, seed=0)
    assert same["genuine_mean"] == pytest.approx(1.0) and same["impostor_mean"] == pytest.approx(1.0)
