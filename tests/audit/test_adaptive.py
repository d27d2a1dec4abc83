"""The adaptive attacker's decoder spec (advface.audit.attacks.adaptive): architecture and loss, cache key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from advface.audit.attacks import adaptive
from advface.audit.config import AuditConfig
from advface.datasets.pairs import FacePairs
from advface.datasets.splits import IdentitySplit
from advface.errors import ConfigError


def test_adaptive_attacker_takes_a_decoder_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_train_or_load(attacker, pairs, split, encoder, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.update(attacker=attacker, embeddings=pairs.embeddings, extra=kwargs["extra_key"])
        return None, {}, False

    monkeypatch.setattr(adaptive, "train_or_load", fake_train_or_load)
    n = 4
    pairs = FacePairs(
        np.array([f"A/A_{i}.jpg" for i in range(n)]),
        np.array(["A"] * n),
        np.ones((n, 8), np.float32),
        np.zeros((n, 8, 8, 3), np.uint8),
        np.zeros(n, bool),
    )
    split = IdentitySplit(defender=frozenset(), attacker=frozenset({"A"}), evaluation=frozenset(), seed=0)
    encoder = type("Enc", (), {"fingerprint": "fp"})()
    adaptive.train_or_load_adaptive(
        "resup+id",
        pairs,
        split,
        encoder,
        lambda z: 2 * z,
        "advface|x",
        image_size=16,
        epochs=1,
        seed=0,
        cache_dir=tmp_path,
    )
    attacker = seen["attacker"]
    assert (attacker.name, attacker.arch, attacker.id_weight) == ("adaptive-resup+id", "resup", 1.0)
    np.testing.assert_array_equal(seen["embeddings"], 2 * pairs.embeddings)  # trained on protected templates
    assert seen["extra"] == "adaptive|advface|x"
    adaptive.train_or_load_adaptive(
        "deconv", pairs, split, encoder, lambda z: z, "k", image_size=16, epochs=1, seed=0, cache_dir=tmp_path
    )
    assert (seen["attacker"].arch, seen["attacker"].id_weight) == ("deconv", 0.0)
    AuditConfig(data=tmp_path, out=tmp_path, attackers=("adaptive-resup+id",)).check()
    with pytest.raises(ConfigError, match="unknown decoder attacker"):
        AuditConfig(data=tmp_path, out=tmp_path, attackers=("adaptive-nope",)).check()
