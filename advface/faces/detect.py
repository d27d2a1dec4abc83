"""Face detectors: dlib's HOG detector (the default), dlib's CNN (MMOD) detector and InsightFace's SCRFD (ONNX).

Every detector returns :class:`Face` records whose ``landmarks`` are the five ArcFace points, so any face can be
aligned to any encoder's chip (see :mod:`advface.faces.align`). Coordinates are image pixels, ``(x, y)``, with
integer values at pixel centres.

Large photos: a detector with a ``max_side`` (dlib's default: :data:`DETECT_MAX_SIDE`) looks for faces in a copy of
the image downscaled to that longest side (dlib's HOG costs time and memory in proportion to the pixels: about 1.6 s
and 120 MB for 1600 x 1600 on one core, 17 s and 2 GB for 6000 x 6000); the faces it returns are in the coordinates
of the image given, and dlib's landmarks are predicted on the full-resolution image, so the chips of a large photo
are as sharp as before (``benchmarks/large_photos.py``). Detectors are not thread-safe (one instance per thread);
dlib's landmark models are loaded once per process and shared by every :class:`DlibDetector` (they are read-only).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from advface.errors import ConfigError, ImageError
from advface.paths import dlib_model_file, model_file

if TYPE_CHECKING:  # pragma: no cover
    import dlib

SHAPE5_FILE = "shape_predictor_5_face_landmarks.dat"
SHAPE68_FILE = "shape_predictor_68_face_landmarks.dat"
MMOD_FILE = "mmod_human_face_detector.dat"
SCRFD_FILE = "scrfd_2.5g_bnkps.onnx"

#: Names of the five landmarks, in ArcFace order ("left"/"right" as seen in the image).
LANDMARK_NAMES = ("left_eye", "right_eye", "nose_tip", "left_mouth", "right_mouth")
#: Longest side dlib's HOG detector looks at: larger photos are downscaled for detection only (module docs).
DETECT_MAX_SIDE = 1600

_predictors: dict[str, Any] = {}
_predictors_lock = threading.Lock()


def shared_predictor(file: str) -> Any:
    """dlib's shape predictor ``file`` (from the dlib models folder), loaded once per process and shared: a predictor
    is read-only once loaded (dlib's ``shape_predictor::operator()`` is const), so threads may use it together."""
    with _predictors_lock:
        if file not in _predictors:
            import dlib

            _predictors[file] = dlib.shape_predictor(str(dlib_model_file(file)))
        return _predictors[file]


def detection_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """``(height, width)`` of the copy of an image that detection looks at: the image's own size when ``max_side``
    is None or not exceeded, else downscaled (aspect kept) so the longest side is ``max_side``."""
    longest = max(height, width)
    if max_side is None or longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def downscale(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``(height, width)`` with area averaging (no aliasing)."""
    import cv2

    return np.ascontiguousarray(cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA))


@dataclass
class Face:
    """One detected face.

    ``box`` is ``(x1, y1, x2, y2)`` (x2, y2 exclusive; may reach outside the image), ``landmarks`` the five
    ArcFace points as a ``5 x 2`` float32 array (see :data:`LANDMARK_NAMES`), ``dlib_shape`` dlib's 5-point
    ``full_object_detection`` when the face came from :class:`DlibDetector` (needed for dlib-exact chips).
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray
    dlib_shape: dlib.full_object_detection | None = None

    @property
    def area(self) -> float:
        """Area of ``box`` in square pixels."""
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def scaled(self, sx: float, sy: float) -> Face:
        """This face in an image ``sx`` times as wide and ``sy`` times as high (pixel edges scale, so pixel centres
        map as ``(x + 0.5) * sx - 0.5``); a ``dlib_shape`` is scaled too."""
        x1, y1, x2, y2 = self.box
        shift = np.array([0.5 * sx - 0.5, 0.5 * sy - 0.5], np.float64)
        factor = np.array([sx, sy], np.float64)
        landmarks = (np.asarray(self.landmarks, np.float64) * factor + shift).astype(np.float32)
        shape = None
        if self.dlib_shape is not None:
            import dlib

            rect = _scaled_rect(self.dlib_shape.rect, sx, sy)
            points = np.array([(p.x, p.y) for p in self.dlib_shape.parts()], np.float64) * factor + shift
            shape = dlib.full_object_detection(rect, [dlib.point(round(x), round(y)) for x, y in points])
        return Face((x1 * sx, y1 * sy, x2 * sx, y2 * sy), self.score, landmarks, shape)


def _scaled_rect(rect: dlib.rectangle, sx: float, sy: float) -> dlib.rectangle:
    """A dlib rectangle (inclusive corners) of an image scaled by ``sx``, ``sy`` (its edges scale)."""
    import dlib

    return dlib.rectangle(
        round(rect.left() * sx),
        round(rect.top() * sy),
        max(round(rect.left() * sx), round((rect.right() + 1) * sx) - 1),
        max(round(rect.top() * sy), round((rect.bottom() + 1) * sy) - 1),
    )


def check_image(image: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Return ``image`` as a contiguous ``H x W x 3`` uint8 array; raise ImageError otherwise."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(source, f"expected an H x W x 3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ImageError(source, f"expected a uint8 image, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(source, f"empty image ({image.shape[1]}x{image.shape[0]})")
    return np.ascontiguousarray(image)


class FaceDetector(abc.ABC):
    """Finds faces in RGB uint8 images. ``max_side`` (None: never) is the longest side detection looks at: larger
    images are downscaled first and the faces mapped back (module docs)."""

    name: str
    max_side: int | None = None

    @abc.abstractmethod
    def _detect(self, image: np.ndarray) -> list[Face]:
        """Detect faces in a validated contiguous RGB uint8 image, in any order."""

    def _detect_downscaled(self, image: np.ndarray, small: np.ndarray) -> list[Face]:
        """Faces of ``image`` found in ``small``, its downscaled copy (default: detected there, scaled back)."""
        sy, sx = image.shape[0] / small.shape[0], image.shape[1] / small.shape[1]
        return [face.scaled(sx, sy) for face in self._detect(small)]

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an ``H x W x 3`` RGB uint8 image, largest box first (empty list when none)."""
        image = check_image(image)
        size = detection_size(image.shape[0], image.shape[1], self.max_side)
        if size == image.shape[:2]:
            faces = self._detect(image)
        else:
            faces = self._detect_downscaled(image, downscale(image, size))
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class DlibDetector(FaceDetector):
    """dlib's HOG frontal-face detector plus its landmark predictors.

    ``dlib_shape`` comes from the 5-point predictor (what ``dlib.get_face_chip`` needs). With
    ``arcface_landmarks=True`` (default) the five ArcFace ``landmarks`` come from the 68-point predictor (eye
    centres = mean of the six eye points, nose tip = point 30, mouth corners = points 48 and 54); that model is
    loaded on the first detection. With ``arcface_landmarks=False`` the 68-point model is never loaded and the
    landmarks are *approximate*: the mean five points of a dlib chip (:data:`advface.faces.align.DLIB_CHIP_FIVE`)
    mapped back into the image through this face's dlib chip transform, i.e. the average face placed by the
    5-point shape. Measured on 60 LFW photos against the 68-point landmarks: eyes 1.5 px off on average, nose
    tip 6 px, mouth corners 5 px (up to 17 px on turned or laughing faces), as these are not observed.

    ``upsample`` is how many times dlib doubles the image before detecting (dlib's HOG window is 80 x 80 px, so
    0 misses smaller faces; 1, the default, finds faces down to ~40 px at about 4x the time). On LFW's ~100 px
    faces both work: 200 spread LFW photos gave 199 faces with 1 and 200 with 0. ``adjust_threshold`` shifts
    the HOG score threshold (negative finds more, less certain faces). When nothing is found, detection is tried
    once more with ``retry_threshold`` (default -0.5; None disables): on the 40 LFW View-2 photos where the default
    threshold finds no face, the retry found one in 18 of the first 20.

    ``max_side`` (default :data:`DETECT_MAX_SIDE`; None: never downscale): images with a longer side are searched
    for faces at that size; the boxes found are scaled back and the landmarks predicted on the full image. The
    landmark models are shared by every instance (:func:`shared_predictor`); the HOG detector is the instance's own
    (dlib's detector is not thread-safe).
    """

    name = "dlib"

    def __init__(
        self,
        upsample: int = 1,
        arcface_landmarks: bool = True,
        adjust_threshold: float = 0.0,
        retry_threshold: float | None = -0.5,
        max_side: int | None = DETECT_MAX_SIDE,
    ) -> None:

        if upsample < 0:
            raise ConfigError(f"upsample must be >= 0, got {upsample}")
        if max_side is not None and max_side < 80:
            raise ConfigError(f"max_side must be at least 80 (dlib's detection window) or None, got {max_side}")
        self.upsample = int(upsample)
        self.arcface_landmarks = bool(arcface_landmarks)
        self.adjust_threshold = float(adjust_threshold)
        self.retry_threshold = None if retry_threshold is None else float(retry_threshold)
        self.max_side = None if max_side is None else int(max_side)
        self._detector = self._load_detector()
        self._shape5 = shared_predictor(SHAPE5_FILE)
        self._shape68: Any = None
        self._lock = threading.Lock()

    def _load_detector(self) -> Any:
        """This instance's own dlib face detector (dlib's detectors are not thread-safe)."""
        import dlib

        return dlib.get_frontal_face_detector()

    def _predictor68(self) -> Any:
        with self._lock:
            if self._shape68 is None:
                self._shape68 = shared_predictor(SHAPE68_FILE)
            return self._shape68

    def _rects(self, image: np.ndarray) -> tuple[Sequence[Any], Sequence[float]]:
        """dlib's face rectangles in ``image`` and their scores (retried at ``retry_threshold`` when none)."""
        rects, scores, _ = self._detector.run(image, self.upsample, self.adjust_threshold)
        if not rects and self.retry_threshold is not None and self.retry_threshold < self.adjust_threshold:
            rects, scores, _ = self._detector.run(image, self.upsample, self.retry_threshold)
        return rects, scores

    def _detect(self, image: np.ndarray) -> list[Face]:
        return self._faces(image, *self._rects(image))

    def _detect_downscaled(self, image: np.ndarray, small: np.ndarray) -> list[Face]:
        rects, scores = self._rects(small)
        sy, sx = image.shape[0] / small.shape[0], image.shape[1] / small.shape[1]
        return self._faces(image, [_scaled_rect(rect, sx, sy) for rect in rects], scores)

    def _faces(self, image: np.ndarray, rects: Sequence[Any], scores: Sequence[float]) -> list[Face]:
        """Faces of ``image`` at dlib rectangles ``rects``: landmarks predicted on ``image``."""
        faces = []
        for rect, score in zip(rects, scores):
            shape5 = self._shape5(image, rect)
            if self.arcface_landmarks:
                landmarks = arcface_five_from_68(self._predictor68()(image, rect))
            else:
                landmarks = approximate_five_from_shape5(shape5)
            box = (float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1))
            faces.append(Face(box=box, score=float(score), landmarks=landmarks, dlib_shape=shape5))
        return faces


class DlibMmodDetector(DlibDetector):
    """dlib's CNN face detector (max-margin object detection, ``mmod_human_face_detector.dat`` from the dlib models
    folder) plus the same landmark predictors as :class:`DlibDetector`.

    ``upsample`` is how many times the image is doubled before detection (0, the default, finds faces down to about
    80 px; each doubling costs about 4x the time); when nothing is found, detection is tried once more at
    ``retry_upsample`` (default 1; None disables). On LFW View-2 (``benchmarks/lfw_detectors.py``,
    benchmarks/RESULTS.md) it found a face in every photo (HOG with one upsampling and its retry: all but 3 of 7,701)
    and gave 98.95 +- 0.58 % against HOG's 98.83 +- 0.34 % (a gain within the spread over the folds), at about 9x
    HOG's detection time (0.3 s for a 250 x 250 photo on one core): an option, not the default.
    ``adjust_threshold`` and ``retry_threshold`` do not apply (the CNN has no threshold argument).
    """

    name = "dlib-mmod"

    def __init__(
        self,
        upsample: int = 0,
        retry_upsample: int | None = 1,
        arcface_landmarks: bool = True,
        max_side: int | None = DETECT_MAX_SIDE,
    ) -> None:
        if retry_upsample is not None and retry_upsample < 0:
            raise ConfigError(f"retry_upsample must be >= 0 or None, got {retry_upsample}")
        self.retry_upsample = None if retry_upsample is None else int(retry_upsample)
        super().__init__(
            upsample=upsample, arcface_landmarks=arcface_landmarks, retry_threshold=None, max_side=max_side
        )

    def _load_detector(self) -> Any:
        import dlib

        return dlib.cnn_face_detection_model_v1(str(dlib_model_file(MMOD_FILE)))

    def _rects(self, image: np.ndarray) -> tuple[Sequence[Any], Sequence[float]]:
        found = self._detector(image, self.upsample)
        if not found and self.retry_upsample is not None and self.retry_upsample > self.upsample:
            found = self._detector(image, self.retry_upsample)
        return [d.rect for d in found], [float(d.confidence) for d in found]


def shape_points(shape: dlib.full_object_detection) -> np.ndarray:
    """The points of a dlib shape as an ``N x 2`` float64 array."""
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def arcface_five_from_68(shape68: dlib.full_object_detection) -> np.ndarray:
    """ArcFace five points from dlib's 68-point shape (iBUG 300-W numbering)."""
    pts = shape_points(shape68)
    five = np.stack([pts[36:42].mean(axis=0), pts[42:48].mean(axis=0), pts[30], pts[48], pts[54]])
    return five.astype(np.float32)


def approximate_five_from_shape5(shape5: dlib.full_object_detection) -> np.ndarray:
    """Approximate ArcFace five points from dlib's 5-point shape (see :class:`DlibDetector`)."""
    from advface.faces.align import apply_matrix, dlib_chip_matrix, dlib_chip_template, invert_matrix

    to_chip = dlib_chip_matrix(shape5, size=150, padding=0.25)
    return apply_matrix(invert_matrix(to_chip), dlib_chip_template(150, 0.25)).astype(np.float32)


def default_providers() -> list[str]:
    """onnxruntime providers to use: CUDA when this onnxruntime build has it, then CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class ScrfdDetector(FaceDetector):
    """InsightFace's SCRFD detector (with five keypoints) from an ONNX file, run by onnxruntime.

    ``input_size`` is the square network input (the image is letterboxed into it; multiple of 32);
    ``score_threshold`` the minimum detection score. Faces carry five landmarks and no ``dlib_shape``.
    """

    name = "scrfd"

    def __init__(
        self,
        model_path: str | Path,
        input_size: int = 640,
        score_threshold: float = 0.5,
        providers: list[str] | None = None,
    ) -> None:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"SCRFD model file {path} not found")
        if input_size <= 0 or input_size % 32:
            raise ConfigError(f"SCRFD input_size must be a positive multiple of 32, got {input_size}")
        from insightface.model_zoo import get_model
        from insightface.model_zoo.scrfd import SCRFD

        providers = providers or default_providers()
        try:
            model = get_model(str(path), providers=providers)
        except Exception as exc:  # onnxruntime / onnx raise many types for a bad file
            raise ConfigError(f"cannot load SCRFD model {path}: {exc}") from exc
        if not isinstance(model, SCRFD) or not model.use_kps:
            raise ConfigError(f"{path} is not an SCRFD face detector with keypoints")
        model.prepare(ctx_id=0, input_size=(input_size, input_size), det_thresh=score_threshold)
        self.model_path = path
        self.input_size = input_size
        self.score_threshold = float(score_threshold)
        self._model = model

    def _detect(self, image: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        size = (self.input_size, self.input_size)
        dets, kpss = self._model.detect(bgr, input_size=size, det_thresh=self.score_threshold)
        return [
            Face(
                box=(float(det[0]), float(det[1]), float(det[2]), float(det[3])),
                score=float(det[4]),
                landmarks=kps.astype(np.float32),
            )
            for det, kps in zip(dets, kpss)
        ]


#: What :func:`create_detector` accepts (for messages and docs).
DETECTOR_SPECS = "'dlib', 'dlib-mmod' (either with ':upsample=N'), 'scrfd' or 'scrfd:/path/to/model.onnx'"


def parse_detector_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``(name, keyword arguments)`` of a detector spec (see :func:`create_detector`); ConfigError when malformed.
    Loads nothing, so configuration can be checked without dlib or onnxruntime."""
    if not isinstance(spec, str):
        raise ConfigError(f"invalid detector spec {spec!r}")
    name, sep, arg = spec.partition(":")
    if name in ("dlib", "dlib-mmod"):
        if not sep:
            return name, {}
        key, eq, value = arg.partition("=")
        if key == "upsample" and eq and value.isdigit() and int(value) <= 4:
            return name, {"upsample": int(value)}
        raise ConfigError(f"bad detector option {arg!r} in {spec!r}; the only option is upsample=N with N in 0..4")
    if name == "scrfd":
        if sep and not arg:
            raise ConfigError("detector spec 'scrfd:' needs a model path after the colon")
        return name, {"model_path": arg if sep else None}
    raise ConfigError(f"unknown detector {spec!r}; use {DETECTOR_SPECS}")


def create_detector(spec: str | FaceDetector = "dlib") -> FaceDetector:
    """Build a detector: ``"dlib"`` (HOG, default), ``"dlib-mmod"`` (dlib's CNN detector), either with
    ``":upsample=N"``, ``"scrfd"`` (``scrfd_2.5g_bnkps.onnx`` from the models folder, ``$ADVFACE_MODELS_DIR``) or
    ``"scrfd:/path/to/model.onnx"``; a FaceDetector is returned as is."""
    if isinstance(spec, FaceDetector):
        return spec
    name, options = parse_detector_spec(spec)
    if name == "dlib":
        return DlibDetector(**options)
    if name == "dlib-mmod":
        return DlibMmodDetector(**options)
    return ScrfdDetector(options["model_path"] or model_file(SCRFD_FILE))
