import numpy as np
import pytest
import torch

from advface.attack_metrics import attack_success, impostor_threshold, psnr, reconstruct, ssim
from advface.encoders.base import ChipSpec, FaceEncoder


class MeanColourEncoder(FaceEncoder):
    """A toy encoder: the mean colour of the chip (enough to check the bookkeeping)."""

    name = "mean-colour"
    dim = 3
    metric = "euclidean"
    chip = ChipSpec("dlib", 8)

    @property
    def fingerprint(self) -> str:
        return "mean-colour"

    def _embed(self, chips: np.ndarray) -> np.ndarray:
        return chips.reshape(len(chips), -1, 3).mean(axis=1) / 255.0


def test_psnr_and_ssim():
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[1] += 10
    assert psnr(a, b)[1] == pytest.approx(10 * np.log10(255**2 / 100))
    assert psnr(a, b)[0] > 90  # identical
    s = ssim(a, b)
    assert s[0] == pytest.approx(1.0) and s[1] < 1.0


def test_impostor_threshold_matches_fmr():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(400, 8))
    ids = np.repeat(np.arange(200), 2)
    t = impostor_threshold(emb, ids, "cosine", fmr=0.01, pairs=20000)
    a, b = rng.integers(0, 400, (2, 20000))
    keep = ids[a] != ids[b]
    cos = (emb[a] * emb[b]).sum(1) / np.linalg.norm(emb[a], axis=1) / np.linalg.norm(emb[b], axis=1)
    assert (cos[keep] >= t).mean() == pytest.approx(0.01, abs=0.005)


def test_attack_success_counts_type1_and_type2():
    encoder = MeanColourEncoder()
    colours = np.array([[0, 0, 0], [200, 200, 200], [50, 100, 150]], np.uint8)
    faces = np.repeat(np.repeat(colours[:, None, None, :], 8, 1), 8, 2)
    own = encoder.embed(faces)
    other = own.copy()
    other[2] += 0.5  # the third person's other photo looks different
    recon = faces.copy()
    recon[1] = 0  # the second reconstruction failed
    result = attack_success(encoder, recon, own, other, faces, threshold=-0.05)
    assert result.type1_success == pytest.approx(2 / 3)
    assert result.type2_success == pytest.approx(1 / 3)
    assert result.n == 3


def test_reconstruct_maps_to_uint8_images():
    decoder = torch.nn.Sequential(torch.nn.Linear(4, 3 * 8 * 8), torch.nn.Sigmoid(), torch.nn.Unflatten(1, (3, 8, 8)))
    out = reconstruct(decoder, np.ones((5, 4), np.float32), batch_size=2)
    assert out.shape == (5, 8, 8, 3) and out.dtype == np.uint8
