"""Rebuilding an accepted template from the system's answers alone (score exposure): the attacker submits probe
templates against one enrolled template and sees either the comparison score or only the accept / reject decision.

- **With scores** (:func:`search_with_scores`): regression, then hill climbing. The attacker queries probes drawn
  from its own pool of faces' templates and solves the metric's model of the score for the template behind it (least
  squares: for minus the Euclidean distance ``s^2 = |x|^2 - 2 x.t + |t|^2`` is linear in ``(t, |t|^2)``; for cosine
  ``s |x| = x.t/|t|``), on D + 1 scores and again on 2 (D + 1) (a binary scheme's coarse scores need more); it
  then climbs from the best probe so far with batches of random steps, keeping the best (moving along plateaus),
  the step adapted by the one-fifth rule, until a probe is accepted.
- **Decisions only** (:func:`search_with_decisions`): without a score there is no gradient to follow until the first
  acceptance, so the attacker submits its pool's templates and mixtures of them until one is accepted (a dictionary
  attack; about 1 / FMR queries expected).

Every probe counts as one query; a search stops at the first accepted probe or at ``budget`` queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from advface.errors import ConfigError

#: ``probes (N x D) -> scores (N,)`` of the probes against the one enrolled template (higher = more alike).
Oracle = Callable[[np.ndarray], np.ndarray]
#: Probes per hill-climbing step.
BATCH = 8
#: Rounds of the regression: on D + 1 probes' scores, then on 2 (D + 1), ...
REGRESSION_ROUNDS = 2


@dataclass(frozen=True)
class SearchOutcome:
    """Queries spent, whether a probe was accepted, and the accepted (or best) probe."""

    queries: int
    accepted: bool
    template: np.ndarray
    best_score: float


class _Counter:
    """The oracle with a query budget: stops answering past it."""

    def __init__(self, oracle: Oracle, budget: int) -> None:
        self.oracle, self.budget, self.queries = oracle, budget, 0

    def ask(self, probes: np.ndarray) -> np.ndarray:
        probes = probes[: max(0, self.budget - self.queries)]
        if not len(probes):
            return np.zeros(0)
        self.queries += len(probes)
        return np.asarray(self.oracle(probes.astype(np.float32)), np.float64).reshape(len(probes))


def _pool_probes(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` probes: the pool's templates in a random order, then random mixtures of two of them."""
    order = rng.permutation(len(pool))[:count]
    out = [pool[order]]
    extra = count - len(order)
    if extra > 0:
        a, b = rng.integers(0, len(pool), (2, extra))
        w = rng.uniform(0.2, 0.8, (extra, 1))
        out.append(w * pool[a] + (1 - w) * pool[b])
    return np.concatenate(out).astype(np.float64)


def _regression_estimate(probes: np.ndarray, scores: np.ndarray, metric: str) -> np.ndarray:
    """The template the metric's score model puts behind ``scores`` of ``probes`` (least squares)."""
    norms = np.linalg.norm(probes, axis=1)
    if metric == "cosine":
        u, *_ = np.linalg.lstsq(probes, scores * norms, rcond=None)
        return u / max(float(np.linalg.norm(u)), 1e-12) * float(norms.mean())
    design = np.hstack([-2 * probes, np.ones((len(probes), 1))])
    solution, *_ = np.linalg.lstsq(design, scores**2 - norms**2, rcond=None)
    return solution[:-1]


def search_with_scores(
    oracle: Oracle, pool: np.ndarray, metric: str, threshold: float, budget: int, seed: int = 0
) -> SearchOutcome:
    """Regression on the scores of D + 1 pool probes, again on 2 (D + 1) (a binary scheme's coarse scores need
    more), then hill climbing, until a probe scores >= ``threshold`` or ``budget`` queries are spent."""
    if budget < 1 or not len(pool):
        raise ConfigError("score search: needs a query budget >= 1 and a pool of templates")
    rng = np.random.default_rng(seed)
    ask = _Counter(oracle, budget)
    dim = pool.shape[1]
    probes = _pool_probes(pool, REGRESSION_ROUNDS * (dim + 1), rng)
    scores = np.zeros(0)
    current, current_score = probes[0], -np.inf
    for round_ in range(1, REGRESSION_ROUNDS + 1):
        fresh = ask.ask(probes[len(scores) : round_ * (dim + 1)])
        hit = np.flatnonzero(fresh >= threshold)
        if len(hit):
            i = len(scores) + int(hit[0])
            ask.queries -= len(fresh) - int(hit[0]) - 1
            return SearchOutcome(ask.queries, True, probes[i].astype(np.float32), float(fresh[hit[0]]))
        scores = np.concatenate([scores, fresh])
        if len(scores) and scores.max() > current_score:
            current, current_score = probes[int(np.argmax(scores))], float(scores.max())
        if len(scores) < round_ * (dim + 1):  # the budget ran out
            return SearchOutcome(ask.queries, False, current.astype(np.float32), current_score)
        estimate = _regression_estimate(probes[: len(scores)], scores, metric)
        s = ask.ask(estimate[None])
        if len(s) and s[0] >= threshold:
            return SearchOutcome(ask.queries, True, estimate.astype(np.float32), float(s[0]))
        if len(s) and s[0] > current_score:
            current, current_score = estimate, float(s[0])
    spread = float(np.linalg.norm(pool - pool.mean(axis=0), axis=1).mean()) or 1.0
    step = 0.1 * spread
    while current_score < threshold and ask.queries < budget:
        directions = rng.standard_normal((BATCH, dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        candidates = current + step * directions
        s = ask.ask(candidates)
        if not len(s):
            break
        i = int(np.argmax(s))
        hit = np.flatnonzero(s >= threshold)
        if len(hit):  # the first accepted probe of the batch: count the queries up to it
            ask.queries -= len(s) - int(hit[0]) - 1
            return SearchOutcome(ask.queries, True, candidates[hit[0]].astype(np.float32), float(s[hit[0]]))
        if s[i] > current_score:
            current, current_score = candidates[i], float(s[i])
            step *= 1.5
        elif s[i] == current_score:  # a plateau (a binary scheme's score): move along it, keep the step
            current = candidates[i]
        else:
            step *= 1.5**-0.25
    return SearchOutcome(ask.queries, current_score >= threshold, current.astype(np.float32), current_score)


def search_with_decisions(
    decide: Callable[[np.ndarray], np.ndarray], pool: np.ndarray, budget: int, seed: int = 0, batch: int = 64
) -> SearchOutcome:
    """Pool templates and their mixtures, ``batch`` at a time, until ``decide`` accepts one or ``budget`` queries
    are spent (``decide``: probes -> booleans)."""
    if budget < 1 or not len(pool):
        raise ConfigError("decision search: needs a query budget >= 1 and a pool of templates")
    rng = np.random.default_rng(seed)
    probes = _pool_probes(pool, budget, rng)
    for start in range(0, budget, batch):
        chunk = probes[start : start + batch]
        accepted = np.flatnonzero(np.asarray(decide(chunk.astype(np.float32)), bool))
        if len(accepted):
            i = int(accepted[0])
            return SearchOutcome(start + i + 1, True, chunk[i].astype(np.float32), 1.0)
    return SearchOutcome(budget, False, probes[0].astype(np.float32), 0.0)
