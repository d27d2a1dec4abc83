"""From an image to the aligned chips of the faces a policy selects."""

from __future__ import annotations

from enum import Enum

import numpy as np

from advface.encoders.base import ChipSpec
from advface.errors import ConfigError, ImageError, NoFaceError
from advface.faces.align import align_face
from advface.faces.detect import Face, FaceDetector, check_image, create_detector


class FacePolicy(str, Enum):  # noqa: UP042 - str(policy) stays 'FacePolicy.X' as callers expect
    """Which faces of an image to use."""

    LARGEST = "largest"  #: the face with the largest box (default)
    BEST_SCORE = "best-score"  #: the face with the highest detection score
    ALL = "all"  #: every face, largest first
    SINGLE = "single"  #: the only face; more than one is an error
    CENTER = "center"  #: the face whose box centre is nearest the image centre (centred portraits, e.g. LFW)

    @classmethod
    def parse(cls, value: FacePolicy | str) -> FacePolicy:
        """``value`` as a FacePolicy; ConfigError for an unknown name."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ConfigError(f"unknown face policy {value!r}; use one of {names}") from None


class FaceChipper:
    """Detects faces, picks them by ``policy`` and aligns them to ``chip``."""

    def __init__(
        self,
        detector: FaceDetector | str,
        chip: ChipSpec,
        policy: FacePolicy | str = FacePolicy.LARGEST,
    ) -> None:
        self.detector = create_detector(detector)
        self.chip = chip
        self.policy = FacePolicy.parse(policy)

    def select(self, image: np.ndarray, source: str) -> list[Face]:
        """The faces of ``image`` the policy keeps; NoFaceError / ImageError (policy single) naming ``source``."""
        faces = self.detector.detect(check_image(image, source))
        if not faces:
            raise NoFaceError(source)
        if self.policy is FacePolicy.ALL:
            return faces
        if self.policy is FacePolicy.SINGLE:
            if len(faces) > 1:
                raise ImageError(source, f"{len(faces)} faces found, expected one")
            return faces
        if self.policy is FacePolicy.BEST_SCORE:
            return [max(faces, key=lambda f: f.score)]
        if self.policy is FacePolicy.CENTER:
            cy, cx = image.shape[0] / 2.0, image.shape[1] / 2.0

            def off_centre(face: Face) -> float:
                x1, y1, x2, y2 = face.box
                return ((x1 + x2) / 2 - cx) ** 2 + ((y1 + y2) / 2 - cy) ** 2

            return [min(faces, key=off_centre)]
        return [faces[0]]  # detectors return the largest first

    def chips(self, image: np.ndarray, source: str) -> list[tuple[Face, np.ndarray]]:
        """``(face, chip)`` pairs of the selected faces; chips are ``size x size x 3`` RGB uint8."""
        image = check_image(image, source)
        return [(face, align_face(image, face, self.chip)) for face in self.select(image, source)]

    def __repr__(self) -> str:
        return f"FaceChipper(detector={self.detector!r}, chip={self.chip!r}, policy={self.policy.value!r})"
