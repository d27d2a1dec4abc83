"""Key-recovery attacks on the keyed orthogonal transform (:mod:`advface.protect.keyed`).

A keyed transform stores ``y = Q x`` for a secret orthogonal ``Q``. Because ``Q`` preserves distances, the stolen
templates are an exact rotation of a point cloud whose statistics an attacker can learn from public face embeddings
(other people, same encoder). Two attackers:

* **thief** (:func:`recover_from_statistics`): holds many transformed templates of one tenant and public raw
  embeddings. (1) *moments*: the covariance of ``y`` is ``Q C_x Q^T``, so the eigenvectors of the two covariances
  (sorted by eigenvalue) give ``Q`` up to one sign per axis; signs come from the projections of the means and from
  the third moments (skewness) along each axis. (2) *Procrustes after distribution matching* (iterative closest
  point): map the stolen templates back with the current estimate, pair every template with its nearest public
  embedding and every public embedding with its nearest mapped template, solve the orthogonal Procrustes problem on
  those pairs, repeat. Works when the embedding distribution is anisotropic and has no symmetries -- which face
  embeddings are not.
* **insider** (:func:`recover_from_pairs`): can enrol faces it knows and read back the stored templates (an admin
  account, a backup of its own tenant). Orthogonal Procrustes on the known pairs ``(x_i, y_i)`` gives ``Q`` once
  there are about ``dim`` of them (AdvFace's small perturbation only adds noise).

:func:`evaluate_recovery` scores an estimate against the true matrix and templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from advface.errors import EmbeddingError

__all__ = ["Recovery", "evaluate_recovery", "procrustes", "recover_from_pairs", "recover_from_statistics"]


@dataclass
class Recovery:
    """An estimate ``matrix`` of ``Q`` (``y ~ matrix @ x``) and how it was found (``history``: mean nearest-neighbour
    distance after each refinement step)."""

    matrix: np.ndarray
    method: str
    history: list[float] = field(default_factory=list)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """The attacker's estimate of the pre-transform templates: ``matrix^T y`` per row."""
        return np.asarray(y, np.float64) @ self.matrix


def _matrix(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or (dim is not None and a.shape[1] != dim):
        raise EmbeddingError(f"{what}: expected an N x {dim or 'D'} array, got shape {a.shape}")
    if len(a) < 2 or not np.all(np.isfinite(a)):
        raise EmbeddingError(f"{what}: at least two finite vectors are needed")
    return a


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The orthogonal ``R`` minimising ``sum ||target_i - R source_i||^2`` (rows are paired)."""
    u, _, vt = np.linalg.svd(np.asarray(target, np.float64).T @ np.asarray(source, np.float64))
    return u @ vt


def recover_from_pairs(raw: np.ndarray, transformed: np.ndarray) -> Recovery:
    """Insider: ``Q`` from known (pre-transform, stored) template pairs by orthogonal Procrustes."""
    x = _matrix(raw, "raw")
    y = _matrix(transformed, "transformed", x.shape[1])
    if len(x) != len(y):
        raise EmbeddingError(f"raw and transformed must pair up: {len(x)} vs {len(y)} rows")
    return Recovery(procrustes(x, y), f"known pairs (n={len(x)})")


def _moments_estimate(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    mu_y, mu_x = y.mean(0), x.mean(0)
    yc, xc = y - mu_y, x - mu_x
    ly, vy = np.linalg.eigh(np.cov(yc, rowvar=False))
    lx, vx = np.linalg.eigh(np.cov(xc, rowvar=False))
    vy, vx = vy[:, ::-1], vx[:, ::-1]  # descending eigenvalues: axis k of y <-> axis k of x
    ly, lx = np.clip(ly[::-1], 1e-12, None), np.clip(lx[::-1], 1e-12, None)
    # sign evidence per axis: mean projection and skewness, each standardised, in both clouds
    mean_y, mean_x = (vy.T @ mu_y) / np.sqrt(ly), (vx.T @ mu_x) / np.sqrt(lx)
    skew_y = np.mean((yc @ vy) ** 3, 0) / ly**1.5
    skew_x = np.mean((xc @ vx) ** 3, 0) / lx**1.5
    evidence = mean_y * mean_x + skew_y * skew_x
    signs = np.where(evidence < 0, -1.0, 1.0)
    return (vy * signs) @ vx.T


def _nearest(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Index in ``b`` of each row of ``a``'s nearest neighbour (euclidean), and the distance (float32 search)."""
    a32, b32 = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    b2 = np.sum(b32 * b32, 1)
    idx = np.empty(len(a), np.int64)
    for s in range(0, len(a), chunk):
        d2 = a32[s : s + chunk] @ b32.T
        d2 *= -2.0
        d2 += b2
        idx[s : s + chunk] = np.argmin(d2, 1)
    dist = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)[idx], axis=1)
    return idx, dist


