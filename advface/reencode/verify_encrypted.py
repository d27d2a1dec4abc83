"""Verification of a re-encoded *encrypted* store (``store.matching: encrypted``) against its source.

The stored templates are CKKS ciphertexts and cannot be read back, so the vector checks of
:mod:`advface.reencode.verify` (budget, L-inf, NaN, unchanged) cannot run. What is checked instead:

- ids: every source id is a subject of the tenant holding exactly one template, with no subject missing or extra,
  and the counts are equal (the destination's ids are indexed in a temporary SQLite file, as in
  :mod:`advface.reencode.verify`, so memory does not grow with the size);
- matching, through the key service, on the same hash-chosen sample as the plaintext verification: each sampled
  source template (through the tenant's keyed transform, as the sidecar's Verify prepares a probe) is verified
  against its own subject, and the share of matches must reach ``min_match_fraction``. The key service decides
  with its own threshold. A key service that is down leaves matching unchecked (noted, not a failure); a
  rate-limited one is waited for.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from advface.reencode.sources import Source
from advface.reencode.verify import MAX_EXAMPLES, VerifyOptions, _in_sample, id_failures, scratch_database

_PAGE = 1000  # subjects per list_subjects call (the stores' maximum)
_RATE_WAITS = 30  # seconds waited at most, one at a time, for a rate-limited key service per sampled template


def verify_encrypted_store(
    source: Source,
    store: Any,
    tenant: str,
    probe_of: Callable[[Any], Any],
    options: VerifyOptions,
    *,
    temp_dir: str | Path | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Compare the encrypted ``store``'s ``tenant`` with ``source`` (see module docs); ``probe_of`` turns a raw
    source template into the probe the sidecar would send (its keyed transform). Returns the summary."""
    from advface.encrypted.errors import KeyServiceUnavailableError

    started = time.perf_counter()
    failures: list[str] = []
    with scratch_database("id TEXT PRIMARY KEY, seen INTEGER NOT NULL DEFAULT 0", temp_dir) as db:
        dest_count, several, several_ids = _index_destination(db, store, tenant)
        source_count = source.count()
        fraction = min(1.0, options.sample / max(source_count, 1))
        missing = 0
        missing_ids: list[str] = []
        sampled = matched = 0
        unchecked = ""
        for chunk in source.chunks(options.chunk_size):
            for row_id, raw in zip(chunk.ids, chunk.vectors, strict=True):
                if db.execute("UPDATE d SET seen=1 WHERE id=?", (row_id,)).rowcount == 0:
                    missing += 1
                    if len(missing_ids) < MAX_EXAMPLES:
                        missing_ids.append(row_id)
                    continue
                if unchecked or not _in_sample(row_id, fraction):
                    continue
                try:
                    match = _verify_one(store, tenant, row_id, probe_of(raw))
                except KeyServiceUnavailableError as exc:
                    unchecked = f"not checked: the key service is unavailable ({exc})"
                    continue
                sampled += 1
                matched += int(match)
            if progress is not None:
                progress(len(chunk.ids))
        extra = int(db.execute("SELECT COUNT(*) FROM d WHERE seen=0").fetchone()[0])
        extra_ids = [r[0] for r in db.execute("SELECT id FROM d WHERE seen=0 LIMIT ?", (MAX_EXAMPLES,))]
    failures += id_failures(
        source_count, dest_count, missing, missing_ids, extra, extra_ids, extra_kind="destination subject(s)"
    )
    if several:
        failures.append(f"{several} subject(s) hold more than one template (e.g. {', '.join(several_ids)})")
    matching: dict[str, Any] = {"metric": "key service", "threshold": "the key service's", "sample": sampled}
    if unchecked or sampled == 0:
        matching["passed"] = None
        matching["note"] = unchecked or "not checked: empty sample"
    else:
        matching["match_fraction"] = matched / sampled
        matching["passed"] = matching["match_fraction"] >= options.min_match_fraction
        if not matching["passed"]:
            failures.append(
                f"only {matched} of {sampled} sampled templates match their source through the key service "
                f"(minimum fraction {options.min_match_fraction})"
            )
    return {
        "passed": not failures,
        "encrypted": True,
        "failures": failures,
        "source_count": source_count,
        "destination_count": dest_count,
        "missing": missing,
        "extra": extra,
        "several_templates": several,
        "budget": "not checked: the stored templates are CKKS ciphertexts and cannot be read back",
        "matching": matching,
        "options": asdict(options),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _index_destination(db: sqlite3.Connection, store: Any, tenant: str) -> tuple[int, int, list[str]]:
    """Index the tenant's subject ids in ``d``; ``(templates, subjects with several, examples of them)``."""
    count = several = 0
    several_ids: list[str] = []
    token = ""
    while True:
        page, token = store.list_subjects(tenant, page_size=_PAGE, page_token=token)
        db.execute("BEGIN")
        db.executemany("INSERT OR IGNORE INTO d (id) VALUES (?)", [(info.subject_id,) for info in page])
        db.execute("COMMIT")
        for info in page:
            count += len(info.template_ids)
            if len(info.template_ids) != 1:
                several += 1
                if len(several_ids) < MAX_EXAMPLES:
                    several_ids.append(info.subject_id)
        if not token:
            return count, several, several_ids


def _verify_one(store: Any, tenant: str, subject_id: str, probe: Any) -> bool:
    """The key service's match bit for ``probe`` against ``subject_id`` (a rate limit is waited out)."""
    from advface.encrypted.errors import RateLimitedError

    for _ in range(_RATE_WAITS):
        try:
            return bool(store.verify_encrypted(tenant, subject_id, probe)[0])
        except RateLimitedError:
            time.sleep(1.0)
    return bool(store.verify_encrypted(tenant, subject_id, probe)[0])
