"""Training faces for the generator: the (face, embedding) pairs of one identity group of a dataset.

Every face is paired with its own embedding (no identity labels are needed). The groups are the project's
identity-disjoint split (:func:`advface.datasets.splits.split_identities`, seed ``split_seed``, 0 like every other
trainer of advface), so *evaluation* identities are never in any generator's training data; mirrored copies are
included (they are valid photos of the person, embedded anew).
"""

from __future__ import annotations

from advface.datasets.folders import IdentityFolderDataset
from advface.datasets.pairs import build_face_pairs
from advface.datasets.splits import GROUPS, identities_digest, split_identities
from advface.encoders.base import FaceEncoder
from advface.errors import ConfigError
from advface.generative.training import TrainingData


def group_training_data(
    dataset: IdentityFolderDataset,
    encoder: FaceEncoder,
    group: str,
    *,
    image_size: int = 64,
    split_seed: int = 0,
    detector: str = "dlib",
    workers: int = 1,
    dataset_name: str = "",
    progress: bool = True,
) -> TrainingData:
    """The faces (mirrors included) and embeddings of ``group`` (``defender`` or ``attacker``) of ``dataset``."""
    if group not in GROUPS or group == "evaluation":
        raise ConfigError(f"--group must be defender or attacker (evaluation people are never trained on), got {group}")
    pairs = build_face_pairs(
        dataset, encoder, detector=detector, image_size=image_size, workers=workers, progress=progress
    )
    split = split_identities(pairs.identities[~pairs.flipped].tolist(), seed=split_seed)
    chosen = pairs.of_identities(split.group(group))
    if len(chosen) == 0:
        raise ConfigError(f"the {group} group of {dataset_name or 'the dataset'} has no usable photo")
    return TrainingData(
        chosen.faces,
        chosen.embeddings,
        {
            "dataset": dataset_name,
            "group": group,
            "split": split.describe(),
            "split_seed": split_seed,
            "photos": int((~chosen.flipped).sum()),
            "identities": len(set(chosen.identities.tolist())),
            "identities_sha256": identities_digest(chosen.identities.tolist()),
            "encoder": encoder.name,
            "detector": detector,
        },
    )
