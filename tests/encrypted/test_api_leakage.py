"""What benchmarks/encrypted_api_leakage.py relies on: an API client's Verify answers through the key service (no
score with a rejection, even when rounded scores are released; its probes never count as forged), and one search
run with the largest budget giving the outcome of every smaller budget."""

from __future__ import annotations

import numpy as np
import pytest

from advface.audit.attacks.score_search import search_with_decisions, search_with_scores
from advface.encrypted.gallery import EncryptedGallery
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
from advface.encrypted.requests import prepare_scores

DIM = 16
THRESHOLD = -0.6


def test_rounded_scores_come_only_with_a_match_and_probes_never_lock(keys, binding_key, rng) -> None:  # noqa: ANN001
    centres = rng.standard_normal((20, DIM)) * 0.25
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    refs = gallery.add(centres)
    core = KeyServiceCore(
        keys, binding_key, DecisionPolicy("euclidean", THRESHOLD, score_decimals=2), lock_after_refusals=1
    )
    answers: list[tuple[bool, float | None, float]] = []

    def decide(probes: np.ndarray) -> np.ndarray:
        out = []
        for p in probes:
            decision = core.verify(prepare_scores(gallery, binding_key, "verify", "t", p, refs=[refs[3]]).request)
            released = None if decision.best is None else decision.best.score
            answers.append((decision.match, released, -float(np.linalg.norm(p - centres[3]))))
            out.append(decision.match)
        return np.array(out)

    near = centres[3] + 0.05 * rng.standard_normal((5, DIM))  # other photos of the victim's look-alikes
    pool = np.concatenate([centres[np.arange(20) != 3], rng.standard_normal((200, DIM)) * 0.25, near])
    found = search_with_decisions(decide, pool, budget=150, seed=0, batch=16)
    assert found.accepted and len(answers) >= found.queries
    assert any(not match for match, _, _ in answers)
    for match, released, true_score in answers:
        assert match == (true_score >= THRESHOLD)
        if match:
            assert released == pytest.approx(round(true_score, 2), abs=0.011)
        else:
            assert released is None  # a rejection carries no score: before a match the client sees decisions only
    assert core.forged_requests == 0 and not core.locked  # lock_after_refusals=1 never triggers on real probes


@pytest.mark.parametrize("scores", [True, False])
def test_a_smaller_budget_stops_the_same_search_earlier(scores: bool) -> None:
    rng = np.random.default_rng(7)
    pool = rng.standard_normal((400, DIM)) * 0.3
    for seed in range(6):
        target = rng.standard_normal(DIM) * 0.3

        def oracle(probes: np.ndarray, target: np.ndarray = target) -> np.ndarray:
            return -np.linalg.norm(probes - target, axis=1)

        def run(budget: int, seed: int = seed, oracle=oracle):  # noqa: ANN001, ANN202
            if scores:
                return search_with_scores(oracle, pool, "euclidean", -0.25, budget, seed=seed)
            return search_with_decisions(lambda p: oracle(p) >= -0.55, pool, budget, seed=seed)

        large = run(300)
        for small_budget in (20, 60, 150):
            small = run(small_budget)
            assert small.accepted == (large.accepted and large.queries <= small_budget)
            if small.accepted:
                assert small.queries == large.queries
                np.testing.assert_array_equal(small.template, large.template)
