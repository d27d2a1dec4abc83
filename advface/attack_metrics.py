"""Measuring reconstruction attacks: reconstruct faces from templates, re-embed them, and count how often the face
recognition system accepts a reconstruction as its owner (identity-inference success), plus SSIM / PSNR.

Conventions (see the field notes): the threshold is the one giving a false-match rate of 0.1% on clean data;
*Type I* compares the reconstruction with the raw embedding of the very photo the template came from, *Type II* with
the raw embedding of another photo of the same person.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from skimage.metrics import structural_similarity

from advface.encoders.base import FaceEncoder, pair_scores
from advface.metrics import threshold_at_far


def reconstruct(
    decoder: torch.nn.Module, embeddings: np.ndarray, *, batch_size: int = 256, device: str | None = None
) -> np.ndarray:
    """Faces decoded from ``embeddings``: ``N x S x S x 3`` uint8."""
    device = device or next(decoder.parameters()).device.type
    decoder = decoder.to(device).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(embeddings), batch_size):
            z = torch.from_numpy(np.ascontiguousarray(embeddings[start : start + batch_size], np.float32)).to(device)
            x = decoder(z).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1)
            out.append(x.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def embed_faces(encoder: FaceEncoder, faces: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Embeddings of face images already framed like the encoder's chip (resized to the chip size)."""
    size = encoder.chip.size
    out = []
    for start in range(0, len(faces), batch_size):
        chunk = faces[start : start + batch_size]
        if chunk.shape[1] != size:
            chunk = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in chunk])
        out.append(encoder.embed(chunk))
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


def impostor_threshold(
    embeddings: np.ndarray,
    identities: np.ndarray,
    metric: str,
    *,
    fmr: float = 1e-3,
    pairs: int = 200_000,
    seed: int = 0,
) -> float:
    """Threshold giving false-match rate ``fmr`` over random non-mated pairs of clean embeddings."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(embeddings), pairs * 2)
    b = rng.integers(0, len(embeddings), pairs * 2)
    keep = identities[a] != identities[b]
    a, b = a[keep][:pairs], b[keep][:pairs]
    return threshold_at_far(pair_scores(embeddings[a], embeddings[b], metric), fmr)  # type: ignore[arg-type]


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB between uint8 image batches."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM between uint8 RGB image batches."""
    return np.array([structural_similarity(x, y, channel_axis=2, data_range=255) for x, y in zip(a, b, strict=True)])


@dataclass(frozen=True)
class AttackResult:
    """Outcome of one attacker on one set of templates."""

    type1_success: float
    type2_success: float
    ssim: float
    psnr: float
    threshold: float
    n: int

    def as_dict(self) -> dict[str, float]:
        """JSON-able form."""
        return {
            "type1_success": self.type1_success,
            "type2_success": self.type2_success,
            "ssim": self.ssim,
            "psnr": self.psnr,
            "threshold": self.threshold,
            "n": self.n,
        }


def attack_success(
    encoder: FaceEncoder,
    reconstructions: np.ndarray,
    own_embeddings: np.ndarray,
    other_photo_embeddings: np.ndarray,
    original_faces: np.ndarray,
    threshold: float,
) -> AttackResult:
    """Type I / II success of ``reconstructions`` (framed like the encoder's chip) at ``threshold``; SSIM/PSNR
    against ``original_faces`` (same size as the reconstructions)."""
    emb = embed_faces(encoder, reconstructions)
    type1 = encoder.score(emb, own_embeddings) >= threshold
    type2 = encoder.score(emb, other_photo_embeddings) >= threshold
    return AttackResult(
        type1_success=float(type1.mean()),
        type2_success=float(type2.mean()),
        ssim=float(ssim(reconstructions, original_faces).mean()),
        psnr=float(psnr(reconstructions, original_faces).mean()),
        threshold=float(threshold),
        n=len(reconstructions),
    )
