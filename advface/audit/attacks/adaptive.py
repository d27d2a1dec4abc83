"""The adaptive attacker: an insider who enrols people of its own (the attacker group), reads back their *protected*
templates and trains a decoder on (protected template, face) pairs, so it learns to invert the protection itself.

The protection is the audited one (same shadow, budget, steps and seed as the database); the decoder training and
its cache are those of :mod:`advface.audit.attacks.decoder`, with the protection settings in the cache key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from advface.audit.attacks.decoder import DecoderAttacker, parse_attacker, train_or_load
from advface.datasets.pairs import FacePairs
from advface.datasets.splits import IdentitySplit
from advface.encoders.base import FaceEncoder
from advface.inversion.models import InversionDecoder

#: Protects an ``N x D`` array of raw templates the way the audited database does.
ProtectFn = Callable[[np.ndarray], np.ndarray]


def protected_pairs(pairs: FacePairs, split: IdentitySplit, protect: ProtectFn) -> FacePairs:
    """The attacker group's pairs with every embedding replaced by its protected template."""
    train = pairs.of_identities(split.attacker)
    return FacePairs(
        train.ids, train.identities, protect(train.embeddings).astype(np.float32), train.faces, train.flipped
    )


def train_or_load_adaptive(
    arch: str,
    pairs: FacePairs,
    split: IdentitySplit,
    encoder: FaceEncoder,
    protect: ProtectFn,
    protection_key: str,
    *,
    image_size: int,
    epochs: int,
    seed: int,
    cache_dir: Path,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[InversionDecoder, dict, bool]:
    """The adaptive attacker's decoder trained on protected templates of the attacker group: ``arch`` is a decoder
    spec as :func:`~advface.audit.attacks.decoder.parse_attacker` reads it (``deconv``: pixel loss; ``resup+id``:
    pixel + identity loss, the strongest insider). ``protection_key`` must identify the protection (method, shadow
    file hash, budget, steps, seed) for caching. Protecting the training templates is skipped when the decoder is
    cached."""
    spec = parse_attacker(arch)
    return train_or_load(
        DecoderAttacker(f"adaptive-{arch}", spec.arch, spec.id_weight),
        pairs,
        split,
        encoder,
        image_size=image_size,
        epochs=epochs,
        seed=seed,
        cache_dir=cache_dir,
        extra_key=f"adaptive|{protection_key}",
        batch_size=batch_size,
        dataset_name="audit dataset (protected templates)",
        progress=progress,
        training_pairs=lambda: protected_pairs(pairs, split, protect),
    )
