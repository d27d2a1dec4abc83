"""Visibility of the change between a photo and its protected copy, in just-noticeable differences (JND).

PSNR, SSIM and GMSD (:mod:`advface.protect.image.quality`) do not see what the eye sees on a smooth face: a smooth,
blotchy change shaped like facial features can keep face SSIM at 0.97 and still be plain to see. This module is a
small, documented model of early vision, in the tradition of Daly's visible differences predictor (1993), Peli's
band-limited contrast (1990) and Watson's DCT masking model (1993), with no learned weights:

1. **Channels.** Both photos are decoded from sRGB to linear RGB; the model works on luminance ``Y`` (Rec. 709
   weights) and, unless ``colour=False``, on two opponent channels, red-green ``R - G`` and blue-yellow
   ``B - (R + G) / 2`` (linear).
2. **Bands.** The *difference* (protected - clean, per channel) and the *clean photo* are split into
   ``bands`` octave bands by differences of Gaussians, band ``k`` = ``G(s_k) - G(2 s_k)`` with ``s_k = 2**k *
   finest_sigma`` pixels (exact Gaussians in the Fourier domain on the mirror-extended photo), each scaled so that
   a sinusoid at the band's peak frequency ``0.153 / s_k`` cycles per pixel keeps its amplitude. At the default
   viewing assumption (``pixels_per_degree`` = 50: a 250-pixel LFW photo spans 5 degrees, about its size on a
   desktop screen at 96 dpi seen from 70 cm) the five bands peak at 15.3, 7.7, 3.8, 1.9 and 1.0 cycles per
   degree. Content below the coarsest band (the local mean) and above the finest is left out: the eye's
   sensitivity is low there.
3. **Local contrast.** A band's local amplitude (its envelope, ``sqrt(2 G(2 s_k) * band**2)``) divided by the
   clean photo's local mean luminance at that scale (``G(2 s_k) * Y``) plus ``ambient`` (the display's black level
   and reflected room light, as a fraction of white: without it a change in near-black would count as huge Weber
   contrast; with it dark areas hide a change, as in Chou & Li's luminance masking).
4. **Contrast sensitivity.** Contrast times the sensitivity of the band's peak frequency ``f`` (cycles per
   degree) gives JND units. Luminance: ``peak_sensitivity * A(f)`` with Mannos & Sakrison's (1974) CSF
   ``A(f) = 2.6 (0.0192 + 0.114 f) exp(-(0.114 f)**1.1)`` (peak 1 at about 8 cycles per degree, lower at the
   finest and coarsest bands). Opponent channels: low-pass, ``weight * peak_sensitivity * exp(-f / corner)`` (the
   shape of Mullen's 1985 chromatic CSFs: highest at low frequencies, nearly gone by 10 cycles per degree; the
   weights are a rough scale, below luminance at the frequencies a perturbation has).
5. **Contrast masking.** The clean photo's own band contrast in JND units, ``m``, raises the threshold to
   ``max(1, m**masking_exponent)`` (Watson's 1993 rule, exponent 0.7): a change hides in texture (hair, eyebrows,
   edges) and shows on smooth skin.
6. **Pooling.** Per pixel, the Minkowski sum (exponent ``beta`` = 4) over bands and channels gives a map in JND
   units: 1 is a change at the threshold of visibility, well under 1 invisible, several JND plainly visible.
   :class:`VisibilityReport` gives the share of pixels above 1 JND, the 95th percentile and the Minkowski mean
   (same exponent) of the map, over the whole photo and over the face box when one is given, and keeps the map.

The shapes are textbook ones and the constants round values (each field of :class:`VisibilityModel` says where
it comes from), not fitted to any data set; the model is a yardstick for comparing perturbations on the same photos,
not a calibrated predictor of a given observer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import fft, ndimage

from advface.errors import ConfigError

#: Rec. 709 / sRGB luminance weights of linear R, G, B.
LUMINANCE_WEIGHTS = np.array([0.2126, 0.7152, 0.0722])
#: Peak frequency (cycles per pixel) of a difference of Gaussians ``G(s) - G(2 s)``, times ``s``:
#: ``sqrt(ln 4 / (6 pi**2))``.
DOG_PEAK = math.sqrt(math.log(4.0) / (6.0 * math.pi**2))
#: That DoG's gain at its peak frequency: ``4**(-1/3) - 4**(-4/3)``.
DOG_PEAK_GAIN = 4.0 ** (-1.0 / 3.0) - 4.0 ** (-4.0 / 3.0)
#: Smallest photo side the model accepts (pixels).
MIN_SIDE = 8


@dataclass(frozen=True)
class VisibilityModel:
    """Viewing assumption and constants of :func:`visibility` (every default stated here once)."""

    #: Display pixels per degree of visual angle: 50 means a 250-pixel photo spans 5 degrees.
    pixels_per_degree: float = 50.0
    #: Octave bands (1 to 8).
    bands: int = 5
    #: Gaussian sigma (pixels) of the finest band's inner blur; band k uses ``2**k`` times it.
    finest_sigma: float = 0.5
    #: Peak luminance contrast sensitivity: 1 / the Weber contrast visible at the most visible frequency (100: 1 %,
    #: a round value above laboratory grating thresholds of 0.3-0.5 %, Campbell & Robson 1968, for a photo seen
    #: casually rather than a grating stared at).
    peak_sensitivity: float = 100.0
    #: Display black level plus reflected room light, as a fraction of white (added to the local mean luminance). A
    #: round value, chosen so that dark and bright areas hide a change better than mid-tones (the ordering of Chou &
    #: Li's luminance thresholds, :mod:`advface.protect.image.perceptual`); 0 is Weber's law down to black.
    ambient: float = 0.1
    #: Exponent of contrast masking (Watson 1993): threshold = max(1, mask JND ** exponent); 0 turns masking off.
    masking_exponent: float = 0.7
    #: Minkowski exponent of pooling over bands and channels, and of the pooled mean over pixels.
    beta: float = 4.0
    #: Model the two opponent colour channels as well as luminance.
    colour: bool = True
    #: Red-green and blue-yellow sensitivity at low frequency, as fractions of ``peak_sensitivity`` (a rough scale
    #: after Mullen 1985, in these RGB-difference units; not measured here).
    colour_weights: tuple[float, float] = (0.5, 0.25)
    #: Red-green and blue-yellow low-pass corner frequencies (cycles per degree; Mullen 1985: chromatic
    #: sensitivity falls off above about 1-2 cycles per degree and blue-yellow earliest).
    colour_corners: tuple[float, float] = (4.0, 2.5)
    #: The level (JND) above which a pixel counts as visibly changed.
    threshold: float = 1.0
    #: Percentile of the map reported as ``p95``.
    percentile: float = 95.0

    def validate(self) -> list[str]:
        """Messages for out-of-range settings (empty when all are valid)."""
        errors = []
        for name in ("pixels_per_degree", "finest_sigma", "peak_sensitivity", "beta", "threshold"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                errors.append(f"visibility {name} must be a finite number > 0, got {value!r}")
        for name in ("ambient", "masking_exponent"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                errors.append(f"visibility {name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.bands, bool) or not isinstance(self.bands, int) or not 1 <= self.bands <= 8:
            errors.append(f"visibility bands must be an integer in [1, 8], got {self.bands!r}")
        for name in ("colour_weights", "colour_corners"):
            pair = getattr(self, name)
            if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
                errors.append(f"visibility {name} must be two finite numbers > 0, got {pair!r}")
        if not (math.isfinite(self.percentile) and 0 < self.percentile < 100):
            errors.append(f"visibility percentile must be in (0, 100), got {self.percentile!r}")
        return errors

    def band_frequencies(self) -> list[float]:
        """Peak frequency of each band (cycles per degree), finest first."""
        return [DOG_PEAK / (self.finest_sigma * 2**k) * self.pixels_per_degree for k in range(self.bands)]


@dataclass(frozen=True)
class VisibilityReport:
    """What :func:`visibility` measured; ``map`` is the per-pixel visibility (JND units, ``H x W``)."""

    #: Share of the photo's pixels above the threshold (1 JND by default).
    above_jnd: float
    #: The map's 95th percentile over the photo.
    p95: float
    #: Minkowski mean (exponent ``beta``) of the map over the photo.
    pooled: float
    #: The largest value of the map.
    max: float
    #: The same three over the face box (None when no box was given).
    above_jnd_face: float | None
    p95_face: float | None
    pooled_face: float | None
    map: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, float | None]:
        """The numbers (not the map), for JSON."""
        return {
            "above_jnd": self.above_jnd,
            "p95": self.p95,
            "pooled": self.pooled,
            "max": self.max,
            "above_jnd_face": self.above_jnd_face,
            "p95_face": self.p95_face,
            "pooled_face": self.pooled_face,
        }


def mannos_sakrison(frequency: float) -> float:
    """Mannos & Sakrison's (1974) luminance CSF at ``frequency`` cycles per degree (peak about 1 at 8 cpd)."""
    f = 0.114 * frequency
    return 2.6 * (0.0192 + f) * math.exp(-(f**1.1))


