"""Sign-gradient ascent machinery shared by both AdvFace methods (plain and identity-aware).

Both protections move a template ``z`` to ``z + delta`` inside the ball ``||delta|| <= rel_l2 * ||z||`` (and an
optional L-inf box) by sign steps; both start from a random offset that depends only on the seed and the row's bytes,
call their shadow(s) on exactly ``lanes`` rows, and round the result to float32 with the bounds holding exactly.
:class:`AscentParams` is what their configuration classes share; the functions below are the steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from advface.errors import ConfigError
from advface.threads import map_single_threaded

_SEED_DOMAIN = b"advface.protect.random_start.v1\x00"


L = TypeVar("L")


class AscentParams:
    """Behaviour shared by the sign-ascent configurations (which define ``steps`` and ``step_size``)."""

    steps: int
    step_size: float | None

    @property
    def effective_step_size(self) -> float:
        """``step_size``, or its default ``2.5 / steps``."""
        return float(self.step_size) if self.step_size is not None else 2.5 / max(self.steps, 1)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_positive_real(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and float(value) > 0
    )


def check_ascent_config(config: Any, method: str) -> None:
    """Validate the fields every sign-ascent protection config shares (steps, rel_l2, linf, step_size, seed,
    batch_size, lanes); ConfigError naming ``method`` otherwise."""
    if not is_int(config.steps) or config.steps < 0:
        raise ConfigError(f"{method} steps must be an integer >= 0, got {config.steps!r}")
    if not is_positive_real(config.rel_l2) or float(config.rel_l2) > 1:
        raise ConfigError(f"{method} rel_l2 (||delta|| / ||z||) must be in (0, 1], got {config.rel_l2!r}")
    if config.linf is not None and not is_positive_real(config.linf):
        raise ConfigError(f"{method} linf must be None or a finite number > 0, got {config.linf!r}")
    if config.step_size is not None and not is_positive_real(config.step_size):
        raise ConfigError(f"{method} step_size must be None or a finite number > 0, got {config.step_size!r}")
    if not is_int(config.seed) or not 0 <= config.seed < 2**64:
        raise ConfigError(f"{method} seed must be an integer in [0, 2**64), got {config.seed!r}")
    for name in ("batch_size", "lanes"):
        value = getattr(config, name)
        if not is_int(value) or value < 1:
            raise ConfigError(f"{method} {name} must be an integer >= 1, got {value!r}")


def shadow_dim(shadow: nn.Module) -> int:
    dim: Any = getattr(shadow, "dim", None)
    if not is_int(dim) or dim < 1:
        raise ConfigError(f"shadow model {type(shadow).__name__} has no valid 'dim' attribute (got {dim!r})")
    return int(dim)


def shadow_device_dtype(shadow: nn.Module, device: str | torch.device | None) -> tuple[torch.device, torch.dtype]:
    tensors: list[torch.Tensor] = list(shadow.parameters()) or list(shadow.buffers())
    float_tensors = [t for t in tensors if t.is_floating_point()]
    dtype = float_tensors[0].dtype if float_tensors else torch.float32
    own = tensors[0].device if tensors else None
    if device is None:
        return (own or torch.device("cpu")), dtype
    wanted = torch.device(device)
    if own is not None and (own.type != wanted.type or (wanted.index is not None and own.index != wanted.index)):
        raise ConfigError(f"shadow model is on {own} but device {wanted} was requested; move it first")
    return (own if own is not None else wanted), dtype


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the block; restore training mode only if this changed it."""
    was_training = module.training
    if was_training:
        module.eval()
    try:
        yield
    finally:
        if was_training:
            module.train()


def row_seed(seed: int, row: np.ndarray) -> int:
    """A 256-bit seed from ``seed`` and the row's little-endian float32 bytes (independent of its position)."""
    digest = hashlib.sha256(_SEED_DOMAIN + seed.to_bytes(8, "little") + row.astype("<f4").tobytes()).digest()
    return int.from_bytes(digest, "little")


