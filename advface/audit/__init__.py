"""Reconstruction-attack audit of a template database (``advface audit``): irreversibility (Type-I/II identity
inference by a zoo of attackers), unlinkability (D_sys), renewability and performance preservation, reported as a
self-contained HTML page plus JSON.

Modules: :mod:`advface.audit.attacks` (decoder, GAN-prior and adaptive attackers), :mod:`advface.audit.data`
(dataset, victims and template files), :mod:`advface.audit.store` (a template store, opened as the sidecar does),
:mod:`advface.audit.thief` (the database thief without keys), :mod:`advface.audit.metrics` (metric glue),
:mod:`advface.audit.config` (the run's settings), :mod:`advface.audit.stages` (one module per stage),
:mod:`advface.audit.results` (the stages' typed results and ``report.json``), :mod:`advface.audit.field_metrics`
(FNMR at FMR, BTPBench renewability), :mod:`advface.audit.report` (HTML + JSON), :mod:`advface.audit.manifest` (the
reproducibility bundle, ``manifest.json``), :mod:`advface.audit.run` (orchestration); for ``--matching encrypted``
:mod:`advface.audit.memory_dump` (reading a process's memory), :mod:`advface.audit.recovered` (counting templates
found in bytes), :mod:`advface.audit.sidecar_child` (the sidecar-like process) and
:mod:`advface.audit.encrypted_thief` (dumping it).
"""

from typing import Any

__all__ = [
    "FULL_ATTACKERS",
    "MATCHINGS",
    "PROTECTIONS",
    "QUICK_ATTACKERS",
    "TARGET_D_SYS",
    "TARGET_TYPE1",
    "AuditConfig",
    "AuditResult",
    "run_audit",
]

#: Protections an audit can apply to the dataset's templates.
PROTECTIONS = ("advface", "advface-id", "none")
#: Attackers run by default (full mode); ``+id``: pixel + identity loss.
FULL_ATTACKERS = (
    "deconv",
    "resup",
    "pixelshuffle",
    "tokens",
    "modconv",
    "resup+id",
    "gan-prior",
    "adaptive",
    "adaptive-resup+id",
)
#: How the audited deployment matches (``--matching``): ``plain`` (the stores as the rest of the audit measures them)
#: or ``encrypted`` (also the thief with the database and the sidecar's memory under encrypted matching).
MATCHINGS = ("plain", "encrypted")
#: Attackers of ``--quick``.
QUICK_ATTACKERS = ("deconv", "resup+id", "tokens", "gan-prior", "adaptive")
#: Unlinkability target of the keyed transform: D_sys at most this for every pair of tenant keys measured.
TARGET_D_SYS = 0.05
#: Irreversibility target of the verdict (default of ``--target-type1``): an attacker's best Type I success at FMR 0.1%
#: at most this, by the system encoder and by the transfer judge.
TARGET_TYPE1 = 0.05


def __getattr__(name: str) -> Any:  # lazy: importing the package does not load torch models
    if name in ("AuditConfig", "AuditResult", "run_audit"):
        from advface.audit import run

        return getattr(run, name)
    raise AttributeError(name)
