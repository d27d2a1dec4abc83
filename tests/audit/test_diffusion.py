"""The ``diffusion`` attacker of ``advface audit`` on tiny generators: trained on the attacker group and cached,
seeded samples, guidance by the encoder's module, and a ``--generator`` of another encoder refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from advface.audit.attacks import diffusion
from advface.cli.main import main
from advface.generative.config import GeneratorTrainConfig
from advface.generative.model import IdentityGenerator, save_generator

pytestmark = pytest.mark.slow

#: A generator small and short enough for a test: a few steps of each stage on 32 px faces.
TINY = GeneratorTrainConfig(
    image_size=32, ae_width=8, ae_steps=3, ae_batch=8, width=8, steps=3, batch=8, warmup=1, ema_decay=0.5
)


def _tiny_generator(tmp: Path, fingerprint: str) -> IdentityGenerator:
    from advface.generative.training import GeneratorTrainer, TrainingData

    rng = np.random.default_rng(0)
    data = TrainingData(
        rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.normal(0, 0.1, (16, 128)).astype(np.float32)
    )
    metadata = {"encoder": "test", "encoder_fingerprint": fingerprint}
    return GeneratorTrainer(TINY, data, tmp / "work", metadata, progress=False).run()


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory: pytest.TempPathFactory) -> IdentityGenerator:
    return _tiny_generator(tmp_path_factory.mktemp("tiny_generator"), "not-the-audited-encoder")


def test_samples_are_seeded_and_guidance_moves_them(tiny_generator: IdentityGenerator) -> None:
    from advface.encoders import create_encoder

    templates = np.random.default_rng(1).normal(0, 0.1, (3, 128)).astype(np.float32)
    a = diffusion.reconstruct_templates(tiny_generator, templates, seed=0, steps=2)
    b = diffusion.reconstruct_templates(tiny_generator, templates, seed=0, steps=2)
    c = diffusion.reconstruct_templates(tiny_generator, templates, seed=5, steps=2)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    encoder = create_encoder("dlib-torch")
    guided = diffusion.reconstruct_templates(
        tiny_generator,
        templates[:1],
        seed=0,
        steps=2,
        guide_scale=1.0,
        encoder=encoder,
    )
    assert guided.shape == (1, 32, 32, 3) and not np.array_equal(guided[0], a[0])


def _audit(audit_dataset: Path, audit_cache: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "audit",
            "--quick",
            "--data",
            str(audit_dataset),
            "--out",
            str(out),
            "--cache-dir",
            str(audit_cache),
            "--attackers",
            "diffusion",
            "--max-victims",
            "6",
            "--link-keys",
            "1",
            "--transfer-encoder",
            "none",
            "--no-images",
            "--quiet",
            *extra,
        ]
    )


def test_tiny_diffusion_attacker_trains_once_and_is_cached(
    audit_dataset: Path, audit_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[GeneratorTrainConfig] = []
    wanted = diffusion.diffusion_train_config

    def tiny(image_size: int, seed: int, quick: bool) -> GeneratorTrainConfig:
        calls.append(wanted(image_size, seed, quick))
        return replace(TINY, image_size=image_size, seed=seed)

    monkeypatch.setattr(diffusion, "diffusion_train_config", tiny)
    runs = []
    for name in ("first", "again"):
        assert _audit(audit_dataset, audit_cache, tmp_path / name) == 0
        runs.append(json.loads((tmp_path / name / "report.json").read_text()))
    first, again = (r["attacks"]["diffusion"] for r in runs)
    assert first["kind"] == "diffusion" and first["cached"] is False and again["cached"] is True
    assert first["generator"] == "trained by the audit" and first["guidance_scale"] == 0.0
    for kind in ("raw", "protected", "protected+key"):
        entry = first[kind]
        assert entry["n"] == runs[0]["data"]["victims"]
        for fmr in ("fmr_1e-3", "fmr_1e-2"):
            assert 0.0 <= entry[fmr]["type1_success"] <= 1.0
    assert again["raw"] == first["raw"]  # cached generator, seeded samples
    # quick mode asks for a small model at the audit's image size, trained a few hundred steps
    assert calls[0].image_size == 32 and calls[0].steps < GeneratorTrainConfig().steps
    assert len(list((audit_cache / "audit" / "generators").glob("diffusion-32px-s0-*.pt"))) == 1


def test_generator_of_another_encoder_is_a_clear_error(
    tiny_generator: IdentityGenerator,
    audit_dataset: Path,
    audit_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = save_generator(tmp_path / "other.pt", tiny_generator)
    assert _audit(audit_dataset, audit_cache, tmp_path / "out", "--generator", str(ckpt)) == 2
    assert "trained on embeddings of encoder" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any(m["stage"] == "inputs" and "generator" in m["reason"] for m in report["missing"])
    assert "attacks" not in report
