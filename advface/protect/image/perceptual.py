"""Perceptual budget of image protection: how many uint8 levels each pixel of a photo may change by.

A uniform L-inf budget spends the same 8 levels on smooth cheek skin as on hair, where the eye cannot see them, and
sign-PGD uses the whole budget on nearly every pixel; on smooth skin the result shows as wavy contour lines. The
budget map here follows the just-noticeable-difference (JND) models of image coding (Chou & Li 1995, luminance
adaptation; Yang et al. 2005, nonlinear additivity of luminance and texture masking), computed on the clean photo's
luminance:

- **luminance masking**: a change hides best in dark areas, somewhat in very bright ones and least in mid-tones
  (the Chou-Li visibility threshold of the local background luminance, capped at ``luminance_cap``);
- **texture masking**: a change is hidden by fine local contrast (hair, eyebrows, edges, textured background); the
  local RMS of the luminance's high-pass residual (luminance minus its Gaussian blur), spread over a small
  neighbourhood, measures it. Smooth shading of a cheek has a large local standard deviation but no residual, so
  it is not counted as texture;
- the two add with a small overlap term (``jnd = lum + tex - overlap * min(lum, tex)``).

The map, scaled by ``gain``, is floored to whole levels and clipped to ``[floor_levels, max_levels]``, where
``max_levels`` is the uniform budget (``floor(255 * epsilon)``): no pixel gets more than the uniform budget, smooth
mid-tone skin gets about 3 of 8 levels, hair and textured background all 8. The same map applies to the three
channels (a grey photo stays grey). The defaults were set by looking at protected LFW photos and measuring
(``benchmarks/photo_quality.py``); what they cost in protection is in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Budget shapes of image protection: ``uniform`` (every pixel may change by ``floor(255 * epsilon)`` levels),
#: ``perceptual`` (the per-pixel map of :func:`budget_map`), ``ssim`` (the uniform ball with a face-SSIM
#: constraint and L2-normalised steps, :mod:`advface.protect.image.ssim_budget`) or ``jnd`` (the same with a
#: visibility constraint in JND units, :mod:`advface.protect.image.jnd_budget`).
BUDGETS = ("uniform", "perceptual", "ssim", "jnd")

#: Rec. 601 luma weights (what JPEG and the JND literature use).
LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class PerceptualBudget:
    """Parameters of :func:`budget_map`. The defaults were set by eye and with ``benchmarks/photo_quality.py`` on a
    few LFW photos of another sample (seed 1) than the one the results report (seed 0)."""

    #: Multiplies the JND map (1: the JND models' own scale, which gives nearly every pixel of a photo the whole
    #: 8-level budget; 0.5 gives smooth mid-tone skin about 3 levels).
    gain: float = 0.5
    #: Fewest levels any pixel may change by (kept >= 1 so every pixel can still move).
    floor_levels: int = 1
    #: Most levels any pixel may change by, as a multiple of the uniform budget (1: never more than epsilon). Above 1
    #: textured pixels may exceed epsilon; measured, that wins strength back but draws halos around the eyes.
    ceiling: float = 1.0
    #: Gaussian sigma (pixels) of the blur whose residual is the texture, and of the background luminance.
    sigma: float = 1.0
    #: Gaussian sigma (pixels) of the window over which the residual's RMS is taken.
    window: float = 2.0
    #: Radius (pixels) over which texture masks: the local RMS is spread by a maximum filter.
    spread: int = 2
    #: Texture masking slope: JND levels per level of residual RMS.
    texture_slope: float = 4.0
    #: Overlap of the two masks (Yang et al.'s nonlinear additivity constant).
    overlap: float = 0.3
    #: Cap (levels) of the luminance threshold: Chou-Li's curve allows up to 20 levels in black, which on dark skin
    #: shows; capped, dark and light skin get about the same budget.
    luminance_cap: float = 6.0


def luminance(image: np.ndarray) -> np.ndarray:
    """Luma (0..255 float) of an ``H x W x 3`` (or ``H x W``) uint8 image."""
    img = image.astype(np.float64)
    return img if img.ndim == 2 else img[..., :3] @ LUMA


def luminance_jnd(background: np.ndarray) -> np.ndarray:
    """Chou-Li visibility threshold (levels) of the background luminance (0..255): about 20 levels in black, 3 at
    mid-grey, rising to about 6 in white."""
    bg = np.clip(background, 0.0, 255.0)
    dark = 17.0 * (1.0 - np.sqrt(bg / 127.0)) + 3.0
    bright = 3.0 / 128.0 * (bg - 127.0) + 3.0
    return np.where(bg <= 127.0, dark, bright)


def local_texture(lum: np.ndarray, sigma: float = 1.0, window: float = 2.0, spread: int = 2) -> np.ndarray:
    """Local RMS (Gaussian ``window``) of the high-pass residual ``lum - blur(lum, sigma)``, spread by a maximum
    filter of radius ``spread`` so that a pixel next to an edge or in hair is masked too (levels, ``H x W``)."""
    residual = lum - ndimage.gaussian_filter(lum, sigma)
    rms = np.sqrt(ndimage.gaussian_filter(residual * residual, window))
    return ndimage.maximum_filter(rms, size=2 * spread + 1) if spread > 0 else rms


def jnd_map(image: np.ndarray, params: PerceptualBudget | None = None) -> np.ndarray:
    """Just-noticeable difference (levels, float, ``H x W``) of each pixel of a uint8 photo."""
    p = params or PerceptualBudget()
    lum = luminance(image)
    lum_jnd = np.minimum(luminance_jnd(ndimage.gaussian_filter(lum, p.sigma)), p.luminance_cap)
    tex_jnd = p.texture_slope * local_texture(lum, p.sigma, p.window, p.spread)
    return lum_jnd + tex_jnd - p.overlap * np.minimum(lum_jnd, tex_jnd)


def budget_map(image: np.ndarray, max_levels: int, params: PerceptualBudget | None = None) -> np.ndarray:
    """Per-pixel budget (whole uint8 levels, ``H x W`` int16) of a uint8 photo: ``floor(gain * jnd)`` clipped to
    ``[min(floor_levels, top), top]`` with ``top = floor(ceiling * max_levels)`` (``max_levels`` at the default
    ceiling 1)."""
    p = params or PerceptualBudget()
    if max_levels < 1:
        raise ValueError(f"max_levels must be >= 1, got {max_levels}")
    top = max(1, int(math.floor(p.ceiling * max_levels + 1e-6)))
    levels = np.floor(p.gain * jnd_map(image, p) + 1e-6)
    return np.clip(levels, min(max(p.floor_levels, 1), top), top).astype(np.int16)
