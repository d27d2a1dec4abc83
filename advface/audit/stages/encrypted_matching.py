"""Encrypted-matching stage (``--matching encrypted``): attackers B and C of docs/threat-model.md against
``store.matching: encrypted``, i.e. a thief with the database files and a memory dump of the sidecar, without the
key service.

The audited templates (the protection's output, ``protected``: a thief with the sidecar's memory holds the keyed
transform's secret too, so the transform is undone) are enrolled one call at a time into an encrypted SQLite store by
a sidecar-like child process (:mod:`advface.audit.sidecar_child`: the template service, public and binding keys
only, the key service a stub without keys), which then verifies the probes the system compares them with (the raw
embeddings of the audited photos, or the scheme's probes). The thief reads its memory and the database files
(:mod:`advface.audit.encrypted_thief`) and counts the templates and probes recovered (at least half of their
coordinates found exactly: :mod:`advface.audit.recovered`).

Then the audit's attack on whatever was recovered: each recovered template or probe becomes an estimate (the found
coordinates, the others filled with the public mean raw template of the attacker group) judged as the scenarios'
estimates (:class:`advface.audit.stages.scenarios.EstimateJudge`: template match with the victim's raw template, and
the faces the audit's best raw-template decoder draws from it by the system and transfer judges). When nothing is
recovered the attacks' success is 0 by construction, and the row says so instead of running them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from advface.audit.config import AuditConfig
from advface.audit.encrypted_thief import SidecarDump, dump_sidecar
from advface.audit.results import AuditResult, EncryptedMatchingResult, JudgedTemplates
from advface.audit.stages.inputs import AuditInputs
from advface.audit.stages.protection import ProtectionSetup
from advface.audit.transfer import TransferJudge

__all__ = ["NOT_COVERED", "measure_encrypted_matching"]

#: The caveats of the row (as benchmarks/encrypted_memory_thief.py documents them).
NOT_COVERED = (
    "the gRPC layer (each request's protobuf message and wire buffers, made by grpcio outside advface's code, hold "
    "the request's embedding until reused) and face detection / embedding from photos (the sidecar-like process is "
    "given embeddings); a thief who can also query the key service (see docs/encrypted-matching.md: about 640 "
    "forged Verify queries per template); protection inside the sidecar (the audited templates are enrolled as "
    "the protection's output, with the service's protection off); recovered means found by exact value, an upper "
    "bound on a thief who does not know where to look"
)


def _setup(dump: SidecarDump, encoder: str) -> str:
    return (
        f"a sidecar-like child process (the template service, encoder {encoder}, over an encrypted SQLite store "
        "holding the public and binding keys only; key service: a stub in the process answering no match, no secret "
        f"key) enrolled the {dump.templates} audited templates one call at a time and verified {dump.probes} probes "
        "(the raw embeddings of the audited photos, or the scheme's probes), its caller zeroing its buffer after each "
        "call; the thief then read every readable and writable mapping of its memory (/proc/PID/mem) and the "
        "database files. Recovered: at least half of a template's (probe's) coordinates found as exact float32 or "
        "float64 values (probes: or their quantised coefficients; templates: or their columns' SEAL plaintext "
        "encodings)"
    )


def _estimates(found: np.ndarray, values: np.ndarray, fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows recovered (at least half found) and their estimates: found coordinates exact, the others ``fill``."""
    rows = np.flatnonzero(found.sum(axis=1) >= found.shape[1] // 2)
    estimates = np.where(found[rows], values[rows], fill[None, :]).astype(np.float32)
    return rows, estimates


def _unsuitable(templates: np.ndarray, dim: int) -> str | None:
    """Why the audited templates cannot be stored and searched this way (None: they can)."""
    if templates.shape[1] != dim:
        return f"the templates have {templates.shape[1]} values, the sidecar stores the encoder's {dim}-value templates"
    if len(np.unique(templates)) < templates.size // 2:
        return (
            "the templates' values repeat across templates (a binary scheme): an exact-value search cannot tell "
            "them apart"
        )
    return None


def measure_encrypted_matching(
    config: AuditConfig,
    inputs: AuditInputs,
    protection: ProtectionSetup,
    result: AuditResult,
    transfer: TransferJudge | None = None,
    *,
    keep: bool = False,
) -> EncryptedMatchingResult:
    """The ``encrypted_matching`` section (module docs). ``keep``: the deliberately leaky child (tests)."""
    from advface.audit.stages.scenarios import estimate_judge

    templates = np.ascontiguousarray(protection.protected, np.float32)
    probes = np.ascontiguousarray(protection.probes, np.float32)
    encoder = inputs.encoder
    why = _unsuitable(templates, int(encoder.dim))
    if why is None and probes.shape[1] != templates.shape[1]:
        why = f"the probes have {probes.shape[1]} values, the templates {templates.shape[1]}"
    if why is not None:
        return EncryptedMatchingResult(False, len(templates), len(probes), "not run", NOT_COVERED, reason=why)
    with tempfile.TemporaryDirectory(prefix="advface-audit-sidecar-") as tmp:
        dump = dump_sidecar(
            templates, probes, encoder=config.encoder, metric=str(encoder.metric), workdir=Path(tmp), keep=keep
        )
    setup = _setup(dump, config.encoder)
    if not dump.measured:
        return EncryptedMatchingResult(False, dump.templates, dump.probes, setup, NOT_COVERED, reason=dump.reason)
    found_t, found_p = dump.templates_found(), dump.probes_found()
    full_t = int((found_t.sum(axis=1) == found_t.shape[1]).sum())
    full_p = int((found_p.sum(axis=1) == found_p.shape[1]).sum())
    attacker_raw = inputs.pairs.of_identities(set(inputs.split.attacker)).without_flips().embeddings
    fill = np.asarray(attacker_raw, np.float64).mean(axis=0) if len(attacker_raw) else np.zeros(templates.shape[1])
    rows_t, est_t = _estimates(found_t, templates, fill)
    rows_p, est_p = _estimates(found_p, probes, fill)
    judged_t: JudgedTemplates | None = None
    judged_p: JudgedTemplates | None = None
    if len(rows_t) or len(rows_p):
        judge = estimate_judge(config, inputs, result, transfer)
        judged_t = judge(est_t, rows_t) if len(rows_t) else None
        judged_p = judge(est_p, rows_p) if len(rows_p) else None
        attacks = (
            "the recovered templates and probes (found coordinates exact, the others the attacker group's mean raw "
            f"template) judged as the scenarios' estimates: best raw-template decoder {judge.decoder or 'none ran'}, "
            "system and transfer judges; rates are over the recovered rows"
        )
    else:
        attacks = "0 templates and 0 probes recovered: the attacks' success is 0 by construction (none run)"
    return EncryptedMatchingResult(
        True,
        dump.templates,
        dump.probes,
        setup,
        NOT_COVERED,
        counts=dump.counts(),
        templates_recovered=len(rows_t),
        templates_recovered_full=full_t,
        probes_recovered=len(rows_p),
        probes_recovered_full=full_p,
        memory_mb=round(dump.memory_bytes / 1e6, 1),
        database_mb=round(dump.database_bytes / 1e6, 1),
        database_files=dump.database_files,
        judged_templates=judged_t,
        judged_probes=judged_p,
        attacks=attacks,
    )
