"""PGD on the full photo against an ensemble of face encoders (IDGuardian's cross-encoder identity confusion).

For each photo the face is detected once on the clean image and every encoder's alignment (dlib chip, ArcFace chip)
becomes an ``affine_grid`` warp, so the perturbation lives on the whole photo and reaches every encoder through a
differentiable crop. Each step draws one random transform (EOT, :mod:`advface.protect.image.transforms`), computes
for every encoder the cosine between the clean and the perturbed embedding, L2-normalises each encoder's gradient
and sums them (no encoder dominates), and takes a signed step that lowers the sum; the perturbation is kept in the
L-inf ball of radius ``epsilon`` and in [0, 1]. Encoders whose module names intermediate feature maps
(``transfer_layers``, dlib's ResNet) add a feature-level term: the cosine between the clean and the perturbed
feature maps, its gradient normalised the same way and weighted by ``feature_weight``. Disrupting mid-level features
rather than only the final embedding is what makes a perturbation found on one encoder fool others (measured:
``benchmarks/RESULTS.md``, image-level protection). The result is rounded to uint8 inside the same ball, so every
pixel of the written photo differs from the original by at most ``floor(255 * epsilon)`` levels. With
``budget="perceptual"`` the ball is per pixel (:mod:`advface.protect.image.perceptual`: smaller on smooth skin than
on hair, edges and background, at most that many levels) and the steps scale with it. With ``budget="ssim"`` the
ball stays uniform and, after a third of the steps, a face-SSIM term with an adaptive multiplier joins the loss and
the steps become L2-normalised (:mod:`advface.protect.image.ssim_budget`); ``budget="jnd"`` does the same with the
visibility of the change in JND units (:mod:`advface.protect.image.jnd_budget`).

Randomness (start point, transforms) comes from a generator seeded by ``seed`` and the photo's own bytes, so a photo
gets the same protection whatever batch or order it is processed in (up to float rounding of batched convolutions).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from advface.encoders.base import ChipSpec
from advface.errors import ConfigError, DeadlineExceededError, ImageError
from advface.faces.align import align_face, alignment_matrix
from advface.faces.detect import Face, FaceDetector, check_image, create_detector
from advface.faces.pipeline import FacePolicy
from advface.generative.model import IdentityGenerator
from advface.protect.image.antipure import ANTIPURE, AntiPureConfig, AntiPureTerm, IdentityReader
from advface.protect.image.ensemble import EncoderSpec, build_ensemble
from advface.protect.image.guidance import (
    DEFLECTION,
    ENCODERS,
    GUIDANCE_NAMES,
    NEEDS_SURROGATE,
    DeflectionTerm,
    parse_guidance,
)
from advface.protect.image.jnd_budget import JndBudget, face_statistic, pooled_statistic
from advface.protect.image.perceptual import BUDGETS, PerceptualBudget, budget_map
from advface.protect.image.quality import gmsd, linf, psnr, ssim, ssim_face
from advface.protect.image.ssim_budget import (
    SsimBudget,
    face_area,
    face_ssim,
    normalised_step,
    photo_ssim,
    update_multipliers,
)
from advface.protect.image.surrogate_term import SurrogateTerm
from advface.protect.image.transforms import EOTConfig, jitter_theta, random_transform
from advface.protect.image.visibility import visibility
from advface.protect.image.visibility_torch import VisibilityMap
from advface.protect.image.warp import chip_theta, warp_chips

#: ``(perturbed photos, chip thetas, per-photo generators) -> [(per-photo loss, weight)]`` of a surrogate term.
SurrogateLosses = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Generator]], list[tuple[torch.Tensor, float]]]

#: Faces narrower than this (box width, pixels) are refused: too few pixels to align and protect reliably.
MIN_FACE_SIZE = 40


@dataclass(frozen=True)
class ShapeDefaults:
    """The settings a budget shape takes where ``ProtectConfig`` leaves them None."""

    #: Largest change of any pixel, 0..1 scale.
    epsilon: float
    #: Weight of the encoder terms against the surrogate's terms.
    encoder_weight: float = 1.0


#: Each budget shape's defaults. The SSIM budget holds the face's and the whole photo's SSIM at its target, so it
#: needs a larger ball than the uniform budget, and its L2-normalised steps follow the direction of the summed term
#: gradients, so the encoder terms need a larger weight to keep their share against the surrogate's: measured with
#: every default stage (benchmarks/RESULTS.md, "The SSIM budget against the diffusion threats"), ssim at 12/255 with
#: encoder weight 3 is as strong as uniform 8/255 against the diffusion threats and the face encoders, at face SSIM
#: 0.975 and PSNR 37.0 dB (at weight 1 MobileFaceNet still matched 3 of 8 photos; at 8/255 training-based
#: personalisation got 10% through).
SHAPE_DEFAULTS: dict[str, ShapeDefaults] = {
    "uniform": ShapeDefaults(epsilon=8 / 255),
    "perceptual": ShapeDefaults(epsilon=8 / 255),
    "ssim": ShapeDefaults(epsilon=12 / 255, encoder_weight=3.0),
    "jnd": ShapeDefaults(epsilon=8 / 255),
}


@dataclass(frozen=True)
class ProtectConfig:
    """Budget and optimisation settings of image protection."""

    #: Largest change of any pixel on the 0..1 scale; None: the budget shape's own (:data:`SHAPE_DEFAULTS`); the
    #: value in effect is :attr:`effective_epsilon`.
    epsilon: float | None = None
    steps: int = 60
    #: Signed step at the start, as a fraction of epsilon; it decays (cosine) to a tenth of that by the last step.
    step_fraction: float = 0.25
    eot: bool = True
    eot_config: EOTConfig = field(default_factory=EOTConfig)
    #: Stop (per photo) once every encoder's cosine is at or below this; None runs all steps.
    target_similarity: float | None = None
    check_every: int = 5
    seed: int = 0
    #: Start from uniform noise in the ball (costs PSNR: the noise stays on pixels no encoder sees).
    random_start: bool = False
    #: Weight of the feature-level term (intermediate feature maps of encoders that name ``transfer_layers``)
    #: relative to the embedding term; 0 attacks the embeddings only.
    feature_weight: float = 1.0
    #: Guidance terms (:data:`advface.protect.image.guidance.GUIDANCE_NAMES`): ``encoders`` (stage 1, the face-encoder
    #: ensemble), ``deflection`` (IDGuardian stage 2) and ``antipure`` (AntiPure, against diffusion purification),
    #: the last two on the defender surrogate shipped with advface.
    guidance: tuple[str, ...] = ("encoders", "deflection", "antipure")
    #: Weight of the deflection term relative to the encoder terms (each term's gradient is normalised first).
    deflection_weight: float = 1.0
    #: Weight of every encoder term (each encoder's embedding and feature terms) relative to the surrogate terms
    #: (deflection, AntiPure); it matters under the ``ssim`` and ``jnd`` budgets, whose normalised steps follow the
    #: direction of the summed gradients, far less under sign steps. None: the budget shape's own
    #: (:data:`SHAPE_DEFAULTS`); the value in effect is :attr:`effective_encoder_weight`.
    encoder_weight: float | None = None
    #: AntiPure's settings (used when ``guidance`` names ``antipure``).
    antipure: AntiPureConfig = AntiPureConfig()
    #: ``uniform``, ``perceptual``, ``ssim`` or ``jnd`` (:data:`BUDGETS`); epsilon is the largest change of any
    #: pixel in every case (unless ``perceptual.ceiling`` > 1).
    budget: str = "ssim"
    #: Parameters of the perceptual budget map.
    perceptual: PerceptualBudget = field(default_factory=PerceptualBudget)
    #: Parameters of the SSIM budget (face-box SSIM constraint and L2-normalised steps,
    #: :mod:`advface.protect.image.ssim_budget`).
    ssim: SsimBudget = field(default_factory=SsimBudget)
    #: Parameters of the JND budget (visibility constraint in JND units, :mod:`advface.protect.image.jnd_budget`).
    jnd: JndBudget = field(default_factory=JndBudget)

    def validate(self) -> None:
        """Raise ConfigError for out-of-range settings."""
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if not (math.isfinite(self.effective_epsilon) and 0 < self.effective_epsilon <= 1):
            raise ConfigError(f"epsilon must be in (0, 1], got {self.effective_epsilon}")
        if math.floor(self.effective_epsilon * 255 + 1e-6) < 1:
            raise ConfigError(f"epsilon {self.effective_epsilon} is below one uint8 level (1/255)")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if self.step_fraction <= 0:
            raise ConfigError(f"step_fraction must be positive, got {self.step_fraction}")
        if self.target_similarity is not None and not -1 <= self.target_similarity <= 1:
            raise ConfigError(f"target_similarity must be in [-1, 1], got {self.target_similarity}")
        if self.check_every < 1:
            raise ConfigError(f"check_every must be >= 1, got {self.check_every}")
        if not (math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise ConfigError(f"feature_weight must be a finite number >= 0, got {self.feature_weight}")
        if parse_guidance(self.guidance) != tuple(self.guidance):
            raise ConfigError(f"guidance must be a tuple of names in the order {GUIDANCE_NAMES}, got {self.guidance}")
        for name, value in (
            ("deflection_weight", self.deflection_weight),
            ("encoder_weight", self.effective_encoder_weight),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        self.antipure.validate()
        for name in ("gain", "ceiling"):
            value = getattr(self.perceptual, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"perceptual {name} must be a finite number > 0, got {value}")
        for message in self.ssim.validate():
            raise ConfigError(message)
        for message in self.jnd.validate():
            raise ConfigError(message)

    @property
    def effective_epsilon(self) -> float:
        """The largest change of any pixel in effect (0..1 scale): ``epsilon``, or the budget's default."""
        return SHAPE_DEFAULTS[self.budget].epsilon if self.epsilon is None else self.epsilon

    @property
    def effective_encoder_weight(self) -> float:
        """The weight of the encoder terms in effect: ``encoder_weight``, or the budget's default."""
        return SHAPE_DEFAULTS[self.budget].encoder_weight if self.encoder_weight is None else self.encoder_weight

    @property
    def levels(self) -> int:
        """The budget in uint8 levels: ``floor(255 * effective_epsilon)``."""
        return math.floor(self.effective_epsilon * 255 + 1e-6)

    def pixel_levels(self, image: np.ndarray) -> int | np.ndarray:
        """The budget of each pixel of the uint8 ``image`` in levels: :attr:`levels` (uniform, ssim, jnd) or an
        ``H x W x 1`` int16 map of at most that (perceptual)."""
        if self.budget != "perceptual":
            return self.levels
        return budget_map(image, self.levels, self.perceptual)[:, :, None]


