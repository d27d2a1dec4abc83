"""Training the identity-conditioned generator: autoencoder first, then the latent denoiser; resumable, seeded.

Stages, each resumable from the work folder (``state.pt``, written atomically every ``checkpoint_minutes`` and at
the end of each stage):

1. **autoencoder** (``ae_steps`` steps of ``ae_batch`` faces): pixel L1 + edge L1 (see
   :mod:`advface.generative.autoencoder`), AdamW; then its latent scale is calibrated on the training faces;
2. **denoiser** (``steps`` steps of ``batch`` latents): the training faces are encoded once, then v-prediction with
   min-SNR weighting, identity condition dropped for ``cond_drop`` of the rows (classifier-free guidance), AdamW with
   a short warm-up, EMA weights (``ema_decay``) kept for sampling.

Every random draw of step ``k`` (batch rows, noise, times, condition dropout) comes from a generator seeded with
``(seed, stage, k)``, so a run killed and resumed from its last checkpoint continues exactly as an uninterrupted run
would (on the same machine and software). A work folder whose configuration or data differ is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from advface.errors import ConfigError
from advface.generative.autoencoder import FaceAutoencoder, autoencoder_loss
from advface.generative.config import GeneratorTrainConfig
from advface.generative.denoiser import LatentDenoiser
from advface.generative.diffusion import v_loss
from advface.generative.model import IdentityGenerator, atomic_save, faces_to_tensor, parameter_count

STATE_FILE = "state.pt"
STATE_TAG = "advface-generator-training"


@dataclass
class TrainingData:
    """What the generator learns from: face chips (``N x S x S x 3`` uint8) and each face's own embedding."""

    faces: np.ndarray
    embeddings: np.ndarray
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.faces) != len(self.embeddings) or len(self.faces) == 0:
            raise ConfigError(
                f"training data needs as many embeddings as faces (> 0), got {len(self.faces)} "
                f"faces and {len(self.embeddings)} embeddings"
            )
        if not np.isfinite(self.embeddings).all():
            raise ConfigError("training embeddings contain NaN or Inf")

    def fingerprint(self) -> str:
        """A short hash of the data (a work folder is bound to it)."""
        digest = hashlib.sha256()
        digest.update(str(self.faces.shape).encode())
        digest.update(np.ascontiguousarray(self.faces[:: max(1, len(self.faces) // 64)]).tobytes())
        digest.update(np.ascontiguousarray(self.embeddings, dtype=np.float32).tobytes())
        return digest.hexdigest()[:16]


def _generator(seed: int, stage: str, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{stage}|{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _lr(config: GeneratorTrainConfig, base: float, step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup:
        return base * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, total - config.warmup)
    return float(base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))))


class GeneratorTrainer:
    """Runs (or resumes) the two stages in ``work_dir`` and writes the final checkpoint with :meth:`run`."""

    def __init__(
        self,
        config: GeneratorTrainConfig,
        data: TrainingData,
        work_dir: str | Path,
        metadata: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        config.check()
        self.config = config
        self.data = data
        self.work_dir = Path(work_dir)
        self.metadata = dict(metadata or {})
        self.progress = progress
        self.device = torch.device(config.resolved_device())
        if config.threads:
            torch.set_num_threads(config.threads)
        if data.faces.shape[1:] != (config.image_size, config.image_size, 3):
            raise ConfigError(f"training faces are {data.faces.shape[1:]}, the run needs {config.image_size} px RGB")
        with torch.random.fork_rng(devices=[]):  # initial weights from the seed alone
            torch.manual_seed(config.seed)
            self.autoencoder = FaceAutoencoder(config.autoencoder_config()).to(self.device)
            self.denoiser = LatentDenoiser(config.denoiser_config(data.embeddings.shape[1])).to(self.device)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.ae_opt = torch.optim.AdamW(self.autoencoder.parameters(), lr=config.ae_lr, weight_decay=0.0)
        self.opt = torch.optim.AdamW(self.denoiser.parameters(), lr=config.lr, weight_decay=0.0)
        self.stage, self.step = "autoencoder", 0
        self.history: dict[str, list[dict[str, float]]] = {"autoencoder": [], "denoiser": []}
        self.seconds = {"autoencoder": 0.0, "denoiser": 0.0}
        self._latents: torch.Tensor | None = None
        self._resume()

    # ------------------------------------------------------------------ state

    def _binding(self) -> dict[str, Any]:
        return {"config": self.config.identity(), "data": self.data.fingerprint()}

    def _resume(self) -> None:
        path = self.work_dir / STATE_FILE
        if not path.is_file():
            return
        from advface.generative.model import read_checkpoint

        state = read_checkpoint(path, STATE_TAG)
        if state.get("binding") != json.loads(json.dumps(self._binding())):
            raise ConfigError(
                f"{path}: the work folder belongs to a run with other settings or data; use another "
                "--work-dir (or delete it to start over)"
            )
        self.autoencoder.load_state_dict(state["autoencoder"])
        self.denoiser.load_state_dict(state["denoiser"])
        self.ema.load_state_dict(state["ema"])
        self.ae_opt.load_state_dict(state["ae_opt"])
        self.opt.load_state_dict(state["opt"])
        self.stage, self.step = state["stage"], int(state["step"])
        self.history = state["history"]
        self.seconds = state["seconds"]

    def save_state(self) -> None:
        """Write the work folder's state (atomic)."""
        atomic_save(
            {
                "format": STATE_TAG,
                "binding": self._binding(),
                "stage": self.stage,
                "step": self.step,
                "autoencoder": self.autoencoder.state_dict(),
                "denoiser": self.denoiser.state_dict(),
                "ema": self.ema.state_dict(),
                "ae_opt": self.ae_opt.state_dict(),
                "opt": self.opt.state_dict(),
                "history": self.history,
                "seconds": self.seconds,
            },
            self.work_dir / STATE_FILE,
        )

    def adopt_autoencoder(self, autoencoder: FaceAutoencoder, source: str) -> None:
        """Skip stage 1 with an already trained (and calibrated) ``autoencoder`` of the same shape, so that several
        denoisers can be compared on one autoencoder; only in a fresh work folder. ``source`` is recorded in the
        metadata (``autoencoder_from``)."""
        if self.stage != "autoencoder" or self.step != 0:
            raise ConfigError(f"{self.work_dir}: training has started; an autoencoder can only be adopted before")
        if autoencoder.config != self.autoencoder.config:
            raise ConfigError(
                f"the adopted autoencoder is {autoencoder.config}, the run needs {self.autoencoder.config}"
            )
        self.autoencoder.load_state_dict(autoencoder.state_dict())
        self.autoencoder.eval()
        self.metadata["autoencoder_from"] = source
        self.stage, self.step = "denoiser", 0
        self.save_state()

    # ------------------------------------------------------------------ stages

    def _faces(self, rows: torch.Tensor) -> torch.Tensor:
        return faces_to_tensor(self.data.faces[rows.numpy()], self.device)

    def train_autoencoder(self) -> None:
        """Stage 1 (from the current step to ``ae_steps``), then the latent scale calibration."""
        c = self.config
        n = len(self.data.faces)
        self.autoencoder.train()
        last_save = time.monotonic()
        with tqdm(
            total=c.ae_steps, initial=self.step, desc="autoencoder", unit="step", disable=not self.progress
        ) as bar:
            while self.step < c.ae_steps:
                started = time.perf_counter()
                gen = _generator(c.seed, "autoencoder", self.step)
                rows = torch.randint(0, n, (c.ae_batch,), generator=gen)
                images = self._faces(rows)
                for group in self.ae_opt.param_groups:
                    group["lr"] = _lr(c, c.ae_lr, self.step, c.ae_steps)
                recon, latents = self.autoencoder(images)
                loss, parts = autoencoder_loss(recon, images, latents)
                self.ae_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.ae_opt.step()
                self.step += 1
                self.seconds["autoencoder"] += time.perf_counter() - started
                if self.step % 50 == 0 or self.step == c.ae_steps:
                    self.history["autoencoder"].append({"step": self.step, **parts})
                    bar.set_postfix(l1=f"{parts['l1']:.4f}")
                bar.update(1)
                if time.monotonic() - last_save > 60 * c.checkpoint_minutes:
                    self.save_state()
                    last_save = time.monotonic()
        self.autoencoder.eval()
        with torch.no_grad():
            sample = torch.from_numpy(np.random.default_rng(c.seed).choice(n, min(n, 512), replace=False))
            self.autoencoder.calibrate(self._faces(sample))
        self.stage, self.step = "denoiser", 0
        self.save_state()

    def latents(self) -> torch.Tensor:
        """Latents of every training face (encoded once per run)."""
        if self._latents is None:
            chunks = []
            with torch.no_grad():
                for start in tqdm(range(0, len(self.data.faces), 256), desc="encode faces", disable=not self.progress):
                    rows = torch.arange(start, min(start + 256, len(self.data.faces)))
                    chunks.append(self.autoencoder.encode(self._faces(rows)))
            self._latents = torch.cat(chunks)
        return self._latents

    def train_denoiser(self) -> None:
        """Stage 2, from the current step to ``steps``."""
        c = self.config
        latents = self.latents()
        embeddings = torch.from_numpy(np.ascontiguousarray(self.data.embeddings, dtype=np.float32)).to(self.device)
        n = len(latents)
        self.denoiser.train()
        last_save = time.monotonic()
        with tqdm(total=c.steps, initial=self.step, desc="denoiser", unit="step", disable=not self.progress) as bar:
            while self.step < c.steps:
                started = time.perf_counter()
                gen = _generator(c.seed, "denoiser", self.step)
                rows = torch.randint(0, n, (c.batch,), generator=gen)
                drop = torch.rand(c.batch, generator=gen) < c.cond_drop
                for group in self.opt.param_groups:
                    group["lr"] = _lr(c, c.lr, self.step, c.steps)
                loss = v_loss(self.denoiser, latents[rows], embeddings[rows], drop.to(self.device), gen)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), 1.0)
                self.opt.step()
                with torch.no_grad():
                    decay = min(c.ema_decay, (1 + self.step) / (10 + self.step))
                    for e, p in zip(self.ema.parameters(), self.denoiser.parameters(), strict=True):
                        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
                self.step += 1
                self.seconds["denoiser"] += time.perf_counter() - started
                if self.step % 50 == 0 or self.step == c.steps:
                    self.history["denoiser"].append({"step": self.step, "loss": loss.item()})
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update(1)
                if time.monotonic() - last_save > 60 * c.checkpoint_minutes:
                    self.save_state()
                    last_save = time.monotonic()
        self.stage = "done"
        self.save_state()

    def run(self) -> IdentityGenerator:
        """Run what is left of both stages; the trained generator (EMA denoiser) with its metadata."""
        if self.stage == "autoencoder":
            self.train_autoencoder()
        if self.stage == "denoiser":
            self.train_denoiser()
        return self.generator()

    def generator(self) -> IdentityGenerator:
        """The generator as trained so far (EMA weights), with the run's metadata."""
        c = self.config
        metadata = {
            **self.metadata,
            "train_config": c.identity(),
            "training_data": {
                **self.data.description,
                "faces": len(self.data.faces),
                "fingerprint": self.data.fingerprint(),
            },
            "steps": {
                "autoencoder": c.ae_steps if self.stage != "autoencoder" else self.step,
                "denoiser": self.step if self.stage == "denoiser" else (c.steps if self.stage == "done" else 0),
            },
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "parameters": {
                "autoencoder": parameter_count(self.autoencoder),
                "denoiser": parameter_count(self.denoiser),
            },
            "metrics": {
                "autoencoder_final": self.history["autoencoder"][-1] if self.history["autoencoder"] else None,
                "denoiser_final_loss": self.history["denoiser"][-1]["loss"] if self.history["denoiser"] else None,
            },
            "seed": c.seed,
        }
        ae = copy.deepcopy(self.autoencoder).cpu()
        ema = copy.deepcopy(self.ema).cpu()
        return IdentityGenerator(ae, ema, metadata)
