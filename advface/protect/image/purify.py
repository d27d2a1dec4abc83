"""Purifications a thief may apply to a protected photo before extracting the identity (evaluation only).

Each takes and returns an ``H x W x 3`` RGB uint8 image. :func:`standard_purifications` gives the classical set;
a learned denoiser (:mod:`advface.protect.image.denoiser`) is added by the caller once trained.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from advface.protect.image.transforms import jpeg_uint8

Purifier = Callable[[np.ndarray], np.ndarray]


def jpeg(quality: int) -> Purifier:
    """JPEG re-compression at ``quality``."""
    return lambda image: jpeg_uint8(image, quality)


def blur(sigma: float) -> Purifier:
    """Gaussian blur with standard deviation ``sigma`` pixels."""
    return lambda image: cv2.GaussianBlur(image, (0, 0), sigma)


def resize_down_up(scale: float) -> Purifier:
    """Downscale by ``scale`` (area) and back up (bicubic)."""

    def run(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)

    return run


def median(size: int) -> Purifier:
    """Median filter of ``size`` x ``size`` pixels."""
    return lambda image: cv2.medianBlur(image, size)


def non_local_means(strength: float = 5.0) -> Purifier:
    """OpenCV's colour non-local-means denoiser (a classical denoiser)."""
    return lambda image: cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(image), None, strength, strength, 7, 21)


def standard_purifications() -> dict[str, Purifier]:
    """The classical purifications of the benchmark, by name."""
    return {
        "jpeg75": jpeg(75),
        "jpeg50": jpeg(50),
        "blur1.0": blur(1.0),
        "resize0.5": resize_down_up(0.5),
        "median3": median(3),
        "nlmeans5": non_local_means(5.0),
    }