def start_offsets(z: np.ndarray, radius: np.ndarray, seed: int) -> np.ndarray:
    """Per row: a uniformly random direction scaled to a uniformly random fraction of the row's radius."""
    out = np.empty(z.shape, np.float64)
    for i, row in enumerate(z):
        rng = np.random.default_rng(row_seed(seed, row))
        direction = rng.standard_normal(z.shape[1])
        direction /= max(float(np.linalg.norm(direction)), 1e-300)
        out[i] = direction * (rng.random() * radius[i])
    return out


def project_np(delta: np.ndarray, radius: np.ndarray, linf: float | None) -> np.ndarray:
    """Onto the L2 ball of per-row ``radius``, then into the L-inf box (clipping never grows the L2 norm)."""
    norms = np.linalg.norm(delta, axis=1)
    scale = np.where(norms > radius, radius / np.maximum(norms, 1e-300), 1.0)
    delta = delta * scale[:, None]
    if linf is not None:
        delta = np.clip(delta, -linf, linf)
    return delta


def project_t(delta: torch.Tensor, radius: torch.Tensor, linf: float | None) -> torch.Tensor:
    norms = delta.norm(dim=1, keepdim=True)
    delta = delta * torch.where(norms > radius, radius / norms.clamp_min(1e-30), torch.ones_like(norms))
    if linf is not None:
        delta = delta.clamp(-linf, linf)
    return delta


def finalize(z: np.ndarray, delta: np.ndarray, radius: np.ndarray, linf: float | None) -> np.ndarray:
    """``z + delta`` in float32, with the bounds holding exactly for the float32 result (checked in float64).

    Rounding ``z + delta`` to float32 moves each coordinate by up to half an ulp of ``z``, which can push a
    template on the ball's boundary just outside it (relative excess ~ 1e-7 / rel_l2); such rows are pulled back
    inside by a margin of a few rounding errors, and coordinates past the box step one ulp towards ``z``. The
    float64 copies of ``z`` and of the result are kept in buffers of this function and zeroed before it returns
    (memory hygiene: docs/encrypted-matching.md).
    """
    z64 = z.astype(np.float64)
    out64 = np.empty_like(z64)  # the float64 view of ``out`` for each check, one buffer reused

    def deviation() -> np.ndarray:
        np.copyto(out64, out)
        return out64 - z64

    try:
        delta = project_np(delta.astype(np.float64), radius, linf)
        np.add(z64, delta, out=out64)
        out = out64.astype(np.float32)
        magnitude = np.abs(z)
        magnitude += np.abs(out)
        rounding = 0.5 * np.linalg.norm(np.spacing(magnitude).astype(np.float64), axis=1)
        magnitude.fill(0)
        for attempt in range(12):
            actual = deviation()
            if linf is not None:
                bad_box = np.abs(actual) > linf
                if bad_box.any():
                    stepped = np.where(bad_box, np.nextafter(out, z), out)
                    out.fill(0)
                    out = stepped
                    actual = deviation()
            norms = np.linalg.norm(actual, axis=1)
            over = norms > radius
            if not over.any() and (linf is None or not (np.abs(actual) > linf).any()):
                return out
            if over.any():
                target = np.maximum(radius[over] - (2.0**attempt) * 2.0 * rounding[over], 0.0)
                shrink = target / norms[over]
                out[over] = (z64[over] + actual[over] * shrink[:, None]).astype(np.float32)
        # Only reachable when the budget is below float32 resolution; never return a template outside its bound.
        actual = deviation()
        bad = np.linalg.norm(actual, axis=1) > radius
        if linf is not None:
            bad |= (np.abs(actual) > linf).any(axis=1)
        out[bad] = z[bad]
        return out
    finally:
        z64.fill(0)
        out64.fill(0)


