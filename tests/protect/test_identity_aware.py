"""Identity-aware AdvFace: budget, determinism, bad input, and that it moves reconstructions' identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advface.errors import ConfigError, EmbeddingError
from advface.inversion import build_decoder
from advface.protect.identity_aware import IdentityAwareConfig, identity_distance, protect_identity_aware
from advface.testing.tiny_models import TinyEncoder

DIM = 16
CHIP = 24


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    shadows = [build_decoder(arch, DIM, 16, width=0.1, hidden=32) for arch in ("deconv", "resup", "tokens")]
    encoder = TinyEncoder(DIM)
    # templates the encoder could have produced: embeddings of the shadows' own faces, so distances start small
    with torch.no_grad():
        z = encoder(torch.rand(12, 3, CHIP, CHIP)).numpy().astype(np.float32)
    return shadows, encoder, z


def test_budget_and_shape(parts) -> None:
    shadows, encoder, z = parts
    config = IdentityAwareConfig(rel_l2=0.2, steps=4, lanes=4)
    out = protect_identity_aware(z, shadows, encoder, config, chip_size=CHIP)
    assert out.shape == z.shape and out.dtype == np.float32
    rel = np.linalg.norm(out.astype(np.float64) - z, axis=1) / np.linalg.norm(z.astype(np.float64), axis=1)
    assert rel.max() <= 0.2 and rel.min() > 0.1
    single = protect_identity_aware(z[0], shadows, encoder, config, chip_size=CHIP)
    assert single.shape == (DIM,)


def test_deterministic_per_template(parts) -> None:
    shadows, encoder, z = parts
    config = IdentityAwareConfig(rel_l2=0.2, steps=3, lanes=4)
    full = protect_identity_aware(z, shadows, encoder, config, chip_size=CHIP)
    part = protect_identity_aware(
        z[5:8], shadows, encoder, IdentityAwareConfig(rel_l2=0.2, steps=3, lanes=4, batch_size=2), chip_size=CHIP
    )
    np.testing.assert_array_equal(full[5:8], part)
    other_seed = protect_identity_aware(
        z[:4], shadows, encoder, IdentityAwareConfig(rel_l2=0.2, steps=3, lanes=4, seed=7), chip_size=CHIP
    )
    assert not np.array_equal(other_seed, full[:4])


def test_moves_identity_more_than_random_start(parts) -> None:
    shadows, encoder, z = parts
    zt = torch.from_numpy(z)

    def mean_distance(v: np.ndarray) -> float:
        with torch.no_grad():
            return float(
                np.mean([identity_distance(s, encoder, torch.from_numpy(v), zt, CHIP).mean() for s in shadows])
            )

    random_only = protect_identity_aware(z, shadows, encoder, IdentityAwareConfig(rel_l2=0.3, steps=0), chip_size=CHIP)
    ascended = protect_identity_aware(
        z, shadows, encoder, IdentityAwareConfig(rel_l2=0.3, steps=10, lanes=4), chip_size=CHIP
    )
    assert mean_distance(ascended) > mean_distance(random_only) > 0


def test_weights_untouched_and_modes_restored(parts) -> None:
    shadows, encoder, z = parts
    before = [p.detach().clone() for p in shadows[0].parameters()]
    shadows[0].train()
    protect_identity_aware(z[:2], shadows, encoder, IdentityAwareConfig(steps=2, lanes=2), chip_size=CHIP)
    assert shadows[0].training
    shadows[0].eval()
    assert all(torch.equal(a, b) for a, b in zip(before, shadows[0].parameters()))
    assert all(p.requires_grad for p in shadows[0].parameters())


def test_bad_input(parts) -> None:
    shadows, encoder, z = parts
    bad = z.copy()
    bad[1, 0] = np.nan
    with pytest.raises(EmbeddingError):
        protect_identity_aware(bad, shadows, encoder, chip_size=CHIP)
    with pytest.raises(EmbeddingError):
        protect_identity_aware(z[:, :8], shadows, encoder, chip_size=CHIP)
    with pytest.raises(ConfigError):
        protect_identity_aware(z, [], encoder, chip_size=CHIP)
    with pytest.raises(ConfigError):
        protect_identity_aware(z, [shadows[0], build_decoder("deconv", 8, 16, width=0.1, hidden=0)], encoder)
    for kwargs in ({"rel_l2": 0}, {"rel_l2": 1.5}, {"steps": -1}, {"lanes": 0}, {"jitter": 1}):
        with pytest.raises(ConfigError):
            IdentityAwareConfig(**kwargs)
