"""Identity-aware AdvFace: move the *identity* of every shadow's reconstruction away from the template's owner.

Plain AdvFace ascends the pixel error ``||S(z + delta) - S(z)||_1`` of one pixel-trained shadow. Attackers that
train their decoder with an identity loss shrug that off (field notes): their reconstructions are faces whose
embedding is close to the input, and a template that still matches its owner then yields a face that matches too.
This variant attacks what such attackers optimise: for an ensemble of shadows ``S_1..S_m`` (ideally trained like
strong attackers: pixel + identity loss, several architectures) and the encoder's differentiable module ``E``,

    maximise  sum_i  || E(jitter_t(resize(S_i(z + delta)))) - z ||_2 / ||z||_2
    subject to ||delta||_2 <= rel_l2 * ||z||_2  (and |delta_j| <= linf),

by sign-gradient ascent, where each shadow's gradient is L2-normalised per template before the sum (so no shadow
dominates; IDGuardian's cross-model aggregation) and ``jitter_t`` is a fixed, data-independent schedule of small
pixel shifts (expectation over translations, so the perturbation does not hinge on one pixel grid).

Determinism follows :mod:`advface.protect.advface`: random start from a hash of ``(seed, row bytes)``, shadows and
encoder always called on exactly ``lanes`` rows, the jitter schedule independent of the data -- each template's
result depends only on its bytes and the configuration. Not on torch's thread count either: a multi-threaded CPU
team resizes the shadow's faces to the encoder's chip (bilinear ``F.interpolate``) with different last-ulp
rounding than one thread; the encoder's max-pooling then picks another maximum among near-ties, a few gradient
coordinates change sign, and the sign steps diverge (up to 0.023 per coordinate between 1 and 2 threads, dlib's
ResNet and the shipped shadow). So each lane runs on one thread with one torch thread, and a CPU's cores serve
several lanes at once (:func:`advface.protect.ascent.run_lanes`; ``benchmarks/protect_threads.py`` measures the
cost).

Cost: every step runs each shadow and the encoder forward and backward; with three 64x64 shadows and dlib's ResNet
this is tens to hundreds of times plain AdvFace's cost on a CPU (``benchmarks/identity_aware.py`` measures it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advface.encoders.base import validate_embeddings
from advface.errors import ConfigError
from advface.protect.ascent import (
    AscentParams,
    ascend_in_lanes,
    check_ascent_config,
    eval_mode,
    is_int,
    lane_tensors,
    project_t,
    shadow_device_dtype,
    shadow_dim,
)

#: Pixel shifts (at the encoder's chip size) cycled through the steps: the expectation over translations.
JITTER_SCHEDULE: tuple[tuple[int, int], ...] = ((0, 0), (2, -1), (-2, 2), (1, 3), (-3, -2), (3, 1), (-1, -3))


@dataclass(frozen=True)
class IdentityAwareConfig(AscentParams):
    """Parameters of identity-aware AdvFace (same meaning as :class:`~advface.protect.AdvFaceConfig` where shared).

    - ``steps``, ``rel_l2``, ``linf``, ``step_size`` (None: ``2.5 / steps``), ``seed``, ``batch_size``, ``lanes``;
    - ``jitter``: cycle through :data:`JITTER_SCHEDULE` (False: no shifts).
    """

    steps: int = 10
    rel_l2: float = 0.2
    linf: float | None = None
    step_size: float | None = None
    seed: int = 0
    batch_size: int = 256
    lanes: int = 16
    jitter: bool = True

    def __post_init__(self) -> None:
        check_ascent_config(self, "identity-aware AdvFace")
        if not isinstance(self.jitter, bool):
            raise ConfigError(f"identity-aware AdvFace jitter must be a bool, got {self.jitter!r}")


def identity_distance(
    shadow: nn.Module,
    encoder_module: nn.Module,
    z: torch.Tensor,
    target: torch.Tensor,
    chip_size: int,
    shift: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Per row: ``||E(shift(resize(S(z)))) - target|| / ||target||`` (differentiable in ``z``)."""
    faces = shadow(z)
    if faces.shape[-1] != chip_size or faces.shape[-2] != chip_size:
        faces = F.interpolate(faces, size=(chip_size, chip_size), mode="bilinear", align_corners=False)
    if shift != (0, 0):
        faces = torch.roll(faces, shifts=shift, dims=(2, 3))
    emb = encoder_module(faces)
    return (emb - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-12)


