"""AntiPure (advface.protect.image.antipure): its frequency measure, settings, losses on a tiny surrogate, and the
``antipure`` guidance stage in ImageProtector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from advface.errors import ConfigError
from advface.faces.align import alignment_matrix
from advface.protect.image import ImageProtector, ProtectConfig
from advface.protect.image.antipure import AntiPureConfig, AntiPureTerm, high_frequency
from advface.protect.image.guidance import parse_guidance
from advface.protect.image.warp import chip_theta, warp_chips
from tests.protect.test_guidance import _surrogate


@pytest.fixture(scope="module")
def protector() -> ImageProtector:
    return ImageProtector(["dlib-torch"], surrogate=_surrogate(2))


def test_high_frequency_ignores_flat_and_slow_content_and_sees_fine_detail() -> None:
    flat = torch.full((1, 3, 16, 16), 0.4)
    assert float(high_frequency(flat, 8, 1).abs().max()) < 1e-5
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float().expand(1, 3, 16, 16)
    slow, fine = high_frequency(ramp, 8, 1), high_frequency(checker, 8, 1)
    assert fine.shape == (1, 3, 4, 8, 8)
    assert float(fine.pow(2).sum()) > 10 * float(slow.pow(2).sum())
    with pytest.raises(ValueError, match="smaller than one"):
        high_frequency(torch.zeros(1, 3, 4, 4), 8, 1)


def test_settings_are_validated() -> None:
    AntiPureConfig().validate()
    for bad, match in [
        (AntiPureConfig(t_range=(0.0, 0.3)), "times"),
        (AntiPureConfig(t_range=(0.4, 0.3)), "times"),
        (AntiPureConfig(patch=8, low_radius=7), "patch"),
        (AntiPureConfig(identity_weight=0, frequency_weight=0, timestep_weight=0), "weights"),
        (AntiPureConfig(timestep_weight=float("nan")), "weights"),
        (AntiPureConfig(wrong_time=1.0), "wrong_time"),
    ]:
        with pytest.raises(ConfigError, match=match):
            bad.validate()
    with pytest.raises(ConfigError, match="antipure"):
        ProtectConfig(antipure=AntiPureConfig(t_range=(0.5, 0.1))).validate()
    assert parse_guidance("antipure,encoders") == ("encoders", "antipure")


def _batch(term: AntiPureTerm, protector: ImageProtector, photo: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    face = protector.find_face(photo)
    theta = torch.from_numpy(chip_theta(alignment_matrix(face, term.chip), photo.shape[:2], term.chip.size))[None]
    return torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255, theta


def test_each_loss_has_a_gradient_and_a_step_against_it_lowers_the_loss(
    protector: ImageProtector, photo: np.ndarray
) -> None:
    term = protector.antipure
    assert isinstance(term, AntiPureTerm) and term.generator is protector.deflection.generator  # one surrogate
    x, theta = _batch(term, protector, photo)
    with pytest.raises(RuntimeError, match="prepare"):
        AntiPureTerm(term.generator, term.module, term.chip).losses(x, theta, [torch.Generator()])
    term.prepare(x, theta)
    moved = (x + 0.03 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    losses = term.losses(moved.requires_grad_(True), theta, [torch.Generator().manual_seed(0)])
    assert [w for _, w in losses] == [2.0, 0.5, 0.5]  # one encoder in this ensemble: one identity loss
    for k, (loss, _) in enumerate(losses):
        (grad,) = torch.autograd.grad(loss.sum(), moved, retain_graph=True)
        assert float(grad.abs().max()) > 0, k
        stepped = (moved - 1e-3 * grad / grad.norm()).detach()
        again = term.losses(stepped, theta, [torch.Generator().manual_seed(0)])[k][0]
        assert float(again) < float(loss.detach()), k
    only_identity = term.losses(x, theta, [torch.Generator()], AntiPureConfig(frequency_weight=0, timestep_weight=0))
    assert len(only_identity) == 1 and -1 <= float(only_identity[0][0]) <= 1


def test_the_antipure_stage_changes_the_protection_within_the_budget(
    protector: ImageProtector, photo: np.ndarray
) -> None:
    base = ProtectConfig(steps=3, seed=4, guidance=("encoders", "deflection"))
    plain, _ = protector.protect([photo], base)[0]
    anti, report = protector.protect(
        [photo], ProtectConfig(steps=3, seed=4, guidance=parse_guidance("encoders,deflection,antipure"))
    )[0]
    assert report.guidance == ["encoders", "deflection", "antipure"]
    assert not np.array_equal(plain, anti)
    assert np.abs(anti.astype(int) - photo.astype(int)).max() <= base.levels


def test_antipure_without_a_surrogate_is_refused(tmp_path: Path) -> None:
    protector = ImageProtector(["dlib-torch"], surrogate=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="antipure needs the defender surrogate"):
        protector.check_guidance(ProtectConfig(guidance=("encoders", "antipure")))


def test_new_identity_settings_are_validated() -> None:
    for bad, match in [
        (AntiPureConfig(identity_encoders="all"), "identity_encoders"),
        (AntiPureConfig(decoy_weight=float("inf")), "weights"),
        (AntiPureConfig(decoy_weight=-1.0), "weights"),
        (AntiPureConfig(decoy_candidates=0), "decoy_candidates"),
        (AntiPureConfig(decoy_steps=0), "decoy_steps"),
    ]:
        with pytest.raises(ConfigError, match=match):
            bad.validate()
    AntiPureConfig(identity_weight=0, frequency_weight=0, timestep_weight=0, decoy_weight=1).validate()


@pytest.fixture(scope="module")
def ensemble_protector(models_dir: Path) -> ImageProtector:
    return ImageProtector(["dlib-torch", "mobilefacenet"], surrogate=_surrogate(2))  # models_dir: $ADVFACE_MODELS_DIR


def test_a_reader_sees_the_surrogate_chip_as_its_own_alignment_does(
    ensemble_protector: ImageProtector, photo: np.ndarray
) -> None:
    term = ensemble_protector.antipure
    mfn = next(m for m in ensemble_protector.members if m.name == "mobilefacenet")
    x, theta = _batch(term, ensemble_protector, photo)
    face = ensemble_protector.find_face(photo)
    own_theta = torch.from_numpy(chip_theta(alignment_matrix(face, mfn.chip), photo.shape[:2], mfn.chip.size))[None]
    with torch.no_grad():
        own = mfn.module(warp_chips(x, own_theta, mfn.chip.size))
        dlib_chip = warp_chips(x, theta, term.chip.size)
        surrogate_view, mfn_view = term.read(dlib_chip, "ensemble")
        naive = mfn.module(torch.nn.functional.interpolate(dlib_chip, size=(mfn.chip.size,) * 2, mode="bilinear"))
    assert surrogate_view.shape[1] == 128 and len(term.read(dlib_chip, "surrogate")) == 1
    through_frames = float(torch.nn.functional.cosine_similarity(mfn_view, own)[0])
    resized = float(torch.nn.functional.cosine_similarity(naive, own)[0])
    assert through_frames > 0.8 and through_frames > resized + 0.1, (through_frames, resized)


def test_ensemble_and_decoy_losses_have_gradients_that_lower_them(
    ensemble_protector: ImageProtector, photo: np.ndarray
) -> None:
    term = ensemble_protector.antipure
    x, theta = _batch(term, ensemble_protector, photo)
    term.prepare(x, theta)
    config = AntiPureConfig(
        identity_encoders="ensemble", identity_weight=1.0, frequency_weight=0, timestep_weight=0, decoy_weight=2.0
    )
    moved = (x + 0.03 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    losses = term.losses(moved.requires_grad_(True), theta, [torch.Generator().manual_seed(0)], config)
    assert [w for _, w in losses] == [1.0, 1.0, 2.0, 2.0]  # identity per encoder, then decoy per encoder
    for k, (loss, _) in enumerate(losses):
        (grad,) = torch.autograd.grad(loss.sum(), moved, retain_graph=True)
        assert float(grad.abs().max()) > 0, k
        stepped = (moved - 1e-3 * grad / grad.norm()).detach()
        again = term.losses(stepped, theta, [torch.Generator().manual_seed(0)], config)[k][0]
        assert float(again) < float(loss.detach()), k
    # the decoy is the candidate least like the clean photo over both encoders, the same at every step
    faces = term.decoy_faces(config.decoy_candidates, config.decoy_seed, config.decoy_steps)
    with torch.no_grad():
        candidates = term.read(faces, "ensemble")
        clean = term.read(warp_chips(x, theta, term.chip.size), "ensemble")
    mean = torch.stack(
        [torch.nn.functional.cosine_similarity(c, e.expand_as(c)) for c, e in zip(candidates, clean)]
    ).mean(dim=0)
    chosen = term.decoy_embeddings(1, config)
    assert torch.allclose(chosen[1][0], candidates[1][int(mean.argmin())])
    assert len(term.decoy_embeddings(1, AntiPureConfig(identity_encoders="surrogate", decoy_weight=1.0))) == 1
