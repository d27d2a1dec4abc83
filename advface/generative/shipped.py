"""The defender surrogate shipped with advface: ``advface/models/generator_defender_<encoder>.pt`` (package data).

It is advface's identity-conditioned generator trained on the *defender* identity group (float16 weights), the model
that photo protection's diffusion guidance runs on (``advface protect-image --guidance ...deflection``). Threats and
evaluations run on a separately trained *attacker* model, never on this one. ``advface train-generator --group
defender --half`` reproduces it (command and settings in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import os
from pathlib import Path

from advface.errors import ConfigError
from advface.hashing import file_sha256
from advface.protect.shipped import SHIPPED_MODELS_DIR

#: Encoders that produce the same embeddings share a generator.
_ALIASES = {"dlib-torch": "dlib"}


def shipped_surrogate_path(encoder_name: str = "dlib") -> Path:
    """Path of the shipped defender surrogate conditioned on ``encoder_name``'s embeddings; ConfigError when advface
    ships none for it."""
    name = _ALIASES.get(str(encoder_name), str(encoder_name))
    path = SHIPPED_MODELS_DIR / f"generator_defender_{name}.pt"
    if name.replace("-", "").isalnum() and path.is_file():
        return path
    raise ConfigError(
        f"advface ships no defender surrogate for encoder {name}; train one with `advface train-generator --group "
        "defender` and pass it (--surrogate)"
    )


def surrogate_digest(surrogate: str | os.PathLike[str] | None = None) -> str:
    """The first 16 hex digits of the SHA-256 of the defender surrogate file ``surrogate`` (None: the shipped one):
    how caches and results say which surrogate protected a photo. ConfigError when the file is missing."""
    path = Path(surrogate) if surrogate else shipped_surrogate_path()
    if not path.is_file():
        raise ConfigError(f"defender surrogate {path} not found (--surrogate)")
    return file_sha256(path)[:16]
