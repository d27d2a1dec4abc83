"""`advface train-shadow` then `advface protect` with the trained model, on a few real LFW photos."""

from pathlib import Path

import numpy as np
import pytest

from advface.cli.main import build_parser, main
from advface.embeddings_file import EmbeddingsFile, load_embeddings, save_embeddings
from advface.inversion import load_decoder
from advface.inversion.training import TrainConfig


def test_train_shadow_then_protect(lfw_sample: list[Path], tmp_path: Path, monkeypatch):
    monkeypatch.setenv("ADVFACE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "faces"
    for path in lfw_sample[:24]:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        (root / path.parent.name / path.name).write_bytes(path.read_bytes())
    ckpt = tmp_path / "shadow.pt"
    args = [
        "train-shadow",
        "--dataset",
        str(root),
        "--out",
        str(ckpt),
        "--encoder",
        "dlib-torch",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "-q",
    ]
    assert main(args) == 0
    model, meta = load_decoder(ckpt)
    assert meta["encoder"] == "dlib-torch" and meta["dim"] == 128 and meta["image_size"] == 32
    assert meta["training_data"]["group"] == "defender" and meta["training_data"]["photos"] > 0
    assert (tmp_path / "cache" / "pairs").is_dir()  # pairs cached for the next run

    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 128)).astype(np.float32) * 0.1
    save_embeddings(
        tmp_path / "in.npz", EmbeddingsFile([f"t{i}" for i in range(5)], z, "dlib-torch", meta["encoder_fingerprint"])
    )
    assert (
        main(
            [
                "protect",
                "--in",
                str(tmp_path / "in.npz"),
                "--out",
                str(tmp_path / "out.npz"),
                "--shadow",
                str(ckpt),
                "-q",
            ]
        )
        == 0
    )
    out = load_embeddings(tmp_path / "out.npz")
    assert out.ids == [f"t{i}" for i in range(5)]
    rel = np.linalg.norm(out.embeddings - z, axis=1) / np.linalg.norm(z, axis=1)
    assert (rel <= 0.1 + 1e-5).all() and (rel > 0.05).all()


def test_train_shadow_rejects_bad_settings(tmp_path: Path, capsys):
    assert main(["train-shadow", "--dataset", str(tmp_path), "--out", str(tmp_path / "x.pt"), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert main(["train-shadow", "--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_train_shadow_defaults_are_train_configs(tmp_path: Path, capsys) -> None:
    """Each training flag defaults to TrainConfig's value (stated once, there), and the help shows it."""
    defaults = TrainConfig()
    args = build_parser().parse_args(["train-shadow", "--dataset", str(tmp_path), "--out", str(tmp_path / "x.pt")])
    flags = {"init": "init_from"}
    for name in ("arch", "image_size", "epochs", "batch_size", "lr", "id_weight", "jitter", "seed", "device", "init"):
        assert getattr(args, name) == getattr(defaults, flags.get(name, name)), name
    with pytest.raises(SystemExit):
        main(["train-shadow", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for text in (
        f"decoder architecture (default {defaults.arch})",
        f"reconstruction size in px (default {defaults.image_size})",
        f"training epochs (default {defaults.epochs})",
        f"training batch size (default {defaults.batch_size})",
        f"peak learning rate (default {defaults.lr})",
        f"torch module (default {defaults.id_weight:g}: L1 only)",
        f"so faces stay faces (default {defaults.jitter})",
        f"seed of the split and of training (default {defaults.seed})",
    ):
        assert text in shown, text
