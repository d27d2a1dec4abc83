"""Verification stage (performance preservation): enrolled templates of each kind against raw probes of other photos
of the same and of other people: accuracy and TAR (``verification``), and FNMR at FMR 0.1% / 0.01% with comparison
counts and intervals as the field reports it (``utility``)."""

from __future__ import annotations

from advface.audit.config import AuditConfig
from advface.audit.field_metrics import all_pair_scores, fnmr_at_fmr
from advface.audit.metrics import verification
from advface.audit.report import ReportArtifacts
from advface.audit.results import UTILITY_FMRS, FnmrAtFmr, UtilityResult, VerificationResult
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
        "protected": (protection.protected, protection.probes),
        "protected+key": (protection.keyed, protection.key_a.apply(protection.probes)),
    }
    by_templates = {}
    for kind, (enrolled, probes) in settings.items():
        v = verification(inputs.encoder, enrolled, probes, inputs.identities, config.seed)
        by_templates[kind] = v.metrics
        artifacts.verifications[kind] = v
    return VerificationResult(by_templates)


def measure_utility(inputs: AuditInputs, protection: ProtectionSetup) -> UtilityResult:
    """FNMR at FMR 0.1% and 0.01% of raw, protected and protected+key enrolments against raw probes (through the
    same key for protected+key), over every pair of distinct evaluation photos, with Wilson 95% intervals."""
    raw = protection.raw
    settings = {
        "raw": (raw, raw),
        "protected": (protection.protected, protection.probes),
        "protected+key": (protection.keyed, protection.key_a.apply(protection.probes)),
    }
    by_fmr: dict[str, dict[str, FnmrAtFmr]] = {label: {} for label in UTILITY_FMRS}
    for kind, (enrolled, probes) in settings.items():
        genuine, impostor = all_pair_scores(enrolled, probes, inputs.identities, inputs.encoder.metric)
        if not len(genuine) or not len(impostor):
            raise ValueError("utility needs genuine and impostor comparisons (people with two or more photos)")
        for label, fmr in UTILITY_FMRS.items():
            by_fmr[label][kind] = fnmr_at_fmr(genuine, impostor, fmr)
    return UtilityResult(
        by_fmr=by_fmr,
        protocol="every pair of distinct evaluation photos (a, b), a < b: the enrolled template of a against the "
        "probe of b (raw; through the same key for protected+key); genuine: same person, impostor: different "
        "people; the threshold is the highest impostor score that keeps the false-match rate at most the target",
        interval="Wilson score 95% interval of the FNMR over the genuine comparisons, the threshold taken as fixed; "
        "a rate below 1 / impostor comparisons cannot be resolved (impostors_sufficient false)",
    )
