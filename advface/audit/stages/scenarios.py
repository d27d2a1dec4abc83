"""Scenarios stage: the field's attack scenarios on the ``protected`` templates (``scenarios`` of report.json), and
the same on the ``protected+key`` templates, those under the keyed transform (``scenarios["protected+key"]``).

- **full disclosure** (BTPBench's default for irreversibility): the attacker holds every key and the scheme's
  parameters. They run the audit's attackers on the protected templates (the best of them is taken from the
  attackers stage) and, since they can protect templates of their own under the victims' key, learn the inverse map
  from the whole pool of the attacker group's (raw, protected) pairs, map the victims' templates back and decode them
  with the audit's best raw-template decoder;
- **known pairs**: the insider with k leaked (raw, protected) pairs learns the inverse map from them
  (:mod:`advface.audit.attacks.known_pairs`), for each k of ``--known-pairs-k`` capped by the pool;
- **score exposure**: an accepted template rebuilt from the system's answers to the attacker's probes against one
  enrolled template, with scores and with decisions only (:mod:`advface.audit.attacks.score_search`); probes go
  through the scheme as the system's do (a probe the scheme refuses, e.g. one whose values overflow, is rejected).

On ``protected+key`` the attacker of full disclosure also holds the transform key (they make their pairs through
it, and the direct route is the best attacker on either kind, since the key undoes the transform); the insider's
leaked pairs are (raw, stored) pairs, i.e. through the transform; score exposure queries the system as it runs with
the transform: probes through the scheme (where it transforms probes) and the key.

Estimated raw templates are judged twice, as the audit does: whether they match the victim's raw template at the
system's clean FMR 0.1% threshold, and the faces the best decoder draws from them by the system encoder and the
transfer judge (Type I / II at FMR 0.1%).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from advface.audit.attacks.known_pairs import fit_inverse_map, known_pairs_curve
from advface.audit.attacks.score_search import search_with_decisions, search_with_scores
from advface.audit.config import AuditConfig
from advface.audit.metrics import score_matrix
from advface.audit.results import (
    HEADLINE_FMR,
    AuditResult,
    FullDisclosureResult,
    JudgedTemplates,
    KnownPairsPoint,
    ScenariosResult,
    ScoreExposureResult,
    SearchSummary,
)
from advface.audit.stages.attackers import Reconstruct, decoder_settings, judge_reconstructions
from advface.audit.stages.inputs import AuditInputs
from advface.audit.stages.protection import ProtectionSetup
from advface.audit.transfer import TransferJudge
from advface.errors import ConfigError, EmbeddingError

#: The templates the scenarios attack first (``scenarios``), and those under the keyed transform
#: (``scenarios["protected+key"]``).
SCENARIO_TEMPLATES = "protected"
KEYED_TEMPLATES = "protected+key"
#: What a probe the system cannot take raises (a scheme's overflow, a vector the keyed transform refuses).
_REFUSED = (ConfigError, EmbeddingError)


def best_raw_decoder(result: AuditResult) -> str | None:
    """The decoder attacker (trained on raw templates) with the highest Type I success on raw templates."""
    rates = {
        name: a.by_templates["raw"].type1_success
        for name, a in result.attacks.items()
        if a.kind == "decoder" and "raw" in a.by_templates
    }
    return max(rates, key=lambda n: rates[n]) if rates else None


def _load_decoder(name: str, config: AuditConfig, inputs: AuditInputs) -> Reconstruct:
    """The decoder ``name`` as trained by the attackers stage (from the audit's cache)."""
    from advface.attack_metrics import reconstruct
    from advface.audit.attacks.decoder import parse_attacker, train_or_load

    decoder, _, _ = train_or_load(
        parse_attacker(name), inputs.pairs, inputs.split, inputs.encoder, **decoder_settings(config, inputs)
    )
    return lambda z: reconstruct(decoder, z)


class EstimateJudge:
    """Judges estimated raw templates of audited rows: template match, and faces by the best decoder (also used by
    the encrypted-matching scenario, :mod:`advface.audit.stages.encrypted_matching`)."""

    def __init__(
        self, inputs: AuditInputs, decoder: str | None, reconstruct: Reconstruct | None, transfer: TransferJudge | None
    ) -> None:
        self.inputs, self.decoder, self.reconstruct, self.transfer = inputs, decoder, reconstruct, transfer

    def __call__(self, estimated: np.ndarray, sel: np.ndarray) -> JudgedTemplates:
        inputs = self.inputs
        scores = inputs.encoder.score(estimated, inputs.raw[sel])
        match = float((scores >= inputs.thresholds[HEADLINE_FMR]).mean())
        faces = None
        if self.reconstruct is not None:
            faces, _ = judge_reconstructions(inputs, self.reconstruct, estimated, sel, self.transfer)
        return JudgedTemplates(match, self.decoder, faces)


def _pool(config: AuditConfig, inputs: AuditInputs) -> np.ndarray:
    """Raw templates of up to ``scenario_pool`` attacker-group photos (no mirrored copies), in a seeded order."""
    own = inputs.pairs.of_identities(set(inputs.split.attacker)).without_flips().embeddings
    order = np.random.default_rng(config.seed).permutation(len(own))[: config.scenario_pool]
    return np.asarray(own[order], np.float32)


def _direct(result: AuditResult, kinds: tuple[str, ...]) -> tuple[str | None, float | None, float | None]:
    """The audit's best attacker on the templates of ``kinds``: name (with the kind when there are several), Type I,
    Type II at FMR 0.1%."""
    rates = {
        (n if len(kinds) == 1 else f"{n} on {kind}"): a.by_templates[kind]
        for n, a in result.attacks.items()
        for kind in kinds
        if kind in a.by_templates
    }
    if not rates:
        return None, None, None
    name = max(rates, key=lambda n: rates[n].type1_success)
    return name, rates[name].type1_success, rates[name].type2_success


@dataclass
class _Target:
    """The templates one run of the scenarios attacks, and how the system compares probes with them."""

    #: ``protected`` or ``protected+key``.
    templates: str
    victims: np.ndarray
    #: The pool's templates as the victims' are made (scheme and, for ``protected+key``, the keyed transform).
    pool: np.ndarray
    #: What the system does to a probe before comparing it (None: compares it as it comes).
    probe_fn: Callable[[np.ndarray], np.ndarray] | None
    #: Kinds of the audit's attacks the full-disclosure attacker can run.
    direct_kinds: tuple[str, ...]
    holds: str


def _probe_score(
    probe_fn: Callable[[np.ndarray], np.ndarray], probe: np.ndarray, enrolled: np.ndarray, metric: str
) -> float:
    """One probe's score through the scheme; -inf where the scheme refuses it."""
    try:
        return float(score_matrix(probe_fn(probe[None]), enrolled, metric)[0, 0])
    except _REFUSED:
        return -np.inf


def _score_exposure(
    config: AuditConfig,
    inputs: AuditInputs,
    target: _Target,
    pool: np.ndarray,
    threshold: float,
    judge: EstimateJudge,
) -> ScoreExposureResult:
    """Each of the first ``score_victims`` audited templates rebuilt from scores and from decisions only."""
    c = config
    metric = inputs.encoder.metric
    probe_fn = target.probe_fn
    sel = np.arange(min(c.score_victims, len(inputs.rows)))
    scores_runs, decision_runs, rebuilt = [], [], []
    for i in sel:
        enrolled = target.victims[i : i + 1]

        def oracle(probes: np.ndarray, enrolled: np.ndarray = enrolled) -> np.ndarray:
            if probe_fn is None:
                return score_matrix(probes, enrolled, metric)[:, 0]
            try:
                return score_matrix(probe_fn(probes), enrolled, metric)[:, 0]
            except _REFUSED:  # a probe the system cannot take (e.g. a scheme's overflow): rejected, scored -inf
                return np.array([_probe_score(probe_fn, p, enrolled, metric) for p in probes])

        with_scores = search_with_scores(oracle, pool, metric, threshold, c.score_budget, seed=c.seed + int(i))

        def decide(probes: np.ndarray, oracle: Callable[[np.ndarray], np.ndarray] = oracle) -> np.ndarray:
            return oracle(probes) >= threshold

        decisions = search_with_decisions(decide, pool, c.score_budget, seed=c.seed + int(i))
        scores_runs.append(with_scores)
        decision_runs.append(decisions)
        rebuilt.append(with_scores.template)
    return ScoreExposureResult(
        victims=len(sel),
        budget=c.score_budget,
        threshold=threshold,
        with_scores=SearchSummary([r.queries for r in scores_runs], [r.accepted for r in scores_runs]),
        decisions_only=SearchSummary([r.queries for r in decision_runs], [r.accepted for r in decision_runs]),
        faces=judge(np.stack(rebuilt), sel),
        method="probes are templates of the attacker group's faces (and mixtures of them), compared with one "
        f"enrolled {target.templates} template as the system compares (through the scheme where it transforms "
        "probes" + (", and the keyed transform" if target.templates == KEYED_TEMPLATES else "") + "); "
        "with scores: least-squares regression of the metric's score model on D + 1 probes' scores, again on "
        "2 (D + 1), then hill climbing in batches of 8 random steps (one-fifth rule); decisions only: the pool's "
        "templates and mixtures until one is accepted; accepted: score >= the system's FMR 0.1% threshold for "
        "these templates; the faces: the best decoder on each rebuilt (accepted or best) probe",
    )


def _targets(config: AuditConfig, protection: ProtectionSetup, pool_raw: np.ndarray) -> list[_Target]:
    """The two runs: the protected templates, and the same through the keyed transform (``key_a``)."""
    pool_protected = protection.protect(pool_raw, config.seed, "scenario pool (the victims' key)")
    scheme_probes = protection.protector.protect_probes
    key = protection.key_a

    def keyed_probes(probes: np.ndarray) -> np.ndarray:
        return key.apply(scheme_probes(probes) if scheme_probes is not None else probes)

    return [
        _Target(
            SCENARIO_TEMPLATES,
            protection.protected,
            pool_protected,
            scheme_probes,
            (SCENARIO_TEMPLATES,),
            "every key and the scheme's parameters: protects templates of its own under the victims' key",
        ),
        _Target(
            KEYED_TEMPLATES,
            protection.keyed,
            key.apply(pool_protected),
            keyed_probes,
            (SCENARIO_TEMPLATES, KEYED_TEMPLATES),
            "every key, the keyed transform's included, and the scheme's parameters: makes templates of its own "
            "under the victims' keys, through the transform, and undoes the transform of the stored ones",
        ),
    ]


def _run_on(
    config: AuditConfig,
    inputs: AuditInputs,
    result: AuditResult,
    target: _Target,
    pool_raw: np.ndarray,
    judge: EstimateJudge,
) -> ScenariosResult:
    """Full disclosure, known pairs and score exposure on the templates of ``target``."""
    c = config
    every = np.arange(len(inputs.rows))
    clean = inputs.thresholds[HEADLINE_FMR]
    points = known_pairs_curve(
        pool_raw, target.pool, target.victims, inputs.raw, c.known_pairs_k, inputs.encoder.metric, clean, c.seed
    )
    known = [KnownPairsPoint(p.k, judge(p.estimated, every), p.relative_error) for p in points]
    inverse = fit_inverse_map(target.pool, pool_raw, None)
    name, direct1, direct2 = _direct(result, target.direct_kinds)
    full = FullDisclosureResult(
        holds=target.holds,
        pairs=len(pool_raw),
        inverse=judge(inverse(target.victims), every),
        direct_attacker=name,
        direct_type1_success=direct1,
        direct_type2_success=direct2,
    )
    verification = result.verification
    threshold = (
        verification.by_templates[target.templates].threshold_at_far_1e_3
        if verification is not None and target.templates in verification.by_templates
        else clean
    )
    exposure = _score_exposure(c, inputs, target, pool_raw, threshold, judge)
    keyed = target.templates == KEYED_TEMPLATES
    return ScenariosResult(
        templates=target.templates,
        protocol=f"pool: {len(pool_raw)} photos of the attacker group (no mirrored copies), protected under the "
        "victims' key" + (" and through the keyed transform" if keyed else "") + "; the inverse map: ridge "
        f"regression {target.templates} -> raw (penalty by 5-fold cross-validation); faces by the best "
        f"raw-template decoder ({judge.decoder or 'none ran'}) judged as the attackers' (system encoder and "
        "transfer judge, Type I/II at FMR 0.1%); template match: the estimate vs the victim's raw template at the "
        "clean FMR 0.1% threshold",
        full_disclosure=full,
        known_pairs=known,
        score_exposure=exposure,
    )


def estimate_judge(
    config: AuditConfig, inputs: AuditInputs, result: AuditResult, transfer: TransferJudge | None = None
) -> EstimateJudge:
    """The judge of estimated templates: the audit's best raw-template decoder (none: template numbers only) and the
    system and transfer judges."""
    decoder = best_raw_decoder(result)
    return EstimateJudge(inputs, decoder, _load_decoder(decoder, config, inputs) if decoder else None, transfer)


def run_scenarios(
    config: AuditConfig,
    inputs: AuditInputs,
    protection: ProtectionSetup,
    result: AuditResult,
    transfer: TransferJudge | None = None,
) -> ScenariosResult:
    """Full disclosure, known pairs and score exposure on the protected templates, and (``keyed``) on the same
    through the keyed transform; needs the attackers stage's results (the best raw decoder and the direct attacks)
    and, for the acceptance thresholds, the verification's."""
    c = config
    pool_raw = _pool(c, inputs)
    if not len(pool_raw):
        raise ValueError("scenarios need photos of the attacker group")
    judge = estimate_judge(c, inputs, result, transfer)
    plain, keyed = (_run_on(c, inputs, result, t, pool_raw, judge) for t in _targets(c, protection, pool_raw))
    plain.keyed = keyed
    return plain
