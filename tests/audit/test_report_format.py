"""``report.json`` keeps its format across the typed results (advface.audit.results): the quick audit's report has
the keys, key order and value types that the audit wrote before its results were typed (format 1, recorded from a
quick run of that code on the same dataset), plus ``format_version`` first (2), the transfer judge's keys (3) and the
field's metrics and verdict (4), the scenarios (5), the scenarios under the keyed transform (6) and
``config.matching`` (7; ``encrypted_matching`` only with ``--matching encrypted``, see test_encrypted_matching.py):
added keys only, every format-1 key keeps its place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from advface.audit.results import FORMAT_VERSION, AuditResult

# Expected shapes: a dict lists its keys in order with the shape of each value; a type is the JSON value's Python
# type (``list`` / ``dict``: any list / dict); ``[T]``: a non-empty list of T; a list of dicts: exactly those items.

CONFIG = {
    "data": str,
    "out": str,
    "encoder": str,
    "shadows": list,
    "attackers": str,
    "cache_dir": str,
    "pairs_cache": bool,
    "quick": bool,
    "image_size": int,
    "epochs": int,
    "batch_size": int,
    "max_identities": int,
    "max_photos": int,
    "per_identity": int,
    "max_victims": int,
    "train_identities": int,
    "gan_templates": int,
    "gan_steps": int,
    "gan_restarts": int,
    "link_keys": int,
    "eval_fraction": float,
    "seed": int,
    "images": bool,
    "workers": int,
    "progress": bool,
}
DATA = {
    "dataset": str,
    "photos": int,
    "identities": int,
    "photos_with_face": int,
    "photos_failed": int,
    "failed_examples": {"Zz_Broken_Person/Zz_Broken_Person_0001.jpg": str},
    "encoder": str,
    "split": {"seed": int, "rule": str, "defender": int, "attacker": int, "evaluation": int},
    "victims": int,
    "single_photo_identities": int,
}
PROTECTION = {
    "method": str,
    "rel_l2": float,
    "steps": int,
    "shadows": [str],
    "source": str,
    "key": str,
    "key_norm_equalisation": float,
    "templates": str,
    "store_keyed_transform": bool,
}
AT_FMR = {"type1_success": float, "type2_success": float, "ssim": float, "psnr": float, "threshold": float, "n": int}
PER_TEMPLATES = {
    "n": int,
    "type2_n": int,
    "type2_skipped_single_photo": int,
    "ssim": float,
    "psnr": float,
    "mean_score_to_own": float,
    "fmr_1e-3": AT_FMR,
    "fmr_1e-2": AT_FMR,
    "type1_success": float,
    "type2_success": float,
}
BY_KIND = {"raw": float, "protected": float, "protected+key": float}
ATTACK = {
    "raw": PER_TEMPLATES,
    "protected": PER_TEMPLATES,
    "protected+key": PER_TEMPLATES,
    "type1_success": BY_KIND,
    "type2_success": BY_KIND,
    "kind": str,
}
DECODER = {**ATTACK, "arch": str, "loss": str, "cached": bool, "trained_on": str}
GAN_PRIOR = {**ATTACK, "prior": str, "templates": int, "steps": int, "restarts": int, "similarity_history_raw": [float]}
ATTACKS = {"deconv": DECODER, "resup+id": DECODER, "tokens": DECODER, "gan-prior": GAN_PRIOR, "adaptive": DECODER}
VERIFICATION_ENTRY = {
    "accuracy_mean": float,
    "accuracy_std": float,
    "tar_at_far_1e-3": float,
    "threshold_at_far_1e-3": float,
    "tar_at_far_1e-2": float,
    "threshold_at_far_1e-2": float,
    "mated_pairs": int,
    "nonmated_pairs": int,
}
VERIFICATION = {
    "raw": VERIFICATION_ENTRY,
    "protected": VERIFICATION_ENTRY,
    "protected+key": VERIFICATION_ENTRY,
    "accuracy_change_points": {"protected": float, "protected+key": float},
    "key_accuracy_change_vs_protected_points": float,
}
LINKAGE = {"d_sys": float, "noise_floor": float, "noise_floor_p95": float, "n_mated": int, "n_nonmated": int}
UNLINKABILITY = {
    "d_sys": {"raw": float, "advface": float, "advface+key": float},
    "details": {"raw": LINKAGE, "advface": LINKAGE, "advface+key": LINKAGE},
    "advface+key_across_keys": {
        "key_pairs": int,
        "d_sys": [float],
        "mean": float,
        "max": float,
        "noise_floor_mean": float,
        "above_noise_p95": int,
    },
    "protection": str,
    "protocol": str,
    "target_d_sys_max": float,
    "key_meets_target": bool,
}
RENEWABILITY = {
    "d_sys": {"advface": float, "advface+key": float},
    "details": {"advface": LINKAGE, "advface+key": LINKAGE},
    "protocol": str,
}
LAYER = {"attacker": str, "holds": str, "layer": str}
ALL_ATTACKERS = {name: float for name in ATTACKS}
BEST = {"templates": str, "type1_success_max": float}
LAYERS = [
    {**LAYER, "note": str},
    {**LAYER, **BEST, "type1_success": ALL_ATTACKERS, "note": str},
    {**LAYER, **BEST, "type1_success": ALL_ATTACKERS},
    {**LAYER, **BEST, "type1_success": {"adaptive": float}, "note": str},
    {**LAYER, "api_stored_vector_rpcs": list, "api": dict, **BEST, "type1_success": {"gan-prior": float}, "note": str},
    {**LAYER, **BEST, "type1_success": ALL_ATTACKERS},
]
#: ``report.json`` of ``advface audit --quick`` on the audit_dataset fixture, as format 1 wrote it.
QUICK_REPORT_FORMAT_1 = {
    "config": CONFIG,
    "missing": [{"stage": str, "reason": str}],
    "data": DATA,
    "thresholds": {"1e-3": float, "1e-2": float},
    "protection": PROTECTION,
    "attacks": ATTACKS,
    "verification": VERIFICATION,
    "unlinkability": UNLINKABILITY,
    "renewability": RENEWABILITY,
    "layers": LAYERS,
    "date": str,
    "seconds": float,
}


# Format 3: format 1 plus the transfer judge (``config.transfer_encoder``, ``thresholds.transfer``, a ``transfer``
# entry after the headline rates of each attacker's template kinds).
TRANSFER_AT_FMR = {"type1_success": float, "type2_success": float, "threshold": float}
TRANSFER = {
    "type1_n": int,
    "type2_n": int,
    "mean_score_to_own": float,
    "fmr_1e-3": TRANSFER_AT_FMR,
    "fmr_1e-2": TRANSFER_AT_FMR,
}
PER_TEMPLATES_3 = {**PER_TEMPLATES, "transfer": TRANSFER}
ATTACKS_3 = {
    name: {**shape, **{kind: PER_TEMPLATES_3 for kind in ("raw", "protected", "protected+key")}}
    for name, shape in ATTACKS.items()
}
CONFIG_3 = {k: v for k, v in CONFIG.items() if k in ("data", "out", "encoder")}
CONFIG_3["transfer_encoder"] = str
CONFIG_3.update(CONFIG)
QUICK_REPORT_FORMAT_3 = {
    **QUICK_REPORT_FORMAT_1,
    "config": CONFIG_3,
    "thresholds": {
        "1e-3": float,
        "1e-2": float,
        "transfer": {"encoder": str, "fingerprint": str, "photos": int, "1e-3": float, "1e-2": float},
    },
    "attacks": ATTACKS_3,
}


# Format 4: format 3 plus ``config.manifest_hashes`` / ``config.target_type1``, ``utility`` (FNMR at FMR 0.1% and
# 0.01%), each D_sys's bins and score range, BTPBench renewability and the ``verdict``.
FNMR = {
    "fnmr": float,
    "fnmr_ci95": [float],
    "threshold": float,
    "fmr_achieved": float,
    "genuine_comparisons": int,
    "impostor_comparisons": int,
    "impostors_sufficient": bool,
}
BY_KIND_FNMR = {"raw": FNMR, "protected": FNMR, "protected+key": FNMR}
UTILITY = {"fnmr_at_fmr_1e-3": BY_KIND_FNMR, "fnmr_at_fmr_1e-4": BY_KIND_FNMR, "protocol": str, "interval": str}
LINKAGE_4 = {**LINKAGE, "bins": int, "score_range": [float]}
NONMATCHING = {"keys": int, "people": int, "threshold": float, "min": int, "mean": float, "all_keys_fraction": float}
VERDICT_ROW = {"attacker": str, "holds": str, "recovers": str, "met": bool, "target": str}
MEASURED = {**VERDICT_ROW, "type1_system": float, "type1_transfer": float, "best_attacker": str}
NOT_MEASURED = {**VERDICT_ROW, "met": type(None), "type1_system": type(None), "type1_transfer": type(None)}
QUICK_REPORT_FORMAT_4 = {
    **QUICK_REPORT_FORMAT_3,
    "config": {**CONFIG_3, "manifest_hashes": bool, "target_type1": float},
    "utility": UTILITY,
    "unlinkability": {**UNLINKABILITY, "details": {"raw": LINKAGE_4, "advface": LINKAGE_4, "advface+key": LINKAGE_4}},
    "renewability": {
        "d_sys": {"advface": float, "advface+key": float},
        "details": {"advface": LINKAGE_4, "advface+key": LINKAGE_4},
        "protocol": str,
        "largest_nonmatching_set": {"advface": NONMATCHING, "advface+key": NONMATCHING},
        "largest_nonmatching_set_protocol": str,
    },
    "verdict": [{**NOT_MEASURED, "best_attacker": type(None)}, MEASURED, MEASURED, MEASURED, MEASURED],
}
# the new sections in the report's order: utility after verification, verdict after layers
QUICK_REPORT_FORMAT_4 = {
    k: QUICK_REPORT_FORMAT_4[k]
    for k in [
        *list(QUICK_REPORT_FORMAT_3)[:7],
        "utility",
        *list(QUICK_REPORT_FORMAT_3)[7:10],
        "verdict",
        "date",
        "seconds",
    ]
}


# Format 5: format 4 plus the scenario settings in ``config`` and ``scenarios`` after the verdict (the known-pairs
# list, whose length depends on the pool, and the searches' per-victim lists are checked apart).
JUDGED = {
    "type1_success": float,
    "type2_success": float,
    "transfer_type1_success": float,
    "template_match_rate": float,
    "decoder": str,
    "faces": PER_TEMPLATES_3,
}
SCENARIOS = {
    "templates": str,
    "protocol": str,
    "full_disclosure": {
        "type1_success": float,
        "type2_success": float,
        "holds": str,
        "inverse": {"pairs": int, **JUDGED},
        "direct": {"best_attacker": str, "type1_success": float, "type2_success": float},
    },
    "known_pairs": list,
    "score_exposure": {
        "victims": int,
        "query_budget": int,
        "threshold": float,
        "with_scores": dict,
        "decisions_only": dict,
        "faces_from_scores": JUDGED,
        "method": str,
    },
}
KNOWN_PAIR = {"k": int, **JUDGED, "relative_error": float}
SEARCH = ["accepted_fraction", "median_queries_to_accept", "queries", "accepted"]
QUICK_REPORT_FORMAT_5 = {
    **QUICK_REPORT_FORMAT_4,
    "config": {
        **QUICK_REPORT_FORMAT_4["config"],
        "scenarios": bool,
        "scenario_pool": int,
        "known_pairs_k": [int],
        "score_victims": int,
        "score_budget": int,
        "pdf": bool,
    },
}
QUICK_REPORT_FORMAT_5 = {
    k: QUICK_REPORT_FORMAT_5.get(k, SCENARIOS)
    for k in [*list(QUICK_REPORT_FORMAT_4)[:-2], "scenarios", "date", "seconds"]
}


# Format 6: format 5 plus the scenarios on the templates under the keyed transform, ``scenarios["protected+key"]``
# (and, for a reference scheme only, ``protection.centre`` and ``config.scheme_centre``: not in this AdvFace run).
QUICK_REPORT_FORMAT_6 = {
    **QUICK_REPORT_FORMAT_5,
    "scenarios": {**SCENARIOS, "protected+key": SCENARIOS},
}


# Format 7: format 6 plus ``config.matching`` (and, with ``--matching encrypted`` only, ``encrypted_matching``: not in
# this run).
_CONFIG_6: dict[str, Any] = QUICK_REPORT_FORMAT_6["config"]  # type: ignore[assignment]
QUICK_REPORT_FORMAT_7: dict[str, Any] = {**QUICK_REPORT_FORMAT_6, "config": {**_CONFIG_6, "matching": str}}


def _only_adds_keys(new: Any, old: Any, path: str = "report") -> None:
    """Every key of the shape ``old`` is in ``new``, in the same order, with a shape that only adds keys."""
    if not isinstance(old, dict):
        assert new == old, path
        return
    assert isinstance(new, dict), path
    assert [k for k in new if k in old] == list(old), f"{path}: format-1 keys moved or missing"
    for key, shape in old.items():
        _only_adds_keys(new[key], shape, f"{path}.{key}")


def test_format_3_only_adds_keys_to_format_1() -> None:
    _only_adds_keys(QUICK_REPORT_FORMAT_3, QUICK_REPORT_FORMAT_1)
    assert QUICK_REPORT_FORMAT_3 != QUICK_REPORT_FORMAT_1


def test_format_4_only_adds_keys_to_format_3() -> None:
    _only_adds_keys(QUICK_REPORT_FORMAT_4, QUICK_REPORT_FORMAT_3)
    assert QUICK_REPORT_FORMAT_4 != QUICK_REPORT_FORMAT_3


def test_format_5_only_adds_keys_to_format_4() -> None:
    _only_adds_keys(QUICK_REPORT_FORMAT_5, QUICK_REPORT_FORMAT_4)
    assert "scenarios" in QUICK_REPORT_FORMAT_5 and "scenarios" not in QUICK_REPORT_FORMAT_4


def test_format_6_only_adds_keys_to_format_5() -> None:
    _only_adds_keys(QUICK_REPORT_FORMAT_6, QUICK_REPORT_FORMAT_5)
    assert QUICK_REPORT_FORMAT_6["scenarios"] == {**SCENARIOS, "protected+key": SCENARIOS}


def test_format_7_only_adds_keys_to_format_6() -> None:
    _only_adds_keys(QUICK_REPORT_FORMAT_7, QUICK_REPORT_FORMAT_6)
    assert QUICK_REPORT_FORMAT_7["config"]["matching"] is str


def assert_shape(value: Any, expected: Any, path: str = "report") -> None:
    """``value`` (parsed JSON) has the shape ``expected`` (see the module's conventions)."""
    if isinstance(expected, dict):
        assert isinstance(value, dict), f"{path}: {type(value).__name__}, not an object"
        assert list(value) == list(expected), f"{path}: keys {list(value)} != {list(expected)}"
        for key, shape in expected.items():
            assert_shape(value[key], shape, f"{path}.{key}")
    elif isinstance(expected, list) and len(expected) == 1 and not isinstance(expected[0], dict):
        assert isinstance(value, list) and value, f"{path}: not a non-empty list"
        for i, item in enumerate(value):
            assert_shape(item, expected[0], f"{path}[{i}]")
    elif isinstance(expected, list):
        assert isinstance(value, list) and len(value) == len(expected), f"{path}: not a list of {len(expected)}"
        for i, (item, shape) in enumerate(zip(value, expected)):
            assert_shape(item, shape, f"{path}[{i}]")
    else:
        assert type(value) is expected, f"{path}: {type(value).__name__} is not {expected.__name__}"


@pytest.mark.slow
def test_quick_report_has_the_format_7_keys_and_a_format_version(quick_report: Path, models_dir: Path) -> None:
    report = json.loads((quick_report / "report.json").read_text())
    assert next(iter(report)) == "format_version" and report["format_version"] == FORMAT_VERSION == 7
    format_7 = {k: v for k, v in report.items() if k != "format_version"}
    assert_shape(format_7, QUICK_REPORT_FORMAT_7)
    assert report["config"]["matching"] == "plain" and "encrypted_matching" not in report
    for scenarios in (report["scenarios"], report["scenarios"]["protected+key"]):
        for point in scenarios["known_pairs"]:
            assert_shape(point, KNOWN_PAIR, "report.scenarios.known_pairs[]")
        for search in ("with_scores", "decisions_only"):
            assert list(scenarios["score_exposure"][search]) == SEARCH
    from advface.audit.api_surface import api_exposure

    assert report["layers"][4]["api"] == api_exposure()


def test_a_report_without_measurements_has_its_format_version() -> None:
    """What a partial report (bad input) holds: the version, the settings, what is missing, the timings."""
    result = AuditResult(config={"data": "x"})
    result.add_missing("inputs", "no dataset")
    result.date, result.seconds = "2024-01-01 00:00 UTC", 0.1
    assert result.to_json() == {
        "format_version": 7,
        "config": {"data": "x"},
        "missing": [{"stage": "inputs", "reason": "no dataset"}],
        "date": "2024-01-01 00:00 UTC",
        "seconds": 0.1,
    }
