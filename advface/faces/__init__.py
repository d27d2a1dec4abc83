"""Face detection (dlib HOG, dlib MMOD, SCRFD) and alignment to an encoder's chip."""

from advface.faces.align import (
    ARCFACE_TEMPLATE_112,
    DLIB_CHIP_FIVE,
    align_face,
    alignment_matrix,
    arcface_template,
    dlib_chip_template,
    similarity_transform,
    warp_to_chip,
)
from advface.faces.detect import DlibDetector, DlibMmodDetector, Face, FaceDetector, ScrfdDetector, create_detector
from advface.faces.pipeline import FaceChipper, FacePolicy

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "DLIB_CHIP_FIVE",
    "DlibDetector",
    "DlibMmodDetector",
    "Face",
    "FaceChipper",
    "FaceDetector",
    "FacePolicy",
    "ScrfdDetector",
    "align_face",
    "alignment_matrix",
    "arcface_template",
    "create_detector",
    "dlib_chip_template",
    "similarity_transform",
    "warp_to_chip",
]
