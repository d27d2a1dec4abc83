"""The verdict: one row per attacker of the threat model (thief without keys, thief with keys, insider, API client,
full disclosure) with what they hold, what the audit saw them recover (by the system encoder and the transfer judge)
and whether the run's targets are met; ``met`` is None where the run did not measure that attacker. The scenarios
(``scenarios``) add to three rows: known pairs to the insider, score exposure to the API client, the inverse map
learned with the key to full disclosure, each on the protected templates and (where measured) on the templates under
the keyed transform; each is held to the same Type I target. With ``--matching encrypted`` a sixth row: the thief
with the database and the sidecar's memory under encrypted matching (attackers B and C against encrypted stores),
met when they recover 0 templates and 0 probes. The rows name the protection under audit
(``AuditResult.protection_label``): AdvFace, the sidecar and its API only when the protection is advface's own."""

from __future__ import annotations

from advface.audit.results import (
    HEADLINE_FMR,
    AuditResult,
    JudgedTemplates,
    ScenariosResult,
    VerdictResult,
    VerdictRow,
)

#: The attackers of the verdict, in order.
THIEF_WITHOUT_KEYS = "thief without keys"
THIEF_WITH_KEYS = "thief with keys"
INSIDER = "insider"
API_CLIENT = "API client"
FULL_DISCLOSURE = "full disclosure"
ENCRYPTED_MEMORY_THIEF = "thief with the database and the sidecar's memory (encrypted matching)"


def _best(
    result: AuditResult, templates: str, kind: str | None = None
) -> tuple[str | None, float | None, float | None]:
    """``(attacker, Type I by the system, best Type I by the transfer judge)`` over the attackers (of ``kind``) that
    ran on ``templates`` (Nones when none did)."""
    system: dict[str, float] = {}
    transfer: list[float] = []
    for name, attack in result.attacks.items():
        r = attack.by_templates.get(templates)
        if r is None or (kind is not None and attack.kind != kind):
            continue
        system[name] = r.type1_success
        if r.transfer is not None and (t := r.transfer.at_fmr[HEADLINE_FMR].type1_success) is not None:
            transfer.append(t)
    if not system:
        return None, None, None
    name = max(system, key=lambda n: system[n])
    return name, system[name], max(transfer) if transfer else None


def _reconstruction_row(
    result: AuditResult, attacker: str, holds: str, templates: str, target: float, kind: str | None = None
) -> VerdictRow:
    """A row judged on the attackers' reconstructions of ``templates``: met when the best Type I success at FMR
    0.1% is at most ``target`` by the system encoder and (where it judged) by the transfer judge."""
    name, system, transfer = _best(result, templates, kind)
    target_text = f"best Type I @FMR 0.1% <= {100 * target:g}% (system and transfer judges)"
    if system is None:
        which = f"no {kind} attacker" if kind else "no attacker"
        return VerdictRow(attacker, holds, f"not measured: {which} ran on {templates} templates", None, target_text)
    encoder = str(result.config.get("encoder", "system"))
    recovers = f"faces accepted as the person: {100 * system:.1f}% by {encoder} (best: {name})"
    if transfer is not None and result.transfer is not None:
        recovers += f", {100 * transfer:.1f}% by the transfer judge {result.transfer.encoder}"
    else:
        recovers += ", transfer judge not run"
    met = system <= target and (transfer is None or transfer <= target)
    return VerdictRow(attacker, holds, recovers, met, target_text, system, transfer, name)


def _thief_row(result: AuditResult) -> VerdictRow:
    thief = result.thief_without_keys
    holds = "the database files, a backup or a dump; no key"
    target = "0 stored vectors recovered without keys"
    if thief is None:
        return VerdictRow(THIEF_WITHOUT_KEYS, holds, "not measured: no store audited (--store)", None, target)
    recovered = thief.vectors_recovered
    return VerdictRow(THIEF_WITHOUT_KEYS, holds, f"{recovered} of {thief.rows} stored vectors", recovered == 0, target)


