"""benchmarks/photo_identity.py: the photos' chips as the attacker cuts them."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.photo_identity import photo_chips


class _Attacker:
    def chips(self, photo: np.ndarray) -> Any:
        return None if photo.mean() == 0 else photo[:16, :16]


def test_photo_chips_stack_the_faces_and_refuse_a_photo_without_one() -> None:
    rng = np.random.default_rng(0)
    photos = [rng.integers(1, 255, (20, 20, 3), dtype=np.uint8) for _ in range(3)]
    chips = photo_chips(_Attacker(), photos, None)  # type: ignore[arg-type]
    assert chips is not None and chips.shape == (3, 16, 16, 3)
    assert np.array_equal(chips[1], photos[1][:16, :16])
    assert photo_chips(_Attacker(), [*photos, np.zeros((20, 20, 3), np.uint8)], None) is None  # type: ignore[arg-type]


def test_resizing_keeps_the_chip_size_and_drops_fine_detail() -> None:
    rng = np.random.default_rng(1)
    noise = [rng.integers(1, 255, (20, 20, 3), dtype=np.uint8)]
    small = photo_chips(_Attacker(), noise, 4)  # type: ignore[arg-type]
    full = photo_chips(_Attacker(), noise, None)  # type: ignore[arg-type]
    assert small is not None and full is not None and small.shape == full.shape
    assert small.astype(float).std() < full.astype(float).std() / 2  # per-pixel noise averaged away
