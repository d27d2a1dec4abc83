"""The local engine: chunks protected one after another in this process (batched torch; CUDA when asked)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from advface.protect import TemplateProtector
from advface.reencode.chunk import reencode_chunk
from advface.reencode.sources import RawChunk

#: ``commit(index, raw_chunk, ids, protected)``: called in chunk order once a chunk is protected.
Commit = Callable[[int, RawChunk, list[str], np.ndarray], None]


class LocalEngine:
    """Runs :func:`reencode_chunk` on each chunk with one protector (either method)."""

    name = "local"

    def __init__(self, protector: TemplateProtector) -> None:
        self.protector = protector

    def run(self, chunks: Iterator[tuple[int, RawChunk]], commit: Commit) -> None:
        """Protect every chunk and ``commit`` it before reading the next."""
        for index, raw in chunks:
            ids, protected = reencode_chunk(raw.ids, raw.vectors, self.protector)
            commit(index, raw, ids, protected)
