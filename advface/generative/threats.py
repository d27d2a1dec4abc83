"""The personalisation threats that photo protection exists for, run on advface's own generator.

- :func:`generate_from_embeddings` -- *training-free* personalisation (IP-Adapter-FaceID / Arc2Face analogue): an
  identity embedding (of a photo, or a stolen template) in, new faces of that identity out;
- :func:`personalise` -- *training-based* personalisation from 3-5 photos of one person: the textual-inversion
  analogue learns an identity condition by minimising the generator's own denoising loss on their latents, with no
  face encoder involved; the DreamBooth analogue (:func:`finetune`) also fine-tunes the denoiser on them (the
  condition starting at the photos' mean embedding when the attacker has the encoder); then faces are generated
  (the two halves: :func:`learn_person`, :func:`sample_person`);
- :meth:`IdentityGenerator.purify` -- *diffusion purification* (DiffPure analogue), for photos before either threat.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from advface.encoders.base import FaceEncoder
from advface.errors import ConfigError
from advface.generative.config import FinetuneConfig, PersonaliseConfig
from advface.generative.denoiser import LatentDenoiser
from advface.generative.diffusion import v_loss
from advface.generative.model import IdentityGenerator

#: Faces sampled at once (under identity guidance each holds the encoder's activations for its gradient).
SAMPLE_BATCH = 32


def identity_guide(
    generator: IdentityGenerator, module: torch.nn.Module, targets: torch.Tensor, chip_size: int, metric: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reconstruction guidance towards identity embeddings: a loss on predicted clean latents, the distance of the
    decoded faces' embeddings (``module``: the encoder's differentiable module, fed the faces resized to its
    ``chip_size``) to ``targets`` (one per latent; ``metric`` ``cosine`` or ``euclidean``). The white-box attacker's
    tool: it holds the encoder."""
    import torch.nn.functional as F

    def guide(latents: torch.Tensor) -> torch.Tensor:
        images = generator.autoencoder.decode(latents)
        if images.shape[-1] != chip_size:
            images = F.interpolate(images, size=(chip_size, chip_size), mode="bilinear", align_corners=False)
        emb = module(images)
        if metric == "cosine":
            return 1 - F.cosine_similarity(emb, targets, dim=1)
        return (emb - targets).norm(dim=1)

    return guide


def generate_from_embeddings(
    generator: IdentityGenerator,
    embeddings: np.ndarray,
    n: int,
    *,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    encoder: FaceEncoder | None = None,
    guide_scale: float = 0.0,
    guide_targets: np.ndarray | None = None,
) -> np.ndarray:
    """Training-free: ``n`` faces per embedding (``len x n x S x S x 3`` uint8), seeded per batch of
    :data:`SAMPLE_BATCH` from ``seed`` (deterministic). With ``guide_scale`` > 0 every
    sampling step also pulls the predicted face towards its embedding through ``encoder``'s differentiable module
    (:func:`identity_guide`; ConfigError without one), or towards ``guide_targets`` (one per embedding: the encoder's
    embeddings when the conditions are not, e.g. a learned condition)."""
    module = None
    if guide_scale > 0:
        module = encoder.torch_module(str(generator.device)) if encoder is not None else None
        if encoder is None or module is None:
            raise ConfigError("identity guidance needs an encoder with a differentiable torch module")
    rows = np.repeat(np.asarray(embeddings, np.float32), n, axis=0)
    aims = rows if guide_targets is None else np.repeat(np.asarray(guide_targets, np.float32), n, axis=0)
    if len(aims) != len(rows):
        raise ConfigError(f"guide_targets: one per embedding, got {len(aims) // n} for {len(rows) // n}")
    faces = []
    for start in range(0, len(rows), SAMPLE_BATCH):  # seeded per batch; a guide's targets are its batch's rows
        batch = rows[start : start + SAMPLE_BATCH]
        guide = None
        if module is not None and encoder is not None:
            targets = torch.from_numpy(aims[start : start + SAMPLE_BATCH]).to(generator.device)
            guide = identity_guide(generator, module, targets, encoder.chip.size, str(encoder.metric))
        out = generator.generate(
            batch,
            1,
            steps=steps,
            guidance=guidance,
            seed=seed + start,
            guide=guide,
            guide_scale=guide_scale,
            batch_size=len(batch),
        )
        faces.append(out[:, 0])
    if not faces:
        return np.zeros((len(rows), n, generator.image_size, generator.image_size, 3), np.uint8)
    return np.concatenate(faces).reshape(len(embeddings), n, *faces[0].shape[1:])


def _fit(
    model: LatentDenoiser,
    latents: torch.Tensor,
    condition: torch.Tensor,
    optimiser: torch.optim.Optimizer,
    steps: int,
    batch: int,
    gen: torch.Generator,
) -> None:
    """``steps`` optimiser steps on the denoising loss of ``batch`` latents drawn from ``latents`` under
    ``condition`` (whatever ``optimiser`` holds is what learns)."""
    no_drop = torch.zeros(batch, dtype=torch.bool, device=latents.device)
    for _ in range(steps):
        rows = torch.randint(0, len(latents), (batch,), generator=gen, device=latents.device)
        loss = v_loss(model, latents[rows], condition.expand(batch, -1), no_drop, gen)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def learn_condition(
    generator: IdentityGenerator, faces: np.ndarray, config: PersonaliseConfig | None = None
) -> np.ndarray:
    """The identity condition (``dim`` float32) under which the generator best denoises ``faces`` (``N x S x S x
    3`` uint8 of one person, N >= 1): only the condition is optimised, the generator stays as it is."""
    c = config or PersonaliseConfig()
    if len(faces) < 1 or c.steps < 1:
        raise ConfigError("personalisation needs at least one photo and one step")
    latents = generator.encode(faces)
    gen = torch.Generator(device=generator.device).manual_seed(c.seed)
    condition = torch.randn(1, generator.dim, generator=gen, device=generator.device).requires_grad_(True)
    optimiser = torch.optim.Adam([condition], lr=c.lr)
    _fit(generator.denoiser, latents, condition, optimiser, c.steps, c.batch, gen)
    return condition.detach()[0].cpu().numpy().astype(np.float32)


