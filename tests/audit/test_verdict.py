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
    ReconstructionResult,
    SuccessAtFmr,
)
from advface.audit.stages.verdict import build_verdict


def _attack(kind: str, protected: float) -> DecoderAttackResult:
    def rec(rate: float) -> ReconstructionResult:
        at = {label: SuccessAtFmr(rate, None, 0.5, 20.0, 0.6, 10) for label in ("1e-3", "1e-2")}
        return ReconstructionResult(10, 0, 10, 0.5, 20.0, 0.5, at)

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
