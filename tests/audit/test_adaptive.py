"""The adaptive attacker's decoder spec (advface.audit.attacks.adaptive): architecture and loss, cache key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from advface.audit.attacks import adaptive
from advface.audit.config import AuditConfig
from advface.datasets.pairs import FacePairs
from advface.datasets.splits import IdentitySplit
from advface.errors import ConfigError


def test_adaptive_attacker_takes_a_decoder_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_train_or_load(attacker, pairs, split, encoder, **kwargs):  # noqa: ANN001, ANN003, ANN202
        trained_on = kwargs["training_pairs"]() if kwargs.get("training_pairs") else pairs
        seen.update(attacker=attacker, embeddings=trained_on.embeddings, extra=kwargs["extra_key"])
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


def test_training_pairs_are_made_only_when_the_decoder_is_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from advface.audit.attacks import decoder as decoder_module

    trained_on: list[np.ndarray] = []

    def fake_train_on_group(pairs, split, group, encoder, config, *, out, **kwargs):  # noqa: ANN001, ANN003, ANN202
        trained_on.append(pairs.embeddings)
        out.write_bytes(b"decoder")
        return torch.nn.Identity(), {}

    monkeypatch.setattr(decoder_module, "train_on_group", fake_train_on_group)
    monkeypatch.setattr(decoder_module, "load_decoder", lambda path: (torch.nn.Identity(), {"from": str(path)}))
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
    made = []

    def protected() -> FacePairs:
        made.append(1)
        return FacePairs(pairs.ids, pairs.identities, 3 * pairs.embeddings, pairs.faces, pairs.flipped)

    attacker = decoder_module.DecoderAttacker("adaptive-deconv", "deconv", 0.0)
    common = dict(image_size=16, epochs=1, seed=0, cache_dir=tmp_path, extra_key="k", training_pairs=protected)
    _, meta, cached = decoder_module.train_or_load(attacker, pairs, split, encoder, **common)  # type: ignore[arg-type]
    assert not cached and len(made) == 1
    np.testing.assert_array_equal(trained_on[0], 3 * pairs.embeddings)
    _, meta2, cached2 = decoder_module.train_or_load(attacker, pairs, split, encoder, **common)  # type: ignore[arg-type]
    assert cached2 and len(made) == 1 and len(trained_on) == 1  # from cache: nothing protected, nothing trained
    assert meta2["cache_key"] == meta["cache_key"]
