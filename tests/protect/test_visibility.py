"""advface.protect.image.visibility: the JND model of a change's visibility (CSF, masking, pooling, bad input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advface.errors import ConfigError
from advface.images import load_image
from advface.protect.image.visibility import (
    VisibilityModel,
    band_sensitivities,
    visibility,
    visibility_image,
)


def _smooth_face_like(size: int = 96) -> np.ndarray:
    """A smooth, skin-coloured shaded disc on a light background (uint8 RGB)."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    shade = 150 + 40 * np.exp(-(xx * xx + yy * yy) / 0.08)
    rgb = np.stack([shade, 0.8 * shade, 0.65 * shade], axis=2)
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def _add(image: np.ndarray, delta: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.float64) + delta, 0, 255).round().astype(np.uint8)


def test_identical_images_are_invisible() -> None:
    img = _smooth_face_like()
    report = visibility(img, img.copy(), box=(20, 20, 70, 80))
    assert report.map.shape == img.shape[:2]
    assert np.all(report.map == 0)
    assert report.above_jnd == 0 and report.p95 == 0 and report.pooled == 0 and report.max == 0
    assert report.above_jnd_face == 0 and report.p95_face == 0 and report.pooled_face == 0
    assert visibility(img, img).above_jnd_face is None  # no box, no face numbers
    assert set(report.to_dict()) == {"above_jnd", "p95", "pooled", "max", "above_jnd_face", "p95_face", "pooled_face"}


def test_visibility_grows_with_the_amplitude_of_a_fixed_change() -> None:
    img = _smooth_face_like()
    pattern = np.random.default_rng(0).uniform(-1, 1, size=img.shape[:2])[..., None] * np.ones(3)
    reports = [visibility(img, _add(img, a * pattern)) for a in (1, 2, 4, 8)]
    pooled = [r.pooled for r in reports]
    p95 = [r.p95 for r in reports]
    above = [r.above_jnd for r in reports]
    assert all(x < y for x, y in zip(pooled, pooled[1:])), pooled
    assert all(x < y for x, y in zip(p95, p95[1:])), p95
    assert all(x <= y for x, y in zip(above, above[1:])), above
    assert above[0] < 0.5 < above[-1]  # one level of noise mostly under threshold, eight levels mostly over it


