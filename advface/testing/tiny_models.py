"""Tiny, untrained models for plumbing tests of the protection methods (never for real protection).

:func:`tiny_shadow_files` writes a few small decoders of different architectures as ``advface.inversion``
checkpoints, so tests of ``advface-id`` (sidecar, re-encoding) run in seconds; :class:`TinyEncoder` is a small
differentiable stand-in for a face encoder's torch module (images -> templates).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


class TinyEncoder(nn.Module):
    """A small differentiable 'encoder': conv + pooling + linear, ``N x 3 x H x W`` images -> ``N x dim``
    templates; its weights depend only on ``seed``."""

    def __init__(self, dim: int, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Templates of the images ``x``."""
        return self.net(x)


def tiny_shadow_files(
    folder: Path,
    dim: int,
    archs: Sequence[str] = ("deconv", "resup"),
    *,
    image_size: int = 16,
    encoder: str = "dlib-torch",
    encoder_fingerprint: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write one small untrained decoder per architecture in ``archs`` (``dim``-d templates -> ``image_size``
    pixels) to ``folder/shadow_<i>_<arch>.pt``; returns the paths."""
    from advface.inversion import build_decoder, save_decoder

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arch in enumerate(archs):
        torch.manual_seed(seed + i)
        model = build_decoder(arch, dim, image_size, width=0.05, hidden=0)
        metadata = {"encoder": encoder, "role": "shadow", "note": "tiny untrained test shadow"}
        if encoder_fingerprint is not None:
            metadata["encoder_fingerprint"] = encoder_fingerprint
        paths.append(save_decoder(folder / f"shadow_{i}_{arch}.pt", model, metadata))
    return paths
