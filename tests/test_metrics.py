import numpy as np
import pytest

from advface.metrics import best_threshold, kfold_accuracy, roc_curve, tar_at_far, threshold_at_far


def test_best_threshold_separates_perfectly_separable_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([0, 0, 0, 1, 1, 1], bool)
    t = best_threshold(scores, same)
    assert 0.3 < t < 0.7
    assert ((scores >= t) == same).all()


def test_best_threshold_with_ties_never_splits_equal_scores():
    scores = np.array([0.5, 0.5, 0.5, 0.9])
    same = np.array([0, 1, 0, 1], bool)
    t = best_threshold(scores, same)
    assert t > 0.5 or t <= 0.5  # well defined
    # either all three 0.5s accepted or none: accuracy is 3/4 (none accepted) at best
    assert ((scores >= t) == same).mean() == pytest.approx(0.75)


def test_kfold_accuracy_fits_threshold_on_other_folds():
    rng = np.random.default_rng(0)
    n = 600
    same = np.tile(np.r_[np.ones(30, bool), np.zeros(30, bool)], 10)
    folds = np.repeat(np.arange(10), 60)
    scores = np.where(same, rng.normal(1.0, 0.5, n), rng.normal(-1.0, 0.5, n))
    result = kfold_accuracy(scores, same, folds)
    assert len(result.per_fold) == 10
    assert 0.95 < result.mean <= 1.0
    assert result.std == pytest.approx(np.std(result.per_fold))
    # a fold's threshold never depends on its own scores
    scores2 = scores.copy()
    scores2[folds == 0] += 100
    assert kfold_accuracy(scores2, same, folds).thresholds[0] == result.thresholds[0]


def test_threshold_at_far_admits_at_most_far_impostors():
    rng = np.random.default_rng(1)
    imp = rng.normal(size=3000)
    for far in (1e-1, 1e-2, 1e-3):
        t = threshold_at_far(imp, far)
        assert (imp >= t).mean() <= far
        # and it is the smallest such threshold: the next impostor score down would exceed far
        below = np.sort(imp)[::-1][int(far * 3000)]
        assert (imp >= below).mean() > far


def test_tar_at_far_on_known_distribution():
    gen = np.linspace(0.5, 1.5, 1000)
    imp = np.linspace(-1.0, 0.6, 1000)
    scores = np.r_[gen, imp]
    same = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    tar, t = tar_at_far(scores, same, 1e-2)
    assert (imp >= t).mean() <= 1e-2
    assert tar == pytest.approx((gen >= t).mean())
    assert 0.9 < tar < 1.0


def test_roc_curve_is_monotone():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=200)
    same = rng.random(200) < 0.5
    far, tar, thr = roc_curve(scores, same)
    assert (np.diff(thr) < 0).all()
    assert (np.diff(far) >= 0).all() and (np.diff(tar) >= 0).all()
    assert far[-1] == 1.0 and tar[-1] == 1.0
