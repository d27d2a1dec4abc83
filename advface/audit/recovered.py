"""Counting the templates (and probes) a thief finds in bytes they hold (a memory dump, database files), given the
values they are looked for by.

A coordinate counts as *found* when its exact value occurs in the bytes, in one of the forms the sidecar's code
makes of it: float32 (pairs of neighbouring coordinates in one 8-byte aligned word, as numpy lays a row out), float64
(what the encrypted gallery converts templates to), and, for probes, the quantised float64 coefficients the gallery
encodes. A row counts as *recovered* (``half``) when at least half of its coordinates are found, and ``full`` when
all are. :func:`plaintext_words` and :func:`plaintexts_recovered` do the same for the SEAL plaintext encodings of a
template's columns (which decode without any key). This is the definition of
``benchmarks/encrypted_memory_thief.py`` and of the audit's encrypted-matching scenario
(:mod:`advface.audit.encrypted_thief`); it is an upper bound on a thief, who does not know which bytes to look at.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "WordIndex",
    "forms",
    "found_coordinates",
    "plaintext_words",
    "plaintexts_found",
    "plaintexts_recovered",
    "probe_coefficients",
    "recovered",
    "summarise",
]


class WordIndex:
    """The 8-byte aligned 64-bit words of some bytes (a memory dump is hundreds of MB), searched for many values at
    once: a pass over the words keeps those whose low 24 bits are the low bits of a wanted value (a table lookup,
    in chunks, no sort of the dump), then the few candidates are compared exactly."""

    _BITS = 24
    _CHUNK = 1 << 22  # words per chunk of a pass

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self.words = np.frombuffer(data, dtype=np.uint64, count=len(data) // 8)

    def _candidates(self, values: np.ndarray) -> np.ndarray:
        mask = np.uint64((1 << self._BITS) - 1)
        table = np.zeros(1 << self._BITS, bool)
        table[(values & mask).ravel()] = True
        parts = [
            chunk[table[chunk & mask]]
            for chunk in (self.words[i : i + self._CHUNK] for i in range(0, len(self.words), self._CHUNK))
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint64)

    def contains(self, values: np.ndarray) -> np.ndarray:
        """Booleans of ``values``' shape (uint64): which occur among the words."""
        v = np.asarray(values, np.uint64)
        return np.isin(v, self._candidates(v))

    def narrowed(self, *values: np.ndarray) -> WordIndex:
        """The words that are among ``values`` (any arrays of uint64), found in one pass: searching the result for
        any of those values gives the same answer as searching this index, at a fraction of the cost."""
        wanted = np.unique(np.concatenate([np.asarray(v, np.uint64).ravel() for v in values]))
        found = self._candidates(wanted)
        index = WordIndex(b"")
        index.words = found[np.isin(found, wanted)]
        index.size = self.size
        return index


def forms(rows: np.ndarray, extra: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """The uint64 words :func:`found_coordinates` looks for (for :meth:`WordIndex.narrowed`)."""
    t = np.ascontiguousarray(rows, np.float32)
    return [t.view(np.uint64)] + [
        np.ascontiguousarray(f, np.float64).view(np.uint64) for f in (t.astype(np.float64), *extra)
    ]


def _index(data: bytes | WordIndex) -> WordIndex:
    return data if isinstance(data, WordIndex) else WordIndex(data)


def found_coordinates(data: bytes | WordIndex, rows: np.ndarray, extra: Sequence[np.ndarray] = ()) -> np.ndarray:
    """``N x D`` booleans: which coordinates of ``rows`` (``N x D`` float32, ``D`` even) occur exactly in ``data``,
    as float32 (in 8-byte aligned pairs), as float64, or as the float64 of an array of ``extra`` (each ``N x D``,
    e.g. a probe's quantised coefficients)."""
    t = np.ascontiguousarray(rows, np.float32)
    if t.ndim != 2 or t.shape[1] % 2:
        raise ValueError(f"rows must be N x D with an even D, got shape {t.shape}")
    if len(t) == 0:
        return np.zeros(t.shape, bool)
    index = _index(data)
    pairs = t.view(np.uint64)  # N x D/2: two float32 coordinates per word
    hit = np.repeat(index.contains(pairs), 2, axis=1)
    for form in (t.astype(np.float64), *extra):
        hit |= index.contains(np.ascontiguousarray(form, np.float64).view(np.uint64))
    return hit


def summarise(hit: np.ndarray) -> dict[str, int]:
    """``half``: rows with at least half of their coordinates found; ``full``: rows with all of them."""
    if hit.size == 0:
        return {"half": 0, "full": 0}
    dim = hit.shape[1]
    coords = hit.sum(axis=1)
    return {"half": int((coords >= dim // 2).sum()), "full": int((coords == dim).sum())}


def recovered(data: bytes | WordIndex, rows: np.ndarray, extra: np.ndarray | None = None) -> dict[str, int]:
    """Rows of ``rows`` recovered from ``data`` (:func:`found_coordinates`, then :func:`summarise`)."""
    return summarise(found_coordinates(data, rows, () if extra is None else (extra,)))


def gallery_values(rows: np.ndarray, metric: str) -> np.ndarray:
    """The float64 column values the encrypted gallery encodes for ``rows`` (cosine: normalised; euclidean: as they
    are; the norm column is left out)."""
    t = np.asarray(rows, np.float64)
    if metric == "cosine":
        return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    return t


def plaintext_words(rows: np.ndarray, metric: str = "euclidean", slots: Sequence[int] | None = None) -> np.ndarray:
    """``N x D x 2``: the first two 64-bit coefficients of the SEAL plaintext of each column of each row as the
    encrypted gallery encodes it (row ``i`` alone in its slot, ``slots[i]``, default ``i``, of an otherwise zero
    column, at the template scale of the default parameters). Needs TenSEAL (the ``encrypted`` extra)."""
    from advface.encrypted._seal import require
    from advface.encrypted.params import CkksParams, make_context

    seal = require()
    params = CkksParams()
    context = make_context(params)
    encoder = seal.CKKSEncoder(context)
    values = gallery_values(rows, metric)
    out = np.zeros((*values.shape, 2), np.uint64)
    zeros = [0.0] * params.slots
    for i, row in enumerate(values.tolist()):
        slot = (i if slots is None else int(slots[i])) % params.slots
        for j, value in enumerate(row):
            vec = list(zeros)
            vec[slot] = value
            plain = seal.Plaintext()
            encoder.encode(vec, context.first_parms_id(), params.template_scale, plain)
            out[i, j] = (plain.data(0), plain.data(1))
    return out


def plaintexts_found(data: bytes | WordIndex, words: np.ndarray) -> np.ndarray:
    """``N x D`` booleans: which columns' plaintexts (:func:`plaintext_words`) occur in ``data``."""
    return np.asarray(_index(data).contains(words).any(axis=2), bool)


def plaintexts_recovered(data: bytes | WordIndex, words: np.ndarray) -> dict[str, int]:
    """Rows of which at least half (all) of the columns' plaintexts are found in ``data``."""
    return summarise(plaintexts_found(data, words))


def probe_coefficients(probes: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """The quantised probe coefficients the encrypted gallery encodes: ``round(2 p 2^19) / 2^19`` (euclidean) or
    ``round(p / |p| 2^19) / 2^19`` (cosine), at the probe scale of the default parameters."""
    from advface.encrypted.params import CkksParams

    scale = CkksParams().probe_scale
    p = np.asarray(probes, np.float64)
    p = gallery_values(p, "cosine") if metric == "cosine" else 2.0 * p
    return np.round(p * scale) / scale
