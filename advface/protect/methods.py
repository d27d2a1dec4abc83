"""Protection methods by name: one place that turns a configuration into a template protector.

- ``advface`` -- plain AdvFace (:mod:`advface.protect.advface`): pixel objective against one shadow decoder;
- ``advface-id`` -- identity-aware AdvFace (:mod:`advface.protect.identity_aware`): identity objective through the
  encoder's differentiable torch module, against an ensemble of shadow decoders.

:class:`ProtectionSpec` holds everything needed to build a protector (method, shadow checkpoints, parameters,
encoder); it is a small picklable value, so a Ray actor rebuilds its own protector from it.
:func:`load_protector` builds it. Every protector satisfies :class:`TemplateProtector`: ``protect(z) -> z'``
(``N x D`` float32 in, same shape out, each row depending only on that row and the parameters), plus ``method``,
``dim``, ``config`` and ``shadow_paths``. :func:`advface.service.protection.protection_spec` makes the spec of a
configuration's ``protection`` section. The sidecar (servicer, batcher) and ``advface reencode`` (both engines,
through :func:`advface.reencode.chunk.reencode_chunk`) use only this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from advface.errors import ConfigError
from advface.protect.advface import AdvFaceConfig, Protector
from advface.protect.ascent import shadow_dim
from advface.protect.identity_aware import IdentityAwareConfig, protect_identity_aware

#: Method names accepted by ``protection.method`` and ``--method``.
METHODS: tuple[str, ...] = ("advface", "advface-id")


@runtime_checkable
class TemplateProtector(Protocol):
    """What the sidecar and re-encoding need from a protector (plain or identity-aware)."""

    method: str
    config: Any  # AdvFaceConfig or IdentityAwareConfig: rel_l2, steps, seed, lanes, linf
    shadow_paths: tuple[Path, ...]

    @property
    def dim(self) -> int:
        """Template dimension."""
        ...

    def protect(self, z: np.ndarray, *, progress: Callable[[int], object] | None = None) -> np.ndarray:
        """Protected ``z`` (``N x D`` or ``D``), float32, same shape."""
        ...


class IdentityAwareProtector:
    """Identity-aware AdvFace with its shadow ensemble, the encoder's torch module and a device.

    Shadows and encoder module are put in eval mode and stop requiring gradients (gradients flow to the templates
    only), once, here: concurrent :meth:`protect` calls (the sidecar's protection slots) then never race on them.
    """

    method = "advface-id"

    def __init__(
        self,
        shadows: Sequence[nn.Module],
        encoder_module: nn.Module,
        config: IdentityAwareConfig | None = None,
        *,
        chip_size: int,
        device: str | torch.device | None = None,
        shadow_paths: Sequence[Path] = (),
        shadow_metadata: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        if not shadows:
            raise ConfigError("identity-aware AdvFace needs at least one shadow decoder")
        self.config = IdentityAwareConfig() if config is None else config
        if not isinstance(self.config, IdentityAwareConfig):
            raise ConfigError(f"config must be an IdentityAwareConfig, got {type(self.config).__name__}")
        dims = {shadow_dim(s) for s in shadows}
        if len(dims) != 1:
            raise ConfigError(f"shadow decoders disagree on the embedding dimension: {sorted(dims)}")
        self._dim = dims.pop()
        moved = []
        for module in (*shadows, encoder_module):
            if device is not None:
                module = module.to(device)
            module.eval()
            module.requires_grad_(False)
            moved.append(module)
        self.shadows: list[nn.Module] = moved[:-1]
        self.encoder_module: nn.Module = moved[-1]
        self.chip_size = int(chip_size)
        self.device = device
        self.shadow_paths = tuple(Path(p) for p in shadow_paths)
        #: each shadow checkpoint's metadata (when loaded from checkpoints), e.g. its ``train_config``
        self.shadow_metadata: tuple[dict[str, Any], ...] = tuple(dict(m) for m in shadow_metadata)

    @property
    def dim(self) -> int:
        """Template dimension the shadows take."""
        return self._dim

    def protect(self, z: np.ndarray, *, progress: Callable[[int], object] | None = None) -> np.ndarray:
        """Protect ``z`` (``N x D`` or ``D``); see :func:`~advface.protect.identity_aware.protect_identity_aware`."""
        return protect_identity_aware(
            z,
            self.shadows,
            self.encoder_module,
            self.config,
            chip_size=self.chip_size,
            device=self.device,
            progress=progress,
        )


@dataclass(frozen=True)
class ProtectionSpec:
    """A protector's recipe (picklable): ``method``, ``shadows`` (checkpoint paths: exactly one for ``advface``,
    at least one for ``advface-id``), ``config`` (:class:`AdvFaceConfig` / :class:`IdentityAwareConfig` to match
    the method), ``encoder`` (spec string or mapping: ``advface-id`` runs its torch module; both methods check the
    shadows against its fingerprint and dimension when ``check_encoder``)."""

    method: str
    shadows: tuple[str, ...]
    config: AdvFaceConfig | IdentityAwareConfig
    encoder: str | Mapping[str, Any] = "dlib"
    check_encoder: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown protection method {self.method!r}; use one of {', '.join(METHODS)}")
        wanted = AdvFaceConfig if self.method == "advface" else IdentityAwareConfig
        if not isinstance(self.config, wanted):
            raise ConfigError(
                f"protection method {self.method} needs {wanted.__name__} parameters, got {type(self.config).__name__}"
            )
        if not self.shadows:
            raise ConfigError(f"protection method {self.method} needs at least one shadow checkpoint")
        if self.method == "advface" and len(self.shadows) != 1:
            raise ConfigError(
                f"protection method advface takes exactly one shadow, got {len(self.shadows)} "
                "(an ensemble is for advface-id)"
            )
        for path in self.shadows:
            if not Path(path).is_file():
                raise ConfigError(f"shadow model {path} not found")


def load_protector(
    spec: ProtectionSpec,
    *,
    device: str | torch.device | None = None,
    encoder: Any = None,
    templates: tuple[str | None, int] | None = None,
) -> TemplateProtector:
    """Build the protector ``spec`` describes on ``device``. ``encoder``: an already built
    :class:`~advface.encoders.FaceEncoder` to use instead of creating ``spec.encoder`` (the sidecar passes its own).
    ``templates``: ``(encoder fingerprint or None, dimension)`` of the templates to protect, to check the shadows
    against instead of the encoder's (``advface protect`` passes its embeddings file's); ``advface`` then never
    builds the encoder.

    ConfigError, before anything runs, for a missing or incompatible shadow (other encoder fingerprint or
    dimension, when ``spec.check_encoder`` or ``templates``) and, for ``advface-id``, an encoder without a
    differentiable module.
    """
    if spec.method == "advface":
        fingerprint: str | None = None
        dim: int | None = None
        if templates is not None:
            fingerprint, dim = templates
        elif spec.check_encoder:
            enc = encoder if encoder is not None else _create_encoder(spec.encoder)
            fingerprint, dim = enc.fingerprint, int(enc.dim)
        assert isinstance(spec.config, AdvFaceConfig)  # ProtectionSpec checks the config fits the method
        return Protector.from_checkpoint(
            spec.shadows[0], encoder_fingerprint=fingerprint, dim=dim, config=spec.config, device=device
        )

    from advface.inversion import check_compatible, load_decoder  # lazy: optional at import time

    enc = encoder if encoder is not None else _create_encoder(spec.encoder)
    name = getattr(enc, "name", str(spec.encoder))
    try:
        module = enc.torch_module(device)
    except (OSError, RuntimeError, ImportError) as exc:
        raise ConfigError(f"encoder {name}: cannot load its differentiable torch module ({exc})") from None
    if module is None:
        raise ConfigError(
            f"protection method advface-id needs an encoder with a differentiable torch module "
            f"(e.g. dlib, dlib-torch, onnx:...); encoder {name} has none"
        )
    expected = templates  # what the shadows must fit (None: not checked)
    if expected is None and spec.check_encoder:
        expected = (enc.fingerprint, int(enc.dim))
    shadows, metadata = [], []
    for path in spec.shadows:
        shadow, meta = load_decoder(path, device=device)
        metadata.append(meta)
        if expected is not None:
            try:
                check_compatible(shadow, *expected)
            except ConfigError as exc:
                raise ConfigError(f"shadow model {path}: {exc}") from None
        shadows.append(shadow)
    assert isinstance(spec.config, IdentityAwareConfig)  # ProtectionSpec checks the config fits the method
    return IdentityAwareProtector(
        shadows,
        module,
        spec.config,
        chip_size=int(enc.chip.size),
        device=device,
        shadow_paths=[Path(p) for p in spec.shadows],
        shadow_metadata=metadata,
    )


def trained_with_identity_loss(metadata: Mapping[str, Any]) -> bool | None:
    """Whether a shadow checkpoint was trained with an identity loss (``advface train-shadow --id-weight W``,
    W > 0), from the training configuration its metadata records; None when it records none."""
    train = metadata.get("train_config")
    if not isinstance(train, Mapping) or "id_weight" not in train:
        return None
    try:
        return float(train["id_weight"]) > 0
    except (TypeError, ValueError):
        return None


def _create_encoder(spec: str | Mapping[str, Any]) -> Any:
    from advface.encoders import create_encoder

    return create_encoder(spec)
