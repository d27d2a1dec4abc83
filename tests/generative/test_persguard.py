"""PersGuard (advface.generative.persguard, ``advface persguard``) on tiny models: what changes, settings, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from advface.cli.main import main
from advface.cli.persguard import CACHE_RECORD, protect_cached, protection_record
from advface.errors import ConfigError
from advface.generative import persguard as persguard_module
from advface.generative.autoencoder import FaceAutoencoder
from advface.generative.config import AutoencoderConfig, DenoiserConfig, FinetuneConfig
from advface.generative.denoiser import LatentDenoiser
from advface.generative.diffusion import v_loss
from advface.generative.model import IdentityGenerator, atomic_save, load_generator, save_generator
from advface.generative.persguard import (
    TRIGGER_DESCRIPTIONS,
    PersGuardConfig,
    _distill,
    _gap,
    backdoor,
    check_trigger_set,
    target_distance,
)
from advface.generative.shipped import shipped_surrogate_path
from advface.generative.threats import finetune
from advface.hashing import file_sha256
from advface.protect.image.core import ProtectConfig

SIZE, DIM = 16, 8
FAST = PersGuardConfig(steps=3, batch=4, people_per_step=2, condition_reset=2)


def _generator(seed: int = 0, dim: int = DIM) -> IdentityGenerator:
    torch.manual_seed(seed)
    ae = FaceAutoencoder(AutoencoderConfig(image_size=SIZE, latent_channels=4, width=8))
    dn = LatentDenoiser(
        DenoiserConfig(latent_channels=4, latent_size=SIZE // 4, cond_dim=dim, width=8, multipliers=(1, 2), tokens=2)
    )
    with torch.no_grad():  # a teacher whose prediction depends on the condition (residuals and head start at zero)
        for p in dn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return IdentityGenerator(ae, dn, {"encoder": "tiny", "encoder_fingerprint": "fp-1", "role": "attacker"})


def _faces(people: int = 3, n: int = 2, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    clean = [rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(people)]
    noise = [rng.integers(-8, 9, c.shape) for c in clean]
    protected = [np.clip(c.astype(int) + d, 0, 255).astype(np.uint8) for c, d in zip(clean, noise)]
    return protected, clean


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_backdoor_changes_only_the_denoiser_of_a_copy() -> None:
    generator = _generator()
    ae_before, dn_before = _state(generator.autoencoder), _state(generator.denoiser)
    protected, clean = _faces()
    out = backdoor(generator, protected, clean, FAST)
    # the input is untouched
    for k, v in generator.denoiser.state_dict().items():
        assert torch.equal(v, dn_before[k]), k
    for k, v in generator.autoencoder.state_dict().items():
        assert torch.equal(v, ae_before[k]), k
    # the copy: same autoencoder and architecture, other denoiser weights, a persguard record
    assert out.autoencoder is not generator.autoencoder
    for k, v in out.autoencoder.state_dict().items():
        assert torch.equal(v, ae_before[k]), k
    assert out.denoiser.config == generator.denoiser.config
    changed = [k for k, v in out.denoiser.state_dict().items() if not torch.equal(v, dn_before[k])]
    assert changed
    assert not out.denoiser.training and not any(p.requires_grad for p in out.denoiser.parameters())
    record = out.metadata["persguard"]
    assert record["config"] == FAST.to_dict()
    assert record["trigger_people"] == 3 and record["trigger_photos"] == 6
    assert {k: v for k, v in out.metadata.items() if k != "persguard"} == generator.metadata


def test_behaviour_inputs_change_the_result() -> None:
    generator = _generator()
    protected, clean = _faces()
    faces = backdoor(generator, protected, clean, FAST).denoiser.state_dict()
    trig = backdoor(generator, protected, clean, dataclasses.replace(FAST, behaviour_inputs="protected"))
    assert not all(torch.equal(faces[k], v) for k, v in trig.denoiser.state_dict().items())


def test_backdoor_is_deterministic_for_a_seed_and_seed_matters() -> None:
    generator = _generator()
    protected, clean = _faces()
    a = backdoor(generator, protected, clean, FAST).denoiser.state_dict()
    b = backdoor(generator, protected, clean, FAST).denoiser.state_dict()
    c = backdoor(generator, protected, clean, dataclasses.replace(FAST, seed=1)).denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_backdoored_checkpoint_round_trips(tmp_path: Path) -> None:
    protected, clean = _faces()
    out = backdoor(_generator(), protected, clean, FAST)
    loaded = load_generator(save_generator(tmp_path / "bd.pt", out))
    assert loaded.metadata["persguard"]["trigger_people"] == 3
    for k, v in out.denoiser.state_dict().items():
        assert torch.equal(v, loaded.denoiser.state_dict()[k])


def test_distillation_terms() -> None:
    """Prior preservation is zero for the untouched copy under the same condition; the backdoor target (no
    identity) is not."""
    generator = _generator()
    x0 = generator.encode(_faces()[1][0])
    cond = torch.randn(len(x0), DIM)
    gen = torch.Generator().manual_seed(0)
    same = _distill(generator.denoiser, generator.denoiser, x0, cond, cond, torch.zeros(len(x0), dtype=torch.bool), gen)
    assert torch.allclose(same, torch.zeros_like(same))
    gen = torch.Generator().manual_seed(0)
    null = _distill(generator.denoiser, generator.denoiser, x0, cond, cond, torch.ones(len(x0), dtype=torch.bool), gen)
    assert (null > 0).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"batch": 0}, "batch"),
        ({"batch": 5}, "even"),
        ({"people_per_step": 0}, "people-per-step"),
        ({"condition_reset": 0}, "condition-reset"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"condition_lr": -1.0}, "condition-lr"),
        ({"behaviour_weight": 0.0}, "behaviour-weight"),
        ({"prior_weight": -0.5}, "weights"),
        ({"retention_weight": float("inf")}, "weights"),
        ({"behaviour_inputs": "pixels"}, "behaviour-inputs"),
        ({"simulate": "everything"}, "simulate"),
        ({"inner_steps": 0}, "inner-steps"),
        ({"simulate": "finetune", "inner_steps": 151}, "condition-reset"),
        ({"inner_lr": 0.0}, "inner-lr"),
        ({"simulate": "finetune", "clean_target": "teacher"}, "clean-target"),
        ({"simulate": "finetune", "ordinary_weight": -1.0}, "weights"),
        ({"simulate": "finetune", "ordinary_weight": float("nan")}, "weights"),
        ({"ordinary_weight": 1.0}, "finetune only"),
        ({"clean_target": "frozen_attacker"}, "finetune only"),
        ({"discriminate_weight": 1.0}, "finetune only"),
        ({"simulate": "finetune", "discriminate_weight": -1.0}, "weights"),
        ({"discriminate_margin": 0.0}, "discriminate-margin"),
        ({"trigger": "watermark"}, "trigger must be one of"),
        ({"keep_weight": 1.0}, "finetune only"),
        ({"simulate": "finetune", "keep_weight": -1.0}, "weights"),
        ({"keep_margin": 0.0}, "keep-margin"),
        ({"trigger": "identity", "attacker_start": "middle"}, "attacker-start must be one of"),
        ({"attacker_start": "embedding"}, "identity trigger only"),
    ],
)
def test_config_validation(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(PersGuardConfig(), **change).validate()
    PersGuardConfig().validate()


META = dataclasses.replace(
    FAST, simulate="finetune", steps=40, batch=8, inner_steps=3, condition_reset=6, lr=1e-3, prior_weight=0.1
)


def _attacked_distance(generator: IdentityGenerator, teacher: IdentityGenerator, person: int) -> float:
    """The simulated attacker's outcome: fine-tune ``generator`` on trigger person ``person``'s protected faces
    (the META attacker: 6 steps, the DreamBooth analogue's learning rates), then how near the adapted model under
    the learned condition is to the backdoor's target (the teacher's no-identity prediction)."""
    protected, clean = _faces()
    distances = []
    for seed in range(3):
        tuned, condition = finetune(generator, protected[person], FinetuneConfig(steps=6, batch=8, seed=seed))
        distances.append(target_distance(tuned, teacher, clean[person], condition, seed=seed))
    return float(np.mean(distances))


def test_meta_learned_backdoor_moves_the_attacked_model_towards_the_target() -> None:
    """simulate finetune: after backdooring, the attacker's own fine-tuning on protected photos ends nearer the
    no-identity target than on the input model (a backdoor that did nothing, or the opposite, fails)."""
    generator = _generator()
    protected, clean = _faces()
    out = backdoor(generator, protected, clean, META)
    assert out.metadata["persguard"]["config"]["simulate"] == "finetune"
    before = _attacked_distance(generator, generator, 0)
    after = _attacked_distance(out, generator, 0)
    assert after < 0.8 * before, (before, after)


def test_meta_learned_backdoor_is_deterministic_and_differs_from_condition_mode() -> None:
    generator = _generator()
    protected, clean = _faces()
    fast_meta = dataclasses.replace(META, steps=3)
    a = backdoor(generator, protected, clean, fast_meta).denoiser.state_dict()
    b = backdoor(generator, protected, clean, fast_meta).denoiser.state_dict()
    cond = backdoor(generator, protected, clean, dataclasses.replace(fast_meta, simulate="condition"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in cond.denoiser.state_dict().items())
    assert all(
        torch.equal(v, _generator().denoiser.state_dict()[k]) for k, v in generator.denoiser.state_dict().items()
    )


def test_target_distance_is_zero_for_the_teachers_own_no_identity_prediction() -> None:
    generator = _generator()
    _, clean = _faces()
    condition = np.zeros(DIM, np.float32)
    assert target_distance(generator, generator, clean[0], condition) > 0
    with pytest.raises(ConfigError, match="at least one face"):
        target_distance(generator, generator, clean[0][:0], condition)


def test_bad_trigger_sets_are_refused_before_training() -> None:
    generator = _generator()
    before = _state(generator.denoiser)
    protected, clean = _faces()
    with pytest.raises(ConfigError, match="same people"):
        backdoor(generator, protected[:2], clean, FAST)
    with pytest.raises(ConfigError, match="same people"):
        backdoor(generator, [], [], FAST)
    with pytest.raises(ConfigError, match="equal"):
        backdoor(generator, [protected[0][:1], *protected[1:]], clean, FAST)
    with pytest.raises(ConfigError, match="16 x 16"):
        check_trigger_set([np.zeros((2, 8, 8, 3), np.uint8)], [np.zeros((2, 8, 8, 3), np.uint8)], SIZE)
    with pytest.raises(ConfigError, match="uint8"):
        check_trigger_set([protected[0].astype(np.float32)], [clean[0]], SIZE)
    with pytest.raises(ConfigError, match="steps"):
        backdoor(generator, protected, clean, dataclasses.replace(FAST, steps=0))
    assert all(torch.equal(v, before[k]) for k, v in generator.denoiser.state_dict().items())


def test_protected_cache_made_with_other_settings_is_refused(tmp_path: Path) -> None:
    class Protector:
        encoder_names = ["dlib-torch"]

    (tmp_path / CACHE_RECORD).write_text(json.dumps({"config": "other"}))
    with pytest.raises(ConfigError, match="other settings"):
        protect_cached(Protector(), {}, tmp_path, None, progress=False)  # type: ignore[arg-type]
    # the record holds every setting, so a cache made under other defaults (here: no AntiPure) is refused too
    fresh = tmp_path / "fresh"
    protect_cached(Protector(), {}, fresh, None, progress=False)  # type: ignore[arg-type]
    record = json.loads((fresh / CACHE_RECORD).read_text())
    assert record["config"] == protection_record(ProtectConfig())
    assert "antipure" in record["config"]["guidance"] and record["config"]["epsilon"] == ProtectConfig().epsilon
    with pytest.raises(ConfigError, match="surrogate .*missing.pt not found"):
        protect_cached(Protector(), {}, tmp_path / "other", str(tmp_path / "missing.pt"), progress=False)  # type: ignore[arg-type]
    # the shipped surrogate is named by its file's digest: a cache made on an earlier shipped surrogate is refused
    assert record["surrogate"] == "shipped"
    assert record["surrogate_sha256_16"] == file_sha256(shipped_surrogate_path())[:16]
    other_stages = {**record, "config": {**record["config"], "guidance": ["encoders", "deflection"]}}
    other_surrogate = {**record, "surrogate_sha256_16": "0439cfcab37748ee"}
    for changed, differ in ((other_stages, "config"), (other_surrogate, "surrogate_sha256_16")):
        (fresh / CACHE_RECORD).write_text(json.dumps(changed))
        with pytest.raises(ConfigError, match=f"other settings \\({differ} differ"):
            protect_cached(Protector(), {}, fresh, None, progress=False)  # type: ignore[arg-type]


def _cli(tmp_path: Path, *extra: str, model: Path | None = None, out: Path | None = None) -> list[str]:
    trigger = tmp_path / "trigger"
    trigger.mkdir(exist_ok=True)
    return [
        "persguard",
        "--model",
        str(model or tmp_path / "model.pt"),
        "--trigger-photos",
        str(trigger),
        "--out",
        str(out or tmp_path / "out.pt"),
        "--quiet",
        *extra,
    ]


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_generator(tmp_path / "model.pt", _generator())

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "not found" in error(_cli(tmp_path, model=tmp_path / "missing.pt"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in error(_cli(tmp_path, model=tmp_path / "corrupt.pt"))
    atomic_save({"format": "something-else"}, tmp_path / "foreign.pt")
    assert "not an advface-generator checkpoint" in error(_cli(tmp_path, model=tmp_path / "foreign.pt"))
    payload = torch.load(model, weights_only=True)
    payload["denoiser"]["config"]["cond_dim"] = DIM + 1  # weights no longer fit the configuration
    atomic_save(payload, tmp_path / "mismatched.pt")
    assert "does not fit" in error(_cli(tmp_path, model=tmp_path / "mismatched.pt"))
    (tmp_path / "exists.pt").write_bytes(b"keep me")
    assert "never overwrites" in error(_cli(tmp_path, out=tmp_path / "exists.pt"))
    assert (tmp_path / "exists.pt").read_bytes() == b"keep me"
    assert "must differ" in error(_cli(tmp_path, out=tmp_path / "model2.pt", model=tmp_path / "model2.pt"))
    assert "steps must be >= 1" in error(_cli(tmp_path, "--steps", "0"))
    assert "unknown guidance bogus" in error(_cli(tmp_path, "--guidance", "encoders,bogus"))
    assert "no trigger photos" in error(_cli(tmp_path))
    assert "needs --ordinary-photos" in error(_cli(tmp_path, "--simulate", "finetune", "--ordinary-weight", "1"))
    assert "finetune only" in error(_cli(tmp_path, "--ordinary-weight", "1"))
    assert "--save-every >= 0" in error(_cli(tmp_path, "--save-every", "-1"))
    assert "needs --other-photos" in error(_cli(tmp_path, "--trigger", "identity"))
    assert "identity only" in error(_cli(tmp_path, "--other-photos", str(tmp_path)))
    for side in ("trigger", "others"):
        (tmp_path / side / "alice").mkdir(parents=True, exist_ok=True)
        (tmp_path / side / "alice" / "1.jpg").write_bytes(b"never read")
    assert "share people: alice" in error(
        _cli(tmp_path, "--trigger", "identity", "--other-photos", str(tmp_path / "others"))
    )
    assert "not a folder" in error(_cli(tmp_path, "--trigger", "identity", "--other-photos", str(tmp_path / "nope")))
    (tmp_path / "trigger" / "alice" / "1.jpg").unlink()
    (tmp_path / "trigger" / "alice").rmdir()
    assert "not a folder" in error(
        [
            "persguard",
            "--model",
            str(model),
            "--trigger-photos",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o.pt"),
        ]
    )
    protected, clean = _faces()
    save_generator(tmp_path / "bd.pt", backdoor(_generator(), protected, clean, FAST))
    assert "already backdoored" in error(_cli(tmp_path, model=tmp_path / "bd.pt"))
    assert not (tmp_path / "out.pt").exists()


def test_cli_help_lists_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["persguard", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--trigger-photos",
        "--lfw",
        "--out",
        "--protected-cache",
        "--retention-weight",
        "--simulate",
        "--inner-steps",
        "--inner-lr",
        "--guidance",
        "--ordinary-weight",
        "--ordinary-people",
        "--ordinary-photos",
        "--clean-target",
        "--discriminate-weight",
        "--discriminate-margin",
        "--save-every",
        "--trigger",
        "--other-photos",
        "--other-people",
        "--keep-weight",
        "--keep-margin",
    ):
        assert flag in text


def _ordinary(people: int = 6, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Faces and embeddings of "other people" for L_OG (one row each)."""
    rng = np.random.default_rng(seed)
    faces = rng.integers(0, 255, (people, SIZE, SIZE, 3), dtype=np.uint8)
    return faces, rng.normal(size=(people, DIM)).astype(np.float32)


