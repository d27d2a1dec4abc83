"""Tests of advface.protect.image.transforms."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from advface.protect.image.transforms import gaussian_blur


def test_gaussian_blur_is_opencv_s_blur_with_reflected_borders() -> None:
    image = np.random.default_rng(0).standard_normal((31, 40, 3)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(image).permute(2, 0, 1)[None], 1.3)[0].permute(1, 2, 0).numpy()
    theirs = cv2.GaussianBlur(image, (0, 0), sigmaX=1.3, sigmaY=1.3, borderType=cv2.BORDER_REFLECT_101)
    assert np.abs(ours - theirs).max() < 2e-3
    flat = torch.full((1, 3, 9, 9), 0.25)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat)
