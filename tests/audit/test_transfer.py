"""The transfer judge of ``advface audit``: a second encoder (MobileFaceNet for dlib templates) scores every
attacker's reconstructions at its own thresholds; the chip-frame warp it relies on is checked on real LFW photos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from audit_helpers import run_quick_audit

from advface.audit import QUICK_ATTACKERS
from advface.audit.transfer import chip_frame_matrix, default_transfer_encoder, to_chip_frame
from advface.datasets.pairs import resize_faces
from advface.encoders.base import ChipSpec

KINDS = ("raw", "protected", "protected+key")


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _rate(value: object) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_default_judge_is_the_other_encoder() -> None:
    assert default_transfer_encoder("dlib") == "mobilefacenet"
    assert default_transfer_encoder("dlib-torch") == "mobilefacenet"
    assert default_transfer_encoder("mobilefacenet") == "dlib"


def test_chip_frame_matrix_maps_one_template_onto_the_other() -> None:
    from advface.faces.align import apply_matrix, arcface_template, dlib_chip_template

    dlib_chip, arcface_chip = ChipSpec("dlib", 150, 0.25), ChipSpec("arcface", 112)
    matrix = chip_frame_matrix(dlib_chip, 64, arcface_chip)
    moved = apply_matrix(matrix, dlib_chip_template(64, 0.25))
    # a similarity fit of two different five-point layouts: close, not exact (about 2 px on a 112 chip at worst)
    error = np.linalg.norm(moved - arcface_template(112), axis=1)
    assert error.max() < 2.5 and error[:2].max() < 1.0  # the eyes within a pixel
    assert to_chip_frame(np.zeros((2, 64, 64, 3), np.uint8), dlib_chip, arcface_chip).shape == (2, 112, 112, 3)


@pytest.mark.slow
def test_dlib_chip_warped_to_the_mobilefacenet_frame_matches_its_own_chip(
    lfw_sample: list[Path], models_dir: Path
) -> None:
    """A dlib chip (at the decoders' sizes) warped into MobileFaceNet's frame is embedded by MobileFaceNet close to
    MobileFaceNet's own chip of the same photo, and the reverse warp is close for dlib too."""
    from advface.encoders import create_encoder
    from advface.faces import FaceChipper
    from advface.images import load_image

    mfn = create_encoder("mobilefacenet", models_dir=str(models_dir))
    dlib = create_encoder("dlib-torch")
    for photo in lfw_sample[:3]:
        image = load_image(photo)
        (_, dlib_chip), *_ = FaceChipper("dlib", dlib.chip).chips(image, str(photo))
        (_, mfn_chip), *_ = FaceChipper("dlib", mfn.chip).chips(image, str(photo))
        own = mfn.embed(mfn_chip)[0]
        for size in (150, 64):
            small = resize_faces(dlib_chip[None], size)
            warped = to_chip_frame(small, dlib.chip, mfn.chip)
            assert _cosine(mfn.embed(warped)[0], own) > 0.8, (photo.name, size)
        back = to_chip_frame(mfn_chip[None], mfn.chip, dlib.chip)
        distance = float(np.linalg.norm(dlib.embed(back)[0] - dlib.embed(dlib_chip)[0]))
        assert distance < 0.4, photo.name  # dlib's same-person threshold is 0.6


@pytest.mark.slow
def test_quick_audit_has_transfer_numbers(quick_report: Path, models_dir: Path) -> None:
    report = _report(quick_report)
    judge = report["thresholds"]["transfer"]
    from advface.encoders import create_encoder

    assert judge["encoder"] == "mobilefacenet"
    assert judge["fingerprint"] == create_encoder("mobilefacenet", models_dir=str(models_dir)).fingerprint
    assert math.isfinite(judge["1e-3"]) and math.isfinite(judge["1e-2"]) and judge["1e-2"] <= judge["1e-3"]
    assert judge["photos"] > 0
    assert not any(m["stage"] == "transfer judge" for m in report["missing"])
    assert set(report["attacks"]) == set(QUICK_ATTACKERS)
    for name, entry in report["attacks"].items():
        for kind in KINDS:
            transfer = entry[kind]["transfer"]
            assert 0 < transfer["type1_n"] <= entry[kind]["n"], (name, kind)
            for fmr in ("fmr_1e-3", "fmr_1e-2"):
                assert _rate(transfer[fmr]["type1_success"]), (name, kind, fmr)
                assert _rate(transfer[fmr]["type2_success"]), (name, kind, fmr)
                assert transfer[fmr]["threshold"] == judge[fmr.removeprefix("fmr_")]
            strict, loose = transfer["fmr_1e-3"], transfer["fmr_1e-2"]
            assert loose["type1_success"] >= strict["type1_success"]
    page = (quick_report / "report.html").read_text()
    assert "Transfer judge <code>mobilefacenet</code>" in page
    assert "Type I @FMR 0.1% (mobilefacenet)" in page


def _deconv_audit(audit_dataset: Path, audit_cache: Path, out: Path, *extra: str) -> dict:
    assert run_quick_audit(audit_dataset, audit_cache, out, "--attackers", "deconv", "--no-images", *extra) == 0
    return _report(out)


@pytest.mark.slow
def test_transfer_encoder_none_leaves_the_judge_out(audit_dataset: Path, audit_cache: Path, tmp_path: Path) -> None:
    report = _deconv_audit(audit_dataset, audit_cache, tmp_path, "--transfer-encoder", "none")
    assert report["config"]["transfer_encoder"] == "none"
    assert "transfer" not in report["thresholds"]
    assert all("transfer" not in report["attacks"]["deconv"][kind] for kind in KINDS)
    assert not any(m["stage"] == "transfer judge" for m in report["missing"])
    page = (tmp_path / "report.html").read_text()
    assert "no transfer judge" in page and "Transfer judge" not in page


@pytest.mark.slow
def test_missing_judge_model_is_listed_and_the_report_written(
    audit_dataset: Path, audit_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "no_models"
    empty.mkdir()
    monkeypatch.setenv("ADVFACE_MODELS_DIR", str(empty))
    report = _deconv_audit(audit_dataset, audit_cache, tmp_path / "out")
    missing = [m for m in report["missing"] if m["stage"] == "transfer judge"]
    assert len(missing) == 1 and "mobilefacenet_128d.onnx" in missing[0]["reason"]
    assert "transfer" not in report["thresholds"]
    assert _rate(report["attacks"]["deconv"]["raw"]["type1_success"])
    assert "transfer" not in report["attacks"]["deconv"]["raw"]
    assert "verification" in report and "unlinkability" in report
