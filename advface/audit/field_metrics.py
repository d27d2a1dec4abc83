"""Metrics as the field reports them (ISO/IEC 19795-1, BTPBench): FNMR at a fixed FMR with comparison counts and a
confidence interval, and renewability as the largest set of one person's templates, under different keys, no two
of which match.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from advface.audit.metrics import score_matrix
from advface.audit.results import FnmrAtFmr, NonMatchingSets

#: z of a two-sided 95% interval.
Z_95 = 1.959963984540054
#: Largest number of templates per person whose largest non-matching set is searched exactly.
MAX_EXACT_TEMPLATES = 16


def wilson_interval(errors: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``errors / trials`` (``(0, 1)`` without trials)."""
    if trials <= 0:
        return 0.0, 1.0
    if errors <= 0:  # the closed form, without rounding below zero
        return 0.0, z * z / (trials + z * z)
    if errors >= trials:
        return trials / (trials + z * z), 1.0
    p = errors / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def fnmr_at_fmr(mated: np.ndarray, nonmated: np.ndarray, fmr: float) -> FnmrAtFmr:
    """FNMR at the threshold whose false-match rate over ``nonmated`` is at most ``fmr`` (scores: higher = more
    alike; a comparison matches when its score is above the threshold). With fewer than ``1 / fmr`` impostor
    comparisons the threshold is the highest impostor score (achieved FMR 0) and ``impostors_sufficient`` is False."""
    mated = np.asarray(mated).ravel()
    nonmated = np.asarray(nonmated).ravel()  # no float64 copy: every impostor pair of a large dataset
    if not len(mated) or not len(nonmated):
        raise ValueError("FNMR at FMR needs genuine and impostor comparisons")
    n = len(nonmated)
    k = int(math.floor(fmr * n))  # false matches allowed
    threshold = float(np.partition(nonmated, n - 1 - k)[n - 1 - k])  # the (k+1)-th highest impostor score
    misses = int((mated <= threshold).sum())
    lo, hi = wilson_interval(misses, len(mated))
    return FnmrAtFmr(
        fmr=fmr,
        fnmr=misses / len(mated),
        fnmr_ci95=(lo, hi),
        threshold=threshold,
        fmr_achieved=float((nonmated > threshold).mean()),
        genuine_comparisons=len(mated),
        impostor_comparisons=n,
        impostors_sufficient=n >= math.ceil(1 / fmr),
    )


def all_pair_scores(
    enrolled: np.ndarray, probes: np.ndarray, identities: np.ndarray, metric: str, block: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """``(genuine, impostor)`` scores of every pair of distinct photos ``a < b``: ``enrolled[a]`` vs ``probes[b]``."""
    identities = np.asarray(identities)
    genuine: list[np.ndarray] = []
    impostor: list[np.ndarray] = []
    for start in range(0, len(enrolled), block):
        rows = np.arange(start, min(start + block, len(enrolled)))
        scores = score_matrix(enrolled[rows], probes, metric).astype(np.float32)
        upper = np.arange(len(probes))[None, :] > rows[:, None]
        same = identities[rows][:, None] == identities[None, :]
        genuine.append(scores[upper & same])
        impostor.append(scores[upper & ~same])
    return np.concatenate(genuine), np.concatenate(impostor)


def largest_nonmatching_set(matches: np.ndarray) -> int:
    """Size of the largest set of templates no two of which match (``matches``: symmetric boolean matrix), found
    exactly for up to :data:`MAX_EXACT_TEMPLATES` templates (the maximum independent set of the match graph)."""
    k = len(matches)
    if k > MAX_EXACT_TEMPLATES:
        raise ValueError(f"at most {MAX_EXACT_TEMPLATES} templates per person, got {k}")
    for size in range(k, 1, -1):
        for subset in combinations(range(k), size):
            idx = np.array(subset)
            block = matches[np.ix_(idx, idx)]
            if not block[~np.eye(size, dtype=bool)].any():
                return size
    return min(k, 1)


def renewability_sets(templates: np.ndarray, metric: str, threshold: float, setting: str) -> NonMatchingSets:
    """BTPBench's renewability of ``templates`` (people x keys x dim: each person's template under each key): per
    person, the largest set of templates that do not match one another at ``threshold``."""
    people, keys = templates.shape[:2]
    sizes = []
    for p in range(people):
        scores = score_matrix(templates[p], templates[p], metric)
        sizes.append(largest_nonmatching_set(scores > threshold))
    values = np.array(sizes)
    return NonMatchingSets(
        setting=setting,
        keys=int(keys),
        people=int(people),
        threshold=float(threshold),
        min=int(values.min()),
        mean=float(values.mean()),
        all_keys_fraction=float((values == keys).mean()),
    )
