"""Database-thief stage: the thief without keys (:mod:`advface.audit.thief`) reads the audited store's storage (rows
and file bytes) and counts the vectors it recovers."""

from __future__ import annotations

from advface.audit.results import ThiefScanResult
from advface.audit.stages.inputs import AuditInputs

#: FMR label of the threshold a decoded vector must reach to count as a victim's template.
THIEF_FMR = "1e-3"


def scan_store_without_keys(inputs: AuditInputs) -> ThiefScanResult:
    """Scan the audited store's SQLite file or PostgreSQL tables for vectors, without any key."""
    from advface.audit import thief

    db = inputs.db
    assert db is not None and db.store is not None, "the thief scan reads a store (--store)"
    info = db.store
    ref = thief.Reference(
        victims=inputs.victims.pairs.embeddings,
        threshold=float(inputs.thresholds[THIEF_FMR]),
        metric=inputs.encoder.metric,
        stored=db.vectors,
    )
    if info.backend == "sqlite":
        scan = thief.scan_sqlite(info.database_file, ref)
    else:
        scan = thief.scan_postgres(str(info.dsn), ref)
    return ThiefScanResult(
        scan,
        encrypted_at_rest=info.encrypted,
        threshold_fmr=THIEF_FMR,
        summary=f"vectors recovered without keys: {scan['vectors_recovered']} of {scan['rows']} rows",
    )
