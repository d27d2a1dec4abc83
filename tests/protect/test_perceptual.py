"""Perceptual budget of image protection: the budget map, the per-pixel projection and rounding, the report fields."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from advface.cli.main import build_parser
from advface.errors import ConfigError
from advface.protect.image import ImageProtector, ProtectConfig
from advface.protect.image.core import _eps, _quantise
from advface.protect.image.perceptual import PerceptualBudget, budget_map, jnd_map, luminance_jnd
from advface.protect.image.quality import gmsd, ssim, ssim_face


def _half_smooth_half_texture(value: int = 150, size: int = 64) -> np.ndarray:
    """Left half a flat patch of ``value``, right half the same mean with strong pixel noise."""
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), value, np.float64)
    img[:, size // 2 :] += rng.normal(0, 25, size=(size, size - size // 2, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ the budget map


def test_smooth_areas_get_less_budget_than_texture() -> None:
    img = _half_smooth_half_texture()
    levels = budget_map(img, 8)
    assert levels.shape == img.shape[:2] and levels.dtype == np.int16
    smooth, texture = levels[:, 4:24], levels[:, 40:60]
    assert smooth.max() < texture.min()
    assert texture.min() == 8  # strong texture: the whole budget
    assert smooth.max() <= 4  # flat mid-tone: about half of it or less


def test_luminance_masking_dark_hides_more_than_mid_grey() -> None:
    assert luminance_jnd(np.array([0.0]))[0] > luminance_jnd(np.array([255.0]))[0] > luminance_jnd(np.array([127.0]))[0]
    dark, grey = np.full((32, 32, 3), 10, np.uint8), np.full((32, 32, 3), 127, np.uint8)
    assert jnd_map(dark).mean() > jnd_map(grey).mean()


def test_budget_map_bounds_gain_floor_and_ceiling() -> None:
    img = _half_smooth_half_texture()
    for max_levels in (1, 3, 8, 16):
        levels = budget_map(img, max_levels)
        assert levels.min() >= min(PerceptualBudget().floor_levels, max_levels) and levels.max() <= max_levels
    low = budget_map(img, 8, PerceptualBudget(gain=0.3, floor_levels=1))
    high = budget_map(img, 8, PerceptualBudget(gain=0.3 * 2, floor_levels=1))
    assert (low <= high).all() and low.sum() < high.sum()
    assert budget_map(img, 8, PerceptualBudget(gain=100.0)).min() == 8  # a huge gain is the uniform budget
    assert budget_map(img, 8, PerceptualBudget(gain=100.0, ceiling=1.5)).max() == 12
    with pytest.raises(ValueError):
        budget_map(img, 0)


def test_grey_photo_gets_one_map_for_all_channels() -> None:
    img = _half_smooth_half_texture()
    config = ProtectConfig(budget="perceptual")
    levels = config.pixel_levels(img)
    assert isinstance(levels, np.ndarray) and levels.shape == (*img.shape[:2], 1)
    assert ProtectConfig(budget="uniform").pixel_levels(img) == 8


# ------------------------------------------------------------------------------------- projection and rounding


def test_quantise_respects_a_per_pixel_ball() -> None:
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 256, size=(20, 24, 3)).astype(np.uint8)
    levels = rng.integers(1, 9, size=(20, 24, 1)).astype(np.int16)
    adv = torch.from_numpy(rng.uniform(0, 1, size=(3, 20, 24))).float()  # far outside the ball
    out = _quantise(clean, adv, levels, gray=False)
    diff = np.abs(out.astype(np.int16) - clean.astype(np.int16))
    assert (diff <= levels).all()
    assert (diff == np.minimum(levels, 255)).mean() > 0.5  # pushed to the edge where the box allows


def test_eps_is_a_number_for_uniform_and_a_map_otherwise() -> None:
    dev = torch.device("cpu")
    assert _eps([8, 8], dev) == 8 / 255
    maps = [np.full((5, 6, 1), 3, np.int16), np.full((5, 6, 1), 5, np.int16)]
    eps = _eps(maps, dev)
    assert isinstance(eps, torch.Tensor) and eps.shape == (2, 1, 5, 6)
    assert torch.allclose(eps[1], torch.full((1, 5, 6), 5 / 255))
    mixed = _eps([8, maps[0]], dev)  # a uniform photo batched with a perceptual one
    assert isinstance(mixed, torch.Tensor) and float(mixed[0].max()) == pytest.approx(8 / 255)


def test_perceptual_protection_stays_in_its_ball(dlib_protector: ImageProtector, photo: np.ndarray) -> None:
    config = ProtectConfig(steps=8, budget="perceptual")
    out, report = dlib_protector.protect([photo], config)[0]
    levels = config.pixel_levels(photo)
    diff = np.abs(out.astype(np.int16) - photo.astype(np.int16))
    assert (diff <= levels).all()
    assert report.linf_levels == diff.max()
    low = int(np.min(levels))  # pixel_levels is typed int | array; perceptual gives the array
    assert low < config.levels
    smooth = np.broadcast_to(levels == low, diff.shape)
    textured = np.broadcast_to(levels == config.levels, diff.shape)
    assert diff[smooth].max() <= low
    assert diff[textured].max() > low  # textured pixels may move further than smooth ones
    doc = report.to_dict()
    assert doc["budget"] == "perceptual"
    assert 0 < doc["ssim_face"] <= 1 and 0 < doc["gmsd"] < 0.3
    assert doc["ssim_face"] == pytest.approx(ssim_face(photo, out, dlib_protector.find_face(photo).box), abs=1e-5)


def test_uniform_budget_is_the_old_behaviour(dlib_protector: ImageProtector, photo: np.ndarray) -> None:
    """A perceptual map equal to the uniform budget everywhere (huge gain) gives exactly the uniform result, and the
    uniform budget uses the whole ball. Encoders only: the deflection stage's float path differs by a rounding level
    on a handful of pixels between a scalar and a map budget."""
    uniform = ProtectConfig(steps=8, budget="uniform", guidance=("encoders",))
    flat = dataclasses.replace(uniform, budget="perceptual", perceptual=PerceptualBudget(gain=1000.0))
    a, report = dlib_protector.protect([photo], uniform)[0]
    b, _ = dlib_protector.protect([photo], flat)[0]
    np.testing.assert_array_equal(a, b)
    diff = np.abs(a.astype(np.int16) - photo.astype(np.int16))
    assert diff.max() == 8 and report.budget == "uniform"
    p, _ = dlib_protector.protect([photo], dataclasses.replace(uniform, budget="perceptual"))[0]
    assert np.abs(p.astype(np.int16) - photo.astype(np.int16)).sum() < diff.sum()


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="budget"):
        ProtectConfig(budget="loud").validate()
    with pytest.raises(ConfigError, match="gain"):
        ProtectConfig(perceptual=PerceptualBudget(gain=0.0)).validate()
    ProtectConfig(budget="uniform").validate()


# ------------------------------------------------------------------------------------------------------ quality


def test_ssim_face_and_gmsd() -> None:
    rng = np.random.default_rng(2)
    img = _half_smooth_half_texture(size=80)
    assert gmsd(img, img) == 0.0
    box = (4.0, 4.0, 36.0, 70.0)  # the smooth half
    noise = rng.integers(-4, 5, size=img.shape)
    noisy = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    assert ssim_face(img, noisy, box) == pytest.approx(ssim(img[4:70, 4:36], noisy[4:70, 4:36]))
    assert ssim_face(img, noisy, box) < ssim(img, noisy) < 1  # noise on the flat half is what SSIM sees most
    assert math.isnan(ssim_face(img, noisy, (0, 0, 5, 5)))
    louder = np.clip(img.astype(np.int16) + 3 * noise, 0, 255).astype(np.uint8)
    assert 0 < gmsd(img, noisy) < gmsd(img, louder)
    # structure drawn on the flat half (an edge) is what GMSD flags; the same change hidden in texture is not
    edge = np.zeros(img.shape, np.int16)
    edge[:, 18:20] = 6
    on_flat = np.clip(img.astype(np.int16) + edge, 0, 255).astype(np.uint8)
    on_texture = np.clip(img.astype(np.int16) + np.roll(edge, 40, axis=1), 0, 255).astype(np.uint8)
    assert gmsd(img, on_flat) > 2 * gmsd(img, on_texture)


def test_cli_budget_flag() -> None:
    parser = build_parser()
    args = parser.parse_args(["protect-image", "a.jpg", "--out", "o"])
    assert args.budget == ProtectConfig().budget
    assert parser.parse_args(["protect-image", "a.jpg", "--out", "o", "--budget", "uniform"]).budget == "uniform"
    with pytest.raises(SystemExit):
        parser.parse_args(["protect-image", "a.jpg", "--out", "o", "--budget", "loud"])


def test_sidecar_config_key(tmp_path: Path) -> None:
    from advface.config import ImageProtectionConfig, load_config
    from advface.service.image_protection import ImageProtectionService

    assert load_config(None, env={}).image_protection.budget is None
    path = tmp_path / "advface.yaml"
    path.write_text("image_protection: {budget: perceptual}\n")
    config = load_config(path, env={}).image_protection
    assert config.budget == "perceptual"
    assert ImageProtectionService(config).options(b"photo").budget == "perceptual"
    assert ImageProtectionService(ImageProtectionConfig()).options(b"photo").budget == ProtectConfig().budget
    ssim_service = ImageProtectionService(ImageProtectionConfig(budget="ssim"))
    assert ssim_service.options(b"photo").levels == 12  # a request without epsilon: the budget shape's own
    assert ssim_service.options(b"photo", epsilon=8 / 255).levels == 8
    env = {"ADVFACE_IMAGE_PROTECTION_BUDGET": "uniform"}
    assert load_config(path, env=env).image_protection.budget == "uniform"
    path.write_text("image_protection: {budget: loud}\n")
    with pytest.raises(ConfigError, match="budget"):
        load_config(path, env={})
