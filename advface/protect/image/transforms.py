"""Expectation over transformation (EOT): random, differentiable image transforms applied at every PGD step.

JPEG is not differentiable; it is applied with a straight-through estimator (forward: the real JPEG codec at a random
quality; backward: identity), which keeps the perturbation aimed at what survives compression. Resize down-up and
Gaussian blur are differentiable as they are. Small crops and shifts are applied to the alignment itself (a random
shift and scale of each chip), which is what a crop of the photo does to the aligned face.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EOTConfig:
    """Which transforms, with what probability and range."""

    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (70, 95)
    resize_prob: float = 0.3
    resize_scale: tuple[float, float] = (0.6, 0.95)
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.4, 1.2)
    #: Largest shift of the chip, as a fraction of the chip size, and largest relative zoom.
    shift: float = 0.03
    zoom: float = 0.05


def jpeg_uint8(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-compress and decode an ``H x W x 3`` RGB (or ``H x W``) uint8 image at ``quality`` (OpenCV codec)."""
    bgr = image[:, :, ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 image
        raise RuntimeError("JPEG encoding failed")
    out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED if image.ndim == 2 else cv2.IMREAD_COLOR)
    if out is None:  # pragma: no cover - OpenCV decodes the buffer it just encoded
        raise RuntimeError("JPEG decoding failed")
    return out[:, :, ::-1] if image.ndim == 3 else out


def jpeg_straight_through(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG of one ``C x H x W`` image in [0, 1] with identity gradient (straight-through estimator)."""
    arr = (x.detach().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    out = jpeg_uint8(arr, quality)
    y = torch.from_numpy(np.ascontiguousarray(out)).to(x.device, torch.float32).permute(2, 0, 1) / 255.0
    return x + (y - x).detach()


def gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel of radius ``ceil(3 sigma)``."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``N x C x H x W`` (reflect padding), differentiable."""
    k = gaussian_kernel(sigma, x.device)
    r = (len(k) - 1) // 2
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def resize_down_up(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Downscale ``N x C x H x W`` by ``scale`` (area-like, antialiased bilinear) and back up (bilinear)."""
    h, w = x.shape[-2:]
    small = (max(8, round(h * scale)), max(8, round(w * scale)))
    down = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=gen).item())


def random_transform(x: torch.Tensor, config: EOTConfig, gen: torch.Generator) -> torch.Tensor:
    """One random EOT draw applied to one ``1 x C x H x W`` image (random numbers from ``gen``)."""
    if torch.rand((), generator=gen).item() < config.resize_prob:
        x = resize_down_up(x, _uniform(gen, *config.resize_scale))
    if torch.rand((), generator=gen).item() < config.blur_prob:
        x = gaussian_blur(x, _uniform(gen, *config.blur_sigma))
    if torch.rand((), generator=gen).item() < config.jpeg_prob:
        low, high = config.jpeg_quality
        quality = int(low + torch.randint(0, high - low + 1, (), generator=gen).item())
        x = jpeg_straight_through(x[0], quality)[None]
    return x


def jitter_theta(theta: torch.Tensor, config: EOTConfig, gen: torch.Generator) -> torch.Tensor:
    """A ``2 x 3`` affine_grid theta with a random shift (chip fractions) and zoom: a small random crop."""
    zoom = 1.0 + _uniform(gen, -config.zoom, config.zoom)
    shift = torch.tensor([_uniform(gen, -config.shift, config.shift) * 2 for _ in range(2)], dtype=theta.dtype)
    out = theta.clone()
    out[:, :2] = theta[:, :2] * zoom
    out[:, 2] = theta[:, 2] + theta[:, :2] @ shift.to(theta.device)
    return out
