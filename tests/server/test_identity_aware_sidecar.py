"""The sidecar with protection.method advface-id: enrol protects within budget, Verify still matches, Info says so.

Tiny untrained shadows (two architectures) keep it fast; the encoder is the harness's dlib-torch, whose torch module
advface-id runs. One ascent step: the plumbing is under test, not the protection's strength.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sidecar_harness import DIM, ServerThread, make_config, random_embedding

from advface.errors import ConfigError
from advface.protect import IdentityAwareConfig, ProtectionSpec, load_protector
from advface.testing.tiny_models import tiny_shadow_files

BUDGET = 0.1


@pytest.fixture(scope="module")
def shadows(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tiny_shadow_files(tmp_path_factory.mktemp("shadows"), DIM, ("deconv", "resup"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, shadows: list[Path]) -> ServerThread:
    config = make_config(
        tmp_path_factory.mktemp("server"),
        protection={
            "method": "advface-id",
            "shadows": [str(p) for p in shadows],
            "steps": 1,
            "rel_l2": BUDGET,
            "seed": 3,
        },
    )
    server = ServerThread(config)
    yield server
    server.stop()


def test_enroll_protects_within_budget_and_verify_matches(srv: ServerThread, shadows: list[Path]) -> None:
    raw = random_embedding(11)
    with srv.client() as client:
        client.enroll("alice", embedding=raw, tenant="t")
        stored = srv.servicer.service.store.subject_vectors("t", "alice")
        assert stored.shape == (1, DIM)
        rel = np.linalg.norm(stored[0] - raw) / np.linalg.norm(raw)
        assert 0.05 < rel <= BUDGET + 1e-5  # changed, within the budget
        result = client.verify("alice", embedding=raw, tenant="t")
        assert result.match and result.score == pytest.approx(-np.linalg.norm(stored[0] - raw), abs=1e-5)
        assert not client.verify("alice", embedding=random_embedding(12), tenant="t").match
        # the stored template is identity-aware AdvFace of the raw one (same spec, computed here), and Protect
        # gives the same bytes: deterministic per template, whatever the batch
        spec = ProtectionSpec(
            "advface-id", tuple(map(str, shadows)), IdentityAwareConfig(steps=1, rel_l2=BUDGET, seed=3), "dlib-torch"
        )
        expected = load_protector(spec, encoder=srv.servicer.service.encoder).protect(raw[None])
        np.testing.assert_array_equal(stored, expected)
        batch = client.protect(np.stack([random_embedding(5), raw]))
        np.testing.assert_array_equal(batch[1], stored[0])


def test_info_reports_the_method_and_an_uncalibrated_threshold(srv: ServerThread, shadows: list[Path]) -> None:
    with srv.client() as client:
        info = client.info()
    protection = info["protection"]
    assert protection["method"] == "advface-id" and protection["enabled"]
    assert protection["shadow_model"] == ",".join(p.name for p in shadows)
    assert [len(h) for h in protection["shadow_sha256"].split(",")] == [64, 64]
    assert protection["steps"] == 1 and protection["seed"] == 3
    threshold = info["threshold"]
    assert threshold["source"] == "uncalibrated" and "advface-id" in threshold["description"]
    assert threshold["value"] == pytest.approx(-0.6)  # dlib's raw-embedding threshold, not AdvFace's calibration


def test_configured_threshold_wins(tmp_path: Path, shadows: list[Path], start_server) -> None:  # noqa: ANN001
    server = start_server(
        make_config(
            tmp_path,
            protection={"method": "advface-id", "shadows": [str(shadows[0])], "steps": 0},
            matching={"threshold": -0.55},
        )
    )
    with server.client() as client:
        info = client.info()
    assert info["threshold"]["source"] == "config" and info["threshold"]["value"] == pytest.approx(-0.55)
    assert info["protection"]["shadow_model"] == shadows[0].name


def test_shadow_for_another_dimension_fails_at_start(tmp_path: Path) -> None:
    wrong = tiny_shadow_files(tmp_path / "wrong", 16, ("deconv",))
    with pytest.raises(ConfigError, match="16-dimensional"):
        ServerThread(make_config(tmp_path, protection={"method": "advface-id", "shadows": [str(wrong[0])]}))


def test_keyed_transform_threshold_is_not_plain_advface_calibration(
    tmp_path: Path,
    shadows: list[Path],
    start_server,  # noqa: ANN001
) -> None:
    """advface-id + norm-equalising keyed transform: not the AdvFace-calibrated keyed threshold, and says so."""
    from advface.crypto import generate_key, write_key_file
    from advface.service.thresholds import CALIBRATED_EQUALISED_THRESHOLDS

    secret = tmp_path / "transform.key"
    write_key_file(secret, generate_key())
    server = start_server(
        make_config(
            tmp_path / "srv",
            protection={"method": "advface-id", "shadows": [str(shadows[0])], "steps": 0},
            keyed_transform={"enabled": True, "secret_file": str(secret)},
        )
    )
    with server.client() as client:
        threshold = client.info()["threshold"]
    assert threshold["source"] == "uncalibrated" and "advface-id" in threshold["description"]
    assert threshold["value"] == pytest.approx(CALIBRATED_EQUALISED_THRESHOLDS[("dlib-torch", False)][0])
    assert threshold["value"] != pytest.approx(CALIBRATED_EQUALISED_THRESHOLDS[("dlib-torch", True)][0])