def band_sensitivities(model: VisibilityModel) -> dict[str, list[float]]:
    """Contrast sensitivity of each band (finest first) per channel: ``lum``, and ``rg`` / ``by`` when colour."""
    freqs = model.band_frequencies()
    out = {"lum": [model.peak_sensitivity * mannos_sakrison(f) for f in freqs]}
    if model.colour:
        for name, weight, corner in zip(("rg", "by"), model.colour_weights, model.colour_corners):
            out[name] = [weight * model.peak_sensitivity * math.exp(-f / corner) for f in freqs]
    return out


def visibility(
    clean: np.ndarray,
    protected: np.ndarray,
    box: Sequence[float] | None = None,
    model: VisibilityModel | None = None,
) -> VisibilityReport:
    """How visible the change from ``clean`` to ``protected`` is, in JND units (see the module docstring).

    Both are ``H x W x 3`` (RGB) or ``H x W`` (grey) arrays of the same shape, uint8 (0..255) or floating point
    (0..1); ``box`` is an optional face box ``(x1, y1, x2, y2)`` in pixels (clipped to the photo). Raises
    ValueError for bad input and ConfigError for an invalid ``model``.
    """
    model = model or VisibilityModel()
    for message in model.validate():
        raise ConfigError(message)
    a, b = _as_linear(clean, "clean"), _as_linear(protected, "protected")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {clean.shape} vs {protected.shape}")
    height, width = a.shape[:2]
    rows, cols = _box_slices(box, height, width) if box is not None else (slice(None), slice(None))
    channels_a, channels_b = _opponent(a, model.colour), _opponent(b, model.colour)
    weights = _band_weights(channels_a, model)
    total = np.zeros((height, width))
    for c, name in enumerate(channels_a):
        diff_bands = _Bands(channels_b[name] - channels_a[name], model)
        for k in range(model.bands):
            total += (diff_bands.envelope(k) * weights[c, k]) ** model.beta
    vis = total ** (1.0 / model.beta)
    face = vis[rows, cols] if box is not None else None
    return VisibilityReport(
        above_jnd=float(np.mean(vis > model.threshold)),
        p95=float(np.percentile(vis, model.percentile)),
        pooled=_minkowski_mean(vis, model.beta),
        max=float(vis.max()),
        above_jnd_face=None if face is None else float(np.mean(face > model.threshold)),
        p95_face=None if face is None else float(np.percentile(face, model.percentile)),
        pooled_face=None if face is None else _minkowski_mean(face, model.beta),
        map=vis,
    )