def lane_tensors(
    z: np.ndarray, delta0: np.ndarray, radius: np.ndarray, config: Any, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha, radius, z, delta)`` of one lane as tensors: per-row sign-step size ``step_size * min(radius /
    sqrt(D), linf)`` and radius as ``L x 1`` columns, templates and start offsets as ``L x D``."""
    per_coord = radius / math.sqrt(z.shape[1])
    if config.linf is not None:
        per_coord = np.minimum(per_coord, config.linf)
    alpha = torch.from_numpy(config.effective_step_size * per_coord).to(device=device, dtype=dtype)[:, None]
    radius_t = torch.from_numpy(radius).to(device=device, dtype=dtype)[:, None]
    z_t = torch.from_numpy(z).to(device=device, dtype=dtype)
    delta = torch.from_numpy(delta0).to(device=device, dtype=dtype)
    return alpha, radius_t, z_t, delta


def run_lanes(fn: Callable[[L], np.ndarray], lanes: Sequence[L], device: torch.device) -> list[np.ndarray]:
    """``fn`` (one lane's ascent) over ``lanes``, results in order. On a CPU, up to the calling thread's torch
    thread count of lanes at once, each lane computed by one thread on one torch thread
    (:func:`advface.threads.map_single_threaded`): a lane's result is then the same for every thread count, which
    a multi-threaded team does not guarantee (its reductions and kernel choices depend on its size: identity-aware
    AdvFace moved by up to 0.023 per coordinate between 1 and 2 threads), and a core that other jobs keep busy
    delays only its own lane instead of every operation of every lane. Elsewhere (CUDA) in order on the calling
    thread."""
    if device.type != "cpu":
        return [fn(lane) for lane in lanes]
    return map_single_threaded(fn, lanes, torch.get_num_threads())


#: One lane's ascent: ``(templates, start offsets, radii, rows)`` of ``lanes`` rows (``rows``: their indices in the
#: whole batch, the last one repeated to pad a short lane) -> the lane's delta.
LaneAscent = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def ascend_in_lanes(
    x: np.ndarray,
    radius: np.ndarray,
    config: Any,
    ascend_lane: LaneAscent,
    device: torch.device,
    *,
    random_start: bool = True,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """The batch loop of every AdvFace method: per chunk of ``config.batch_size`` rows of ``x``, start offsets
    (:func:`start_offsets`, or zero without ``random_start``), each lane of ``config.lanes`` rows (a short lane
    padded with its last row: a fixed call shape) through ``ascend_lane`` (:func:`run_lanes`), then
    :func:`finalize`; ``progress`` gets the rows done after each chunk. Returns float32 ``x + delta``. Its copies
    of the templates (each lane's rows, each chunk's result) are zeroed once used, not just freed."""
    out = np.empty_like(x)
    for start in range(0, len(x), config.batch_size):
        stop = min(start + config.batch_size, len(x))
        if random_start:
            delta = project_np(
                start_offsets(x[start:stop], radius[start:stop], config.seed), radius[start:stop], config.linf
            )
        else:
            delta = np.zeros((stop - start, x.shape[1]), np.float64)
        if config.steps > 0:
            lane_rows = [np.arange(lane, min(lane + config.lanes, stop)) for lane in range(start, stop, config.lanes)]

            def one_lane(rows: np.ndarray, start: int = start, delta: np.ndarray = delta) -> np.ndarray:
                padded = np.concatenate([rows, np.full(config.lanes - len(rows), rows[-1])])
                lane = x[padded]
                try:
                    return ascend_lane(lane, delta[padded - start], radius[padded], padded)
                finally:
                    lane.fill(0)

            for rows, d in zip(lane_rows, run_lanes(one_lane, lane_rows, device), strict=True):
                delta[rows - start] = d[: len(rows)]
        done = finalize(x[start:stop], delta, radius[start:stop], config.linf)
        out[start:stop] = done
        done.fill(0)
        if progress is not None:
            progress(stop - start)
    return out
