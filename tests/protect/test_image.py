"""Image-level protection: budget, determinism, identity drop on real faces, bad inputs, CLI end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advface.cli.main import build_parser
from advface.cli.main import main as cli_main
from advface.cli.protect_image import parse_epsilon
from advface.cli.protect_image import run as cli_run
from advface.errors import ConfigError, ImageError, NoFaceError
from advface.faces.align import alignment_matrix, warp_to_chip
from advface.images import load_image
from advface.protect.image import ImageProtector, ProtectConfig, build_ensemble, protect_image
from advface.protect.image.core import capture_outputs
from advface.protect.image.denoiser import DenoiserConfig, denoise, load_or_train_denoiser, train_pair_denoiser
from advface.protect.image.io import load_for_protection, save_png
from advface.protect.image.purify import standard_purifications
from advface.protect.image.quality import psnr, ssim
from advface.protect.image.warp import chip_theta, warp_chips

PHOTO = "images/Aaron_Peirsol/Aaron_Peirsol_0001.jpg"
#: The default budget in uint8 levels (every pixel of a protected photo is within it).
DEFAULT_LEVELS = ProtectConfig().levels
PHOTO2 = "images/Abdullah_Gul/Abdullah_Gul_0001.jpg"


@pytest.fixture(scope="module")
def protector(models_dir: Path) -> ImageProtector:
    """dlib-torch + MobileFaceNet on CPU."""
    return ImageProtector(device="cpu", policy="center")


@pytest.fixture(scope="module")
def protected(protector: ImageProtector, photo: np.ndarray):  # noqa: ANN201
    """One real LFW face protected with the default budget and few steps (shared by several tests)."""
    before = photo.copy()
    out, report = protector.protect([photo], ProtectConfig(steps=20, seed=3))[0]
    assert np.array_equal(photo, before), "the input array was modified"
    return out, report


def test_differentiable_warp_matches_opencv(protector: ImageProtector, photo: np.ndarray) -> None:
    face = protector.find_face(photo)
    x = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float()
    for member in protector.members:
        matrix = alignment_matrix(face, member.chip)
        theta = torch.from_numpy(chip_theta(matrix, photo.shape[:2], member.chip.size))[None]
        ours = warp_chips(x, theta, member.chip.size)[0].permute(1, 2, 0).numpy()
        ref = warp_to_chip(photo, matrix, member.chip.size).astype(np.float64)
        assert np.abs(ours - ref).max() <= 0.51  # OpenCV rounds to uint8


def test_budget_bound_including_uint8_rounding(protector: ImageProtector, photo: np.ndarray) -> None:
    for epsilon, levels in ((4 / 255, 4), (5.5 / 255, 5)):
        out, report = protector.subset(["dlib-torch"]).protect([photo], ProtectConfig(epsilon=epsilon, steps=4))[0]
        diff = np.abs(out.astype(np.int16) - photo.astype(np.int16))
        assert out.dtype == np.uint8 and out.shape == photo.shape
        assert diff.max() <= levels and report.linf_levels == diff.max()
        assert diff.max() >= 1  # something changed


def test_deterministic_with_seed(protector: ImageProtector, photo: np.ndarray) -> None:
    sub = protector.subset(["dlib-torch"])
    a = sub.protect([photo], ProtectConfig(steps=4, seed=7))[0][0]
    b = sub.protect([photo], ProtectConfig(steps=4, seed=7))[0][0]
    c = sub.protect([photo], ProtectConfig(steps=4, seed=8))[0][0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_identity_similarity_drops_on_a_real_face(protected, photo: np.ndarray) -> None:  # noqa: ANN001
    out, report = protected
    assert report.encoders == ["dlib-torch", "mobilefacenet"]
    dlib_sim, mfn_sim = report.similarity["dlib-torch"], report.similarity["mobilefacenet"]
    # Random noise of the same budget leaves the identity; the protection removes it for both encoders.
    assert dlib_sim["cosine_random"] > 0.98 and mfn_sim["cosine_random"] > 0.95
    assert dlib_sim["matched_after"] is False  # dlib distance above its 0.6 threshold
    assert mfn_sim["cosine_after"] < 0.3  # below MobileFaceNet's FMR 0.1% threshold (0.32) on LFW
    assert report.psnr > 33 and report.ssim > 0.85
    assert report.linf_levels <= DEFAULT_LEVELS


def test_purifications_keep_shape(photo: np.ndarray) -> None:
    for name, fn in standard_purifications().items():
        out = fn(photo)
        assert out.shape == photo.shape and out.dtype == np.uint8, name
        assert psnr(photo, out) > 20, name


def test_denoiser_trains_caches_and_runs(lfw_dir: Path, tmp_path: Path, photo: np.ndarray) -> None:
    config = DenoiserConfig(steps=3, photos=4, batch=2, patch=32, depth=3, width=8)
    model, info = load_or_train_denoiser(lfw_dir, ["Aaron_Peirsol"], config, cache=tmp_path)
    assert info["train_photos"] == 4 and Path(info["cached"]).is_file()
    again, info2 = load_or_train_denoiser(lfw_dir, ["Aaron_Peirsol"], config, cache=tmp_path)
    assert info2["cached"] == info["cached"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    out = denoise(model, photo)
    assert out.shape == photo.shape and out.dtype == np.uint8


def test_pair_denoiser_learns_to_undo_a_degradation(photo: np.ndarray) -> None:
    """The adaptive purifier's trainer: on (clean + fixed checkerboard, clean) pairs it learns to remove the pattern."""
    clean = photo[60:188, 60:188].copy()
    checker = (np.indices(clean.shape[:2]).sum(axis=0) % 2 * 16 - 8)[:, :, None]
    degraded = np.clip(clean.astype(np.int16) + checker, 0, 255).astype(np.uint8)
    config = DenoiserConfig(steps=300, batch=4, patch=24, depth=3, width=16, lr=3e-3)
    model, info = train_pair_denoiser([(degraded, clean)], config, progress=False)
    assert info["train_pairs"] == 1 and info["final_mse"] < 0.5 * info["noisy_input_mse"]
    assert psnr(clean, denoise(model, degraded)) > psnr(clean, degraded) + 3
    with pytest.raises(ValueError, match="at least one"):
        train_pair_denoiser([], config)
    with pytest.raises(ValueError, match="shapes differ"):
        train_pair_denoiser([(degraded, clean[:-1])], config)


