"""Guidance terms of image protection beyond the face encoders: the diffusion stages, built on a generator.

:class:`DeflectionTerm` is IDGuardian's second stage, *guided-flow identity deflection* (``docs/diffusion-stages.md``),
on advface's own identity-conditioned generator (the *defender surrogate*). At each step, for every photo:

- the face chip of the perturbed photo is cut out in the generator's frame (the conditioning encoder's chip, resized
  to the generator's size) and encoded to a latent ``z``;
- ``z`` is noised to a random time ``t`` (``x_t``), and the surrogate predicts the noise twice: conditioned on the
  identity of the *perturbed* photo (``y_adv``, the conditioning encoder's embedding of it) and of the *clean* one
  (``y_clean``). Their difference is the direction the identity condition adds to the score,
  ``S* = -(eps(x_t, t, y_adv) - eps(x_t, t, y_clean)) / sigma_t`` (the *adversarial conceptual bridge*);
- the term's loss is ``-<z, S*>``: descending it moves the photo's latent along ``S*``, towards what the surrogate
  would draw for the perturbed identity and away from the clean one. IDGuardian subtracts an upsampled ``S*`` in
  pixel space; here the same direction is pulled back to pixels through the autoencoder's encoder (a
  vector-Jacobian product), which needs no channel alignment.

The identity the bridge leads to is the one the encoder terms (stage 1) push the photo to, so the stages are meant to
run together; alone, ``y_adv`` stays near ``y_clean`` and the bridge is short (the ablation measures this).

Personalisation learns an identity from the photo's latents (training-based) or from its embedding (training-free):
deflecting the latents targets the first, the encoder terms the second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from advface.errors import ConfigError
from advface.generative.diffusion import add_noise, alpha_sigma
from advface.protect.image.antipure import ANTIPURE
from advface.protect.image.surrogate_term import SurrogateTerm

#: Names accepted by ``--guidance`` (``ProtectConfig.guidance``): the face-encoder terms (stage 1) and the terms that
#: need the defender surrogate (IDGuardian's deflection, stage 2; AntiPure, :mod:`advface.protect.image.antipure`).
ENCODERS, DEFLECTION = "encoders", "deflection"
GUIDANCE_NAMES: tuple[str, ...] = (ENCODERS, DEFLECTION, ANTIPURE)
#: Guidance terms that need a generator (the defender surrogate).
NEEDS_SURROGATE: frozenset[str] = frozenset({DEFLECTION, ANTIPURE})


def parse_guidance(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"encoders,deflection"`` or a sequence of names -> a tuple of known names in canonical order;
    ConfigError for an unknown or empty selection."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    unknown = sorted(set(names) - set(GUIDANCE_NAMES))
    if unknown:
        raise ConfigError(f"unknown guidance {', '.join(unknown)}; choose from {', '.join(GUIDANCE_NAMES)}")
    if not names:
        raise ConfigError(f"guidance needs at least one of {', '.join(GUIDANCE_NAMES)}")
    return tuple(n for n in GUIDANCE_NAMES if n in names)


@dataclass
class DeflectionTerm(SurrogateTerm):
    """IDGuardian's guided-flow identity deflection on a generator (see the module docs); times are drawn uniformly
    from ``t_range``."""

    t_range: tuple[float, float] = (0.2, 0.8)
    name: str = DEFLECTION

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = self.t_range
        if not 0 < lo <= hi < 1:
            raise ConfigError(f"deflection times must satisfy 0 < low <= high < 1, got {self.t_range}")

    def loss(self, adv: torch.Tensor, thetas: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Per-photo losses (``N``) on the perturbed photos ``adv``; lower = latents further along the bridge."""
        clean = self.clean_embeddings(len(adv))
        chips, small = self.chips(adv, thetas)
        z = self.generator.autoencoder.encode(small)
        t, noise = self.draw(generators, z.shape[1:], self.t_range, adv.device)
        with torch.no_grad():
            y_adv = self.module(chips)
            x_t = add_noise(z.detach(), t, noise)
            both = self.generator.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y_adv, clean]))
            v_adv, v_clean = both[: len(adv)], both[len(adv) :]
            alpha, sigma = alpha_sigma(t)
            # eps = sigma x_t + alpha v, so the noise difference at one x_t is alpha (v_adv - v_clean)
            bridge = -(alpha / sigma)[:, None, None, None] * (v_adv - v_clean)
        return -(z * bridge).flatten(1).sum(dim=1)

    def losses(
        self, adv: torch.Tensor, thetas: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> list[tuple[torch.Tensor, float]]:
        """``[(per-photo loss, 1.0)]``: :meth:`loss` in the form every surrogate term shares."""
        return [(self.loss(adv, thetas, generators), 1.0)]