def finetune(
    generator: IdentityGenerator,
    faces: np.ndarray,
    config: FinetuneConfig | None = None,
    *,
    embeddings: np.ndarray | None = None,
) -> tuple[IdentityGenerator, np.ndarray]:
    """A copy of ``generator`` fine-tuned on ``faces`` (``N x S x S x 3`` uint8 of one person) and the identity
    condition learned with it: ``(model, condition)``. ``embeddings`` (the photos' encoder embeddings, when the
    attacker has the encoder) start the condition at their mean; else it starts random. ``generator`` is unchanged."""
    import copy

    c = config or FinetuneConfig()
    if len(faces) < 1 or c.steps < 1:
        raise ConfigError("fine-tuning needs at least one photo and one step")
    tuned = copy.deepcopy(generator)
    model = tuned.denoiser.train().requires_grad_(True)
    mirrored = np.concatenate([faces, faces[:, :, ::-1]])
    latents = tuned.encode(mirrored)
    gen = torch.Generator(device=tuned.device).manual_seed(c.seed)
    if embeddings is not None:
        start = torch.from_numpy(tuned.check_embeddings(embeddings).mean(axis=0, keepdims=True)).to(tuned.device)
    else:
        start = torch.randn(1, tuned.dim, generator=gen, device=tuned.device)
    condition = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam(
        [{"params": list(model.parameters()), "lr": c.lr}, {"params": [condition], "lr": c.condition_lr}]
    )
    _fit(model, latents, condition, optimiser, c.steps, c.batch, gen)
    tuned.denoiser.eval().requires_grad_(False)
    return tuned, condition.detach()[0].cpu().numpy().astype(np.float32)


def learn_person(
    generator: IdentityGenerator,
    faces: np.ndarray,
    config: PersonaliseConfig | FinetuneConfig | None = None,
    *,
    embeddings: np.ndarray | None = None,
) -> tuple[IdentityGenerator, np.ndarray]:
    """The learning half of training-based personalisation: ``(model, condition)`` for ``faces`` (``N x S x S x 3``
    uint8 of one person). A :class:`PersonaliseConfig` (default) learns only the condition on ``generator`` itself
    (:func:`learn_condition`, textual-inversion analogue); a :class:`FinetuneConfig` also fine-tunes a copy of the
    denoiser (:func:`finetune`, DreamBooth analogue; ``embeddings`` start its condition)."""
    if isinstance(config, FinetuneConfig):
        return finetune(generator, faces, config, embeddings=embeddings)
    return generator, learn_condition(generator, faces, config)


def _require_guide_target(guide_scale: float, guide_target: np.ndarray | None) -> None:
    """ConfigError when identity guidance of the training-based threat is asked for without a target embedding."""
    if guide_scale > 0 and guide_target is None:
        raise ConfigError("identity guidance of the training-based threat needs a target embedding")


def sample_person(
    model: IdentityGenerator,
    condition: np.ndarray,
    n: int,
    *,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    encoder: FaceEncoder | None = None,
    guide_scale: float = 0.0,
    guide_target: np.ndarray | None = None,
) -> np.ndarray:
    """The sampling half: ``n`` faces (``n x S x S x 3`` uint8) of a learned ``condition`` at classifier-free
    guidance ``guidance``. With ``guide_scale`` > 0 every sampling step is also pulled towards ``guide_target``
    (e.g. the photos' mean embedding) through ``encoder``'s gradient, as :func:`generate_from_embeddings` does
    (ConfigError without a target or a differentiable encoder). Sampling is cheap next to learning: an attacker can
    sample one learned person at several scales."""
    _require_guide_target(guide_scale, guide_target)
    if guide_scale <= 0:
        return model.generate(condition[None], n, steps=steps, guidance=guidance, seed=seed)[0]
    target = np.asarray(guide_target, np.float32).reshape(1, -1)
    return generate_from_embeddings(
        model,
        condition[None],
        n,
        steps=steps,
        guidance=guidance,
        seed=seed,
        encoder=encoder,
        guide_scale=guide_scale,
        guide_targets=target,
    )[0]


def personalise(
    generator: IdentityGenerator,
    faces: np.ndarray,
    n: int,
    *,
    config: PersonaliseConfig | FinetuneConfig | None = None,
    embeddings: np.ndarray | None = None,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    encoder: FaceEncoder | None = None,
    guide_scale: float = 0.0,
    guide_target: np.ndarray | None = None,
) -> np.ndarray:
    """Training-based: learn the person from ``faces`` (:func:`learn_person`), then generate ``n`` faces of it
    (:func:`sample_person`; ``n x S x S x 3`` uint8). With ``guide_scale`` > 0 sampling is also pulled towards
    ``guide_target`` through ``encoder``'s gradient: the attacker who has the encoder uses both levers (ConfigError,
    before any learning, without a target)."""
    _require_guide_target(guide_scale, guide_target)
    model, condition = learn_person(generator, faces, config, embeddings=embeddings)
    return sample_person(
        model,
        condition,
        n,
        steps=steps,
        guidance=guidance,
        seed=seed,
        encoder=encoder,
        guide_scale=guide_scale,
        guide_target=guide_target,
    )