def recover_from_statistics(
    transformed: np.ndarray,
    public: np.ndarray,
    *,
    refine_steps: int = 30,
    restarts: int = 0,
    seed: int = 0,
) -> Recovery:
    """Thief: ``Q`` from transformed templates and public raw embeddings (moments, then ICP/Procrustes refinement).

    ``restarts``: extra refinements started from the moment estimate with random sign flips, the estimate whose
    matched clouds are closest (mean nearest-neighbour distance) wins -- the attacker can tell which is best
    without knowing ``Q``.
    """
    y = _matrix(transformed, "transformed")
    x = _matrix(public, "public", y.shape[1])
    start = _moments_estimate(y, x)
    best = Recovery(start, "moments", [float(np.mean(_nearest(y @ start, x)[1]))])
    if refine_steps <= 0:
        return best
    rng = np.random.default_rng(seed)
    starts = [start]
    for _ in range(restarts):
        flips = np.where(rng.random(y.shape[1]) < 0.2, -1.0, 1.0)
        starts.append(start * flips[None, :])
    winner: Recovery | None = None
    for q in starts:
        history: list[float] = []
        for _ in range(refine_steps):
            back = y @ q  # estimated pre-transform templates
            to_public, d1 = _nearest(back, x)
            to_stolen, _ = _nearest(x, back)
            src = np.concatenate([x[to_public], x])
            dst = np.concatenate([y, y[to_stolen]])
            q_new = procrustes(src, dst)
            history.append(float(np.mean(d1)))
            if np.allclose(q_new, q, atol=1e-9):
                q = q_new
                break
            q = q_new
        history.append(float(np.mean(_nearest(y @ q, x)[1])))
        candidate = Recovery(q, "moments + Procrustes (ICP)", best.history + history)
        if winner is None or candidate.history[-1] < winner.history[-1]:
            winner = candidate
    assert winner is not None
    return winner


def evaluate_recovery(
    recovery: Recovery,
    true_matrix: np.ndarray,
    transformed: np.ndarray,
    true_templates: np.ndarray,
    raw_embeddings: np.ndarray | None = None,
    threshold: float = 0.6,
) -> dict[str, float]:
    """How well ``recovery`` undoes the transform: relative Frobenius error of the matrix, cosine of the mapped-back
    templates to the true pre-transform templates (mean, median, share above 0.9), and the share of mapped-back
    templates within euclidean ``threshold`` of the true template and (if given) of the raw embedding of the same
    photo (identity match at the encoder's threshold)."""
    q = np.asarray(true_matrix, np.float64)
    back = recovery.invert(transformed)
    t = np.asarray(true_templates, np.float64)
    cos = np.sum(back * t, 1) / (np.linalg.norm(back, axis=1) * np.linalg.norm(t, axis=1))
    out = {
        "matrix_rel_error": float(np.linalg.norm(recovery.matrix - q) / np.linalg.norm(q)),
        "cosine_mean": float(cos.mean()),
        "cosine_median": float(np.median(cos)),
        "share_cosine_above_0.9": float(np.mean(cos > 0.9)),
        "share_within_threshold_of_template": float(np.mean(np.linalg.norm(back - t, axis=1) < threshold)),
    }
    if raw_embeddings is not None:
        raw = np.asarray(raw_embeddings, np.float64)
        out["share_within_threshold_of_raw"] = float(np.mean(np.linalg.norm(back - raw, axis=1) < threshold))
    return out