@dataclass
class ProtectionReport:
    """What protecting one photo did."""

    source: str
    encoders: list[str]
    #: Per encoder: ``cosine_after`` (clean vs protected, each encoder's standard pipeline on the clean face box),
    #: ``cosine_random`` (the same budget of uniform random noise, a baseline), and for encoders with a published
    #: threshold ``score_after`` (native metric) and ``matched_after``.
    similarity: dict[str, dict[str, float | bool]]
    psnr: float
    ssim: float
    linf_levels: int
    steps: int
    seconds: float
    epsilon: float
    #: The budget shape (``ProtectConfig.budget``).
    budget: str
    grayscale: bool = False
    notes: list[str] = field(default_factory=list)
    #: The guidance terms that ran (stage names, see ``ProtectConfig.guidance``).
    guidance: list[str] = field(default_factory=lambda: [ENCODERS])
    #: SSIM on the face box only (where a visible perturbation matters most).
    ssim_face: float = math.nan
    #: Gradient magnitude similarity deviation (0: identical; see :func:`advface.protect.image.quality.gmsd`).
    gmsd: float = math.nan
    #: Visibility of the change in JND units (:func:`advface.protect.image.visibility.visibility` with
    #: ``ProtectConfig.jnd.model``): Minkowski mean and 95th percentile of the map over the face box, Minkowski mean
    #: over the whole photo, share of face-box pixels above 1 JND.
    vis_pooled_face: float = math.nan
    vis_p95_face: float = math.nan
    vis_pooled: float = math.nan
    vis_above_jnd_face: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "source": self.source,
            "encoders": self.encoders,
            "similarity": self.similarity,
            "psnr": round(self.psnr, 3) if math.isfinite(self.psnr) else None,
            "ssim": round(self.ssim, 5),
            "ssim_face": round(self.ssim_face, 5) if math.isfinite(self.ssim_face) else None,
            "gmsd": round(self.gmsd, 5) if math.isfinite(self.gmsd) else None,
            "budget": self.budget,
            **{
                key: round(value, 4) if math.isfinite(value) else None
                for key, value in (
                    ("vis_pooled_face", self.vis_pooled_face),
                    ("vis_p95_face", self.vis_p95_face),
                    ("vis_pooled", self.vis_pooled),
                    ("vis_above_jnd_face", self.vis_above_jnd_face),
                )
            },
            "linf_levels": self.linf_levels,
            "epsilon": self.epsilon,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "grayscale": self.grayscale,
            "guidance": self.guidance,
            "notes": self.notes,
        }


