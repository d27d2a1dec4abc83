"""Metric glue of the audit, on top of :mod:`advface.attack_metrics`, :mod:`advface.metrics` and
:mod:`advface.unlinkability`:

- irreversibility: Type-I / Type-II identity-inference success of an attacker's reconstructions at the thresholds
  giving FMR 0.1% and 1% on clean data, SSIM / PSNR against the enrolment chips;
- performance preservation: verification accuracy (10 random folds) and TAR at FAR 1e-2 / 1e-3 of enrolled
  templates (raw, protected, protected + key) against raw probes of other photos of the evaluation people;
- unlinkability and renewability: D_sys and the D(s) curve of templates of the same people in two databases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.spatial.distance import cdist

from advface.attack_metrics import embed_faces, impostor_threshold, psnr, ssim
from advface.audit.results import (
    LinkageMetrics,
    ReconstructionResult,
    SuccessAtFmr,
    TransferAtFmr,
    TransferResult,
    VerificationMetrics,
)
from advface.datasets.pairs import resize_faces
from advface.encoders.base import FaceEncoder
from advface.metrics import kfold_accuracy, roc_curve, tar_at_far
from advface.unlinkability import d_sys

if TYPE_CHECKING:  # pragma: no cover
    from advface.audit.transfer import TransferJudge

#: False-match rates at which attack success is reported, with their JSON labels.
FMRS = {"1e-3": 1e-3, "1e-2": 1e-2}


def attack_thresholds(embeddings: np.ndarray, identities: np.ndarray, metric: str, seed: int = 0) -> dict[str, float]:
    """Thresholds on the encoder's score giving FMR 0.1% and 1% over non-mated pairs of clean embeddings."""
    if len(set(identities.tolist())) < 2:
        raise ValueError("at least two identities are needed to fix a false-match threshold")
    return {
        label: impostor_threshold(embeddings, identities, metric, fmr=fmr, seed=seed) for label, fmr in FMRS.items()
    }


def evaluate_attack(
    encoder: FaceEncoder,
    reconstructions: np.ndarray,
    own: np.ndarray,
    other: np.ndarray,
    has_other: np.ndarray,
    originals: np.ndarray,
    thresholds: dict[str, float],
    transfer: TransferResult | None = None,
) -> ReconstructionResult:
    """Success of one attacker's ``reconstructions`` of templates whose photos have raw embeddings ``own``.

    ``other[i]`` is the raw embedding of another photo of the same person where ``has_other[i]`` (Type II; the
    others are skipped and counted). The reconstructions are embedded once; success is measured at each of
    ``thresholds`` (FMR label -> threshold). ``transfer``: the transfer judge's view of the same reconstructions
    (:func:`evaluate_transfer`), attached to the result.
    """
    emb = embed_faces(encoder, reconstructions)
    s1 = encoder.score(emb, own)
    s2 = encoder.score(emb[has_other], other[has_other]) if has_other.any() else np.zeros(0)
    originals = resize_faces(originals, reconstructions.shape[1])
    q_ssim = float(ssim(reconstructions, originals).mean())
    q_psnr = float(psnr(reconstructions, originals).mean())
    at_fmr = {
        label: SuccessAtFmr(
            float((s1 >= t).mean()),
            float((s2 >= t).mean()) if len(s2) else None,
            q_ssim,
            q_psnr,
            t,
            len(reconstructions),
        )
        for label, t in thresholds.items()
    }
    return ReconstructionResult(
        n=len(reconstructions),
        type2_n=int(has_other.sum()),
        type2_skipped_single_photo=int((~has_other).sum()),
        ssim=q_ssim,
        psnr=q_psnr,
        mean_score_to_own=float(s1.mean()),
        at_fmr=at_fmr,
        transfer=transfer,
    )


def _rate(scores: np.ndarray, threshold: float) -> float | None:
    return float((scores >= threshold).mean()) if len(scores) else None


def evaluate_transfer(
    judge: TransferJudge, reconstructions: np.ndarray, own_ids: np.ndarray, other_ids: np.ndarray
) -> TransferResult:
    """Success of ``reconstructions`` as the transfer judge sees them: each is mapped into the judge's chip frame,
    embedded, and compared with the judge's clean embedding of the template's photo ``own_ids[i]`` (Type I) and of
    another photo of the person ``other_ids[i]`` (Type II; ``""`` where there is none), at the judge's thresholds.
    Photos the judge's detector found no face in are left out (counted by ``type1_n`` / ``type2_n``)."""
    emb = judge.embed_reconstructions(reconstructions)
    own_rows = judge.rows_of(own_ids)
    other_rows = judge.rows_of(other_ids)
    has_own, has_other = own_rows >= 0, other_rows >= 0
    s1 = judge.encoder.score(emb[has_own], judge.embeddings[own_rows[has_own]]) if has_own.any() else np.zeros(0)
    s2 = (
        judge.encoder.score(emb[has_other], judge.embeddings[other_rows[has_other]]) if has_other.any() else np.zeros(0)
    )
    return TransferResult(
        type1_n=len(s1),
        type2_n=len(s2),
        mean_score_to_own=float(s1.mean()) if len(s1) else None,
        at_fmr={label: TransferAtFmr(_rate(s1, t), _rate(s2, t), t) for label, t in judge.thresholds.items()},
    )


