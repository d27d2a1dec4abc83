"""AdvFace: adversarial perturbation of stored templates against reconstruction (inversion) attacks.

The method (Wang et al., CVPR 2023, poster Eq. 1-5): a *shadow* decoder ``S`` is trained to rebuild faces from
templates, like an attacker would. A template ``z`` is then replaced by ``z + delta``, where ``delta`` is found by
sign-gradient *ascent* on the shadow's reconstruction error

    maximise ||S(z + delta) - x~||_1   subject to   ||delta||_2 <= rel_l2 * ||z||_2   (and |delta_i| <= linf),

with ``x~ = S(z)`` (the shadow's own reconstruction, standing in for the unavailable enrolment photo) or the
enrolment photo itself when the caller has it. Choices the poster leaves open, and ours:

- the budget is relative, ``E = ||delta|| / ||z||`` per template, plus an optional absolute L-inf box;
- ``x~ = S(z)`` makes the L1 loss flat at ``delta = 0`` (its gradient is exactly zero there), so the iteration
  needs a start off ``z``: a random direction scaled to a random fraction of the radius. The poster starts from
  ``E(S(z))``, which needs the encoder; the random start does not. Without target images, ``random_start=False``
  is refused;
- every template's result depends only on ``(its float32 bytes, the config)``, never on its neighbours: the random
  start comes from a hash of ``(seed, row bytes)``, and the shadow is always called on exactly ``lanes`` rows (the
  last call padded with copies of a real row). The padding matters: float32 kernels (oneDNN/MKL GEMM on CPU, cuBLAS
  heuristics on GPU) pick code paths by batch shape, a row's reconstruction then differs in the last ulp between
  batch shapes, the L1 loss's pixel signs flip, and a few sign steps differ -- measured with a 1.5 M-parameter
  conv decoder: 384 of 5,120 coordinates differed between calls of 40 rows and calls of 5 or 7 rows (on this
  CPU, row results agree between call sizes that are multiples of 4). With a fixed call shape, protecting a
  database in any chunking or order gives bit-identical templates (on one machine and software stack: another
  CPU, GPU or torch version may round differently). On a CPU every lane is computed by one thread on one torch
  thread, up to torch's thread count of lanes at once (:func:`advface.protect.ascent.run_lanes`), so the thread
  count does not change the output either;
- the per-coordinate sign step is ``step_size * c`` with ``c = min(radius / sqrt(D), linf)``; the default
  ``step_size = 2.5 / steps`` (the PGD convention): one step then moves ``2.5 / steps`` of the radius in L2, so
  the iterate can cross the ball's diameter within the available steps and ends on its boundary, and it still
  takes ``steps / 2.5`` steps to get there, so the later steps refine the direction instead of bouncing.

Plain AdvFace is weak against identity-aware attackers at budgets that keep matching (see the field notes); it is
one layer, to be measured, not a guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advface.encoders.base import validate_embeddings
from advface.errors import ConfigError, EmbeddingError, ImageError
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

if TYPE_CHECKING:  # pragma: no cover
    import os


@dataclass(frozen=True)
class AdvFaceConfig(AscentParams):
    """Parameters of AdvFace protection.

    - ``steps``: sign-gradient ascent steps (0: random start only, i.e. the "random noise" baseline);
    - ``rel_l2``: the budget ``E = ||delta||_2 / ||z||_2``, per template, in (0, 1];
    - ``linf``: optional absolute bound on every coordinate of ``delta`` (None: no box);
    - ``step_size``: per-coordinate sign step as a fraction of ``min(radius / sqrt(D), linf)``, i.e. the L2 length
      of one step relative to the radius; None means ``2.5 / steps``;
    - ``random_start``: start from a random point of the ball (needed unless target images are given);
    - ``seed``: seeds the random starts (with each template's bytes), in [0, 2**64);
    - ``batch_size``: templates per chunk (random starts, target images, progress); the output does not depend on it;
    - ``lanes``: rows per shadow call, always exactly (padded): part of what determines the output, like ``seed``
      -- templates protected with different ``lanes`` may differ slightly. On CPU 4 is about as fast per row as
      larger calls (3 M-parameter 64x64 deconv shadow, 1 thread: 30 ms/template at 4, 26 at 16, 62 at 1) while one
      template costs 4 rows of work (120 ms); raise it on a GPU for throughput.
    """

    steps: int = 3
    rel_l2: float = 0.1
    linf: float | None = None
    step_size: float | None = None
    random_start: bool = True
    seed: int = 0
    batch_size: int = 256
    lanes: int = 4

    def __post_init__(self) -> None:
        check_ascent_config(self, "AdvFace")
        if not isinstance(self.random_start, bool):
            raise ConfigError(f"AdvFace random_start must be a bool, got {self.random_start!r}")


# --------------------------------------------------------------------------------------------------- helpers


def _image_hw(shadow: nn.Module) -> tuple[int, int] | None:
    size: Any = getattr(shadow, "image_size", None)
    if is_int(size) and size > 0:
        return int(size), int(size)
    if isinstance(size, tuple | list) and len(size) == 2 and all(is_int(s) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    return None


def _check_targets(target_images: np.ndarray | torch.Tensor, n: int) -> np.ndarray | torch.Tensor:
    """Validate enrolment images: ``N x H x W x 3`` uint8 or ``N x 3 x H x W`` float in [0, 1]."""
    if isinstance(target_images, torch.Tensor):
        images: np.ndarray | torch.Tensor = target_images.detach()
        is_uint8 = images.dtype == torch.uint8
        is_float = target_images.is_floating_point()
    else:
        images = np.asarray(target_images)
        is_uint8 = images.dtype == np.uint8
        is_float = np.issubdtype(images.dtype, np.floating)
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[0] != n:
        raise ImageError(
            "target_images", f"expected {n} images (N x H x W x 3 uint8 or N x 3 x H x W float), got shape {shape}"
        )
    if is_uint8:
        if shape[3] != 3:
            raise ImageError("target_images", f"uint8 images must be N x H x W x 3 RGB, got shape {shape}")
    elif is_float:
        if shape[1] != 3:
            raise ImageError("target_images", f"float images must be N x 3 x H x W RGB, got shape {shape}")
        if n:
            lo, hi = float(images.min()), float(images.max())
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
                raise ImageError("target_images", f"float images must be finite and in [0, 1], got [{lo}, {hi}]")
    else:
        raise ImageError("target_images", f"images must be uint8 or float, got {images.dtype}")
    return images


def _targets_lane(
    images: np.ndarray | torch.Tensor, rows: np.ndarray, hw: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Target images ``rows`` as ``L x 3 x H x W`` in [0, 1] at the shadow's output size."""
    if isinstance(images, torch.Tensor):
        t = images[torch.as_tensor(rows, device=images.device)]
    else:
        t = torch.from_numpy(np.ascontiguousarray(images[rows]))
    if t.dtype == torch.uint8:
        t = t.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    t = t.to(device=device, dtype=torch.float32)
    if tuple(t.shape[2:]) != hw:
        t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return t.to(dtype).contiguous()


# --------------------------------------------------------------------------------------------------- the method


def _ascend_lane(
    z: np.ndarray,
    delta0: np.ndarray,
    radius: np.ndarray,
    shadow: nn.Module,
    config: AdvFaceConfig,
    target: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> np.ndarray:
    """Sign-gradient ascent for one shadow call's worth of rows (always ``config.lanes`` of them); returns delta."""
    alpha, radius_t, z_t, delta = lane_tensors(z, delta0, radius, config, device, dtype)
    if target is None:
        with torch.no_grad():
            target = shadow(z_t)  # x~ = S(z): the shadow's stand-in for the enrolment photo
    for _ in range(config.steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            moved = z_t + delta
            loss = (shadow(moved) - target).abs().sum()  # rows are independent: per-sample L1, summed
            (grad,) = torch.autograd.grad(loss, delta)  # w.r.t. delta only: no gradient to the shadow's weights
        moved.detach().zero_()  # a copy of the templates: zeroed, not just freed (temporaries: protect_embeddings)
        with torch.no_grad():
            delta = project_t(delta.detach() + alpha * grad.sign(), radius_t, config.linf)
    return delta.detach().cpu().double().numpy()


def protect_embeddings(
    z: np.ndarray,
    shadow: nn.Module,
    config: AdvFaceConfig | None = None,
    *,
    target_images: np.ndarray | torch.Tensor | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Protect templates ``z`` (``N x D`` or one ``D`` vector) with AdvFace against ``shadow`` (``N x D -> images``).

    ``target_images`` (optional, one per template: ``N x H x W x 3`` uint8 or ``N x 3 x H x W`` float in [0, 1])
    replaces ``x~ = S(z)`` by the enrolment photos, resized to the shadow's output size. ``progress`` is called
    with the number of templates done after each chunk of ``config.batch_size``. Returns float32 ``z + delta`` of
    ``z``'s shape; each row depends only on that row and ``config`` (see the module's notes). Temporary copies of
    the templates (the float32 copy of ``z``, each lane's rows, each step's shadow input) are zeroed once used, not
    just freed, so a memory dump taken after the call does not find them (docs/encrypted-matching.md).

    Raises EmbeddingError for NaN/Inf, zero rows or a dimension other than ``shadow.dim``, ImageError for unusable
    target images, ConfigError for an unusable configuration -- all before any shadow computation.
    """
    config = AdvFaceConfig() if config is None else config
    if not isinstance(config, AdvFaceConfig):
        raise ConfigError(f"config must be an AdvFaceConfig, got {type(config).__name__}")
    raw = np.asarray(z)
    x = np.ascontiguousarray(validate_embeddings(raw, shadow_dim(shadow)), dtype=np.float32)
    images = _check_targets(target_images, len(x)) if target_images is not None else None
    if images is None and not config.random_start and config.steps > 0:
        raise ConfigError(
            "random_start=False needs target_images: with x~ = S(z) the L1 loss has zero gradient at z, "
            "so sign ascent would never move"
        )
    run_device, dtype = shadow_device_dtype(shadow, device)
    if len(x) == 0:
        return np.empty_like(x).reshape(raw.shape) if raw.ndim == 1 else np.empty_like(x)
    radius = config.rel_l2 * np.linalg.norm(x.astype(np.float64), axis=1)
    with eval_mode(shadow):
        hw = _image_hw(shadow) if images is not None else None
        if images is not None and hw is None:  # no image_size attribute: ask the shadow (fixed call shape too)
            with torch.no_grad():
                probe = torch.from_numpy(np.repeat(x[:1], config.lanes, axis=0)).to(run_device, dtype)
                hw = tuple(shadow(probe).shape[2:])

        def ascend(lane: np.ndarray, delta0: np.ndarray, radius_lane: np.ndarray, rows: np.ndarray) -> np.ndarray:
            target = None
            if images is not None:
                assert hw is not None
                target = _targets_lane(images, rows, hw, run_device, dtype)
            return _ascend_lane(lane, delta0, radius_lane, shadow, config, target, run_device, dtype)

        out = ascend_in_lanes(
            x, radius, config, ascend, run_device, random_start=config.random_start, progress=progress
        )
    if not np.shares_memory(x, raw):
        x.fill(0)  # our float32 copy of z
    return out.reshape(raw.shape) if raw.ndim == 1 else out


def perturbation_stats(z: np.ndarray, z_protected: np.ndarray) -> dict[str, float]:
    """How far protected templates moved: relative L2 (mean, max), L-inf (max), cosine to the raw (mean, min)."""
    a = np.atleast_2d(np.asarray(z, np.float64))
    b = np.atleast_2d(np.asarray(z_protected, np.float64))
    if a.shape != b.shape or a.ndim != 2:
        raise EmbeddingError(f"cannot compare embeddings of shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        return {
            "count": 0,
            "rel_l2_mean": 0.0,
            "rel_l2_max": 0.0,
            "linf_max": 0.0,
            "cosine_mean": 1.0,
            "cosine_min": 1.0,
        }
    na = np.linalg.norm(a, axis=1)
    d = b - a
    rel = np.linalg.norm(d, axis=1) / np.maximum(na, 1e-300)
    cos = (a * b).sum(axis=1) / np.maximum(na * np.linalg.norm(b, axis=1), 1e-300)
    return {
        "count": len(a),
        "rel_l2_mean": float(rel.mean()),
        "rel_l2_max": float(rel.max()),
        "linf_max": float(np.abs(d).max()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
    }


class Protector:
    """A shadow model, an :class:`AdvFaceConfig` and a device: what a server needs to protect templates.

    The shadow is put in eval mode and its parameters stop requiring gradients (the protector owns it).
    ``method`` and ``shadow_paths`` (set by :meth:`from_checkpoint`) make it an
    :class:`advface.protect.methods.TemplateProtector`.
    """

    method = "advface"
    shadow_paths: tuple[Path, ...] = ()

    def __init__(
        self,
        shadow: nn.Module,
        config: AdvFaceConfig | None = None,
        device: str | torch.device | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        shadow_dim(shadow)
        if device is not None:
            shadow = shadow.to(device)
        shadow.eval()
        shadow.requires_grad_(False)
        self.shadow = shadow
        self.config = AdvFaceConfig() if config is None else config
        if not isinstance(self.config, AdvFaceConfig):
            raise ConfigError(f"config must be an AdvFaceConfig, got {type(self.config).__name__}")
        self.device, _ = shadow_device_dtype(shadow, device)
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def dim(self) -> int:
        """Template dimension the shadow takes."""
        return shadow_dim(self.shadow)

    @property
    def encoder_fingerprint(self) -> str | None:
        """Fingerprint of the encoder the shadow was trained for (from the checkpoint), if known."""
        value = self.metadata.get("encoder_fingerprint")
        return str(value) if value else None

    def protect(
        self,
        z: np.ndarray,
        *,
        target_images: np.ndarray | torch.Tensor | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> np.ndarray:
        """Protect ``z`` (``N x D`` or ``D``); see :func:`protect_embeddings`."""
        return protect_embeddings(
            z, self.shadow, self.config, target_images=target_images, device=self.device, progress=progress
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        encoder_fingerprint: str | None = None,
        dim: int | None = None,
        config: AdvFaceConfig | None = None,
        device: str | torch.device | None = None,
    ) -> Protector:
        """Load a shadow saved by ``advface.inversion.save_decoder``; refuse (ConfigError) one trained for another
        encoder (``encoder_fingerprint``) or template dimension (``dim``), when those are given."""
        from advface.inversion import check_compatible, load_decoder  # lazy: optional at import time

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"shadow model {path} not found")
        model, metadata = load_decoder(path, device=device)
        model_dim = shadow_dim(model)
        if dim is not None and int(dim) != model_dim:
            raise ConfigError(
                f"templates have dimension {dim} but shadow model {path} was trained for dimension {model_dim}"
            )
        check_compatible(metadata, encoder_fingerprint, model_dim if dim is None else int(dim))
        protector = cls(model, config, device, metadata)
        protector.shadow_paths = (path,)
        return protector
