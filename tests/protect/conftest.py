"""Fixtures shared by the image-protection tests: one real LFW photo and a protector with dlib-torch alone.

Both are module-scoped (each module gets its own copy, as when every module defined them) and depend only on the
session-scoped ``lfw_dir`` / ``models_dir`` of tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advface.images import load_image
from advface.protect.image import ImageProtector

#: The LFW photo (relative to the LFW root) behind the ``photo`` fixture.
PHOTO = "images/Aaron_Peirsol/Aaron_Peirsol_0001.jpg"


@pytest.fixture(scope="module")
def photo(lfw_dir: Path) -> np.ndarray:
    """``PHOTO`` loaded as an RGB array."""
    return load_image(lfw_dir / PHOTO)


@pytest.fixture(scope="module")
def dlib_protector(models_dir: Path) -> ImageProtector:
    """dlib-torch alone on CPU (the fastest member)."""
    return ImageProtector(["dlib-torch"], device="cpu", policy="center")
