"""Verification stage (performance preservation): enrolled templates of each kind against raw probes of other photos
of the same and of other people."""

from __future__ import annotations

from advface.audit.config import AuditConfig
from advface.audit.metrics import verification
from advface.audit.report import ReportArtifacts
from advface.audit.results import VerificationResult
from advface.audit.stages.inputs import AuditInputs
from advface.audit.stages.protection import ProtectionSetup


def run_verification(
    config: AuditConfig, inputs: AuditInputs, protection: ProtectionSetup, artifacts: ReportArtifacts
) -> VerificationResult:
    """Accuracy and TAR of raw, protected and protected+key enrolments (protected+key probes go through the same
    key); the scores go to ``artifacts`` for the ROC / DET and histogram plots."""
    raw = protection.raw
    settings = {
        "raw": (raw, raw),
        "protected": (protection.protected, raw),
        "protected+key": (protection.keyed, protection.key_a.apply(raw)),
    }
    by_templates = {}
    for kind, (enrolled, probes) in settings.items():
        v = verification(inputs.encoder, enrolled, probes, inputs.identities, config.seed)
        by_templates[kind] = v.metrics
        artifacts.verifications[kind] = v
    return VerificationResult(by_templates)
