"""Typed results of the audit's stages and their JSON form (``report.json``).

Each stage of :mod:`advface.audit.stages` returns one of these dataclasses; :class:`AuditResult` holds them all, with
the run's settings, what is ``missing`` and the timings. The HTML report and the CLI read the attributes;
``report.json`` is ``AuditResult.to_json()``, each class writing its own section with ``to_json()``.

Format of ``report.json`` (:data:`FORMAT_VERSION`): 1 = the earlier format, without a ``format_version`` field;
2 = the same keys and value shapes, plus the top-level ``format_version``; 3 = format 2 plus the transfer judge:
``config.transfer_encoder``, ``thresholds.transfer`` and a ``transfer`` entry in each attacker's template kinds
(added keys only); 4 = format 3 plus ``config.manifest_hashes`` (and ``manifest.json`` beside the report), the field's
utility metrics (``utility``), D_sys's bins and score range, BTPBench renewability and the ``verdict`` (added keys
only); 5 = format 4 plus ``scenarios`` (full disclosure, known pairs, score exposure) and their settings under
``config`` (added keys only); 6 = format 5 plus ``scenarios["protected+key"]`` (the scenarios on the templates under
the keyed transform), ``protection.centre`` and ``config.scheme_centre`` (added keys only); 7 = format 6 plus
``encrypted_matching`` (the thief with the database and the sidecar's memory under encrypted matching, with
``--matching encrypted``) and ``config.matching`` (added keys only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Version of the ``report.json`` format (1: the format before the field existed; 2: format 1 + ``format_version``;
#: 3: format 2 + the transfer judge's keys; 4: format 3 + manifest setting, utility, D_sys bins, verdict;
#: 5: format 4 + ``scenarios`` and the scenario settings in ``config``; 6: format 5 + the scenarios on
#: ``protected+key`` and a reference scheme's centring; 7: format 6 + ``encrypted_matching`` and ``config.matching``).
FORMAT_VERSION = 7
#: The kinds of template each attacker and the verification are run on: raw embeddings, AdvFace output
#: ("protected") and AdvFace output through the keyed transform ("protected+key").
TEMPLATE_KINDS = ("raw", "protected", "protected+key")
#: False-match-rate label (see :data:`advface.audit.metrics.FMRS`) of the headline ``type1_success`` /
#: ``type2_success`` numbers.
HEADLINE_FMR = "1e-3"

JsonDict = dict[str, Any]
#: How the report names each protection method (another scheme: its name).
PROTECTION_LABELS = {
    "advface": "AdvFace",
    "advface-id": "identity-aware AdvFace",
    "none": "unprotected",
    "biohash": "BioHashing",
    "mlphash": "MLP-hash",
    "polyprotect": "PolyProtect-style",
    "command": "the --protect-cmd scheme",
}


@dataclass
class Missing:
    """A part of the audit that did not run or ran incompletely, and why."""

    stage: str
    reason: str

    def to_json(self) -> JsonDict:
        """``{"stage", "reason"}``."""
        return {"stage": self.stage, "reason": self.reason}


# ------------------------------------------------------------------------------------------------------- inputs
@dataclass
class DatabaseSummary:
    """The template database under audit: where it came from, how many of its templates are audited."""

    source: str
    templates: int
    audited: int
    not_audited: int
    #: A template store's own description (:meth:`advface.audit.store.StoreInfo.describe`), None for a file.
    store: JsonDict | None = None

    def to_json(self) -> JsonDict:
        """The ``data.database`` section: the counts, then the store's description."""
        return {
            "source": self.source,
            "templates": self.templates,
            "audited": self.audited,
            "not_audited": self.not_audited,
            **(self.store or {}),
        }


