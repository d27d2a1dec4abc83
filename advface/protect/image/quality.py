"""Image quality of a protected photo against its original: PSNR and SSIM (both on uint8 RGB)."""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two uint8 images (Gaussian window, sigma 1.5, as Wang et al. 2004)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    channel_axis = 2 if a.ndim == 3 else None
    return float(
        structural_similarity(
            a,
            b,
            data_range=255,
            channel_axis=channel_axis,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def linf(a: np.ndarray, b: np.ndarray) -> int:
    """Largest absolute pixel difference (uint8 levels)."""
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) if a.size else 0
