"""The face-encoder interface every encoder implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from advface.errors import EmbeddingError, ImageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

Metric = Literal["euclidean", "cosine"]


@dataclass(frozen=True)
class ChipSpec:
    """The aligned face crop an encoder expects.

    ``kind`` names the alignment: ``"dlib"`` (dlib's ``get_face_chip`` from its 5-point landmarks, padding 0.25)
    or ``"arcface"`` (similarity transform of five landmarks onto the 112x112 ArcFace template).
    """

    kind: Literal["dlib", "arcface"]
    size: int
    padding: float = 0.0


class FaceEncoder(abc.ABC):
    """Maps aligned RGB face chips to embeddings.

    Subclasses set ``name``, ``dim``, ``metric`` and ``chip``, and implement :meth:`_embed`.
    """

    name: str
    dim: int
    metric: Metric
    chip: ChipSpec
    #: Decision threshold on :meth:`score` published for this encoder (None if unknown).
    default_threshold: float | None = None

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the embeddings would (name + weights hash); used by caches."""

    @abc.abstractmethod
    def _embed(self, chips: np.ndarray) -> np.ndarray:
        """Embed a validated ``N x S x S x 3`` uint8 batch; returns ``N x dim`` float32."""

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """Embed aligned chips: ``N x S x S x 3`` (or one ``S x S x 3``) RGB uint8 -> ``N x dim`` float32."""
        chips = np.asarray(chips)
        if chips.ndim == 3:
            chips = chips[None]
        expected = (self.chip.size, self.chip.size, 3)
        if chips.ndim != 4 or chips.shape[1:] != expected:
            raise ImageError("chips", f"{self.name} expects chips of shape N x {expected}, got {chips.shape}")
        if chips.dtype != np.uint8:
            raise ImageError("chips", f"{self.name} expects uint8 chips, got {chips.dtype}")
        if len(chips) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = np.asarray(self._embed(np.ascontiguousarray(chips)), dtype=np.float32)
        assert out.shape == (len(chips), self.dim), out.shape
        return out

    def torch_module(self, device: str | None = None) -> torch.nn.Module | None:
        """A differentiable module, input ``N x 3 x S x S`` float RGB in [0, 1], output ``N x dim``; or None."""
        return None

    def score(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Similarity of paired rows of ``a`` and ``b`` (higher = more alike); see :func:`pair_scores`."""
        return pair_scores(a, b, self.metric)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, metric={self.metric!r})"


def pair_scores(a: np.ndarray, b: np.ndarray, metric: Metric) -> np.ndarray:
    """Row-wise similarity: cosine similarity, or minus the Euclidean distance (so higher is always closer)."""
    a = np.atleast_2d(np.asarray(a, np.float64))
    b = np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise EmbeddingError(f"cannot compare embeddings of shapes {a.shape} and {b.shape}")
    if metric == "cosine":
        na = np.linalg.norm(a, axis=1)
        nb = np.linalg.norm(b, axis=1)
        return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)
    if metric == "euclidean":
        return -np.linalg.norm(a - b, axis=1)
    raise ValueError(f"unknown metric {metric!r}")


def validate_embeddings(x: np.ndarray, dim: int) -> np.ndarray:
    """Return ``x`` as an ``N x dim`` float32 array; raise EmbeddingError for a wrong shape, NaN/Inf or zero rows."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise EmbeddingError(f"expected embeddings of dimension {dim}, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise EmbeddingError(f"expected floating-point embeddings, got {x.dtype}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise EmbeddingError(f"embedding rows {np.flatnonzero(bad)[:10].tolist()} contain NaN or Inf")
    zero = np.linalg.norm(x, axis=1) == 0
    if zero.any():
        raise EmbeddingError(f"embedding rows {np.flatnonzero(zero)[:10].tolist()} are zero vectors")
    return x.astype(np.float32, copy=False)
