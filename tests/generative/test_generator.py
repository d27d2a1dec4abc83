"""advface.generative on tiny models: parts, training (resumable, seeded), checkpoints, sampling, threats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from advface.errors import ConfigError, EmbeddingError
from advface.generative.autoencoder import FaceAutoencoder
from advface.generative.config import AutoencoderConfig, DenoiserConfig, GeneratorTrainConfig
from advface.generative.denoiser import LatentDenoiser
from advface.generative.diffusion import alpha_sigma, v_loss
from advface.generative.model import load_generator, save_generator
from advface.generative.threats import (
    FinetuneConfig,
    PersonaliseConfig,
    finetune,
    generate_from_embeddings,
    learn_condition,
    learn_person,
    personalise,
    sample_person,
)
from advface.generative.training import STATE_FILE, GeneratorTrainer, TrainingData

DIM = 8
TINY = GeneratorTrainConfig(
    image_size=16,
    ae_width=8,
    ae_steps=6,
    ae_batch=4,
    width=8,
    multipliers=(1, 2),
    tokens=2,
    steps=8,
    batch=4,
    warmup=2,
    checkpoint_minutes=0,
)


def _data(n: int = 40, seed: int = 0) -> TrainingData:
    rng = np.random.default_rng(seed)
    return TrainingData(
        rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
        rng.normal(size=(n, DIM)).astype(np.float32),
        {"dataset": "synthetic"},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("gen")
    generator = GeneratorTrainer(
        TINY, _data(), work / "work", {"encoder": "tiny", "encoder_fingerprint": "fp-1"}, progress=False
    ).run()
    return save_generator(work / "generator.pt", generator)


def test_parts_have_the_advertised_shapes() -> None:
    ae = FaceAutoencoder(AutoencoderConfig(image_size=32, width=8))
    images = torch.rand(3, 3, 32, 32)
    recon, latents = ae(images)
    assert latents.shape == (3, 4, 8, 8) and recon.shape == images.shape
    assert ae.decode(latents).min() >= 0 and ae.decode(latents).max() <= 1
    ae.calibrate(images)
    with torch.no_grad():
        assert float(ae.encode(images).std()) == pytest.approx(1.0, rel=1e-4)
    dn = LatentDenoiser(DenoiserConfig(latent_size=8, cond_dim=DIM, width=8, multipliers=(1, 2), tokens=2))
    out = dn(latents.detach(), torch.rand(3), torch.randn(3, DIM), torch.tensor([True, False, False]))
    assert out.shape == latents.shape
    with pytest.raises(ValueError):
        LatentDenoiser(DenoiserConfig(latent_size=6, multipliers=(1, 2, 4)))


def test_schedule_and_loss() -> None:
    alpha, sigma = alpha_sigma(torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3))
    assert alpha[0] > 0.99 and alpha[2] < 1e-3 and alpha[1] > alpha[2]
    dn = LatentDenoiser(DenoiserConfig(latent_size=4, cond_dim=DIM, width=8, multipliers=(1, 2), tokens=2))
    x0, e = torch.randn(8, 4, 4, 4), torch.randn(8, DIM)
    loss = v_loss(dn, x0, e, torch.zeros(8, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and float(loss) > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dn.parameters())


def test_training_lowers_the_losses_and_records_metadata(trained: Path) -> None:
    generator = load_generator(trained)
    meta = generator.metadata
    assert meta["encoder_fingerprint"] == "fp-1" and meta["embedding_dim"] == DIM and meta["image_size"] == 16
    assert meta["steps"] == {"autoencoder": 6, "denoiser": 8} and meta["training_data"]["faces"] == 40
    assert meta["parameters"]["denoiser"] > 0 and meta["seed"] == 0


def test_a_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    data = _data()
    uninterrupted = GeneratorTrainer(TINY, data, tmp_path / "a", progress=False).run()
    first = GeneratorTrainer(TINY, data, tmp_path / "b", progress=False)
    first.train_autoencoder()  # stops between the stages, as a kill after a checkpoint would
    resumed = GeneratorTrainer(TINY, data, tmp_path / "b", progress=False)
    assert (resumed.stage, resumed.step) == ("denoiser", 0)
    final = resumed.run()
    for a, b in zip(uninterrupted.denoiser.state_dict().values(), final.denoiser.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other_seed = GeneratorTrainer(
        TINY.__class__(**{**TINY.__dict__, "seed": 1}), data, tmp_path / "c", progress=False
    ).run()
    assert not torch.equal(
        next(iter(other_seed.denoiser.state_dict().values())), next(iter(final.denoiser.state_dict().values()))
    )
    # a work folder of another run (other data) is refused, never silently mixed
    with pytest.raises(ConfigError, match="other settings or data"):
        GeneratorTrainer(TINY, _data(seed=5), tmp_path / "b", progress=False)
    (tmp_path / "b" / STATE_FILE).write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        GeneratorTrainer(TINY, data, tmp_path / "b", progress=False)


def test_checkpoint_checks(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not of this encoder"):
        load_generator(trained, encoder_fingerprint="fp-2")
    assert load_generator(trained, encoder_fingerprint="fp-1").dim == DIM
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(trained.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        load_generator(truncated)
    with pytest.raises(ConfigError, match="not found"):
        load_generator(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "something-else"}, foreign)
    with pytest.raises(ConfigError, match="not an advface-generator checkpoint"):
        load_generator(foreign)


def test_sampling_is_seeded_and_checks_its_input(trained: Path) -> None:
    generator = load_generator(trained)
    e = np.random.default_rng(1).normal(size=(2, DIM)).astype(np.float32)
    a = generator.generate(e, n=3, steps=4, seed=7)
    assert a.shape == (2, 3, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, generator.generate(e, n=3, steps=4, seed=7))
    assert not np.array_equal(a, generator.generate(e, n=3, steps=4, seed=8))
    for bad in (np.full((1, DIM), np.nan, np.float32), np.zeros((1, DIM), np.float32), np.ones((1, DIM + 1))):
        with pytest.raises(EmbeddingError):
            generator.generate(bad)
    faces = generator.generate(e, n=1, steps=2)[:, 0]
    assert generator.purify(faces, 0.4, steps=3).shape == faces.shape
    with pytest.raises(ConfigError):
        generator.purify(faces, 0.0)


def test_personalisation_learns_a_condition_that_fits_the_photos(trained: Path) -> None:
    generator = load_generator(trained)
    photos = _data(4, seed=3).faces
    config = PersonaliseConfig(steps=40, lr=0.1, batch=8)
    learned = learn_condition(generator, photos, config)
    assert learned.shape == (DIM,) and np.isfinite(learned).all()
    latents = generator.encode(photos)

    def loss_of(condition: np.ndarray) -> float:
        gen = torch.Generator().manual_seed(0)
        rows = torch.arange(len(latents)).repeat(16)
        cond = torch.from_numpy(condition)[None].expand(len(rows), -1)
        with torch.no_grad():
            return float(v_loss(generator.denoiser, latents[rows], cond, torch.zeros(len(rows), dtype=torch.bool), gen))

    initial = torch.randn(1, DIM, generator=torch.Generator().manual_seed(config.seed))[0].numpy()
    assert loss_of(learned) < loss_of(initial)
    assert personalise(generator, photos, 2, config=PersonaliseConfig(steps=2), steps=2).shape == (2, 16, 16, 3)
    with pytest.raises(ConfigError):
        learn_condition(generator, photos[:0])


class _TinyEncoder:
    """Stands in for a FaceEncoder with a differentiable module: a fixed random conv net, 16 px chips, 8-d."""

    metric = "euclidean"

    def __init__(self) -> None:
        torch.manual_seed(5)
        self.module = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.LazyLinear(DIM)
        )
        self.module(torch.zeros(1, 3, 16, 16))
        self.chip = type("Chip", (), {"size": 16})()

    def torch_module(self, device: str | None = None) -> torch.nn.Module:
        return self.module


def test_identity_guidance_pulls_faces_towards_their_embeddings(trained: Path) -> None:
    generator = load_generator(trained)
    encoder = _TinyEncoder()
    targets = np.random.default_rng(4).normal(size=(3, DIM)).astype(np.float32)

    def distance(faces: np.ndarray) -> float:
        images = torch.from_numpy(faces.reshape(-1, 16, 16, 3)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            emb = encoder.module(images).numpy()
        return float(np.linalg.norm(emb - np.repeat(targets, 2, axis=0), axis=1).mean())

    plain = generate_from_embeddings(generator, targets, 2, steps=4, seed=1)
    guided = generate_from_embeddings(generator, targets, 2, steps=4, seed=1, encoder=encoder, guide_scale=2.0)  # type: ignore[arg-type]
    assert guided.shape == plain.shape == (3, 2, 16, 16, 3)
    assert distance(guided) < distance(plain)
    with pytest.raises(ConfigError, match="differentiable"):
        generate_from_embeddings(generator, targets, 1, steps=2, guide_scale=1.0)
    with pytest.raises(ConfigError, match="one per embedding"):
        generate_from_embeddings(
            generator,
            targets,
            1,
            steps=2,
            encoder=encoder,
            guide_scale=1.0,
            guide_targets=targets[:2],  # type: ignore[arg-type]
        )


def test_guided_personalisation_pulls_the_learned_person_towards_the_target(trained: Path) -> None:
    generator = load_generator(trained)
    encoder = _TinyEncoder()
    photos = _data(3, seed=9).faces
    target = np.random.default_rng(6).normal(size=DIM).astype(np.float32)
    config = FinetuneConfig(steps=3, batch=4)

    def distance(faces: np.ndarray) -> float:
        images = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            emb = encoder.module(images).numpy()
        return float(np.linalg.norm(emb - target, axis=1).mean())

    plain = personalise(generator, photos, 3, config=config, steps=4, seed=2)
    guided = personalise(
        generator,
        photos,
        3,
        config=config,
        steps=4,
        seed=2,
        encoder=encoder,
        guide_scale=2.0,
        guide_target=target,  # type: ignore[arg-type]
    )
    assert guided.shape == plain.shape == (3, 16, 16, 3)
    assert distance(guided) < distance(plain)
    unguided = personalise(generator, photos, 3, config=config, steps=4, seed=2, guide_scale=0.0, guide_target=target)
    np.testing.assert_array_equal(unguided, plain)  # scale 0: the canonical threat, untouched
    with pytest.raises(ConfigError, match="target embedding"):
        personalise(generator, photos, 1, config=config, steps=2, encoder=encoder, guide_scale=1.0)  # type: ignore[arg-type]


def test_finetuning_fits_the_photos_and_leaves_the_original_alone(trained: Path) -> None:
    generator = load_generator(trained)
    before = {k: v.clone() for k, v in generator.denoiser.state_dict().items()}
    photos = _data(3, seed=7).faces
    embeddings = _data(3, seed=8).embeddings
    latents = generator.encode(np.concatenate([photos, photos[:, :, ::-1]]))

    def loss_of(model: torch.nn.Module, condition: np.ndarray) -> float:
        gen = torch.Generator().manual_seed(0)
        rows = torch.arange(len(latents)).repeat(8)
        cond = torch.from_numpy(condition)[None].expand(len(rows), -1)
        with torch.no_grad():
            return float(v_loss(model, latents[rows], cond, torch.zeros(len(rows), dtype=torch.bool), gen))

    config = FinetuneConfig(steps=30, lr=1e-3, batch=8)
    tuned, condition = finetune(generator, photos, config, embeddings=embeddings)
    start = embeddings.mean(axis=0)
    assert condition.shape == (DIM,) and not np.allclose(condition, start)
    assert loss_of(tuned.denoiser, condition) < loss_of(generator.denoiser, start)
    for key, value in generator.denoiser.state_dict().items():
        torch.testing.assert_close(value, before[key])  # the attacker's copy changed, the model did not
    assert any(not torch.equal(v, before[k]) for k, v in tuned.denoiser.state_dict().items())
    faces = personalise(generator, photos, 2, config=FinetuneConfig(steps=2, batch=4), steps=2)
    assert faces.shape == (2, 16, 16, 3)
    with pytest.raises(ConfigError):
        finetune(generator, photos[:0])


def test_one_learned_person_is_sampled_at_several_guidance_scales(trained: Path) -> None:
    generator = load_generator(trained)
    photos = _data(3, seed=7).faces
    config = FinetuneConfig(steps=2, batch=4, seed=5)
    model, condition = learn_person(generator, photos, config)
    assert model is not generator  # the DreamBooth analogue fine-tunes a copy
    by_scale = {g: sample_person(model, condition, 2, steps=3, guidance=g, seed=1) for g in (1.0, 3.0, 6.0)}
    for g, faces in by_scale.items():  # the same as learning and sampling in one call, at each scale
        np.testing.assert_array_equal(
            faces, personalise(generator, photos, 2, config=config, steps=3, guidance=g, seed=1)
        )
    assert not np.array_equal(by_scale[1.0], by_scale[6.0])  # the scale changes the faces
    same, learned = learn_person(generator, photos, PersonaliseConfig(steps=2))
    assert same is generator and learned.shape == (DIM,)  # textual inversion: the model as it is
    with pytest.raises(ConfigError, match="target embedding"):
        sample_person(model, condition, 1, guide_scale=1.0)
