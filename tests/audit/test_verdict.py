"""The verdict (advface.audit.stages.verdict) and the field's metrics in the quick audit's report: the first table of
report.html, one row per attacker of the threat model, met / not met against the run's targets; FNMR at FMR with
counts and intervals; D_sys bins and range; BTPBench renewability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advface.audit.results import (
    AuditResult,
    DecoderAttackResult,
    JudgedTemplates,
    KnownPairsPoint,
    ProtectionResult,
    ProtectorSummary,
    ReconstructionResult,
    ScenariosResult,
    SuccessAtFmr,
)
from advface.audit.stages.layers import summarise_layers
from advface.audit.stages.verdict import build_verdict


def rec(rate: float) -> ReconstructionResult:
    at = {label: SuccessAtFmr(rate, None, 0.5, 20.0, 0.6, 10) for label in ("1e-3", "1e-2")}
    return ReconstructionResult(10, 0, 10, 0.5, 20.0, 0.5, at)


def _attack(kind: str, protected: float) -> DecoderAttackResult:
    return DecoderAttackResult(
        kind=kind,
        by_templates={"raw": rec(0.9), "protected": rec(protected), "protected+key": rec(0.0)},
        arch="deconv",
        loss="pixel",
        cached=False,
        trained_on="x",
    )


def test_verdict_marks_each_attacker_against_the_target() -> None:
    result = AuditResult(config={"encoder": "dlib"})
    result.attacks = {"deconv": _attack("decoder", 0.02), "adaptive": _attack("adaptive", 0.3)}
    rows = {row.attacker: row for row in build_verdict(result, 0.05, store_audited=False).rows}
    assert list(rows) == ["thief without keys", "thief with keys", "insider", "API client", "full disclosure"]
    assert rows["thief without keys"].met is None and "not measured" in rows["thief without keys"].recovers
    assert rows["thief with keys"].met is True and rows["thief with keys"].type1_system == 0.0
    assert rows["insider"].met is False and rows["insider"].best_attacker == "adaptive"
    assert rows["API client"].met is None  # no gan-prior attacker ran
    assert rows["full disclosure"].type1_system == 0.3 and rows["full disclosure"].met is False
    assert "transfer judge not run" in rows["full disclosure"].recovers
    assert build_verdict(result, 0.5, store_audited=False).rows[4].met is True


def _audited(method: str, centre: str | None = None) -> AuditResult:
    result = AuditResult(config={"encoder": "dlib"})
    result.attacks = {
        "deconv": _attack("decoder", 0.02),
        "adaptive": _attack("adaptive", 0.3),
        "gan-prior": _attack("gan-prior", 0.01),
    }
    summary = ProtectorSummary(method, "audit flags" if method == "advface" else "--scheme", centre=centre)
    result.protection = ProtectionResult(summary, "ephemeral random key", None, "protected here", False)
    result.layers = summarise_layers(result, None)
    return result


def _words(result: AuditResult) -> str:
    rows = build_verdict(result, 0.05, store_audited=False).rows
    layers = [f"{x.attacker} {x.holds} {x.layer} {x.note or ''}" for x in result.layers.layers] if result.layers else []
    return " | ".join([f"{r.holds} {r.recovers} {r.target}" for r in rows] + layers)


@pytest.mark.parametrize(
    ("method", "centre", "label"),
    [
        ("biohash", "centred: the mean of 9 raw templates", "BioHashing (centred)"),
        ("mlphash", "not centred: templates hashed as they come", "MLP-hash"),
        ("polyprotect", None, "PolyProtect-style"),
        ("command", None, "the --protect-cmd scheme"),
        ("mypkg.scheme:SCHEME", None, "mypkg.scheme:SCHEME"),
    ],
)
def test_the_verdict_of_another_scheme_speaks_of_that_scheme(method: str, centre: str | None, label: str) -> None:
    """No row (nor layer) speaks of AdvFace, its shadows, the sidecar or advface's API when the scheme is another."""
    result = _audited(method, centre)
    words = _words(result)
    for advface_only in ("AdvFace", "shadow", "sidecar", "RPC", "no advface"):
        assert advface_only not in words, advface_only
    rows = {row.attacker: row for row in build_verdict(result, 0.05, store_audited=False).rows}
    assert rows["insider"].holds.startswith(f"{label} templates and (own face, stored template) pairs")
    assert rows["full disclosure"].holds.endswith(f"the {label} templates")
    assert "not audited" in rows["API client"].recovers and rows["API client"].met is True


