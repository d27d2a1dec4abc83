"""advface.service.thresholds: which threshold the service uses, and where it says it comes from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from advface.crypto import generate_key
from advface.errors import ConfigError
from advface.protect.tenant_transform import CALIBRATED_NORMS, TenantTransforms
from advface.service.thresholds import (
    CALIBRATED_EQUALISED_THRESHOLDS,
    CALIBRATED_THRESHOLDS,
    Threshold,
    keyed_threshold,
    resolve_threshold,
)


def _encoder(name: str = "dlib", default: float | None = -0.6) -> SimpleNamespace:
    return SimpleNamespace(name=name, default_threshold=default)


def test_keyed_threshold() -> None:
    tt = TenantTransforms(generate_key(), 128, norm=None)
    assert keyed_threshold(None, "dlib", True) is None
    assert keyed_threshold(tt, "dlib", True) is None  # a pure rotation keeps every score
    auto = TenantTransforms(generate_key(), 128, norm=CALIBRATED_NORMS["dlib"])
    found = keyed_threshold(auto, "dlib", True)
    assert found is not None and (found.value, found.description) == CALIBRATED_EQUALISED_THRESHOLDS[("dlib", True)]
    assert found.source == "calibrated" and "keyed_threshold" in found.description
    with pytest.raises(ConfigError, match="set matching.threshold"):
        keyed_threshold(TenantTransforms(generate_key(), 128, norm=3.0), "dlib", True)
    with pytest.raises(ConfigError, match="set matching.threshold"):
        keyed_threshold(auto, "onnx-x", True)


def test_order_of_sources() -> None:
    dlib = _encoder()
    assert resolve_threshold(-0.5, dlib, "advface") == Threshold(
        -0.5, "config", "matching.threshold from the server configuration"
    )
    with pytest.raises(ConfigError, match="finite"):
        resolve_threshold(float("nan"), dlib, "advface")
    plain = resolve_threshold(None, dlib, "advface")
    assert (plain.value, plain.source) == (CALIBRATED_THRESHOLDS["dlib"], "calibrated")
    assert "advface_lfw_steps3.json" in plain.description
    assert resolve_threshold(None, dlib, "none") == Threshold(
        -0.6, "encoder-default", "the published threshold of encoder dlib for raw embeddings"
    )
    ident = resolve_threshold(None, dlib, "advface-id")
    assert (ident.value, ident.source) == (-0.6, "uncalibrated") and "set matching.threshold" in ident.description
    other = resolve_threshold(None, _encoder("onnx-x", 0.3), "advface")
    assert (other.value, other.source) == (0.3, "encoder-default")  # plain AdvFace, no calibration for it
    with pytest.raises(ConfigError, match="no decision threshold is known"):
        resolve_threshold(None, _encoder("onnx-x", None), "advface")


def test_keyed_transform_changes_the_threshold_only_with_norm_equalisation() -> None:
    dlib = _encoder()
    rotation = TenantTransforms(generate_key(), 128, norm=None)
    assert resolve_threshold(None, dlib, "advface", rotation).value == CALIBRATED_THRESHOLDS["dlib"]
    auto = TenantTransforms(generate_key(), 128, norm=CALIBRATED_NORMS["dlib"])
    assert resolve_threshold(None, dlib, "advface", auto).value == CALIBRATED_EQUALISED_THRESHOLDS[("dlib", True)][0]
    assert resolve_threshold(None, dlib, "none", auto).value == CALIBRATED_EQUALISED_THRESHOLDS[("dlib", False)][0]
    ident = resolve_threshold(None, dlib, "advface-id", auto)
    assert ident.value == CALIBRATED_EQUALISED_THRESHOLDS[("dlib", False)][0] and ident.source == "uncalibrated"
    assert resolve_threshold(-0.4, dlib, "advface", auto).value == -0.4  # the configuration still wins
