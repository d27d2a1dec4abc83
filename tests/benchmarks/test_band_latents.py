"""benchmarks/band_latents.py: a perturbation's bands carried through a generator's input path."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from advface.datasets import LFW
from advface.generative.model import load_generator
from advface.images import load_image
from advface.protect.image.io import save_png
from benchmarks.band_latents import cached_photos, measure, share
from benchmarks.diffusion_defences import cached_photo_name

ATTACKER = Path(__file__).resolve().parents[2] / "benchmarks" / "models" / "generator_attacker.pt"


def test_share_is_a_norm_ratio() -> None:
    assert share(np.array([3.0, 4.0]), np.array([0.0, 10.0])) == pytest.approx(0.5)
    assert share(np.ones(3), np.zeros(3)) == 0.0


def _protect(folder: Path, lfw_dir: Path, photo: Path, delta: np.ndarray) -> None:
    item = next(i for i in LFW(lfw_dir) if Path(i.path) == photo)
    name = cached_photo_name(item.id)
    clean = load_image(photo).astype(np.float32)
    save_png(np.clip(np.rint(clean + delta), 0, 255).astype(np.uint8), folder / f"{name}.png")


def test_cached_photos_maps_cache_names_back_to_lfw_photos(
    tmp_path: Path, lfw_dir: Path, lfw_sample: list[Path]
) -> None:
    photo = lfw_sample[0]
    _protect(tmp_path, lfw_dir, photo, np.zeros(load_image(photo).shape, np.float32))
    save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "0123456789abcdef.png")  # no LFW photo has this name
    [(clean, protected)] = cached_photos(tmp_path, LFW(lfw_dir))
    assert clean == photo and protected.parent == tmp_path and protected.name != "0123456789abcdef.png"


def test_cached_photos_of_a_folder_without_lfw_photos_is_an_error(tmp_path: Path, lfw_dir: Path) -> None:
    with pytest.raises(SystemExit, match="no cached protected photo"):
        cached_photos(tmp_path, LFW(lfw_dir))


@pytest.mark.parametrize(("kind", "low_dominates"), [("smooth", True), ("fine", False)])
def test_bands_of_a_known_perturbation(
    tmp_path: Path, lfw_dir: Path, lfw_sample: list[Path], kind: str, low_dominates: bool
) -> None:
    """Split at a 16-px generator's pixel (about 7 photo pixels), a perturbation blurred over 8 photo pixels reaches
    the generator's input as low band, one of 1-2.5 photo pixels (finer than the split, coarser than the generator's
    64-px Nyquist) as high band."""
    photo = lfw_sample[0]
    noise = np.random.default_rng(0).standard_normal(load_image(photo).shape).astype(np.float32)
    if kind == "smooth":
        delta = cv2.GaussianBlur(noise, (0, 0), 8) * 150
    else:
        delta = (cv2.GaussianBlur(noise, (0, 0), 1.0) - cv2.GaussianBlur(noise, (0, 0), 2.5)) * 40
    _protect(tmp_path, lfw_dir, photo, delta)
    found = measure({"g": load_generator(ATTACKER)}, cached_photos(tmp_path, LFW(lfw_dir)), split_size=16, sigma=0.5)
    row = found["generators"]["g"]
    assert found["photos"] == 1 and found["photos_skipped"] == 0 and found["split_pixel_mean"] > 5
    assert row["image_size"] == 64 and row["whole_latent_share"] == pytest.approx(1.0)
    assert row["whole_latent_relative"] > 0.01
    kept, dropped = ("low", "high") if low_dominates else ("high", "low")
    assert row[f"{kept}_pixel_share"] > 0.8 and row[f"{dropped}_pixel_share"] < 0.3
    assert row[f"{kept}_latent_share"] > 0.8 and row[f"{dropped}_latent_share"] < 0.3
