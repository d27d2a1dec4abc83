"""The audit's encrypted-matching scenario (``--matching encrypted``): a sidecar-like child process over an encrypted
store is dumped (/proc/PID/mem) and the templates and probes found in its memory and database files are counted;
a deliberately leaky child must be caught, and the audit's row must carry the counts of a real dump."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from audit_helpers import run_quick_audit

from advface.audit.memory_dump import dump_unsupported, read_memory
from advface.audit.recovered import WordIndex, found_coordinates, plaintext_words, plaintexts_found, summarise

pytest.importorskip("tenseal")
needs_proc = pytest.mark.skipif(dump_unsupported() is not None, reason=str(dump_unsupported()))


def _rows(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 128)) * 0.08).astype(np.float32)


def test_found_coordinates_counts_exact_float32_and_float64_values_only() -> None:
    t = _rows(3, 0)
    data = (
        b"\x01" * 8
        + t[0].tobytes()  # row 0 as float32: every coordinate
        + t[1, :64].astype(np.float64).tobytes()  # row 1: half of its coordinates as float64
        + (t[2] + 1e-3).astype(np.float32).tobytes()  # row 2: near values are not found
    )
    hit = found_coordinates(data, t)
    assert hit[0].all() and hit[1, :64].all() and not hit[1, 64:].any() and not hit[2].any()
    assert summarise(hit) == {"half": 2, "full": 1}
    assert (found_coordinates(WordIndex(data), t) == hit).all()
    with pytest.raises(ValueError, match="even D"):
        found_coordinates(data, t[:, :3])


def test_plaintext_encodings_of_a_gallery_column_are_found() -> None:
    from advface.encrypted.gallery import EncryptedGallery
    from advface.encrypted.keys import generate_keys

    t = _rows(2, 1)
    words = plaintext_words(t)
    assert words.shape == (2, 128, 2)
    assert not plaintexts_found(b"\x00" * 4096, words).any()
    # the same encoding, made as the gallery makes it, is found in its bytes
    gallery = EncryptedGallery(generate_keys().public, 128, "euclidean")
    plain = gallery._encode([float(t[0, 5])] + [0.0] * (gallery.slots - 1), gallery.params.template_scale)
    data = np.array([plain.data(0), plain.data(1)], np.uint64).tobytes()
    hit = plaintexts_found(data, words)
    assert hit[0, 5] and hit.sum() == 1


@needs_proc
def test_read_memory_finds_a_value_the_child_holds(tmp_path: Path) -> None:
    import subprocess

    marker = np.float64(0.123456789012345).tobytes()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, numpy as np; x = np.full(512, 0.123456789012345); print('ready', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        memory = read_memory(child.pid)
    finally:
        child.kill()
        child.wait()
    assert len(memory) > 1_000_000 and memory.count(marker) >= 512


@needs_proc
@pytest.mark.slow
def test_a_careful_sidecar_leaves_at_most_its_last_template_and_a_leaky_one_is_caught(tmp_path: Path) -> None:
    from advface.audit.encrypted_thief import dump_sidecar

    t, p = _rows(20, 2), _rows(20, 3)
    careful = dump_sidecar(t, p, encoder="dlib", metric="euclidean", workdir=tmp_path / "careful")
    assert careful.measured and careful.memory_bytes > 50_000_000 and careful.database_bytes > 1_000_000
    counts = careful.counts()
    assert counts["database_templates"] == {"half": 0, "full": 0}
    assert counts["database_plaintexts"] == {"half": 0, "full": 0}
    # the template service leaves at most the last template and probe handled, never all of their coordinates
    assert summarise(careful.templates_found())["half"] <= 1 and summarise(careful.templates_found())["full"] == 0
    assert summarise(careful.probes_found())["half"] <= 1
    leaky = dump_sidecar(t[:6], p[:6], encoder="dlib", metric="euclidean", workdir=tmp_path / "leaky", keep=True)
    assert leaky.counts()["memory_templates"] == {"half": 6, "full": 6}
    assert leaky.counts()["memory_probes"] == {"half": 6, "full": 6}
    assert leaky.counts()["database_templates"] == {"half": 0, "full": 0}


@needs_proc
@pytest.mark.slow
def test_audit_row_with_a_leaky_sidecar(
    audit_dataset: Path, audit_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row of a quick audit with ``--matching encrypted``, its child made leaky: every template and probe is
    recovered, the attacks run on them, the verdict's row is not met; report.json, the page and the CLI say so."""
    import advface.audit.stages.encrypted_matching as stage

    careful = stage.dump_sidecar

    def leaky(*args: Any, **kwargs: Any) -> Any:
        return careful(*args, **{**kwargs, "keep": True})

    monkeypatch.setattr(stage, "dump_sidecar", leaky)
    out = tmp_path / "out"
    settings = ("--attackers", "deconv", "--transfer-encoder", "none", "--link-keys", "2", "--no-scenarios")
    assert run_quick_audit(audit_dataset, audit_cache, out, "--matching", "encrypted", *settings, "--no-images") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format_version"] == 7 and report["config"]["matching"] == "encrypted"
    enc = report["encrypted_matching"]
    n = enc["templates"]
    assert enc["measured"] is True and n == enc["probes"] > 0
    assert enc["templates_recovered"] == enc["templates_recovered_full"] == n
    assert enc["probes_recovered"] == n and enc["counts"]["database_templates"]["half"] == 0
    assert enc["judged_templates"]["decoder"] == "deconv" and enc["judged_templates"]["type1_success"] is not None
    # a recovered raw probe is the victim's raw template: it matches
    assert enc["judged_probes"]["template_match_rate"] == 1.0
    row = report["verdict"][-1]
    assert row["attacker"].startswith("thief with the database and the sidecar's memory") and row["met"] is False
    assert f"{n} of {n} templates recovered" in row["recovers"]
    page = (out / "report.html").read_text()
    assert "Scenario: encrypted matching" in page and "Not covered" in page


def test_matching_setting_is_checked(tmp_path: Path) -> None:
    from advface.audit.config import AuditConfig
    from advface.errors import ConfigError

    with pytest.raises(ConfigError, match="--matching must be one of plain, encrypted"):
        AuditConfig(data=tmp_path, out=tmp_path, matching="homomorphic").check()
