"""d_sys and the D(s) curve on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from advface.errors import ConfigError
from advface.unlinkability import d_sys


def test_identical_distributions_are_unlinkable() -> None:
    rng = np.random.default_rng(0)
    value, curve = d_sys(rng.normal(size=20000), rng.normal(size=20000), noise_floor=True)
    assert value < 0.02
    assert curve.noise_floor is not None and curve.noise_floor < 0.02
    assert curve.d.min() >= 0 and curve.d.max() <= 1 and len(curve.d) == len(curve.centers) == 100


def test_disjoint_distributions_are_fully_linkable() -> None:
    rng = np.random.default_rng(1)
    value, curve = d_sys(rng.normal(size=2000) + 20, rng.normal(size=5000))
    assert value == pytest.approx(1.0)
    assert curve.d[curve.p_mated > 0].min() == 1.0 and curve.d[curve.p_nonmated > 0].max() == 0.0


def test_partial_overlap_and_direction_free() -> None:
    rng = np.random.default_rng(2)
    mated, nonmated = rng.normal(size=20000) + 1.0, rng.normal(size=20000)
    value, _ = d_sys(mated, nonmated)
    assert 0.15 < value < 0.45
    flipped, _ = d_sys(-mated, -nonmated)  # distances instead of similarities: same answer
    assert flipped == pytest.approx(value, abs=1e-9)
    # a larger prior of mated pairs makes linking easier
    assert d_sys(mated, nonmated, omega=10.0)[0] > value


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        d_sys([], [1.0])
    with pytest.raises(ConfigError, match="finite"):
        d_sys([np.nan], [1.0])
    with pytest.raises(ConfigError, match="omega"):
        d_sys([1.0], [1.0], omega=0)
    with pytest.raises(ConfigError, match="bins"):
        d_sys([1.0], [1.0], bins=1)
    assert d_sys([1.0, 1.0], [1.0, 1.0])[0] == 0.0  # constant scores: nothing to tell apart


def test_noise_floor_percentile_separates_chance_from_linkage() -> None:
    """Unlinkable samples of 500 mated scores read above the null's 95th percentile rarely; a small real shift of
    the mated scores reads above it."""
    rng = np.random.default_rng(4)
    above = 0
    for _ in range(40):
        value, curve = d_sys(
            rng.normal(size=500), rng.normal(size=20000), noise_floor=True, seed=int(rng.integers(1 << 30))
        )
        assert curve.noise_floor_p95 is not None and curve.noise_floor_p95 >= curve.noise_floor
        above += value > curve.noise_floor_p95
    assert above <= 6  # 5% expected: 2 of 40
    value, curve = d_sys(rng.normal(size=500) + 0.5, rng.normal(size=20000), noise_floor=True)
    assert value > curve.noise_floor_p95
