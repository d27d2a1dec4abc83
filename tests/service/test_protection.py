"""advface.service.protection: the protection section as a spec / protector, and protection parallelism."""

from __future__ import annotations

from pathlib import Path

import pytest

from advface.config import ProtectionConfig
from advface.errors import ConfigError
from advface.protect import AdvFaceConfig, IdentityAwareConfig
from advface.protect.shipped import shipped_shadow_path
from advface.service.protection import Parallelism, protection_parallelism, protection_spec
from advface.testing.tiny_models import tiny_shadow_files

DIM = 16


@pytest.fixture(scope="module")
def shadows(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tiny_shadow_files(
        tmp_path_factory.mktemp("shadows"), DIM, ("deconv", "resup"), encoder="tiny", encoder_fingerprint="tiny-fp"
    )


def test_spec_from_the_protection_section(shadows: list[Path]) -> None:
    assert protection_spec(ProtectionConfig(enabled=False), "tiny") is None
    plain = protection_spec(ProtectionConfig(shadow=str(shadows[0]), steps=2, rel_l2=0.2), "tiny")
    assert plain is not None and plain.method == "advface" and plain.shadows == (str(shadows[0]),)
    assert isinstance(plain.config, AdvFaceConfig)
    assert (plain.config.steps, plain.config.rel_l2, plain.config.seed) == (2, 0.2, 0)
    assert plain.encoder == "tiny"
    ident = protection_spec(
        ProtectionConfig(method="advface-id", shadows=tuple(str(p) for p in shadows), jitter=False, seed=3), "tiny"
    )
    assert ident is not None and isinstance(ident.config, IdentityAwareConfig)
    assert (ident.config.jitter, ident.config.steps, ident.config.seed) == (False, ProtectionConfig.steps, 3)
    assert ident.shadows == tuple(str(p) for p in shadows)
    shipped = protection_spec(ProtectionConfig(), "dlib")
    assert shipped is not None and shipped.shadows == (str(shipped_shadow_path("dlib")),)
    with pytest.raises(ConfigError, match="shadows is empty"):
        protection_spec(ProtectionConfig(method="advface-id"), "tiny")
    with pytest.raises(ConfigError, match="not supported"):
        protection_spec(ProtectionConfig(method="fawkes"), "tiny")
    with pytest.raises(ConfigError, match="not found"):
        protection_spec(ProtectionConfig(shadow=str(shadows[0]) + ".missing"), "tiny")


@pytest.mark.parametrize(
    ("slots", "threads", "workers", "torch_threads", "cores", "expected"),
    [
        (0, 0, 4, 8, 2, Parallelism(2, 1)),  # auto: min(workers, cores) slots, one torch thread each
        (0, 0, 1, 8, 8, Parallelism(1, 1)),  # even on many cores: other jobs may use them (advface.threads)
        (0, 0, 8, 4, 3, Parallelism(3, 1)),
        (2, 0, 4, 8, 16, Parallelism(2, 1)),
        (0, 4, 1, 8, 8, Parallelism(1, 4)),  # an idle machine: protection.threads
        (1, 3, 4, 8, 2, Parallelism(1, 3)),  # explicit settings win
    ],
)
def test_parallelism(
    slots: int, threads: int, workers: int, torch_threads: int, cores: int, expected: Parallelism
) -> None:
    section = ProtectionConfig(slots=slots, threads=threads)
    assert protection_parallelism(section, workers, torch_threads, cores) == expected
