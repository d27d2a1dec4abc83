"""AntiPure: a protective perturbation that survives diffusion purification, on the defender surrogate.

A thief can *purify* a protected photo before personalising it (DiffPure: noise the photo's latent to a small time
``t*``, denoise it back without an identity condition; :meth:`advface.generative.model.IdentityGenerator.purify`).
AntiPure (``../shared/papers/001_*``: only the abstract is available; what follows is advface's reading of its two
mechanisms on advface's own latent generator) adds guidance that makes the perturbation persist through that pass.
At each protection step, for every photo, the face chip is cut out in the generator's frame and encoded to a latent
``z``; ``z`` is noised to a random ``t`` in the purification range and the surrogate's one-step unconditional
estimate of the clean latent, decoded, stands in for the purified face ``P`` (a differentiable one-step
approximation of the thief's multi-step pass). Three losses, each returned separately so the caller normalises
their gradients as it does for every term:

- **identity after purification** -- cosine between the conditioning encoder's embedding of ``P`` and of the clean
  photo: descending it makes the *purified* face carry the perturbed identity, which is what the threats that follow
  purification (training-free and training-based personalisation) read;
- **patch-wise frequency guidance** -- the high-frequency content of ``P`` should equal the protected chip's, patch
  by patch (each ``patch x patch`` block's 2-D DCT coefficients outside its lowest frequencies): the
  purifier's influence over the high frequencies that carry the perturbation shrinks;
- **erroneous timestep guidance** -- the surrogate's clean-latent prediction at the drawn time ``t`` is pulled
  towards the one it makes when told a wrong, smaller time ``t' = wrong_time * t`` (held fixed): its denoising
  strategy becomes that of a lower noise level, so purification removes less than the noise it added and the
  perturbation stays.

Two options of the identity loss (:class:`AntiPureConfig`): ``identity_encoders="ensemble"`` (the default since
issue #18's measurement, with ``identity_weight`` 2) reads ``P`` with every encoder of the protection ensemble, not
only the conditioning one (each encoder's chip is cut from ``P`` through the fixed similarity between the two chip
frames, as a judge reads a generated face), one loss per encoder; and ``decoy_weight > 0`` (off by default: it did
not help in the measurement) adds a *targeted* loss, the negated cosine between ``P``'s embedding and that of a
fixed decoy face (one of ``decoy_candidates`` faces the surrogate draws unconditionally from ``decoy_seed``, per
photo the one least like it): a consistent target for all of a person's photos, as Mist / Anti-DreamBooth use
against fine-tuning, instead of only "away" directions that differ from photo to photo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from advface.audit.transfer import chip_frame_matrix
from advface.encoders.base import ChipSpec
from advface.errors import ConfigError
from advface.generative.diffusion import alpha_sigma, ddim_sample
from advface.protect.image.surrogate_term import SurrogateTerm
from advface.protect.image.warp import chip_theta, warp_chips

ANTIPURE = "antipure"
#: ``AntiPureConfig.identity_encoders``: the surrogate's conditioning encoder alone, or every ensemble encoder.
SURROGATE_ENCODER, ENSEMBLE_ENCODERS = "surrogate", "ensemble"
IDENTITY_ENCODERS: tuple[str, ...] = (SURROGATE_ENCODER, ENSEMBLE_ENCODERS)


@dataclass(frozen=True)
class AntiPureConfig:
    """AntiPure's settings: purification times drawn uniformly from ``t_range`` (the thief's ``t*``), DCT blocks of
    ``patch`` pixels whose coefficients with both indices <= ``low_radius`` count as low, the relative weights of the
    identity, frequency and timestep losses (each loss's gradient is normalised before weighting), and the wrong time
    the timestep loss tells the surrogate, as a fraction ``wrong_time`` of the true one. ``identity_encoders``: who
    reads the purified face's identity, ``surrogate`` (the conditioning encoder) or ``ensemble`` (every encoder of
    the protection ensemble, one loss of ``identity_weight`` each); ``decoy_weight``: weight of the targeted loss
    towards a decoy face (0: off; per reader, like the identity loss), chosen among ``decoy_candidates`` faces the
    surrogate draws from ``decoy_seed`` in ``decoy_steps`` sampling steps."""

    t_range: tuple[float, float] = (0.05, 0.35)
    patch: int = 8
    low_radius: int = 1
    identity_weight: float = 2.0
    frequency_weight: float = 0.5
    timestep_weight: float = 0.5
    wrong_time: float = 0.3
    identity_encoders: str = ENSEMBLE_ENCODERS
    decoy_weight: float = 0.0
    decoy_candidates: int = 4
    decoy_seed: int = 0
    decoy_steps: int = 25

    def validate(self) -> None:
        """ConfigError for settings outside their ranges."""
        lo, hi = self.t_range
        if not 0 < lo <= hi < 1:
            raise ConfigError(f"antipure times must satisfy 0 < low <= high < 1, got {self.t_range}")
        if self.patch < 2 or not 0 <= self.low_radius < self.patch - 1:
            raise ConfigError(
                f"antipure patch must be >= 2 and low_radius in [0, patch - 1), got {self.patch}, {self.low_radius}"
            )
        if not 0 < self.wrong_time < 1:
            raise ConfigError(f"antipure wrong_time must be in (0, 1), got {self.wrong_time}")
        weights = (self.identity_weight, self.frequency_weight, self.timestep_weight, self.decoy_weight)
        if any(not (0 <= w < float("inf")) for w in weights) or not any(weights):
            raise ConfigError(f"antipure weights must be finite, >= 0 and not all 0, got {weights}")
        if self.identity_encoders not in IDENTITY_ENCODERS:
            raise ConfigError(
                f"antipure identity_encoders must be one of {', '.join(IDENTITY_ENCODERS)}, "
                f"got {self.identity_encoders!r}"
            )
        if self.decoy_candidates < 1 or self.decoy_steps < 1:
            raise ConfigError(
                "antipure decoy_candidates and decoy_steps must be >= 1, "
                f"got {self.decoy_candidates}, {self.decoy_steps}"
            )


def dct_matrix(n: int, device: torch.device | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix of size ``n`` (rows: frequencies)."""
    k = torch.arange(n, dtype=torch.float32, device=device)
    m = torch.cos(math.pi / n * (k[None, :] + 0.5) * k[:, None]) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def high_frequency(images: torch.Tensor, patch: int, low_radius: int) -> torch.Tensor:
    """Per-block high-frequency content of ``images`` (``N x C x H x W``, H and W cropped to multiples of
    ``patch``): the 2-D DCT of every ``patch x patch`` block with the coefficients whose two frequency indices are
    both at most ``low_radius`` set to 0; shape ``N x C x blocks x patch x patch``. (A DCT, not an FFT: a block's
    smooth gradient stays in the low coefficients instead of leaking through the wrap-around edge.)"""
    n, c, h, w = images.shape
    h, w = h - h % patch, w - w % patch
    if h == 0 or w == 0:
        raise ValueError(f"images of {tuple(images.shape[-2:])} are smaller than one {patch}-pixel block")
    blocks = images[..., :h, :w].unfold(2, patch, patch).unfold(3, patch, patch).reshape(n, c, -1, patch, patch)
    d = dct_matrix(patch, images.device)
    coefficients = d @ blocks @ d.T
    idx = torch.arange(patch, device=images.device)
    low = (idx[:, None] <= low_radius) & (idx[None, :] <= low_radius)
    return coefficients * (~low).to(coefficients.dtype)