def _thief_with_keys_row(result: AuditResult, store_audited: bool, target: float) -> VerdictRow:
    """The thief with the database and its encryption key, not the transform key; also held to unlinkability
    across tenant keys (linking one person's templates in two tenants' databases)."""
    keyed = not store_audited or (result.protection is not None and result.protection.store_keyed_transform)
    templates = "protected+key" if keyed else "protected"
    holds = f"the database and its encryption key, not the transform key: stored templates ({templates})"
    row = _reconstruction_row(result, THIEF_WITH_KEYS, holds, templates, target)
    unl = result.unlinkability
    if unl is not None and keyed:
        worst = unl.across_keys.worst
        row.recovers += f"; links tenants' databases with D_sys up to {worst:.3f}"
        row.target += f"; D_sys across tenant keys <= {unl.target_d_sys_max:g}"
        row.met = None if row.met is None else row.met and unl.key_meets_target
    return row


def _api_row(result: AuditResult, target: float) -> VerdictRow:
    holds = "match scores of its own probes (no stored template)"
    row = _reconstruction_row(result, API_CLIENT, holds, "protected", target, kind="gan-prior")
    layer = next((x for x in result.layers.layers if x.api is not None), None) if result.layers else None
    if not result.protection_is_advface:
        # advface's API surface says nothing of how another scheme is served
        row.recovers = f"API of the {result.protection_label} deployment not audited; score-search bound: " + (
            row.recovers
        )
    elif layer is not None:
        leaks = layer.api_stored_vector_rpcs
        row.recovers = f"RPCs returning stored templates: {', '.join(leaks) or 'none'}; score-search bound: " + (
            row.recovers
        )
        row.target = "no RPC returns a stored template; " + row.target
        row.met = bool(not leaks and row.met) if row.met is not None else (False if leaks else None)
    return row


def _runs(result: AuditResult) -> list[ScenariosResult]:
    """The scenarios' runs: on the protected templates, then on those under the keyed transform."""
    return result.scenarios.runs() if result.scenarios is not None else []


def _on(sc: ScenariosResult) -> str:
    """Words naming a run of the scenarios other than the first (on the protected templates)."""
    return " under the keyed transform" if sc.templates == "protected+key" else ""


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def _add_scenario(row: VerdictRow, words: str, judged: JudgedTemplates, target: float, attacker: str) -> None:
    """Fold a scenario's judged faces into ``row``: its words, the worse numbers, and ``met`` held to ``target``."""
    row.recovers += "; " + words
    system, transfer = judged.type1_success, judged.transfer_type1_success
    if system is None:
        return
    if row.type1_system is None or system > row.type1_system:
        row.type1_system, row.best_attacker = system, attacker
    if transfer is not None and (row.type1_transfer is None or transfer > row.type1_transfer):
        row.type1_transfer = transfer
    met = system <= target and (transfer is None or transfer <= target)
    row.met = met if row.met is None else row.met and met


def _insider_row(result: AuditResult, target: float) -> VerdictRow:
    """The adaptive insider, and the insider with k leaked (raw, protected) pairs (``scenarios.known_pairs``)."""
    row = _reconstruction_row(
        result,
        INSIDER,
        f"{result.protection_label} templates and (own face, stored template) pairs of its own enrolments",
        "protected",
        target,
        kind="adaptive",
    )
    for sc in _runs(result):
        points = sc.known_pairs
        if not points:
            continue
        worst = max(points, key=lambda p: (p.judged.type1_success or 0.0, p.judged.template_match_rate))
        words = (
            f"with up to {points[-1].k} leaked pairs{_on(sc)}: estimates match the raw template for "
            f"{_pct(points[-1].judged.template_match_rate)}, faces accepted {_pct(worst.judged.type1_success)} "
            f"at k = {worst.k}"
        )
        _add_scenario(row, words, worst.judged, target, f"known pairs (k = {worst.k}){_on(sc)}")
    return row


