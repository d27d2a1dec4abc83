"""FaceChipper: policies, errors naming the source, chips for each encoder kind."""

from __future__ import annotations

from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest

from advface.encoders.base import ChipSpec
from advface.errors import ConfigError, ImageError, NoFaceError
from advface.faces import DlibDetector, FaceChipper, FacePolicy
from advface.images import load_image

ARCFACE = ChipSpec(kind="arcface", size=112)
DLIB = ChipSpec(kind="dlib", size=150, padding=0.25)


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    return DlibDetector()


@pytest.fixture(scope="module")
def single_face_photos(lfw_sample: list[Path], detector: DlibDetector) -> list[np.ndarray]:
    """Two sample photos of different people in which dlib finds exactly one face."""
    photos = []
    for path in lfw_sample[::2]:
        image = load_image(path)
        if len(detector.detect(image)) == 1:
            photos.append(image)
        if len(photos) == 2:
            return photos
    pytest.fail("fewer than two single-face photos in the LFW sample")


@pytest.fixture(scope="module")
def two_faces(single_face_photos: list[np.ndarray]) -> np.ndarray:
    """A 250 x 500 image: a photo shrunk to 60% (smaller face, black below) left of a full-size one."""
    small_photo, big_photo = single_face_photos
    small = cv2.resize(small_photo, (150, 150), interpolation=cv2.INTER_AREA)
    small = cv2.copyMakeBorder(small, 50, 50, 50, 50, cv2.BORDER_CONSTANT, value=0)
    return np.ascontiguousarray(np.hstack([small, big_photo]))


def test_one_photo_gives_one_chip_per_kind(single_face_photos: list[np.ndarray], detector: DlibDetector) -> None:
    image = single_face_photos[0]
    for chip, policy in ((DLIB, "largest"), (ARCFACE, "single"), (ARCFACE, "best-score"), (DLIB, "all")):
        out = FaceChipper(detector, chip, policy).chips(image, "photo.jpg")
        assert len(out) == 1
        face, crop = out[0]
        assert crop.shape == (chip.size, chip.size, 3) and crop.dtype == np.uint8
    face, crop = FaceChipper(detector, DLIB).chips(image, "photo.jpg")[0]
    np.testing.assert_array_equal(crop, dlib.get_face_chip(image, face.dlib_shape, size=150, padding=0.25))


def test_two_faces_and_the_policies(two_faces: np.ndarray, detector: DlibDetector) -> None:
    faces = detector.detect(two_faces)
    assert len(faces) == 2
    [(largest, _)] = FaceChipper(detector, ARCFACE, "largest").chips(two_faces, "pair.jpg")
    assert largest.box[0] >= 250 and largest.area == max(f.area for f in faces)  # the full-size photo
    [(best, _)] = FaceChipper(detector, ARCFACE, FacePolicy.BEST_SCORE).chips(two_faces, "pair.jpg")
    assert best.score == max(f.score for f in faces)
    everything = FaceChipper(detector, DLIB, "all").chips(two_faces, "pair.jpg")
    assert len(everything) == 2 and {f.box[0] >= 250 for f, _ in everything} == {True, False}
    assert not np.array_equal(everything[0][1], everything[1][1])
    with pytest.raises(ImageError, match="2 faces found, expected one") as info:
        FaceChipper(detector, DLIB, "single").chips(two_faces, "pair.jpg")
    assert info.value.source == "pair.jpg"


@pytest.mark.parametrize("shape", [(250, 250, 3), (12, 9, 3), (1, 1, 3)], ids=["blank", "tiny", "one-pixel"])
def test_no_face_is_an_error_naming_the_source(shape: tuple[int, int, int], detector: DlibDetector) -> None:
    chipper = FaceChipper(detector, ARCFACE)
    with pytest.raises(NoFaceError) as info:
        chipper.chips(np.full(shape, 200, np.uint8), "blank.png")
    assert info.value.source == "blank.png" and "no face" in str(info.value)


def test_tiny_face_photo_works_or_errors_clearly(single_face_photos: list[np.ndarray], detector: DlibDetector) -> None:
    chipper = FaceChipper(detector, ARCFACE)
    for size in (100, 40):
        tiny = cv2.resize(single_face_photos[1], (size, size), interpolation=cv2.INTER_AREA)
        try:
            out = chipper.chips(tiny, f"tiny{size}.jpg")
        except NoFaceError as exc:
            assert exc.source == f"tiny{size}.jpg"
        else:
            assert out[0][1].shape == (112, 112, 3)


def test_bad_input_and_config(detector: DlibDetector) -> None:
    chipper = FaceChipper(detector, ARCFACE)
    with pytest.raises(ImageError, match="bad.png") as info:
        chipper.chips(np.zeros((20, 20), np.uint8), "bad.png")
    assert not isinstance(info.value, NoFaceError)
    with pytest.raises(ImageError, match="empty"):
        chipper.chips(np.zeros((0, 0, 3), np.uint8), "empty.png")
    with pytest.raises(ConfigError, match="unknown face policy"):
        FaceChipper(detector, ARCFACE, "biggest")
    assert FaceChipper("dlib", ARCFACE).policy is FacePolicy.LARGEST


def test_center_policy_picks_the_face_nearest_the_middle(lfw_sample):
    import numpy as np

    from advface.encoders.dlib_runtime import DLIB_CHIP
    from advface.faces import FaceChipper
    from advface.images import load_image

    big = load_image(lfw_sample[0])
    canvas = np.zeros((250, 750, 3), np.uint8)
    canvas[:, :250] = big  # left
    canvas[:, 250:500] = load_image(lfw_sample[2])  # middle
    canvas[:, 500:] = big  # right
    chipper = FaceChipper("dlib", DLIB_CHIP, "center")
    (face,) = chipper.select(canvas, "canvas")
    assert 250 <= (face.box[0] + face.box[2]) / 2 <= 500
