"""benchmarks/diffusion_defences.py: the protected-photo cache keeps each photo's cost and face SSIM, so a run that
reads photos protected earlier (``--protect-only``) reports the same quality as the run that protected them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import benchmarks.diffusion_defences as dd
from advface.protect.image import ProtectConfig


class _CountingProtector:
    """Adds 3 to every pixel; counts the photos it protected."""

    def __init__(self) -> None:
        self.calls = 0

    def protect(self, images: list[np.ndarray], config: Any, sources: list[str]) -> list[tuple[np.ndarray, Any]]:
        self.calls += 1
        return [(np.clip(images[0].astype(int) + 3, 0, 255).astype(np.uint8), SimpleNamespace(ssim_face=0.95))]


def test_cached_photos_report_the_recorded_seconds_and_face_ssim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dd, "LOCAL", tmp_path / "cache")
    rng = np.random.default_rng(0)
    people = [("A", ["a1", "a2", "a3", "a4"]), ("B", ["b1", "b2", "b3", "b4"])]
    paths = {}
    for _, ids in people:
        for pid in ids:
            paths[pid] = tmp_path / f"{pid}.png"
            dd.save_png(rng.integers(0, 250, (40, 40, 3), dtype=np.uint8), paths[pid])
    protector = _CountingProtector()
    first, quality = dd.protect_people(protector, ProtectConfig(), people, paths, "tag")  # type: ignore[arg-type]
    assert protector.calls == 6  # photos 1-3 of each person
    assert quality["photos"] == 6 and quality["ssim_face_mean"] == pytest.approx(0.95)
    assert quality["seconds_per_photo_cpu"] is not None

    again, cached = dd.protect_people(protector, ProtectConfig(), people, paths, "tag")  # type: ignore[arg-type]
    assert protector.calls == 6  # nothing protected twice
    assert cached == quality
    assert all(np.array_equal(first[pid], again[pid]) for pid in first)