@dataclass
class Verification:
    """Verification metrics and the scores behind them (for the ROC / DET and histogram plots)."""

    metrics: VerificationMetrics
    scores: np.ndarray
    same: np.ndarray


def verification_pairs(
    identities: np.ndarray, seed: int = 0, nonmated_per_mated: int = 10, min_nonmated: int = 2000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(a, b, same)``: every mated pair of distinct photos (a < b) and random non-mated pairs."""
    n = len(identities)
    ia, ib = np.triu_indices(n, k=1)
    same_all = identities[ia] == identities[ib]
    mated = np.flatnonzero(same_all)
    nonmated = np.flatnonzero(~same_all)
    rng = np.random.default_rng(seed)
    take = min(len(nonmated), max(min_nonmated, nonmated_per_mated * len(mated)))
    nonmated = rng.choice(nonmated, size=take, replace=False) if take < len(nonmated) else nonmated
    idx = np.concatenate([mated, nonmated])
    return ia[idx], ib[idx], same_all[idx]


def verification(
    encoder: FaceEncoder, enrolled: np.ndarray, probes: np.ndarray, identities: np.ndarray, seed: int = 0
) -> Verification:
    """Accuracy (10 random folds, threshold fit on 9), TAR at FAR 1e-2 / 1e-3: ``enrolled[a]`` vs ``probes[b]``."""
    a, b, same = verification_pairs(identities, seed)
    if not same.any() or same.all():
        raise ValueError("verification needs mated and non-mated pairs (people with two or more photos)")
    scores = encoder.score(enrolled[a], probes[b])
    folds = np.random.default_rng(seed).integers(0, 10, len(scores))
    acc = kfold_accuracy(scores, same, folds)
    tar3, t3 = tar_at_far(scores, same, 1e-3)
    tar2, t2 = tar_at_far(scores, same, 1e-2)
    metrics = VerificationMetrics(
        accuracy_mean=acc.mean,
        accuracy_std=acc.std,
        tar_at_far_1e_3=tar3,
        threshold_at_far_1e_3=t3,
        tar_at_far_1e_2=tar2,
        threshold_at_far_1e_2=t2,
        mated_pairs=int(same.sum()),
        nonmated_pairs=int((~same).sum()),
    )
    return Verification(metrics, scores, same)


def roc_points(v: Verification) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR) of a verification, for plotting."""
    far, tar, _ = roc_curve(v.scores, v.same)
    return far, tar


def score_matrix(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """The encoder's comparison score of every row of ``a`` with every row of ``b`` (higher = more alike)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if metric == "cosine":
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return a @ b.T
    return -cdist(a, b)


@dataclass
class Linkage:
    """D_sys of two databases (row i of each: the same person) and the scores behind it."""

    metrics: LinkageMetrics
    mated: np.ndarray
    nonmated: np.ndarray
    curve: Any


def linkage(db_a: np.ndarray, db_b: np.ndarray, metric: str, seed: int = 0) -> Linkage:
    """Unlinkability of two databases whose row ``i`` holds templates of the same person: mated scores are the
    diagonal of the cross-database score matrix, non-mated the rest (the system's comparator as linker)."""
    if len(db_a) < 2 or len(db_a) != len(db_b):
        raise ValueError("unlinkability needs two databases of the same two or more people")
    scores = score_matrix(db_a, db_b, metric)
    mated = np.diag(scores).copy()
    nonmated = scores[~np.eye(len(scores), dtype=bool)]
    value, curve = d_sys(mated, nonmated, noise_floor=True, seed=seed)
    assert curve.noise_floor is not None and curve.noise_floor_p95 is not None  # estimated: noise_floor=True
    metrics = LinkageMetrics(
        d_sys=value,
        noise_floor=curve.noise_floor,
        noise_floor_p95=curve.noise_floor_p95,
        n_mated=curve.n_mated,
        n_nonmated=curve.n_nonmated,
        bins=len(curve.centers),
        score_range=(float(curve.edges[0]), float(curve.edges[-1])),
    )
    return Linkage(metrics, mated, nonmated, curve)