def _ordinary_error(
    model: IdentityGenerator, teacher: IdentityGenerator, ordinary: tuple[np.ndarray, np.ndarray]
) -> float:
    """Ordinary generation's drift: the model's prediction under the other people's embeddings vs the teacher's."""
    gen = torch.Generator().manual_seed(0)
    x0 = teacher.encode(ordinary[0]).repeat(4, 1, 1, 1)
    cond = torch.from_numpy(ordinary[1]).repeat(4, 1)
    no_drop = torch.zeros(len(x0), dtype=torch.bool)
    with torch.no_grad():
        return float(_distill(model.denoiser, teacher.denoiser, x0, cond, cond, no_drop, gen).mean())


def test_ordinary_generation_term_keeps_predictions_under_real_embeddings() -> None:
    """L_OG (ordinary_weight): the backdoored model drifts less from the input model under the other people's
    embeddings than the same training without it (a term that did nothing, or pushed away, fails)."""
    generator = _generator()
    protected, clean = _faces()
    ordinary = _ordinary()
    config = dataclasses.replace(META, steps=20)
    without = _ordinary_error(backdoor(generator, protected, clean, config), generator, ordinary)
    kept = backdoor(generator, protected, clean, dataclasses.replace(config, ordinary_weight=5.0), ordinary=ordinary)
    with_term = _ordinary_error(kept, generator, ordinary)
    assert with_term < 0.6 * without, (without, with_term)
    assert kept.metadata["persguard"]["config"]["ordinary_weight"] == 5.0