def test_the_verdict_of_advface_names_advface_its_sidecar_and_api() -> None:
    result = _audited("advface")
    rows = {row.attacker: row for row in build_verdict(result, 0.05, store_audited=False).rows}
    assert rows["insider"].holds.startswith("AdvFace templates")
    assert "sidecar's memory" in rows["full disclosure"].holds
    assert "RPCs returning stored templates: none" in rows["API client"].recovers
    assert "no RPC returns a stored template" in rows["API client"].target


def test_the_keyed_scenarios_count_in_the_verdict() -> None:
    """Leaked (raw, stored) pairs under the keyed transform recover more than the adaptive insider: the insider's row
    takes them, names them and fails the target; full disclosure and score exposure absent there leave rows as they
    were."""
    result = _audited("advface")
    before = {row.attacker: row for row in build_verdict(result, 0.05, store_audited=False).rows}
    plain = [KnownPairsPoint(4, JudgedTemplates(0.1, "deconv", rec(0.04)), 0.5)]
    keyed = [
        KnownPairsPoint(k, JudgedTemplates(m, "deconv", rec(r)), 0.1) for k, m, r in ((4, 0.0, 0.0), (256, 0.9, 0.6))
    ]
    result.scenarios = ScenariosResult(
        "protected", "p", known_pairs=plain, keyed=ScenariosResult("protected+key", "p", known_pairs=keyed)
    )
    rows = {row.attacker: row for row in build_verdict(result, 0.05, store_audited=False).rows}
    insider = rows["insider"]
    assert insider.type1_system == 0.6 and insider.met is False
    assert insider.best_attacker == "known pairs (k = 256) under the keyed transform"
    assert "with up to 256 leaked pairs under the keyed transform: estimates match the raw template for 90.0%" in (
        insider.recovers
    )
    assert "with up to 4 leaked pairs: estimates match" in insider.recovers  # the plain run is still reported
    assert rows["full disclosure"].recovers == before["full disclosure"].recovers
    assert rows["API client"].recovers == before["API client"].recovers


@pytest.mark.slow
def test_quick_report_opens_with_the_verdict(quick_report: Path) -> None:
    report = json.loads((quick_report / "report.json").read_text())
    verdict = report["verdict"]
    assert [row["attacker"] for row in verdict] == [
        "thief without keys",
        "thief with keys",
        "insider",
        "API client",
        "full disclosure",
    ]
    target = report["config"]["target_type1"]
    for row in verdict[1:]:
        assert row["met"] == (row["type1_system"] <= target and row["type1_transfer"] <= target) or (
            row["attacker"] == "thief with keys"  # also held to D_sys across tenant keys
        )
    full = verdict[4]
    assert full["type1_system"] == max(a["type1_success"]["protected"] for a in report["attacks"].values())
    page = (quick_report / "report.html").read_text()
    first_table = page.index("<table>")
    assert page.index("id='verdict'") < first_table < page.index("Partial report")
    assert page.index("full disclosure") < page.index("<h2>Data</h2>")


@pytest.mark.slow
def test_quick_report_has_fnmr_at_fmr_and_dsys_bins(quick_report: Path) -> None:
    report = json.loads((quick_report / "report.json").read_text())
    utility = report["utility"]
    for kind in ("raw", "protected", "protected+key"):
        strict, loose = utility["fnmr_at_fmr_1e-4"][kind], utility["fnmr_at_fmr_1e-3"][kind]
        assert strict["fnmr"] >= loose["fnmr"] and loose["fmr_achieved"] <= 1e-3
        lo, hi = loose["fnmr_ci95"]
        assert lo <= loose["fnmr"] <= hi
        # every pair of distinct evaluation photos: at least the verification's mated pairs
        assert loose["genuine_comparisons"] == report["verification"][kind]["mated_pairs"]
    for entry in report["unlinkability"]["details"].values():
        assert entry["bins"] >= 10 and entry["score_range"][0] < entry["score_range"][1]
    sets = report["renewability"]["largest_nonmatching_set"]
    assert sets["advface"]["keys"] == 2 and sets["advface+key"]["keys"] == 2 + report["config"]["link_keys"]
    assert 1 <= sets["advface+key"]["min"] <= sets["advface+key"]["keys"]
    page = (quick_report / "report.html").read_text()
    assert "FNMR at fixed FMR" in page and "Renewability (BTPBench)" in page
