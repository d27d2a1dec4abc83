"""JND budget of image protection: keep the *visibility* of the change (in just-noticeable differences) at a target.

``--budget ssim`` holds face SSIM at 0.97, yet about 44 % of the face's pixels stay above 1 JND on LFW photos and the
eye still sees blotchy, feature-shaped change (``benchmarks/RESULTS.md``, "Visible structure: a JND model"). With
``budget="jnd"`` the constraint is the visibility model itself (:mod:`advface.protect.image.visibility`, made
differentiable in :mod:`advface.protect.image.visibility_torch`): a pooled statistic of the map over the face box,
and one over the whole photo, each kept at or below its target in JND units. The machinery is the SSIM budget's
(:mod:`advface.protect.image.ssim_budget`): a strong start of ``sign_share`` signed steps, then L2-normalised steps
with the constraint's gradient (normalised like the identity terms) weighted by a per-photo multiplier that dual
ascent adapts every step (:func:`~advface.protect.image.ssim_budget.update_multipliers`, on the negated statistic:
up while the statistic is above ``target - margin``, down while below); the whole photo's multiplier starts at
``min_multiplier`` and pulls only while its constraint binds (``hinge``).

A budget of its own rather than an option of ``ssim``: the two constraints measure different things (SSIM is
higher-is-better on 11 x 11 windows; the JND map is lower-is-better, five octave bands up to feature size, masked by
texture and brightness) with different targets, units and margins, and holding both at once would make each's
result hard to read. Statistics (``statistic``):

- ``pooled`` (default): the Minkowski mean of the map (exponent ``model.beta`` = 4), what
  :class:`~advface.protect.image.visibility.VisibilityReport` reports as ``pooled_face`` / ``pooled``;
- ``top``: the mean of the map's largest ``top_share`` of values (5 %: a smooth stand-in for the 95th percentile,
  which has a gradient at one pixel only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from advface.protect.image.ssim_budget import FaceAndPhotoTargets, box_slices
from advface.protect.image.visibility import VisibilityModel
from advface.protect.image.visibility_torch import POWER_EPS

#: The pooled statistics of the visibility map a JND budget can hold (``JndBudget.statistic``).
STATISTICS = ("pooled", "top")


@dataclass(frozen=True)
class JndBudget(FaceAndPhotoTargets):
    """Parameters of the JND budget (``ProtectConfig.jnd``)."""

    #: The face box's pooled visibility (JND units) the optimisation keeps the photo at or below.
    target: float = 1.0
    #: Aim this much (JND) below ``target``: uint8 rounding adds a faint change of its own.
    margin: float = 0.05
    #: ``pooled`` (Minkowski mean of the map) or ``top`` (mean of its largest ``top_share``), see the module docs.
    statistic: str = "pooled"
    #: With ``statistic="top"``: the share of the region's pixels averaged.
    top_share: float = 0.05
    #: Also hold the whole photo's statistic (edges included) at or below :attr:`whole_photo_target`, with its own
    #: multiplier that pulls only while that constraint binds. False: the face box alone (the change then moves
    #: onto forehead, hair and background, as with the SSIM budget).
    whole_photo: bool = True
    #: The whole photo's target (JND); None: the same as ``target``.
    photo_target: float | None = None
    #: Starting weight of the visibility term relative to the identity terms (each gradient is normalised first).
    multiplier: float = 1.0
    #: Per-step log change of the multiplier (dual ascent).
    rate: float = 0.15
    #: Bounds of the multiplier.
    min_multiplier: float = 0.01
    max_multiplier: float = 100.0
    #: Share of the steps taken first as plain signed steps without the visibility term (a strong start).
    sign_share: float = 1 / 3
    #: The visibility model (viewing distance, CSF, masking; :class:`VisibilityModel`'s defaults).
    model: VisibilityModel = field(default_factory=VisibilityModel)

    def validate(self) -> list[str]:
        """Messages for out-of-range settings (empty when all are valid)."""
        errors = []
        for name in ("target", "multiplier", "rate", "min_multiplier", "max_multiplier"):
            value = getattr(self, name)
            if not (_is_number(value) and value > 0):
                errors.append(f"jnd {name} must be a finite number > 0, got {value!r}")
        if self.photo_target is not None and not (_is_number(self.photo_target) and self.photo_target > 0):
            errors.append(f"jnd photo_target must be a finite number > 0 or None, got {self.photo_target!r}")
        if not (_is_number(self.margin) and self.margin >= 0):
            errors.append(f"jnd margin must be a finite number >= 0, got {self.margin!r}")
        elif not errors and self.margin >= min(self.target, self.whole_photo_target or self.target):
            errors.append(f"jnd margin ({self.margin}) must be below the targets")
        if self.statistic not in STATISTICS:
            errors.append(f"jnd statistic must be one of {', '.join(STATISTICS)}, got {self.statistic!r}")
        if not (_is_number(self.top_share) and 0 < self.top_share <= 1):
            errors.append(f"jnd top_share must be in (0, 1], got {self.top_share!r}")
        if not (_is_number(self.sign_share) and 0 <= self.sign_share < 1):
            errors.append(f"jnd sign_share must be in [0, 1), got {self.sign_share!r}")
        errors += [f"jnd {message}" for message in self.model.validate()]
        if not errors and not self.min_multiplier <= self.multiplier <= self.max_multiplier:
            errors.append("jnd multiplier must lie in [min_multiplier, max_multiplier]")
        return errors


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def pooled_statistic(power: torch.Tensor, params: JndBudget) -> torch.Tensor:
    """The ``params.statistic`` of each photo's map, from the map to the power ``beta`` (``N x ...``, a region of
    :meth:`~advface.protect.image.visibility_torch.VisibilityMap.power`): ``N`` values in JND units."""
    beta = params.model.beta
    flat = power.flatten(1)
    if params.statistic == "pooled":
        return (flat.mean(dim=1) + POWER_EPS) ** (1.0 / beta)
    k = max(1, math.ceil(params.top_share * flat.shape[1]))
    return ((flat.topk(k, dim=1).values + POWER_EPS) ** (1.0 / beta)).mean(dim=1)


def face_statistic(power: torch.Tensor, boxes: Sequence[Sequence[float]], params: JndBudget) -> torch.Tensor:
    """:func:`pooled_statistic` over each photo's face box (``power``: ``N x H x W``; one box per photo, clipped
    and rounded outwards as the numpy model's): ``N`` values."""
    h, w = power.shape[-2:]
    values = []
    for i, box in enumerate(boxes):
        rows, cols = box_slices(box, h, w)
        values.append(pooled_statistic(power[i : i + 1, rows, cols], params)[0])
    return torch.stack(values)
