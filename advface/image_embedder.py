"""Image files -> embeddings: load, detect, align, encode in batches, with an optional cache and worker processes.

This is the data path ``image -> detect/align -> encoder -> raw embedding``. Raw embeddings stay in memory; they reach
disk only when the caller writes them (``advface embed --out``) or enables the benchmark cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from advface.datasets.cache import CachedResult, EmbeddingCache
from advface.embeddings_file import EmbeddingsFile
from advface.encoders.base import ChipSpec, FaceEncoder
from advface.errors import ImageError
from advface.faces import FaceChipper, FacePolicy, create_detector
from advface.images import load_image

#: Bumped whenever detection or alignment changes behaviour, so cached embeddings are recomputed.
PIPELINE_VERSION = 2


@dataclass(frozen=True)
class _ChipperSpec:
    detector: str
    chip: ChipSpec
    policy: str


_WORKER_CHIPPER: FaceChipper | None = None


def _make_chipper(spec: _ChipperSpec) -> FaceChipper:
    return FaceChipper(create_detector(spec.detector), spec.chip, FacePolicy(spec.policy))


def _init_worker(spec: _ChipperSpec) -> None:
    global _WORKER_CHIPPER
    _WORKER_CHIPPER = _make_chipper(spec)


def _chips_for(chipper: FaceChipper, data: bytes, source: str) -> list[np.ndarray] | str:
    """Aligned chips of one image, or the error message."""
    try:
        image = load_image(data)
    except ImageError as exc:
        return exc.reason
    try:
        return [chip for _face, chip in chipper.chips(image, source)]
    except ImageError as exc:
        return exc.reason


def _worker_chips(job: tuple[bytes, str]) -> list[np.ndarray] | str:
    assert _WORKER_CHIPPER is not None
    return _chips_for(_WORKER_CHIPPER, *job)


class ImageEmbedder:
    """Embeds image files with one detector, one encoder and one multi-face policy."""

    def __init__(
        self,
        encoder: FaceEncoder,
        detector: str = "dlib",
        policy: str = "largest",
        *,
        cache: EmbeddingCache | None = None,
        batch_size: int = 64,
        workers: int = 1,
    ) -> None:
        self.encoder = encoder
        self._spec = _ChipperSpec(detector, encoder.chip, FacePolicy(policy).value)
        self.cache = cache
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self._chipper: FaceChipper | None = None

    @property
    def pipeline_fingerprint(self) -> str:
        """Identifies everything that determines an embedding: encoder, detector, chip and policy."""
        chip = self._spec.chip
        chip_id = f"{chip.kind}{chip.size}p{chip.padding}"
        return f"v{PIPELINE_VERSION}|{self.encoder.fingerprint}|{self._spec.detector}|{chip_id}|{self._spec.policy}"

    def _chip_stream(self, jobs: list[tuple[bytes, str]]) -> Iterator[list[np.ndarray] | str]:
        if self.workers == 1 or len(jobs) < 2 * self.workers:
            if self._chipper is None:
                self._chipper = _make_chipper(self._spec)
            for job in jobs:
                yield _chips_for(self._chipper, *job)
            return
        with ProcessPoolExecutor(self.workers, initializer=_init_worker, initargs=(self._spec,)) as pool:
            yield from pool.map(_worker_chips, jobs, chunksize=8)

    def iter_chips(
        self, files: Sequence[tuple[str | os.PathLike[str], str]]
    ) -> Iterator[tuple[str, list[np.ndarray] | str]]:
        """Yield ``(id, chips)`` for each file in order, or ``(id, reason)`` when it yields no face chip."""
        jobs: list[tuple[bytes, str]] = []
        order: list[tuple[str, str | None]] = []
        for path, image_id in files:
            try:
                jobs.append((Path(path).read_bytes(), image_id))
                order.append((image_id, None))
            except OSError as exc:
                order.append((image_id, f"cannot read file ({exc.strerror or exc})"))
        stream = self._chip_stream(jobs)
        for image_id, error in order:
            yield (image_id, error) if error is not None else (image_id, next(stream))

    def embed_files(
        self, files: Sequence[tuple[str | os.PathLike[str], str]], *, progress: bool = True
    ) -> EmbeddingsFile:
        """Embed ``(path, id)`` pairs. Unusable files are reported in ``failed`` (id -> reason); the rest go on.

        With policy ``all`` an image with several faces yields ids ``id#0``, ``id#1``, ...
        """
        ids: list[str] = []
        vectors: list[np.ndarray] = []
        failed: dict[str, str] = {}
        pipeline = self.pipeline_fingerprint
        bar = tqdm(total=len(files), desc=f"embed ({self.encoder.name})", unit="img", disable=not progress)

        contents: list[tuple[str, Path, bytes | None, str | None]] = []
        for path, image_id in files:
            try:
                raw = Path(path).read_bytes()
                contents.append((image_id, Path(path), raw, EmbeddingCache.content_key(raw)))
            except OSError as exc:
                contents.append((image_id, Path(path), None, None))
                failed[image_id] = f"cannot read file ({exc.strerror or exc})"
        cached: dict[str, CachedResult] = {}
        if self.cache is not None:
            keys = [key for *_rest, key in contents if key is not None]
            cached = self.cache.get_many(pipeline, keys)

        results: dict[str, list[np.ndarray] | str] = {}
        todo: list[tuple[str, bytes, str]] = []
        for image_id, _path, data, key in contents:
            if data is None or key is None:
                bar.update(1)
            elif key in cached and self._spec.policy != "all":
                hit = cached[key]
                results[image_id] = [hit.embedding] if hit.embedding is not None else (hit.error or "error")
                bar.update(1)
            else:
                todo.append((image_id, data, key))

        pending_ids: list[tuple[str, int]] = []
        pending_chips: list[np.ndarray] = []
        fresh: dict[str, CachedResult] = {}

        def flush() -> None:
            if not pending_chips:
                return
            emb = self.encoder.embed(np.stack(pending_chips))
            for (image_id, _k), vec in zip(pending_ids, emb, strict=True):
                slot = results.setdefault(image_id, [])
                assert isinstance(slot, list)
                slot.append(vec)
            pending_ids.clear()
            pending_chips.clear()

        key_of = {image_id: key for image_id, _data, key in todo}
        for (image_id, _data, _key), chips in zip(todo, self._chip_stream([(d, i) for i, d, _k in todo]), strict=True):
            if isinstance(chips, str):
                results[image_id] = chips
                fresh[key_of[image_id]] = CachedResult(None, chips)
            else:
                for k, chip in enumerate(chips):
                    pending_ids.append((image_id, k))
                    pending_chips.append(chip)
            if len(pending_chips) >= self.batch_size:
                flush()
            bar.update(1)
        flush()
        bar.close()

        for image_id, *_rest in contents:
            outcome = results.get(image_id)
            if outcome is None:
                continue
            if isinstance(outcome, str):
                failed[image_id] = outcome
                continue
            if self._spec.policy == "all":
                for k, vec in enumerate(outcome):
                    ids.append(f"{image_id}#{k}")
                    vectors.append(vec)
            else:
                ids.append(image_id)
                vectors.append(outcome[0])
                if image_id in key_of:
                    fresh[key_of[image_id]] = CachedResult(outcome[0], None)
        if self.cache is not None and fresh and self._spec.policy != "all":
            self.cache.put_many(pipeline, fresh)
        matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, self.encoder.dim), np.float32)
        return EmbeddingsFile(ids, matrix, self.encoder.name, self.encoder.fingerprint, failed)
