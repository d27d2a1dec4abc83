"""One shadow-training run from a dataset folder: pairs -> split -> train -> checkpoint with metadata.

Used by ``advface train-shadow`` and by the benchmarks (which train attackers the same way on other identities).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict
from pathlib import Path

import torch

from advface.datasets.folders import IdentityFolderDataset
from advface.encoders.base import FaceEncoder
from shadow_training.pairs import FacePairs, build_face_pairs
from shadow_training.splits import IdentitySplit, split_identities
from shadow_training.train import TrainConfig, evaluate_l1, train_decoder


def dataset_pairs(
    dataset: IdentityFolderDataset, encoder: FaceEncoder, *, image_size: int, detector: str = "dlib",
    workers: int = 1, progress: bool = True,
) -> FacePairs:
    """Cached (embedding, face) pairs of a whole dataset, with mirrored copies."""
    return build_face_pairs(dataset, encoder, detector=detector, image_size=image_size, workers=workers,
                            progress=progress)


def train_on_group(
    pairs: FacePairs, split: IdentitySplit, group: str, encoder: FaceEncoder, config: TrainConfig, *,
    out: str | os.PathLike[str], dataset_name: str, work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Train a decoder on the photos of one split group and save it with full metadata to ``out``."""
    from advface.inversion import save_decoder

    train = pairs.of_identities(split.group(group))
    val = pairs.of_identities(split.evaluation).without_flips()
    module = encoder.torch_module() if config.id_weight > 0 else None
    model, history = train_decoder(train, config, val=val, encoder_module=module,
                                   encoder_chip_size=encoder.chip.size, work_dir=work_dir, progress=progress)
    metadata = {
        "role": "shadow" if group == "defender" else "attacker",
        "encoder": encoder.name,
        "encoder_fingerprint": encoder.fingerprint,
        "dim": int(pairs.embeddings.shape[1]),
        "image_size": config.image_size,
        "face_chip": {"kind": encoder.chip.kind, "size": encoder.chip.size, "padding": encoder.chip.padding},
        "training_data": {"dataset": dataset_name, "group": group, "split": split.describe(),
                          "photos": int((~train.flipped).sum()), "pairs_with_flips": len(train)},
        "train_config": asdict(config),
        "loss": "l1" if config.id_weight == 0 else f"l1 + {config.id_weight} * identity",
        "metrics": {"final_train_l1": history["epochs"][-1]["train_l1"],
                    "val_l1_evaluation_group": evaluate_l1(model, val, device=config.resolved_device())},
        "seed": config.seed,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    save_decoder(Path(out), model, metadata)
    return model, metadata


__all__ = ["dataset_pairs", "split_identities", "train_on_group"]