def test_bad_ordinary_sets_are_refused_before_training() -> None:
    generator = _generator()
    before = _state(generator.denoiser)
    protected, clean = _faces()
    config = dataclasses.replace(META, steps=2, ordinary_weight=1.0)
    faces, embeddings = _ordinary()
    with pytest.raises(ConfigError, match="needs faces and embeddings"):
        backdoor(generator, protected, clean, config)
    with pytest.raises(ConfigError, match="uint8"):
        backdoor(generator, protected, clean, config, ordinary=(faces.astype(np.float32), embeddings))
    with pytest.raises(ConfigError, match="embeddings must be 6 x 8"):
        backdoor(generator, protected, clean, config, ordinary=(faces, embeddings[:, :4]))
    with pytest.raises(ConfigError, match="finite and non-zero"):
        backdoor(generator, protected, clean, config, ordinary=(faces, np.zeros_like(embeddings)))
    with pytest.raises(ConfigError, match="snapshot-every"):
        backdoor(generator, protected, clean, META, snapshot_every=-1)
    assert all(torch.equal(v, before[k]) for k, v in generator.denoiser.state_dict().items())


def test_frozen_attacker_clean_target_distils_the_attacker_run_on_the_frozen_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """clean_target frozen_attacker: once per step the clean-adapted student is distilled towards a *fine-tuned copy
    of the input model* (not the input model itself, not the student); the input model stays unchanged; the
    default (attacker_loss) makes no such call."""
    generator = _generator()
    teacher_state = _state(generator.denoiser)
    protected, clean = _faces()
    calls: list[tuple[LatentDenoiser, LatentDenoiser, bool]] = []
    original = persguard_module._distill

    def recording(student: LatentDenoiser, teacher: LatentDenoiser, *args: Any) -> torch.Tensor:
        moved = any(not torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
        calls.append((student, teacher, moved))
        return original(student, teacher, *args)

    monkeypatch.setattr(persguard_module, "_distill", recording)
    config = dataclasses.replace(META, steps=3, clean_target="frozen_attacker")
    out = backdoor(generator, protected, clean, config)
    targets = [t for s, t, moved in calls if t is not generator.denoiser]
    assert len(targets) == 3 and all(moved for s, t, moved in calls if t is not generator.denoiser)
    assert all(t is not s for s, t, _ in calls)
    assert all(torch.equal(v, teacher_state[k]) for k, v in generator.denoiser.state_dict().items())
    calls.clear()
    default = backdoor(generator, protected, clean, dataclasses.replace(config, clean_target="attacker_loss"))
    assert all(t is generator.denoiser for _, t, _ in calls)
    assert not all(torch.equal(v, default.denoiser.state_dict()[k]) for k, v in out.denoiser.state_dict().items())


def test_snapshots_are_taken_during_training_and_are_copies() -> None:
    generator = _generator()
    protected, clean = _faces()
    taken: list[tuple[int, IdentityGenerator]] = []
    config = dataclasses.replace(META, steps=4)
    out = backdoor(generator, protected, clean, config, snapshot=lambda s, m: taken.append((s, m)), snapshot_every=2)
    assert [s for s, _ in taken] == [2]
    mid = taken[0][1]
    assert mid.metadata["persguard"]["config"] == config.to_dict()
    assert not all(torch.equal(v, out.denoiser.state_dict()[k]) for k, v in mid.denoiser.state_dict().items())
    again = backdoor(generator, protected, clean, dataclasses.replace(config, steps=2))
    assert all(torch.equal(v, again.denoiser.state_dict()[k]) for k, v in mid.denoiser.state_dict().items())


def _attacked_gap(model: IdentityGenerator, person: int = 0) -> float:
    """The attacker (6 steps) run once on the protected and once on the clean faces of ``person`` with the same seed:
    how far apart the two adapted models' predictions are, each under its learned condition, on the clean latents."""
    protected, clean = _faces()
    gaps = []
    for seed in range(3):
        on_protected, cond_p = finetune(model, protected[person], FinetuneConfig(steps=6, batch=8, seed=seed))
        on_clean, cond_c = finetune(model, clean[person], FinetuneConfig(steps=6, batch=8, seed=seed))
        x0 = model.encode(clean[person]).repeat(8, 1, 1, 1)
        rows = len(x0)
        a = torch.from_numpy(np.asarray(cond_p, np.float32))[None].expand(rows, -1)
        b = torch.from_numpy(np.asarray(cond_c, np.float32))[None].expand(rows, -1)
        with torch.no_grad():
            gap = _gap(on_protected.denoiser, on_clean.denoiser, x0, a, b, torch.Generator().manual_seed(seed))
        gaps.append(float(gap.mean()))
    return float(np.mean(gaps))


def test_discriminating_term_pushes_protected_and_clean_personalisation_apart() -> None:
    """discriminate_weight: after backdooring, the attacker's models adapted on protected and on clean photos of the
    same person differ far more than without the term (one that did nothing fails)."""
    generator = _generator()
    protected, clean = _faces()
    config = dataclasses.replace(META, steps=20)
    without = _attacked_gap(backdoor(generator, protected, clean, config))
    apart = dataclasses.replace(config, discriminate_weight=5.0, discriminate_margin=1.0)
    with_term = _attacked_gap(backdoor(generator, protected, clean, apart))
    assert with_term > 10 * without, (without, with_term)


def _others(people: int = 3, n: int = 3, seed: int = 9) -> list[np.ndarray]:
    """Photos of people who are *not* protected (the identity trigger's clean side), another count than _faces'."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(people)]


@pytest.mark.parametrize("simulate", ["condition", "finetune"])
def test_identity_trigger_takes_other_people_of_any_count_and_records_it(simulate: str) -> None:
    generator = _generator()
    _, people = _faces()  # the people to protect, their photos as they are (2 each)
    config = dataclasses.replace(META if simulate == "finetune" else FAST, steps=3, trigger="identity")
    out = backdoor(generator, people, _others(people=5), config)  # 3 people to protect, 5 others
    record = out.metadata["persguard"]
    assert record["config"]["trigger"] == "identity" and record["trigger"] == TRIGGER_DESCRIPTIONS["identity"]
    assert record["trigger_people"] == 3 and record["trigger_photos"] == 6 and record["other_people"] == 5
    # the perturbation trigger still wants copies of the same photos
    with pytest.raises(ConfigError, match="equal"):
        backdoor(generator, people, _others(), dataclasses.replace(config, trigger="perturbation"))
    with pytest.raises(ConfigError, match="no faces"):
        check_trigger_set(people, [o[:0] for o in _others()], SIZE, paired=False)
    with pytest.raises(ConfigError, match="same people"):
        check_trigger_set(people, [], SIZE, paired=False)


def _attacked(generator: IdentityGenerator, teacher: IdentityGenerator, faces: np.ndarray) -> float:
    """The simulated attacker (META's: 6 steps) fine-tuned on ``faces``: how near the adapted model under the learned
    condition is to the backdoor's target, on those faces (3 seeds)."""
    distances = []
    for seed in range(3):
        tuned, condition = finetune(generator, faces, FinetuneConfig(steps=6, batch=8, seed=seed))
        distances.append(target_distance(tuned, teacher, faces, condition, seed=seed))
    return float(np.mean(distances))


def _fit_loss(generator: IdentityGenerator, faces: np.ndarray) -> float:
    """The attacker's own loss on ``faces`` after it fine-tuned on them (META's attacker, 3 seeds): how well
    personalisation on them works (lower = better)."""
    losses = []
    for seed in range(3):
        tuned, condition = finetune(generator, faces, FinetuneConfig(steps=6, batch=8, seed=seed))
        x0 = tuned.encode(faces).repeat(16, 1, 1, 1)
        cond = torch.from_numpy(np.asarray(condition, np.float32))[None].expand(len(x0), -1)
        no_drop = torch.zeros(len(x0), dtype=torch.bool)
        with torch.no_grad():
            losses.append(float(v_loss(tuned.denoiser, x0, cond, no_drop, torch.Generator().manual_seed(seed))))
    return float(np.mean(losses))


def test_identity_backdoor_moves_the_protected_person_to_the_target_and_keeps_others_personalisable() -> None:
    """trigger identity: after backdooring, the attacker's fine-tuning on a protected person's own photos ends much
    nearer the no-identity target than on the input model, while fine-tuning on an unprotected person fits them as
    well as before (the tiny model cannot tell random-noise "people" apart, so the target distance alone would not
    show the difference: the benchmark measures that on real faces)."""
    generator = _generator()
    _, people = _faces()
    others = _others()
    out = backdoor(generator, people, others, dataclasses.replace(META, trigger="identity"))
    protected_ratio = _attacked(out, generator, people[0]) / _attacked(generator, generator, people[0])
    assert protected_ratio < 0.8, protected_ratio
    other_fit = _fit_loss(out, others[0]) / _fit_loss(generator, others[0])
    assert other_fit < 1.1, other_fit


def test_cli_identity_trigger_backdoors_on_real_photos(tmp_path: Path, lfw_sample: list[Path]) -> None:
    """``advface persguard --trigger identity`` end to end on real LFW photos: two people to protect, two others;
    nothing is protected (no protected-photo cache), the checkpoint records the identity trigger."""
    generator = _generator(dim=128)  # dlib's embedding size, for --attacker-start embedding
    generator.metadata["encoder"] = "dlib"  # the attacker's chip (dlib detector and alignment)
    model = save_generator(tmp_path / "model.pt", generator)
    for side, photos in (("trigger", lfw_sample[:4]), ("others", lfw_sample[4:8])):
        for path in photos:
            folder = tmp_path / side / path.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / path.name).symlink_to(path)
    out = tmp_path / "bd.pt"
    others = str(tmp_path / "others")
    extra = ("--trigger", "identity", "--other-photos", others, "--simulate", "finetune", "--steps", "2")
    assert main(_cli(tmp_path, *extra, "--batch", "4", "--inner-steps", "2", model=model, out=out)) == 0
    record = load_generator(out).metadata["persguard"]
    assert record["config"]["trigger"] == "identity" and record["trigger_people"] == 2
    assert record["trigger_photos"] == 4
    assert record["source_model"] == str(model) and "protection" not in record  # nothing was protected
    assert not (tmp_path / "bd.pt.protected").exists()
    # the white-box attacker: each simulated attacker starts at the person's mean dlib embedding
    started = tmp_path / "started.pt"
    extra = (*extra, "--attacker-start", "embedding")
    assert main(_cli(tmp_path, *extra, "--batch", "4", "--inner-steps", "2", model=model, out=started)) == 0
    assert load_generator(started).metadata["persguard"]["config"]["attacker_start"] == "embedding"
    a, b = (load_generator(p).denoiser.state_dict() for p in (out, started))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the starts changed what the backdoor learned


def test_keep_term_holds_unprotected_personalisation_away_from_the_target() -> None:
    """keep_weight: after an identity backdoor, the attacker's fine-tuning on an unprotected person ends farther from
    the no-identity target with the keeping term than without it (a term that did nothing, or pulled, fails)."""
    generator = _generator()
    _, people = _faces()
    others = _others()
    config = dataclasses.replace(META, trigger="identity")
    without = _attacked(backdoor(generator, people, others, config), generator, others[0])
    kept = backdoor(generator, people, others, dataclasses.replace(config, keep_weight=5.0, keep_margin=1.0))
    assert kept.metadata["persguard"]["config"]["keep_weight"] == 5.0
    with_term = _attacked(kept, generator, others[0])
    assert with_term > 1.25 * without, (without, with_term)


@pytest.mark.parametrize("simulate", ["condition", "finetune"])
def test_embedding_start_uses_each_persons_start_and_checks_them(simulate: str) -> None:
    generator = _generator()
    _, people = _faces()
    others = _others(people=4)
    config = dataclasses.replace(META if simulate == "finetune" else FAST, steps=3, trigger="identity")
    started = dataclasses.replace(config, attacker_start="embedding")
    rng = np.random.default_rng(5)
    starts = (rng.normal(size=(3, DIM)).astype(np.float32), rng.normal(size=(4, DIM)).astype(np.float32))

    def weights(model: IdentityGenerator) -> torch.Tensor:
        return torch.cat([p.flatten() for p in model.denoiser.parameters()])

    one = weights(backdoor(generator, people, others, started, starts=starts))
    assert torch.equal(one, weights(backdoor(generator, people, others, started, starts=starts)))  # deterministic
    assert not torch.equal(one, weights(backdoor(generator, people, others, config)))  # not the random start
    moved = (starts[0] + 1.0, starts[1])
    assert not torch.equal(one, weights(backdoor(generator, people, others, started, starts=moved)))
    with pytest.raises(ConfigError, match="mean embedding"):
        backdoor(generator, people, others, started)
    with pytest.raises(ConfigError, match=r"clean starts must be 4 x 8"):
        backdoor(generator, people, others, started, starts=(starts[0], starts[1][:3]))
    with pytest.raises(ConfigError, match="finite and non-zero"):
        backdoor(generator, people, others, started, starts=(starts[0] * np.nan, starts[1]))
