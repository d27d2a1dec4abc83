"""Alignment of a detected face to an encoder's chip (:class:`~advface.encoders.base.ChipSpec`).

:func:`alignment_matrix` gives the ``2 x 3`` affine matrix from image pixel coordinates to chip pixel coordinates
(OpenCV's ``warpAffine`` convention, integer coordinates at pixel centres), so later code can warp with torch
and keep gradients; :func:`align_face` cuts the uint8 chip. Pixels that fall outside the image are black
(constant 0), as in ``dlib.get_face_chip`` and InsightFace's ``norm_crop``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from advface.encoders.base import ChipSpec
from advface.errors import ImageError
from advface.faces.detect import Face, check_image

if TYPE_CHECKING:  # pragma: no cover
    import dlib

#: The ArcFace 112 x 112 template, ArcFace order (left eye, right eye, nose tip, left and right mouth corner).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

#: Mean position of the five ArcFace landmarks in a dlib face chip, in dlib's unit face coordinates (padding 0:
#: chip pixel = (unit + padding) / (1 + 2 * padding) * size, see :func:`dlib_chip_template`).
#: Measured by ``python -m advface.faces.measure_template --count 200``: 200 LFW photos (every 66th of the
#: sorted 13,233; dlib found a face in 199), dlib HOG detector (upsample 1), chip transform of
#: ``get_face_chip_details(shape5, 150, 0.25)``; the landmarks come from the 68-point predictor on the photo
#: (eye centres = mean of six eye points, nose tip 30, mouth corners 48/54) mapped into the chip; mean over
#: faces, converted to unit coordinates. On 150 px / padding 0.25 chips this is (47.18, 46.35), (100.17, 46.05),
#: (72.49, 75.31), (49.66, 104.14), (98.44, 104.12); per-face std is about 1.5-1.8 px for the eyes, 5-8 px for
#: the nose tip and 5-6 px for the mouth corners (pose and expression).
DLIB_CHIP_FIVE = np.array(
    [
        [0.22181, 0.21353],
        [0.75165, 0.21054],
        [0.47489, 0.50306],
        [0.24655, 0.79139],
        [0.73440, 0.79117],
    ],
    dtype=np.float64,
)


def arcface_template(size: int) -> np.ndarray:
    """The ArcFace five-point template for a ``size x size`` chip (the 112 template scaled by size / 112)."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def dlib_chip_template(size: int, padding: float) -> np.ndarray:
    """Where the five ArcFace landmarks of an average face lie in a dlib chip of this size and padding."""
    return (DLIB_CHIP_FIVE + padding) / (1.0 + 2.0 * padding) * size


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` points onto ``dst``.

    Umeyama (1991), without reflection. ``src`` and ``dst`` are ``N x 2`` (N >= 2); returns ``2 x 3`` float64.
    Raises ValueError when ``src`` points all coincide.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching N x 2 point sets (N >= 2), got {src.shape} and {dst.shape}")
    mean_src, mean_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mean_src, dst - mean_dst
    var_src = (src_c**2).sum() / len(src)
    if not np.isfinite(var_src) or var_src < 1e-12:
        raise ValueError("source points coincide; no similarity transform")
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = (sigma * d).sum() / var_src
    translation = mean_dst - scale * rotation @ mean_src
    return np.hstack([scale * rotation, translation[:, None]])


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a ``2 x 3`` affine matrix to ``N x 2`` points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_matrix(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a ``2 x 3`` affine matrix."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def dlib_chip_matrix(shape: dlib.full_object_detection, size: int, padding: float) -> np.ndarray:
    """Image-to-chip matrix of ``dlib.get_face_chip(img, shape, size, padding)``.

    dlib maps the corners of ``get_face_chip_details(...).rect``, rotated by ``angle`` about its centre, onto
    the chip corners (0, 0) ... (cols - 1, rows - 1); warping with this matrix reproduces dlib's chip up to
    dlib's truncation of the interpolated values.
    """
    import dlib

    details = dlib.get_face_chip_details(shape, size, padding)
    rect = details.rect
    if details.cols < 2 or details.rows < 2:
        raise ValueError(f"dlib chip too small: {details.cols} x {details.rows}")
    scale_x = (details.cols - 1) / (rect.right() - rect.left())
    scale_y = (details.rows - 1) / (rect.bottom() - rect.top())
    cos, sin = np.cos(details.angle), np.sin(details.angle)
    linear = np.array([[cos * scale_x, sin * scale_x], [-sin * scale_y, cos * scale_y]])
    centre = np.array([(rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0])
    chip_centre = np.array([(details.cols - 1) / 2.0, (details.rows - 1) / 2.0])
    return np.hstack([linear, (chip_centre - linear @ centre)[:, None]])


def alignment_matrix(face: Face, chip: ChipSpec) -> np.ndarray:
    """The ``2 x 3`` float64 matrix taking image pixel coordinates to ``chip`` pixel coordinates.

    ``"arcface"``: similarity fit of ``face.landmarks`` onto :func:`arcface_template`. ``"dlib"``: dlib's own
    chip transform when the face has a ``dlib_shape``, otherwise a similarity fit of the landmarks onto
    :func:`dlib_chip_template` (the measured average, so chips from other detectors match dlib's closely).
    """
    if chip.kind == "dlib" and face.dlib_shape is not None:
        return dlib_chip_matrix(face.dlib_shape, chip.size, chip.padding)
    if chip.kind == "arcface":
        template = arcface_template(chip.size)
    elif chip.kind == "dlib":
        template = dlib_chip_template(chip.size, chip.padding)
    else:
        raise ValueError(f"unknown chip kind {chip.kind!r}")
    landmarks = np.asarray(face.landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2) or not np.isfinite(landmarks).all():
        raise ImageError("<face>", f"expected 5 x 2 finite landmarks, got {landmarks.shape}")
    try:
        return similarity_transform(landmarks, template)
    except ValueError as exc:
        raise ImageError("<face>", f"degenerate landmarks ({exc})") from exc


def warp_to_chip(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Bilinear warp of ``image`` by an image-to-chip ``matrix`` into a ``size x size`` chip (outside = 0)."""
    return cv2.warpAffine(
        image,
        np.asarray(matrix, dtype=np.float64),
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )


def align_face(image: np.ndarray, face: Face, chip: ChipSpec) -> np.ndarray:
    """Cut ``face`` out of an RGB uint8 ``image`` as a ``size x size x 3`` uint8 chip for ``chip``.

    dlib chips of faces with a ``dlib_shape`` come from ``dlib.get_face_chip`` itself (dlib's encoder reaches
    its published accuracy on exactly these); every other chip is :func:`warp_to_chip` with
    :func:`alignment_matrix`.
    """
    image = check_image(image)
    if chip.kind == "dlib" and face.dlib_shape is not None:
        import dlib

        return np.asarray(dlib.get_face_chip(image, face.dlib_shape, size=chip.size, padding=chip.padding))
    return warp_to_chip(image, alignment_matrix(face, chip), chip.size)
