"""The identity-conditioned face generator: autoencoder + latent denoiser + metadata, saved as one checkpoint.

:class:`IdentityGenerator` samples faces of an identity embedding (:meth:`generate`), encodes and decodes face chips,
and purifies photos (:meth:`purify`, DiffPure analogue). Checkpoint format (``torch.save`` of a plain dict, loadable
with ``weights_only=True``)::

    {"format": "advface-generator", "version": 1,
     "autoencoder": {"config": {...}, "state_dict": {...}},
     "denoiser": {"config": {...}, "state_dict": {...}},      # the EMA weights
     "metadata": {...}}                                         # JSON-able

Metadata: ``encoder`` (name), ``encoder_fingerprint``, ``embedding_dim``, ``image_size`` (filled here),
``training_data`` (dataset, group, photos), ``steps`` (autoencoder and denoiser), ``seed``, ``metrics``, ``role``
(``defender`` surrogate or ``attacker`` model), ``created``. :func:`load_generator` refuses a file that is not a
generator checkpoint, is truncated or corrupt, or (given ``encoder_fingerprint``) was trained for another encoder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from advface.errors import ConfigError, EmbeddingError
from advface.generative.autoencoder import FaceAutoencoder
from advface.generative.config import AutoencoderConfig, DenoiserConfig
from advface.generative.denoiser import LatentDenoiser
from advface.generative.diffusion import LatentGuide, ddim_sample, purify

FORMAT_TAG = "advface-generator"
FORMAT_VERSION = 1


def faces_to_tensor(faces: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """``N x S x S x 3`` uint8 -> ``N x 3 x S x S`` float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(faces)).to(device).permute(0, 3, 1, 2).float() / 255.0


