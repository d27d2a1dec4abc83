"""Image quality of a protected photo against its original (uint8 RGB): PSNR, SSIM (whole photo and face box), GMSD.

PSNR and SSIM average over the photo, so a perturbation that is loud on a cheek and hidden in hair still scores
well. :func:`ssim_face` restricts SSIM to the face box, and :func:`gmsd` (gradient magnitude similarity deviation,
Xue et al. 2014) measures what the eye picks up in a protected photo: new edges and contours. GMSD compares the
gradient magnitude of the two images pixel by pixel and reports the standard deviation of their similarity, so it
is low for a change spread evenly (or hidden in texture, where gradients are already large) and high when the
change draws structure of its own onto smooth areas; it tracks human quality judgements (LIVE, CSIQ, TID2013) as
well as far costlier measures and needs no learned weights.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
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


def ssim_face(a: np.ndarray, b: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """:func:`ssim` on the face box ``(x1, y1, x2, y2)`` (clipped to the image; NaN when under 7 x 7 pixels)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    h, w = a.shape[:2]
    x1, y1 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x2, y2 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
    if x2 - x1 < 7 or y2 - y1 < 7:
        return math.nan
    return ssim(a[y1:y2, x1:x2], b[y1:y2, x1:x2])


def gmsd(a: np.ndarray, b: np.ndarray) -> float:
    """Gradient magnitude similarity deviation of two uint8 images (0: identical; about 0.05 for visibly degraded
    photos, up to about 0.35): on luma, 2 x 2 averaged and subsampled, Prewitt gradients, constant 170 (Xue et al.
    2014 for the 0..255 range)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    ga, gb = (_gradient_magnitude(_half_luma(img)) for img in (a, b))
    c = 170.0
    similarity = (2.0 * ga * gb + c) / (ga * ga + gb * gb + c)
    return float(similarity.std())


def _half_luma(image: np.ndarray) -> np.ndarray:
    lum = image.astype(np.float64)
    if lum.ndim == 3:
        lum = lum[..., :3] @ np.array([0.299, 0.587, 0.114])
    lum = ndimage.uniform_filter(lum, size=2, mode="reflect")
    return lum[::2, ::2]


def _gradient_magnitude(lum: np.ndarray) -> np.ndarray:
    kernel = np.array([[1.0, 0.0, -1.0]] * 3) / 3.0
    gx = ndimage.convolve(lum, kernel, mode="reflect")
    gy = ndimage.convolve(lum, kernel.T, mode="reflect")
    return np.sqrt(gx * gx + gy * gy)


def linf(a: np.ndarray, b: np.ndarray) -> int:
    """Largest absolute pixel difference (uint8 levels)."""
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) if a.size else 0
