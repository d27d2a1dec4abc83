"""The ``diffusion`` attacker: advface's identity-conditioned face generator (:mod:`advface.generative`) trained on the
attacker group's (face, embedding) pairs, or a given checkpoint (``--generator``); the reconstruction of a stolen
template is the generator's sample conditioned on it (one seeded sample per template), optionally with
reconstruction guidance by the system encoder's differentiable module on the decoded face
(``--diffusion-guidance``). A given checkpoint must be of the audited encoder and trained on an attacker group that
holds none of the audited people (:func:`check_training_identities`).

Trained generators are cached under ``<cache>/audit/generators/<key>.pt``, the key hashing the encoder fingerprint,
the training photos (the split), the training configuration and the seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from advface.datasets.pairs import FacePairs, resize_faces
from advface.datasets.splits import GROUPS, IdentitySplit, identities_digest, split_identities
from advface.encoders.base import FaceEncoder
from advface.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from advface.generative.config import GeneratorTrainConfig
    from advface.generative.model import IdentityGenerator

#: DDIM steps and classifier-free guidance of the attacker's samples (the generator's defaults).
SAMPLE_STEPS, CFG_SCALE = 25, 3.0
#: DDIM steps in quick mode.
QUICK_SAMPLE_STEPS = 10


def diffusion_train_config(image_size: int, seed: int, quick: bool) -> GeneratorTrainConfig:
    """The generator's training settings for an audit: the library defaults (at the audit's image size, rounded to
    a multiple of 16 for the denoiser's three resolutions), or in quick mode a tiny model trained a few hundred
    steps."""
    from advface.generative.config import GeneratorTrainConfig

    size = max(16, image_size // 16 * 16)
    if not quick:
        return GeneratorTrainConfig(image_size=size, seed=seed)
    return GeneratorTrainConfig(
        image_size=size,
        ae_width=16,
        ae_steps=150,
        ae_batch=16,
        width=16,
        multipliers=(1, 2, 4),
        steps=300,
        batch=32,
        warmup=30,
        ema_decay=0.99,
        seed=seed,
        checkpoint_minutes=60.0,
    )


def generator_key(encoder_fingerprint: str, train_digest: str, config: GeneratorTrainConfig) -> str:
    """File stem of a cached generator: readable prefix plus a hash of everything that determines the weights."""
    blob = json.dumps([encoder_fingerprint, train_digest, config.identity()], sort_keys=True, default=str)
    return f"diffusion-{config.image_size}px-s{config.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def train_or_load_generator(
    pairs: FacePairs,
    split: IdentitySplit,
    encoder: FaceEncoder,
    config: GeneratorTrainConfig,
    *,
    cache_dir: Path,
    progress: bool = True,
) -> tuple[IdentityGenerator, bool]:
    """The generator trained on the ``attacker`` group of ``split`` in ``pairs`` (mirrors included), from cache when
    there; returns ``(generator, loaded_from_cache)``."""
    from advface.audit.attacks.decoder import training_digest
    from advface.generative.model import load_generator, save_generator
    from advface.generative.training import GeneratorTrainer, TrainingData

    train = pairs.of_identities(split.attacker)
    if len(train) == 0:
        raise ConfigError("the attacker group has no photos: the dataset needs more identities to train attackers")
    key = generator_key(encoder.fingerprint, training_digest(train), config)
    folder = cache_dir / "audit" / "generators"
    ckpt = folder / f"{key}.pt"
    if ckpt.is_file():
        return load_generator(ckpt, encoder_fingerprint=encoder.fingerprint), True
    folder.mkdir(parents=True, exist_ok=True)
    data = TrainingData(
        resize_faces(train.faces, config.image_size),
        train.embeddings,
        {
            "dataset": "audit dataset",
            "group": "attacker",
            "photos": int((~train.flipped).sum()),
            "identities": len(set(train.identities.tolist())),
            "encoder": encoder.name,
        },
    )
    metadata = {"role": "attacker", "encoder": encoder.name, "encoder_fingerprint": encoder.fingerprint}
    trainer = GeneratorTrainer(config, data, folder / f"{key}.work", metadata, progress=progress)
    generator = trainer.run()
    save_generator(ckpt, generator)
    return generator, False


def load_given_generator(path: Path, encoder: FaceEncoder, pairs: FacePairs, split: IdentitySplit) -> IdentityGenerator:
    """The checkpoint given with ``--generator``: ConfigError when it was trained on another encoder's embeddings
    (or has no encoder fingerprint to check), or on people who may be among the audited ones
    (:func:`check_training_identities` against the audit's ``pairs`` and ``split``)."""
    from advface.generative.model import load_generator

    generator = load_generator(path, encoder_fingerprint=encoder.fingerprint)
    if generator.metadata.get("encoder_fingerprint") is None:
        raise ConfigError(f"{path}: the generator checkpoint does not say which encoder it was trained for")
    if generator.dim != encoder.dim:
        raise ConfigError(f"{path}: the generator takes {generator.dim}-d embeddings, the encoder gives {encoder.dim}")
    check_training_identities(generator.metadata, pairs, split, source=str(path))
    return generator


def check_training_identities(
    metadata: Mapping[str, Any], pairs: FacePairs, split: IdentitySplit, *, source: str = "--generator"
) -> frozenset[str]:
    """The identities a given generator was trained on, rebuilt from its checkpoint metadata: ``training_data`` must
    name the ``attacker`` group of :func:`advface.datasets.splits.split_identities` and its split seed
    (``advface train-generator`` records both); the split is recomputed on the audit's dataset (``pairs``) and must
    have the recorded group sizes (else the model was trained on another dataset or subset and the audit cannot
    check it), and, where the checkpoint records it, the digest of its training identities must be the rebuilt
    group's. ConfigError when any of these is missing or differs, or when the rebuilt group holds any of the
    audited people (``split.evaluation``): an attacker model must never have seen the people under audit."""
    data = metadata.get("training_data")
    group = data.get("group") if isinstance(data, dict) else None
    if not isinstance(data, dict) or group is None:
        raise ConfigError(
            f"{source}: the generator checkpoint does not say which identities it was trained on "
            "(no training_data.group); train it with `advface train-generator --group attacker`"
        )
    if group != "attacker":
        raise ConfigError(
            f"{source}: the generator was trained on the {group} group; the audit's diffusion attacker must be "
            "trained on the attacker group (`advface train-generator --group attacker`)"
        )
    seed, recorded = data.get("split_seed"), data.get("split")
    if not isinstance(seed, int) or not isinstance(recorded, dict):
        raise ConfigError(
            f"{source}: the generator checkpoint does not record its identity split (training_data.split_seed and "
            "training_data.split), so the audit cannot check that it never saw the audited people"
        )
    names = pairs.identities[~pairs.flipped].tolist()
    fraction = data.get("eval_fraction")  # not recorded by train-generator: the split function's own default
    rebuilt = (
        split_identities(names, seed=seed)
        if fraction is None
        else split_identities(names, seed=seed, eval_fraction=float(fraction))
    )
    sizes = {name: len(rebuilt.group(name)) for name in GROUPS}
    wanted = {name: recorded.get(name) for name in GROUPS}
    if sizes != wanted:
        raise ConfigError(
            f"{source}: the generator's recorded split (seed {seed}; defender / attacker / evaluation = "
            f"{' / '.join(str(wanted[g]) for g in GROUPS)} identities) is not that split of this audit's dataset "
            f"({' / '.join(str(sizes[g]) for g in GROUPS)}): it was trained on another dataset or subset (e.g. "
            "--max-identities, --quick), so the audit cannot check that it never saw the audited people"
        )
    recorded_digest = data.get("identities_sha256")  # recorded since 2026-12-05; older checkpoints lack it
    if recorded_digest is not None and recorded_digest != identities_digest(rebuilt.attacker):
        raise ConfigError(
            f"{source}: the generator's recorded training identities are not the attacker group of split seed {seed} "
            "on this audit's dataset (same group sizes, other people): the audit cannot check that it never saw the "
            "audited people"
        )
    overlap = sorted(rebuilt.attacker & split.evaluation)
    if overlap:
        raise ConfigError(
            f"{source}: the generator was trained on the attacker group of split seed {seed}, which holds "
            f"{len(overlap)} of the {len(split.evaluation)} audited people (e.g. {', '.join(overlap[:3])}); an "
            f"attacker model must never have seen the people under audit (audit with --seed {seed} and the same "
            "split, or train a generator on this audit's attacker group)"
        )
    return rebuilt.attacker


def reconstruct_templates(
    generator: IdentityGenerator,
    templates: np.ndarray,
    *,
    seed: int,
    steps: int = SAMPLE_STEPS,
    guidance: float = CFG_SCALE,
    guide_scale: float = 0.0,
    encoder: FaceEncoder | None = None,
) -> np.ndarray:
    """One sample per template (``N x S x S x 3`` uint8; :func:`advface.generative.threats.generate_from_embeddings`,
    deterministic for ``seed``); with ``guide_scale`` > 0 each DDIM step's predicted face is pulled towards the
    template by ``encoder``'s differentiable module (ConfigError without one: ``--diffusion-guidance``)."""
    from advface.generative.threats import generate_from_embeddings

    try:
        faces = generate_from_embeddings(
            generator, templates, 1, steps=steps, guidance=guidance, seed=seed, encoder=encoder, guide_scale=guide_scale
        )
    except ConfigError as exc:
        raise ConfigError(f"--diffusion-guidance: {exc}") from None
    return faces[:, 0]
