"""Face detection on real LFW photos: dlib HOG and SCRFD, boxes and ArcFace landmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advface.errors import ConfigError, ImageError
from advface.faces import DlibDetector, DlibMmodDetector, Face, ScrfdDetector, create_detector
from advface.faces.detect import SCRFD_FILE, approximate_five_from_shape5, downscale, parse_detector_spec
from advface.images import load_image


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.fixture(scope="module")
def light_detector() -> DlibDetector:
    """dlib detector that never loads the 68-point model (for cheap checks)."""
    return DlibDetector(arcface_landmarks=False)


@pytest.fixture(scope="module")
def sample_images(lfw_sample: list[Path]) -> list[np.ndarray]:
    return [load_image(path) for path in lfw_sample]


@pytest.fixture(scope="module")
def dlib_faces(sample_images: list[np.ndarray]) -> list[list[Face]]:
    detector = DlibDetector()
    return [detector.detect(image) for image in sample_images]


@pytest.fixture(scope="module")
def scrfd_faces(sample_images: list[np.ndarray], models_dir: Path) -> list[list[Face]]:
    detector = ScrfdDetector(models_dir / SCRFD_FILE)
    return [detector.detect(image) for image in sample_images]


def check_face(face: Face) -> None:
    assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < min(left_mouth[1], right_mouth[1])
    # the nose tip may reach eye level when the head tilts back (LFW has such photos)
    assert min(left_eye[1], right_eye[1]) - 10 < nose[1] < min(left_mouth[1], right_mouth[1])
    x1, y1, x2, y2 = face.box
    assert x1 < x2 and y1 < y2 and face.area == pytest.approx((x2 - x1) * (y2 - y1))


def test_dlib_finds_the_central_face(dlib_faces: list[list[Face]]) -> None:
    found = [faces for faces in dlib_faces if faces]
    assert len(found) >= 0.95 * len(dlib_faces)
    for faces in found:
        assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
        face = faces[0]
        check_face(face)
        assert face.dlib_shape is not None and face.dlib_shape.num_parts == 5
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        assert abs(cx - 125) < 35 and abs(cy - 125) < 35  # LFW photos are centred on the face
        assert 60 < face.box[2] - face.box[0] < 200
        assert face.score > 0


def test_scrfd_finds_the_same_faces(dlib_faces: list[list[Face]], scrfd_faces: list[list[Face]]) -> None:
    assert sum(bool(f) for f in scrfd_faces) >= 0.95 * len(scrfd_faces)
    compared = 0
    for by_dlib, by_scrfd in zip(dlib_faces, scrfd_faces):
        if by_dlib and by_scrfd:
            best = max(by_scrfd, key=lambda f: iou(f.box, by_dlib[0].box))
            check_face(best)
            assert best.dlib_shape is None
            assert iou(best.box, by_dlib[0].box) > 0.5
            compared += 1
    assert compared >= 0.9 * len(dlib_faces)


def test_mmod_finds_the_faces_hog_finds(sample_images: list[np.ndarray], dlib_faces: list[list[Face]]) -> None:
    detector = DlibMmodDetector()
    compared = 0
    for image, by_hog in zip(sample_images[:16], dlib_faces[:16]):
        by_mmod = detector.detect(image)
        if by_hog:
            assert by_mmod, "MMOD missed a face HOG found"
            best = max(by_mmod, key=lambda f: iou(f.box, by_hog[0].box))
            check_face(best)
            assert best.dlib_shape is not None and best.dlib_shape.num_parts == 5
            # MMOD's boxes are larger and higher than HOG's; the landmarks come from the same predictors
            assert iou(best.box, by_hog[0].box) > 0.5
            assert np.linalg.norm(best.landmarks - by_hog[0].landmarks, axis=1).mean() < 8.0
            compared += 1
    assert compared >= 14


def test_mmod_retries_at_a_higher_upsampling(sample_images: list[np.ndarray]) -> None:
    small = downscale(sample_images[0], (90, 90))  # the face is ~45 px: under MMOD's window without upsampling
    assert DlibMmodDetector(arcface_landmarks=False, retry_upsample=None).detect(small) == []
    (face,) = DlibMmodDetector(arcface_landmarks=False).detect(small)
    x1, y1, x2, y2 = face.box
    assert 25 < (x1 + x2) / 2 < 65 and 25 < (y1 + y2) / 2 < 65


def test_dlib_and_scrfd_landmarks_agree(dlib_faces: list[list[Face]], scrfd_faces: list[list[Face]]) -> None:
    distances = []
    for by_dlib, by_scrfd in zip(dlib_faces, scrfd_faces):
        if by_dlib and by_scrfd:
            best = max(by_scrfd, key=lambda f: iou(f.box, by_dlib[0].box))
            distances.append(np.linalg.norm(best.landmarks - by_dlib[0].landmarks, axis=1))
    distances = np.asarray(distances)
    # Measured on this sample: 1.7-2.3 px mean per point, worst single point 8.7 px.
    assert (distances.mean(axis=0) < 3.5).all(), distances.mean(axis=0)
    assert (distances.mean(axis=1) < 8.0).all(), distances.mean(axis=1)


def test_dlib_without_68_model_gives_approximate_landmarks(
    sample_images: list[np.ndarray], dlib_faces: list[list[Face]]
) -> None:
    detector = DlibDetector(arcface_landmarks=False)
    errors = []
    for image, exact in list(zip(sample_images, dlib_faces))[:20]:
        faces = detector.detect(image)
        assert len(faces) == len(exact)
        if faces:
            check_face(faces[0])
            np.testing.assert_allclose(faces[0].landmarks, approximate_five_from_shape5(faces[0].dlib_shape))
            errors.append(np.linalg.norm(faces[0].landmarks - exact[0].landmarks, axis=1))
    assert detector._shape68 is None  # the 68-point model was never loaded
    mean = np.asarray(errors).mean(axis=0)
    assert (mean[:2] < 3.0).all() and (mean < 9.0).all(), mean


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (32, 32, 3), (250, 250, 3)])
def test_blank_and_tiny_images_have_no_face(shape: tuple[int, int, int], light_detector: DlibDetector) -> None:
    assert light_detector.detect(np.zeros(shape, np.uint8)) == []


def test_scrfd_blank_and_tiny_images(models_dir: Path) -> None:
    detector = create_detector(f"scrfd:{models_dir / SCRFD_FILE}")
    for shape in [(1, 1, 3), (9, 13, 3), (250, 250, 3)]:
        assert detector.detect(np.full(shape, 128, np.uint8)) == []


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((0, 10, 3), np.uint8),
    ],
    ids=["gray", "rgba", "float", "empty"],
)
def test_bad_arrays_are_image_errors(image: np.ndarray, light_detector: DlibDetector) -> None:
    with pytest.raises(ImageError):
        light_detector.detect(image)


def test_create_detector(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(create_detector(), DlibDetector)
    assert isinstance(create_detector("dlib"), DlibDetector)
    monkeypatch.setenv("ADVFACE_MODELS_DIR", str(models_dir))
    scrfd = create_detector("scrfd")
    assert isinstance(scrfd, ScrfdDetector) and scrfd.model_path == models_dir / SCRFD_FILE
    assert create_detector(scrfd) is scrfd
    hog0 = create_detector("dlib:upsample=0")
    assert type(hog0) is DlibDetector and hog0.upsample == 0
    mmod = create_detector("dlib-mmod:upsample=1")
    assert isinstance(mmod, DlibMmodDetector) and (mmod.upsample, mmod.retry_upsample) == (1, 1)
    assert parse_detector_spec("dlib-mmod") == ("dlib-mmod", {})


def test_create_detector_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not found"):
        create_detector(f"scrfd:{tmp_path / 'missing.onnx'}")
    with pytest.raises(ConfigError, match="unknown detector"):
        create_detector("hog")
    with pytest.raises(ConfigError):
        create_detector("scrfd:")
    for bad in ("dlib:", "dlib:upsample=", "dlib:upsample=-1", "dlib:upsample=5", "dlib-mmod:scale=2", "dlib-cnn"):
        with pytest.raises(ConfigError):
            parse_detector_spec(bad)
    with pytest.raises(ConfigError, match="retry_upsample"):
        DlibMmodDetector(retry_upsample=-1)
    monkeypatch.delenv("ADVFACE_MODELS_DIR", raising=False)
    with pytest.raises(ConfigError, match="models folder"):
        create_detector("scrfd")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    with pytest.raises(ConfigError):
        ScrfdDetector(garbage)


def test_scrfd_refuses_a_non_detector_model(models_dir: Path) -> None:
    with pytest.raises(ConfigError, match="not an SCRFD"):
        ScrfdDetector(models_dir / "mobilefacenet_128d.onnx")


@pytest.mark.parametrize("photo", ["Abdoulaye_Wade/Abdoulaye_Wade_0003.jpg", "Billy_Andrade/Billy_Andrade_0001.jpg"])
def test_dlib_retries_with_a_lower_threshold(lfw_dir: Path, photo: str) -> None:
    from advface.images import load_image

    image = load_image(lfw_dir / "images" / photo)
    assert DlibDetector(arcface_landmarks=False, retry_threshold=None).detect(image) == []
    (face,) = DlibDetector(arcface_landmarks=False).detect(image)
    x1, y1, x2, y2 = face.box
    assert 60 < (x1 + x2) / 2 < 190 and 60 < (y1 + y2) / 2 < 190
