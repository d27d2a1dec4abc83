"""benchmarks/photo_quality.py: variant specs become the configs they name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from advface.errors import ConfigError
from advface.protect.image import ProtectConfig
from advface.protect.image.visibility import visibility
from benchmarks.photo_quality import (
    VISIBILITY_KEYS,
    coarse_face_ssim,
    merge,
    summarise,
    variant_config,
    visibility_numbers,
)


def test_ssim_variant_with_the_whole_photo_constraint_and_a_larger_ball() -> None:
    base = ProtectConfig(steps=60, guidance=("encoders",))
    config = variant_config("ssim:photo_target=0.97,levels=16", base)
    assert config.budget == "ssim" and config.levels == 16 and config.steps == 60
    assert config.ssim.photo_target == pytest.approx(0.97) and config.ssim.target == pytest.approx(0.97)
    assert config.guidance == ("encoders",)
    assert variant_config("ssim", base).ssim.whole_photo_target == pytest.approx(0.97)  # on, at the face target
    assert variant_config("ssim:whole_photo=0", base).ssim.whole_photo_target is None  # the face box alone
    assert variant_config("ssim:target=0.95,whole_photo=true", base).ssim.whole_photo_target == pytest.approx(0.95)
    config.validate()


def test_unknown_or_misplaced_keys_are_refused() -> None:
    base = ProtectConfig()
    with pytest.raises(SystemExit, match="photo_targt"):
        variant_config("ssim:photo_targt=0.97", base)
    with pytest.raises(SystemExit, match="photo_target"):
        variant_config("uniform:photo_target=0.97", base)  # the uniform budget has no SSIM constraint
    with pytest.raises(SystemExit, match="whole_photo"):
        variant_config("ssim:whole_photo=maybe", base)


def test_scales_variant_and_the_coarse_face_ssim() -> None:
    base = ProtectConfig(guidance=("encoders",))
    config = variant_config("ssim:scales=3", base)
    assert config.ssim.scales == 3 and isinstance(config.ssim.scales, int)
    config.validate()
    with pytest.raises(SystemExit, match="scales.*integer"):
        variant_config("ssim:scales=2.5", base)
    flat = np.full((64, 64, 3), 120, np.uint8)
    yy, xx = np.mgrid[:64, :64] - 32
    blob = np.clip(flat + 25 * np.exp(-(xx * xx + yy * yy) / 50.0)[..., None], 0, 255).astype(np.uint8)
    same = coarse_face_ssim(flat, flat, (0.0, 0.0, 64.0, 64.0))
    assert same == pytest.approx({"ssim_face_half": 1.0, "ssim_face_quarter": 1.0})
    assert coarse_face_ssim(flat, blob, (0.0, 0.0, 64.0, 64.0))["ssim_face_quarter"] < 0.99


#: One photo's row as photo_row writes it, without the optional coarse-SSIM and visibility numbers.
ROW: dict[str, Any] = {
    "psnr": 40.0,
    "ssim": 0.99,
    "ssim_face": 0.97,
    "gmsd": 0.02,
    "delta_e2000": 0.7,
    "changed_share": 0.5,
    "mean_abs_levels": 1.0,
    "seconds": 10.0,
    "similarity": {"dlib-torch": {"cosine_after": 0.8, "cosine_random": 0.99}},
}


def test_summary_of_rows_without_the_coarse_levels() -> None:
    assert "ssim_face_half" not in summarise([ROW], ["dlib-torch"])  # files written before they were measured
    full = summarise([{**ROW, "ssim_face_half": 0.98, "ssim_face_quarter": 0.99}], ["dlib-torch"])
    assert full["ssim_face_quarter"]["mean"] == pytest.approx(0.99)
    assert "vis_above_jnd_face" not in full


def test_visibility_numbers_reach_the_summary() -> None:
    flat = np.full((64, 64, 3), 120, np.uint8)
    changed = flat.copy()
    changed[20:40, 20:40] += 6
    numbers = visibility_numbers(visibility(flat, changed, (16.0, 16.0, 48.0, 48.0)))
    assert set(numbers) == set(VISIBILITY_KEYS)
    assert 0 < numbers["vis_above_jnd"] < numbers["vis_above_jnd_face"] <= 1  # the change is inside the box
    assert visibility_numbers(visibility(flat, flat, (16.0, 16.0, 48.0, 48.0)))["vis_pooled_face"] == 0
    summary = summarise([{**ROW, **numbers}, {**ROW, **numbers, "vis_p95_face": 0.0}], ["dlib-torch"])
    assert summary["vis_above_jnd_face"]["mean"] == pytest.approx(numbers["vis_above_jnd_face"])
    assert summary["vis_p95_face"]["mean"] == pytest.approx(numbers["vis_p95_face"] / 2)


def test_jnd_variant() -> None:
    base = ProtectConfig(guidance=("encoders",))
    config = variant_config("jnd:target=1.5,statistic=top,levels=16", base)
    assert config.budget == "jnd" and config.levels == 16
    assert config.jnd.target == pytest.approx(1.5) and config.jnd.statistic == "top"
    assert variant_config("jnd:whole_photo=0", base).jnd.whole_photo_target is None
    config.validate()
    with pytest.raises(SystemExit, match="model"):
        variant_config("jnd:model=1", base)  # the visibility model is not a variant key
    with pytest.raises(ConfigError, match="statistic"):
        variant_config("jnd:statistic=p95", base).validate()


def test_merge_joins_disjoint_parts_and_refuses_overlaps(tmp_path: Path) -> None:

    def part(name: str, photos: list[str], psnr: float) -> Path:
        doc = {
            "command": f"run {name}",
            "encoders": ["dlib-torch"],
            "config": {"steps": 60},
            "photos_run": len(photos),
            "wall_seconds": 1.0,
            "summary": {},
            "grids": [],
            "per_photo": {"uniform": [{"photo": p, **ROW, "psnr": psnr} for p in photos]},
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        return path

    a, b = part("a", ["x.jpg", "y.jpg"], 40.0), part("b", ["z.jpg"], 37.0)
    merge([a, b], tmp_path / "merged.json")
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["photos_run"] == 3 and [p["command"] for p in merged["parts"]] == ["run a", "run b"]
    assert [r["photo"] for r in merged["per_photo"]["uniform"]] == ["x.jpg", "y.jpg", "z.jpg"]
    assert merged["summary"]["uniform"]["psnr"]["mean"] == pytest.approx(39.0)
    with pytest.raises(SystemExit, match="share photos"):
        merge([a, a], tmp_path / "twice.json")
    assert not (tmp_path / "twice.json").exists()


def test_antipure_identity_weight_variant() -> None:
    base = ProtectConfig()
    config = variant_config("ssim:antipure_identity_weight=3", base)
    assert config.antipure.identity_weight == 3.0 and config.budget == "ssim"
    assert config.antipure.frequency_weight == base.antipure.frequency_weight  # the rest of AntiPure as it was
    assert variant_config("ssim", base).antipure == base.antipure
    config.validate()