def band_weights(clean: np.ndarray, model: VisibilityModel | None = None) -> np.ndarray:
    """What turns the change's band envelopes into JND units on ``clean`` (the part of :func:`visibility` that
    depends on the clean photo alone, for :mod:`advface.protect.image.visibility_torch`): per channel (``lum``, then
    ``rg`` and ``by`` when ``model.colour``) and band (finest first), the band's sensitivity divided by the local
    mean luminance plus ``ambient`` and by the masking threshold ``max(1, m**masking_exponent)``;
    ``channels x bands x H x W``. ``clean`` as for :func:`visibility`."""
    model = model or VisibilityModel()
    for message in model.validate():
        raise ConfigError(message)
    return _band_weights(_opponent(_as_linear(clean, "clean"), model.colour), model)


def visibility_image(report: VisibilityReport, scale: float = 2.0) -> np.ndarray:
    """The map as a uint8 grey image for debugging: black 0 JND, white ``scale`` JND or more."""
    return (np.clip(report.map / scale, 0.0, 1.0) * 255.0).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- helpers


def _as_linear(image: np.ndarray, name: str) -> np.ndarray:
    """Validated ``H x W x 3`` linear-light RGB (0..1) of a uint8 or float (0..1) sRGB image."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"{name} must be H x W (grey) or H x W x 3 (RGB), got shape {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"{name} must be at least {MIN_SIDE} x {MIN_SIDE} pixels, got {image.shape[:2]}")
    if image.dtype == np.uint8:
        values = image.astype(np.float64) / 255.0
    elif np.issubdtype(image.dtype, np.floating):
        values = image.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{name} has NaN or infinite values")
        if values.min() < 0.0 or values.max() > 1.0:
            raise ValueError(f"{name} is floating point and must lie in [0, 1], got [{values.min()}, {values.max()}]")
    else:
        raise ValueError(f"{name} must be uint8 (0..255) or floating point (0..1), got dtype {image.dtype}")
    if values.ndim == 2:
        values = np.repeat(values[..., None], 3, axis=2)
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def _opponent(rgb: np.ndarray, colour: bool) -> dict[str, np.ndarray]:
    out = {"lum": rgb @ LUMINANCE_WEIGHTS}
    if colour:
        out["rg"] = rgb[..., 0] - rgb[..., 1]
        out["by"] = rgb[..., 2] - 0.5 * (rgb[..., 0] + rgb[..., 1])
    return out


def _band_weights(channels: dict[str, np.ndarray], model: VisibilityModel) -> np.ndarray:
    """:func:`band_weights` of the clean photo's opponent channels (``_opponent`` order)."""
    lum_bands = _Bands(channels["lum"], model)
    means = [lum_bands.blur(2 * s) + model.ambient for s in lum_bands.sigmas]
    sensitivities = band_sensitivities(model)
    out = np.empty((len(sensitivities), model.bands, *channels["lum"].shape))
    for c, (name, sens) in enumerate(sensitivities.items()):
        clean_bands = lum_bands if name == "lum" else _Bands(channels[name], model)
        for k in range(model.bands):
            threshold: float | np.ndarray = 1.0
            if model.masking_exponent > 0:
                mask = clean_bands.envelope(k) / means[k] * sens[k]
                threshold = np.maximum(1.0, mask**model.masking_exponent)
            out[c, k] = sens[k] / means[k] / threshold
    return out