def image_seed(seed: int, image: np.ndarray) -> int:
    """The per-photo seed: ``seed`` mixed with a checksum of the pixels (independent of batch and order)."""
    entropy = [seed & 0xFFFFFFFF, zlib.crc32(image.tobytes()), *image.shape]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _to_tensor(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


def _quantise(clean: np.ndarray, adv: torch.Tensor, levels: int | np.ndarray, gray: bool) -> np.ndarray:
    """Round ``adv`` (``3 x H x W`` in [0, 1]) to uint8 within ``levels`` of ``clean`` (H x W x 3 uint8); ``levels``
    is one number or a per-pixel map that broadcasts to H x W x 3."""
    out = torch.round(adv.detach().clamp(0, 1) * 255.0).permute(1, 2, 0).cpu().numpy().astype(np.int16)
    base = clean.astype(np.int16)
    out = np.clip(out, base - levels, base + levels)
    if gray:  # keep a grey photo grey: one perturbation shared by the channels
        out[:, :, 1] = out[:, :, 2] = out[:, :, 0]
    return np.clip(out, 0, 255).astype(np.uint8)


def _gradient_and_norm(
    loss: torch.Tensor, delta: torch.Tensor, retain_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of ``loss.sum()`` (one value per photo) with respect to ``delta`` and its L2 norm per photo
    (``N x 1 x 1 x 1``, at least 1e-12): every term of the protection is added as ``weight * grad / norm``."""
    (grad,) = torch.autograd.grad(loss.sum(), delta, retain_graph=retain_graph)
    return grad, grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


class ImageProtector:
    """Detector + encoder ensemble + settings; protects photos (:meth:`protect`), batching those of equal size.

    ``surrogate``: the defender surrogate generator (an :class:`IdentityGenerator` or a checkpoint path) that the
    diffusion guidance terms (``deflection``) run on; None: the one shipped with advface, loaded on first use. A
    selected term whose surrogate cannot be loaded is a ConfigError, never a silent fallback to fewer stages."""

    def __init__(
        self,
        encoders: Sequence[EncoderSpec] | None = None,
        detector: str | FaceDetector = "dlib",
        policy: FacePolicy | str = FacePolicy.LARGEST,
        device: str | torch.device | None = None,
        min_face_size: int = MIN_FACE_SIZE,
        surrogate: IdentityGenerator | str | os.PathLike[str] | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.members, self.notes = build_ensemble(encoders, self.device)
        self._surrogate = surrogate
        self._surrogate_parts: tuple[IdentityGenerator, torch.nn.Module, ChipSpec] | None = None
        self._deflection: DeflectionTerm | None = None
        self._antipure: AntiPureTerm | None = None
        self.detector = create_detector(detector)
        self.policy = FacePolicy.parse(policy)
        if self.policy is FacePolicy.ALL:
            raise ConfigError("image protection protects one face per photo; use largest, center, best-score or single")
        self.min_face_size = int(min_face_size)

    def subset(self, names: Sequence[str]) -> ImageProtector:
        """A protector sharing this one's detector and models but attacking only the encoders in ``names``."""
        members = [m for m in self.members if m.name in names]
        missing = set(names) - {m.name for m in members}
        if missing or not members:
            raise ConfigError(f"encoders {sorted(missing) or list(names)} are not in the ensemble {self.encoder_names}")
        other = copy.copy(self)
        other.members = members
        return other

    @property
    def deflection(self) -> DeflectionTerm:
        """The deflection term on the surrogate (loaded on first use); ConfigError when it cannot be loaded."""
        if self._deflection is None:
            self._deflection = DeflectionTerm(*self._load_surrogate())
        return self._deflection

    @property
    def antipure(self) -> AntiPureTerm:
        """The AntiPure term on the surrogate (loaded on first use); ConfigError when it cannot be loaded."""
        if self._antipure is None:
            readers = tuple(IdentityReader(m.name, m.module, m.chip) for m in self.members)
            self._antipure = AntiPureTerm(*self._load_surrogate(), readers=readers)
        return self._antipure

    def _load_surrogate(self) -> tuple[IdentityGenerator, torch.nn.Module, ChipSpec]:
        """``(generator, its conditioning encoder's differentiable module, that encoder's chip)``, loaded once;
        the ensemble's member is reused when the ensemble has the encoder."""
        if self._surrogate_parts is None:
            from advface.generative.model import load_generator
            from advface.generative.shipped import shipped_surrogate_path

            surrogate = self._surrogate
            if isinstance(surrogate, IdentityGenerator):
                generator = surrogate
            else:
                generator = load_generator(surrogate if surrogate is not None else shipped_surrogate_path())
            generator.to(self.device)
            name = str(generator.metadata.get("encoder", "dlib"))
            differentiable = "dlib-torch" if name == "dlib" else name
            member = next((m for m in self.members if m.name in (name, differentiable)), None)
            if member is None:
                member = build_ensemble([differentiable], self.device)[0][0]
            self._surrogate_parts = (generator, member.module, member.encoder.chip)
        return self._surrogate_parts

    @property
    def encoder_names(self) -> list[str]:
        """Names of the ensemble's encoders."""
        return [m.name for m in self.members]

    # ------------------------------------------------------------------------------------------ faces

    def find_face(self, image: np.ndarray, source: str = "<array>") -> Face:
        """The face to protect: detected on the clean image, chosen by the policy; ImageError if none or tiny."""
        from advface.faces.pipeline import FaceChipper

        chipper = FaceChipper(self.detector, self.members[0].chip, self.policy)
        face = chipper.select(image, source)[0]
        x1, y1, x2, y2 = face.box
        if x2 - x1 < self.min_face_size:
            raise ImageError(source, f"face too small ({x2 - x1:.0f} px wide < {self.min_face_size} px)")
        return face

    def embed_standard(self, image: np.ndarray, face: Face) -> dict[str, np.ndarray]:
        """Each encoder's embedding of ``face`` in ``image`` through its standard (non-differentiable) pipeline."""
        return {m.name: m.encoder.embed(align_face(image, face, m.chip))[0] for m in self.members}

    # ------------------------------------------------------------------------------------------ protection

    def protect(
        self,
        images: Sequence[np.ndarray],
        config: ProtectConfig | None = None,
        sources: Sequence[str] | None = None,
        faces: Sequence[Face | None] | None = None,
        grayscale: Sequence[bool] | None = None,
        batch_size: int = 8,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[tuple[np.ndarray, ProtectionReport]]:
        """Protect RGB uint8 photos; returns ``(protected uint8, report)`` per photo, in order.

        Photos of the same size are optimised together, up to ``batch_size`` at a time. ``faces`` may give the
        face of a photo (else it is detected); a photo without a usable face raises ImageError (callers that must
        not stop catch it per photo, or call :meth:`find_face` first). ``grayscale[i]`` keeps photo i grey (one
        perturbation for all channels). ``should_stop`` is asked before every optimisation step (a deadline passed,
        the caller gone): when it answers True the work stops there with DeadlineExceededError and nothing is
        returned.
        """
        config = config or ProtectConfig()
        config.validate()
        self.check_guidance(config)
        n = len(images)
        sources = list(sources) if sources is not None else [f"<image {i}>" for i in range(n)]
        images = [check_image(img, src) for img, src in zip(images, sources)]
        given: list[Face | None] = list(faces) if faces is not None else [None] * n
        faces_list = [f if f is not None else self.find_face(img, src) for img, src, f in zip(images, sources, given)]
        gray = list(grayscale) if grayscale is not None else [False] * n
        results: list[tuple[np.ndarray, ProtectionReport] | None] = [None] * n
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.shape, []).append(i)
        chunks = [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
        for idx in chunks:
            start = time.perf_counter()
            outs, steps = self._optimise(
                [images[i] for i in idx], [faces_list[i] for i in idx], [gray[i] for i in idx], config, should_stop
            )
            seconds = (time.perf_counter() - start) / len(idx)
            for j, i in enumerate(idx):
                report = self._report(images[i], outs[j], faces_list[i], sources[i], steps[j], seconds, config, gray[i])
                results[i] = (outs[j], report)
        return [r for r in results if r is not None]

    def check_guidance(self, config: ProtectConfig) -> None:
        """ConfigError when ``config`` selects a guidance term this protector cannot run."""
        needed = sorted(NEEDS_SURROGATE & set(config.guidance))
        if needed:
            try:
                self._load_surrogate()  # now, before any photo is touched
            except ConfigError as exc:
                raise ConfigError(f"guidance {', '.join(needed)} needs the defender surrogate: {exc}") from None

    def _optimise(
        self,
        images: list[np.ndarray],
        faces: list[Face],
        gray: list[bool],
        config: ProtectConfig,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[list[np.ndarray], list[int]]:
        """Batched PGD over photos of one size; returns the uint8 photos and the steps each ran."""
        dev = self.device
        b = len(images)
        hw = images[0].shape[:2]
        x = _to_tensor(images, dev)
        levels = [config.pixel_levels(img) for img in images]
        eps = _eps(levels, dev)
        gens = [torch.Generator().manual_seed(image_seed(config.seed, img)) for img in images]
        thetas = [
            torch.from_numpy(np.stack([chip_theta(alignment_matrix(f, m.chip), hw, m.chip.size) for f in faces])).to(
                dev
            )
            for m in self.members
        ]
        gray_mask = torch.tensor(gray, device=dev).view(b, 1, 1, 1)
        with torch.no_grad():
            clean = [m.module(warp_chips(x, th, m.chip.size)) for m, th in zip(self.members, thetas)]
        surrogate_terms = self._surrogate_terms(config)
        if surrogate_terms:
            chip = self._load_surrogate()[2]
            surrogate_theta = torch.from_numpy(
                np.stack([chip_theta(alignment_matrix(f, chip), hw, chip.size) for f in faces])
            ).to(dev)
            for term, _, _ in surrogate_terms:
                term.prepare(x, surrogate_theta)
        use_encoders = ENCODERS in config.guidance
        delta = torch.zeros_like(x)
        if config.random_start:
            for i, g in enumerate(gens):
                delta[i] = (torch.rand(x.shape[1:], generator=g) * 2 - 1).to(dev) * (
                    eps[i] if isinstance(eps, torch.Tensor) else eps
                )
        delta = self._project(x, delta, eps, gray_mask)
        active = torch.ones(b, dtype=torch.bool, device=dev)
        steps_run = [config.steps] * b
        use_ssim, use_jnd = config.budget == "ssim", config.budget == "jnd"
        boxes = [f.box for f in faces]
        areas = face_area(boxes, *hw)
        dual = config.jnd if use_jnd else config.ssim
        multipliers = torch.full((b,), dual.multiplier, device=dev)
        photo_multipliers = torch.full((b,), dual.min_multiplier, device=dev)
        seen = VisibilityMap(x, config.jnd.model) if use_jnd else None  # the clean photos' terms, once
        base_step = config.step_fraction * eps
        encoder_weight = config.effective_encoder_weight
        for step in range(config.steps):
            if should_stop is not None and should_stop():
                raise DeadlineExceededError(f"protection stopped after {step} of {config.steps} steps")
            alpha = base_step * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, config.steps))))
            delta.requires_grad_(True)
            shaped = self._shape(x, delta, eps, gray_mask)
            adv = x + shaped
            if config.eot:
                adv = torch.cat([random_transform(adv[i : i + 1], config.eot_config, gens[i]) for i in range(b)])
            total = torch.zeros_like(x)
            for m, th, ref in zip(self.members if use_encoders else [], thetas, clean):
                if config.eot:
                    th = torch.stack([jitter_theta(th[i], config.eot_config, gens[i]) for i in range(b)])
                layers = m.feature_layers if config.feature_weight > 0 else ()
                clean_maps: list[torch.Tensor] = []
                if layers:  # the clean maps under this step's jittered alignment
                    with torch.no_grad(), capture_outputs(m.module, layers) as clean_maps:
                        m.module(warp_chips(x, th, m.chip.size))
                with capture_outputs(m.module, layers) as maps:
                    emb = m.module(warp_chips(adv, th, m.chip.size))
                terms = [(F.cosine_similarity(emb, ref, dim=1), 1.0)]
                terms += [
                    (F.cosine_similarity(f.flatten(1), c.flatten(1), dim=1), config.feature_weight)
                    for f, c in zip(maps, clean_maps)
                ]
                for cos, weight in terms:
                    grad, norm = _gradient_and_norm(cos, delta, retain_graph=True)
                    total += encoder_weight * weight * grad / norm
            if surrogate_terms:
                th = surrogate_theta
                if config.eot:
                    th = torch.stack([jitter_theta(th[i], config.eot_config, gens[i]) for i in range(b)])
                losses = [(loss, w * weight) for _, fn, w in surrogate_terms for loss, weight in fn(adv, th, gens)]
                for k, (loss, weight) in enumerate(losses):
                    grad, norm = _gradient_and_norm(loss, delta, retain_graph=k < len(losses) - 1)
                    total += weight * grad / norm
            constrained = (use_ssim or use_jnd) and step >= dual.sign_share * config.steps
            if constrained:  # the terms above freed their graph, the filter's part of it included
                shaped = self._shape(x, delta, eps, gray_mask)
            if constrained and seen is not None:  # the visibility term: lower the face's (and photo's) JND statistic
                multipliers, photo_multipliers = self._jnd_term(
                    seen, x, delta, shaped, boxes, config.jnd, total, multipliers, photo_multipliers
                )
            elif constrained:  # the quality term: raise the face SSIM, weighted by the adaptive multiplier
                quality = face_ssim(x, x + shaped, boxes, config.ssim.scales)
                photo_target = config.ssim.whole_photo_target
                grad, norm = _gradient_and_norm(-quality, delta, retain_graph=photo_target is not None)
                total += multipliers.view(b, 1, 1, 1) * grad / norm
                multipliers = update_multipliers(multipliers, quality.detach(), config.ssim)
                if photo_target is not None:  # the whole photo's SSIM, with its own multiplier
                    whole = photo_ssim(x, x + shaped, pad=True, scales=config.ssim.scales)
                    photo_multipliers = update_multipliers(
                        photo_multipliers, whole.detach(), config.ssim, photo_target, hinge=True
                    )
                    grad, norm = _gradient_and_norm(-whole, delta)
                    total += photo_multipliers.view(b, 1, 1, 1) * grad / norm
            with torch.no_grad():
                move = normalised_step(total, areas) if constrained else torch.sign(total)
                delta = delta.detach() - alpha * move * active.view(b, 1, 1, 1)
                delta = self._project(x, delta, eps, gray_mask)
                last = step == config.steps - 1
                if config.target_similarity is not None and not last and (step + 1) % config.check_every == 0:
                    adv = x + self._shape(x, delta, eps, gray_mask)
                    done = self._similarity(adv, thetas, clean).amax(dim=0) <= config.target_similarity
                    for i in torch.nonzero(done & active).flatten().tolist():
                        steps_run[i] = step + 1
                    active &= ~done
                    if not active.any():
                        break
        with torch.no_grad():
            adv = x + self._shape(x, delta, eps, gray_mask)
        outs = [_quantise(images[i], adv[i], levels[i], gray[i]) for i in range(b)]
        return outs, steps_run

    @staticmethod
    def _jnd_term(
        seen: VisibilityMap,
        x: torch.Tensor,
        delta: torch.Tensor,
        shaped: torch.Tensor,
        boxes: Sequence[Sequence[float]],
        params: JndBudget,
        total: torch.Tensor,
        multipliers: torch.Tensor,
        photo_multipliers: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the JND budget's weighted constraint gradients to ``total`` (in place): the visibility of ``shaped``
        (the photo's perturbation, :meth:`_shape`), differentiated with respect to the optimised ``delta``; returns
        the updated face and whole-photo multipliers (dual ascent on the negated statistics)."""
        b = x.shape[0]
        power = seen.power(x + shaped)
        face = face_statistic(power, boxes, params)
        photo_target = params.whole_photo_target
        grad, norm = _gradient_and_norm(face, delta, retain_graph=photo_target is not None)
        total += multipliers.view(b, 1, 1, 1) * grad / norm
        multipliers = update_multipliers(multipliers, -face.detach(), params, -params.target)
        if photo_target is not None:
            whole = pooled_statistic(power, params)
            photo_multipliers = update_multipliers(
                photo_multipliers, -whole.detach(), params, -photo_target, hinge=True
            )
            grad, norm = _gradient_and_norm(whole, delta)
            total += photo_multipliers.view(b, 1, 1, 1) * grad / norm
        return multipliers, photo_multipliers

    def _surrogate_terms(self, config: ProtectConfig) -> list[tuple[SurrogateTerm, SurrogateLosses, float]]:
        """The selected terms that run on the surrogate: ``(term, its losses under config, outer weight)``."""
        terms: list[tuple[SurrogateTerm, SurrogateLosses, float]] = []
        if DEFLECTION in config.guidance:
            terms.append((self.deflection, self.deflection.losses, config.deflection_weight))
        if ANTIPURE in config.guidance:
            antipure = self.antipure
            terms.append((antipure, functools.partial(antipure.losses, config=config.antipure), 1.0))
        return terms

    def _shape(
        self, x: torch.Tensor, delta: torch.Tensor, eps: float | torch.Tensor, gray_mask: torch.Tensor
    ) -> torch.Tensor:
        """The perturbation the photo gets from the optimised variable ``delta`` (already projected): ``delta``
        itself. A subclass may reparametrise it (a filter, then the projection); the steps then follow the gradient
        through that map."""
        return delta

    @staticmethod
    def _project(
        x: torch.Tensor, delta: torch.Tensor, eps: float | torch.Tensor, gray_mask: torch.Tensor
    ) -> torch.Tensor:
        """Into the L-inf ball (radius one number or a per-pixel ``N x 1 x H x W`` map) and the [0, 1] box; grey
        photos get the channel mean as their one perturbation."""
        delta = torch.where(gray_mask, delta.mean(dim=1, keepdim=True).expand_as(delta), delta)
        if isinstance(eps, torch.Tensor):  # a per-pixel ball
            delta = torch.maximum(torch.minimum(delta, eps), -eps)
        else:
            delta = delta.clamp(-eps, eps)
        return (x + delta).clamp(0, 1) - x

    def _similarity(self, adv: torch.Tensor, thetas: list[torch.Tensor], clean: list[torch.Tensor]) -> torch.Tensor:
        """``members x N`` cosines of clean vs ``adv`` (uint8-rounded) through the differentiable warps, no EOT."""
        adv = torch.round(adv.clamp(0, 1) * 255.0) / 255.0
        return torch.stack(
            [
                F.cosine_similarity(m.module(warp_chips(adv, th, m.chip.size)), ref, dim=1)
                for m, th, ref in zip(self.members, thetas, clean)
            ]
        )

    def _report(
        self,
        clean: np.ndarray,
        protected: np.ndarray,
        face: Face,
        source: str,
        steps: int,
        seconds: float,
        config: ProtectConfig,
        gray: bool,
    ) -> ProtectionReport:
        before = self.embed_standard(clean, face)
        after = self.embed_standard(protected, face)
        rng = np.random.default_rng(image_seed(config.seed + 1, clean))
        levels = config.pixel_levels(clean)
        noise = rng.integers(-levels, levels + 1, size=clean.shape)
        noisy = np.clip(clean.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        random = self.embed_standard(noisy, face)
        similarity: dict[str, dict[str, float | bool]] = {}
        for m in self.members:
            entry: dict[str, float | bool] = {
                "cosine_after": _cosine(before[m.name], after[m.name]),
                "cosine_random": _cosine(before[m.name], random[m.name]),
            }
            threshold = m.encoder.default_threshold
            if threshold is not None:
                score = float(m.encoder.score(before[m.name], after[m.name])[0])
                entry["score_after"] = score
                entry["matched_after"] = bool(score >= threshold)
            similarity[m.name] = entry
        seen = visibility(clean, protected, face.box, config.jnd.model)
        return ProtectionReport(
            source=source,
            encoders=self.encoder_names,
            similarity=similarity,
            psnr=psnr(clean, protected),
            ssim=ssim(clean, protected),
            ssim_face=ssim_face(clean, protected, face.box),
            gmsd=gmsd(clean, protected),
            budget=config.budget,
            linf_levels=linf(clean, protected),
            steps=steps,
            seconds=seconds,
            epsilon=config.effective_epsilon,
            grayscale=gray,
            notes=list(self.notes),
            guidance=list(config.guidance),
            vis_pooled_face=float(seen.pooled_face or math.nan),
            vis_p95_face=float(seen.p95_face or math.nan),
            vis_pooled=seen.pooled,
            vis_above_jnd_face=float(math.nan if seen.above_jnd_face is None else seen.above_jnd_face),
        )


@contextlib.contextmanager
def capture_outputs(module: torch.nn.Module, paths: Sequence[str]) -> Iterator[list[torch.Tensor]]:
    """Within the block, the outputs of ``module``'s submodules ``paths`` are appended (in call order) to the list
    it yields; the hooks are removed on exit. No paths: an empty list and no hooks."""
    captured: list[torch.Tensor] = []
    handles = [module.get_submodule(p).register_forward_hook(lambda _m, _i, out: captured.append(out)) for p in paths]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _eps(levels: Sequence[int | np.ndarray], device: torch.device) -> float | torch.Tensor:
    """The L-inf radius on the 0..1 scale from each photo's budget in levels: one number when all are the same
    uniform budget, else an ``N x 1 x H x W`` map."""
    if all(isinstance(lv, int) for lv in levels) and len({int(lv) for lv in levels}) == 1:
        return int(levels[0]) / 255.0
    shape = next(lv.shape for lv in levels if isinstance(lv, np.ndarray))
    maps = [np.broadcast_to(np.asarray(lv, dtype=np.float32), shape) for lv in levels]
    return torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).contiguous().to(device) / 255.0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


#: Protectors built by :func:`protect_image` for encoder-name lists (models load once per process).
_PROTECTORS: dict[tuple[Any, ...], ImageProtector] = {}


def protect_image(
    image: np.ndarray,
    encoders: Sequence[EncoderSpec] | ImageProtector | None = None,
    epsilon: float | None = None,
    steps: int = ProtectConfig.steps,
    seed: int = 0,
    eot: bool = True,
    target_similarity: float | None = None,
    **config: Any,
) -> tuple[np.ndarray, ProtectionReport]:
    """Protect one RGB uint8 photo (see :class:`ImageProtector`); returns the protected uint8 photo and its report.

    ``encoders``: encoder specs (default dlib-torch + MobileFaceNet; MobileFaceNet is left out with a note when its
    model file is absent) or a ready :class:`ImageProtector` (reuse one for many photos: loading costs seconds).
    Extra keyword arguments go to :class:`ProtectConfig`.
    """
    if isinstance(encoders, ImageProtector):
        protector = encoders
    elif encoders is None or all(isinstance(e, str) for e in encoders):
        key = tuple(encoders) if encoders is not None else None
        protector = _PROTECTORS.get((key,)) or _PROTECTORS.setdefault((key,), ImageProtector(encoders))
    else:
        protector = ImageProtector(encoders)
    cfg = ProtectConfig(epsilon=epsilon, steps=steps, seed=seed, eot=eot, target_similarity=target_similarity, **config)
    return protector.protect([image], cfg)[0]