def _ascend_lane(
    z: np.ndarray,
    delta0: np.ndarray,
    radius: np.ndarray,
    shadows: Sequence[nn.Module],
    encoder_module: nn.Module,
    config: IdentityAwareConfig,
    chip_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> np.ndarray:
    alpha, radius_t, z_t, delta = lane_tensors(z, delta0, radius, config, device, dtype)
    for step in range(config.steps):
        shift = JITTER_SCHEDULE[step % len(JITTER_SCHEDULE)] if config.jitter else (0, 0)
        total = torch.zeros_like(delta)
        for shadow in shadows:
            d = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = identity_distance(shadow, encoder_module, z_t + d, z_t, chip_size, shift).sum()
                (grad,) = torch.autograd.grad(loss, d)
            total += grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
        with torch.no_grad():
            delta = project_t(delta.detach() + alpha * total.sign(), radius_t, config.linf)
    return delta.detach().cpu().double().numpy()


def protect_identity_aware(
    z: np.ndarray,
    shadows: Sequence[nn.Module],
    encoder_module: nn.Module,
    config: IdentityAwareConfig | None = None,
    *,
    chip_size: int = 150,
    device: str | torch.device | None = None,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Protect templates ``z`` (``N x D`` or one ``D`` vector) with identity-aware AdvFace.

    ``shadows``: decoders ``N x D -> N x 3 x S x S`` (all with the same ``dim``); ``encoder_module``: the encoder's
    differentiable torch module (``N x 3 x chip x chip`` in [0, 1] -> ``N x D``), e.g.
    ``create_encoder("dlib-torch").torch_module()``. Returns float32 ``z + delta``, each row depending only on
    that row and ``config``. EmbeddingError / ConfigError before any computation for bad input.
    """
    config = IdentityAwareConfig() if config is None else config
    if not isinstance(config, IdentityAwareConfig):
        raise ConfigError(f"config must be an IdentityAwareConfig, got {type(config).__name__}")
    if not shadows:
        raise ConfigError("identity-aware AdvFace needs at least one shadow decoder")
    dims = {shadow_dim(s) for s in shadows}
    if len(dims) != 1:
        raise ConfigError(f"shadow decoders disagree on the embedding dimension: {sorted(dims)}")
    if not is_int(chip_size) or chip_size < 8:
        raise ConfigError(f"chip_size must be an integer >= 8, got {chip_size!r}")
    raw = np.asarray(z)
    x = np.ascontiguousarray(validate_embeddings(raw, dims.pop()), dtype=np.float32)
    run_device, dtype = shadow_device_dtype(shadows[0], device)
    out = np.empty_like(x)
    if len(x) == 0:
        return out.reshape(raw.shape) if raw.ndim == 1 else out
    radius = config.rel_l2 * np.linalg.norm(x.astype(np.float64), axis=1)
    frozen = [p for m in (*shadows, encoder_module) for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with contextlib.ExitStack() as stack:
            for module in (*shadows, encoder_module):
                stack.enter_context(eval_mode(module))

            def ascend(lane: np.ndarray, delta0: np.ndarray, radius_lane: np.ndarray, rows: np.ndarray) -> np.ndarray:
                return _ascend_lane(
                    lane, delta0, radius_lane, shadows, encoder_module, config, chip_size, run_device, dtype
                )

            out = ascend_in_lanes(x, radius, config, ascend, run_device, progress=progress)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if not np.shares_memory(x, raw):
        x.fill(0)  # our float32 copy of z
    return out.reshape(raw.shape) if raw.ndim == 1 else out
