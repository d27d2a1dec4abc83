"""Protection methods by name (advface.protect.methods): specs, load_protector, the TemplateProtector interface."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from torch import nn

from advface.errors import ConfigError
from advface.protect import (
    AdvFaceConfig,
    IdentityAwareConfig,
    ProtectionSpec,
    Protector,
    TemplateProtector,
    load_protector,
    protect_identity_aware,
)
from advface.protect.methods import IdentityAwareProtector
from advface.testing.tiny_models import TinyEncoder, tiny_shadow_files

DIM = 16
CHIP = 24


def fake_encoder(module: nn.Module | None, fingerprint: str = "tiny-fp") -> SimpleNamespace:
    """What load_protector reads of a FaceEncoder."""
    return SimpleNamespace(
        name="tiny",
        dim=DIM,
        fingerprint=fingerprint,
        chip=SimpleNamespace(size=CHIP),
        torch_module=lambda device=None: module,
    )


@pytest.fixture(scope="module")
def shadows(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tiny_shadow_files(
        tmp_path_factory.mktemp("shadows"),
        DIM,
        ("deconv", "resup", "tokens"),
        encoder="tiny",
        encoder_fingerprint="tiny-fp",
    )


def _z(n: int = 6) -> np.ndarray:
    return (np.random.default_rng(0).normal(size=(n, DIM)) * 0.3).astype(np.float32)


def test_spec_validation(shadows: list[Path], tmp_path: Path) -> None:
    paths = tuple(map(str, shadows))
    with pytest.raises(ConfigError, match="unknown protection method 'advface-x'"):
        ProtectionSpec("advface-x", paths[:1], AdvFaceConfig())
    with pytest.raises(ConfigError, match="needs IdentityAwareConfig parameters"):
        ProtectionSpec("advface-id", paths, AdvFaceConfig())
    with pytest.raises(ConfigError, match="exactly one shadow"):
        ProtectionSpec("advface", paths[:2], AdvFaceConfig())
    with pytest.raises(ConfigError, match="at least one shadow"):
        ProtectionSpec("advface-id", (), IdentityAwareConfig())
    with pytest.raises(ConfigError, match="not found"):
        ProtectionSpec("advface-id", (*paths[:1], str(tmp_path / "missing.pt")), IdentityAwareConfig())


def test_identity_aware_protector_matches_the_library(shadows: list[Path]) -> None:
    encoder = TinyEncoder(DIM)
    config = IdentityAwareConfig(steps=2, rel_l2=0.2, lanes=4)
    spec = ProtectionSpec("advface-id", tuple(map(str, shadows)), config, encoder="unused")
    protector = load_protector(spec, encoder=fake_encoder(encoder))
    assert isinstance(protector, IdentityAwareProtector) and isinstance(protector, TemplateProtector)
    assert protector.method == "advface-id" and protector.dim == DIM
    assert protector.shadow_paths == tuple(shadows)
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen once, at load
    z = _z()
    out = protector.protect(z)
    from advface.inversion import load_decoder

    direct = protect_identity_aware(z, [load_decoder(p)[0] for p in shadows], TinyEncoder(DIM), config, chip_size=CHIP)
    np.testing.assert_array_equal(out, direct)
    rel = np.linalg.norm(out - z, axis=1) / np.linalg.norm(z, axis=1)
    assert (rel > 0.05).all() and (rel <= 0.2 + 1e-6).all()
    np.testing.assert_array_equal(protector.protect(z[2:3]), out[2:3])  # each row on its own


def test_encoder_without_torch_module_is_refused(shadows: list[Path]) -> None:
    spec = ProtectionSpec("advface-id", tuple(map(str, shadows)), IdentityAwareConfig(), encoder="unused")
    with pytest.raises(ConfigError, match="differentiable torch module"):
        load_protector(spec, encoder=fake_encoder(None))


def test_shadow_for_another_encoder_is_refused(shadows: list[Path]) -> None:
    spec = ProtectionSpec("advface-id", tuple(map(str, shadows)), IdentityAwareConfig(), encoder="unused")
    with pytest.raises(ConfigError, match=str(shadows[0].name)):
        load_protector(spec, encoder=fake_encoder(TinyEncoder(DIM), fingerprint="other-fp"))
    unchecked = ProtectionSpec(
        "advface-id",
        tuple(map(str, shadows)),
        IdentityAwareConfig(steps=1, lanes=2),
        encoder="unused",
        check_encoder=False,
    )
    assert load_protector(unchecked, encoder=fake_encoder(TinyEncoder(DIM), fingerprint="other-fp")).dim == DIM


def test_plain_advface_spec(shadows: list[Path]) -> None:
    spec = ProtectionSpec("advface", (str(shadows[0]),), AdvFaceConfig(steps=2, lanes=4), encoder="unused")
    protector = load_protector(spec, encoder=fake_encoder(TinyEncoder(DIM)))
    assert isinstance(protector, Protector) and isinstance(protector, TemplateProtector)
    assert protector.method == "advface" and protector.shadow_paths == (shadows[0],)
    z = _z()
    out = protector.protect(z)
    assert out.shape == z.shape and not np.array_equal(out, z)