def test_quality_metrics(photo: np.ndarray) -> None:
    assert psnr(photo, photo) == float("inf") and ssim(photo, photo) == pytest.approx(1.0)
    noisy = np.clip(photo.astype(np.int16) + 8, 0, 255).astype(np.uint8)
    assert 25 < psnr(photo, noisy) < 35


def test_bad_inputs(protector: ImageProtector, photo: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(NoFaceError):
        protector.find_face(np.full((200, 200, 3), 128, np.uint8))
    with pytest.raises(ImageError, match="too small"):
        ImageProtector.find_face(_with_min_face(protector, 500), photo)
    gif = tmp_path / "anim.gif"
    frames = [Image.fromarray(photo), Image.fromarray(photo[::-1].copy())]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="animated"):
        load_for_protection(gif)
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError):
        load_for_protection(corrupt)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(photo).convert("CMYK").save(cmyk)
    assert "CMYK" in " ".join(load_for_protection(cmyk).notes)
    with pytest.raises(ConfigError):
        protector.protect([photo], ProtectConfig(epsilon=0.5 / 255))


def _with_min_face(protector: ImageProtector, size: int) -> ImageProtector:
    other = protector.subset(protector.encoder_names)
    other.min_face_size = size
    return other


def test_grey_photo_stays_grey(protector: ImageProtector, photo: np.ndarray, tmp_path: Path) -> None:
    grey_path = tmp_path / "grey.jpg"
    Image.fromarray(photo).convert("L").save(grey_path)
    loaded = load_for_protection(grey_path)
    assert loaded.grayscale
    out, _ = protector.subset(["dlib-torch"]).protect([loaded.image], ProtectConfig(steps=3), grayscale=[True])[0]
    assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 0], out[:, :, 2])
    save_png(out, tmp_path / "grey.png", grayscale=True)
    assert Image.open(tmp_path / "grey.png").mode == "L"


def test_default_ensemble_without_mobilefacenet_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADVFACE_MODELS_DIR", raising=False)
    members, notes = build_ensemble(None, "cpu")
    assert [m.name for m in members] == ["dlib-torch"]
    assert notes and "mobilefacenet" in notes[0]
    with pytest.raises(ConfigError):
        build_ensemble(["mobilefacenet"], "cpu")


def test_feature_layers_of_the_ensemble(protector: ImageProtector) -> None:
    dlib_member, mfn_member = protector.members
    assert dlib_member.feature_layers == ("net.23",) and mfn_member.feature_layers == ()
    with torch.no_grad(), capture_outputs(dlib_member.module, dlib_member.feature_layers) as maps:
        dlib_member.module(torch.rand(2, 3, 150, 150))
    assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 8)]