def test_texture_masks_a_change_that_shows_on_a_flat_patch() -> None:
    rng = np.random.default_rng(1)
    size = 128
    lum = np.full((size, size), 128.0)
    lum[:, size // 2 :] += rng.uniform(-50, 50, size=(size, size // 2))  # right half: high-contrast texture
    img = np.clip(np.repeat(lum[..., None], 3, axis=2), 0, 255).round().astype(np.uint8)
    change = 3 * np.sign(rng.uniform(-1, 1, size=(24, 24)))
    delta = np.zeros((size, size, 3))
    delta[52:76, 20:44] = change[..., None]  # the same change in the middle of each half
    delta[52:76, 84:108] = change[..., None]
    protected = _add(img, delta)
    flat_box, texture_box = (20, 52, 44, 76), (84, 52, 108, 76)
    on_flat = visibility(img, protected, box=flat_box)
    on_texture = visibility(img, protected, box=texture_box)
    assert on_flat.p95_face is not None and on_texture.p95_face is not None
    assert on_flat.above_jnd_face is not None and on_texture.above_jnd_face is not None
    assert on_flat.p95_face > 1.0 > on_texture.p95_face
    assert on_flat.above_jnd_face > 0.5 > on_texture.above_jnd_face
    # the difference is masking: without it the two patches are about equally visible
    unmasked = VisibilityModel(masking_exponent=0.0)
    flat_raw = visibility(img, protected, box=flat_box, model=unmasked).pooled_face
    texture_raw = visibility(img, protected, box=texture_box, model=unmasked).pooled_face
    assert flat_raw is not None and texture_raw is not None
    assert texture_raw == pytest.approx(flat_raw, rel=0.25)


def test_mid_frequency_sinusoid_is_more_visible_than_a_checkerboard_of_equal_rms() -> None:
    size = 128
    grey = np.full((size, size), 0.5)
    rms = 2.0 / 255.0
    yy, xx = np.mgrid[:size, :size]
    model = VisibilityModel()
    period = 1.0 / (model.band_frequencies()[1] / model.pixels_per_degree)  # the most sensitive band: ~8 cpd
    sinusoid = np.sqrt(2.0) * rms * np.sin(2 * np.pi * xx / period)
    checkerboard = rms * np.where((xx + yy) % 2 == 0, 1.0, -1.0)
    assert np.sqrt(np.mean(sinusoid**2)) == pytest.approx(rms, rel=0.02)
    assert np.sqrt(np.mean(checkerboard**2)) == pytest.approx(rms)
    mid = visibility(grey, grey + sinusoid, model=model)
    fine = visibility(grey, grey + checkerboard, model=model)
    assert mid.pooled > 3 * fine.pooled
    assert mid.above_jnd > 0.9 and fine.above_jnd < 0.1
    # the CSF: peak sensitivity at the mid band, lower at the finest and the coarsest
    lum = band_sensitivities(model)["lum"]
    assert lum[0] < max(lum) and lum[-1] < max(lum) and int(np.argmax(lum)) in (1, 2)
    # sinusoids of equal amplitude at each band's peak frequency: the mid band's is the most visible
    freqs = [f / model.pixels_per_degree for f in model.band_frequencies()]
    pooled = [visibility(grey, grey + rms * np.sin(2 * np.pi * f * xx), model=model).pooled for f in freqs]
    assert pooled[1] > 1.2 * pooled[0] and pooled[1] > 2 * pooled[-1], pooled


def test_colour_channels_count_but_less_than_luminance() -> None:
    grey = np.full((64, 64, 3), 128, np.uint8)
    noise = np.random.default_rng(3).choice([-3.0, 3.0], size=(64, 64))
    luminance_change = _add(grey, noise[..., None] * np.ones(3))
    red_green = _add(grey, np.stack([noise, -noise, np.zeros_like(noise)], axis=2))  # about isoluminant
    lum = visibility(grey, luminance_change).pooled
    colour = visibility(grey, red_green).pooled
    assert 0 < colour < lum
    assert visibility(grey, red_green, model=VisibilityModel(colour=False)).pooled < colour


def test_bad_input_is_refused_and_left_unchanged() -> None:
    img = _smooth_face_like(32)
    other = _add(img, np.ones(img.shape))
    before = (img.copy(), other.copy())
    with pytest.raises(ValueError, match="differ in shape"):
        visibility(img, other[:-1])
    with pytest.raises(ValueError, match="dtype"):
        visibility(img.astype(np.int32), other.astype(np.int32))
    nan = img.astype(np.float64) / 255
    nan[3, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        visibility(nan, other.astype(np.float64) / 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        visibility(img.astype(np.float64), other.astype(np.float64))  # 0..255 floats
    with pytest.raises(ValueError, match="H x W x 3"):
        visibility(np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="at least"):
        visibility(img[:4], other[:4])
    with pytest.raises(ValueError, match="numpy array"):
        visibility(img.tolist(), other)
    with pytest.raises(ValueError, match="box"):
        visibility(img, other, box=(40, 40, 50, 50))  # outside the 32 x 32 photo
    with pytest.raises(ValueError, match="box"):
        visibility(img, other, box=(0, 0, float("nan"), 10))
    with pytest.raises(ConfigError, match="bands"):
        visibility(img, other, model=VisibilityModel(bands=0))
    with pytest.raises(ConfigError, match="ambient"):
        visibility(img, other, model=VisibilityModel(ambient=-0.1))
    with pytest.raises(ConfigError, match="pixels_per_degree"):
        visibility(img, other, model=VisibilityModel(pixels_per_degree=float("inf")))
    assert np.array_equal(img, before[0]) and np.array_equal(other, before[1])
    assert VisibilityModel().validate() == []


def test_grey_input_and_debugging_image() -> None:
    grey = _smooth_face_like(48)[..., 0]
    changed = _add(grey, np.random.default_rng(4).uniform(-6, 6, size=grey.shape))
    report = visibility(grey, changed)
    assert visibility(grey, changed.copy()) == report  # deterministic; equality compares the numbers, not the map
    picture = visibility_image(report)
    assert picture.dtype == np.uint8 and picture.shape == grey.shape and picture.max() > 0
    rgb = visibility(np.repeat(grey[..., None], 3, axis=2), np.repeat(changed[..., None], 3, axis=2))
    assert rgb.pooled == pytest.approx(report.pooled)


def test_real_photo_uniform_noise_2_vs_8_levels(lfw_dir: Path) -> None:
    path = sorted((lfw_dir / "images" / "Aaron_Eckhart").glob("*.jpg"))[0]
    photo = load_image(path)
    box = (70.0, 70.0, 180.0, 190.0)  # LFW photos are 250 px with the face about in the middle
    rng = np.random.default_rng(5)
    reports = {}
    for levels in (2, 8):
        noise = rng.integers(-levels, levels + 1, size=photo.shape).astype(np.float64)
        reports[levels] = visibility(photo, _add(photo, noise), box=box)
    quiet, loud = reports[2], reports[8]
    assert quiet.pooled_face is not None and loud.pooled_face is not None
    assert quiet.above_jnd_face is not None and loud.above_jnd_face is not None
    assert loud.pooled > 2 * quiet.pooled and loud.pooled_face > 2 * quiet.pooled_face
    assert loud.above_jnd_face > 0.5  # 8 levels of noise show on most of a face
    assert quiet.above_jnd_face < 0.05  # 2 levels hardly anywhere (the photo's own texture and noise mask them)
    assert loud.p95 > 1.0
