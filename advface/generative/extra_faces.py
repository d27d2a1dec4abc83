"""Extra training faces for the generator: samples of the DCGAN shipped in the ``gan-face-generate`` wheel.

The DCGAN (64 px, trained on the synthetic DigiFace1M faces; :mod:`advface.audit.attacks.gan_prior`) gives faces
of nobody, so they add variety without adding any real person. Each sample goes through the same path as an LFW photo
(:func:`advface.datasets.pairs.build_face_pairs`): upscaled to :data:`DETECT_SIZE` px (dlib's HOG detector misses
most 64 px faces), detected, aligned to the encoder's chip, embedded; a mirrored copy is embedded too, and the chips
are resized to the generator's image size. Samples in which no face is found are dropped and counted. The same
``n``, ``seed``, encoder, detector and size give the same faces; :func:`cached_dcgan_faces` keeps them in the
training work folder so that a resumed run uses exactly the faces it started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from advface.datasets.pairs import resize_faces
from advface.encoders.base import FaceEncoder
from advface.errors import ConfigError, ImageError
from advface.faces import FaceChipper, FacePolicy
from advface.faces.detect import FaceDetector
from advface.generative.training import TrainingData

#: side in px the 64 px DCGAN samples are upscaled to (bicubic) before detection (2x, as the realism benchmark does)
DETECT_SIZE = 128
#: file in the training work folder holding the extra faces of a run
CACHE_FILE = "extra_dcgan.npz"
SOURCE = "gan-face-generate DCGAN 64x64 (DigiFace1M)"


@dataclass
class ExtraFaces:
    """Aligned DCGAN faces (mirrors included: rows ``2k`` and ``2k + 1`` are sample ``indices[k]`` and its mirror) and
    their embeddings, with the draw they came from (``sampled`` latents seeded with ``seed``)."""

    faces: np.ndarray
    embeddings: np.ndarray
    indices: np.ndarray
    sampled: int
    seed: int

    @property
    def kept(self) -> int:
        """Samples in which a face was found."""
        return len(self.indices)

    def describe(self) -> dict[str, Any]:
        """The checkpoint's ``training_data.extra_dcgan`` entry."""
        return {
            "source": SOURCE,
            "sampled": self.sampled,
            "kept": self.kept,
            "dropped_no_face": self.sampled - self.kept,
            "seed": self.seed,
            "faces": len(self.faces),
            "detect_size": DETECT_SIZE,
        }


def dcgan_faces(
    n: int,
    encoder: FaceEncoder,
    *,
    seed: int,
    image_size: int = 64,
    detector: str | FaceDetector = "dlib",
    progress: bool = True,
) -> ExtraFaces:
    """Sample ``n`` DCGAN faces (latents seeded with ``seed``), detect, align and embed them like LFW photos."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"--extra-dcgan must be an integer >= 0, got {n!r}")
    from advface.audit.attacks.gan_prior import sample_faces

    samples = sample_faces(n, seed)
    chipper = FaceChipper(detector, encoder.chip, FacePolicy.LARGEST)
    chips: list[np.ndarray] = []
    indices: list[int] = []
    for k, sample in enumerate(tqdm(samples, desc="DCGAN faces", unit="face", disable=not progress)):
        image = cv2.resize(sample, (DETECT_SIZE, DETECT_SIZE), interpolation=cv2.INTER_CUBIC)
        try:
            chip = chipper.chips(image, f"dcgan#{k}")[0][1]
        except ImageError:
            continue
        chips += [chip, np.ascontiguousarray(chip[:, ::-1])]
        indices.append(k)
    kept = np.asarray(indices, dtype=np.int64)
    if not chips:
        empty = np.zeros((0, image_size, image_size, 3), np.uint8)
        return ExtraFaces(empty, np.zeros((0, encoder.dim), np.float32), kept, n, seed)
    stacked = np.stack(chips)
    embeddings = np.concatenate([encoder.embed(stacked[i : i + 64]) for i in range(0, len(stacked), 64)])
    return ExtraFaces(resize_faces(stacked, image_size), embeddings.astype(np.float32), kept, n, seed)


def cached_dcgan_faces(
    work_dir: str | Path,
    n: int,
    encoder: FaceEncoder,
    *,
    seed: int,
    image_size: int = 64,
    detector: str = "dlib",
    progress: bool = True,
) -> ExtraFaces:
    """:func:`dcgan_faces`, kept in ``work_dir`` (:data:`CACHE_FILE`): a resumed run reads the faces it started with.
    A cached file made with other settings is refused (ConfigError), like the work folder's training state."""
    path = Path(work_dir) / CACHE_FILE
    settings = f"{n}|{seed}|{image_size}|{detector}|{DETECT_SIZE}|{encoder.fingerprint}"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                cached = str(npz["settings"])
                extra = ExtraFaces(npz["faces"], npz["embeddings"], npz["indices"], int(npz["sampled"]), seed)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path}: unreadable DCGAN faces ({exc}); delete the file to make them anew") from exc
        if cached != settings:
            raise ConfigError(
                f"{path}: the DCGAN faces of this work folder were made with other settings ({cached}, not "
                f"{settings}); use another --work-dir (or delete it to start over)"
            )
        return extra
    extra = dcgan_faces(n, encoder, seed=seed, image_size=image_size, detector=detector, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(
        tmp,
        settings=np.str_(settings),
        faces=extra.faces,
        embeddings=extra.embeddings,
        indices=extra.indices,
        sampled=extra.sampled,
    )
    tmp.replace(path)
    return extra


def with_extra_faces(data: TrainingData, extra: ExtraFaces) -> TrainingData:
    """``data`` with the extra faces appended (each paired with its own embedding), described under
    ``extra_dcgan``."""
    if extra.faces.shape[1:] != data.faces.shape[1:] or extra.embeddings.shape[1:] != data.embeddings.shape[1:]:
        raise ConfigError(
            f"the DCGAN faces ({extra.faces.shape[1:]}, {extra.embeddings.shape[1:]}) do not fit the training data "
            f"({data.faces.shape[1:]}, {data.embeddings.shape[1:]})"
        )
    return TrainingData(
        np.concatenate([data.faces, extra.faces]),
        np.concatenate([data.embeddings, extra.embeddings.astype(data.embeddings.dtype)]),
        {**data.description, "extra_dcgan": extra.describe()},
    )
