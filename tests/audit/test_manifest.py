"""The reproducibility bundle (advface.audit.manifest): secrets redacted, a dataset manifest that changes with the
files, the code revision, and the manifest.json the quick audit writes beside its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advface.audit.manifest import REDACTED, RunLog, build_manifest, code_revision, dataset_manifest, redact


def test_redact_hides_secret_settings_and_url_passwords() -> None:
    config = {
        "store": "postgresql://audit:hunter2@db.example/advface",
        "nested": {"api_token": "abc", "password": "pw", "secret_file": None, "seed": 3},
        "list": ["https://u:p4ss@host/x", "plain"],
    }
    out = redact(config)
    text = json.dumps(out)
    assert "hunter2" not in text and "p4ss" not in text and '"abc"' not in text and '"pw"' not in text
    assert out["store"] == f"postgresql://audit:{REDACTED}@db.example/advface"
    assert out["nested"] == {"api_token": REDACTED, "password": REDACTED, "secret_file": None, "seed": 3}
    assert out["list"] == [f"https://u:{REDACTED}@host/x", "plain"]


def test_dataset_manifest_hashes_names_and_sizes(tmp_path: Path) -> None:
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "a1.jpg").write_bytes(b"x" * 10)
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "b1.jpg").write_bytes(b"yy")
    first = dataset_manifest(tmp_path)
    assert first["file_count"] == 2 and first["total_bytes"] == 12 and "file_sha256" not in first
    assert dataset_manifest(tmp_path)["names_and_sizes_sha256"] == first["names_and_sizes_sha256"]
    (tmp_path / "B" / "b1.jpg").write_bytes(b"yyy")  # a size change shows
    assert dataset_manifest(tmp_path)["names_and_sizes_sha256"] != first["names_and_sizes_sha256"]
    full = dataset_manifest(tmp_path, file_hashes=True)
    assert set(full["file_sha256"]) == {"A/a1.jpg", "B/b1.jpg"}
    assert all(len(h) == 64 for h in full["file_sha256"].values())


def test_code_revision_outside_git_is_unknown(tmp_path: Path) -> None:
    from advface import __version__

    assert code_revision(tmp_path) == {"revision": "unknown", "dirty": None, "package_version": __version__}


def test_build_manifest_names_keys_by_id_only(tmp_path: Path) -> None:
    class Config:
        data = tmp_path

    report = tmp_path / "report.json"
    report.write_text("{}")
    log = RunLog()
    log.stage("inputs", 1.25)
    log.line("hello")
    manifest = build_manifest(
        config=Config(),
        config_summary={"data": str(tmp_path), "password": "pw"},
        report_files={"json": report},
        keys={"database A": "0123456789abcdef"},
        cache_keys={"deconv": "deconv-32px-e2-s0-abc"},
        seeds={"audit": 0},
        run_log=log,
        revision={"revision": "unknown", "dirty": None, "package_version": "0"},
    )
    assert manifest["config"]["password"] == REDACTED
    assert manifest["key_ids"] == {"database A": "0123456789abcdef"}
    assert manifest["timings_s"]["inputs"] == 1.25 and "total" in manifest["timings_s"]
    assert any(line.endswith("stage inputs: done in 1.2 s") for line in manifest["log"])
    assert manifest["report_files"]["json"]["file"] == "report.json"


@pytest.mark.slow
def test_quick_audit_writes_a_manifest_beside_the_report(quick_report: Path) -> None:
    manifest = json.loads((quick_report / "manifest.json").read_text())
    report = json.loads((quick_report / "report.json").read_text())
    assert manifest["code"]["revision"] == "unknown" or len(manifest["code"]["revision"]) == 40
    assert manifest["config"]["seed"] == report["config"]["seed"]
    # the dataset fixture: 20 + 10 people's photos plus one unreadable file, every file counted
    assert manifest["dataset"]["file_count"] == report["data"]["photos"]
    assert len(manifest["dataset"]["names_and_sizes_sha256"]) == 64
    ids = manifest["key_ids"]
    assert len(ids) == 2 + report["unlinkability"]["advface+key_across_keys"]["key_pairs"]
    assert all(len(v) == 16 for v in ids.values()) and len(set(ids.values())) == len(ids)
    decoders = {n for n, a in report["attacks"].items() if a["kind"] in ("decoder", "adaptive")}
    assert set(manifest["attacker_cache_keys"]) == decoders
    assert manifest["seeds"]["audit"] == 0 and manifest["seeds"]["identity split"] is not None
    assert {"inputs", "protection", "verification", "unlinkability"} <= set(manifest["timings_s"])
    assert any("stage inputs: done" in line for line in manifest["log"])
    import hashlib

    digest = hashlib.sha256((quick_report / "report.json").read_bytes()).hexdigest()
    assert manifest["report_files"]["json"]["sha256"] == digest
