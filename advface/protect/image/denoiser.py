"""A small learned denoiser (DnCNN-like residual CNN): a purification attack on protected photos.

A thief who wants the identity back from a protected photo can run a denoiser first (AntiPure's concern). This one is
trained here, on CPU in minutes: ``depth`` 3x3 convolutions of ``width`` channels predict the noise, which is
subtracted (Zhang et al. 2017, residual learning). :func:`train_denoiser` learns to remove Gaussian noise from LFW
photos of people the caller names (keep them disjoint from the evaluation sample; cached under
``<cache dir>/denoisers/`` keyed by its settings); :func:`train_pair_denoiser` learns to undo the protection itself
from (protected, clean) pairs, the adaptive purifier of a thief who owns the tool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from advface.images import load_image
from advface.paths import cache_dir

log = logging.getLogger(__name__)


class DnCNN(nn.Module):
    """``depth`` 3x3 conv layers (conv-ReLU ... conv) predicting the noise of an RGB image in [0, 1].

    No batch norm (DnCNN has it): with the small batches affordable on CPU it stalled training (measured: no gain
    over the noisy input after 800 steps), while the plain network learns within a few hundred steps.
    """

    def __init__(self, depth: int = 6, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The denoised image (input minus predicted noise)."""
        return x - self.body(x)


@dataclass(frozen=True)
class DenoiserConfig:
    """Training settings (they also key the cache)."""

    depth: int = 6
    width: int = 32
    patch: int = 48
    batch: int = 8
    steps: int = 800
    lr: float = 1e-3
    #: Noise standard deviation, uniform in this range (uint8 levels).
    sigma: tuple[float, float] = (2.0, 12.0)
    photos: int = 400
    seed: int = 0
    #: Architecture revision (part of the cache key).
    version: int = 2


def _training_photos(lfw_dir: Path, exclude_people: set[str], count: int, seed: int) -> list[Path]:
    people = sorted(p for p in (lfw_dir / "images").iterdir() if p.is_dir() and p.name not in exclude_people)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(people), size=min(count, len(people)), replace=False)
    return [sorted(people[i].glob("*.jpg"))[0] for i in sorted(chosen)]


def train_denoiser(
    lfw_dir: Path,
    exclude_people: Sequence[str] = (),
    config: DenoiserConfig = DenoiserConfig(),
    progress: bool = True,
) -> tuple[DnCNN, dict]:
    """Train a :class:`DnCNN` to remove Gaussian noise from random patches of LFW photos (people in
    ``exclude_people`` left out)."""
    rng = np.random.default_rng(config.seed)
    files = _training_photos(Path(lfw_dir), set(exclude_people), config.photos, config.seed)
    images = [(_to_chw(load_image(f)),) for f in files]

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        (clean,) = _patch_batch(rng, images, config)
        sigma = torch.from_numpy(rng.uniform(*config.sigma, size=(config.batch, 1, 1, 1))).float() / 255.0
        return clean + sigma * torch.randn(clean.shape), clean

    model, info = _fit(batch, config, progress)
    return model, {**info, "train_photos": len(files)}


def train_pair_denoiser(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], config: DenoiserConfig = DenoiserConfig(), progress: bool = True
) -> tuple[DnCNN, dict]:
    """Train a :class:`DnCNN` to map each ``(degraded, clean)`` uint8 photo pair's first image to its second, on
    aligned random patches: the *adaptive* purifier of a thief who protects photos of his own with the same tool
    and learns to undo it (``config.sigma`` and ``config.photos`` are unused)."""
    if not pairs:
        raise ValueError("train_pair_denoiser needs at least one (degraded, clean) pair")
    rng = np.random.default_rng(config.seed)
    tensors = [(_to_chw(a), _to_chw(b)) for a, b in pairs]
    for a, b in tensors:
        if a.shape != b.shape:
            raise ValueError(f"pair shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        degraded, clean = _patch_batch(rng, tensors, config)
        return degraded, clean

    model, info = _fit(batch, config, progress)
    return model, {**info, "train_pairs": len(pairs)}


def _to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1).float() / 255.0


def _patch_batch(
    rng: np.random.Generator, items: Sequence[tuple[torch.Tensor, ...]], config: DenoiserConfig
) -> list[torch.Tensor]:
    """``config.batch`` random items, each cut to one random ``config.patch`` window (the same window for every
    image of the item, mirrored half the time); one stacked batch per image position."""
    cuts = []
    for _ in range(config.batch):
        images = items[int(rng.integers(len(items)))]
        y = int(rng.integers(images[0].shape[1] - config.patch + 1))
        x = int(rng.integers(images[0].shape[2] - config.patch + 1))
        cut = [img[:, y : y + config.patch, x : x + config.patch] for img in images]
        cuts.append([c.flip(2) for c in cut] if rng.random() < 0.5 else cut)
    return [torch.stack(column) for column in zip(*cuts)]


def _fit(
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], config: DenoiserConfig, progress: bool
) -> tuple[DnCNN, dict]:
    """Adam + cosine schedule on MSE(model(input), target) over ``config.steps`` batches."""
    torch.manual_seed(config.seed)
    model = DnCNN(config.depth, config.width)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    start = time.perf_counter()
    losses: list[float] = []
    baseline: list[float] = []
    for _ in tqdm(range(config.steps), desc="train denoiser", disable=not progress, leave=False):
        degraded, clean = next_batch()
        loss = F.mse_loss(model(degraded), clean)
        baseline.append(float(F.mse_loss(degraded, clean)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    info = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_mse": float(np.mean(losses[-100:])),
        "noisy_input_mse": float(np.mean(baseline[-100:])),
    }
    return model, info


def load_or_train_denoiser(
    lfw_dir: Path,
    exclude_people: Sequence[str] = (),
    config: DenoiserConfig = DenoiserConfig(),
    cache: Path | None = None,
) -> tuple[DnCNN, dict]:
    """The cached denoiser for these settings and excluded people, trained now when absent."""
    key = hashlib.sha256(json.dumps([asdict(config), sorted(exclude_people)]).encode()).hexdigest()[:16]
    path = (cache or cache_dir()) / "denoisers" / f"dncnn-{key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = DnCNN(config.depth, config.width)
        model.load_state_dict(saved["state"])
        return model.eval(), {**json.loads(saved["info"]), "cached": str(path)}
    model, info = train_denoiser(lfw_dir, exclude_people, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": model.state_dict(), "info": json.dumps({**info, "config": asdict(config)})}, tmp)
    tmp.replace(path)
    return model, {**info, "config": asdict(config), "cached": str(path)}


def denoise(model: DnCNN, image: np.ndarray) -> np.ndarray:
    """Run the denoiser on an ``H x W x 3`` uint8 image."""
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0
        y = model(x)[0].clamp(0, 1)
    return (y.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
