"""Settings of the generator's parts and of its training (plain dataclasses: no torch needed to read them, so the
command line can show their defaults cheaply)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from advface.errors import ConfigError

#: Where the DreamBooth analogue's identity condition starts (``threats.finetune``): ``random``, or ``embedding`` --
#: the mean of the photos' encoder embeddings, for an attacker who has the encoder that conditions the generator.
CONDITION_STARTS = ("random", "embedding")


@dataclass(frozen=True)
class PersonaliseConfig:
    """Learning an identity condition from a few photos: Adam ``steps`` at learning rate ``lr``, ``batch`` noisy
    copies of the photos' latents per step, ``seed`` of the draws and of the initial condition."""

    steps: int = 200
    lr: float = 0.05
    batch: int = 16
    seed: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    """DreamBooth analogue: ``steps`` of Adam on the denoiser's weights (learning rate ``lr``) and on the identity
    condition (``condition_lr``), ``batch`` noisy copies of the photos' latents (mirrors included) per step."""

    steps: int = 150
    lr: float = 2e-4
    condition_lr: float = 0.05
    batch: int = 16
    seed: int = 0


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of the autoencoder: ``image_size`` (divisible by 4), ``latent_channels``, base ``width``,
    residual ``blocks`` per stage."""

    image_size: int = 64
    latent_channels: int = 4
    width: int = 64
    blocks: int = 1

    @property
    def latent_size(self) -> int:
        """Side of the latent grid."""
        return self.image_size // 4

    def to_dict(self) -> dict[str, int]:
        """JSON-able form (checkpoint metadata)."""
        return asdict(self)


@dataclass(frozen=True)
class DenoiserConfig:
    """Shape of the denoiser: ``latent_channels`` and ``latent_size`` (from the autoencoder), ``cond_dim`` (the
    encoder's embedding dimension), base ``width``, width ``multipliers`` per resolution (each halves the size),
    identity ``tokens`` for cross-attention, attention ``heads``."""

    latent_channels: int = 4
    latent_size: int = 16
    cond_dim: int = 128
    width: int = 64
    multipliers: tuple[int, ...] = (1, 2, 3)
    tokens: int = 4
    heads: int = 4

    def to_dict(self) -> dict[str, object]:
        """JSON-able form (checkpoint metadata)."""
        out = asdict(self)
        out["multipliers"] = list(self.multipliers)
        return out


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Every setting of a generator training run (all recorded in the checkpoint's metadata)."""

    image_size: int = 64
    latent_channels: int = 4
    ae_width: int = 32
    ae_steps: int = 2000
    ae_batch: int = 32
    ae_lr: float = 4e-4
    width: int = 32
    multipliers: tuple[int, ...] = (1, 2, 4)
    tokens: int = 4
    steps: int = 25_000
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 500
    ema_decay: float = 0.999
    cond_drop: float = 0.1
    seed: int = 0
    device: str | None = None
    threads: int = 0
    checkpoint_minutes: float = 5.0
    #: DCGAN samples (gan-face-generate) added to the training faces (see advface.generative.extra_faces); 0: none
    extra_dcgan: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved_device(self) -> str:
        """``device``, or ``cuda`` when available, else ``cpu``."""
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def check(self) -> None:
        """ConfigError for out-of-range settings."""
        if self.image_size % 4 or self.image_size < 16:
            raise ConfigError(f"--image-size must be a multiple of 4 and >= 16, got {self.image_size}")
        for name in ("ae_steps", "ae_batch", "steps", "batch", "width", "ae_width", "tokens", "latent_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1")
        if isinstance(self.extra_dcgan, bool) or not isinstance(self.extra_dcgan, int) or self.extra_dcgan < 0:
            raise ConfigError(f"--extra-dcgan must be an integer >= 0, got {self.extra_dcgan!r}")
        if not 0 <= self.cond_drop < 1:
            raise ConfigError(f"cond-drop must be in [0, 1), got {self.cond_drop}")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema-decay must be in (0, 1), got {self.ema_decay}")
        if (self.image_size // 4) % (2 ** (len(self.multipliers) - 1)):
            raise ConfigError(f"latent size {self.image_size // 4} is not divisible by 2^{len(self.multipliers) - 1}")

    def identity(self) -> dict[str, Any]:
        """The settings that define the trained model (a resumed run must match them; device, threads and
        checkpoint interval may change between sittings)."""
        out = asdict(self)
        for key in ("device", "threads", "checkpoint_minutes"):
            out.pop(key)
        if not self.extra_dcgan:  # work folders made before the option existed stay resumable
            out.pop("extra_dcgan")
        out["multipliers"] = list(self.multipliers)
        return out

    def autoencoder_config(self) -> AutoencoderConfig:
        """The autoencoder these settings describe."""
        return AutoencoderConfig(image_size=self.image_size, latent_channels=self.latent_channels, width=self.ae_width)

    def denoiser_config(self, cond_dim: int) -> DenoiserConfig:
        """The denoiser these settings describe, for ``cond_dim``-d embeddings."""
        return DenoiserConfig(
            latent_channels=self.latent_channels,
            latent_size=self.image_size // 4,
            cond_dim=cond_dim,
            width=self.width,
            multipliers=tuple(self.multipliers),
            tokens=self.tokens,
        )
