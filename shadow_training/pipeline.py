"""One shadow-training run, stage by stage: pairs -> split -> train -> checkpoint with metadata.

1. **pairs** (:func:`advface.datasets.pairs.build_face_pairs`): every photo detected, aligned, embedded, mirrored
   (cached under ``$ADVFACE_CACHE_DIR/pairs``);
2. **split** (:func:`advface.datasets.splits.split_identities`): identity-disjoint defender / attacker /
   evaluation groups, a pure function of the names and the seed;
3. **train** (:func:`advface.inversion.training.train_on_group`): the decoder on one group, validated on the
   evaluation group, saved with its metadata (resumable with ``work_dir``).
"""

from __future__ import annotations

import os

import torch

from advface.datasets.folders import IdentityFolderDataset
from advface.datasets.pairs import build_face_pairs
from advface.datasets.splits import split_identities
from advface.encoders.base import FaceEncoder
from advface.inversion.training import TrainConfig, train_on_group


def train_shadow(
    dataset: IdentityFolderDataset,
    encoder: FaceEncoder,
    config: TrainConfig,
    *,
    out: str | os.PathLike[str],
    dataset_name: str,
    group: str = "defender",
    detector: str = "dlib",
    workers: int = 1,
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Train a shadow (``group`` defender) or an attacker (``group`` attacker) decoder for ``encoder`` on
    ``dataset`` and save it to ``out``; the split uses ``config.seed``. Returns the model and its metadata."""
    pairs = build_face_pairs(
        dataset, encoder, detector=detector, image_size=config.image_size, workers=workers, progress=progress
    )
    split = split_identities(pairs.identities[~pairs.flipped].tolist(), seed=config.seed)
    return train_on_group(
        pairs, split, group, encoder, config, out=out, dataset_name=dataset_name, work_dir=work_dir, progress=progress
    )


__all__ = ["train_shadow"]