def _box_slices(box: Sequence[float], height: int, width: int) -> tuple[slice, slice]:
    values = [float(v) for v in box]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"box must be four finite numbers (x1, y1, x2, y2), got {box!r}")
    x1, y1 = max(0, int(math.floor(values[0]))), max(0, int(math.floor(values[1])))
    x2, y2 = min(width, int(math.ceil(values[2]))), min(height, int(math.ceil(values[3])))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {box!r} holds no pixel of the {width} x {height} photo")
    return slice(y1, y2), slice(x1, x2)


def _minkowski_mean(values: np.ndarray, beta: float) -> float:
    return float(np.mean(values**beta) ** (1.0 / beta))


class _Bands:
    """Gaussian blurs of one channel (exact, in the Fourier domain of its mirror extension) and its DoG bands."""

    def __init__(self, channel: np.ndarray, model: VisibilityModel) -> None:
        self.height, self.width = channel.shape
        extended = np.pad(channel, ((0, self.height), (0, self.width)), mode="symmetric")
        self.spectrum = fft.rfft2(extended, workers=1)
        self.columns = extended.shape[1]
        self.sigmas = [model.finest_sigma * 2**k for k in range(model.bands)]
        self.channel = channel
        self._blurs: dict[float, np.ndarray] = {}

    def blur(self, sigma: float) -> np.ndarray:
        """The channel blurred by a Gaussian of ``sigma`` pixels."""
        if sigma not in self._blurs:
            filtered = ndimage.fourier_gaussian(self.spectrum, sigma, n=self.columns)
            full = fft.irfft2(filtered, s=(2 * self.height, self.columns), workers=1)
            self._blurs[sigma] = full[: self.height, : self.width]
        return self._blurs[sigma]

    def envelope(self, k: int) -> np.ndarray:
        """Local amplitude of band ``k``: ``sqrt(2 G(2 s) * band**2)``, the band scaled to unit peak gain."""
        s = self.sigmas[k]
        band = (self.blur(s) - self.blur(2 * s)) / DOG_PEAK_GAIN
        energy = ndimage.gaussian_filter(band * band, 2 * s, mode="reflect")
        return np.sqrt(2.0 * np.maximum(energy, 0.0))
