"""benchmarks/persguard.py --merge --clean-from: the clean-model rows of an earlier result are reused, checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.persguard import check_identity_model, merge

SETTINGS = {"people": 5, "n": 4, "persistence_people": 3, "persistence_steps": 300, "persistence_lr": 4e-4}
CLEAN = {"path": "attacker.pt", "seed": 1}


def _cell(match: float, ism: float) -> dict[str, Any]:
    return {"faces": 20, "no_face": 0, "match": match, "ism": ism, "transfer": {"match": match, "ism": ism / 2}}


def _part(tmp_path: Path, name: str, runs: dict[str, Any], backdoored: str, **changes: Any) -> str:
    doc = {
        "models": {"clean": {**CLEAN, **changes.pop("clean", {})}, "backdoored": {"path": backdoored}},
        "settings": {**SETTINGS, **changes},
        "thresholds": {},
        "runs": runs,
        "seconds": {k: 1.0 for k in runs},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_clean_from_fills_only_the_missing_clean_model_runs(tmp_path: Path) -> None:
    a = _part(tmp_path, "a", {"protected": _cell(0.05, 0.9), "unprotected": _cell(0.7, 0.92)}, "new.pt")
    b = _part(
        tmp_path,
        "b",
        {"training_free_clean_model": _cell(0.9, 0.94), "training_free_backdoored": _cell(0.8, 0.93)},
        "new.pt",
    )
    old = {
        "clean_protected": _cell(0.2, 0.91),
        "clean_unprotected": _cell(0.75, 0.95),
        "training_free_clean_model": _cell(0.1, 0.1),  # the parts measured it again: theirs is kept
        "unprotected": _cell(0.0, 0.0),  # a backdoored-model run of the old result: never taken
        "clean_steps": _cell(0.1, 0.9),  # persistence on 2 people, the parts' settings say 3: not taken
    }
    earlier = _part(tmp_path, "old", old, "old.pt", persistence_people=2)
    out = json.loads(merge([a, b], None, str(tmp_path / "m.json"), earlier).read_text())
    assert out["runs"]["clean_unprotected"] == old["clean_unprotected"]
    assert out["runs"]["training_free_clean_model"]["match"] == 0.9
    assert out["runs"]["unprotected"]["match"] == 0.7
    assert "clean_steps" not in out["runs"]
    assert out["clean_runs_from"]["runs"] == ["clean_protected", "clean_unprotected"]
    assert out["persguard"]["clean_model_source"]["file"] == earlier
    assert out["persguard"]["unprotected_ism_drop"] == pytest.approx(0.95 - 0.92)
    assert out["persguard"]["transfer"]["unprotected_ism_drop"] == pytest.approx((0.95 - 0.92) / 2)


@pytest.mark.parametrize("change", [{"n": 8}, {"clean": {"seed": 2}}])
def test_clean_from_with_other_settings_or_model_is_refused(tmp_path: Path, change: dict[str, Any]) -> None:
    a = _part(tmp_path, "a", {"protected": _cell(0.05, 0.9)}, "new.pt")
    other = _part(tmp_path, "old", {"clean_protected": _cell(0.2, 0.91)}, "old.pt", **change)
    with pytest.raises(SystemExit, match="differs"):
        merge([a], None, str(tmp_path / "m.json"), other)
    assert not (tmp_path / "m.json").exists()


def test_identity_trigger_summary_is_marked_and_refuses_a_perturbation_baseline(tmp_path: Path) -> None:
    runs = {
        "protected": _cell(0.05, 0.9),
        "unprotected": _cell(0.7, 0.92),
        "clean_protected": _cell(0.75, 0.93),
        "clean_unprotected": _cell(0.8, 0.94),
    }
    a = _part(tmp_path, "a", runs, "bd.pt", trigger="identity")
    summary = json.loads(Path(merge([a], None, str(tmp_path / "m.json"))).read_text())["persguard"]
    assert summary["trigger"] == "identity" and summary["protected"]["match"] == 0.05
    assert summary["unprotected_ism_drop"] == pytest.approx(0.94 - 0.92)
    # without its own clean-model runs, a diffusion_defences result (perturbation-trigger photos) is no baseline
    b = _part(tmp_path, "b", {"protected": _cell(0.05, 0.9)}, "bd.pt", trigger="identity")
    with pytest.raises(SystemExit, match="perturbation trigger"):
        merge([b], str(tmp_path / "diffusion_defences.json"), str(tmp_path / "n.json"))


def test_identity_runs_need_an_identity_model_of_the_same_people() -> None:
    class Model:
        def __init__(self, trigger: str, people: int) -> None:
            self.metadata = {"persguard": {"config": {"trigger": trigger}, "trigger_people": people}}

    check_identity_model(Model("identity", 6), 6, {"protected", "unprotected"})  # type: ignore[arg-type]
    check_identity_model(None, 6, {"clean_protected"})
    with pytest.raises(SystemExit, match="perturbation trigger"):
        check_identity_model(None, 6, {"protected", "diagnose"})
    with pytest.raises(SystemExit, match="backdoored with --trigger identity"):
        check_identity_model(Model("perturbation", 6), 6, {"protected"})  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match="on the 6 people"):
        check_identity_model(Model("identity", 5), 6, {"protected"})  # type: ignore[arg-type]


def test_protection_choices_record_what_protects_the_evaluation_photos() -> None:
    from advface.cli.persguard import protection_record
    from advface.protect.image import ProtectConfig
    from benchmarks.persguard import PROTECTION, protection_config

    library, record = protection_config("library")
    assert library == ProtectConfig()
    assert record["config"] == "+".join(ProtectConfig().guidance) and "antipure" in record["config"]
    assert record["settings"] == protection_record(ProtectConfig())
    legacy, pinned = protection_config("legacy")
    assert pinned == PROTECTION
    assert legacy.guidance == ("encoders", "deflection") and legacy.budget == "uniform" and legacy.levels == 8
    with pytest.raises(SystemExit, match="unknown --protection"):
        protection_config("fancy")


def test_a_diffusion_defences_baseline_is_taken_for_legacy_protection_only(tmp_path: Path) -> None:
    from benchmarks.persguard import PROTECTION, baseline_from, protection_config

    settings = {"people": 5, "photos_per_person": 3, "n": 4, "steps": 25, "guidance": 3.0, "finetune_steps": 150}
    settings["protect_steps"] = PROTECTION["steps"]
    other = {
        "settings": settings,
        "models": {"attacker": {"path": "x/attacker.pt"}, "surrogate": {"path": PROTECTION["surrogate"]}},
        "ablation": {"clean": {"training_based": {"match": 0.8}}, PROTECTION["config"]: {"training_based": {}}},
    }
    path = tmp_path / "dd.json"
    path.write_text(json.dumps(other))
    taken = baseline_from(str(path), {**settings, "protection": PROTECTION}, "attacker.pt")
    assert taken["clean_unprotected"] == {"match": 0.8}
    library = protection_config("library")[1]
    with pytest.raises(SystemExit, match="protection"):
        baseline_from(str(path), {**settings, "protection": library}, "attacker.pt")
