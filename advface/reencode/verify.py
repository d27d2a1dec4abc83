"""Verification of a re-encoded destination against its source, streaming (memory independent of the size).

Checks: the destination has the same ids as the source (none missing, none extra, no duplicates) and the same
count; no NaN/Inf; every protected vector is within the protection budget of its source (``||p - s|| / ||s|| <=
rel_l2 + tolerance``, and ``max |p - s| <= linf + tolerance`` when an L-inf box is set) and differs from it
(a raw template copied through is a failure); and matching still works
on a sample: the share of sampled templates whose protected vector still matches its own source (euclidean
distance <= threshold, or cosine >= threshold) is at least ``min_match_fraction``. The sample is chosen by a hash
of the id (the same ids in any order or chunking). Rank-1 self-identification within the sample is reported too.

The destination is first indexed by id in a temporary SQLite file (protected vectors only), then the source is
streamed and each chunk looked up there, so the two need not be in the same order.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advface.errors import ConfigError
from advface.reencode.sources import Source

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class VerifyOptions:
    """Verification parameters (see module docs)."""

    rel_l2: float
    linf: float | None = None
    tolerance: float = 1e-6
    sample: int = 1000
    match_metric: str = "euclidean"
    match_threshold: float | None = None
    min_match_fraction: float = 0.99
    chunk_size: int = 4096
    #: The destination keeps only directions (a norm-equalising keyed transform, undone up to the norm): each
    #: destination vector is first scaled to the point of its direction closest to the source, so the budget
    #: check becomes sin(angle) <= rel_l2 (a necessary condition) and L-inf / matching use that point.
    direction_only: bool = False

    def __post_init__(self) -> None:
        if self.match_metric not in ("euclidean", "cosine"):
            raise ConfigError(f"match metric must be euclidean or cosine, got {self.match_metric!r}")
        if self.sample < 0 or self.chunk_size < 1:
            raise ConfigError("verification sample must be >= 0 and chunk size >= 1")
        if not 0 <= self.min_match_fraction <= 1:
            raise ConfigError(f"min match fraction must be in [0, 1], got {self.min_match_fraction}")


def _in_sample(row_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "little")
    return h < fraction * 2.0**64


@contextlib.contextmanager
def scratch_database(columns: str, temp_dir: str | Path | None = None) -> Iterator[sqlite3.Connection]:
    """A throw-away SQLite database (no journal, no syncing, temp data on disk) in a private temporary folder
    under ``temp_dir``, with one table ``d`` of ``columns``; deleted on exit. Verification indexes a destination in
    it so memory stays flat whatever the store's size."""
    with tempfile.TemporaryDirectory(prefix="advface-verify-", dir=temp_dir) as tmp:
        db = sqlite3.connect(Path(tmp) / "dest.sqlite", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("PRAGMA temp_store=FILE")
            db.execute(f"CREATE TABLE d ({columns})")
            yield db
        finally:
            db.close()


def verify(
    source: Source,
    dest: Source,
    options: VerifyOptions,
    *,
    temp_dir: str | Path | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Compare ``dest`` with ``source``; returns the summary (``passed`` and the reasons when it did not)."""
    started = time.perf_counter()
    failures: list[str] = []
    with scratch_database("id TEXT PRIMARY KEY, v BLOB NOT NULL", temp_dir) as db:
        dest_count = 0
        dup_ids: list[str] = []
        nonfinite_ids: list[str] = []
        dims: set[int] = set()
        dup_count = nonfinite_count = 0
        for chunk in dest.chunks(options.chunk_size):
            dest_count += len(chunk.ids)
            dims.add(int(chunk.vectors.shape[1]))
            bad = ~np.isfinite(chunk.vectors).all(axis=1)
            nonfinite_count += int(bad.sum())
            nonfinite_ids += [chunk.ids[i] for i in np.flatnonzero(bad)[:MAX_EXAMPLES]]
            db.execute("BEGIN")
            for row_id, v in zip(chunk.ids, chunk.vectors, strict=True):
                try:
                    db.execute("INSERT INTO d (id, v) VALUES (?, ?)", (row_id, np.asarray(v, "<f4").tobytes()))
                except sqlite3.IntegrityError:
                    dup_count += 1
                    if len(dup_ids) < MAX_EXAMPLES:
                        dup_ids.append(row_id)
            db.execute("COMMIT")
        source_count = source.count()
        fraction = min(1.0, options.sample / max(source_count, 1))
        missing = over_budget = over_linf = unchanged = 0
        missing_ids: list[str] = []
        over_ids: list[str] = []
        unchanged_ids: list[str] = []
        rel_max, linf_max, rel_sum, cos_min, checked = 0.0, 0.0, 0.0, 1.0, 0
        sample_src: list[np.ndarray] = []
        sample_dst: list[np.ndarray] = []
        seen_source = found_total = 0
        for chunk in source.chunks(options.chunk_size):
            seen_source += len(chunk.ids)
            found: dict[str, bytes] = {}
            for start in range(0, len(chunk.ids), 500):
                batch = chunk.ids[start : start + 500]
                marks = ",".join("?" * len(batch))
                found.update(db.execute(f"SELECT id, v FROM d WHERE id IN ({marks})", batch).fetchall())
            found_total += len(found)
            keep = [i for i, row_id in enumerate(chunk.ids) if row_id in found]
            for row_id in chunk.ids:
                if row_id not in found:
                    missing += 1
                    if len(missing_ids) < MAX_EXAMPLES:
                        missing_ids.append(row_id)
            if keep:
                s = chunk.vectors[keep].astype(np.float64)
                p = np.stack([np.frombuffer(found[chunk.ids[i]], "<f4") for i in keep]).astype(np.float64)
                if p.shape[1] != s.shape[1]:
                    failures.append(f"destination dimension {p.shape[1]} != source dimension {s.shape[1]}")
                    break
                ok = np.isfinite(p).all(axis=1)
                s, p = s[ok], p[ok]
                if options.direction_only:
                    scale = (p * s).sum(axis=1) / np.maximum((p * p).sum(axis=1), 1e-300)
                    p = p * scale[:, None]
                # numpy stubs: ndarray.all(axis=...) is typed as scalar | array
                kept_ids = [chunk.ids[i] for i, good in zip(keep, ok, strict=True) if good]  # type: ignore[arg-type]
                sn = np.linalg.norm(s, axis=1)
                d = p - s
                rel = np.linalg.norm(d, axis=1) / np.maximum(sn, 1e-300)
                linf = np.abs(d).max(axis=1) if d.size else np.zeros(0)
                cos = (s * p).sum(axis=1) / np.maximum(sn * np.linalg.norm(p, axis=1), 1e-300)
                over = rel > options.rel_l2 + options.tolerance
                if options.linf is not None:
                    lbad = linf > options.linf + options.tolerance
                    over_linf += int(lbad.sum())
                    over |= lbad
                same = ~d.any(axis=1)
                if options.direction_only:  # a raw template's direction comes back up to float rounding
                    same = rel <= 1e-6
                unchanged += int(same.sum())
                unchanged_ids += [kept_ids[i] for i in np.flatnonzero(same)[: MAX_EXAMPLES - len(unchanged_ids)]]
                over_budget += int(over.sum())
                over_ids += [kept_ids[i] for i in np.flatnonzero(over)[: MAX_EXAMPLES - len(over_ids)]]
                if len(rel):
                    rel_max = max(rel_max, float(rel.max()))
                    linf_max = max(linf_max, float(linf.max()))
                    cos_min = min(cos_min, float(cos.min()))
                    rel_sum += float(rel.sum())
                    checked += len(rel)
                for i, row_id in enumerate(kept_ids):
                    if _in_sample(row_id, fraction):
                        sample_src.append(s[i].copy())  # a copy: a view would keep the chunk alive
                        sample_dst.append(p[i].copy())
            if progress is not None:
                progress(len(chunk.ids))
        extra = dest_count - dup_count - found_total  # distinct destination ids the source lacks
        extra_ids = _extra_examples(db, source, options.chunk_size) if extra else []

    matching = _matching(sample_src, sample_dst, options)
    if seen_source == 0:
        failures.append("the source is empty")
    failures += id_failures(seen_source, dest_count, missing, missing_ids, extra, extra_ids)
    if dup_count:
        failures.append(f"{dup_count} duplicate id(s) in the destination (e.g. {', '.join(dup_ids)})")
    if nonfinite_count:
        failures.append(f"{nonfinite_count} destination vector(s) with NaN/Inf (e.g. {', '.join(nonfinite_ids)})")
    if len(dims) > 1:
        failures.append(f"destination has mixed dimensions {sorted(dims)}")
    if over_budget:
        failures.append(
            f"{over_budget} vector(s) outside the protection budget rel_l2={options.rel_l2}"
            + (f", linf={options.linf}" if options.linf is not None else "")
            + f" (e.g. {', '.join(over_ids)})"
        )
    if unchanged:
        failures.append(
            f"{unchanged} destination vector(s) equal their raw source: not protected (e.g. {', '.join(unchanged_ids)})"
        )
    if matching.get("passed") is False:
        failures.append(
            f"matching: only {matching['match_fraction']:.4f} of {matching['sample']} sampled templates "
            f"match their source (need {options.min_match_fraction})"
        )
    return {
        "passed": not failures,
        "failures": failures,
        "source": source.location.display(),
        "destination": dest.location.display(),
        "source_count": seen_source,
        "destination_count": dest_count,
        "missing_ids": missing,
        "extra_ids": extra,
        "duplicate_ids": dup_count,
        "nonfinite_vectors": nonfinite_count,
        "over_budget": over_budget,
        "over_linf": over_linf,
        "unchanged": unchanged,
        "rel_l2_max": rel_max,
        "rel_l2_mean": rel_sum / checked if checked else 0.0,
        "linf_max": linf_max,
        "cosine_min": cos_min,
        "matching": matching,
        "options": asdict(options),
        "seconds": round(time.perf_counter() - started, 3),
    }


def id_failures(
    source_count: int,
    dest_count: int,
    missing: int,
    missing_ids: list[str],
    extra: int,
    extra_ids: list[str],
    extra_kind: str = "destination id(s)",
) -> list[str]:
    """The failures of a destination's ids against its source's: counts that differ, source ids missing from the
    destination, destination entries (``extra_kind``) the source lacks; each with example ids."""
    failures = []
    if dest_count != source_count:
        failures.append(f"count differs: source {source_count}, destination {dest_count}")
    if missing:
        failures.append(f"{missing} source id(s) missing from the destination (e.g. {', '.join(missing_ids)})")
    if extra:
        failures.append(f"{extra} {extra_kind} not in the source (e.g. {', '.join(extra_ids)})")
    return failures


def _extra_examples(db: sqlite3.Connection, source: Source, chunk_size: int) -> list[str]:
    """A few destination ids the source lacks (only run when there are some: a second pass over the source)."""
    db.execute("CREATE TEMP TABLE s (id TEXT PRIMARY KEY)")
    for chunk in source.chunks(chunk_size):
        db.execute("BEGIN")
        db.executemany("INSERT OR IGNORE INTO s VALUES (?)", ((i,) for i in chunk.ids))
        db.execute("COMMIT")
    rows = db.execute("SELECT id FROM d WHERE id NOT IN (SELECT id FROM s) LIMIT ?", (MAX_EXAMPLES,)).fetchall()
    return [r[0] for r in rows]


def _matching(src: list[np.ndarray], dst: list[np.ndarray], options: VerifyOptions) -> dict[str, Any]:
    out: dict[str, Any] = {"sample": len(src), "metric": options.match_metric, "threshold": options.match_threshold}
    if not src:
        out.update(passed=None, note="empty sample")
        return out
    s, p = np.stack(src), np.stack(dst)
    if options.match_metric == "euclidean":
        own = np.linalg.norm(p - s, axis=1)
        sims = -np.sqrt(np.maximum((p**2).sum(1)[:, None] + (s**2).sum(1)[None, :] - 2 * p @ s.T, 0.0))
    else:
        sn, pn = s / np.linalg.norm(s, axis=1, keepdims=True), p / np.linalg.norm(p, axis=1, keepdims=True)
        own = (sn * pn).sum(axis=1)
        sims = pn @ sn.T
    out["rank1_self_identification"] = float((sims.argmax(axis=1) == np.arange(len(s))).mean())
    out["own_score_worst"] = float(own.max() if options.match_metric == "euclidean" else own.min())
    if options.match_threshold is None or not math.isfinite(options.match_threshold):
        out.update(passed=None, note="no match threshold given: matching not checked")
        return out
    hits = own <= options.match_threshold if options.match_metric == "euclidean" else own >= options.match_threshold
    out["match_fraction"] = float(hits.mean())
    out["passed"] = bool(out["match_fraction"] >= options.min_match_fraction)
    return out
