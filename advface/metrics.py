"""Verification metrics: LFW-style k-fold accuracy and TAR at a fixed FAR.

Scores follow :func:`advface.encoders.pair_scores`: higher means more alike; a pair is accepted when
``score >= threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FoldAccuracy:
    """k-fold verification accuracy: mean and std over folds, per-fold accuracies and thresholds."""

    mean: float
    std: float
    per_fold: list[float]
    thresholds: list[float]


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold that maximises accuracy on (scores, same); midpoints between sorted scores are tried."""
    scores = np.asarray(scores, np.float64)
    same = np.asarray(same, bool)
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # Threshold placed just above position i accepts s[i+1:]: correct = negatives up to i + positives after i.
    neg_cum = np.concatenate([[0], np.cumsum(~y)])
    pos_after = y.sum() - np.concatenate([[0], np.cumsum(y)])
    correct = neg_cum + pos_after
    # candidate thresholds: below everything, between distinct neighbours, above everything
    candidates = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2.0, [s[-1] + 1.0]])
    valid = np.concatenate([[True], s[:-1] < s[1:], [True]])
    correct = np.where(valid, correct, -1)
    return float(candidates[int(np.argmax(correct))])


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> FoldAccuracy:
    """Accuracy per fold with the threshold fitted on the other folds (LFW View-2 protocol)."""
    scores = np.asarray(scores, np.float64)
    same = np.asarray(same, bool)
    folds = np.asarray(folds)
    accs: list[float] = []
    thresholds: list[float] = []
    for fold in np.unique(folds):
        test = folds == fold
        t = best_threshold(scores[~test], same[~test])
        accs.append(float(((scores[test] >= t) == same[test]).mean()))
        thresholds.append(t)
    return FoldAccuracy(float(np.mean(accs)), float(np.std(accs)), accs, thresholds)


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """Smallest threshold whose false-accept rate on ``impostor_scores`` is at most ``far`` (accept: score >= t)."""
    imp = np.sort(np.asarray(impostor_scores, np.float64))[::-1]
    if len(imp) == 0:
        raise ValueError("no impostor scores")
    allowed = int(np.floor(far * len(imp)))
    if allowed >= len(imp):
        return float(imp[-1])
    # Accepting only scores strictly above imp[allowed] admits at most `allowed` impostors.
    return float(np.nextafter(imp[allowed], np.inf))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> tuple[float, float]:
    """(TAR, threshold) at the threshold giving FAR <= ``far`` on the impostor pairs of (scores, same)."""
    scores = np.asarray(scores, np.float64)
    same = np.asarray(same, bool)
    t = threshold_at_far(scores[~same], far)
    return float((scores[same] >= t).mean()), t


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds) over all distinct thresholds, thresholds descending."""
    scores = np.asarray(scores, np.float64)
    same = np.asarray(same, bool)
    thresholds = np.unique(scores)[::-1]
    pos = np.sort(scores[same])
    neg = np.sort(scores[~same])
    tar = 1.0 - np.searchsorted(pos, thresholds, side="left") / max(len(pos), 1)
    far = 1.0 - np.searchsorted(neg, thresholds, side="left") / max(len(neg), 1)
    return far, tar, thresholds
