"""What every guidance term on the defender surrogate shares (:class:`SurrogateTerm`): the generator, its
conditioning encoder's differentiable module and chip, the photos' chips in the generator's frame, the clean
photos' identity embeddings, and the per-photo draws of a diffusion time and noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advface.encoders.base import ChipSpec
from advface.generative.model import IdentityGenerator
from advface.protect.image.warp import warp_chips


@dataclass
class SurrogateTerm:
    """Base of the surrogate's guidance terms: ``module`` is the conditioning encoder's differentiable module and
    ``chip`` its chip (the frame the generator's training faces were cut in)."""

    generator: IdentityGenerator
    module: torch.nn.Module
    chip: ChipSpec

    def __post_init__(self) -> None:
        self._clean: torch.Tensor | None = None

    def chips(self, images: torch.Tensor, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder chips, generator-size chips) of ``images`` under ``thetas`` (the encoder's chip frame)."""
        chips = warp_chips(images, thetas, self.chip.size)
        size = self.generator.image_size
        small = chips if size == self.chip.size else F.interpolate(chips, size=(size, size), mode="area")
        return chips, small

    @torch.no_grad()
    def prepare(self, clean: torch.Tensor, thetas: torch.Tensor) -> None:
        """Remember the clean photos' identity embeddings (``clean``: ``N x 3 x H x W`` in [0, 1])."""
        self._clean = self.module(warp_chips(clean, thetas, self.chip.size)).detach()

    def clean_embeddings(self, n: int) -> torch.Tensor:
        """The embeddings :meth:`prepare` kept for a batch of ``n`` photos (RuntimeError when it was not called)."""
        if self._clean is None or len(self._clean) != n:
            raise RuntimeError(f"{type(self).__name__}.prepare must be called on the batch first")
        return self._clean

    @staticmethod
    def draw(
        generators: Sequence[torch.Generator], shape: torch.Size, t_range: tuple[float, float], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per photo, from its own generator: a time uniform in ``t_range`` and Gaussian noise of ``shape``."""
        lo, hi = t_range
        t = torch.stack([torch.rand((), generator=g) for g in generators]).to(device) * (hi - lo) + lo
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
        return t, noise