def _full_disclosure_row(result: AuditResult, target: float) -> VerdictRow:
    """The attacker with every key: the audit's attackers on the protected templates, and the inverse map learned
    with the key (``scenarios.full_disclosure``)."""
    memory = " (or the sidecar's memory)" if result.protection_is_advface else ""
    row = _reconstruction_row(
        result,
        FULL_DISCLOSURE,
        f"every key and the protection's parameters{memory}: the {result.protection_label} templates",
        "protected",
        target,
    )
    for sc in _runs(result):
        full = sc.full_disclosure
        if full is None:
            continue
        inverse = full.inverse
        words = (
            f"inverse map learned from {full.pairs} pairs made with the key{_on(sc)}: estimates match the raw "
            f"template for {_pct(inverse.template_match_rate)}, faces accepted {_pct(inverse.type1_success)}"
        )
        _add_scenario(row, words, inverse, target, f"inverse map (key held){_on(sc)}")
    return row


def _add_score_exposure(row: VerdictRow, result: AuditResult, target: float) -> None:
    """Fold ``scenarios.score_exposure`` into the API client's row."""
    for sc in _runs(result):
        exposure = sc.score_exposure
        if exposure is None:
            continue
        scores, decisions = exposure.with_scores, exposure.decisions_only
        median = scores.median_queries
        words = (
            (f"{_on(sc).strip()}: " if _on(sc) else "")
            + f"an accepted template rebuilt from scores for {sum(scores.accepted)} of {exposure.victims} victims "
            + (f"(median {median:.0f} queries" if median is not None else "(none")
            + f", cap {exposure.budget}), from decisions only for {sum(decisions.accepted)} of {exposure.victims}; "
            f"faces from them accepted {_pct(exposure.faces.type1_success)}"
        )
        _add_scenario(row, words, exposure.faces, target, f"score exposure{_on(sc)}")


def _encrypted_memory_row(result: AuditResult) -> VerdictRow | None:
    """Attackers B and C against encrypted matching (``encrypted_matching``; None where not asked for)."""
    enc = result.encrypted_matching
    if enc is None:
        return None
    holds = (
        "the encrypted store's database files and a memory dump of the sidecar (public and binding keys, no secret "
        "key), no key-service access"
    )
    target = f"0 of {enc.templates} templates and 0 of {enc.probes} probes recovered (database and memory)"
    if not enc.measured:
        return VerdictRow(ENCRYPTED_MEMORY_THIEF, holds, enc.summary, None, target)
    row = VerdictRow(ENCRYPTED_MEMORY_THIEF, holds, enc.summary, not enc.recovered_any, target)
    if not enc.recovered_any:
        row.recovers += "; attacks' success 0 by construction"
        return row
    for what, judged in (("templates", enc.judged_templates), ("probes", enc.judged_probes)):
        if judged is None:
            continue
        row.recovers += (
            f"; from the recovered {what}: estimates match the raw template for {_pct(judged.template_match_rate)}, "
            f"faces accepted {_pct(judged.type1_success)}"
        )
        system, transfer = judged.type1_success, judged.transfer_type1_success
        if system is not None and (row.type1_system is None or system > row.type1_system):
            row.type1_system, row.best_attacker = system, f"recovered {what} ({judged.decoder})"
        if transfer is not None and (row.type1_transfer is None or transfer > row.type1_transfer):
            row.type1_transfer = transfer
    return row


def build_verdict(result: AuditResult, target_type1: float, store_audited: bool) -> VerdictResult:
    """The verdict rows from what ``result`` measured (the scenarios folded into the insider, API client and full
    disclosure rows)."""
    api = _api_row(result, target_type1)
    _add_score_exposure(api, result, target_type1)
    rows = [
        _thief_row(result),
        _thief_with_keys_row(result, store_audited, target_type1),
        _insider_row(result, target_type1),
        api,
        _full_disclosure_row(result, target_type1),
    ]
    encrypted = _encrypted_memory_row(result)
    return VerdictResult(rows if encrypted is None else [*rows, encrypted])