def test_feature_term_changes_the_step_and_leaves_no_hooks(protector: ImageProtector, photo: np.ndarray) -> None:
    sub = protector.subset(["dlib-torch"])
    plain = sub.protect([photo], ProtectConfig(steps=3, seed=5, feature_weight=0.0))[0][0]
    featured = sub.protect([photo], ProtectConfig(steps=3, seed=5))[0][0]
    assert not np.array_equal(plain, featured)
    assert np.abs(featured.astype(np.int16) - photo).max() <= DEFAULT_LEVELS
    module = sub.members[0].module
    assert not any(m._forward_hooks for m in module.modules())  # the feature taps are removed after each step
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="feature_weight"):
            ProtectConfig(feature_weight=weight).validate()


class _LeftHalfProtector(ImageProtector):
    """The photo gets the optimised variable on its left half only (a reparametrisation through ``_shape``)."""

    def _shape(self, x, delta, eps, gray_mask):  # noqa: ANN001, ANN202
        keep = torch.zeros_like(delta)
        keep[..., : delta.shape[-1] // 2] = 1
        return delta * keep


@pytest.mark.parametrize("budget", ["uniform", "ssim", "jnd"])
def test_the_photo_gets_the_shaped_perturbation(models_dir: Path, photo: np.ndarray, budget: str) -> None:
    """What ``_shape`` returns is what the photo gets, and every budget's terms follow the gradient through it."""
    protector = _LeftHalfProtector(["dlib-torch"], device="cpu", policy="center")
    config = ProtectConfig(guidance=("encoders",), steps=4, budget=budget)
    change = np.abs(protector.protect([photo], config)[0][0].astype(np.int16) - photo)
    half = photo.shape[1] // 2
    assert change[:, :half].max() > 0 and change[:, half:].max() == 0


def test_encoder_weight_scales_the_encoder_terms(protector: ImageProtector, photo: np.ndarray, tmp_path: Path) -> None:
    sub = protector.subset(["dlib-torch"])
    config = ProtectConfig(steps=2, seed=1, eot=False, guidance=("encoders",), budget="uniform")
    off = sub.protect([photo], dataclasses.replace(config, encoder_weight=0.0))[0][0]
    assert np.array_equal(off, photo)  # with the encoders weighted 0 nothing pulls: the photo is unchanged
    on = sub.protect([photo], config)[0][0]
    assert not np.array_equal(on, photo)
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="encoder_weight"):
            ProtectConfig(encoder_weight=weight).validate()
    with pytest.raises(ConfigError, match="encoder_weight"):  # the CLI flag, refused before anything is read
        cli_run(build_parser().parse_args(["protect-image", "a.jpg", "--out", str(tmp_path), "--encoder-weight", "-1"]))
    assert not any(tmp_path.iterdir())


def test_cli_out_that_names_an_image_file_is_refused(tmp_path: Path) -> None:
    """``--out`` is a folder: a file name (``protected.png``) is a clear error before any folder is made."""
    out = tmp_path / "protected.png"
    with pytest.raises(ConfigError, match="looks like a file name"):
        cli_run(build_parser().parse_args(["protect-image", "a.jpg", "--out", str(out)]))
    assert not out.exists()


def test_protect_image_function(protector: ImageProtector, photo: np.ndarray) -> None:
    out, report = protect_image(photo, protector.subset(["dlib-torch"]), steps=2, seed=1, eot=False)
    assert report.steps == 2 and report.encoders == ["dlib-torch"]
    assert np.abs(out.astype(np.int16) - photo).max() <= DEFAULT_LEVELS


def test_early_stop_at_target_similarity(protector: ImageProtector, photo: np.ndarray) -> None:
    config = ProtectConfig(steps=40, target_similarity=0.99, check_every=2)
    _, report = protector.subset(["mobilefacenet"]).protect([photo], config)[0]
    assert report.steps < 40


