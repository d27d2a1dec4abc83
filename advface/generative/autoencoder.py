"""The face autoencoder of the latent diffusion model: ``S x S x 3`` face chips <-> ``(S/4) x (S/4) x C`` latents.

A small convolutional encoder/decoder (two stride-2 stages, residual blocks at the two lower resolutions, GroupNorm,
SiLU; no residual block at full resolution, where convolutions cost the most on a CPU). The latent is
deterministic; a scale factor (set after training from the latents' standard deviation) brings it to unit variance
for the denoiser. Training loss: L1 on pixels plus an L1 term on image gradients (edges), and a light L2 pull of the
latent towards zero that keeps its scale bounded. No face encoder's features are used: the encoders are the judges
of what the generator makes and must stay untouched by its training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advface.generative.config import AutoencoderConfig


def norm_groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: up to 32 groups of at least 8 channels."""
    return min(32, max(1, channels // 8))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip connection (1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the block's residual."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class FaceAutoencoder(nn.Module):
    """Faces (``N x 3 x S x S`` in [0, 1]) <-> latents (``N x C x S/4 x S/4``, about unit variance after
    :attr:`scale` is set)."""

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or AutoencoderConfig()
        c = self.config
        if c.image_size % 4 or c.image_size < 16:
            raise ValueError(f"autoencoder image_size must be a multiple of 4 and >= 16, got {c.image_size}")
        w = c.width  # channels at full resolution; 2w at 1/2, 3w at 1/4
        enc: list[nn.Module] = [nn.Conv2d(3, w, 3, padding=1), nn.SiLU()]
        enc += [nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)]
        enc += [ResBlock(2 * w, 2 * w) for _ in range(c.blocks)]
        enc += [nn.Conv2d(2 * w, 3 * w, 3, stride=2, padding=1)]
        enc += [ResBlock(3 * w, 3 * w) for _ in range(c.blocks + 1)]
        enc += [nn.GroupNorm(norm_groups(3 * w), 3 * w), nn.SiLU(), nn.Conv2d(3 * w, c.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(c.latent_channels, 3 * w, 3, padding=1)]
        dec += [ResBlock(3 * w, 3 * w) for _ in range(c.blocks + 1)]
        dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(3 * w, 2 * w, 3, padding=1)]
        dec += [ResBlock(2 * w, 2 * w) for _ in range(c.blocks)]
        dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * w, w, 3, padding=1)]
        dec += [nn.GroupNorm(norm_groups(w), w), nn.SiLU(), nn.Conv2d(w, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        #: multiplies raw latents to about unit variance (1 until :meth:`calibrate` is called)
        self.register_buffer("scale", torch.ones(()))

    scale: torch.Tensor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of ``images`` (``N x 3 x S x S`` in [0, 1])."""
        return self.encoder(images * 2 - 1) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of scaled ``latents`` (clamped)."""
        return (self.decode_raw(latents) + 1).mul(0.5).clamp(0, 1)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder's unclamped output in about [-1, 1] (what the training loss sees)."""
        return self.decoder(latents / self.scale)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction in [-1, 1] unclamped, scaled latents)``."""
        latents = self.encode(images)
        return self.decode_raw(latents), latents

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> float:
        """Set :attr:`scale` so that the latents of ``images`` have unit standard deviation; returns it."""
        self.scale.fill_(1.0)
        std = float(self.encode(images).std())
        self.scale.fill_(1.0 / max(std, 1e-6))
        return float(self.scale)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical finite differences of ``N x C x H x W`` images."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def autoencoder_loss(
    reconstruction: torch.Tensor,
    images: torch.Tensor,
    latents: torch.Tensor,
    edge_weight: float = 0.5,
    latent_weight: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of the autoencoder: pixel L1 + ``edge_weight`` x L1 of image gradients + ``latent_weight`` x
    mean squared latent; ``reconstruction`` in [-1, 1], ``images`` in [0, 1]. Returns the loss and its parts."""
    target = images * 2 - 1
    pixel = (reconstruction - target).abs().mean()
    (rx, ry), (tx, ty) = image_gradients(reconstruction), image_gradients(target)
    edges = (rx - tx).abs().mean() + (ry - ty).abs().mean()
    latent = latents.pow(2).mean()
    loss = pixel + edge_weight * edges + latent_weight * latent
    return loss, {"l1": pixel.item(), "edges": edges.item(), "latent_sq": latent.item()}
