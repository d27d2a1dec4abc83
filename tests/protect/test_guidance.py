"""Guidance terms of image protection: selection, the deflection term (IDGuardian stage 2) on a tiny surrogate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from advface.errors import ConfigError
from advface.generative.autoencoder import FaceAutoencoder
from advface.generative.config import AutoencoderConfig, DenoiserConfig
from advface.generative.denoiser import LatentDenoiser
from advface.generative.model import IdentityGenerator, save_generator
from advface.protect.image import ImageProtector, ProtectConfig
from advface.protect.image.guidance import DeflectionTerm, parse_guidance


def _surrogate(seed: int = 0) -> IdentityGenerator:
    """A random 16 px generator conditioned on 128-d (dlib) embeddings."""
    torch.manual_seed(seed)
    ae = FaceAutoencoder(AutoencoderConfig(image_size=16, width=8))
    dn = LatentDenoiser(DenoiserConfig(latent_size=4, cond_dim=128, width=8, multipliers=(1, 2), tokens=2))
    for param in dn.parameters():  # fresh models zero their output and modulation layers: give them weights
        if not param.detach().abs().sum():
            torch.nn.init.normal_(param, std=0.3)
    return IdentityGenerator(ae, dn, {"encoder": "dlib", "role": "defender"})


@pytest.fixture(scope="module")
def protector() -> ImageProtector:
    return ImageProtector(["dlib-torch"], surrogate=_surrogate())


def test_guidance_names_parse_in_canonical_order() -> None:
    assert parse_guidance("deflection, encoders") == ("encoders", "deflection")
    assert parse_guidance(["encoders"]) == ("encoders",)
    with pytest.raises(ConfigError, match="unknown guidance nope"):
        parse_guidance("encoders,nope")
    with pytest.raises(ConfigError, match="at least one"):
        parse_guidance(" , ")
    with pytest.raises(ConfigError, match="guidance must be"):
        ProtectConfig(guidance=("deflection", "encoders")).validate()
    with pytest.raises(ConfigError, match="deflection_weight"):
        ProtectConfig(deflection_weight=float("nan")).validate()


def test_a_missing_surrogate_is_refused_before_any_photo_is_touched(tmp_path: Path) -> None:
    protector = ImageProtector(["dlib-torch"], surrogate=tmp_path / "missing.pt")
    blank = np.zeros((64, 64, 3), np.uint8)  # no face: detection would fail if it ran first
    with pytest.raises(ConfigError, match="needs the defender surrogate"):
        protector.protect([blank], ProtectConfig(guidance=("encoders", "deflection"), steps=1))
    with pytest.raises(ConfigError, match="not found"):
        protector.check_guidance(ProtectConfig(guidance=("deflection",)))
    protector.check_guidance(ProtectConfig(guidance=("encoders",)))  # the encoder stage alone needs no surrogate
    with pytest.raises(ConfigError, match="needs the defender surrogate"):
        protector.check_guidance(ProtectConfig())  # the default runs both stages


def test_the_cli_refuses_a_missing_surrogate_before_writing_anything(tmp_path: Path) -> None:
    from PIL import Image

    from advface.cli.main import main as cli_main

    out = tmp_path / "out"
    photo = str(tmp_path / "photo.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(photo)  # never read: the settings fail first
    missing = str(tmp_path / "x.pt")
    argv = ["protect-image", photo, "--out", str(out), "--encoders", "dlib-torch", "--surrogate", missing]
    assert cli_main(argv) != 0
    assert not out.exists()  # no output folder, no report


def test_the_bridge_is_zero_at_the_clean_identity_and_pulls_the_latent_otherwise(
    protector: ImageProtector, photo: np.ndarray
) -> None:
    term = protector.deflection
    assert isinstance(term, DeflectionTerm) and term.chip.size == protector.members[0].chip.size
    face = protector.find_face(photo)
    from advface.faces.align import alignment_matrix
    from advface.protect.image.warp import chip_theta

    theta = torch.from_numpy(chip_theta(alignment_matrix(face, term.chip), photo.shape[:2], term.chip.size))[None]
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255
    term.prepare(x, theta)
    gens = [torch.Generator().manual_seed(0)]
    clean = x.clone().requires_grad_(True)
    loss = term.loss(clean, theta, gens)
    (grad,) = torch.autograd.grad(loss.sum(), clean)
    assert float(loss.detach().abs().max()) < 1e-4 and float(grad.abs().max()) < 1e-4  # same identity: no bridge

    moved = (x + 0.2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    moved.requires_grad_(True)
    loss = term.loss(moved, theta, [torch.Generator().manual_seed(0)])
    (grad,) = torch.autograd.grad(loss.sum(), moved)
    assert float(grad.abs().max()) > 0
    # a small step against the gradient lowers the loss (same time and noise draws)
    stepped = (moved - 1e-3 * grad / grad.norm()).detach()
    assert float(term.loss(stepped, theta, [torch.Generator().manual_seed(0)])) < float(loss.detach())


def test_deflection_changes_the_protection_and_the_report_names_the_stages(
    protector: ImageProtector, photo: np.ndarray
) -> None:
    budget = ProtectConfig(steps=4, seed=3, guidance=("encoders",))
    plain, plain_report = protector.protect([photo], budget)[0]
    both, report = protector.protect([photo], ProtectConfig(steps=4, seed=3, guidance=("encoders", "deflection")))[0]
    only, only_report = protector.protect([photo], ProtectConfig(steps=4, seed=3, guidance=("deflection",)))[0]
    assert plain_report.guidance == ["encoders"] and report.guidance == ["encoders", "deflection"]
    assert report.to_dict()["guidance"] == ["encoders", "deflection"] and only_report.guidance == ["deflection"]
    assert not np.array_equal(plain, both)
    for out in (both, only):
        assert np.abs(out.astype(int) - photo.astype(int)).max() <= budget.levels


def test_a_surrogate_checkpoint_path_loads(tmp_path: Path, photo: np.ndarray) -> None:
    path = save_generator(tmp_path / "surrogate.pt", _surrogate(1), half=True)
    protector = ImageProtector(["dlib-torch"], surrogate=path)
    out, report = protector.protect([photo], ProtectConfig(steps=2, guidance=("encoders", "deflection")))[0]
    assert report.guidance == ["encoders", "deflection"] and out.shape == photo.shape
    assert protector.deflection.generator.metadata["role"] == "defender"
