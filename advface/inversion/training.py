"""Training an inversion decoder (embedding -> face) on (embedding, face) pairs, resumable, seeded, CPU or CUDA.

:func:`train_decoder` trains on given pairs; :func:`train_on_group` trains on one identity group of a split and
saves the decoder with its full metadata (what ``advface train-shadow`` and the audit's attackers use).

Losses: ``l1`` (the AdvFace poster's pixel objective) and optionally an identity term: the encoder's differentiable
module embeds the reconstruction (with small random jitter, so the decoder keeps producing faces rather than
adversarial patterns) and the distance to the input embedding, relative to its norm, is added with ``id_weight``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from advface.datasets.pairs import FacePairs
from advface.datasets.splits import IdentitySplit
from advface.encoders.base import FaceEncoder

if TYPE_CHECKING:
    from advface.inversion.models import InversionDecoder


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all recorded in the checkpoint's metadata)."""

    arch: str = "resup"
    image_size: int = 64
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    id_weight: float = 0.0  #: weight of the identity loss (0 = pixel L1 only, as in the poster)
    jitter: int = 4  #: max pixel shift (at 150 px) applied before the identity loss
    seed: int = 0
    device: str | None = None
    #: start from this checkpoint's weights (fine-tuning, e.g. adding the identity loss to a pixel-trained decoder);
    #: its architecture, dimension and image size must match
    init_from: str | None = None

    def resolved_device(self) -> str:
        """``device`` or CUDA when available, else CPU."""
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def faces_to_tensor(faces: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """``N x S x S x 3`` uint8 -> ``N x 3 x S x S`` float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(faces)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _identity_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    encoder_module: torch.nn.Module,
    chip_size: int,
    jitter: int,
    generator: torch.Generator,
) -> torch.Tensor:
    x = F.interpolate(recon, size=(chip_size, chip_size), mode="bilinear", align_corners=False)
    if jitter > 0:
        shift = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(2, 3))
    emb = encoder_module(x)
    return ((emb - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-6)).mean()


def _schedule(optimizer: torch.optim.Optimizer, lr: float, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle learning rate (10% warm-up, at least two steps of it); constant for runs too short for a cycle."""
    if total_steps < 8:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    pct_start = max(0.1, 2.5 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=pct_start)


def _initial_weights(config: TrainConfig, model: InversionDecoder) -> dict:
    from advface.errors import ConfigError
    from advface.inversion import load_decoder

    assert config.init_from is not None  # only called with an init checkpoint
    init, _meta = load_decoder(config.init_from)
    if init.config() != model.config():
        raise ConfigError(f"--init {config.init_from}: a {init.config()} decoder cannot initialise {model.config()}")
    return init.state_dict()


def evaluate_l1(model: torch.nn.Module, pairs: FacePairs, batch_size: int = 256, device: str = "cpu") -> float:
    """Mean absolute pixel error (0-1 scale) of the model's reconstructions of ``pairs``."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            z = torch.from_numpy(pairs.embeddings[start : start + batch_size]).to(device)
            x = faces_to_tensor(pairs.faces[start : start + batch_size], device)
            total += float((model(z) - x).abs().mean(dim=(1, 2, 3)).sum())
            count += len(z)
    return total / max(count, 1)


def train_decoder(
    train: FacePairs,
    config: TrainConfig,
    *,
    val: FacePairs | None = None,
    encoder_module: torch.nn.Module | None = None,
    encoder_chip_size: int = 150,
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[InversionDecoder, dict]:
    """Train a decoder of ``config.arch`` on ``train``; returns (model in eval mode, history).

    With ``work_dir`` a checkpoint is written after every epoch and a rerun with the same config resumes from it.
    """
    from advface.inversion import build_decoder

    if config.id_weight > 0 and encoder_module is None:
        raise ValueError("id_weight > 0 needs the encoder's differentiable module")
    if train.faces.shape[1] != config.image_size:
        raise ValueError(f"pairs have {train.faces.shape[1]} px faces, config asks for {config.image_size}")
    device = config.resolved_device()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_decoder(config.arch, train.embeddings.shape[1], config.image_size)
    if config.init_from:
        model.load_state_dict(_initial_weights(config, model))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = _schedule(optimizer, config.lr, config.epochs * steps_per_epoch)
    if encoder_module is not None:
        encoder_module = encoder_module.to(device).eval()
        for p in encoder_module.parameters():
            p.requires_grad_(False)
    history: dict = {"config": asdict(config), "epochs": []}
    start_epoch = 0
    state_file = Path(work_dir) / "last.pt" if work_dir else None
    if state_file is not None and state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=False)
        if state["config"] == asdict(config):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            history = state["history"]
            start_epoch = state["epoch"] + 1

    z_all = torch.from_numpy(train.embeddings)
    for epoch in range(start_epoch, config.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        started = time.perf_counter()
        totals = {"l1": 0.0, "id": 0.0}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            z = z_all[idx].to(device)
            x = faces_to_tensor(train.faces[idx.numpy()], device)
            recon = model(z)
            l1 = (recon - x).abs().mean()
            loss = l1
            if config.id_weight > 0:
                assert encoder_module is not None  # checked on entry
                id_loss = _identity_loss(recon, z, encoder_module, encoder_chip_size, config.jitter, generator)
                loss = loss + config.id_weight * id_loss
                totals["id"] += float(id_loss.detach()) * len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            totals["l1"] += float(l1.detach()) * len(idx)
            bar.set_postfix(l1=f"{float(l1.detach()):.4f}")
        record = {
            "epoch": epoch + 1,
            "train_l1": totals["l1"] / len(train),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if config.id_weight > 0:
            record["train_id"] = totals["id"] / len(train)
        if val is not None and len(val):
            record["val_l1"] = evaluate_l1(model, val, device=device)
        history["epochs"].append(record)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix(".tmp")
            torch.save(
                {
                    "config": asdict(config),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "epoch": epoch,
                },
                tmp,
            )
            os.replace(tmp, state_file)
    model.eval()
    return model, history


def train_on_group(
    pairs: FacePairs,
    split: IdentitySplit,
    group: str,
    encoder: FaceEncoder,
    config: TrainConfig,
    *,
    out: str | os.PathLike[str],
    dataset_name: str,
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[InversionDecoder, dict]:
    """Train a decoder on the photos of one split group (validated on the evaluation group, without mirrors) and
    save it with full metadata (role, encoder, data split, training config, metrics, seed) to ``out``."""
    from advface.inversion import save_decoder

    train = pairs.of_identities(split.group(group))
    val = pairs.of_identities(split.evaluation).without_flips()
    module = encoder.torch_module() if config.id_weight > 0 else None
    model, history = train_decoder(
        train,
        config,
        val=val,
        encoder_module=module,
        encoder_chip_size=encoder.chip.size,
        work_dir=work_dir,
        progress=progress,
    )
    metadata = {
        "role": "shadow" if group == "defender" else "attacker",
        "encoder": encoder.name,
        "encoder_fingerprint": encoder.fingerprint,
        "dim": int(pairs.embeddings.shape[1]),
        "image_size": config.image_size,
        "face_chip": {"kind": encoder.chip.kind, "size": encoder.chip.size, "padding": encoder.chip.padding},
        "training_data": {
            "dataset": dataset_name,
            "group": group,
            "split": split.describe(),
            "photos": int((~train.flipped).sum()),
            "pairs_with_flips": len(train),
        },
        "train_config": asdict(config),
        "loss": "l1" if config.id_weight == 0 else f"l1 + {config.id_weight} * identity",
        "metrics": {
            "final_train_l1": history["epochs"][-1]["train_l1"],
            "val_l1_evaluation_group": evaluate_l1(model, val, device=config.resolved_device()),
        },
        "seed": config.seed,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    save_decoder(Path(out), model, metadata)
    return model, metadata