def tensor_to_faces(images: torch.Tensor) -> np.ndarray:
    """``N x 3 x S x S`` in [0, 1] -> ``N x S x S x 3`` uint8."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class IdentityGenerator:
    """An autoencoder and a denoiser that work together, with the metadata saying what they were trained for."""

    def __init__(self, autoencoder: FaceAutoencoder, denoiser: LatentDenoiser, metadata: Mapping[str, Any]) -> None:
        if autoencoder.config.latent_channels != denoiser.config.latent_channels or (
            autoencoder.config.latent_size != denoiser.config.latent_size
        ):
            raise ConfigError("the autoencoder's latents do not fit the denoiser")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.metadata = dict(metadata)

    @property
    def image_size(self) -> int:
        """Side of the generated faces in pixels."""
        return self.autoencoder.config.image_size

    @property
    def dim(self) -> int:
        """Dimension of the identity embeddings it is conditioned on."""
        return self.denoiser.config.cond_dim

    @property
    def device(self) -> torch.device:
        """Where the models live."""
        return next(self.denoiser.parameters()).device

    def to(self, device: str | torch.device) -> IdentityGenerator:
        """Move both models to ``device``."""
        self.autoencoder.to(device)
        self.denoiser.to(device)
        return self

    def check_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """``embeddings`` as ``N x dim`` float32; EmbeddingError for a wrong shape, NaN/Inf or zero rows."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise EmbeddingError(f"the generator takes {self.dim}-d embeddings, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise EmbeddingError("embeddings contain NaN or Inf")
        if (np.linalg.norm(x, axis=1) == 0).any():
            raise EmbeddingError("embeddings contain a zero vector")
        return x

    @torch.no_grad()
    def encode(self, faces: np.ndarray) -> torch.Tensor:
        """Latents of ``N x S x S x 3`` uint8 face chips (resized to :attr:`image_size` when needed)."""
        images = faces_to_tensor(faces, self.device)
        if images.shape[-1] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        return self.autoencoder.encode(images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """``N x S x S x 3`` uint8 faces of latents."""
        return tensor_to_faces(self.autoencoder.decode(latents))

    def latent_shape(self) -> tuple[int, int, int]:
        """``(channels, size, size)`` of one latent."""
        c = self.denoiser.config
        return c.latent_channels, c.latent_size, c.latent_size

    def generate(
        self,
        embeddings: np.ndarray,
        n: int = 1,
        *,
        steps: int = 25,
        guidance: float = 3.0,
        seed: int = 0,
        guide: LatentGuide | None = None,
        guide_scale: float = 0.0,
        batch_size: int = 64,
    ) -> np.ndarray:
        """``n`` faces per embedding: ``len(embeddings) x n x S x S x 3`` uint8. Deterministic for a ``seed``.
        ``guide`` / ``guide_scale``: reconstruction guidance on the predicted clean latents (see
        :func:`advface.generative.diffusion.ddim_sample`)."""
        if n < 1 or steps < 1:
            raise ConfigError("n and steps must be >= 1")
        x = self.check_embeddings(embeddings)
        cond = torch.from_numpy(np.repeat(x, n, axis=0)).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        shape = self.latent_shape()
        faces = []
        for start in range(0, len(cond), batch_size):
            batch = cond[start : start + batch_size]
            noise = torch.randn((len(batch), *shape), generator=generator, device=self.device)
            latents = ddim_sample(
                self.denoiser,
                batch,
                shape,
                steps=steps,
                guidance=guidance,
                start=noise,
                guide=guide,
                guide_scale=guide_scale,
            )
            faces.append(self.decode(latents))
        return np.concatenate(faces).reshape(len(x), n, self.image_size, self.image_size, 3)

    def purify(self, faces: np.ndarray, t_star: float = 0.3, *, steps: int = 10, seed: int = 0) -> np.ndarray:
        """DiffPure analogue: encode, noise to ``t_star``, denoise without identity, decode (``N x S x S x 3``)."""
        if not 0 < t_star <= 1:
            raise ConfigError(f"t_star must be in (0, 1], got {t_star}")
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        latents = purify(self.denoiser, self.encode(faces), t_star, steps=steps, generator=generator)
        return self.decode(latents)

    def state(self, *, half: bool = False) -> dict[str, Any]:
        """The checkpoint payload (see the module docs); ``half`` stores floating-point weights as float16 (loading
        computes in float32 again)."""

        def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
            out = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            return {k: v.half() if half and v.is_floating_point() else v for k, v in out.items()}

        meta = dict(self.metadata)
        meta.setdefault("embedding_dim", self.dim)
        meta.setdefault("image_size", self.image_size)
        meta.setdefault("created", _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat())
        return {
            "format": FORMAT_TAG,
            "version": FORMAT_VERSION,
            "autoencoder": {
                "config": self.autoencoder.config.to_dict(),
                "state_dict": weights(self.autoencoder),
            },
            "denoiser": {
                "config": self.denoiser.config.to_dict(),
                "state_dict": weights(self.denoiser),
            },
            "metadata": json.loads(json.dumps(meta, default=_json_default)),
        }


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def atomic_save(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename: never a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def save_generator(path: str | os.PathLike[str], generator: IdentityGenerator, *, half: bool = False) -> Path:
    """Write ``generator`` to ``path`` atomically (``half``: float16 weights, half the file)."""
    return atomic_save(generator.state(half=half), path)


def read_checkpoint(path: str | os.PathLike[str], tag: str) -> dict[str, Any]:
    """The payload of a checkpoint whose ``format`` is ``tag``; ConfigError for a missing, truncated, corrupt or
    foreign file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"checkpoint {file} not found")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise ConfigError(f"{file}: not a readable checkpoint (truncated or corrupt?): {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise ConfigError(f"{file}: not an {tag} checkpoint")
    return payload


def load_generator(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu", encoder_fingerprint: str | None = None
) -> IdentityGenerator:
    """The generator saved at ``path``; ConfigError for a bad file or, given ``encoder_fingerprint``, a generator
    trained on another encoder's embeddings."""
    payload = read_checkpoint(path, FORMAT_TAG)
    if payload.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: generator checkpoint version {payload.get('version')} is not supported")
    try:
        ae = FaceAutoencoder(AutoencoderConfig(**payload["autoencoder"]["config"]))
        ae.load_state_dict(payload["autoencoder"]["state_dict"])
        dn_config = dict(payload["denoiser"]["config"])
        dn_config["multipliers"] = tuple(dn_config["multipliers"])
        dn = LatentDenoiser(DenoiserConfig(**dn_config))
        dn.load_state_dict(payload["denoiser"]["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{path}: generator checkpoint does not fit its configuration ({exc})") from None
    metadata = dict(payload.get("metadata") or {})
    fingerprint = metadata.get("encoder_fingerprint")
    if encoder_fingerprint is not None and fingerprint is not None and fingerprint != encoder_fingerprint:
        raise ConfigError(
            f"{path}: the generator was trained on embeddings of encoder {metadata.get('encoder')!r} "
            f"(fingerprint {str(fingerprint)[:12]}), not of this encoder ({encoder_fingerprint[:12]})"
        )
    return IdentityGenerator(ae, dn, metadata).to(device)


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "IdentityGenerator",
    "atomic_save",
    "faces_to_tensor",
    "load_generator",
    "parameter_count",
    "read_checkpoint",
    "save_generator",
    "tensor_to_faces",
]
