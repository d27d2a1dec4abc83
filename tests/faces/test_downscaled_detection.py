"""Detection on large photos: the downscaled copy a detector looks at, faces mapped back to the full image, dlib's
landmarks predicted at full resolution, and the landmark models shared by every dlib detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advface.encoders.base import ChipSpec
from advface.errors import ConfigError
from advface.faces import DlibDetector, Face, FaceDetector, align_face
from advface.faces.detect import DETECT_MAX_SIDE, detection_size
from advface.images import load_image


def test_detection_size() -> None:
    assert detection_size(250, 250, DETECT_MAX_SIDE) == (250, 250)
    assert detection_size(1600, 900, 1600) == (1600, 900)
    assert detection_size(3000, 4000, 1600) == (1200, 1600)
    assert detection_size(6000, 6000, 1600) == (1600, 1600)
    assert detection_size(10, 100_000, 1600) == (1, 1600)
    assert detection_size(6000, 6000, None) == (6000, 6000)


class _FixedDetector(FaceDetector):
    """Finds one face at fixed coordinates of whatever image it is given, and records the image sizes."""

    name = "fixed"

    def __init__(self, max_side: int | None) -> None:
        self.max_side = max_side
        self.sizes: list[tuple[int, ...]] = []

    def _detect(self, image: np.ndarray) -> list[Face]:
        self.sizes.append(image.shape[:2])
        landmarks = np.array([[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]], np.float32)
        return [Face(box=(5.0, 10.0, 35.0, 50.0), score=1.0, landmarks=landmarks)]


def test_faces_found_downscaled_are_mapped_back() -> None:
    detector = _FixedDetector(max_side=100)
    image = np.zeros((300, 400, 3), np.uint8)
    [face] = detector.detect(image)
    assert detector.sizes == [(75, 100)]  # aspect kept, longest side 100
    assert face.box == pytest.approx((20.0, 40.0, 140.0, 200.0))  # edges scale by 4
    np.testing.assert_allclose(face.landmarks[0], [10 * 4 + 1.5, 20 * 4 + 1.5])  # pixel centres: (x + 0.5) * 4 - 0.5
    [same] = _FixedDetector(max_side=None).detect(image)
    assert same.box == (5.0, 10.0, 35.0, 50.0)


def test_max_side_is_checked() -> None:
    with pytest.raises(ConfigError, match="max_side"):
        DlibDetector(max_side=40)


def test_dlib_detectors_share_their_landmark_models(lfw_sample: list[Path]) -> None:
    one, two = DlibDetector(), DlibDetector()
    assert one._shape5 is two._shape5
    one.detect(load_image(lfw_sample[0]))
    two.detect(load_image(lfw_sample[0]))
    assert one._shape68 is two._shape68 and one._shape68 is not None
    assert one._detector is not two._detector  # dlib's HOG detector is not thread-safe: one each


def test_a_large_photo_is_detected_downscaled_with_full_resolution_landmarks(lfw_sample: list[Path]) -> None:
    """An LFW photo upscaled 8x (2000 x 2000): detection on the 1600 px copy finds the face the full-size
    detection finds, with landmarks a few pixels apart on a ~800 px face; the dlib chips are nearly identical."""
    photo = np.asarray(Image.open(lfw_sample[2]).convert("RGB").resize((2000, 2000), Image.Resampling.BICUBIC))
    downscaled = DlibDetector()
    full = DlibDetector(max_side=None)
    sizes: list[tuple[int, ...]] = []

    class Recorder:
        def run(self, image: np.ndarray, *args: object) -> object:
            sizes.append(image.shape[:2])
            return full._detector.run(image, *args)

    downscaled._detector = Recorder()
    [small_face] = downscaled.detect(photo)
    [full_face] = full.detect(photo)
    assert sizes == [(1600, 1600)]
    width = full_face.box[2] - full_face.box[0]
    assert width > 500
    assert np.abs(small_face.landmarks - full_face.landmarks).max() < 0.03 * width
    assert small_face.dlib_shape is not None and small_face.dlib_shape.num_parts == 5
    chip = ChipSpec("dlib", 150, 0.25)
    a, b = align_face(photo, small_face, chip), align_face(photo, full_face, chip)
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < 12
