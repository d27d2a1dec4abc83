"""Realistic face templates for the sidecar and store benchmarks.

:func:`lfw_dlib_embeddings` reads the dlib embeddings of LFW photos from the embedding cache that
``benchmarks/lfw_verification.py`` / ``benchmarks/advface_lfw.py`` filled (``~/.cache/advface/embeddings.sqlite``;
nothing is recomputed). :class:`SyntheticFaces` fits a two-level Gaussian model to them (identity centres with the
between-identity covariance, photos around a centre with the pooled within-identity covariance) and samples as many
synthetic identities and photos as a benchmark needs, with the same mean, spread and genuine/impostor distances as
real dlib templates. Without the cache (or LFW), :meth:`SyntheticFaces.fallback` uses an isotropic model scaled like
dlib (genuine distance ~0.4, impostor ~0.9).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from advface.hashing import file_sha256
from advface.paths import cache_dir

DIM = 128


def lfw_dlib_embeddings(lfw_dir: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings N x 128, identity labels N)`` of the LFW photos whose dlib embedding is cached.

    Raises FileNotFoundError when LFW or the cache is missing or holds no dlib embeddings."""
    from advface.datasets.lfw import LFW

    db = cache_dir() / "embeddings.sqlite"
    if not db.is_file():
        raise FileNotFoundError(f"no embedding cache at {db}: run benchmarks/lfw_verification.py first")
    lfw = LFW(lfw_dir)
    keys = {file_sha256(item.path): item.identity for item in lfw.items}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        pipelines = [
            r[0]
            for r in conn.execute("SELECT DISTINCT pipeline FROM embeddings")
            if "dlib-resnet-v1:" in r[0] and "|dlib|" in r[0]
        ]
        best: tuple[np.ndarray, np.ndarray] | None = None
        for pipeline in pipelines:
            vectors, labels = [], []
            for content, vector in conn.execute(
                "SELECT content, vector FROM embeddings WHERE pipeline = ? AND vector IS NOT NULL", (pipeline,)
            ):
                if content in keys and len(vector) == 4 * DIM:
                    vectors.append(np.frombuffer(vector, np.float32))
                    labels.append(keys[content])
            if vectors and (best is None or len(vectors) > len(best[0])):
                best = np.stack(vectors), np.array(labels)
    finally:
        conn.close()
    if best is None:
        raise FileNotFoundError(f"{db} holds no dlib embeddings of the LFW photos under {lfw.root}")
    return best


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    """A matrix ``A`` with ``A A^T = cov`` (negative eigenvalues clipped)."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


@dataclass
class SyntheticFaces:
    """Identity centres ~ N(mean, between); photos ~ centre + N(0, within). ``source`` says what it was fit on."""

    mean: np.ndarray
    between: np.ndarray  # square root of the between-identity covariance
    within: np.ndarray  # square root of the within-identity covariance
    source: str

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: Sequence[str] | np.ndarray, source: str) -> SyntheticFaces:
        """Fit the model to real embeddings with identity labels (identities with >= 2 photos)."""
        labels = np.asarray(labels)
        names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        keep = counts[inverse] >= 2
        x, inv = embeddings[keep].astype(np.float64), inverse[keep]
        sums = np.zeros((len(names), x.shape[1]))
        np.add.at(sums, inv, x)
        centres = sums / np.maximum(counts, 1)[:, None]
        used = counts >= 2
        residual = x - centres[inv]
        within = residual.T @ residual / max(len(x) - int(used.sum()), 1)
        mean = centres[used].mean(axis=0)
        between = np.cov(centres[used].T) - within / np.mean(counts[used])  # the centres' own noise removed
        return cls(mean, _sqrt_psd(between), _sqrt_psd(within), source)

    @classmethod
    def fallback(cls) -> SyntheticFaces:
        """Isotropic model at dlib's scale (used when no real embeddings are available)."""
        return cls(
            np.zeros(DIM),
            np.eye(DIM) * (0.62 / np.sqrt(2 * DIM)),
            np.eye(DIM) * (0.40 / np.sqrt(2 * DIM)),
            "isotropic fallback (no cached LFW embeddings)",
        )

    @classmethod
    def load(cls, lfw_dir: str | os.PathLike[str] | None = None) -> tuple[SyntheticFaces, np.ndarray | None]:
        """The model fit on cached LFW dlib embeddings (and those embeddings), or the fallback (and None)."""
        try:
            x, labels = lfw_dlib_embeddings(lfw_dir)
        except Exception as exc:  # noqa: BLE001 - no LFW, no cache, no dlib rows: fall back and say why
            model = cls.fallback()
            model.source += f": {type(exc).__name__}: {exc}"
            return model, None
        source = f"fit on {len(x)} cached dlib embeddings of {len(set(labels.tolist()))} LFW identities"
        return cls.fit(x, labels, source), x

    def centres(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` identity centres (float32)."""
        return (self.mean + rng.standard_normal((n, len(self.mean))) @ self.between.T).astype(np.float32)

    def photos(self, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One photo's template per centre (float32)."""
        noise = rng.standard_normal(centres.shape) @ self.within.T
        return (centres + noise).astype(np.float32)

    def distances(self, n: int = 2000, seed: int = 0) -> dict[str, float]:
        """Median genuine and impostor Euclidean distances of the model (a sanity check against dlib's)."""
        rng = np.random.default_rng(seed)
        c = self.centres(n, rng)
        a, b = self.photos(c, rng), self.photos(c, rng)
        genuine = np.linalg.norm(a - b, axis=1)
        impostor = np.linalg.norm(a - np.roll(b, 1, axis=0), axis=1)
        return {"genuine_median": float(np.median(genuine)), "impostor_median": float(np.median(impostor))}
