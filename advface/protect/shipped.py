"""Shadow models shipped with advface: ``advface/models/shadow_<encoder>.pt`` (package data)."""

from __future__ import annotations

import re
from pathlib import Path

from advface.errors import ConfigError

#: Folder of the shipped models.
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Encoders that produce the same embeddings share a shadow model.
_ALIASES = {"dlib-torch": "dlib"}


def shipped_shadow_path(encoder_name: str) -> Path:
    """Path of the shipped shadow model for ``encoder_name``; ConfigError when advface ships none for it."""
    name = _ALIASES.get(str(encoder_name), str(encoder_name))
    if _SAFE_NAME.fullmatch(name):
        path = SHIPPED_MODELS_DIR / f"shadow_{name}.pt"
        if path.is_file():
            return path
    raise ConfigError(f"no shipped shadow model for encoder {name}; pass --shadow")
