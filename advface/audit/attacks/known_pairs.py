"""Learning a protection's inverse from (raw, protected) pairs: the insider with k leaked pairs and the attacker
holding the scheme's key (who can make as many pairs as they like).

The map is ridge regression from protected templates to raw ones, centred, with an intercept, its penalty chosen by
5-fold cross-validation on the pairs: with one pair it returns that pair's raw template for everything; with more
pairs than values it recovers a linear (or affine) scheme exactly. :func:`known_pairs_curve` fits it for each k of
a list on the first k pairs of a seeded shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from advface.encoders.base import pair_scores
from advface.errors import ConfigError

#: Ridge penalty relative to the mean squared norm of the centred protected templates, and the penalties the
#: attacker chooses among by cross-validation on their pairs (near k = D' a small penalty overfits).
RIDGE = 1e-3
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
CV_FOLDS = 5


@dataclass(frozen=True)
class InverseMap:
    """``raw ~ (protected - mean_in) @ weights + mean_out``."""

    weights: np.ndarray
    mean_in: np.ndarray
    mean_out: np.ndarray
    pairs: int

    def __call__(self, protected: np.ndarray) -> np.ndarray:
        """Estimated raw templates of ``protected`` (N x D')."""
        z = np.asarray(protected, np.float64)
        return ((z - self.mean_in) @ self.weights + self.mean_out).astype(np.float32)


def choose_ridge(protected: np.ndarray, raw: np.ndarray, seed: int = 0) -> float:
    """The penalty of :data:`RIDGES` with the least 5-fold cross-validated error on the pairs (the attacker tunes
    on what they hold; fewer than 5 pairs: :data:`RIDGE`)."""
    k = len(protected)
    if k < CV_FOLDS:
        return RIDGE
    folds = np.array_split(np.random.default_rng(seed).permutation(k), CV_FOLDS)
    errors = []
    for ridge in RIDGES:
        error = 0.0
        for held in folds:
            train = np.setdiff1d(np.arange(k), held)
            estimate = fit_inverse_map(protected[train], raw[train], ridge)(protected[held])
            error += float(((estimate - raw[held]) ** 2).sum())
        errors.append(error)
    return RIDGES[int(np.argmin(errors))]


def fit_inverse_map(protected: np.ndarray, raw: np.ndarray, ridge: float | None = RIDGE) -> InverseMap:
    """Ridge regression from ``protected`` (k x D') to ``raw`` (k x D), row for row; ``ridge`` None: chosen by
    :func:`choose_ridge`."""
    if ridge is None:
        ridge = choose_ridge(protected, raw)
    p = np.asarray(protected, np.float64)
    r = np.asarray(raw, np.float64)
    if p.ndim != 2 or r.ndim != 2 or len(p) != len(r) or not len(p):
        raise ConfigError(f"inverse map: need k >= 1 matching pairs, got {p.shape} and {r.shape}")
    mean_in, mean_out = p.mean(axis=0), r.mean(axis=0)
    pc, rc = p - mean_in, r - mean_out
    scale = float((pc**2).sum()) / len(p)
    if scale <= 0:  # one pair (or identical ones): the map is the mean raw template
        weights = np.zeros((p.shape[1], r.shape[1]))
    elif len(p) < p.shape[1]:  # fewer pairs than values: the dual (k x k) system
        gram = pc @ pc.T + ridge * scale * np.eye(len(p))
        weights = pc.T @ np.linalg.solve(gram, rc)
    else:
        weights = np.linalg.solve(pc.T @ pc + ridge * scale * np.eye(p.shape[1]), pc.T @ rc)
    return InverseMap(weights, mean_in, mean_out, len(p))


@dataclass(frozen=True)
class KnownPairsPoint:
    """The map learned from ``k`` pairs, the victims' estimated raw templates and how many match their own."""

    k: int
    estimated: np.ndarray
    #: Fraction of estimated templates that match the victim's raw template at the threshold.
    template_match_rate: float
    #: Mean ||estimate - raw|| / ||raw||.
    relative_error: float


def known_pairs_curve(
    pool_raw: np.ndarray,
    pool_protected: np.ndarray,
    victims_protected: np.ndarray,
    victims_raw: np.ndarray,
    ks: tuple[int, ...],
    metric: str,
    threshold: float,
    seed: int = 0,
) -> list[KnownPairsPoint]:
    """For each k of ``ks`` (capped by the pool; repeats after capping dropped) fit the inverse map on the first k
    pairs of a seeded shuffle of the pool and apply it to the victims' protected templates."""
    if len(pool_raw) != len(pool_protected) or not len(pool_raw):
        raise ConfigError("known pairs: the pool of (raw, protected) pairs is empty or uneven")
    order = np.random.default_rng(seed).permutation(len(pool_raw))
    points: list[KnownPairsPoint] = []
    done: set[int] = set()
    for k in ks:
        k = min(int(k), len(order))
        if k < 1 or k in done:
            continue
        done.add(k)
        rows = order[:k]
        estimated = fit_inverse_map(pool_protected[rows], pool_raw[rows], None)(victims_protected)
        scores = pair_scores(estimated, victims_raw, metric)  # type: ignore[arg-type]
        error = np.linalg.norm(estimated - victims_raw, axis=1) / np.maximum(np.linalg.norm(victims_raw, axis=1), 1e-12)
        points.append(KnownPairsPoint(k, estimated, float((scores >= threshold).mean()), float(error.mean())))
    return points
