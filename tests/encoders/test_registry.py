"""advface.encoders.registry: create_encoder_with_models hands --models-dir to the encoder that reads it, only."""

from __future__ import annotations

from pathlib import Path

import pytest

from advface.encoders import create_encoder, create_encoder_with_models
from advface.errors import ConfigError


def test_the_models_folder_goes_to_mobilefacenet(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path / "empty")):
        create_encoder_with_models("mobilefacenet", str(tmp_path / "empty"))


def test_other_encoders_take_no_models_folder(tmp_path: Path) -> None:
    encoder = create_encoder_with_models("dlib", str(tmp_path / "empty"))  # dlib has no models_dir parameter
    assert encoder.fingerprint == create_encoder("dlib").fingerprint
    with pytest.raises(ConfigError, match="bad parameters"):
        create_encoder("dlib", models_dir=str(tmp_path))  # what the helper keeps from happening
