"""Continuous-time diffusion on latents: the cosine schedule, the v-prediction loss, DDIM sampling with
classifier-free guidance, and optional guidance of the predicted clean latent by any differentiable loss.

Notation: ``x_t = alpha(t) x_0 + sigma(t) eps`` with ``alpha = cos(pi/2 * f(t))``, ``sigma = sin(pi/2 * f(t))``,
``f(t) = (t + s) / (1 + s)`` (s = 0.008, Nichol & Dhariwal's offset), t in [0, 1]; the denoiser predicts
``v = alpha eps - sigma x_0``, from which ``x_0 = alpha x_t - sigma v`` and ``eps = sigma x_t + alpha v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from advface.generative.denoiser import LatentDenoiser

_OFFSET = 0.008
#: Smallest and largest training time (keeps alpha and sigma away from exactly 0).
T_MIN, T_MAX = 1e-4, 1.0 - 1e-4


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha(t), sigma(t))`` of the cosine schedule."""
    angle = (t + _OFFSET) / (1 + _OFFSET) * (math.pi / 2)
    return torch.cos(angle), torch.sin(angle)


def _col(x: torch.Tensor) -> torch.Tensor:
    return x[:, None, None, None]


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t`` for clean latents ``x0``, times ``t`` (``N``) and Gaussian ``noise``."""
    alpha, sigma = alpha_sigma(t)
    return _col(alpha) * x0 + _col(sigma) * noise


def v_loss(
    model: LatentDenoiser, x0: torch.Tensor, embeddings: torch.Tensor, drop: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The training loss: mean squared error of the v-prediction at uniformly drawn times, with the min-SNR-5
    weighting (Hang et al. 2023) that keeps high-noise steps from dominating."""
    n = len(x0)
    t = torch.rand(n, generator=generator, device=x0.device) * (T_MAX - T_MIN) + T_MIN
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    alpha, sigma = alpha_sigma(t)
    xt = _col(alpha) * x0 + _col(sigma) * noise
    target = _col(alpha) * noise - _col(sigma) * x0
    pred = model(xt, t, embeddings, drop)
    snr = (alpha / sigma).pow(2)
    weight = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR for v-prediction
    return (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()


def guided_v(
    model: LatentDenoiser, x: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, guidance: float
) -> torch.Tensor:
    """The classifier-free-guided v-prediction: ``v_uncond + guidance * (v_cond - v_uncond)`` (one batched call;
    ``guidance`` 1 is the plain conditional prediction, 0 the unconditional one)."""
    n = len(x)
    if guidance == 1.0:
        return model(x, t, embeddings)
    if guidance == 0.0:
        return model(x, t, embeddings, torch.ones(n, dtype=torch.bool, device=x.device))
    drop = torch.cat(
        [torch.zeros(n, dtype=torch.bool, device=x.device), torch.ones(n, dtype=torch.bool, device=x.device)]
    )
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([embeddings, embeddings]), drop)
    cond, uncond = both[:n], both[n:]
    return uncond + guidance * (cond - uncond)


#: ``loss(x0_latents) -> per-row losses``: a differentiable loss on the predicted clean latents (e.g. the distance
#: between the encoder's embedding of the decoded face and a template) whose gradient steers sampling.
LatentGuide = Callable[[torch.Tensor], torch.Tensor]


def ddim_sample(
    model: LatentDenoiser,
    embeddings: torch.Tensor,
    shape: tuple[int, int, int],
    *,
    steps: int = 25,
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    t_start: float = 1.0,
    guide: LatentGuide | None = None,
    guide_scale: float = 0.0,
) -> torch.Tensor:
    """Deterministic DDIM sampling of ``len(embeddings)`` latents of ``shape`` in ``steps`` steps from ``t_start``
    to 0, with classifier-free ``guidance``. ``start``: the latents at ``t_start`` (default: Gaussian noise).
    ``guide`` / ``guide_scale``: at each step the predicted clean latent ``x0`` is moved by ``-guide_scale`` times
    the normalised gradient of ``guide(x0)`` (reconstruction guidance on the predicted clean image)."""
    device = embeddings.device
    n = len(embeddings)
    if start is None:
        start = torch.randn((n, *shape), generator=generator, device=device)
    x = start
    times = torch.linspace(t_start, 0.0, steps + 1, device=device)
    for i in range(steps):
        t, t_next = times[i].expand(n), times[i + 1].expand(n)
        alpha, sigma = alpha_sigma(t)
        with torch.no_grad():
            v = guided_v(model, x, t, embeddings, guidance)
        x0 = _col(alpha) * x - _col(sigma) * v
        eps = _col(sigma) * x + _col(alpha) * v
        if guide is not None and guide_scale > 0:
            x0 = _guided_x0(x0, guide, guide_scale)
        a_next, s_next = alpha_sigma(t_next) if i < steps - 1 else (torch.ones_like(t), torch.zeros_like(t))
        x = _col(a_next) * x0 + _col(s_next) * eps
    return x


def _guided_x0(x0: torch.Tensor, guide: LatentGuide, scale: float) -> torch.Tensor:
    with torch.enable_grad():
        probe = x0.detach().requires_grad_(True)
        loss = guide(probe).sum()
        (grad,) = torch.autograd.grad(loss, probe)
    norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return (x0 - scale * grad / _col(norm) * math.sqrt(x0[0].numel())).detach()


def purify(
    model: LatentDenoiser,
    latents: torch.Tensor,
    t_star: float,
    *,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DiffPure on latents: noise to ``t_star`` in (0, 1], then denoise back to 0 without an identity condition."""
    n = len(latents)
    t = torch.full((n,), float(t_star), device=latents.device)
    noisy = add_noise(latents, t, torch.randn(latents.shape, generator=generator, device=latents.device))
    null = torch.zeros((n, model.config.cond_dim), device=latents.device)
    c, h, w = latents.shape[1:]
    return ddim_sample(model, null, (c, h, w), steps=steps, guidance=0.0, start=noisy, t_start=float(t_star))