@dataclass(frozen=True)
class IdentityReader:
    """An encoder that reads the purified face's identity: its differentiable module and chip."""

    name: str
    module: torch.nn.Module
    chip: ChipSpec


@dataclass
class AntiPureTerm(SurrogateTerm):
    """AntiPure's losses on a generator (see the module docs). ``readers``: the protection ensemble's encoders, read
    with ``identity_encoders="ensemble"`` (the conditioning encoder, ``module``, is always read; a reader with the
    same module is skipped)."""

    name: str = ANTIPURE
    readers: Sequence[IdentityReader] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._reader_clean: list[torch.Tensor] = []
        self._decoys: dict[tuple[int, int, int], torch.Tensor] = {}
        self._decoy_choice: list[torch.Tensor] | None = None

    def _frame_theta(self, size: int, chip: ChipSpec, n: int, device: torch.device) -> torch.Tensor:
        """``n`` copies of the theta cutting ``chip``'s chip out of a ``size``-pixel image in this term's chip frame."""
        matrix = chip_frame_matrix(self.chip, size, chip)
        theta = torch.from_numpy(chip_theta(matrix, (size, size), chip.size)).to(device)
        return theta[None].expand(n, 2, 3)

    def identity_readers(self, encoders: str) -> list[IdentityReader]:
        """The encoders that read the purified face under ``identity_encoders=encoders``, the conditioning one
        first."""
        own = IdentityReader("surrogate", self.module, self.chip)
        if encoders == SURROGATE_ENCODER:
            return [own]
        return [own, *(r for r in self.readers if r.module is not self.module)]

    def read(self, faces: torch.Tensor, encoders: str) -> list[torch.Tensor]:
        """Each reader's embeddings of ``faces`` (``N x 3 x S x S`` in [0, 1], this term's chip frame)."""
        out = []
        for reader in self.identity_readers(encoders):
            if reader.module is self.module:
                chips = F.interpolate(faces, size=(self.chip.size,) * 2, mode="bilinear", align_corners=False)
            else:
                theta = self._frame_theta(faces.shape[-1], reader.chip, len(faces), faces.device)
                chips = warp_chips(faces, theta, reader.chip.size)
            out.append(reader.module(chips))
        return out

    @torch.no_grad()
    def prepare(self, clean: torch.Tensor, thetas: torch.Tensor) -> None:
        """As :meth:`SurrogateTerm.prepare`, and each ensemble reader's embedding of the clean chip."""
        super().prepare(clean, thetas)
        chips = warp_chips(clean, thetas, self.chip.size)
        self._reader_clean = [e.detach() for e in self.read(chips, ENSEMBLE_ENCODERS)]
        self._decoy_choice = None

    @torch.no_grad()
    def decoy_faces(self, count: int, seed: int, steps: int) -> torch.Tensor:
        """``count`` faces (``count x 3 x S x S`` in [0, 1]) the surrogate draws unconditionally from ``seed``
        (kept: the same decoys for every photo)."""
        key = (count, seed, steps)
        if key not in self._decoys:
            device = next(self.generator.denoiser.parameters()).device
            noise = torch.randn((count, *self.generator.latent_shape()), generator=torch.Generator().manual_seed(seed))
            null = torch.zeros((count, self.generator.dim), device=device)
            latents = ddim_sample(
                self.generator.denoiser,
                null,
                self.generator.latent_shape(),
                steps=steps,
                guidance=0.0,
                start=noise.to(device),
            )
            self._decoys[key] = self.generator.autoencoder.decode(latents).clamp(0, 1)
        return self._decoys[key]

    def decoy_embeddings(self, n: int, config: AntiPureConfig) -> list[torch.Tensor]:
        """Per reader (as :meth:`read` with ``config.identity_encoders``), the embedding of each photo's decoy: the
        candidate face whose mean cosine to the clean photo over all ensemble readers is lowest."""
        if self._decoy_choice is None or len(self._decoy_choice[0]) != n:
            self.clean_embeddings(n)  # raises when prepare was not called
            faces = self.decoy_faces(config.decoy_candidates, config.decoy_seed, config.decoy_steps)
            with torch.no_grad():
                candidates = self.read(faces, ENSEMBLE_ENCODERS)
                similarity = torch.stack(
                    [F.normalize(r, dim=1) @ F.normalize(c, dim=1).T for r, c in zip(self._reader_clean, candidates)]
                ).mean(dim=0)  # n x candidates
                pick = similarity.argmin(dim=1)
            self._decoy_choice = [c[pick].detach() for c in candidates]
        count = len(self.identity_readers(config.identity_encoders))
        return self._decoy_choice[:count]

    def purified(
        self,
        adv: torch.Tensor,
        thetas: torch.Tensor,
        generators: Sequence[torch.Generator],
        t_range: tuple[float, float] = AntiPureConfig.t_range,
        wrong_time: float = AntiPureConfig.wrong_time,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(small, P, shift)``: the perturbed chips at the generator's size, their one-step purification ``P``
        (both ``N x 3 x S x S`` in [0, 1]) and, per photo, the squared distance between the clean-latent prediction
        at the drawn time and the (fixed) one made at ``wrong_time`` x that time."""
        _, small = self.chips(adv, thetas)
        z = self.generator.autoencoder.encode(small)
        t, noise = self.draw(generators, z.shape[1:], t_range, adv.device)
        alpha, sigma = (s[:, None, None, None] for s in alpha_sigma(t))
        x_t = alpha * z + sigma * noise
        null = torch.zeros((len(z), self.generator.dim), device=adv.device)
        drop = torch.ones(len(z), dtype=torch.bool, device=adv.device)
        v = self.generator.denoiser(x_t, t, null, drop)
        x0 = alpha * x_t - sigma * v
        with torch.no_grad():
            t_wrong = t * wrong_time
            a_wrong, s_wrong = (s[:, None, None, None] for s in alpha_sigma(t_wrong))
            x0_wrong = a_wrong * x_t - s_wrong * self.generator.denoiser(x_t, t_wrong, null, drop)
        shift = (x0 - x0_wrong).pow(2).flatten(1).mean(dim=1)
        return small, self.generator.autoencoder.decode(x0), shift

    def losses(
        self,
        adv: torch.Tensor,
        thetas: torch.Tensor,
        generators: Sequence[torch.Generator],
        config: AntiPureConfig = AntiPureConfig(),
    ) -> list[tuple[torch.Tensor, float]]:
        """``(per-photo loss, weight)`` of each loss with a non-zero weight under ``config``; lower is better for
        the protection."""
        self.clean_embeddings(len(adv))  # raises when prepare was not called
        c = config
        small, purified, shift = self.purified(adv, thetas, generators, c.t_range, c.wrong_time)
        out: list[tuple[torch.Tensor, float]] = []
        if c.identity_weight > 0 or c.decoy_weight > 0:
            read = self.read(purified, c.identity_encoders)
            references = self._reader_clean[: len(read)]
            if c.identity_weight > 0:
                out += [(F.cosine_similarity(e, ref, dim=1), c.identity_weight) for e, ref in zip(read, references)]
            if c.decoy_weight > 0:
                decoys = self.decoy_embeddings(len(adv), c)
                out += [(-F.cosine_similarity(e, d, dim=1), c.decoy_weight) for e, d in zip(read, decoys)]
        if c.frequency_weight > 0:
            gap = high_frequency(purified, c.patch, c.low_radius) - high_frequency(small, c.patch, c.low_radius)
            out.append((gap.pow(2).flatten(1).mean(dim=1), c.frequency_weight))
        if c.timestep_weight > 0:
            out.append((shift, c.timestep_weight))
        return out
