"""Layered-secrets summary: each attacker of the threat model against the layer that should stop it, with the
audit's numbers (best Type I at FMR 0.1% over the attackers run, vectors recovered without keys)."""

from __future__ import annotations

from typing import Any

from advface.audit.results import AuditResult, BestAttack, LayerResult, LayersResult


def best_attack(result: AuditResult, templates: str, kind: str | None = None) -> BestAttack:
    """Type I success of the attackers (of ``kind``, default all) that ran on ``templates``."""
    return BestAttack(
        templates,
        {
            name: attack.type1_success[templates]
            for name, attack in result.attacks.items()
            if templates in attack.by_templates and (kind is None or attack.kind == kind)
        },
    )


def _thief_layer(result: AuditResult, store: Any) -> LayerResult:
    layer = LayerResult(
        "database thief without keys", "the database file(s), a backup or a dump; no key", "encryption at rest"
    )
    thief = result.thief_without_keys
    if thief is not None:
        layer.thief, layer.note = thief, thief.summary
    else:
        layer.note = (
            "not measured: no store audited (--store)"
            if store is None
            else "not measured: the thief scan failed (see missing)"
        )
    return layer


def _transform_key_layer(result: AuditResult, store: Any) -> LayerResult:
    store_transform = result.protection is not None and result.protection.store_keyed_transform
    if store is not None and not store_transform:
        best = best_attack(result, "protected")
        note = (
            f"the store has no keyed transform: the thief holds the stored {result.protection_label} templates "
            "(protected); "
            "protected+key shows what the keyed transform would add"
        )
    else:
        best = best_attack(result, "protected+key")
        note = (
            "the store's templates as stored, i.e. after its keyed transform"
            if store_transform
            else "keyed transform simulated by the audit on the protected templates"
        )
    return LayerResult(
        "thief with the database (and the encryption key), without the transform key",
        "stored templates",
        f"keyed per-tenant transform, then {result.protection_label}",
        best=best,
        note=note,
    )


def _insider_layer(result: AuditResult) -> LayerResult:
    best = best_attack(result, "protected", "adaptive")
    note = (
        "the adaptive attacker: trains on (own embedding, protected template) pairs of its own enrolments; a "
        "keyed transform does not stop it (its own pairs reveal the linear map)"
        if best.type1_success
        else "not measured: no adaptive attacker in --attackers"
    )
    return LayerResult(
        "insider who can enrol faces and read back stored templates",
        f"{result.protection_label} templates + its own enrolments",
        result.protection_label,
        best=best,
        note=note,
    )


def api_only_layer(search: BestAttack, scheme: str | None = None) -> LayerResult:
    """The client with API access only: which RPCs return vectors (:mod:`advface.audit.api_surface`), and the
    GAN-prior search on the protected templates (``search``) as the bound of a score-oracle search. ``scheme``: the
    name of another scheme under audit, whose serving API advface's surface does not describe (not audited)."""
    from advface.audit.api_surface import api_exposure

    api = api_exposure()
    leaks = api["stored_vectors"]
    if scheme is not None:
        note = f"how the {scheme} deployment answers its clients is not audited here; "
    else:
        note = (
            "stored templates returned by the API: "
            + (", ".join(leaks) if leaks else "none")
            + f" (vectors only in {', '.join(api['caller_input_vectors']) or 'no RPC'}, computed from the caller's "
            f"own input); scores returned by {', '.join(api['score_rpcs'])}: a client searching a face whose "
            "score rises needs one query per step; "
        )
    if search.type1_success:
        note += (
            "the GAN-prior search with the protected template in hand (gradients, no query limit) bounds "
            "such a search with the same prior"
        )
    else:
        note += "score-oracle bound not measured: no gan-prior attacker in --attackers"
    return LayerResult(
        "client with API access only",
        "match scores of its own probes",
        "the API returns no stored template" if scheme is None else f"the {scheme} deployment's API (not audited)",
        api=api,
        best=search,
        note=note,
    )


def summarise_layers(result: AuditResult, store: Any) -> LayersResult:
    """The layers of the threat model from the audit's results so far; ``store``: the audited store's
    :class:`advface.audit.store.StoreInfo` (None without a store)."""
    label, advface = result.protection_label, result.protection_is_advface
    return LayersResult(
        [
            _thief_layer(result, store),
            _transform_key_layer(result, store),
            LayerResult(
                "thief with every key" + (", or the sidecar's process memory" if advface else ""),
                f"{label} templates",
                label,
                best=best_attack(result, "protected"),
            ),
            _insider_layer(result),
            api_only_layer(best_attack(result, "protected", "gan-prior"), None if advface else label),
            LayerResult(
                "no advface (baseline)" if advface else "no protection (baseline)",
                "raw embeddings",
                "none",
                best=best_attack(result, "raw"),
            ),
        ]
    )
