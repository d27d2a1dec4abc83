"""SSIM budget of image protection: spend the L-inf budget where the face's structural similarity tolerates it.

Sign-PGD moves nearly every pixel the encoders see by the whole budget; on smooth skin that noise is what costs SSIM
(the structure term of a flat 11 x 11 window has almost no variance to hide it in). With ``budget="ssim"`` the
optimisation keeps the L-inf ball of ``epsilon``, takes its first ``sign_share`` of the steps as plain signed steps
(a strong start), and then

- adds a **quality term**: the SSIM of the face box (differentiable, the same Gaussian-window SSIM as
  :func:`advface.protect.image.quality.ssim_face`: sigma 1.5, 11 taps, per RGB channel, borders cropped), its
  gradient L2-normalised like the identity terms and weighted by a per-photo **multiplier** that adapts every step
  (Lagrangian dual ascent: multiplied by ``exp(rate)`` while the face SSIM is below ``target + margin``, divided by
  it while above, kept in ``[min_multiplier, max_multiplier]``);
- takes **L2-normalised steps** (the step direction scaled to unit RMS over the face box, :func:`normalised_step`)
  instead of signed ones, so pixels move in proportion to their gradient and most stay well inside the ball.

The identity terms are unchanged; the multiplier pulls the face SSIM back up to the target from the strong start and
then holds it there while the identity terms go on. The face SSIM is measured on the photo before EOT and before
uint8 rounding; ``margin`` covers the rounding. Measured (``benchmarks/photo_quality.py``, RESULTS "Imperceptibility"):
the target is met, but at 0.97 the protection is weaker than the uniform budget's; lower targets trace the frontier.

The face box is the detector's (brows to chin): outside it nothing holds the change back, and the first signed
steps leave forehead, hair and background saturated. ``photo_target`` adds a second constraint, the SSIM of the
whole photo, edges included (:func:`photo_ssim` with ``pad``), with its own multiplier that pulls only while that
constraint binds (:func:`update_multipliers` with ``hinge``).

Both constraints see 11 x 11 windows, so a change that is smooth over a window (a blotch the size of a brow or an
eye socket) costs them little. ``scales`` > 1 makes each constraint **multi-scale**: its value is the smallest SSIM
of the pyramid at full, 1/2, 1/4 ... resolution (2 x 2 average pooling per level, the same window at each), so that
a low-frequency change, which is fine structure at a coarse level, is held to the target too
(:func:`face_ssim_per_scale`, :func:`photo_ssim_per_scale`). The smallest rather than Wang et al.'s MS-SSIM (a
weighted product with the luminance term at the coarsest level only) or a mean: each level is then held at the
same target, the full-resolution one (the reported metric) included, and no level's slack can buy change at another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

#: SSIM constants on the 0..1 scale (Wang et al. 2004: K1 = 0.01, K2 = 0.03, data range 1).
C1, C2 = 0.01**2, 0.03**2
#: Gaussian window of :func:`advface.protect.image.quality.ssim` (skimage: sigma 1.5, truncate 3.5 -> 11 taps).
SIGMA, RADIUS = 1.5, 5
#: Most pyramid levels of a multi-scale constraint (``SsimBudget.scales``): 1/16 resolution is coarser than a face.
MAX_SCALES = 5


class FaceAndPhotoTargets:
    """What a budget holding the face box at ``target`` and, unless ``whole_photo`` is off, the whole photo at
    ``photo_target`` (None: the same as ``target``) shares: the whole photo's target."""

    target: float
    whole_photo: bool
    photo_target: float | None

    @property
    def whole_photo_target(self) -> float | None:
        """The whole photo's target (None when ``whole_photo`` is off)."""
        if not self.whole_photo:
            return None
        return self.target if self.photo_target is None else self.photo_target


