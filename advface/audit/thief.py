"""The database thief without keys: what a stolen template database (file, backup, dump) yields with no key.

The thief reads the store's storage directly, with no advface code and no key:

* SQLite: every row of the ``templates`` table (the ``vector`` BLOB) of ``templates.sqlite3``, read-only, and, as a
  second view, the raw bytes of the database file and its ``-wal`` / ``-journal`` files (free pages and old
  versions of rows included);
* PostgreSQL: the raw ``vector`` and ``ciphertext`` columns of ``<prefix>_templates``.

Each row's bytes are decoded every way a thief would try: float32 (little and big endian) and float64 at every byte
offset where ``dim`` values fit (a ciphertext's header is skipped that way), and pgvector's text form. A row counts
as *recovered* when one of its decodings is a finite ``dim``-vector that either matches a victim photo's embedding
at the audit's FMR 0.1% threshold (an identity usable against the matcher) or equals one of the tenant's stored
templates as the audit decrypted them (the template itself, e.g. after a keyed transform). The byte scan of the
SQLite files counts the decrypted stored templates found anywhere in the bytes.

Expected: 0 for an encrypted store (AES-256-GCM ciphertext); every row for an unencrypted one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advface.audit.metrics import score_matrix
from advface.errors import ConfigError

#: Relative distance under which a decoded vector counts as equal to a stored template.
EQUAL_TOLERANCE = 1e-4
#: Largest number of bytes of the SQLite files the byte scan reads.
MAX_SCAN_BYTES = 512 * 2**20
_BLOCK = 4096  # candidate vectors compared at once
_SEGMENT = 16 * 2**20  # bytes of a file decoded at once by the byte scan


@dataclass
class Reference:
    """What a decoded vector is compared with: the victims' raw embeddings with the FMR 0.1% ``threshold`` on the
    encoder's score (``metric``), and the tenant's stored templates (decrypted, as stored and un-transformed)."""

    victims: np.ndarray
    threshold: float
    metric: str
    stored: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.victims.shape[1])

    def norm_range(self) -> tuple[float, float]:
        """Norms a plausible template can have (a wide band around the references'): a cheap pre-filter."""
        norms = np.linalg.norm(np.concatenate([self.victims, self.stored]).astype(np.float64), axis=1)
        return float(norms.min()) / 4, float(norms.max()) * 4

    def judge(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each finite candidate: ``(matches a victim, equals a stored template, index of that template or -1)``."""
        cand = np.asarray(candidates, np.float64)
        match = np.zeros(len(cand), bool)
        equal = np.zeros(len(cand), bool)
        which = np.full(len(cand), -1, int)
        if len(cand) == 0:
            return match, equal, which
        stored = np.asarray(self.stored, np.float64)
        stored_norm = np.maximum(np.linalg.norm(stored, axis=1), 1e-12)
        for start in range(0, len(cand), _BLOCK):
            c = cand[start : start + _BLOCK]
            with np.errstate(all="ignore"):
                scores = score_matrix(c, self.victims, self.metric)
                match[start : start + len(c)] = np.nan_to_num(scores, nan=-np.inf).max(axis=1) >= self.threshold
                if len(stored):
                    dist = np.sqrt(
                        np.maximum((c * c).sum(1)[:, None] - 2 * c @ stored.T + (stored * stored).sum(1)[None, :], 0)
                    )
                    rel = dist / stored_norm[None, :]
                    best = np.nan_to_num(rel, nan=np.inf).argmin(axis=1)
                    ok = rel[np.arange(len(c)), best] <= EQUAL_TOLERANCE
                    equal[start : start + len(c)] = ok
                    which[start : start + len(c)] = np.where(ok, best, -1)
        return match, equal, which


def decodings(blob: bytes, dim: int) -> np.ndarray:
    """Every finite ``dim``-vector the bytes give as float32 (both byte orders) or float64 at any byte offset."""
    out: list[np.ndarray] = []
    for dtype in ("<f4", ">f4", "<f8"):
        size = np.dtype(dtype).itemsize
        for offset in range(0, len(blob) - size * dim + 1):
            v = np.frombuffer(blob, dtype=dtype, count=dim, offset=offset)
            if np.all(np.isfinite(v)):
                out.append(v.astype(np.float64))
    return np.stack(out) if out else np.zeros((0, dim))


def _pgvector_text(text: str, dim: int) -> np.ndarray:
    try:
        v = np.array([float(x) for x in text.strip().strip("[]").split(",")], np.float64)
    except ValueError:
        return np.zeros((0, dim))
    return v[None, :] if v.shape == (dim,) and np.all(np.isfinite(v)) else np.zeros((0, dim))


class RowScan:
    """Reads every stored row without a key: candidates of many rows are judged together."""

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        self.rows = 0
        self.rows_with_finite_decoding = 0
        self.recovered = 0
        self.matching_victim = 0
        self.equal_to_stored = 0
        self.stored_templates_found: set[int] = set()
        self._pending: list[np.ndarray] = []
        self._owner: list[np.ndarray] = []
        self._pending_n = 0

    def add(self, candidates: np.ndarray) -> None:
        """One row's decodings (``K x dim``, K may be 0)."""
        row = self.rows
        self.rows += 1
        if len(candidates) == 0:
            return
        self.rows_with_finite_decoding += 1
        self._pending.append(candidates)
        self._owner.append(np.full(len(candidates), row))
        self._pending_n += len(candidates)
        if self._pending_n >= _BLOCK:
            self.flush()

    def flush(self) -> None:
        """Judge the buffered candidates."""
        if not self._pending:
            return
        cand, owner = np.concatenate(self._pending), np.concatenate(self._owner)
        self._pending, self._owner, self._pending_n = [], [], 0
        match, equal, which = self.ref.judge(cand)
        m_rows, e_rows = set(owner[match].tolist()), set(owner[equal].tolist())
        self.matching_victim += len(m_rows)
        self.equal_to_stored += len(e_rows)
        self.recovered += len(m_rows | e_rows)
        self.stored_templates_found.update(int(i) for i in which[which >= 0])


def _rows_report(scan: RowScan, ref: Reference, what: str) -> dict[str, Any]:
    scan.flush()
    return {
        "read": what,
        "rows": scan.rows,
        "vectors_recovered": scan.recovered,
        "rows_matching_a_victim": scan.matching_victim,
        "rows_equal_to_a_stored_template": scan.equal_to_stored,
        "rows_with_a_finite_decoding": scan.rows_with_finite_decoding,
        "audited_templates_found": len(scan.stored_templates_found),
        "audited_templates": len(ref.stored),
    }


def _sqlite_blobs(db_file: Path) -> Iterator[bytes]:
    try:
        conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"{db_file}: cannot be read as an SQLite file: {exc}") from None
    try:
        for (blob,) in conn.execute("SELECT vector FROM templates"):
            yield bytes(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else str(blob).encode()
    except sqlite3.Error as exc:
        raise ConfigError(f"{db_file}: no readable templates table: {exc}") from None
    finally:
        conn.close()


def scan_bytes(buffers: Iterable[bytes], ref: Reference) -> dict[str, Any]:
    """Slide a float32 (little-endian) window of ``dim`` values over every byte offset of the buffers; windows with
    a plausible norm are judged. Counts windows matching a victim and the distinct stored templates found."""
    dim = ref.dim
    low, high = ref.norm_range()
    found: set[int] = set()
    matching = scanned = 0
    for whole in buffers:
        scanned += len(whole)
        for start in range(0, max(len(whole), 1), _SEGMENT):
            # segments overlap by one window less a byte: each window start is scanned exactly once
            matching += _scan_segment(whole[start : start + _SEGMENT + 4 * dim - 1], ref, low, high, found)
    return {
        "bytes_scanned": scanned,
        "windows_matching_a_victim": matching,
        "audited_templates_found": len(found),
        "audited_templates": len(ref.stored),
    }


def _scan_segment(buf: bytes, ref: Reference, low: float, high: float, found: set[int]) -> int:
    """Windows of one segment matching a victim; the stored templates found are added to ``found``."""
    dim = ref.dim
    matching = 0
    for offset in range(4):
        n = (len(buf) - offset) // 4
        if n < dim:
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            a = np.frombuffer(buf, dtype="<f4", count=n, offset=offset).astype(np.float64)
        # a value above the largest plausible norm (or not finite) rules its windows out; zeroing it keeps the
        # running sums small enough for float64 to hold the norms of the other windows exactly enough
        usable = np.isfinite(a) & (np.abs(a) <= high)
        a[~usable] = 0.0
        csum_sq = np.concatenate([[0.0], np.cumsum(a * a)])
        csum_bad = np.concatenate([[0], np.cumsum(~usable)])
        norms = np.sqrt(np.maximum(csum_sq[dim:] - csum_sq[:-dim], 0))
        ok = (csum_bad[dim:] - csum_bad[:-dim] == 0) & (norms >= low) & (norms <= high)
        starts = np.flatnonzero(ok)
        for s in range(0, len(starts), _BLOCK):
            idx = starts[s : s + _BLOCK]
            windows = np.lib.stride_tricks.sliding_window_view(a, dim)[idx]
            match, _equal, which = ref.judge(windows)
            matching += int(match.sum())
            found.update(int(i) for i in which[which >= 0])
    return matching


def _file_buffers(db_file: Path) -> tuple[list[bytes], list[str], bool]:
    buffers: list[bytes] = []
    names: list[str] = []
    budget = MAX_SCAN_BYTES
    truncated = False
    for path in (db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-journal")):
        if not path.is_file() or budget <= 0:
            continue
        with open(path, "rb") as f:
            data = f.read(budget)
            truncated = truncated or bool(f.read(1))
        budget -= len(data)
        buffers.append(data)
        names.append(path.name)
    return buffers, names, truncated


def scan_sqlite(db_file: Path, ref: Reference) -> dict[str, Any]:
    """The thief's view of an SQLite store's files (rows of ``templates``, then the raw bytes)."""
    rows = RowScan(ref)
    for blob in _sqlite_blobs(db_file):
        rows.add(decodings(blob, ref.dim))
    out = _rows_report(rows, ref, f"every row of table templates in {db_file.name}, opened read-only with sqlite3")
    buffers, names, truncated = _file_buffers(db_file)
    out["file_bytes"] = {**scan_bytes(buffers, ref), "files": names, "truncated": truncated}
    return out


def scan_postgres(dsn: str, ref: Reference, table_prefix: str = "advface") -> dict[str, Any]:
    """The thief's view of a PostgreSQL store: the raw ``vector`` and ``ciphertext`` columns of every row."""
    import psycopg

    table = f"{table_prefix}_templates"
    rows = RowScan(ref)
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            cur = conn.execute(f"SELECT vector::text, ciphertext FROM {table}")  # noqa: S608 - fixed identifier
            for text, blob in cur:
                cand = _pgvector_text(text, ref.dim) if text is not None else np.zeros((0, ref.dim))
                if blob is not None:
                    cand = np.concatenate([cand, decodings(bytes(blob), ref.dim)])
                rows.add(cand)
    except psycopg.Error as exc:
        raise ConfigError(f"thief scan: cannot read table {table}: {type(exc).__name__}: {exc}") from None
    return _rows_report(rows, ref, f"columns vector and ciphertext of every row of {table}")
