"""Extra training faces from the packaged DCGAN (``advface train-generator --extra-dcgan N``): sampled, detected,
aligned and embedded like photos; deterministic for a seed, counted, cached in the work folder, recorded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gan_face_generate")

from advface.cli.main import main  # noqa: E402
from advface.encoders import create_encoder  # noqa: E402
from advface.encoders.base import FaceEncoder  # noqa: E402
from advface.errors import ConfigError  # noqa: E402
from advface.faces.detect import DlibDetector, Face  # noqa: E402
from advface.generative.config import GeneratorTrainConfig  # noqa: E402
from advface.generative.extra_faces import (  # noqa: E402
    CACHE_FILE,
    cached_dcgan_faces,
    dcgan_faces,
    with_extra_faces,
)
from advface.generative.model import load_generator  # noqa: E402
from advface.generative.training import GeneratorTrainer, TrainingData  # noqa: E402

N = 6
SIZE = 16


@pytest.fixture(scope="module")
def encoder() -> FaceEncoder:
    return create_encoder("dlib")


class _MissEveryOther(DlibDetector):
    """dlib's detector that finds nothing in every second image it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def detect(self, image: np.ndarray) -> list[Face]:
        self.calls += 1
        return [] if self.calls % 2 == 0 else super().detect(image)


def test_dcgan_samples_are_seeded_and_checked() -> None:
    from advface.audit.attacks.gan_prior import sample_faces

    a = sample_faces(3, 7)
    assert a.shape == (3, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, sample_faces(3, 7, batch_size=2))
    assert not np.array_equal(a, sample_faces(3, 8))
    assert sample_faces(0, 7).shape == (0, 64, 64, 3)
    with pytest.raises(ConfigError, match=">= 0"):
        sample_faces(-2, 7)


def test_same_seed_same_faces_other_seed_other_faces(encoder: FaceEncoder) -> None:
    a = dcgan_faces(N, encoder, seed=3, image_size=SIZE, progress=False)
    b = dcgan_faces(N, encoder, seed=3, image_size=SIZE, progress=False)
    c = dcgan_faces(N, encoder, seed=4, image_size=SIZE, progress=False)
    assert a.kept > 0 and a.faces.shape == (2 * a.kept, SIZE, SIZE, 3) and a.embeddings.shape == (2 * a.kept, 128)
    np.testing.assert_array_equal(a.faces, b.faces)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.faces.shape != c.faces.shape or not np.array_equal(a.faces, c.faces)
    # every face is paired with its own embedding: the mirrored copy is embedded anew, near but not equal
    assert not np.array_equal(a.embeddings[0], a.embeddings[1])
    assert np.linalg.norm(a.embeddings[0] - a.embeddings[1]) < 0.6


def test_samples_without_a_face_are_dropped_and_counted(encoder: FaceEncoder) -> None:
    full = dcgan_faces(N, encoder, seed=3, image_size=SIZE, progress=False)
    detector = _MissEveryOther()
    half = dcgan_faces(N, encoder, seed=3, image_size=SIZE, detector=detector, progress=False)
    assert detector.calls == N
    described = half.describe()
    assert described["sampled"] == N
    assert described["dropped_no_face"] == N - half.kept
    assert len(half.faces) == 2 * half.kept
    # the samples the detector skipped (1, 3, 5, ...) are missing, not replaced by others
    expected = [int(k) for k in full.indices if k % 2 == 0]
    assert half.indices.tolist() == expected and half.kept == len(expected) < full.kept
    rows = [2 * full.indices.tolist().index(k) for k in expected]
    np.testing.assert_array_equal(half.faces[::2], full.faces[rows])
    np.testing.assert_array_equal(half.embeddings[1::2], full.embeddings[[r + 1 for r in rows]])


