"""The personalisation threats that photo protection exists for, run on advface's own generator.

- :func:`generate_from_embeddings` -- *training-free* personalisation (IP-Adapter-FaceID / Arc2Face analogue): an
  identity embedding (of a photo, or a stolen template) in, new faces of that identity out;
- :func:`personalise` -- *training-based* personalisation (textual-inversion analogue): an identity condition is
  learned from 3-5 photos of one person by minimising the generator's own denoising loss on their latents, with no
  face encoder involved; then faces are generated from it;
- :meth:`IdentityGenerator.purify` -- *diffusion purification* (DiffPure analogue), for photos before either threat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from advface.errors import ConfigError
from advface.generative.diffusion import v_loss
from advface.generative.model import IdentityGenerator


def generate_from_embeddings(
    generator: IdentityGenerator,
    embeddings: np.ndarray,
    n: int,
    *,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
) -> np.ndarray:
    """Training-free: ``n`` faces per embedding (``len x n x S x S x 3`` uint8)."""
    return generator.generate(embeddings, n, steps=steps, guidance=guidance, seed=seed)


@dataclass(frozen=True)
class PersonaliseConfig:
    """Learning an identity condition from a few photos: Adam ``steps`` at learning rate ``lr``, ``batch`` noisy
    copies of the photos' latents per step, ``seed`` of the draws and of the initial condition."""

    steps: int = 200
    lr: float = 0.05
    batch: int = 16
    seed: int = 0


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
    model = generator.denoiser
    no_drop = torch.zeros(c.batch, dtype=torch.bool, device=generator.device)
    for _ in range(c.steps):
        rows = torch.randint(0, len(latents), (c.batch,), generator=gen, device=generator.device)
        loss = v_loss(model, latents[rows], condition.expand(c.batch, -1), no_drop, gen)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return condition.detach()[0].cpu().numpy().astype(np.float32)


def personalise(
    generator: IdentityGenerator,
    faces: np.ndarray,
    n: int,
    *,
    config: PersonaliseConfig | None = None,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
) -> np.ndarray:
    """Training-based: learn the person's condition from ``faces`` (:func:`learn_condition`), then generate ``n``
    faces of it (``n x S x S x 3`` uint8)."""
    condition = learn_condition(generator, faces, config)
    return generator.generate(condition[None], n, steps=steps, guidance=guidance, seed=seed)[0]
