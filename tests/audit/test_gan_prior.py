"""The GAN-prior attack: packaged generator, latent search on real templates (similarity improves), bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from advface.audit.attacks.gan_prior import GanPriorConfig, invert_templates, load_generator
from advface.errors import ConfigError


@pytest.fixture(scope="module")
def encoder():  # noqa: ANN201
    from advface.encoders import create_encoder

    return create_encoder("dlib-torch")


@pytest.fixture(scope="module")
def templates(encoder, lfw_sample: list[Path]) -> np.ndarray:  # noqa: ANN001
    from advface.image_embedder import ImageEmbedder

    files = [(p, p.name) for p in lfw_sample[:4:2]]  # two different people
    data = ImageEmbedder(encoder, "dlib", "largest").embed_files(files, progress=False)
    assert len(data.ids) == 2
    return data.embeddings


def test_generator_loads_from_package_files() -> None:
    import torch

    g = load_generator()
    with torch.no_grad():
        x = g(torch.zeros(2, 100, 1, 1))
    assert x.shape == (2, 3, 64, 64)
    assert not any(p.requires_grad for p in g.parameters())


def test_latent_search_improves_similarity(encoder, templates: np.ndarray) -> None:  # noqa: ANN001
    config = GanPriorConfig(steps=6, restarts=2, batch_size=2, seed=0)
    result = invert_templates(
        templates, encoder.torch_module(), chip_size=encoder.chip.size, metric=encoder.metric, config=config
    )
    assert result.faces.shape == (2, 64, 64, 3) and result.faces.dtype == np.uint8
    assert len(result.history) == config.steps + 1
    assert result.history[-1] > result.history[0]
    assert np.all(np.diff(result.history) >= -1e-9)  # best-so-far never gets worse
    # the returned faces are the best ones found: re-embedding them gives the reported similarity
    from advface.attack_metrics import embed_faces

    emb = embed_faces(encoder, result.faces)
    np.testing.assert_allclose(encoder.score(emb, templates), result.similarity, atol=0.02)
    assert np.isclose(result.similarity.mean(), result.history[-1], atol=1e-5)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gan_face_generate.models", None)
    with pytest.raises(ConfigError, match="gan-face-generate"):
        load_generator()


def test_bad_settings_and_templates(encoder) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="restarts"):
        GanPriorConfig(restarts=0)
    with pytest.raises(ConfigError, match="non-empty"):
        invert_templates(np.zeros((0, 128), np.float32), encoder.torch_module(), chip_size=150, metric="euclidean")
