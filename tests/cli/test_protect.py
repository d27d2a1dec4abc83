"""`advface protect`: embeddings file in, protected embeddings file out, with a small shadow saved here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advface.cli.main import build_parser, main
from advface.embeddings_file import EmbeddingsFile, load_embeddings, save_embeddings
from advface.protect import shipped as shipped_module

inversion = pytest.importorskip("advface.inversion")

DIM = 16


@pytest.fixture(scope="module")
def shadow_ckpt(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    model = inversion.build_decoder("deconv", DIM, 16, width=0.05, hidden=0)
    path = tmp_path_factory.mktemp("shadow") / "shadow.pt"
    return inversion.save_decoder(path, model, {"encoder": "dlib", "encoder_fingerprint": "fp-test", "role": "shadow"})


def _write(
    path: Path,
    n: int = 10,
    dim: int = DIM,
    encoder: str | None = "dlib",
    fingerprint: str | None = "fp-test",
    corrupt: bool = False,
) -> Path:
    emb = (np.random.default_rng(0).standard_normal((n, dim)) * 0.1).astype(np.float32)
    if corrupt:
        emb[3, 2] = np.nan
    data = EmbeddingsFile(
        [f"person{i}/img.jpg" for i in range(n)], emb, encoder, fingerprint, {"bad.jpg": "no face found"}
    )
    return save_embeddings(path, data)


def test_subcommand_is_registered():
    assert "protect" in build_parser().format_help()


def test_round_trip(shadow_ckpt: Path, tmp_path: Path, capsys):
    src = _write(tmp_path / "raw.npz")
    out = tmp_path / "protected.npz"
    args = ["protect", "--in", str(src), "--out", str(out), "--shadow", str(shadow_ckpt), "--steps", "4", "-q"]
    assert main(args) == 0
    raw, prot = load_embeddings(src), load_embeddings(out)
    assert prot.ids == raw.ids and prot.failed == raw.failed
    assert prot.encoder == "dlib" and prot.fingerprint == "fp-test"
    assert prot.embeddings.shape == raw.embeddings.shape and prot.embeddings.dtype == np.float32
    rel = np.linalg.norm(prot.embeddings.astype(np.float64) - raw.embeddings, axis=1) / np.linalg.norm(
        raw.embeddings.astype(np.float64), axis=1
    )
    assert rel.max() <= 0.1 * (1 + 1e-6) and rel.min() > 0.05
    err = capsys.readouterr().err
    assert "protected 10 templates" in err and "rel-L2 mean" in err
    # the batch size does not change the result; the seed does
    again = tmp_path / "again.npz"
    assert main([*args[:4], str(again), *args[5:], "--batch-size", "3"]) == 0
    assert np.array_equal(load_embeddings(again).embeddings, prot.embeddings)
    other = tmp_path / "other.npz"
    assert main([*args[:4], str(other), *args[5:], "--seed", "1"]) == 0
    assert not np.array_equal(load_embeddings(other).embeddings, prot.embeddings)


def test_budget_flags(shadow_ckpt: Path, tmp_path: Path):
    src = _write(tmp_path / "raw.npz")
    out = tmp_path / "p.npz"
    flags = ["--rel-l2", "0.2", "--linf", "0.003", "--steps", "3", "--step-size", "0.5"]
    assert main(["protect", "--in", str(src), "--out", str(out), "--shadow", str(shadow_ckpt), "-q", *flags]) == 0
    d = load_embeddings(out).embeddings.astype(np.float64) - load_embeddings(src).embeddings
    assert np.abs(d).max() <= 0.003 * (1 + 1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 8}, "dimension 8"),
        ({"fingerprint": "fp-other"}, "fingerprint"),
        ({"encoder": "mobilefacenet", "fingerprint": None}, "trained for encoder dlib"),
        ({"corrupt": True}, "NaN"),
    ],
    ids=["dimension", "fingerprint", "encoder-name", "nan"],
)
def test_refuses_without_writing(shadow_ckpt: Path, tmp_path: Path, capsys, kwargs, message):
    src = _write(tmp_path / "raw.npz", **kwargs)
    out = tmp_path / "protected.npz"
    status = main(["protect", "--in", str(src), "--out", str(out), "--shadow", str(shadow_ckpt), "-q"])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw.npz"]  # no temporary file left either


def test_bad_parameters_are_config_errors(shadow_ckpt: Path, tmp_path: Path, capsys):
    src = _write(tmp_path / "raw.npz")
    out = tmp_path / "p.npz"
    assert main(["protect", "--in", str(src), "--out", str(out), "--shadow", str(shadow_ckpt), "--rel-l2", "0"]) == 2
    assert "rel_l2" in capsys.readouterr().err and not out.exists()
    assert main(["protect", "--in", str(tmp_path / "nope.npz"), "--out", str(out), "--shadow", str(shadow_ckpt)]) == 2
    assert not out.exists()


def test_shipped_shadow(shadow_ckpt: Path, tmp_path: Path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setattr(shipped_module, "SHIPPED_MODELS_DIR", models)
    src = _write(tmp_path / "raw.npz")
    out = tmp_path / "p.npz"
    assert main(["protect", "--in", str(src), "--out", str(out), "-q"]) == 2
    assert "no shipped shadow model for encoder dlib; pass --shadow" in capsys.readouterr().err
    assert not out.exists()
    (models / "shadow_dlib.pt").write_bytes(shadow_ckpt.read_bytes())
    assert main(["protect", "--in", str(src), "--out", str(out), "-q", "--steps", "2"]) == 0  # encoder from the file
    assert load_embeddings(out).embeddings.shape == (10, DIM)
    # --encoder picks another shipped model (none here)
    assert main(["protect", "--in", str(src), "--out", str(out), "-q", "--encoder", "mobilefacenet"]) == 2


def test_identity_aware_method(tmp_path: Path, capsys):
    """--method advface-id with an ensemble of two (tiny, untrained) shadows and the real dlib torch module."""
    import torch

    torch.manual_seed(0)
    paths = []
    for arch in ("deconv", "resup"):
        model = inversion.build_decoder(arch, 128, 16, width=0.05, hidden=0)
        paths.append(inversion.save_decoder(tmp_path / f"{arch}.pt", model, {"encoder": "dlib", "role": "shadow"}))
    src = _write(tmp_path / "raw.npz", n=3, dim=128, fingerprint=None)
    out = tmp_path / "protected.npz"
    args = [
        "protect",
        "--in",
        str(src),
        "--out",
        str(out),
        "--method",
        "advface-id",
        "--steps",
        "1",
        "--lanes",
        "1",
        "--rel-l2",
        "0.2",
        "-q",
    ]
    for path in paths:
        args += ["--shadow", str(path)]
    assert main(args) == 0
    raw, prot = load_embeddings(src), load_embeddings(out)
    rel = np.linalg.norm(prot.embeddings.astype(np.float64) - raw.embeddings, axis=1) / np.linalg.norm(
        raw.embeddings.astype(np.float64), axis=1
    )
    assert prot.ids == raw.ids and rel.max() <= 0.2 + 1e-6 and rel.min() > 0.1
    assert "advface-id shadows" in capsys.readouterr().err
    # plain advface refuses an ensemble
    assert (
        main(
            [
                "protect",
                "--in",
                str(src),
                "--out",
                str(tmp_path / "x.npz"),
                "--shadow",
                str(paths[0]),
                "--shadow",
                str(paths[1]),
                "-q",
            ]
        )
        == 2
    )
