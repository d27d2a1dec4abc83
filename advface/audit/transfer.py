"""The transfer judge: a second face encoder, untouched by the attackers and the protection, that scores every
attacker's reconstructions as well (visual identity leakage, beside the system encoder's impersonation success).

The judge embeds the dataset's photos through its own detection and alignment (:func:`build_face_pairs` with its
own chip, cached like the audit's pairs) and fixes its thresholds for FMR 0.1% and 1% on those clean embeddings,
as the audit does for the system encoder. Reconstructions are faces in the system encoder's chip frame (resized to
the decoder's size); :func:`to_chip_frame` maps them into the judge's chip frame with the fixed similarity
transform between the two chips' canonical five-landmark layouts (:mod:`advface.faces.align`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from advface.audit.results import TransferThresholds
from advface.datasets.folders import IdentityFolderDataset
from advface.encoders.base import ChipSpec, FaceEncoder
from advface.faces.align import arcface_template, dlib_chip_template, similarity_transform

#: ``--transfer-encoder`` values: the default (the other encoder) and no transfer judge.
TRANSFER_AUTO, TRANSFER_NONE = "auto", "none"
#: Size of the faces the judge's pairs cache stores. The judge uses only the embeddings, which come from full-size
#: chips whatever this size, so one cache serves attackers and generators of every size.
JUDGE_FACE_SIZE = 64


def default_transfer_encoder(system: str) -> str:
    """The judge of a system encoder: MobileFaceNet for dlib / dlib-torch templates, dlib for any other."""
    return "mobilefacenet" if system in ("dlib", "dlib-torch") else "dlib"


def resolve_transfer_encoder(setting: str, system: str) -> str | None:
    """The encoder name ``--transfer-encoder`` asks for (``auto``: :func:`default_transfer_encoder`), None for
    ``none``."""
    if setting == TRANSFER_NONE:
        return None
    return default_transfer_encoder(system) if setting == TRANSFER_AUTO else setting


def chip_landmarks(chip: ChipSpec, size: int) -> np.ndarray:
    """Where the five ArcFace landmarks of an average face lie in ``chip``'s frame drawn at ``size`` pixels."""
    if chip.kind == "arcface":
        return arcface_template(size)
    if chip.kind == "dlib":
        return dlib_chip_template(size, chip.padding)
    raise ValueError(f"unknown chip kind {chip.kind!r}")


def chip_frame_matrix(source: ChipSpec, source_size: int, target: ChipSpec) -> np.ndarray:
    """The ``2 x 3`` similarity taking pixels of a ``source_size`` image in ``source``'s chip frame to pixels of a
    ``target`` chip (``target.size``)."""
    return similarity_transform(chip_landmarks(source, source_size), chip_landmarks(target, target.size))


def to_chip_frame(faces: np.ndarray, source: ChipSpec, target: ChipSpec) -> np.ndarray:
    """``N x S x S x 3`` uint8 faces framed like ``source``'s chip -> ``N x T x T x 3`` chips for ``target``
    (bilinear, black outside the source image)."""
    size = target.size
    if len(faces) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    matrix = chip_frame_matrix(source, faces.shape[1], target)
    return np.stack(
        [
            cv2.warpAffine(
                np.ascontiguousarray(face),
                matrix,
                (size, size),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=(0, 0, 0),
            )
            for face in faces
        ]
    )


@dataclass
class TransferJudge:
    """The judge encoder, its clean embeddings of the dataset's photos (by photo id) and its thresholds."""

    #: The name given to ``--transfer-encoder`` (or chosen by default).
    name: str
    encoder: FaceEncoder
    #: The chip frame reconstructions are drawn in (the system encoder's).
    source_chip: ChipSpec
    #: Photo id -> row of ``embeddings``; photos the judge's detector found no face in are absent.
    index: dict[str, int]
    embeddings: np.ndarray
    #: FMR label -> threshold on the judge's score.
    thresholds: dict[str, float]

    def summary(self) -> TransferThresholds:
        """The report's ``thresholds.transfer`` entry."""
        return TransferThresholds(self.name, self.encoder.fingerprint, dict(self.thresholds), len(self.index))

    def embed_reconstructions(self, faces: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The judge's embeddings of reconstructions drawn in the system encoder's chip frame."""
        out = [
            self.encoder.embed(to_chip_frame(faces[i : i + batch_size], self.source_chip, self.encoder.chip))
            for i in range(0, len(faces), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.encoder.dim), np.float32)

    def rows_of(self, photo_ids: np.ndarray) -> np.ndarray:
        """Row of each photo id in ``embeddings``, -1 where the judge has no embedding of the photo."""
        return np.array([self.index.get(str(pid), -1) for pid in photo_ids.tolist()], dtype=int)


def _judge_encoder(name: str, models_dir: str | Path | None) -> FaceEncoder:
    from advface.encoders import create_encoder

    if name == "mobilefacenet":
        return create_encoder("mobilefacenet", models_dir=str(models_dir) if models_dir else None)
    return create_encoder("dlib-torch" if name == "dlib" else name)  # same embeddings as dlib, batched


def build_transfer_judge(
    name: str,
    dataset: IdentityFolderDataset,
    source_chip: ChipSpec,
    *,
    seed: int,
    use_cache: bool,
    workers: int = 1,
    progress: bool = True,
    models_dir: str | Path | None = None,
) -> TransferJudge:
    """Open the judge encoder ``name`` (ConfigError when it is unavailable, e.g. no model file), embed the dataset's
    photos through its own detection and alignment (the pairs cache of ``$ADVFACE_CACHE_DIR``, no mirrored copies,
    faces stored at :data:`JUDGE_FACE_SIZE`) and fix its thresholds on those clean embeddings."""
    from advface.audit.metrics import attack_thresholds
    from advface.datasets.pairs import build_face_pairs

    encoder = _judge_encoder(name, models_dir)
    pairs = build_face_pairs(
        dataset,
        encoder,
        image_size=JUDGE_FACE_SIZE,
        flip=False,
        use_cache=use_cache,
        workers=workers,
        progress=progress,
    )
    thresholds = attack_thresholds(pairs.embeddings, pairs.identities, encoder.metric, seed)
    index = {pid: i for i, pid in enumerate(pairs.ids.tolist())}
    return TransferJudge(name, encoder, source_chip, index, pairs.embeddings, thresholds)
