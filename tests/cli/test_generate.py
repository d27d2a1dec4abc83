"""`advface train-generator` then `advface generate` (photo, embeddings, personalisation) on a few real LFW photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advface.cli.main import main
from advface.embeddings_file import EmbeddingsFile, save_embeddings
from advface.generative.model import load_generator


@pytest.mark.slow
def test_train_generator_then_generate(lfw_sample: list[Path], tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setenv("ADVFACE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "faces"
    for path in lfw_sample[:24]:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        (root / path.parent.name / path.name).write_bytes(path.read_bytes())
    model = tmp_path / "generator.pt"
    train = [
        "train-generator",
        "--dataset",
        str(root),
        "--group",
        "defender",
        "--out",
        str(model),
        "--encoder",
        "dlib-torch",
        "--image-size",
        "16",
        "--ae-steps",
        "2",
        "--steps",
        "3",
        "--batch",
        "4",
        "--width",
        "8",
        "-q",
    ]
    assert main(train) == 0
    generator = load_generator(model)
    meta = generator.metadata
    assert meta["encoder"] == "dlib-torch" and meta["role"] == "defender" and meta["image_size"] == 16
    assert meta["training_data"]["group"] == "defender" and meta["training_data"]["photos"] > 0
    assert (tmp_path / "generator.pt.work" / "state.pt").is_file()
    assert main(train) == 0  # a finished work folder: nothing left to train, same model written again
    snapshot = tmp_path / "snapshot.pt"
    assert (
        main([*train[:6], str(snapshot), *train[7:], "--work-dir", str(tmp_path / "generator.pt.work"), "--snapshot"])
        == 0
    )
    assert load_generator(snapshot).metadata["steps"] == meta["steps"]  # the work folder's model, not retrained
    half = tmp_path / "half.pt"
    work = ["--work-dir", str(tmp_path / "generator.pt.work"), "--snapshot", "--half"]
    assert main([*train[:6], str(half), *train[7:], *work]) == 0
    assert half.stat().st_size < 0.6 * model.stat().st_size  # float16 weights
    assert next(load_generator(half).denoiser.parameters()).dtype == torch.float32  # computed in float32

    photo = lfw_sample[0]
    out = tmp_path / "out"
    common = ["--model", str(model), "--encoder", "dlib-torch", "--steps", "2", "--n", "2"]
    assert main(["generate", *common, "--from-photo", str(photo), "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"{photo.stem}_0.png", f"{photo.stem}_1.png"]
    assert Image.open(files[0]).size == (16, 16)

    assert (
        main(
            [
                "generate",
                *common,
                "--from-photo",
                str(lfw_sample[0]),
                "--from-photo",
                str(lfw_sample[1]),
                "--personalise",
                "--out",
                str(tmp_path / "pers"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "pers").glob("personalised_*.png"))) == 2
    # the attacker who has the encoder: the condition starts at the photos' embedding, so the faces differ
    started = [*common, "--from-photo", str(lfw_sample[0]), "--from-photo", str(lfw_sample[1]), "--personalise"]
    assert main(["generate", *started, "--personalise-start", "embedding", "--out", str(tmp_path / "emb")]) == 0
    first = np.asarray(Image.open(tmp_path / "pers" / "personalised_0.png"))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "emb" / "personalised_0.png")), first)
    textual_start = [*started, "--personalise-method", "condition", "--personalise-start", "embedding"]
    assert main(["generate", *textual_start, "--out", str(tmp_path / "x")]) == 2
    assert "--personalise-start embedding applies to" in capsys.readouterr().err
    textual = [*common, "--from-photo", str(lfw_sample[0]), "--personalise", "--personalise-method", "condition"]
    assert main(["generate", *textual, "--out", str(tmp_path / "cond")]) == 0
    assert len(list((tmp_path / "cond").glob("personalised_*.png"))) == 2
    # the attacker's effort: more steps at another rate give other faces
    harder = [*started, "--personalise-steps", "3", "--personalise-lr", "1e-3", "--out", str(tmp_path / "hard")]
    assert main(["generate", *harder]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "hard" / "personalised_0.png")), first)
    # the attacker who uses both levers: fine-tuning, then sampling guided towards the photos' mean embedding
    assert main(["generate", *started, "--identity-guidance", "0.05", "--out", str(tmp_path / "pg")]) == 0
    assert len(list((tmp_path / "pg").glob("personalised_*.png"))) == 2
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "pg" / "personalised_0.png")), first)
    for bad, message in [
        (["--personalise-steps", "0"], "--personalise-steps must be >= 1"),
        (["--personalise-lr", "nan"], "--personalise-lr must be in (0, 1)"),
        (["--identity-guidance", "inf"], "--identity-guidance must be a finite number"),
    ]:
        assert main(["generate", *started, *bad, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    alone = [*common, "--from-photo", str(photo), "--personalise-lr", "1e-3", "--out", str(tmp_path / "x")]
    assert main(["generate", *alone]) == 2
    assert "--personalise-lr applies to --personalise" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # the white-box training-free attacker: identity guidance by the encoder's gradient changes the faces
    guided = [
        "generate",
        *common,
        "--from-photo",
        str(photo),
        "--identity-guidance",
        "0.05",
        "--out",
        str(tmp_path / "g"),
    ]
    assert main(guided) == 0
    plain = np.asarray(Image.open(out / f"{photo.stem}_0.png"))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "g" / f"{photo.stem}_0.png")), plain)

    z = np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32)
    save_embeddings(tmp_path / "t.npz", EmbeddingsFile(["a", "b", "c"], z, "dlib-torch", meta["encoder_fingerprint"]))
    assert main(["generate", *common, "--from-embeddings", str(tmp_path / "t.npz"), "--out", str(tmp_path / "e")]) == 0
    assert len(list((tmp_path / "e").glob("*.png"))) == 6
    from_templates = [*common, "--from-embeddings", str(tmp_path / "t.npz"), "--identity-guidance", "0.05"]
    assert main(["generate", *from_templates, "--out", str(tmp_path / "eg")]) == 0
    assert len(list((tmp_path / "eg").glob("*.png"))) == 6

    # bad input: another encoder's embeddings, a photo without a face, a missing model
    save_embeddings(tmp_path / "o.npz", EmbeddingsFile(["a"], z[:1], "onnx", "another-fingerprint"))
    assert main(["generate", *common, "--from-embeddings", str(tmp_path / "o.npz"), "--out", str(tmp_path / "x")]) == 2
    assert "not of this encoder" in capsys.readouterr().err
    blank = tmp_path / "blank.png"
    Image.new("RGB", (120, 120), (200, 200, 200)).save(blank)
    assert main(["generate", *common, "--from-photo", str(blank), "--out", str(tmp_path / "x")]) == 2
    assert "blank.png" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "none.pt"), "--from-photo", str(photo), "--out", "x"]) == 2
