"""The latent denoiser: a small UNet over ``C x L x L`` latents, conditioned on the timestep and an identity embedding.

Conditioning: the identity embedding is L2-normalised (the encoders' scale differs; direction is the identity), mapped
by an MLP and added to the sinusoidal timestep embedding; every residual block applies the sum as a per-channel scale
and shift (FiLM). The embedding also becomes ``tokens`` key/value tokens for cross-attention at the two coarsest
resolutions, so spatial features can look up identity detail. For classifier-free guidance a learned "no identity"
embedding replaces the condition where ``drop`` is true (training: at random; sampling: the unconditional pass).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from advface.generative.autoencoder import norm_groups
from advface.generative.config import DenoiserConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps in [0, 1] (``N`` -> ``N x dim``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class FiLMBlock(nn.Module):
    """Residual block whose normalised activations are scaled and shifted by the conditioning vector."""

    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(norm_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)  # type: ignore[arg-type]  # Conv2d makes a bias by default

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x`` plus the conditioned residual."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class CrossAttention(nn.Module):
    """Self-attention over the feature map plus the identity tokens (one attention, joint keys)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.heads = heads
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``x`` (``N x C x H x W``) attending to itself and ``tokens`` (``N x T x C``)."""
        n, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # N x HW x C
        context = torch.cat([seq, tokens], dim=1)
        q = self.q(seq).view(n, h * w, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(n, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, c)
        return x + self.out(attended).transpose(1, 2).view(n, c, h, w)


class Level(nn.Module):
    """One resolution of the UNet: two conditioned residual blocks, optional cross-attention, then a resampling."""

    def __init__(self, cin: int, cout: int, emb: int, attention: bool, heads: int, resample: nn.Module) -> None:
        super().__init__()
        self.block1 = FiLMBlock(cin, cout, emb)
        self.block2 = FiLMBlock(cout, cout, emb)
        self.attn = CrossAttention(cout, heads) if attention else None
        self.resample = resample

    def forward(self, h: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features before resampling, after resampling)``."""
        h = self.block2(self.block1(h, emb), emb)
        if self.attn is not None:
            h = self.attn(h, tokens)
        return h, self.resample(h)


class LatentDenoiser(nn.Module):
    """``(noisy latents, t in [0, 1], identity embeddings, drop mask) -> v-prediction`` (same shape as the latents).
    Cross-attention to the identity tokens at the two coarsest resolutions and in the middle."""

    def __init__(self, config: DenoiserConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or DenoiserConfig()
        if c.latent_size % (2 ** (len(c.multipliers) - 1)):
            raise ValueError(f"latent_size {c.latent_size} is not divisible by 2^{len(c.multipliers) - 1}")
        widths = [c.width * m for m in c.multipliers]
        last = len(widths) - 1
        emb = 4 * c.width
        self.time_mlp = nn.Sequential(nn.Linear(c.width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.cond_mlp = nn.Sequential(nn.Linear(c.cond_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.null_cond = nn.Parameter(torch.zeros(c.cond_dim))
        self.token_proj = nn.ModuleList([nn.Linear(c.cond_dim, c.tokens * w) for w in widths])
        self.stem = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        cin = widths[0]
        down = []
        for i, w in enumerate(widths):
            resample: nn.Module = nn.Conv2d(w, w, 3, stride=2, padding=1) if i < last else nn.Identity()
            down.append(Level(cin, w, emb, i >= last - 1, c.heads, resample))
            cin = w
        self.down = nn.ModuleList(down)
        self.mid1, self.mid2 = FiLMBlock(cin, cin, emb), FiLMBlock(cin, cin, emb)
        self.mid_attn = CrossAttention(cin, c.heads)
        up = []
        for i, w in reversed(list(enumerate(widths))):
            resample = nn.Upsample(scale_factor=2, mode="nearest") if i > 0 else nn.Identity()
            up.append(Level(cin + w, w, emb, i >= last - 1, c.heads, resample))
            cin = w
        self.up = nn.ModuleList(up)
        self.head_norm = nn.GroupNorm(norm_groups(cin), cin)
        self.head = nn.Conv2d(cin, c.latent_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # type: ignore[arg-type]  # Conv2d makes a bias by default

    def condition(self, embeddings: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning input: unit-norm embeddings scaled by sqrt(dim), the null embedding where ``drop``."""
        cond = F.normalize(embeddings.float(), dim=1) * math.sqrt(embeddings.shape[1])
        if drop is not None:
            cond = torch.where(drop[:, None], self.null_cond[None].expand_as(cond), cond)
        return cond

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The v-prediction for noisy latents ``x`` at times ``t`` (``N``, in [0, 1])."""
        c = self.config
        cond = self.condition(embeddings, drop)
        emb = self.time_mlp(timestep_embedding(t, c.width)) + self.cond_mlp(cond)
        tokens = [proj(cond).view(len(x), c.tokens, -1) for proj in self.token_proj]
        h = self.stem(x)
        skips = []
        for level, down in enumerate(self.down):
            skip, h = down(h, emb, tokens[level])
            skips.append(skip)
        h = self.mid_attn(self.mid2(self.mid1(h, emb), emb), tokens[-1])
        for j, up in enumerate(self.up):
            level = len(self.down) - 1 - j
            _, h = up(torch.cat([h, skips[level]], dim=1), emb, tokens[level])
        return self.head(F.silu(self.head_norm(h)))