@dataclass(frozen=True)
class SsimBudget(FaceAndPhotoTargets):
    """Parameters of the SSIM budget (``ProtectConfig.ssim``)."""

    #: Face-box SSIM the optimisation keeps the photo at or above.
    target: float = 0.97
    #: Aim this much above ``target`` (uint8 rounding and the last steps' movement lower it a little).
    margin: float = 0.003
    #: Starting weight of the quality term relative to the identity terms (each gradient is normalised first).
    multiplier: float = 1.0
    #: Per-step log change of the multiplier (dual ascent on the SSIM constraint).
    rate: float = 0.15
    #: Bounds of the multiplier.
    min_multiplier: float = 0.01
    max_multiplier: float = 100.0
    #: Share of the steps taken first as plain signed steps without the quality term (a strong start that the
    #: constrained steps then pull back to the target).
    sign_share: float = 1 / 3
    #: Second constraint: the SSIM of the **whole photo** (edges mirrored out, so that they count too) kept at or
    #: above :attr:`whole_photo_target`. The face box is the detector's (brows to chin); without this the
    #: optimisation moves the change onto the forehead, hair and background, which the encoders' chips see but the
    #: face-box SSIM does not (measured: whole-photo SSIM 0.963 vs 0.989 at the same strength). It has its own
    #: multiplier, starting at ``min_multiplier`` and adapted the same way except that it is at least ``multiplier``
    #: whenever the whole photo is below its target (so it pulls only where the constraint binds), and the same
    #: ``margin``. False: the face box alone (the behaviour before this constraint existed).
    whole_photo: bool = True
    #: The whole photo's SSIM target; None: the same as ``target``.
    photo_target: float | None = None
    #: Pyramid levels of both constraints (1 to :data:`MAX_SCALES`): 1 is SSIM at full resolution (the reported
    #: metric); k holds the smallest of the SSIMs at full, 1/2, ..., 1/2**(k-1) resolution (2 x 2 average pooling)
    #: at the target, so that smooth, feature-sized changes, which the 11 x 11 windows barely see, count too.
    scales: int = 1

    def validate(self) -> list[str]:
        """Messages for out-of-range settings (empty when all are valid)."""
        errors = []
        if not (math.isfinite(self.target) and 0 < self.target < 1):
            errors.append(f"ssim target must be in (0, 1), got {self.target}")
        if not (math.isfinite(self.margin) and 0 <= self.margin < 1):
            errors.append(f"ssim margin must be in [0, 1), got {self.margin}")
        if not (math.isfinite(self.sign_share) and 0 <= self.sign_share < 1):
            errors.append(f"ssim sign_share must be in [0, 1), got {self.sign_share}")
        for name in ("multiplier", "rate", "min_multiplier", "max_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                errors.append(f"ssim {name} must be a finite number > 0, got {value}")
        if self.photo_target is not None and not (math.isfinite(self.photo_target) and 0 < self.photo_target < 1):
            errors.append(f"ssim photo_target must be in (0, 1) or None, got {self.photo_target}")
        if isinstance(self.scales, bool) or not isinstance(self.scales, int) or not 1 <= self.scales <= MAX_SCALES:
            errors.append(f"ssim scales must be an integer in [1, {MAX_SCALES}], got {self.scales!r}")
        if not errors and not self.min_multiplier <= self.multiplier <= self.max_multiplier:
            errors.append("ssim multiplier must lie in [min_multiplier, max_multiplier]")
        return errors


def gaussian_window(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised ``11 x 11`` Gaussian window (sigma 1.5) as a ``1 x 1 x 11 x 11`` kernel."""
    x = torch.arange(-RADIUS, RADIUS + 1, device=device, dtype=dtype)
    g = torch.exp(-(x * x) / (2 * SIGMA * SIGMA))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-window SSIM of ``N x C x H x W`` images in [0, 1]: ``N x C x (H - 10) x (W - 10)`` (valid windows only,
    as skimage crops the borders)."""
    c = a.shape[1]
    win = gaussian_window(a.device, a.dtype).expand(c, 1, -1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + C1) / (mu_a * mu_a + mu_b * mu_b + C1)
    return luminance * (2 * cov + C2) / (var_a + var_b + C2)


def box_slices(box: Sequence[float], height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of the face box ``(x1, y1, x2, y2)`` clipped to the image, rounded outwards (as
    :func:`advface.protect.image.quality.ssim_face`)."""
    x1, y1 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x2, y2 = min(width, int(math.ceil(box[2]))), min(height, int(math.ceil(box[3])))
    return slice(y1, y2), slice(x1, x2)


def _levels(t: torch.Tensor, scales: int) -> list[torch.Tensor]:
    """``t`` and its 2 x 2 average-pooled coarser levels: ``scales`` tensors in all (a level under 2 x 2 pixels
    ends the list early)."""
    levels = [t]
    while len(levels) < scales and min(levels[-1].shape[-2:]) >= 2:
        levels.append(F.avg_pool2d(levels[-1], 2))
    return levels


def face_ssim_per_scale(
    clean: torch.Tensor, adv: torch.Tensor, boxes: Sequence[Sequence[float]], scales: int = 1
) -> torch.Tensor:
    """Differentiable mean SSIM of each photo's face box at full, 1/2, ..., 1/2**(scales-1) resolution (the box
    cropped, then 2 x 2 average-pooled per level; ``N x 3 x H x W`` in [0, 1]; one box per photo): ``N x scales``.
    A level under 11 x 11 pixels gives 1 (nothing to constrain)."""
    h, w = clean.shape[-2:]
    rows_out = []
    for i, box in enumerate(boxes):
        rows, cols = box_slices(box, h, w)
        a_levels = _levels(clean[i : i + 1, :, rows, cols], scales)
        b_levels = _levels(adv[i : i + 1, :, rows, cols], scales)
        values = []
        for k in range(scales):
            if k >= len(a_levels) or min(a_levels[k].shape[-2:]) < 2 * RADIUS + 1:
                values.append(adv.new_ones(()))
            else:
                values.append(ssim_map(a_levels[k], b_levels[k]).mean())
        rows_out.append(torch.stack(values))
    return torch.stack(rows_out)


def face_ssim(
    clean: torch.Tensor, adv: torch.Tensor, boxes: Sequence[Sequence[float]], scales: int = 1
) -> torch.Tensor:
    """Differentiable mean SSIM of each photo's face box (``N x 3 x H x W`` in [0, 1]; one box per photo): ``N``
    values; a box under 11 x 11 pixels gives 1 (nothing to constrain). ``scales`` > 1: the smallest over the levels
    of :func:`face_ssim_per_scale`."""
    return face_ssim_per_scale(clean, adv, boxes, scales).amin(dim=1)


def face_area(boxes: Sequence[Sequence[float]], height: int, width: int) -> list[int]:
    """Pixels in each clipped face box (at least 1)."""
    areas = []
    for box in boxes:
        rows, cols = box_slices(box, height, width)
        areas.append(max(1, (rows.stop - rows.start) * (cols.stop - cols.start)))
    return areas


def normalised_step(direction: torch.Tensor, areas: Sequence[int]) -> torch.Tensor:
    """``direction`` (``N x C x H x W``) scaled per photo to unit RMS over its face box's pixels (``areas``): the
    identity terms' gradients live on the face, so a step of ``alpha`` moves a face pixel by ``alpha`` on average,
    pixels with larger gradients more and the rest less (projection then clips at epsilon)."""
    n, c = direction.shape[:2]
    scale = torch.tensor([math.sqrt(a * c) for a in areas], device=direction.device, dtype=direction.dtype)
    norm = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
    return direction * (scale / norm).view(n, 1, 1, 1)


def photo_ssim_per_scale(clean: torch.Tensor, adv: torch.Tensor, pad: bool = False, scales: int = 1) -> torch.Tensor:
    """:func:`photo_ssim` at full, 1/2, ..., 1/2**(scales-1) resolution (2 x 2 average pooling per level, each level
    padded by itself with ``pad``): ``N x scales``; a level under 11 x 11 pixels gives 1."""
    values = []
    for a, b in zip(_levels(clean, scales), _levels(adv, scales)):
        if min(a.shape[-2:]) < 2 * RADIUS + 1:
            break
        if pad:
            a = F.pad(a, (RADIUS,) * 4, mode="reflect")
            b = F.pad(b, (RADIUS,) * 4, mode="reflect")
        values.append(ssim_map(a, b).mean(dim=(1, 2, 3)))
    values += [adv.new_ones(adv.shape[0])] * (scales - len(values))
    return torch.stack(values, dim=1)


def photo_ssim(clean: torch.Tensor, adv: torch.Tensor, pad: bool = False, scales: int = 1) -> torch.Tensor:
    """Differentiable mean SSIM of each whole photo (``N x 3 x H x W`` in [0, 1]): ``N`` values. Without ``pad``
    the borders are cropped (as :func:`advface.protect.image.quality.ssim`, the reported metric), so the outer
    5 pixels weigh almost nothing; with ``pad`` both photos are first mirrored out by 5 pixels, so that every pixel
    is the centre of a window (what the optimisation's whole-photo constraint uses: otherwise it leaves the photo's
    edge free and the change piles up there). ``scales`` > 1: the smallest over the levels of
    :func:`photo_ssim_per_scale`."""
    return photo_ssim_per_scale(clean, adv, pad, scales).amin(dim=1)


class DualAscent(Protocol):
    """The settings :func:`update_multipliers` reads (:class:`SsimBudget`'s, and the JND budget's)."""

    @property
    def target(self) -> float: ...
    @property
    def margin(self) -> float: ...
    @property
    def rate(self) -> float: ...
    @property
    def multiplier(self) -> float: ...
    @property
    def min_multiplier(self) -> float: ...
    @property
    def max_multiplier(self) -> float: ...


def update_multipliers(
    multipliers: torch.Tensor,
    ssim_now: torch.Tensor,
    params: DualAscent,
    target: float | None = None,
    hinge: bool = False,
) -> torch.Tensor:
    """One dual-ascent step: up by ``exp(rate)`` where the SSIM is below ``target + margin`` (``target`` defaults
    to ``params.target``, the face box's), down where above. ``hinge``: where below, at least ``params.multiplier``
    (a constraint that was slack, its multiplier shrunk towards ``min_multiplier``, acts at once when it binds).
    Any higher-is-better constraint works; a lower-is-better one (the JND budget's) passes its value and target
    negated."""
    below = ssim_now < (params.target if target is None else target) + params.margin
    factor = torch.where(below, math.exp(params.rate), math.exp(-params.rate))
    updated = multipliers * factor
    if hinge:
        updated = torch.where(below, updated.clamp_min(params.multiplier), updated)
    return updated.clamp(params.min_multiplier, params.max_multiplier)
