"""The ``diffusion`` attacker of ``advface audit`` on tiny generators: trained on the attacker group and cached,
seeded samples, guidance by the encoder's module, a ``--generator`` of another encoder refused, and a
``--generator`` trained on people who are audited (or of unknown people) refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from audit_helpers import run_quick_audit

from advface.audit.attacks import diffusion
from advface.audit.data import make_split
from advface.datasets.pairs import FacePairs
from advface.datasets.splits import identities_digest, split_identities
from advface.errors import ConfigError
from advface.generative.config import GeneratorTrainConfig
from advface.generative.model import IdentityGenerator, save_generator

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


@pytest.mark.slow
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
    settings = ("--attackers", "diffusion", "--max-victims", "6", "--link-keys", "1", "--transfer-encoder", "none")
    return run_quick_audit(audit_dataset, audit_cache, out, *settings, "--no-images", *extra)


@pytest.mark.slow
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


@pytest.mark.slow
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


def _pairs(names_and_counts: dict[str, int]) -> FacePairs:
    """Tiny pairs (no real faces): ``count`` photos of each named person, each also mirrored."""
    identities = [name for name, count in names_and_counts.items() for _ in range(count)] * 2
    n = len(identities)
    return FacePairs(
        np.array([f"{who}/{i}.jpg" for i, who in enumerate(identities)]),
        np.array(identities),
        np.zeros((n, 128), np.float32),
        np.zeros((n, 4, 4, 3), np.uint8),
        np.arange(n) >= n // 2,
    )


def _metadata(names: list[str], seed: int, group: str = "attacker") -> dict[str, dict[str, object]]:
    """What ``advface train-generator --group GROUP`` records about its training people (split seed ``seed``)."""
    split = split_identities(names, seed=seed)
    return {"training_data": {"group": group, "split_seed": seed, "split": split.describe()}}


PEOPLE = {f"Person_{i:02d}": 1 + i % 3 for i in range(60)}


def test_generator_trained_on_the_audits_attacker_group_is_accepted() -> None:
    pairs = _pairs(PEOPLE)
    names = pairs.identities[~pairs.flipped].tolist()
    split = make_split(pairs, 0, 0.3)
    trained = diffusion.check_training_identities(_metadata(names, 0), pairs, split)
    assert trained == split.attacker and not trained & split.evaluation
    recorded = _metadata(names, 0)
    recorded["training_data"]["identities_sha256"] = identities_digest(split.attacker)
    assert diffusion.check_training_identities(recorded, pairs, split) == split.attacker


def test_generator_whose_recorded_identities_differ_is_refused() -> None:
    """Same split sizes, other people (e.g. a renamed or edited dataset): the recorded digest tells."""
    pairs = _pairs(PEOPLE)
    names = pairs.identities[~pairs.flipped].tolist()
    split = make_split(pairs, 0, 0.3)
    recorded = _metadata(names, 0)
    recorded["training_data"]["identities_sha256"] = identities_digest(sorted(split.attacker)[1:] + ["Someone_Else"])
    with pytest.raises(ConfigError, match="recorded training identities"):
        diffusion.check_training_identities(recorded, pairs, split)


def test_generator_trained_on_audited_people_is_refused() -> None:
    pairs = _pairs(PEOPLE)
    names = pairs.identities[~pairs.flipped].tolist()
    split = make_split(pairs, 0, 0.3)
    other_seed = _metadata(names, 1)  # the attacker group of another split holds some of this audit's people
    assert split_identities(names, seed=1).attacker & split.evaluation
    with pytest.raises(ConfigError, match=r"holds \d+ of the \d+ audited people"):
        diffusion.check_training_identities(other_seed, pairs, split)
    # the audit of a database: its people are the evaluation group, whatever the generator's split says
    audited = set(sorted(split_identities(names, seed=0).attacker)[:2])
    db_split = make_split(pairs, 0, 0.3, evaluation=audited)
    with pytest.raises(ConfigError, match="holds 2 of the 2 audited people"):
        diffusion.check_training_identities(_metadata(names, 0), pairs, db_split)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({}, "does not say which identities"),
        ({"training_data": {"group": "defender", "split_seed": 0, "split": {}}}, "trained on the defender group"),
        ({"training_data": {"group": "attacker"}}, "does not record its identity split"),
        ({"training_data": {"group": "attacker", "split_seed": 0, "split": {"attacker": 5}}}, "another dataset"),
    ],
)
def test_generator_of_unknown_or_other_people_is_refused(metadata: dict[str, object], message: str) -> None:
    pairs = _pairs(PEOPLE)
    with pytest.raises(ConfigError, match=message):
        diffusion.check_training_identities(metadata, pairs, make_split(pairs, 0, 0.3))


@pytest.mark.slow
def test_audit_refuses_a_generator_that_saw_audited_people(
    audit_dataset: Path,
    audit_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from advface.audit.config import AuditConfig
    from advface.audit.stages.inputs import load_dataset
    from advface.encoders import create_encoder

    config = AuditConfig.quick_mode(audit_dataset, tmp_path / "probe", cache_dir=audit_cache, progress=False)
    pairs = load_dataset(config).pairs  # the quick audit's photos with a face (pairs cache of the session)
    names = pairs.identities[~pairs.flipped].tolist()
    audited = make_split(pairs, config.seed, config.eval_fraction).evaluation
    assert split_identities(names, seed=1).attacker & audited
    generator = _tiny_generator(tmp_path / "gen", create_encoder("dlib-torch").fingerprint)
    generator.metadata.update(_metadata(names, 1))  # trained on the attacker group of another split
    ckpt = save_generator(tmp_path / "seen.pt", generator)
    assert _audit(audit_dataset, audit_cache, tmp_path / "out", "--generator", str(ckpt)) == 2
    assert "audited people" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any(m["stage"] == "inputs" and "audited people" in m["reason"] for m in report["missing"])
    assert "attacks" not in report
    # the same model recorded as trained on the quick audit's own attacker group (its split, eval fraction) is used
    generator.metadata["training_data"] = {
        **_metadata(names, config.seed)["training_data"],
        "eval_fraction": config.eval_fraction,
        "split": split_identities(names, seed=config.seed, eval_fraction=config.eval_fraction).describe(),
    }
    ckpt = save_generator(tmp_path / "unseen.pt", generator)
    assert _audit(audit_dataset, audit_cache, tmp_path / "ok", "--generator", str(ckpt)) == 0
    attack = json.loads((tmp_path / "ok" / "report.json").read_text())["attacks"]["diffusion"]
    assert attack["generator"] == str(ckpt) and attack["trained_on"] == "attacker group (given)"
