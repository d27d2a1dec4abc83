"""Differentiable (torch) version of the visibility map of :mod:`advface.protect.image.visibility`.

The same model with the same :class:`~advface.protect.image.visibility.VisibilityModel` constants, for use as a
constraint inside the protection loop (:mod:`advface.protect.image.jnd_budget`). Everything that depends on the
clean photo alone -- its local mean luminance per band and its contrast masking -- is computed once per photo,
without gradient, by the numpy model itself (:func:`~advface.protect.image.visibility.band_weights`), so the two
cannot drift apart there. Per call only the *difference* is decomposed: sRGB to linear, opponent channels, octave
bands as exact Gaussians in the Fourier domain of the mirror-extended photo (as the numpy model), and each band's
energy blurred the same way. FFT rather than separable convolution: the coarsest band's energy blur has sigma 32
pixels (a 257-tap kernel, wider than a 250-pixel photo), and every band costs the same in the Fourier domain
(measured on one CPU core, 250 x 250 RGB: about 0.1 s forward and backward).

Two small constants keep the gradient finite where the change is zero (``sqrt`` and ``x**(1/beta)`` have infinite
slope at 0): :data:`ENERGY_EPS` is added under the envelope's square root (in squared linear-light units: it adds
at most 1e-10 to an envelope, far below one uint8 level) and :data:`POWER_EPS` to the pooled power before its root
(in JND**beta: it adds at most 1e-3 JND to a map value, and only where the map is below 0.01 JND).
The bands are exact Gaussians in the Fourier domain, as in the numpy model; the band energy is blurred there by
the transfer function of scipy's sampled, truncated ``gaussian_filter`` kernel, which the numpy model uses (its
``reflect`` edges are the same mirror extension), so the two maps agree to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from advface.protect.image.visibility import (
    DOG_PEAK_GAIN,
    LUMINANCE_WEIGHTS,
    VisibilityModel,
    band_weights,
)

#: scipy's ``gaussian_filter`` truncation (kernel radius in sigmas), the numpy model's band-energy blur.
GAUSSIAN_TRUNCATE = 4.0
#: Added to ``2 * band energy`` under the envelope's square root (squared linear-light units).
ENERGY_EPS = 1e-20
#: Added to the per-pixel power (the map to the ``beta``) before its ``1 / beta`` root (JND**beta).
POWER_EPS = 1e-12


class VisibilityMap:
    """The visibility of changes to fixed clean photos, differentiable in the changed photo.

    ``clean``: ``N x 3 x H x W`` in [0, 1] (sRGB, as the protection loop holds photos); the clean-side terms are
    computed here, once. Call :meth:`power` or :meth:`map` with a changed ``N x 3 x H x W`` photo.
    """

    def __init__(self, clean: torch.Tensor, model: VisibilityModel | None = None) -> None:
        self.model = model or VisibilityModel()
        if clean.ndim != 4 or clean.shape[1] != 3:
            raise ValueError(f"clean must be N x 3 x H x W, got shape {tuple(clean.shape)}")
        height, width = clean.shape[-2:]
        self.height, self.width = height, width
        dtype, device = clean.dtype, clean.device
        with torch.no_grad():
            photos = clean.detach().permute(0, 2, 3, 1).double().cpu().numpy()
            weights = np.stack([band_weights(p, self.model) for p in photos])  # N x C x K x H x W
            self.weights = torch.from_numpy(weights).to(device=device, dtype=dtype)
            self.clean_linear = _linear(clean.detach())
        opponent = [LUMINANCE_WEIGHTS.tolist()]
        if self.model.colour:
            opponent += [[1.0, -1.0, 0.0], [-0.5, -0.5, 1.0]]
        self.opponent = torch.tensor(opponent, device=device, dtype=dtype)  # C x 3
        sigmas = [self.model.finest_sigma * 2**k for k in range(self.model.bands)]
        fy = torch.fft.fftfreq(2 * height, device=device, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(2 * width, device=device, dtype=torch.float64)[None, :]
        radius2 = fy * fy + fx * fx

        def gaussian(sigma: float) -> torch.Tensor:
            return torch.exp(-2.0 * math.pi**2 * sigma**2 * radius2)

        self.band_filters = torch.stack([(gaussian(s) - gaussian(2 * s)) / DOG_PEAK_GAIN for s in sigmas]).to(dtype)
        self.energy_filters = torch.stack(
            [_sampled_gaussian(2 * s, fy[:, 0])[:, None] * _sampled_gaussian(2 * s, fx[0])[None, :] for s in sigmas]
        ).to(dtype)

    def power(self, protected: torch.Tensor) -> torch.Tensor:
        """The map to the power ``beta`` (the Minkowski sum over channels and bands before its root): ``N x H x W``.
        Its mean over a region, to the ``1 / beta``, is the region's pooled visibility."""
        if protected.shape != (self.weights.shape[0], 3, self.height, self.width):
            raise ValueError(
                f"protected must be {self.weights.shape[0]} x 3 x {self.height} x {self.width}, "
                f"got {tuple(protected.shape)}"
            )
        diff = _linear(protected) - self.clean_linear  # N x 3 x H x W
        channels = torch.einsum("cj,njhw->nchw", self.opponent, diff)  # N x C x H x W
        bands = _filtered(channels.unsqueeze(2), self.band_filters, self.height, self.width)  # N x C x K x H x W
        energy = _filtered(bands * bands, self.energy_filters, self.height, self.width)
        envelope = torch.sqrt(2.0 * energy.clamp_min(0.0) + ENERGY_EPS)
        return ((envelope * self.weights) ** self.model.beta).sum(dim=(1, 2))

    def map(self, protected: torch.Tensor) -> torch.Tensor:
        """The visibility map in JND units, ``N x H x W`` (the numpy model's ``VisibilityReport.map``)."""
        return (self.power(protected) + POWER_EPS) ** (1.0 / self.model.beta)


def _linear(srgb: torch.Tensor) -> torch.Tensor:
    """sRGB (0..1) to linear light, as the numpy model (the power branch evaluated on a clamped base only)."""
    srgb = srgb.clamp(0.0, 1.0)
    high = ((srgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4
    return torch.where(srgb <= 0.04045, srgb / 12.92, high)


def _sampled_gaussian(sigma: float, frequencies: torch.Tensor) -> torch.Tensor:
    """Transfer function at ``frequencies`` (cycles per pixel) of scipy's ``gaussian_filter1d`` kernel: the
    Gaussian sampled at integer offsets up to ``int(4 sigma + 0.5)`` and normalised to sum 1 (what the numpy model
    blurs band energy with; at sigma 1 it differs from the exact Gaussian near the Nyquist frequency)."""
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=frequencies.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    return (kernel[None, :] * torch.cos(2.0 * math.pi * frequencies[:, None] * offsets[None, :])).sum(dim=1)


def _filtered(t: torch.Tensor, filters: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``t`` (``... x H x W``, broadcasting against ``filters``' ``K`` on the third-last axis) filtered by each
    transfer function in ``filters`` (``K x 2H x (W + 1)``) on its mirror extension (``a b c | c b a``, scipy's
    ``reflect``), cropped back to ``H x W``."""
    extended = torch.cat([t, t.flip(-1)], dim=-1)
    extended = torch.cat([extended, extended.flip(-2)], dim=-2)
    spectrum = torch.fft.rfft2(extended)
    full = torch.fft.irfft2(spectrum * filters, s=(2 * height, 2 * width))
    return full[..., :height, :width]
