"""Decoder inversion attackers: decoders of several architectures trained on the attacker group's (embedding, face)
pairs, with a pixel loss and optionally the identity loss through the encoder's differentiable module.

Training reuses :func:`advface.inversion.training.train_on_group`; trained decoders are cached under
``<cache>/audit/decoders/<key>.pt`` where the key hashes the encoder fingerprint, the training photos (the split),
the architecture, the loss, the image size, the epochs, the seed and any extra tag (the adaptive attacker adds its
protection settings), so an audit re-run loads them instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from advface.datasets.pairs import FacePairs
from advface.datasets.splits import IdentitySplit
from advface.encoders.base import FaceEncoder
from advface.errors import ConfigError
from advface.inversion import available_decoders, load_decoder
from advface.inversion.models import InversionDecoder
from advface.inversion.training import TrainConfig, train_on_group


@dataclass(frozen=True)
class DecoderAttacker:
    """One decoder attacker: ``name`` in reports, architecture, identity-loss weight (0: pixel L1 only)."""

    name: str
    arch: str
    id_weight: float = 0.0

    @property
    def loss(self) -> str:
        """The training loss in words."""
        return "l1" if self.id_weight == 0 else f"l1 + {self.id_weight:g} * identity"


def parse_attacker(spec: str) -> DecoderAttacker:
    """``"deconv"`` (pixel loss) or ``"resup+id"`` (pixel + identity loss, weight 1) -> :class:`DecoderAttacker`."""
    arch, plus, loss = spec.partition("+")
    if arch not in available_decoders():
        raise ConfigError(
            f"unknown decoder attacker {spec!r}; architectures: {', '.join(available_decoders())} "
            "(append '+id' for the identity loss)"
        )
    if plus and loss != "id":
        raise ConfigError(f"decoder attacker {spec!r}: only '+id' may follow the architecture")
    return DecoderAttacker(spec, arch, 1.0 if plus else 0.0)


def training_digest(pairs: FacePairs) -> str:
    """A digest of the photos a decoder is trained on (ids, in order, and the face size)."""
    digest = hashlib.sha256(f"{pairs.faces.shape[1:]}".encode())
    for photo_id in pairs.ids.tolist():
        digest.update(photo_id.encode() + b"\n")
    return digest.hexdigest()[:16]


def cache_key(
    encoder_fingerprint: str,
    train_digest: str,
    attacker: DecoderAttacker,
    *,
    image_size: int,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    extra: str = "",
) -> str:
    """File stem of a cached attacker: readable prefix plus a hash of everything that determines the weights."""
    blob = json.dumps(
        [
            encoder_fingerprint,
            train_digest,
            attacker.arch,
            attacker.id_weight,
            image_size,
            epochs,
            seed,
            batch_size,
            extra,
        ]
    )
    tag = attacker.name.replace("+", "-")
    return f"{tag}-{image_size}px-e{epochs}-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def train_or_load(
    attacker: DecoderAttacker,
    pairs: FacePairs,
    split: IdentitySplit,
    encoder: FaceEncoder,
    *,
    image_size: int,
    epochs: int,
    seed: int,
    cache_dir: Path,
    extra_key: str = "",
    dataset_name: str = "audit dataset",
    batch_size: int = 64,
    progress: bool = True,
    training_pairs: Callable[[], FacePairs] | None = None,
) -> tuple[InversionDecoder, dict, bool]:
    """The attacker's decoder trained on the ``attacker`` group of ``split`` in ``pairs``, from cache when there.
    ``training_pairs`` (e.g. the same photos with protected templates) is called only when the decoder must be
    trained, and its pairs are trained on instead; the cache key stays that of ``pairs`` plus ``extra_key``.

    Returns ``(decoder in eval mode, metadata, loaded_from_cache)``; the metadata's ``cache_key`` is the file stem.
    """
    train = pairs.of_identities(split.attacker)
    if len(train) == 0:
        raise ConfigError("the attacker group has no photos: the dataset needs more identities to train attackers")
    if attacker.id_weight > 0 and encoder.torch_module() is None:
        raise ConfigError(f"attacker {attacker.name}: encoder {encoder.name} has no differentiable module")
    key = cache_key(
        encoder.fingerprint,
        training_digest(train),
        attacker,
        image_size=image_size,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        extra=extra_key,
    )
    folder = cache_dir / "audit" / "decoders"
    ckpt = folder / f"{key}.pt"
    if ckpt.is_file():
        model, meta = load_decoder(ckpt)
        return model, {**meta, "cache_key": key}, True
    folder.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        arch=attacker.arch,
        image_size=image_size,
        epochs=epochs,
        seed=seed,
        id_weight=attacker.id_weight,
        batch_size=batch_size,
    )
    model, meta = train_on_group(
        pairs if training_pairs is None else training_pairs(),
        split,
        "attacker",
        encoder,
        config,
        out=ckpt,
        dataset_name=dataset_name,
        work_dir=folder / f"{key}.work",
        progress=progress,
    )
    return model.eval(), {**meta, "cache_key": key}, False