def test_parse_epsilon() -> None:
    assert parse_epsilon("8/255") == pytest.approx(8 / 255)
    assert parse_epsilon("0.02") == pytest.approx(0.02)
    for bad in ("8", "abc", "0", "1/0"):
        with pytest.raises(ConfigError):
            parse_epsilon(bad)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_cli_end_to_end(lfw_dir: Path, models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    src.mkdir()
    with_exif = Image.open(lfw_dir / PHOTO)
    exif = Image.Exif()
    exif[0x010E] = "private description"  # ImageDescription: must not reach the output
    with_exif.save(src / "person.jpg", exif=exif)
    (src / "broken.jpg").write_bytes(b"not an image")
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(src / "noface.png")
    before = _digest(src)
    out = tmp_path / "out"
    args = ["protect-image", str(src), "--out", str(out), "--steps", "2", "--encoders", "dlib-torch", "--strict"]
    assert cli_main(args) == 1  # strict: two photos failed
    # the progress bar counts finished photos: its last state has the protected one and both failures
    last = capsys.readouterr().err.split("\r")[-1]
    assert "3/3" in last and "done=1" in last and "failed=2" in last
    assert _digest(src) == before  # inputs untouched
    result = out / "person.png"
    assert result.is_file()
    img = Image.open(result)
    assert img.format == "PNG" and not img.getexif() and "exif" not in img.info
    protected = np.asarray(img.convert("RGB"))
    clean = load_image(src / "person.jpg")
    assert np.abs(protected.astype(np.int16) - clean).max() <= DEFAULT_LEVELS
    reports = sorted(out.glob("protect-image-report-*.json"))
    assert len(reports) == 1
    doc = json.loads(reports[0].read_text())
    assert doc["summary"] == {"protected": 1, "skipped": 0, "failed": 2}
    status = {Path(f["input"]).name: f for f in doc["files"]}
    assert status["broken.jpg"]["status"] == "failed" and status["noface.png"]["reason"] == "no face found"
    assert status["person.jpg"]["report"]["linf_levels"] <= DEFAULT_LEVELS
    mtime = result.stat().st_mtime_ns
    # Resume: the done photo is skipped; without --strict the failures do not change the exit status.
    report2 = tmp_path / "second.json"
    assert (
        cli_main(
            [
                "protect-image",
                str(src / "person.jpg"),
                "--out",
                str(out),
                "--steps",
                "2",
                "--encoders",
                "dlib-torch",
                "--report",
                str(report2),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(report2.read_text())["summary"]["skipped"] == 1 and result.stat().st_mtime_ns == mtime
    assert "photo/s" not in capsys.readouterr().err  # --quiet: no progress bar
    assert (
        cli_main(
            [
                "protect-image",
                str(src / "pers*.jpg"),
                "--out",
                str(out),
                "--steps",
                "2",
                "--encoders",
                "dlib-torch",
                "--overwrite",
                "--report",
                str(report2),
            ]
        )
        == 0
    )
    assert json.loads(report2.read_text())["summary"]["protected"] == 1
    assert _digest(src) == before
    # An output that would replace an input is refused.
    png_in = tmp_path / "pngs"
    png_in.mkdir()
    Image.open(lfw_dir / PHOTO2).save(png_in / "x.png")
    assert (
        cli_main(
            ["protect-image", str(png_in), "--out", str(png_in), "--steps", "1", "--encoders", "dlib-torch", "--strict"]
        )
        == 1
    )
    assert "overwrite an input" in capsys.readouterr().err


def test_batch_of_mixed_sizes_keeps_order(protector: ImageProtector, photo: np.ndarray, lfw_dir: Path) -> None:
    other = load_image(lfw_dir / PHOTO2)
    cropped = np.ascontiguousarray(other[10:240, 5:245])  # another size: its own batch
    inputs = [photo, cropped, other]
    results = protector.subset(["dlib-torch"]).protect(inputs, ProtectConfig(steps=2), batch_size=2)
    assert len(results) == 3
    for clean, (out, report) in zip(inputs, results):
        assert out.shape == clean.shape
        assert np.abs(out.astype(np.int16) - clean).max() <= DEFAULT_LEVELS and report.steps == 2


def test_should_stop_ends_the_optimisation_at_the_next_step(protector: ImageProtector, photo: np.ndarray) -> None:
    from advface.errors import DeadlineExceededError

    asked: list[int] = []

    def stop_at_third() -> bool:
        asked.append(1)
        return len(asked) >= 3

    config = ProtectConfig(steps=50, guidance=("encoders",))
    with pytest.raises(DeadlineExceededError, match="after 2 of 50 steps"):
        protector.protect([photo], config, should_stop=stop_at_third)
    assert len(asked) == 3  # asked once per step, and nothing ran after the answer


def test_the_service_stops_a_protection_whose_caller_is_gone(protector: ImageProtector, photo: np.ndarray) -> None:
    import threading
    import time

    from advface.config import ImageProtectionConfig
    from advface.errors import DeadlineExceededError
    from advface.protect.image.io import encode_png
    from advface.service.image_protection import ImageProtectionService

    service = ImageProtectionService(ImageProtectionConfig(guidance=("encoders",)))
    service._protector = protector  # the module's protector, instead of loading the default ensemble
    data = encode_png(photo)
    options = service.options(data, steps=50)
    gone = threading.Event()
    gone.set()
    with pytest.raises(DeadlineExceededError, match="after 0 of 50 steps"):
        service.protect(data, options, abandoned=gone)
    with pytest.raises(DeadlineExceededError, match="deadline exceeded before protecting"):
        service.protect(data, options, deadline=time.monotonic() - 1)
    png = service.protect(data, service.options(data, steps=1)).png
    assert png.startswith(b"\x89PNG")
