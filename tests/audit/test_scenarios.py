"""The audit's scenarios (advface.audit.attacks.known_pairs, score_search; advface.audit.stages.scenarios): the
known-pairs curve rises with k for a linear scheme and stays flat for a binary one at small k, the score search
rebuilds an accepted template with scores far sooner than with decisions only, and the quick report carries them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from advface.audit.attacks.known_pairs import fit_inverse_map, known_pairs_curve
from advface.audit.attacks.score_search import search_with_decisions, search_with_scores
from advface.audit.metrics import score_matrix
from advface.audit.schemes import biohash
from advface.errors import ConfigError

DIM = 32


def _people(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)) / np.sqrt(DIM)


def _rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(DIM, DIM)))
    return q


def test_inverse_map_recovers_an_affine_scheme_from_enough_pairs() -> None:
    raw = _people(100, 0)
    q = _rotation(1)
    inverse = fit_inverse_map(raw @ q + 0.3, raw)
    victims = _people(10, 2)
    assert np.allclose(inverse(victims @ q + 0.3), victims, atol=1e-2)
    one = fit_inverse_map((raw @ q)[:1], raw[:1])
    assert np.allclose(one(victims @ q), raw[0], atol=1e-6)  # one pair: every estimate is that pair's raw template
    with pytest.raises(ConfigError):
        fit_inverse_map(raw[:3], raw[:2])


def test_known_pairs_curve_rises_with_k_for_a_linear_scheme() -> None:
    pool, victims = _people(300, 3), _people(40, 4)
    q = _rotation(5)
    threshold = -0.3  # minus the Euclidean distance; templates are about 1 apart
    curve = known_pairs_curve(pool, pool @ q, victims @ q, victims, (1, 4, 16, 64, 256, 1024), "euclidean", threshold)
    assert [p.k for p in curve] == [1, 4, 16, 64, 256, 300]  # capped by the pool, no repeat
    rates = [p.template_match_rate for p in curve]
    errors = [p.relative_error for p in curve]
    assert rates[0] == 0.0 and rates[-1] == 1.0
    assert errors[0] > 0.9 > 0.05 > errors[-1]
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    # BioHashing's signs are not linear: even 256 pairs leave a large error
    keyed = biohash(pool, b"k")
    binary = known_pairs_curve(pool, keyed, biohash(victims, b"k"), victims, (256,), "euclidean", threshold)
    assert binary[0].relative_error > 5 * errors[-2]


def _oracle(target: np.ndarray, metric: str):  # noqa: ANN202 - a closure
    return lambda probes: score_matrix(probes, target[None], metric)[:, 0]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_score_search_beats_decisions_only(metric: str) -> None:
    pool = _people(200, 6)
    target = _people(1, 7)[0]
    # accept within 0.25 of the target (Euclidean) / at cosine 0.97: no pool template is that close
    threshold = -0.25 if metric == "euclidean" else 0.97
    assert (score_matrix(pool, target[None], metric) < threshold).all()
    found = search_with_scores(_oracle(target, metric), pool, metric, threshold, budget=400)
    assert found.accepted and found.queries <= DIM + 3  # the regression alone lands on the template
    assert score_matrix(found.template[None], target[None], metric)[0, 0] >= threshold
    oracle = _oracle(target, metric)
    blind = search_with_decisions(lambda p: oracle(p) >= threshold, pool, budget=400)
    assert not blind.accepted and blind.queries == 400
    capped = search_with_scores(_oracle(target, metric), pool, metric, threshold, budget=10)
    assert not capped.accepted and capped.queries == 10


def test_score_search_climbs_through_a_binary_scheme() -> None:
    pool = _people(200, 8)
    target = _people(1, 9)[0]
    key = b"victim"
    enrolled = biohash(target[None], key)

    def oracle(probes: np.ndarray) -> np.ndarray:
        return score_matrix(biohash(probes, key), enrolled, "cosine")[:, 0]

    threshold = 0.8  # about 10% of the bits differ at most
    found = search_with_scores(oracle, pool, "cosine", threshold, budget=1500)
    assert found.accepted and found.queries > DIM  # needs the climb, not only the regression
    assert oracle(found.template[None])[0] >= threshold


def test_a_probe_the_scheme_refuses_is_rejected() -> None:
    """PolyProtect's powers overflow for a wild probe: the oracle scores it -inf instead of failing the search."""
    from advface.audit.schemes import POLYPROTECT
    from advface.audit.stages.scenarios import _probe_score

    enrolled = POLYPROTECT.apply(_people(1, 10).astype(np.float32), b"k")

    def through(z: np.ndarray) -> np.ndarray:
        return POLYPROTECT.apply(z, b"k")

    with np.errstate(over="ignore"):
        assert _probe_score(through, np.full(DIM, 1e30, np.float32), enrolled, "euclidean") == -np.inf
    assert np.isfinite(_probe_score(through, _people(1, 11)[0].astype(np.float32), enrolled, "euclidean"))


@pytest.mark.parametrize(
    "setting", [{"known_pairs_k": (0, 4)}, {"known_pairs_k": ()}, {"score_budget": 0}, {"scenario_pool": 0}]
)
def test_scenario_settings_are_checked(setting: dict, tmp_path: Path) -> None:
    from advface.audit.config import AuditConfig

    with pytest.raises(ConfigError):
        AuditConfig(data=tmp_path, out=tmp_path / "o", **setting).check()


@pytest.mark.slow
def test_quick_report_has_the_scenarios(quick_report: Path) -> None:
    report = json.loads((quick_report / "report.json").read_text())
    assert report["format_version"] == 7
    sc = report["scenarios"]
    assert sc["templates"] == "protected"
    ks = [p["k"] for p in sc["known_pairs"]]
    assert ks[0] == 1 and ks == sorted(ks) and len(ks) >= 3
    for p in sc["known_pairs"]:
        assert 0 <= p["template_match_rate"] <= 1 and p["type1_success"] is not None
    full = sc["full_disclosure"]
    assert full["type1_success"] >= full["direct"]["type1_success"]
    exposure = sc["score_exposure"]
    assert exposure["victims"] == 4 and exposure["query_budget"] == 500
    for run in ("with_scores", "decisions_only"):
        assert len(exposure[run]["queries"]) == 4
        assert all(1 <= q <= 500 for q in exposure[run]["queries"])
    # the same on the templates under the keyed transform: the attacker of full disclosure holds that key too
    keyed = sc["protected+key"]
    assert keyed["templates"] == "protected+key" and "keyed transform" in keyed["full_disclosure"]["holds"]
    assert [p["k"] for p in keyed["known_pairs"]] == ks
    direct = keyed["full_disclosure"]["direct"]
    best_on_either = max(
        a["type1_success"][kind] for a in report["attacks"].values() for kind in ("protected", "protected+key")
    )
    assert direct["type1_success"] == best_on_either
    assert direct["best_attacker"].endswith((" on protected", " on protected+key"))
    threshold = report["verification"]["protected+key"]["threshold_at_far_1e-3"]
    assert keyed["score_exposure"]["threshold"] == threshold
    assert keyed["score_exposure"]["victims"] == 4 and "keyed transform" in keyed["score_exposure"]["method"]
    page = (quick_report / "report.html").read_text()
    assert "Known pairs" in page and "Score exposure" in page and "Full disclosure: the attacker" in page
    assert page.index("id='scenarios'") < page.index("id='scenarios-keyed'")
