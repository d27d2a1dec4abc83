"""Differentiable alignment: an image-to-chip ``2 x 3`` matrix (OpenCV convention) as a torch ``grid_sample`` warp.

:func:`advface.faces.align.alignment_matrix` maps image pixel coordinates to chip pixel coordinates, pixel centres
at integers. ``torch.nn.functional.affine_grid`` wants the opposite direction (output -> input) in normalised
coordinates (``align_corners=False``: ``u = (2 * px + 1) / size - 1``); :func:`chip_theta` converts one into the
other, so :func:`warp_chips` gives the same chip as ``cv2.warpAffine`` (bilinear, black outside) with gradients
flowing back to every image pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from advface.faces.align import invert_matrix


def _to_normalised(size_w: int, size_h: int) -> np.ndarray:
    """3 x 3 matrix: pixel coordinates -> normalised coordinates (align_corners=False)."""
    return np.array([[2.0 / size_w, 0.0, 1.0 / size_w - 1.0], [0.0, 2.0 / size_h, 1.0 / size_h - 1.0], [0, 0, 1.0]])


def chip_theta(matrix: np.ndarray, image_hw: tuple[int, int], chip_size: int) -> np.ndarray:
    """The ``2 x 3`` ``affine_grid`` theta equivalent to warping an ``image_hw`` image by ``matrix`` (image -> chip)."""
    height, width = image_hw
    inverse = np.vstack([invert_matrix(matrix), [0.0, 0.0, 1.0]])  # chip px -> image px
    from_chip = np.linalg.inv(_to_normalised(chip_size, chip_size))
    theta = _to_normalised(width, height) @ inverse @ from_chip
    return theta[:2].astype(np.float32)


def warp_chips(images: torch.Tensor, thetas: torch.Tensor, chip_size: int) -> torch.Tensor:
    """Bilinear chips (``N x C x S x S``) of ``N x C x H x W`` images by per-image thetas (``N x 2 x 3``)."""
    grid = F.affine_grid(thetas, [images.shape[0], images.shape[1], chip_size, chip_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
