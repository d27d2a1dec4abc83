"""`advface protect`: advface-id's own defaults and its refusal to run without identity-aware shadows; --threads
on every CPU-heavy command (the output of protect never depends on it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from advface.cli import protect as protect_cli
from advface.cli.main import build_parser, main
from advface.embeddings_file import EmbeddingsFile, load_embeddings, save_embeddings
from advface.errors import ConfigError
from advface.protect import AdvFaceConfig, IdentityAwareConfig, trained_with_identity_loss
from advface.protect import shipped as shipped_module

inversion = pytest.importorskip("advface.inversion")

DIM = 128


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _shadow(path: Path, arch: str = "deconv", id_weight: float | None = None) -> Path:
    torch.manual_seed(0)
    model = inversion.build_decoder(arch, DIM, 16, width=0.05, hidden=0)
    metadata: dict = {"encoder": "dlib", "role": "shadow"}
    if id_weight is not None:
        metadata["train_config"] = {"arch": arch, "id_weight": id_weight}
    return inversion.save_decoder(path, model, metadata)


def _templates(path: Path, n: int = 3, dim: int = DIM) -> Path:
    emb = (np.random.default_rng(0).standard_normal((n, dim)) * 0.09).astype(np.float32)
    return save_embeddings(path, EmbeddingsFile([f"p{i}/a.jpg" for i in range(n)], emb, "dlib", None, {}))


def _rel(raw: np.ndarray, prot: np.ndarray) -> np.ndarray:
    return np.linalg.norm(prot.astype(np.float64) - raw, axis=1) / np.linalg.norm(raw.astype(np.float64), axis=1)


class _Stop(Exception):
    pass


def _config_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *flags: str) -> object:
    """The protection parameters `advface protect` builds for ``flags`` (stopped before anything runs)."""
    seen = {}

    def fake_load(spec, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen["config"] = spec.config
        raise _Stop

    monkeypatch.setattr(protect_cli, "load_protector", fake_load)
    src = _templates(tmp_path / "raw.npz")
    shadow = _shadow(tmp_path / "s.pt")
    args = build_parser().parse_args(
        ["protect", "--in", str(src), "--out", str(tmp_path / "o.npz"), "--shadow", str(shadow), *flags]
    )
    with pytest.raises(_Stop):
        protect_cli.run(args)
    return seen["config"]


def test_each_method_has_its_own_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert _config_used(monkeypatch, tmp_path) == AdvFaceConfig()
    assert _config_used(monkeypatch, tmp_path, "--method", "advface-id") == IdentityAwareConfig()
    assert (IdentityAwareConfig().rel_l2, IdentityAwareConfig().steps, IdentityAwareConfig().lanes) == (0.2, 10, 16)
    flags = ["--rel-l2", "0.15", "--steps", "4", "--lanes", "8", "--seed", "5", "--batch-size", "32"]
    assert _config_used(monkeypatch, tmp_path, "--method", "advface-id", *flags) == IdentityAwareConfig(
        rel_l2=0.15, steps=4, lanes=8, seed=5, batch_size=32
    )
    assert _config_used(monkeypatch, tmp_path, *flags) == AdvFaceConfig(
        rel_l2=0.15, steps=4, lanes=8, seed=5, batch_size=32
    )


def test_advface_id_refuses_without_identity_aware_shadows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _templates(tmp_path / "raw.npz")
    out = tmp_path / "o.npz"
    base = ["protect", "--in", str(src), "--out", str(out), "--method", "advface-id", "-q"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "--method advface-id needs identity-aware shadows: one --shadow CKPT" in err
    assert "--allow-pixel-shadows" in err and "--id-weight 1" in err
    # shadows whose checkpoints say they learnt no identity loss
    pixel = [_shadow(tmp_path / f"pixel_{a}.pt", a, id_weight=0.0) for a in ("deconv", "resup")]
    assert main([*base, "--shadow", str(pixel[0]), "--shadow", str(pixel[1])]) == 2
    err = capsys.readouterr().err
    assert "no identity-aware shadow" in err and "--allow-pixel-shadows" in err and str(pixel[0]) in err
    assert not out.exists()
    # plain advface has no such flag
    assert main(["protect", "--in", str(src), "--out", str(out), "--allow-pixel-shadows", "-q"]) == 2
    assert "--allow-pixel-shadows is for --method advface-id" in capsys.readouterr().err


def test_advface_id_with_identity_aware_or_allowed_pixel_shadows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _templates(tmp_path / "raw.npz", n=2)
    raw = load_embeddings(src).embeddings
    out = tmp_path / "o.npz"
    base = ["protect", "--in", str(src), "--out", str(out), "--method", "advface-id", "--steps", "1", "-q"]
    ident = _shadow(tmp_path / "id.pt", "resup", id_weight=1.0)
    pixel = _shadow(tmp_path / "pixel.pt", "deconv", id_weight=0.0)
    # one identity-aware member is enough; the pixel member is named in a warning
    assert main([*base, "--shadow", str(ident), "--shadow", str(pixel)]) == 0
    err = capsys.readouterr().err
    assert "warning: advface-id ensemble members trained without an identity loss" in err and str(pixel) in err
    assert str(ident) not in err.split("warning:")[1].split("\n")[0]
    assert "steps 1, lanes 16, 1 thread" in err  # advface-id's own lanes
    assert 0.1 < _rel(raw, load_embeddings(out).embeddings).max() <= 0.2 + 1e-6  # its own budget, 0.2
    # only pixel shadows, allowed
    out.unlink()
    assert main([*base, "--shadow", str(pixel), "--allow-pixel-shadows"]) == 0
    assert "trained without an identity loss" in capsys.readouterr().err and out.exists()


def test_advface_id_with_the_shipped_shadow_when_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    _shadow(models / "shadow_dlib.pt", "resup", id_weight=0.0)
    monkeypatch.setattr(shipped_module, "SHIPPED_MODELS_DIR", models)
    src = _templates(tmp_path / "raw.npz", n=2)
    out = tmp_path / "o.npz"
    args = ["protect", "--in", str(src), "--out", str(out), "--method", "advface-id", "--steps", "1", "-q"]
    assert main([*args, "--allow-shipped-shadow"]) == 0
    err = capsys.readouterr().err
    assert "warning: --method advface-id against the pixel shadow shipped for dlib" in err
    assert str(models / "shadow_dlib.pt") in err and out.exists()


def test_trained_with_identity_loss() -> None:
    assert trained_with_identity_loss({"train_config": {"id_weight": 1.0}}) is True
    assert trained_with_identity_loss({"train_config": {"id_weight": 0}}) is False
    assert trained_with_identity_loss({"encoder": "dlib"}) is None
    assert trained_with_identity_loss({"train_config": {"id_weight": "x"}}) is None
    shipped = inversion.load_decoder(shipped_module.shipped_shadow_path("dlib"))[1]
    assert trained_with_identity_loss(shipped) is False  # the shipped shadow is a pixel shadow


def test_protect_output_does_not_depend_on_threads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _templates(tmp_path / "raw.npz", n=24, dim=DIM)
    shadow = _shadow(tmp_path / "s.pt")
    outs = {}
    for threads in ("1", "2", "0"):
        outs[threads] = tmp_path / f"o{threads}.npz"
        args = ["protect", "--in", str(src), "--out", str(outs[threads]), "--shadow", str(shadow), "-q"]
        assert main([*args, "--steps", "2", "--threads", threads]) == 0
        if threads != "0":
            assert f"lanes 4, {threads} thread" in capsys.readouterr().err
    ref = load_embeddings(outs["1"]).embeddings
    for threads in ("2", "0"):
        np.testing.assert_array_equal(load_embeddings(outs[threads]).embeddings, ref)
    assert main(["protect", "--in", str(src), "--out", str(tmp_path / "x.npz"), "--threads", "-1"]) == 2
    assert "--threads must be an integer >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["protect", "reencode", "audit", "protect-image"])
def test_every_cpu_heavy_command_takes_threads(command: str) -> None:
    required = {
        "protect": ["--in", "a.npz", "--out", "b.npz"],
        "reencode": ["--source", "npz:a.npz", "--dest", "npz:b.npz"],
        "audit": ["--data", "d", "--out", "o"],
        "protect-image": ["a.jpg", "--out", "o"],
    }[command]
    parser = build_parser()
    default = parser.parse_args([command, *required]).threads
    assert default == (None if command == "reencode" else 1)  # reencode: --config's protection.threads, else 1
    assert parser.parse_args([command, *required, "--threads", "3"]).threads == 3


def test_reencode_threads(tmp_path: Path) -> None:
    from advface.cli.reencode import torch_thread_count

    parser = build_parser()
    base = ["reencode", "--source", "npz:a.npz", "--dest", "npz:b.npz"]
    assert torch_thread_count(parser.parse_args(base)) == 1
    assert torch_thread_count(parser.parse_args([*base, "--threads", "3"])) == 3
    config = tmp_path / "advface.yaml"
    config.write_text("protection: {threads: 2}\n")
    assert torch_thread_count(parser.parse_args([*base, "--config", str(config)])) == 2
    assert torch_thread_count(parser.parse_args([*base, "--config", str(config), "--threads", "1"])) == 1
    assert torch_thread_count(parser.parse_args([*base, "--engine", "ray", "--config", str(config)])) == 1
    with pytest.raises(ConfigError, match="--threads is for the local engine"):
        torch_thread_count(parser.parse_args([*base, "--engine", "ray", "--threads", "2"]))
    with pytest.raises(ConfigError, match="--threads must be"):
        torch_thread_count(parser.parse_args([*base, "--threads", "-1"]))


def test_reencode_lanes_default_to_the_methods(tmp_path: Path) -> None:
    from advface.cli.reencode import protection_config

    parser = build_parser()
    base = ["reencode", "--source", "npz:a.npz", "--dest", "npz:b.npz"]
    assert protection_config(parser.parse_args(base))[0].lanes == AdvFaceConfig().lanes == 4
    config, *_ = protection_config(parser.parse_args([*base, "--method", "advface-id"]))
    assert config.lanes == IdentityAwareConfig().lanes == 16  # what the sidecar's advface-id uses
    assert protection_config(parser.parse_args([*base, "--method", "advface-id", "--lanes", "4"]))[0].lanes == 4
