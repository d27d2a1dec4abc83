"""End-to-end ``advface audit --quick`` on a tiny LFW subset: both report files, the JSON keys checks rely on,
a self-contained HTML page with its plots, and cached attackers on a re-run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from audit_helpers import run_quick_audit

from advface.audit import QUICK_ATTACKERS

pytestmark = pytest.mark.slow  # the session's quick audit run (~20 s on 2 cores)


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _rate(value: object) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_quick_audit_writes_json_with_required_keys(quick_report: Path) -> None:
    report = _report(quick_report)
    assert set(report["attacks"]) == set(QUICK_ATTACKERS)
    for name, entry in report["attacks"].items():
        for setting in ("raw", "protected", "protected+key"):
            assert _rate(entry["type1_success"][setting]), (name, setting)
            for fmr in ("fmr_1e-3", "fmr_1e-2"):
                assert _rate(entry[setting][fmr]["type1_success"])
            assert -1.0 <= entry[setting]["ssim"] <= 1.0 and math.isfinite(entry[setting]["psnr"])
        # a lower threshold (FMR 1%) never accepts fewer reconstructions than FMR 0.1%
        assert entry["raw"]["fmr_1e-2"]["type1_success"] >= entry["raw"]["fmr_1e-3"]["type1_success"]
    d_sys = report["unlinkability"]["d_sys"]
    assert _rate(d_sys["advface"]) and _rate(d_sys["advface+key"])
    # other photos of the same people, unprotected, are linkable by the face matcher; the key must lower that
    assert d_sys["raw"] > 0.5
    assert d_sys["advface+key"] < d_sys["raw"]
    # the key's D_sys over three pairs of tenant keys (quick mode): the first pair is the one above, the others differ
    across = report["unlinkability"]["advface+key_across_keys"]
    assert across["key_pairs"] == 3 and across["d_sys"][0] == d_sys["advface+key"]
    assert len(set(across["d_sys"])) > 1 and all(_rate(v) and v < d_sys["raw"] for v in across["d_sys"])
    assert across["max"] == max(across["d_sys"])
    assert 0 <= across["above_noise_p95"] <= 3
    assert report["unlinkability"]["key_meets_target"] == (across["max"] <= 0.05)
    assert set(report["renewability"]["d_sys"]) == {"advface", "advface+key"}
    for setting in ("raw", "protected", "protected+key"):
        v = report["verification"][setting]
        assert _rate(v["accuracy_mean"]) and _rate(v["tar_at_far_1e-2"]) and _rate(v["tar_at_far_1e-3"])
    assert report["thresholds"]["1e-2"] <= report["thresholds"]["1e-3"]


def test_quick_audit_layers_name_every_attacker_of_the_threat_model(quick_report: Path) -> None:
    report = _report(quick_report)
    layers = {layer["attacker"]: layer for layer in report["layers"]}
    attacks = report["attacks"]
    insider = layers["insider who can enrol faces and read back stored templates"]
    assert insider["type1_success_max"] == attacks["adaptive"]["type1_success"]["protected"]
    api = layers["client with API access only"]
    assert api["api_stored_vector_rpcs"] == []
    assert api["type1_success_max"] == attacks["gan-prior"]["type1_success"]["protected"]
    every_key = layers["thief with every key, or the sidecar's process memory"]
    assert every_key["type1_success_max"] == max(e["type1_success"]["protected"] for e in attacks.values())
    assert report["protection"]["method"] == "advface" and report["protection"]["source"] == "audit flags"
    page = (quick_report / "report.html").read_text()
    assert "RPCs returning stored templates: none" in page


def test_quick_audit_counts_unreadable_images(quick_report: Path) -> None:
    report = _report(quick_report)
    assert report["data"]["photos_failed"] == 1
    assert "unreadable" in report["data"]["failed_examples"]["Zz_Broken_Person/Zz_Broken_Person_0001.jpg"]
    assert any(m["stage"] == "data" and "unreadable" in m["reason"] for m in report["missing"])


def test_quick_audit_html_is_self_contained_with_plots(quick_report: Path) -> None:
    page = (quick_report / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= 5  # ROC/DET, histograms, D(s), GAN progress, image grid
    assert all(len(b) > 1000 for b in images)
    assert not re.search(r"(src|href)=['\"]https?:", page)
    for name in QUICK_ATTACKERS:
        assert name in page
    assert "image grid" in page


def test_rerun_loads_cached_attackers(
    quick_report: Path, audit_dataset: Path, audit_cache: Path, tmp_path: Path
) -> None:
    assert run_quick_audit(audit_dataset, audit_cache, tmp_path, "--attackers", "deconv", "--no-images") == 0
    again = _report(tmp_path)
    first = _report(quick_report)
    assert again["attacks"]["deconv"]["cached"] is True
    assert again["attacks"]["deconv"]["raw"] == first["attacks"]["deconv"]["raw"]
    assert "image grid" not in (tmp_path / "report.html").read_text()
