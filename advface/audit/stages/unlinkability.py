"""Unlinkability and renewability stage (D_sys, Gomez-Barrero et al.).

Unlinkability: database A holds the first evaluation photo of each person, database B the second, protected
independently; D_sys of raw, AdvFace and AdvFace + key templates (the key measured over ``--link-keys`` pairs of
tenant keys). Renewability: database A's templates against re-issued ones of the same enrolments (D_sys), and
BTPBench's largest set of one person's templates under different keys that do not match one another."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from advface.audit import TARGET_D_SYS
from advface.audit.config import AuditConfig
from advface.audit.field_metrics import renewability_sets
from advface.audit.metrics import linkage
from advface.audit.report import ReportArtifacts
from advface.audit.results import (
    HEADLINE_FMR,
    KeyPairsLinkage,
    LinkageMetrics,
    RenewabilityResult,
    UnlinkabilityResult,
)
from advface.audit.stages.inputs import AuditInputs
from advface.audit.stages.protection import ProtectionSetup
from advface.errors import ConfigError


@dataclass
class DatabaseA:
    """Database A of the unlinkability test (the first photo of each person), which renewal re-issues."""

    raw: np.ndarray
    protected: np.ndarray


def _two_photos_each(identities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the first and the second photo of each person with two or more, in name order."""
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    for i, name in enumerate(identities.tolist()):
        if name not in first:
            first[name] = i
        elif name not in second:
            second[name] = i
    people = sorted(second)
    if len(people) < 2:
        raise ConfigError("unlinkability needs two or more people with two photos among the evaluation photos")
    return np.array([first[p] for p in people]), np.array([second[p] for p in people])


def _linkages(
    settings: dict[str, tuple[np.ndarray, np.ndarray]],
    metric: str,
    seed: int,
    artifacts: ReportArtifacts,
    label: str = "",
) -> dict[str, LinkageMetrics]:
    """D_sys of each pair of databases; the scores go to ``artifacts`` under ``label`` + the setting's name."""
    details = {}
    for name, (x, y) in settings.items():
        lk = linkage(x, y, metric, seed)
        details[name] = lk.metrics
        artifacts.linkages[f"{label}{name}"] = lk
    return details


def measure_unlinkability(
    config: AuditConfig, inputs: AuditInputs, protection: ProtectionSetup, artifacts: ReportArtifacts
) -> tuple[UnlinkabilityResult, DatabaseA]:
    """D_sys of databases A and B of the same people: raw, AdvFace, AdvFace + key; the key's D_sys over
    ``--link-keys`` pairs of tenant keys, the worst held to :data:`advface.audit.TARGET_D_SYS`."""
    c = config
    a, b = _two_photos_each(inputs.identities)
    raw_a, raw_b = protection.raw[a], protection.raw[b]
    prot_a = protection.protect(raw_a, c.seed + 1, "database A")
    prot_b = protection.protect(raw_b, c.seed + 2, "database B")
    metric = inputs.encoder.metric
    keyed_a = protection.key_a.apply(prot_a)
    settings = {
        "raw": (raw_a, raw_b),
        "advface": (prot_a, prot_b),
        "advface+key": (keyed_a, protection.other_key(0).apply(prot_b)),
    }
    details = _linkages(settings, metric, c.seed, artifacts)
    # D_sys is a property of a random pair of keys: measure it for link_keys pairs (database B under the key of
    # another tenant each time; pair 0 is the one above) and hold the worst to the target
    across = [details["advface+key"]] + [
        linkage(keyed_a, protection.other_key(i).apply(prot_b), metric, c.seed).metrics for i in range(1, c.link_keys)
    ]
    across_keys = KeyPairsLinkage.of(across)
    result = UnlinkabilityResult(
        details=details,
        across_keys=across_keys,
        protection=protection.method,
        protocol="database A: first evaluation photo of each person, database B: second photo; protected "
        "independently (AdvFace seeds differ; keys of two tenants, repeated for "
        f"{across_keys.key_pairs} pairs of tenant keys); linker: the system's comparator",
        target_d_sys_max=TARGET_D_SYS,
    )
    return result, DatabaseA(raw_a, prot_a)


def measure_renewability(
    config: AuditConfig,
    inputs: AuditInputs,
    protection: ProtectionSetup,
    database_a: DatabaseA,
    artifacts: ReportArtifacts,
    system_thresholds: dict[str, float] | None = None,
) -> RenewabilityResult:
    """D_sys of database A's templates against re-issued ones: AdvFace re-run with another seed; with the key, the
    protected templates re-keyed to key version 2. BTPBench's largest non-matching sets at ``system_thresholds``
    (template kind -> the system's threshold at FMR 0.1% for it, from the verification; default: the threshold on
    clean embeddings)."""
    from advface.protect.keyed import rekey

    c = config
    reissued = protection.protect(database_a.raw, c.seed + 3, "re-issued templates")
    revoked_keyed = protection.key_a.apply(database_a.protected)
    renew = {
        "advface": (database_a.protected, reissued),
        "advface+key": (revoked_keyed, rekey(revoked_keyed, protection.key_a, protection.key_a2)),
    }
    details = _linkages(renew, inputs.encoder.metric, c.seed, artifacts, "renewal ")
    clean = inputs.thresholds[HEADLINE_FMR]
    thresholds = system_thresholds or {}
    keys = [protection.key_a, protection.key_a2, *(protection.other_key(i) for i in range(c.link_keys))]
    per_key = np.stack([key.apply(database_a.protected) for key in keys], axis=1)  # people x keys x dim
    sets = {
        "advface": renewability_sets(
            np.stack([database_a.protected, reissued], axis=1),
            inputs.encoder.metric,
            thresholds.get("protected", clean),
            "advface",
        ),
        "advface+key": renewability_sets(
            per_key, inputs.encoder.metric, thresholds.get("protected+key", clean), "advface+key"
        ),
    }
    return RenewabilityResult(
        details=details,
        protocol="revoked template vs the re-issued one of the same enrolment: AdvFace re-run with another "
        "seed; with the key: the protected template re-keyed to key version 2 (advface.protect.keyed."
        "rekey)",
        largest_nonmatching_set=sets,
        largest_nonmatching_set_protocol="BTPBench: per person of database A, the largest set of their templates "
        "no two of which match at the system's threshold at FMR 0.1% for these templates (the verification's, else "
        "the clean embeddings'); advface: the two "
        f"AdvFace runs (seeds as keys); advface+key: the protected template under {len(keys)} keys (tenant key, "
        f"its version 2, {c.link_keys} other tenants' keys); min: the worst person",
    )
