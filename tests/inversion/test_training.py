"""Pairs from real LFW photos and a short, resumable training run."""

from pathlib import Path

import numpy as np
import pytest
import torch

from advface.datasets import IdentityFolderDataset
from advface.datasets.pairs import build_face_pairs
from advface.encoders import create_encoder
from advface.inversion.training import TrainConfig, evaluate_l1, train_decoder


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory, lfw_sample: list[Path]):
    root = tmp_path_factory.mktemp("faces")
    for path in lfw_sample[:16]:
        (root / path.parent.name).mkdir(exist_ok=True)
        (root / path.parent.name / path.name).write_bytes(path.read_bytes())
    encoder = create_encoder("dlib-torch")
    dataset = IdentityFolderDataset(root)
    return build_face_pairs(dataset, encoder, image_size=32, use_cache=False, progress=False), encoder


def test_pairs_hold_faces_embeddings_and_mirrors(small_pairs):
    pairs, encoder = small_pairs
    assert len(pairs) == 32 and pairs.flipped.sum() == 16
    assert pairs.faces.shape == (32, 32, 32, 3) and pairs.faces.dtype == np.uint8
    assert pairs.embeddings.shape == (32, 128) and np.isfinite(pairs.embeddings).all()
    # a mirrored face is still the same person for the encoder
    original = pairs.embeddings[~pairs.flipped]
    mirrored = pairs.embeddings[pairs.flipped]
    assert (np.linalg.norm(original - mirrored, axis=1) < 0.6).all()
    assert set(pairs.of_identities({pairs.identities[0]}).identities) == {pairs.identities[0]}


def test_training_lowers_the_loss_and_resumes(small_pairs, tmp_path: Path, monkeypatch):
    pairs, _ = small_pairs
    config = TrainConfig(arch="resup", image_size=32, epochs=4, batch_size=16, lr=3e-3, seed=1, device="cpu")
    untrained = train_decoder(pairs, TrainConfig(**{**config.__dict__, "epochs": 1, "lr": 1e-9}), progress=False)[0]
    model, history = train_decoder(pairs, config, val=pairs, progress=False)
    assert evaluate_l1(model, pairs) < evaluate_l1(untrained, pairs)
    assert len(history["epochs"]) == 4

    # interrupted during epoch 3 (after 2 saved epochs), then resumed: same weights as the uninterrupted run
    import advface.inversion.training as train_module

    calls = {"n": 0}
    real_eval = train_module.evaluate_l1

    def interrupting_eval(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_eval(*a, **kw)

    work = tmp_path / "work"
    monkeypatch.setattr(train_module, "evaluate_l1", interrupting_eval)
    with pytest.raises(KeyboardInterrupt):
        train_decoder(pairs, config, val=pairs, work_dir=work, progress=False)
    assert torch.load(work / "last.pt", weights_only=False)["epoch"] == 1  # epochs 1 and 2 saved
    monkeypatch.setattr(train_module, "evaluate_l1", real_eval)
    resumed, hist2 = train_decoder(pairs, config, val=pairs, work_dir=work, progress=False)
    assert [e["epoch"] for e in hist2["epochs"]] == [1, 2, 3, 4]
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_identity_loss_needs_the_encoder_module(small_pairs):
    pairs, encoder = small_pairs
    config = TrainConfig(arch="resup", image_size=32, epochs=1, batch_size=16, id_weight=0.5, device="cpu")
    with pytest.raises(ValueError, match="encoder"):
        train_decoder(pairs, config, progress=False)
    model, history = train_decoder(
        pairs.subset(np.arange(16)), config, encoder_module=encoder.torch_module(), progress=False
    )
    assert "train_id" in history["epochs"][0]