@dataclass
class DatasetSummary:
    """The ``data`` section: the dataset read, the database audited, the identity split and the victims.

    The fields after ``encoder`` are None when the audit stopped on bad input before choosing the victims."""

    dataset: str
    photos: int
    identities: int
    photos_with_face: int
    photos_failed: int
    #: Up to 10 photos that gave no face chip: photo id -> reason.
    failed_examples: dict[str, str]
    encoder: str
    database: DatabaseSummary | None = None
    #: :meth:`advface.datasets.splits.IdentitySplit.describe` of the defender / attacker / evaluation groups.
    split: JsonDict | None = None
    victims: int | None = None
    single_photo_identities: int | None = None

    def to_json(self) -> JsonDict:
        """The ``data`` section (the parts not measured yet are left out)."""
        out: JsonDict = {
            "dataset": self.dataset,
            "photos": self.photos,
            "identities": self.identities,
            "photos_with_face": self.photos_with_face,
            "photos_failed": self.photos_failed,
            "failed_examples": self.failed_examples,
            "encoder": self.encoder,
        }
        if self.database is not None:
            out["database"] = self.database.to_json()
        for name in ("split", "victims", "single_photo_identities"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


# --------------------------------------------------------------------------------------------------- protection
@dataclass
class ProtectorSummary:
    """The protection the audit applies: method and, for AdvFace, its parameters and shadow checkpoints."""

    method: str
    #: Where the protection comes from: the audit's flags or the store's configuration.
    source: str
    rel_l2: float | None = None
    steps: int | None = None
    #: File names of the shadow checkpoints; None for the method ``none``.
    shadows: list[str] | None = None
    #: The identity-aware protector's jitter setting, None where the protector has none.
    jitter: bool | None = None
    #: A reference scheme's centring, in words (format 6); None for other protections.
    centre: str | None = None

    def to_json(self) -> JsonDict:
        """``method`` (``rel_l2``, ``steps``, ``shadows`` for a protector), ``source`` (``jitter``, ``centre``)."""
        out: JsonDict = {"method": self.method}
        if self.shadows is not None:
            out.update(rel_l2=self.rel_l2, steps=self.steps, shadows=self.shadows)
        out["source"] = self.source
        if self.jitter is not None:
            out["jitter"] = self.jitter
        if self.centre is not None:
            out["centre"] = self.centre
        return out


@dataclass
class ProtectionResult:
    """The ``protection`` section: the protector, the keyed transform's key and what the audited templates are."""

    protector: ProtectorSummary
    #: Where the transform key comes from (key file, ephemeral key, the store's transform).
    key: str
    key_norm_equalisation: float | None
    #: What the audited templates are (protected here, the database as stored, ...).
    templates: str
    #: Whether the keyed transform is the audited store's own.
    store_keyed_transform: bool

    @property
    def method(self) -> str:
        """The protection method (``advface``, ``advface-id``, ``none``)."""
        return self.protector.method

    def to_json(self) -> JsonDict:
        """The protector's summary, then the key and templates notes."""
        return {
            **self.protector.to_json(),
            "key": self.key,
            "key_norm_equalisation": self.key_norm_equalisation,
            "templates": self.templates,
            "store_keyed_transform": self.store_keyed_transform,
        }


# ------------------------------------------------------------------------------------------------------ attacks
@dataclass
class SuccessAtFmr:
    """Type I / Type II identity-inference success at the threshold of one false-match rate."""

    type1_success: float
    #: None when no reconstructed template's person has another photo.
    type2_success: float | None
    ssim: float
    psnr: float
    threshold: float
    n: int

    def to_json(self) -> JsonDict:
        """The ``fmr_<label>`` entry."""
        return {
            "type1_success": self.type1_success,
            "type2_success": self.type2_success,
            "ssim": self.ssim,
            "psnr": self.psnr,
            "threshold": self.threshold,
            "n": self.n,
        }


@dataclass
class TransferAtFmr:
    """The transfer judge's Type I / Type II success at its threshold for one false-match rate."""

    #: None when the judge has no clean embedding of any reconstructed template's photo (or other photo).
    type1_success: float | None
    type2_success: float | None
    threshold: float

    def to_json(self) -> JsonDict:
        """The ``transfer.fmr_<label>`` entry."""
        return {"type1_success": self.type1_success, "type2_success": self.type2_success, "threshold": self.threshold}


@dataclass
class TransferResult:
    """One attacker's reconstructions of one kind of template as the transfer judge sees them (mapped into its chip
    frame, compared with its own embeddings of the photos)."""

    #: Reconstructions compared (Type I: the judge has an embedding of the template's photo; Type II: of the other).
    type1_n: int
    type2_n: int
    mean_score_to_own: float | None
    #: FMR label -> success at the judge's threshold for that rate.
    at_fmr: dict[str, TransferAtFmr]

    def to_json(self) -> JsonDict:
        """Counts, mean score, then ``fmr_<label>`` per FMR."""
        out: JsonDict = {"type1_n": self.type1_n, "type2_n": self.type2_n, "mean_score_to_own": self.mean_score_to_own}
        out.update({f"fmr_{label}": s.to_json() for label, s in self.at_fmr.items()})
        return out


@dataclass
class TransferThresholds:
    """The ``thresholds.transfer`` entry: which encoder judged and its thresholds on clean data."""

    encoder: str
    fingerprint: str
    #: FMR label -> threshold on the judge's score, fixed on non-mated pairs of its clean embeddings.
    thresholds: dict[str, float]
    #: Dataset photos the judge's own detection found a face in.
    photos: int

    def to_json(self) -> JsonDict:
        """``encoder``, ``fingerprint``, ``photos``, then one threshold per FMR label."""
        return {"encoder": self.encoder, "fingerprint": self.fingerprint, "photos": self.photos, **self.thresholds}


@dataclass
class ReconstructionResult:
    """One attacker's reconstructions of one kind of template: success at each FMR, image quality."""

    n: int
    #: Reconstructions whose person has another photo (Type II), and those skipped for want of one.
    type2_n: int
    type2_skipped_single_photo: int
    ssim: float
    psnr: float
    mean_score_to_own: float
    #: FMR label (``1e-3``, ``1e-2``) -> success at that rate's threshold.
    at_fmr: dict[str, SuccessAtFmr]
    #: The transfer judge's view of the same reconstructions; None without a transfer judge.
    transfer: TransferResult | None = None

    @property
    def type1_success(self) -> float:
        """Type I success at the headline FMR (0.1%)."""
        return self.at_fmr[HEADLINE_FMR].type1_success

    @property
    def type2_success(self) -> float | None:
        """Type II success at the headline FMR (0.1%)."""
        return self.at_fmr[HEADLINE_FMR].type2_success

    def to_json(self) -> JsonDict:
        """Counts and quality, ``fmr_<label>`` per FMR, then the headline ``type1_success`` / ``type2_success``."""
        out: JsonDict = {
            "n": self.n,
            "type2_n": self.type2_n,
            "type2_skipped_single_photo": self.type2_skipped_single_photo,
            "ssim": self.ssim,
            "psnr": self.psnr,
            "mean_score_to_own": self.mean_score_to_own,
        }
        out.update({f"fmr_{label}": s.to_json() for label, s in self.at_fmr.items()})
        out.update(type1_success=self.type1_success, type2_success=self.type2_success)
        if self.transfer is not None:
            out["transfer"] = self.transfer.to_json()
        return out


@dataclass(kw_only=True)
class AttackResult:
    """One attacker's success on each kind of template (:data:`TEMPLATE_KINDS`)."""

    #: ``decoder``, ``adaptive`` or ``gan-prior``.
    kind: str
    by_templates: dict[str, ReconstructionResult]

    @property
    def type1_success(self) -> dict[str, float]:
        """Template kind -> Type I success at FMR 0.1%."""
        return {k: r.type1_success for k, r in self.by_templates.items()}

    @property
    def type2_success(self) -> dict[str, float | None]:
        """Template kind -> Type II success at FMR 0.1%."""
        return {k: r.type2_success for k, r in self.by_templates.items()}

    def details(self) -> JsonDict:
        """What the attacker is (architecture, training, search settings): the keys after ``kind``."""
        return {}

    def to_json(self) -> JsonDict:
        """The ``attacks.<name>`` entry: one entry per template kind, the headline rates, kind and details."""
        return {
            **{k: r.to_json() for k, r in self.by_templates.items()},
            "type1_success": self.type1_success,
            "type2_success": self.type2_success,
            "kind": self.kind,
            **self.details(),
        }


@dataclass(kw_only=True)
class DecoderAttackResult(AttackResult):
    """A trained decoder: on raw templates of the attacker group (``decoder``) or on protected ones of its own
    enrolments (``adaptive``)."""

    arch: str
    loss: str | None
    #: Loaded from the cache rather than trained by this run.
    cached: bool
    trained_on: str
    #: File stem of the cached decoder (``manifest.json``'s ``attacker_cache_keys``; not in ``report.json``).
    cache_key: str | None = None

    def details(self) -> JsonDict:
        """``arch``, ``loss``, ``cached``, ``trained_on``."""
        return {"arch": self.arch, "loss": self.loss, "cached": self.cached, "trained_on": self.trained_on}


@dataclass(kw_only=True)
class GanPriorAttackResult(AttackResult):
    """The GAN-prior latent search (on the first ``templates`` audited templates)."""

    kind: str = "gan-prior"
    prior: str
    templates: int
    steps: int
    restarts: int
    #: Mean best similarity to the raw templates per search step.
    similarity_history_raw: list[float]

    def details(self) -> JsonDict:
        """``prior``, ``templates``, ``steps``, ``restarts``, ``similarity_history_raw``."""
        return {
            "prior": self.prior,
            "templates": self.templates,
            "steps": self.steps,
            "restarts": self.restarts,
            "similarity_history_raw": self.similarity_history_raw,
        }


@dataclass(kw_only=True)
class DiffusionAttackResult(AttackResult):
    """The identity-conditioned generator (one seeded sample per template)."""

    kind: str = "diffusion"
    #: Where the generator comes from: trained by the audit on the attacker group, or a ``--generator`` file.
    generator: str
    #: Loaded from the cache (or given) rather than trained by this run.
    cached: bool
    trained_on: str
    image_size: int
    sample_steps: int
    cfg_scale: float
    #: Scale of the reconstruction guidance by the encoder's module (0: none).
    guidance_scale: float

    def details(self) -> JsonDict:
        """``generator``, ``cached``, ``trained_on``, ``image_size``, ``sample_steps``, ``cfg_scale``,
        ``guidance_scale``."""
        return {
            "generator": self.generator,
            "cached": self.cached,
            "trained_on": self.trained_on,
            "image_size": self.image_size,
            "sample_steps": self.sample_steps,
            "cfg_scale": self.cfg_scale,
            "guidance_scale": self.guidance_scale,
        }


# ------------------------------------------------------------------------------------------------- verification
@dataclass
class VerificationMetrics:
    """Verification of enrolled templates of one kind against raw probes of other photos."""

    accuracy_mean: float
    accuracy_std: float
    tar_at_far_1e_3: float
    threshold_at_far_1e_3: float
    tar_at_far_1e_2: float
    threshold_at_far_1e_2: float
    mated_pairs: int
    nonmated_pairs: int

    def to_json(self) -> JsonDict:
        """Accuracy, TAR and thresholds at FAR 1e-3 / 1e-2, pair counts."""
        return {
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "tar_at_far_1e-3": self.tar_at_far_1e_3,
            "threshold_at_far_1e-3": self.threshold_at_far_1e_3,
            "tar_at_far_1e-2": self.tar_at_far_1e_2,
            "threshold_at_far_1e-2": self.threshold_at_far_1e_2,
            "mated_pairs": self.mated_pairs,
            "nonmated_pairs": self.nonmated_pairs,
        }


@dataclass
class VerificationResult:
    """The ``verification`` section: performance preservation per kind of enrolled template."""

    #: Template kind (:data:`TEMPLATE_KINDS`) -> its verification.
    by_templates: dict[str, VerificationMetrics]

    @property
    def accuracy_change_points(self) -> dict[str, float]:
        """Accuracy change against raw templates, in percentage points, of protected and protected+key."""
        raw = self.by_templates["raw"].accuracy_mean
        return {
            name: round(100 * (self.by_templates[name].accuracy_mean - raw), 3)
            for name in ("protected", "protected+key")
        }

    @property
    def key_accuracy_change_vs_protected_points(self) -> float:
        """What the keyed transform changes in accuracy over the protected templates, in percentage points."""
        return round(
            100 * (self.by_templates["protected+key"].accuracy_mean - self.by_templates["protected"].accuracy_mean), 3
        )

    def to_json(self) -> JsonDict:
        """One entry per template kind, then the accuracy changes."""
        return {
            **{k: m.to_json() for k, m in self.by_templates.items()},
            "accuracy_change_points": self.accuracy_change_points,
            "key_accuracy_change_vs_protected_points": self.key_accuracy_change_vs_protected_points,
        }


@dataclass
class FnmrAtFmr:
    """FNMR at the threshold giving at most one false-match rate, with the counts and a 95% interval behind it."""

    fmr: float
    fnmr: float
    #: Wilson score interval of the FNMR over the genuine comparisons (the threshold taken as fixed).
    fnmr_ci95: tuple[float, float]
    threshold: float
    #: The false-match rate the threshold gives over the impostor comparisons (at most ``fmr``).
    fmr_achieved: float
    genuine_comparisons: int
    impostor_comparisons: int
    #: At least ``1 / fmr`` impostor comparisons: the rate can be resolved at all.
    impostors_sufficient: bool

    def to_json(self) -> JsonDict:
        """FNMR and interval, threshold and achieved FMR, comparison counts."""
        return {
            "fnmr": self.fnmr,
            "fnmr_ci95": list(self.fnmr_ci95),
            "threshold": self.threshold,
            "fmr_achieved": self.fmr_achieved,
            "genuine_comparisons": self.genuine_comparisons,
            "impostor_comparisons": self.impostor_comparisons,
            "impostors_sufficient": self.impostors_sufficient,
        }


#: FMR label -> rate of the ``utility`` section (its keys are ``fnmr_at_fmr_<label>``).
UTILITY_FMRS = {"1e-3": 1e-3, "1e-4": 1e-4}


@dataclass
class UtilityResult:
    """The ``utility`` section: FNMR at FMR 0.1% and 0.01% of each kind of enrolled template (probes raw; through
    the same key for protected+key), over every pair of distinct evaluation photos."""

    #: FMR label -> template kind -> FNMR at that FMR.
    by_fmr: dict[str, dict[str, FnmrAtFmr]]
    protocol: str
    interval: str

    def fnmr(self, label: str, kind: str) -> FnmrAtFmr | None:
        """FNMR of ``kind`` at FMR ``label`` (None when not measured)."""
        return self.by_fmr.get(label, {}).get(kind)

    def to_json(self) -> JsonDict:
        """``fnmr_at_fmr_<label>`` per FMR (one entry per template kind), then protocol and interval method."""
        out: JsonDict = {
            f"fnmr_at_fmr_{label}": {kind: m.to_json() for kind, m in kinds.items()}
            for label, kinds in self.by_fmr.items()
        }
        out.update(protocol=self.protocol, interval=self.interval)
        return out


# -------------------------------------------------------------------------------------- unlinkability, renewal
@dataclass
class LinkageMetrics:
    """D_sys of two databases of the same people, with the noise floor of these counts."""

    d_sys: float
    #: Mean D_sys of unlinkable scores at these counts, and its 95th percentile.
    noise_floor: float
    noise_floor_p95: float
    n_mated: int
    n_nonmated: int
    #: Histogram bins of the score densities and the score range they span.
    bins: int | None = None
    score_range: tuple[float, float] | None = None

    def to_json(self) -> JsonDict:
        """``d_sys``, ``noise_floor``, ``noise_floor_p95``, ``n_mated``, ``n_nonmated``, ``bins``, ``score_range``."""
        out: JsonDict = {
            "d_sys": self.d_sys,
            "noise_floor": self.noise_floor,
            "noise_floor_p95": self.noise_floor_p95,
            "n_mated": self.n_mated,
            "n_nonmated": self.n_nonmated,
        }
        if self.bins is not None:
            out["bins"] = self.bins
        if self.score_range is not None:
            out["score_range"] = list(self.score_range)
        return out


@dataclass
class KeyPairsLinkage:
    """D_sys of AdvFace + key measured over several pairs of tenant keys."""

    #: D_sys of each pair of keys (the first: the pair of ``UnlinkabilityResult.details["advface+key"]``).
    d_sys: list[float]
    mean: float
    worst: float
    noise_floor_mean: float
    #: Key pairs whose D_sys is above the 95th percentile of unlinkable scores at these counts.
    above_noise_p95: int

    @classmethod
    def of(cls, linkages: list[LinkageMetrics]) -> KeyPairsLinkage:
        """Summary of the linkages of each pair of keys."""
        values = [m.d_sys for m in linkages]
        return cls(
            d_sys=values,
            mean=float(np.mean(values)),
            worst=float(max(values)),
            noise_floor_mean=float(np.mean([m.noise_floor for m in linkages])),
            above_noise_p95=sum(m.d_sys > m.noise_floor_p95 for m in linkages),
        )

    @property
    def key_pairs(self) -> int:
        """How many pairs of keys were measured."""
        return len(self.d_sys)

    def to_json(self) -> JsonDict:
        """The ``advface+key_across_keys`` entry (``max``: the worst pair)."""
        return {
            "key_pairs": self.key_pairs,
            "d_sys": self.d_sys,
            "mean": self.mean,
            "max": self.worst,
            "noise_floor_mean": self.noise_floor_mean,
            "above_noise_p95": self.above_noise_p95,
        }


def _d_sys_of(details: dict[str, LinkageMetrics]) -> dict[str, float]:
    return {name: m.d_sys for name, m in details.items()}


@dataclass
class UnlinkabilityResult:
    """The ``unlinkability`` section: D_sys of two databases of the same people (raw, AdvFace, AdvFace + key)."""

    #: ``raw`` / ``advface`` / ``advface+key`` -> linkage of database A and database B.
    details: dict[str, LinkageMetrics]
    across_keys: KeyPairsLinkage
    #: The protection method of the two databases.
    protection: str
    protocol: str
    target_d_sys_max: float

    @property
    def d_sys(self) -> dict[str, float]:
        """Setting -> D_sys."""
        return _d_sys_of(self.details)

    @property
    def key_meets_target(self) -> bool:
        """The worst pair of keys is at most the D_sys target."""
        return bool(self.across_keys.worst <= self.target_d_sys_max)

    def to_json(self) -> JsonDict:
        """D_sys per setting, details, the key pairs, protocol and target."""
        return {
            "d_sys": self.d_sys,
            "details": {k: m.to_json() for k, m in self.details.items()},
            "advface+key_across_keys": self.across_keys.to_json(),
            "protection": self.protection,
            "protocol": self.protocol,
            "target_d_sys_max": self.target_d_sys_max,
            "key_meets_target": self.key_meets_target,
        }


@dataclass
class NonMatchingSets:
    """Renewability by BTPBench's definition: per person, the largest set of their templates under different keys
    no two of which match at the system's threshold; summarised over the people."""

    setting: str
    #: Templates per person (one per key) and people measured.
    keys: int
    people: int
    threshold: float
    #: The smallest largest set over the people (the renewability the system guarantees), its mean, and the fraction
    #: of people for whom all ``keys`` templates are mutually non-matching.
    min: int
    mean: float
    all_keys_fraction: float

    def to_json(self) -> JsonDict:
        """``keys``, ``people``, ``threshold``, ``min``, ``mean``, ``all_keys_fraction``."""
        return {
            "keys": self.keys,
            "people": self.people,
            "threshold": self.threshold,
            "min": self.min,
            "mean": self.mean,
            "all_keys_fraction": self.all_keys_fraction,
        }


@dataclass
class RenewabilityResult:
    """The ``renewability`` section: D_sys of revoked templates against the re-issued ones."""

    #: ``advface`` / ``advface+key`` -> linkage of revoked and re-issued templates.
    details: dict[str, LinkageMetrics]
    protocol: str
    #: BTPBench's largest non-matching sets per setting (``advface``: seeds as keys; ``advface+key``: tenant keys).
    largest_nonmatching_set: dict[str, NonMatchingSets] | None = None
    largest_nonmatching_set_protocol: str | None = None

    @property
    def d_sys(self) -> dict[str, float]:
        """Setting -> D_sys."""
        return _d_sys_of(self.details)

    def to_json(self) -> JsonDict:
        """D_sys per setting, details, protocol, then the largest non-matching sets (format 4)."""
        out: JsonDict = {
            "d_sys": self.d_sys,
            "details": {k: m.to_json() for k, m in self.details.items()},
            "protocol": self.protocol,
        }
        if self.largest_nonmatching_set is not None:
            out["largest_nonmatching_set"] = {k: m.to_json() for k, m in self.largest_nonmatching_set.items()}
            out["largest_nonmatching_set_protocol"] = self.largest_nonmatching_set_protocol
        return out


# --------------------------------------------------------------------------------------------- layered secrets
@dataclass
class ThiefScanResult:
    """The ``thief_without_keys`` section: what a database thief without keys recovers from the store."""

    #: What :func:`advface.audit.thief.scan_sqlite` / ``scan_postgres`` measured (rows, vectors recovered, ...).
    scan: JsonDict
    encrypted_at_rest: bool
    #: FMR label of the threshold a decoded vector must reach to match a victim.
    threshold_fmr: str
    summary: str

    @property
    def rows(self) -> int:
        """Rows of the tenant read."""
        return self.scan["rows"]

    @property
    def vectors_recovered(self) -> int:
        """Rows whose vector was recovered without keys."""
        return self.scan["vectors_recovered"]

    @property
    def read(self) -> str:
        """What was read (tables, columns)."""
        return self.scan.get("read", "")

    @property
    def file_bytes(self) -> JsonDict | None:
        """The raw-bytes scan of the database files (SQLite), None where there is none."""
        return self.scan.get("file_bytes")

    def to_json(self) -> JsonDict:
        """The scan, then ``encrypted_at_rest``, ``threshold_fmr``, ``summary``."""
        return {
            **self.scan,
            "encrypted_at_rest": self.encrypted_at_rest,
            "threshold_fmr": self.threshold_fmr,
            "summary": self.summary,
        }


@dataclass
class BestAttack:
    """The attackers' Type I success at FMR 0.1% on one kind of template, and the best of them."""

    #: The template kind (:data:`TEMPLATE_KINDS`).
    templates: str
    #: Attacker name -> Type I success.
    type1_success: dict[str, float]

    @property
    def type1_success_max(self) -> float | None:
        """The best attacker's success, None when no attacker ran on these templates."""
        return max(self.type1_success.values()) if self.type1_success else None

    def to_json(self) -> JsonDict:
        """``templates``, ``type1_success_max``, ``type1_success``."""
        return {
            "templates": self.templates,
            "type1_success_max": self.type1_success_max,
            "type1_success": self.type1_success,
        }


@dataclass
class LayerResult:
    """One attacker of the threat model against the layer that should stop it, with what the audit measured."""

    attacker: str
    holds: str
    layer: str
    #: The database thief's scan (the thief without keys), when measured.
    thief: ThiefScanResult | None = None
    #: :func:`advface.audit.api_surface.api_exposure` (the client with API access only).
    api: JsonDict | None = None
    #: The attackers' success on the templates this attacker holds.
    best: BestAttack | None = None
    note: str | None = None

    @property
    def api_stored_vector_rpcs(self) -> list[str]:
        """RPCs returning stored templates (empty without an API exposure)."""
        return list(self.api["stored_vectors"]) if self.api is not None else []

    def to_json(self) -> JsonDict:
        """``attacker``, ``holds``, ``layer``, then what was measured, then ``note``."""
        out: JsonDict = {"attacker": self.attacker, "holds": self.holds, "layer": self.layer}
        if self.thief is not None:
            out.update(
                vectors_recovered=self.thief.vectors_recovered,
                rows=self.thief.rows,
                encrypted_at_rest=self.thief.encrypted_at_rest,
            )
        if self.api is not None:
            out.update(api_stored_vector_rpcs=self.api["stored_vectors"], api=self.api)
        if self.best is not None:
            out.update(self.best.to_json())
        if self.note is not None:
            out["note"] = self.note
        return out


@dataclass
class LayersResult:
    """The ``layers`` section: each attacker of the threat model, in the order of the report."""

    layers: list[LayerResult]

    def to_json(self) -> list[JsonDict]:
        """One entry per layer."""
        return [layer.to_json() for layer in self.layers]


# ------------------------------------------------------------------------------------------------------ verdict
@dataclass
class VerdictRow:
    """One attacker of the threat model: what they hold, what the audit saw them recover, and whether the run's
    targets are met (None: not measured by this run)."""

    attacker: str
    holds: str
    #: What they recover, in words.
    recovers: str
    met: bool | None
    #: The target the row is held to, in words.
    target: str
    #: Best Type I success at FMR 0.1% by the system encoder and by the transfer judge, and which attacker gave the
    #: system's (None where not measured).
    type1_system: float | None = None
    type1_transfer: float | None = None
    best_attacker: str | None = None

    def to_json(self) -> JsonDict:
        """``attacker``, ``holds``, ``recovers``, ``met``, then ``target`` and the numbers behind them."""
        return {
            "attacker": self.attacker,
            "holds": self.holds,
            "recovers": self.recovers,
            "met": self.met,
            "target": self.target,
            "type1_system": self.type1_system,
            "type1_transfer": self.type1_transfer,
            "best_attacker": self.best_attacker,
        }


@dataclass
class VerdictResult:
    """The ``verdict`` section: one row per attacker of the threat model, in the order of the report's first table."""

    rows: list[VerdictRow]

    def to_json(self) -> list[JsonDict]:
        """One entry per attacker."""
        return [row.to_json() for row in self.rows]


# ---------------------------------------------------------------------------------------------------- scenarios
@dataclass
class JudgedTemplates:
    """Estimated raw templates of the victims (a scenario's output) as the audit judges them: how many match the
    victim's raw template at the system's FMR 0.1% threshold, and the faces the audit's best raw-template decoder
    draws from them (system and transfer judges; None without a decoder)."""

    template_match_rate: float
    decoder: str | None = None
    faces: ReconstructionResult | None = None

    @property
    def type1_success(self) -> float | None:
        """Type I success of the decoded faces at FMR 0.1% (None without a decoder)."""
        return self.faces.type1_success if self.faces is not None else None

    @property
    def type2_success(self) -> float | None:
        """Type II success of the decoded faces at FMR 0.1%."""
        return self.faces.type2_success if self.faces is not None else None

    @property
    def transfer_type1_success(self) -> float | None:
        """The transfer judge's Type I success of the decoded faces at FMR 0.1% (None without a judge)."""
        if self.faces is None or self.faces.transfer is None:
            return None
        return self.faces.transfer.at_fmr[HEADLINE_FMR].type1_success

    def to_json(self) -> JsonDict:
        """Headline rates, then the decoder and its faces' full entry."""
        return {
            "type1_success": self.type1_success,
            "type2_success": self.type2_success,
            "transfer_type1_success": self.transfer_type1_success,
            "template_match_rate": self.template_match_rate,
            "decoder": self.decoder,
            "faces": self.faces.to_json() if self.faces is not None else None,
        }


@dataclass
class FullDisclosureResult:
    """``scenarios.full_disclosure``: the attacker holds every key and the scheme's parameters. They run the audit's
    attackers on the protected templates (``direct``) and, holding the key, protect as many templates of their own as
    they like and learn the inverse map from them (``inverse``); the scenario's success is the better of the two."""

    holds: str
    pairs: int
    inverse: JudgedTemplates
    direct_attacker: str | None
    direct_type1_success: float | None
    direct_type2_success: float | None

    @property
    def type1_success(self) -> float | None:
        """The better Type I success at FMR 0.1% of the two routes (None when neither gave faces)."""
        rates = [r for r in (self.inverse.type1_success, self.direct_type1_success) if r is not None]
        return max(rates) if rates else None

    @property
    def type2_success(self) -> float | None:
        """The better Type II success at FMR 0.1% of the two routes."""
        rates = [r for r in (self.inverse.type2_success, self.direct_type2_success) if r is not None]
        return max(rates) if rates else None

    def to_json(self) -> JsonDict:
        """``type1_success`` / ``type2_success`` first, then both routes."""
        return {
            "type1_success": self.type1_success,
            "type2_success": self.type2_success,
            "holds": self.holds,
            "inverse": {"pairs": self.pairs, **self.inverse.to_json()},
            "direct": {
                "best_attacker": self.direct_attacker,
                "type1_success": self.direct_type1_success,
                "type2_success": self.direct_type2_success,
            },
        }


@dataclass
class KnownPairsPoint:
    """One point of ``scenarios.known_pairs``: the inverse map learned from ``k`` leaked pairs."""

    k: int
    judged: JudgedTemplates
    #: Mean ||estimate - raw|| / ||raw|| of the victims' estimated raw templates.
    relative_error: float

    def to_json(self) -> JsonDict:
        """``k`` and ``type1_success`` first."""
        return {"k": self.k, **self.judged.to_json(), "relative_error": self.relative_error}


@dataclass
class SearchSummary:
    """One way of querying (scores or decisions only) over the score-exposure victims."""

    #: Queries each victim's search spent (the budget where it was not accepted).
    queries: list[int]
    accepted: list[bool]

    @property
    def accepted_fraction(self) -> float:
        """Victims for whom a probe was accepted within the budget."""
        return float(np.mean(self.accepted)) if self.accepted else 0.0

    @property
    def median_queries(self) -> float | None:
        """Median queries of the accepted searches (None when none was accepted)."""
        done = [q for q, a in zip(self.queries, self.accepted) if a]
        return float(np.median(done)) if done else None

    def to_json(self) -> JsonDict:
        """Fraction accepted, median queries of those, then per victim."""
        return {
            "accepted_fraction": self.accepted_fraction,
            "median_queries_to_accept": self.median_queries,
            "queries": self.queries,
            "accepted": self.accepted,
        }


@dataclass
class ScoreExposureResult:
    """``scenarios.score_exposure``: an accepted template rebuilt from the system's answers to the attacker's probes
    (:mod:`advface.audit.attacks.score_search`), with scores and with decisions only, and the faces the best decoder
    draws from the templates rebuilt with scores."""

    victims: int
    budget: int
    threshold: float
    with_scores: SearchSummary
    decisions_only: SearchSummary
    faces: JudgedTemplates
    method: str

    def to_json(self) -> JsonDict:
        """Settings, both searches, then the faces."""
        return {
            "victims": self.victims,
            "query_budget": self.budget,
            "threshold": self.threshold,
            "with_scores": self.with_scores.to_json(),
            "decisions_only": self.decisions_only.to_json(),
            "faces_from_scores": self.faces.to_json(),
            "method": self.method,
        }


@dataclass
class ScenariosResult:
    """The ``scenarios`` section (format 5): the field's attack scenarios on the ``protected`` templates, and (format
    6, ``keyed``) the same on the ``protected+key`` templates, written under the key ``"protected+key"``."""

    templates: str
    protocol: str
    full_disclosure: FullDisclosureResult | None = None
    known_pairs: list[KnownPairsPoint] = field(default_factory=list)
    score_exposure: ScoreExposureResult | None = None
    keyed: ScenariosResult | None = None

    def runs(self) -> list[ScenariosResult]:
        """This run and the keyed one (where measured), in that order."""
        return [self] + ([self.keyed] if self.keyed is not None else [])

    def to_json(self) -> JsonDict:
        """The three scenarios (those measured), the templates attacked and the protocol; the keyed run's own."""
        out: JsonDict = {"templates": self.templates, "protocol": self.protocol}
        if self.full_disclosure is not None:
            out["full_disclosure"] = self.full_disclosure.to_json()
        if self.known_pairs:
            out["known_pairs"] = [p.to_json() for p in self.known_pairs]
        if self.score_exposure is not None:
            out["score_exposure"] = self.score_exposure.to_json()
        if self.keyed is not None:
            out[self.keyed.templates] = self.keyed.to_json()
        return out


# ------------------------------------------------------------------------------------------- encrypted matching
@dataclass
class EncryptedMatchingResult:
    """The ``encrypted_matching`` section (format 7): the thief with the database and a memory dump of the
    sidecar under encrypted matching, without the key service (:mod:`advface.audit.stages.encrypted_matching`).
    ``measured`` False: ``reason`` says why, and there are no counts."""

    measured: bool
    #: Templates enrolled (the audited ones) and probes verified by the sidecar-like process.
    templates: int
    probes: int
    setup: str
    #: What the row does not cover.
    not_covered: str
    reason: str | None = None
    #: Rows recovered (``half`` / ``full``) per place and form (memory / database; values / plaintexts / probes).
    counts: JsonDict = field(default_factory=dict)
    #: Templates recovered anywhere (at least half of the coordinates), and with every coordinate; probes the same.
    templates_recovered: int = 0
    templates_recovered_full: int = 0
    probes_recovered: int = 0
    probes_recovered_full: int = 0
    memory_mb: float = 0.0
    database_mb: float = 0.0
    database_files: list[str] = field(default_factory=list)
    #: The recovered templates / probes (unknown coordinates filled with a public mean) through the audit's judge;
    #: None when none was recovered (the attacks' success is then 0 by construction: ``attacks``).
    judged_templates: JudgedTemplates | None = None
    judged_probes: JudgedTemplates | None = None
    attacks: str = ""

    @property
    def recovered_any(self) -> bool:
        """Whether any template or probe was recovered (at least half of its coordinates)."""
        return self.templates_recovered > 0 or self.probes_recovered > 0

    @property
    def summary(self) -> str:
        """One line: what was recovered of how many (or why not measured)."""
        if not self.measured:
            return f"not measured: {self.reason}"
        return (
            f"{self.templates_recovered} of {self.templates} templates recovered ({self.templates_recovered_full} "
            f"with every coordinate), {self.probes_recovered} of {self.probes} probes "
            f"({self.probes_recovered_full} with every coordinate)"
        )

    def to_json(self) -> JsonDict:
        """``measured`` (and ``reason``), the sizes and counts, the judged recoveries, the setup and caveats."""
        out: JsonDict = {"measured": self.measured, "templates": self.templates, "probes": self.probes}
        if not self.measured:
            out["reason"] = self.reason
        else:
            out.update(
                templates_recovered=self.templates_recovered,
                templates_recovered_full=self.templates_recovered_full,
                probes_recovered=self.probes_recovered,
                probes_recovered_full=self.probes_recovered_full,
                counts=self.counts,
                memory_mb=self.memory_mb,
                database_mb=self.database_mb,
                database_files=self.database_files,
                judged_templates=self.judged_templates.to_json() if self.judged_templates is not None else None,
                judged_probes=self.judged_probes.to_json() if self.judged_probes is not None else None,
                attacks=self.attacks,
            )
        out.update(summary=self.summary, setup=self.setup, not_covered=self.not_covered)
        return out


# ---------------------------------------------------------------------------------------------------- the audit
@dataclass
class AuditResult:
    """Everything an audit measured: the ``report.json`` document. A section is None (left out of the JSON) when
    its stage did not run; ``missing`` says why."""

    #: The run's settings (:func:`advface.audit.config.config_summary`).
    config: JsonDict
    missing: list[Missing] = field(default_factory=list)
    data: DatasetSummary | None = None
    #: FMR label -> threshold on the encoder's score, fixed on non-mated pairs of clean embeddings.
    thresholds: dict[str, float] | None = None
    #: The transfer judge and its thresholds (``thresholds.transfer``); None without a transfer judge.
    transfer: TransferThresholds | None = None
    protection: ProtectionResult | None = None
    thief_without_keys: ThiefScanResult | None = None
    #: Attacker name -> result, in the order they ran (only those that ran).
    attacks: dict[str, AttackResult] = field(default_factory=dict)
    verification: VerificationResult | None = None
    #: FNMR at FMR 0.1% / 0.01% (format 4).
    utility: UtilityResult | None = None
    unlinkability: UnlinkabilityResult | None = None
    renewability: RenewabilityResult | None = None
    layers: LayersResult | None = None
    #: The verdict per attacker of the threat model (format 4).
    verdict: VerdictResult | None = None
    #: Full disclosure, known pairs and score exposure (format 5; on protected+key too, format 6).
    scenarios: ScenariosResult | None = None
    #: The thief with the database and the sidecar's memory under encrypted matching (format 7; --matching encrypted).
    encrypted_matching: EncryptedMatchingResult | None = None
    #: When the report was written (UTC), and the run's duration in seconds.
    date: str | None = None
    seconds: float | None = None

    @property
    def protection_label(self) -> str:
        """How the report names the protection under audit: AdvFace for advface's own, else the scheme's name."""
        c = self.config
        method = (
            self.protection.method
            if self.protection is not None
            else str(c.get("scheme") or ("command" if c.get("protect_cmd") else c.get("protection", "advface")))
        )
        label = PROTECTION_LABELS.get(method, method)
        centre = self.protection.protector.centre if self.protection is not None else None
        return f"{label} (centred)" if centre is not None and centre.startswith("centred") else label

    @property
    def protection_is_advface(self) -> bool:
        """Whether the protection under audit is advface's own (AdvFace or identity-aware AdvFace)."""
        if self.protection is not None:
            return self.protection.method in ("advface", "advface-id")
        c = self.config
        other = c.get("scheme") or c.get("protect_cmd")
        return c.get("protection", "advface") in ("advface", "advface-id") and not other

    def add_missing(self, stage: str, reason: str) -> None:
        """Record a stage that did not run or ran incompletely."""
        self.missing.append(Missing(stage, reason))

    def to_json(self) -> JsonDict:
        """The ``report.json`` document: ``format_version``, then every section that was measured."""
        out: JsonDict = {
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "missing": [m.to_json() for m in self.missing],
        }
        thresholds: JsonDict | None = dict(self.thresholds) if self.thresholds is not None else None
        if thresholds is not None and self.transfer is not None:
            thresholds["transfer"] = self.transfer.to_json()
        sections: list[tuple[str, Any]] = [
            ("data", self.data),
            ("thresholds", thresholds),
            ("protection", self.protection),
            ("thief_without_keys", self.thief_without_keys),
            ("attacks", self.attacks or None),
            ("verification", self.verification),
            ("utility", self.utility),
            ("unlinkability", self.unlinkability),
            ("renewability", self.renewability),
            ("layers", self.layers),
            ("verdict", self.verdict),
            ("scenarios", self.scenarios),
            ("encrypted_matching", self.encrypted_matching),
            ("date", self.date),
            ("seconds", self.seconds),
        ]
        for name, section in sections:
            if section is None:
                continue
            if isinstance(section, dict):
                section = {k: v.to_json() if hasattr(v, "to_json") else v for k, v in section.items()}
            elif hasattr(section, "to_json"):
                section = section.to_json()
            out[name] = section
        return out
