"""Unlinkability of protected templates: the D_sys score and D(s) curve of Gomez-Barrero et al. (2017/2018).

Two databases hold templates of the same people (protected independently: other key, other seed, other photo).
A linker compares templates across them with a score ``s`` (the system's comparator, or any other). Mated scores
come from pairs of the same person, non-mated from pairs of different people. With the score densities
``p(s|mated)`` and ``p(s|non-mated)`` and the prior ratio ``omega = P(mated) / P(non-mated)`` (1 by default)::

    LR(s)  = p(s|mated) / p(s|non-mated)
    D(s)   = 2 * omega*LR(s) / (1 + omega*LR(s)) - 1   where omega*LR(s) > 1, else 0
    D_sys  = integral of p(s|mated) * D(s) ds          in [0, 1]; 0: fully unlinkable, 1: fully linkable

Densities are histograms on common bins spanning both score sets; a bin with mated but no non-mated scores has
D = 1. The integral is computed exactly for these histogram densities (each bin's mated probability mass times its
D), which needs no boundary correction. With few scores, histogram noise biases D_sys upwards (identical
distributions of 1000 scores each give about 0.02-0.05): report the score counts and compare against that floor
(:func:`d_sys` returns it as ``curve.noise_floor`` when asked with ``noise_floor=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from advface.errors import ConfigError

__all__ = ["DCurve", "d_sys", "default_bins"]

#: Redraws of the pooled scores behind the noise floor (its mean uses the first 5, its 95th percentile all).
NOISE_DRAWS = 40


@dataclass(frozen=True)
class DCurve:
    """The D(s) curve: bin ``edges`` (B+1), bin ``centers`` (B), ``d`` = D(s) per bin, the histogram densities
    ``p_mated`` / ``p_nonmated``, score counts, ``omega``, and the noise floor with its 95th percentile (or None)."""

    edges: np.ndarray
    centers: np.ndarray
    d: np.ndarray
    p_mated: np.ndarray
    p_nonmated: np.ndarray
    n_mated: int
    n_nonmated: int
    omega: float
    noise_floor: float | None = None
    noise_floor_p95: float | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-able form (lists)."""
        return {
            "centers": self.centers.tolist(),
            "d": self.d.tolist(),
            "p_mated": self.p_mated.tolist(),
            "p_nonmated": self.p_nonmated.tolist(),
            "n_mated": self.n_mated,
            "n_nonmated": self.n_nonmated,
            "omega": self.omega,
            "noise_floor": self.noise_floor,
            "noise_floor_p95": self.noise_floor_p95,
        }


def default_bins(n_mated: int, n_nonmated: int) -> int:
    """Bins used when none are given: about sqrt of the smaller score count, within [10, 100]."""
    return int(np.clip(round(np.sqrt(min(n_mated, n_nonmated))), 10, 100))


def _scores(x: object, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ConfigError(f"{what}: at least one score is needed")
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"{what}: scores must be finite")
    return a


def _d_sys(
    mated: np.ndarray, nonmated: np.ndarray, edges: np.ndarray, omega: float
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    widths = np.diff(edges)
    mass_m = np.histogram(mated, edges)[0] / len(mated)
    mass_n = np.histogram(nonmated, edges)[0] / len(nonmated)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.where(mass_n > 0, mass_m / np.where(mass_n > 0, mass_n, 1.0), np.inf)
        olr = omega * lr
        d = np.where(olr > 1, np.where(np.isinf(olr), 1.0, 2 * olr / (1 + olr) - 1), 0.0)
    d[(mass_m == 0) & (mass_n == 0)] = 0.0
    return float(min(1.0, np.sum(mass_m * d))), d, mass_m / widths, mass_n / widths


def d_sys(
    mated_scores: np.ndarray,
    nonmated_scores: np.ndarray,
    *,
    bins: int | None = None,
    omega: float = 1.0,
    noise_floor: bool = False,
    seed: int = 0,
) -> tuple[float, DCurve]:
    """``(D_sys, D(s) curve)`` of mated and non-mated linkage scores (higher or lower = more similar: either).

    ``bins``: histogram bins (default :func:`default_bins`). ``noise_floor``: also estimate the D_sys that
    histogram noise alone gives for these sample sizes: both sets drawn again from the pooled scores (a truly
    unlinkable system), the mean D_sys of the first 5 draws (``noise_floor``) and the 95th percentile of 40 draws
    (``noise_floor_p95``: an unlinkable system reads above it one time in 20).
    """
    mated = _scores(mated_scores, "mated_scores")
    nonmated = _scores(nonmated_scores, "nonmated_scores")
    if not (isinstance(omega, (int, float)) and omega > 0 and np.isfinite(omega)):
        raise ConfigError(f"omega must be a positive number, got {omega!r}")
    nb = default_bins(len(mated), len(nonmated)) if bins is None else int(bins)
    if nb < 2:
        raise ConfigError(f"bins must be >= 2, got {bins!r}")
    lo, hi = min(mated.min(), nonmated.min()), max(mated.max(), nonmated.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, nb + 1)
    value, d, p_m, p_n = _d_sys(mated, nonmated, edges, float(omega))
    floor = floor_p95 = None
    if noise_floor:
        rng = np.random.default_rng(seed)
        pooled = np.concatenate([mated, nonmated])
        draws = []
        for _ in range(NOISE_DRAWS):
            perm = rng.permutation(pooled)
            draws.append(_d_sys(perm[: len(mated)], perm[len(mated) :], edges, float(omega))[0])
        floor = float(np.mean(draws[:5]))
        floor_p95 = float(np.percentile(draws, 95))
    curve = DCurve(
        edges, (edges[:-1] + edges[1:]) / 2, d, p_m, p_n, len(mated), len(nonmated), float(omega), floor, floor_p95
    )
    return value, curve
