"""`advface embed` end to end on real LFW photos."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advface.cli.main import build_parser, main
from advface.embeddings_file import load_embeddings


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, lfw_sample: list[Path]) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for path in lfw_sample[:6]:
        (root / path.parent.name).mkdir(exist_ok=True)
        shutil.copy(path, root / path.parent.name / path.name)
    (root / "broken.jpg").write_text("not an image")
    Image.new("RGB", (120, 120), (128, 128, 128)).save(root / "blank.png")
    return root


def test_embed_folder_writes_npz_and_reports_failures(photo_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "emb.npz"
    status = main(["embed", "--encoder", "dlib", "--out", str(out), "-q", str(photo_folder)])
    assert status == 0
    data = load_embeddings(out)
    assert len(data.ids) == 6
    assert all("/" in i and not i.startswith("/") for i in data.ids)  # relative to the folder
    assert data.embeddings.shape == (6, 128) and np.isfinite(data.embeddings).all()
    assert set(data.failed) == {"broken.jpg", "blank.png"}
    assert data.failed["blank.png"] == "no face found"
    assert "not a readable image" in data.failed["broken.jpg"]
    err = capsys.readouterr().err
    assert "skipped broken.jpg" in err and "skipped blank.png" in err
    # same person closer than different people (first two ids are one person in lfw_sample order)
    d_same = np.linalg.norm(data.embeddings[0] - data.embeddings[1])
    d_diff = np.linalg.norm(data.embeddings[0] - data.embeddings[2])
    assert d_same < 0.6 < d_diff


def test_embed_strict_and_cache(photo_folder: Path, tmp_path: Path):
    out = tmp_path / "e.npz"
    args = ["embed", "-q", "--out", str(out), "--cache", str(tmp_path / "cache"), str(photo_folder)]
    assert main([*args, "--strict"]) == 1  # broken files -> non-zero under --strict
    first = load_embeddings(out)
    assert (tmp_path / "cache" / "embeddings.sqlite").is_file()
    assert main(args) == 0  # second run served from the cache, same result
    second = load_embeddings(out)
    assert first.ids == second.ids and np.array_equal(first.embeddings, second.embeddings)


def test_embed_given_files_keep_their_ids(lfw_sample: list[Path], tmp_path: Path):
    out = tmp_path / "f.npz"
    assert main(["embed", "-q", "--encoder", "dlib-torch", "--out", str(out), str(lfw_sample[0])]) == 0
    assert load_embeddings(out).ids == [str(lfw_sample[0])]


def test_embed_errors_are_clear(tmp_path: Path, capsys):
    assert main(["embed", "--out", str(tmp_path / "x.npz"), str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    assert main(["embed", "--encoder", "nope", "--out", str(tmp_path / "x.npz"), str(tmp_path / "img.png")]) == 2
    assert "unknown encoder 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_every_subcommand_has_help():
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest == "command"]
    for name in actions[0].choices:
        result = subprocess.run(
            [sys.executable, "-m", "advface.cli.main", name, "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and "usage:" in result.stdout
