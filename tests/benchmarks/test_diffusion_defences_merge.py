"""benchmarks/diffusion_defences.py --merge: runs measured in parts make one result with the right summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.diffusion_defences import merge

ANTIPURE = {"identity_encoders": "ensemble", "identity_weight": 2.0, "decoy_weight": 0.0}
MODELS = {"attacker": {"path": "a.pt", "seed": 1}, "surrogate": {"path": "s.pt", "sha256_16": "00", "seed": 0}}


def _cell(match: float) -> dict[str, Any]:
    return {"faces": 40, "no_face": 0, "match": match, "ism": 0.5, "transfer": {"match": match / 2, "ism": 0.1}}


def _run(tmp_path: Path, name: str, ablation: dict[str, Any], **settings: Any) -> str:
    base = {"people": 10, "n": 4, "protect_steps": 60, "purify": "", "classical": "", "default_config": "x"}
    quality = {k: {"psnr_mean": 36.0, "ssim_face_mean": 0.9, "seconds_per_photo_cpu": 20.0} for k in ablation}
    quality.pop("clean", None)
    doc = {"models": MODELS, "settings": {**base, **settings}, "thresholds": {}, "ablation": ablation}
    doc["quality"] = quality
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_merge_unites_parts_and_takes_the_strongest_purification_over_all(tmp_path: Path) -> None:
    default = "encoders+deflection+antipure"
    files = [
        _run(tmp_path, "clean", {"clean": {"training_free": _cell(0.9), "training_based": _cell(0.8)}}),
        _run(tmp_path, "stage12", {"encoders+deflection": {"training_based": _cell(0.25)}}),
        _run(
            tmp_path,
            "based",
            {default: {"training_based": _cell(0.025), "purified_0.1_training_based": _cell(0.05)}},
            antipure=ANTIPURE,
        ),
        _run(
            tmp_path,
            "free",
            {default: {"training_free": _cell(0.0), "purified_0.1_training_free": _cell(0.04)}},
            antipure=ANTIPURE,
        ),
    ]
    out = json.loads(merge(files, default, str(tmp_path / "merged.json")).read_text())
    assert out["settings"]["antipure"] == ANTIPURE
    assert set(out["ablation"]) == {"clean", "encoders+deflection", default}
    assert out["training_based"]["protected"]["match"] == 0.025
    assert out["training_free"]["protected"]["match"] == 0.0
    assert out["training_based"]["clean"]["match"] == 0.8
    # the strongest purification is chosen over both parts, not taken from the last one merged
    assert out["purified"]["protected"] == {"match": 0.05, "threat": "purified_0.1_training_based"}
    assert out["transfer"]["purified"]["protected"]["match"] == 0.025


def test_the_cost_is_cpu_seconds_on_one_thread_and_wall_seconds_on_more(tmp_path: Path) -> None:
    default = "encoders+deflection+antipure"
    files = [_run(tmp_path, "based", {default: {"training_based": _cell(0.0)}})]
    for threads, expected, measure in ((1, 20.0, "CPU seconds, one thread"), (2, 26.0, "wall seconds, 2 threads")):
        timing = {"seconds_per_photo_mean": 26.0, "cpu_seconds_per_photo_mean": 20.0 * threads}
        cost = tmp_path / f"cost{threads}.json"
        cost.write_text(json.dumps({"settings": {"threads": threads}, "guidance": {default.replace("+", ","): timing}}))
        out = json.loads(merge(files, default, str(tmp_path / f"m{threads}.json"), cost=str(cost)).read_text())
        assert out["seconds_per_photo_cpu"] == expected
        assert out["quality"][default]["cost_from"]["measure"] == measure
        assert out["quality"][default]["seconds_per_photo_wall_shared"] == 20.0  # the run's own, kept beside it


def test_merge_refuses_antipure_runs_with_different_settings(tmp_path: Path) -> None:
    default = "encoders+deflection+antipure"
    files = [
        _run(tmp_path, "w2", {default: {"training_based": _cell(0.0)}}, antipure=ANTIPURE),
        _run(tmp_path, "w1", {default: {"training_free": _cell(0.0)}}, antipure={**ANTIPURE, "identity_weight": 1.0}),
    ]
    with pytest.raises(SystemExit, match="differ in settings"):
        merge(files, default, str(tmp_path / "merged.json"))


def test_merge_takes_a_budget_from_protected_parts_and_refuses_mixed_budgets(tmp_path: Path) -> None:
    default = "encoders+deflection+antipure"
    ssim = {"name": "ssim", "epsilon": "8/255", "ssim_target": 0.97}
    clean = _run(tmp_path, "clean", {"clean": {"training_based": _cell(0.8)}})  # no protection: its budget is moot
    based = _run(tmp_path, "based", {default: {"training_based": _cell(0.05)}}, antipure=ANTIPURE, budget=ssim)
    free = _run(tmp_path, "free", {default: {"training_free": _cell(0.0)}}, antipure=ANTIPURE, budget=ssim)
    out = json.loads(merge([clean, based, free], default, str(tmp_path / "merged.json")).read_text())
    assert out["settings"]["budget"] == ssim
    assert out["training_based"]["protected"]["match"] == 0.05
    uniform = _run(tmp_path, "uniform", {default: {"training_free": _cell(0.0)}}, antipure=ANTIPURE)  # the default
    with pytest.raises(SystemExit, match="differ in settings"):
        merge([clean, based, uniform], default, str(tmp_path / "mixed.json"))


def test_merge_takes_the_encoder_weight_from_protected_parts_and_refuses_mixed_weights(tmp_path: Path) -> None:
    default = "encoders+deflection+antipure"
    ssim = {"name": "ssim", "epsilon": "12/255", "ssim_target": 0.97}
    clean = _run(tmp_path, "clean", {"clean": {"training_based": _cell(0.8)}})  # no encoder weight recorded
    parts = [
        _run(tmp_path, f"w3{k}", {default: {threat: _cell(0.0)}}, antipure=ANTIPURE, budget=ssim, encoder_weight=3.0)
        for k, threat in enumerate(("training_based", "training_free"))
    ]
    out = json.loads(merge([clean, *parts], default, str(tmp_path / "merged.json")).read_text())
    assert out["settings"]["encoder_weight"] == 3.0
    weight1 = _run(tmp_path, "w1", {default: {"training_free": _cell(0.0)}}, antipure=ANTIPURE, budget=ssim)
    with pytest.raises(SystemExit, match="differ in settings"):
        merge([clean, parts[0], weight1], default, str(tmp_path / "mixed.json"))


def test_a_persguard_result_of_another_model_or_protection_is_refused(tmp_path: Path) -> None:
    default = "encoders+deflection+antipure"
    files = [_run(tmp_path, "based", {default: {"training_based": _cell(0.05)}}, budget={"name": "ssim"})]
    block = {"protected": {"match": 0.0}, "transfer": {"protected": {"match": 0.05}}}

    def persguard(name: str, attacker: str = "dir/a.pt", **settings: Any) -> str:
        path = tmp_path / f"{name}.json"
        doc = {"persguard": block, "models": {"clean": {"path": attacker}}, "settings": settings}
        path.write_text(json.dumps(doc))
        return str(path)

    library = {"config": default, "settings": {"budget": "ssim"}, "surrogate_sha256_16": "00"}
    out = merge(files, default, str(tmp_path / "m.json"), persguard=persguard("ok", protection=library))
    merged = json.loads(out.read_text())
    assert merged["persguard"]["protected"]["match"] == 0.0 and merged["transfer"]["persguard"]["protected"]
    bad = [
        (persguard("model", "other.pt", protection=library), "another attacker model"),
        (
            persguard("stages", protection={**library, "config": "encoders+deflection"}),
            r"with encoders\+deflection under",
        ),
        (persguard("legacy", protection={"config": default}), "uniform budget"),  # legacy record: no budget named
        (persguard("surrogate", protection={**library, "surrogate_sha256_16": "01"}), "another defender surrogate"),
        # a record from before surrogates were recorded: the 64-px surrogate of 2026-12-05 to -07, not this one
        (persguard("unrecorded", protection={k: v for k, v in library.items() if k != "surrogate_sha256_16"}), "0439"),
    ]
    for path, message in bad:
        with pytest.raises(SystemExit, match=message):
            merge(files, default, str(tmp_path / "n.json"), persguard=path)
    # the identity trigger protects nothing: its protection record is not compared
    identity = persguard("identity", trigger="identity", protection={"config": "encoders+deflection"})
    assert merge(files, default, str(tmp_path / "i.json"), persguard=identity).is_file()
