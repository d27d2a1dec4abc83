"""(embedding, face) pairs of a face dataset: each photo is detected, aligned to the encoder's chip, embedded, and the
chip, resized to the decoder's output size, is the face to reconstruct.

Pairs of public datasets are cached on disk (``$ADVFACE_CACHE_DIR/pairs``) so that training and benchmarks never
recompute them. Never build pairs from enrolment photos with a cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from advface.datasets.folders import IdentityFolderDataset
from advface.encoders.base import FaceEncoder
from advface.image_embedder import ImageEmbedder
from advface.paths import cache_dir


@dataclass
class FacePairs:
    """Aligned faces and their embeddings; rows of every array correspond."""

    ids: np.ndarray  #: photo ids (str)
    identities: np.ndarray  #: person of each photo (str)
    embeddings: np.ndarray  #: N x D float32, raw embeddings of ``faces`` as the encoder sees them
    faces: np.ndarray  #: N x S x S x 3 uint8, the encoder's chip resized to S
    flipped: np.ndarray  #: bool, True for horizontally mirrored copies (augmentation)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, mask: np.ndarray) -> FacePairs:
        """Rows where ``mask`` is true (or the given indices)."""
        return FacePairs(
            self.ids[mask], self.identities[mask], self.embeddings[mask], self.faces[mask], self.flipped[mask]
        )

    def of_identities(self, names: Set[str] | list[str]) -> FacePairs:
        """Rows of the given identities."""
        return self.subset(np.isin(self.identities, list(names)))

    def without_flips(self) -> FacePairs:
        """Only the original (not mirrored) photos."""
        return self.subset(~self.flipped)


def resize_faces(chips: np.ndarray, size: int) -> np.ndarray:
    """Resize ``N x S x S x 3`` uint8 chips to ``size`` (area interpolation when shrinking)."""
    if chips.shape[1] == size:
        return chips
    interp = cv2.INTER_AREA if size < chips.shape[1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(c, (size, size), interpolation=interp) for c in chips])


def _cache_file(encoder: FaceEncoder, detector: str, dataset: IdentityFolderDataset, size: int, flip: bool) -> Path:
    digest = hashlib.sha256()
    # "v1": bump when detection/alignment changes (pairs built with the largest-face policy)
    digest.update(f"{encoder.fingerprint}|{detector}|{size}|{flip}|v1".encode())
    for item in dataset:
        stat = item.path.stat()
        digest.update(f"{item.id}:{stat.st_size}\n".encode())
    return cache_dir() / "pairs" / f"{digest.hexdigest()[:32]}.npz"


def build_face_pairs(
    dataset: IdentityFolderDataset,
    encoder: FaceEncoder,
    *,
    detector: str = "dlib",
    image_size: int = 64,
    flip: bool = True,
    use_cache: bool = True,
    workers: int = 1,
    batch_size: int = 64,
    progress: bool = True,
) -> FacePairs:
    """Detect, align and embed every photo of ``dataset``; photos without a face are left out.

    With ``flip`` each face is also mirrored and re-embedded (the mirrored chip is a new, valid photo of the person).
    """
    cache_file = _cache_file(encoder, detector, dataset, image_size, flip)
    if use_cache and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as npz:
            return FacePairs(npz["ids"], npz["identities"], npz["embeddings"], npz["faces"], npz["flipped"])
    identity_of = {item.id: item.identity for item in dataset}
    embedder = ImageEmbedder(encoder, detector, "largest", workers=workers)
    ids: list[str] = []
    flags: list[bool] = []
    chips: list[np.ndarray] = []
    files = [(item.path, item.id) for item in dataset]
    for image_id, result in tqdm(
        embedder.iter_chips(files), total=len(files), desc="align", unit="img", disable=not progress
    ):
        if isinstance(result, str):
            continue
        chips.append(result[0])
        ids.append(image_id)
        flags.append(False)
        if flip:
            chips.append(np.ascontiguousarray(result[0][:, ::-1]))
            ids.append(image_id + "#flip")
            flags.append(True)
    all_chips = np.stack(chips)
    embeddings = np.concatenate(
        [
            encoder.embed(all_chips[i : i + batch_size])
            for i in tqdm(range(0, len(all_chips), batch_size), desc=f"embed ({encoder.name})", disable=not progress)
        ]
    )
    pairs = FacePairs(
        ids=np.asarray(ids, dtype=np.str_),
        identities=np.asarray([identity_of[i.removesuffix("#flip")] for i in ids], dtype=np.str_),
        embeddings=embeddings.astype(np.float32),
        faces=resize_faces(all_chips, image_size),
        flipped=np.asarray(flags),
    )
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.stem + ".tmp.npz")
        np.savez(
            tmp,
            ids=pairs.ids,
            identities=pairs.identities,
            embeddings=pairs.embeddings,
            faces=pairs.faces,
            flipped=pairs.flipped,
        )
        os.replace(tmp, cache_file)
    return pairs