def test_negative_or_non_integer_counts_are_refused(encoder: FaceEncoder, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--extra-dcgan must be an integer >= 0"):
        dcgan_faces(-1, encoder, seed=0)
    with pytest.raises(ConfigError, match="--extra-dcgan must be an integer >= 0"):
        GeneratorTrainConfig(extra_dcgan=-5).check()
    with pytest.raises(ConfigError, match="--extra-dcgan must be an integer >= 0"):
        GeneratorTrainConfig(extra_dcgan=2.5).check()  # type: ignore[arg-type]
    out = tmp_path / "g.pt"
    argv = ["train-generator", "--dataset", str(tmp_path), "--group", "attacker", "--out", str(out)]
    assert main([*argv, "--extra-dcgan", "-1", "-q"]) == 2
    assert not out.exists() and not (tmp_path / "g.pt.work").exists()


def test_zero_extra_faces_leave_old_work_folders_resumable() -> None:
    assert "extra_dcgan" not in GeneratorTrainConfig().identity()
    assert GeneratorTrainConfig(extra_dcgan=3).identity()["extra_dcgan"] == 3


def test_cache_is_reused_and_bound_to_its_settings(encoder: FaceEncoder, tmp_path: Path) -> None:
    first = cached_dcgan_faces(tmp_path, N, encoder, seed=3, image_size=SIZE, progress=False)
    assert (tmp_path / CACHE_FILE).is_file()
    np.testing.assert_array_equal(first.faces, dcgan_faces(N, encoder, seed=3, image_size=SIZE, progress=False).faces)
    # a resumed run reads the file: change it and the change shows
    with np.load(tmp_path / CACHE_FILE) as npz:
        payload = dict(npz)
    payload["embeddings"] = payload["embeddings"] + 1
    np.savez(tmp_path / CACHE_FILE, **payload)
    again = cached_dcgan_faces(tmp_path, N, encoder, seed=3, image_size=SIZE, progress=False)
    np.testing.assert_array_equal(again.embeddings, first.embeddings + 1)
    with pytest.raises(ConfigError, match="other settings"):
        cached_dcgan_faces(tmp_path, N, encoder, seed=4, image_size=SIZE, progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        cached_dcgan_faces(tmp_path, N + 1, encoder, seed=3, image_size=SIZE, progress=False)


def test_checkpoint_metadata_records_the_extra_faces(encoder: FaceEncoder, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    photos = TrainingData(
        rng.integers(0, 255, (10, SIZE, SIZE, 3), dtype=np.uint8),
        rng.normal(size=(10, 128)).astype(np.float32),
        {"dataset": "synthetic", "group": "attacker"},
    )
    extra = dcgan_faces(N, encoder, seed=3, image_size=SIZE, progress=False)
    data = with_extra_faces(photos, extra)
    assert len(data.faces) == 10 + 2 * extra.kept
    np.testing.assert_array_equal(data.embeddings[10:], extra.embeddings)
    config = GeneratorTrainConfig(
        image_size=SIZE,
        ae_width=8,
        ae_steps=2,
        ae_batch=4,
        width=8,
        multipliers=(1, 2),
        tokens=2,
        steps=2,
        batch=4,
        warmup=1,
        seed=3,
        extra_dcgan=N,
        checkpoint_minutes=0,
    )
    generator = GeneratorTrainer(config, data, tmp_path / "work", progress=False).run()
    recorded = generator.metadata["training_data"]
    assert recorded["faces"] == 10 + 2 * extra.kept
    assert recorded["group"] == "attacker"
    assert recorded["extra_dcgan"]["sampled"] == N
    assert recorded["extra_dcgan"]["kept"] == extra.kept
    assert recorded["extra_dcgan"]["seed"] == 3
    assert generator.metadata["train_config"]["extra_dcgan"] == N
    with pytest.raises(ConfigError, match="do not fit"):
        with_extra_faces(photos, dcgan_faces(2, encoder, seed=3, image_size=2 * SIZE, progress=False))


@pytest.mark.slow
def test_train_generator_with_extra_dcgan_faces_and_resume(
    lfw_sample: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADVFACE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "faces"
    for path in lfw_sample[:24]:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        (root / path.parent.name / path.name).write_bytes(path.read_bytes())
    model = tmp_path / "generator.pt"
    train = ["train-generator", "--dataset", str(root), "--group", "attacker", "--out", str(model)]
    train += ["--image-size", "16", "--ae-steps", "2", "--steps", "2", "--batch", "4", "--width", "8", "--seed", "5"]
    train += ["--extra-dcgan", str(N), "-q"]
    assert main(train) == 0
    meta = load_generator(model).metadata
    extra = meta["training_data"]["extra_dcgan"]
    assert extra["sampled"] == N and extra["seed"] == 5 and 0 < extra["kept"] <= N
    assert extra["dropped_no_face"] == N - extra["kept"]
    assert meta["training_data"]["faces"] == 2 * meta["training_data"]["photos"] + 2 * extra["kept"]
    cache = tmp_path / "generator.pt.work" / CACHE_FILE
    made = cache.stat().st_mtime_ns
    # the same command resumes from the work folder with the cached faces (not made again) and the same model
    assert main(train) == 0
    assert cache.stat().st_mtime_ns == made
    again = load_generator(model)
    assert again.metadata["training_data"]["fingerprint"] == meta["training_data"]["fingerprint"]
    # another count is another run: refused in this work folder
    assert main([*train[:-3], "--extra-dcgan", str(N + 1), "-q"]) == 2


def test_a_trained_autoencoder_can_be_adopted_only_before_training(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = TrainingData(
        rng.integers(0, 255, (12, SIZE, SIZE, 3), dtype=np.uint8), rng.normal(size=(12, 8)).astype(np.float32)
    )
    config = GeneratorTrainConfig(
        image_size=SIZE, ae_width=8, ae_steps=2, ae_batch=4, width=8, multipliers=(1, 2), tokens=2, steps=2, batch=4
    )
    donor = GeneratorTrainer(config, data, tmp_path / "donor", progress=False).run()
    fresh = GeneratorTrainer(config, data, tmp_path / "fresh", progress=False)
    fresh.adopt_autoencoder(donor.autoencoder, "donor.pt")
    assert fresh.stage == "denoiser" and fresh.step == 0
    model = fresh.run()
    assert model.metadata["autoencoder_from"] == "donor.pt"
    for mine, theirs in zip(model.autoencoder.state_dict().values(), donor.autoencoder.state_dict().values()):
        assert np.array_equal(mine.numpy(), theirs.numpy())
    # resumed from its work folder, the run keeps the adopted autoencoder; adopting again is refused
    resumed = GeneratorTrainer(config, data, tmp_path / "fresh", progress=False)
    assert resumed.stage == "done"
    with pytest.raises(ConfigError, match="training has started"):
        resumed.adopt_autoencoder(donor.autoencoder, "donor.pt")
    other = GeneratorTrainer(dataclasses.replace(config, ae_width=16), data, tmp_path / "other", progress=False)
    with pytest.raises(ConfigError, match="adopted autoencoder"):
        other.adopt_autoencoder(donor.autoencoder, "donor.pt")
