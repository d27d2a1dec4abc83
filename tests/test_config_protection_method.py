"""protection.method / shadows / jitter in the sidecar configuration (advface.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from advface.config import Config, load_config
from advface.errors import ConfigError


def _load(folder: Path, protection: dict, env: dict | None = None) -> Config:
    path = folder / "advface.yaml"
    path.write_text(yaml.safe_dump({"protection": protection}))
    return load_config(path, env=env or {})


@pytest.fixture
def ckpts(tmp_path: Path) -> list[Path]:
    (tmp_path / "m").mkdir()
    paths = [tmp_path / "m" / "a.pt", tmp_path / "m" / "b.pt"]
    for p in paths:
        p.write_bytes(b"checkpoint")
    return paths


def test_advface_id_with_relative_shadows(tmp_path: Path, ckpts: list[Path]) -> None:
    cfg = _load(tmp_path, {"method": "advface-id", "shadows": ["m/a.pt", "m/b.pt"], "jitter": False})
    assert cfg.protection.method == "advface-id" and not cfg.protection.jitter
    assert cfg.protection.shadows == tuple(str(p) for p in ckpts)  # relative to the file's folder
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(again, env={}) == cfg


def test_shadows_from_the_environment(tmp_path: Path, ckpts: list[Path]) -> None:
    env = {"ADVFACE_PROTECTION_METHOD": "advface-id", "ADVFACE_PROTECTION_SHADOWS": ",".join(map(str, ckpts))}
    cfg = load_config(None, env=env)
    assert cfg.protection.shadows == tuple(map(str, ckpts))


@pytest.mark.parametrize(
    ("protection", "message"),
    [
        ({"method": "advface-x"}, r"protection\.method: must be one of advface, advface-id; got 'advface-x'"),
        ({"method": "advface-id"}, r"protection\.method is advface-id but protection\.shadows is empty"),
        ({"method": "advface-id", "shadows": []}, r"protection\.shadows is empty"),
        (
            {"method": "advface-id", "shadows": ["m/a.pt", "m/nope.pt"]},
            r"protection\.shadows: file .*nope\.pt not found",
        ),
        ({"method": "advface-id", "shadows": "m/a.pt"}, r"protection\.shadows: expected a list"),
        ({"method": "advface-id", "shadows": ["m/a.pt", "m/a.pt"]}, r"same shadow checkpoint twice"),
        (
            {"method": "advface-id", "shadows": ["m/a.pt"], "shadow": "m/b.pt"},
            r"protection\.shadow is for method advface",
        ),
        ({"shadows": ["m/a.pt"]}, r"protection\.shadows is only used by protection\.method advface-id"),
        ({"method": "advface", "jitter": False}, r"protection\.jitter is only used by protection\.method advface-id"),
        (
            {"method": "advface-id", "shadows": ["m/a.pt"], "jitter": "yes"},
            r"protection\.jitter: expected true or false",
        ),
    ],
)
def test_bad_protection_method_settings(tmp_path: Path, ckpts: list[Path], protection: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, protection)


def test_plain_advface_defaults_unchanged(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"method": "advface", "jitter": True, "shadows": []})  # the defaults are accepted
    assert cfg.protection.method == "advface" and cfg.protection.shadows == ()
