"""Alignment to dlib and ArcFace chips: exact dlib chips, template placement, the measured dlib template."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest

from advface.encoders.base import ChipSpec
from advface.errors import ImageError
from advface.faces import (
    DLIB_CHIP_FIVE,
    DlibDetector,
    Face,
    ScrfdDetector,
    align_face,
    alignment_matrix,
    arcface_template,
    dlib_chip_template,
    similarity_transform,
)
from advface.faces.align import apply_matrix, dlib_chip_matrix, invert_matrix
from advface.faces.detect import SCRFD_FILE
from advface.faces.measure_template import chip_landmarks, to_unit
from advface.images import load_image

ARCFACE = ChipSpec(kind="arcface", size=112)
DLIB = ChipSpec(kind="dlib", size=150, padding=0.25)


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    return DlibDetector()


@pytest.fixture(scope="module")
def detected(lfw_sample: list[Path], detector: DlibDetector) -> list[tuple[np.ndarray, Face]]:
    """(image, largest dlib face) for the first 20 sample photos that have a face."""
    out = []
    for path in lfw_sample[:24]:
        image = load_image(path)
        faces = detector.detect(image)
        if faces:
            out.append((image, faces[0]))
    assert len(out) >= 20
    return out[:20]


def random_similarity(rng: np.random.Generator) -> np.ndarray:
    angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5.0)
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, rng.uniform(-100, 100)], [scale * s, scale * c, rng.uniform(-100, 100)]])


def test_similarity_transform_recovers_a_similarity() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        src = rng.uniform(0, 200, (5, 2))
        truth = random_similarity(rng)
        np.testing.assert_allclose(similarity_transform(src, apply_matrix(truth, src)), truth, atol=1e-8)


def test_similarity_transform_is_least_squares_and_never_reflects() -> None:
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    dst = src * [-1.0, 1.0]  # a mirror image: the best similarity is not a reflection
    linear = similarity_transform(src, dst)[:, :2]
    assert np.linalg.det(linear) > 0
    assert linear[0, 0] == pytest.approx(linear[1, 1]) and linear[0, 1] == pytest.approx(-linear[1, 0])
    noisy = apply_matrix(random_similarity(rng), src) + rng.normal(0, 1, (5, 2))
    best = similarity_transform(src, noisy)
    residual = np.linalg.norm(apply_matrix(best, src) - noisy)
    for _ in range(20):  # no nearby similarity fits better
        worse = best + rng.normal(0, 1e-3, (2, 3)) * [[1, 1, 100], [1, 1, 100]]
        worse[1, :2] = [-worse[0, 1], worse[0, 0]]
        assert residual <= np.linalg.norm(apply_matrix(worse, src) - noisy) + 1e-9


def test_similarity_transform_rejects_degenerate_points() -> None:
    with pytest.raises(ValueError):
        similarity_transform(np.ones((5, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError):
        similarity_transform(np.ones((5, 2)), np.zeros((4, 2)))


def test_dlib_chip_is_exactly_dlibs(detected: list[tuple[np.ndarray, Face]]) -> None:
    for image, face in detected:
        expected = np.asarray(dlib.get_face_chip(image, face.dlib_shape, size=150, padding=0.25))
        chip = align_face(image, face, DLIB)
        assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
        np.testing.assert_array_equal(chip, expected)


def test_dlib_chip_matrix_reproduces_dlibs_warp(detected: list[tuple[np.ndarray, Face]]) -> None:
    for image, face in detected[:10]:
        expected = np.asarray(dlib.get_face_chip(image, face.dlib_shape, size=150, padding=0.25), np.float64)
        matrix = alignment_matrix(face, DLIB)
        np.testing.assert_array_equal(matrix, dlib_chip_matrix(face.dlib_shape, 150, 0.25))
        warped = cv2.warpAffine(image.astype(np.float32), matrix, (150, 150), flags=cv2.INTER_LINEAR)
        # dlib truncates the bilinear value where OpenCV would keep the fraction
        assert np.abs(np.floor(warped) - expected).mean() < 0.01


def test_arcface_chip_puts_the_face_on_the_template(
    detected: list[tuple[np.ndarray, Face]], detector: DlibDetector
) -> None:
    template = arcface_template(112)
    residuals, redetected = [], []
    for image, face in detected:
        matrix = alignment_matrix(face, ARCFACE)
        residuals.append(np.linalg.norm(apply_matrix(matrix, face.landmarks) - template, axis=1))
        chip = align_face(image, face, ARCFACE)
        assert chip.shape == (112, 112, 3) and chip.dtype == np.uint8
        # re-detect on the chip (framed: a face filling the whole image is too large for the detector)
        framed = cv2.copyMakeBorder(chip, 56, 56, 56, 56, cv2.BORDER_CONSTANT, value=0)
        again = detector.detect(framed)
        assert again, "no face found on the aligned chip"
        redetected.append(np.linalg.norm(again[0].landmarks - 56 - template, axis=1))
    # a similarity cannot fit five points exactly; measured ~2.4 px (eyes), 5 px (nose), 2.7 px (mouth)
    for distances in (np.asarray(residuals), np.asarray(redetected)):
        mean = distances.mean(axis=0)
        assert (mean[:2] < 3.5).all() and mean[2] < 6.5 and (mean[3:] < 4.0).all(), mean


def test_arcface_chip_scales_with_size(detected: list[tuple[np.ndarray, Face]]) -> None:
    image, face = detected[0]
    small, large = alignment_matrix(face, ARCFACE), alignment_matrix(face, ChipSpec(kind="arcface", size=224))
    np.testing.assert_allclose(large, 2 * small, atol=1e-9)
    assert align_face(image, face, ChipSpec(kind="arcface", size=224)).shape == (224, 224, 3)


def test_scrfd_faces_align_like_dlib_faces(detected: list[tuple[np.ndarray, Face]], models_dir: Path) -> None:
    scrfd = ScrfdDetector(models_dir / SCRFD_FILE)
    template = arcface_template(112)
    for image, face in detected[:8]:
        other = scrfd.detect(image)[0]
        assert other.dlib_shape is None
        for chip in (ARCFACE, DLIB):
            # the same image point (dlib's landmarks) lands within a few pixels in both chips
            gap = apply_matrix(alignment_matrix(other, chip), face.landmarks) - apply_matrix(
                alignment_matrix(face, chip), face.landmarks
            )
            assert np.linalg.norm(gap, axis=1).mean() < 6.0 * chip.size / 112
        assert align_face(image, other, DLIB).shape == (150, 150, 3)
        on_chip = apply_matrix(alignment_matrix(other, ARCFACE), other.landmarks)
        assert np.linalg.norm(on_chip - template, axis=1)[:2].max() < 8


def test_dlib_template_without_dlib_shape_matches_dlibs_chip(detected: list[tuple[np.ndarray, Face]]) -> None:
    gaps = []
    for _image, face in detected:
        bare = dataclasses.replace(face, dlib_shape=None)
        by_template = apply_matrix(alignment_matrix(bare, DLIB), face.landmarks)
        by_dlib = apply_matrix(dlib_chip_matrix(face.dlib_shape, 150, 0.25), face.landmarks)
        gaps.append(np.linalg.norm(by_template - by_dlib, axis=1))
    mean = np.asarray(gaps).mean(axis=0)
    assert (mean < 5.0).all(), mean  # measured ~2.5 px (eyes, nose), ~4 px (mouth) on 150 px chips


def test_measured_dlib_template_is_reproducible(lfw_sample: list[Path]) -> None:
    """Re-derive DLIB_CHIP_FIVE on the 60 sample photos (it was measured on 200 others)."""
    points = chip_landmarks(lfw_sample, size=150, padding=0.25)
    assert len(points) >= 55
    mean = points.mean(axis=0)
    np.testing.assert_allclose(mean, dlib_chip_template(150, 0.25), atol=2.5)
    np.testing.assert_allclose(to_unit(dlib_chip_template(150, 0.25), 150, 0.25), DLIB_CHIP_FIVE)
    np.testing.assert_allclose(to_unit(dlib_chip_template(80, 0.1), 80, 0.1), DLIB_CHIP_FIVE)


def test_outside_the_image_is_black(detected: list[tuple[np.ndarray, Face]]) -> None:
    image, face = detected[0]
    shift = np.array([90.0, 60.0])
    cropped = np.ascontiguousarray(image[60:, 90:])  # the face now touches the top-left corner
    moved = dataclasses.replace(face, landmarks=(face.landmarks - shift).astype(np.float32), dlib_shape=None)
    for chip in (ARCFACE, DLIB):
        out = align_face(cropped, moved, chip)
        corner = apply_matrix(invert_matrix(alignment_matrix(moved, chip)), [[0.0, 0.0]])[0]
        assert (corner < 0).any()  # the chip's top-left corner maps outside the image
        assert (out[0, 0] == 0).all()


def test_bad_landmarks_and_kinds() -> None:
    image = np.zeros((50, 50, 3), np.uint8)
    flat = Face(box=(0, 0, 10, 10), score=1.0, landmarks=np.full((5, 2), 5, np.float32))
    with pytest.raises(ImageError, match="degenerate"):
        align_face(image, flat, ARCFACE)
    nan = dataclasses.replace(flat, landmarks=np.full((5, 2), np.nan, np.float32))
    with pytest.raises(ImageError):
        alignment_matrix(nan, DLIB)
    with pytest.raises(ValueError):
        alignment_matrix(flat, ChipSpec(kind="other", size=10))  # type: ignore[arg-type]
