"""Bad inputs of ``advface audit``: clear messages (exit 2), partial reports naming what is missing, Type II
skipped with a count for people with a single photo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from advface.audit.results import FORMAT_VERSION
from advface.cli.main import main
from advface.embeddings_file import EmbeddingsFile, save_embeddings


def _audit(args: list[str]) -> int:
    return main(["audit", "--quick", "--quiet", *args])


def test_dimension_mismatch(
    audit_dataset: Path, audit_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = save_embeddings(tmp_path / "db.npz", EmbeddingsFile(["a/a_0001.jpg"], np.ones((1, 64), np.float32)))
    out = tmp_path / "out"
    rc = _audit(
        ["--data", str(audit_dataset), "--out", str(out), "--templates", str(db), "--cache-dir", str(audit_cache)]
    )
    assert rc == 2
    assert "dimension 64" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["missing"][0]["stage"] == "inputs" and "dimension" in report["missing"][0]["reason"]
    assert report["format_version"] == FORMAT_VERSION == 7
    assert "Partial report" in (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())  # a partial report has its bundle too
    assert manifest["key_ids"] == {} and any(": failed: " in line for line in manifest["log"])


def test_empty_database(audit_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = save_embeddings(tmp_path / "db.npz", EmbeddingsFile([], np.zeros((0, 128), np.float32)))
    rc = _audit(["--data", str(audit_dataset), "--out", str(tmp_path / "out"), "--templates", str(db)])
    assert rc == 2
    assert "empty" in capsys.readouterr().err


def test_missing_dataset_and_unusable_photos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _audit(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad" / "Someone"
    bad.mkdir(parents=True)
    (bad / "Someone_0001.jpg").write_bytes(b"garbage")
    (bad / "Someone_0002.jpg").write_bytes(b"")
    rc = _audit(["--data", str(tmp_path / "bad"), "--out", str(tmp_path / "o2"), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2
    assert "no usable face" in capsys.readouterr().err


def test_unknown_attacker(audit_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _audit(["--data", str(audit_dataset), "--out", str(tmp_path / "o"), "--attackers", "deconv", "vae"]) == 2
    assert "unknown decoder attacker 'vae'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_store_needs_tenant_and_existing_database(
    audit_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _audit(["--data", str(audit_dataset), "--out", str(tmp_path / "o"), "--store", "sqlite:/x"]) == 2
    assert "--tenant" in capsys.readouterr().err
    assert (
        _audit(
            [
                "--data",
                str(audit_dataset),
                "--out",
                str(tmp_path / "o"),
                "--store",
                f"sqlite:{tmp_path / 'none'}",
                "--tenant",
                "t",
            ]
        )
        == 2
    )
    assert "no template database" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # nothing created


@pytest.mark.slow
def test_store_with_single_photo_people_skips_type2(audit_dataset: Path, audit_cache: Path, tmp_path: Path) -> None:
    """A SQLite + faiss template store (subject ids = photo paths) including people with one photo: Type II is
    skipped for them and counted; the store's templates are attacked as stored."""
    from advface.encoders import create_encoder
    from advface.image_embedder import ImageEmbedder

    people = sorted(p for p in audit_dataset.iterdir() if p.is_dir() and not p.name.startswith("Zz_"))
    multi = [p for p in people if len(list(p.iterdir())) >= 2][:3]
    single = [p for p in people if len(list(p.iterdir())) == 1][:3]
    files = [(f, f.relative_to(audit_dataset).as_posix()) for p in multi + single for f in sorted(p.iterdir())[:2]]
    data = ImageEmbedder(create_encoder("dlib-torch"), "dlib", "largest").embed_files(files, progress=False)
    from advface.store.sqlite_faiss import SQLiteFaissStore

    store_dir = tmp_path / "store"
    store_dir.mkdir()
    with SQLiteFaissStore(store_dir / "templates.sqlite3", 128, "euclidean", use_gpu=False) as store:
        store.add_many("acme", [(i, v, None) for i, v in zip(data.ids, data.embeddings)])
    out = tmp_path / "out"
    rc = _audit(
        [
            "--data",
            str(audit_dataset),
            "--out",
            str(out),
            "--store",
            f"sqlite:{store_dir}",
            "--tenant",
            "acme",
            "--attackers",
            "deconv",
            "--cache-dir",
            str(audit_cache),
            "--no-images",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["single_photo_identities"] == 3
    assert report["data"]["database"]["audited"] == len(data.ids)
    deconv = report["attacks"]["deconv"]["protected"]
    assert deconv["type2_skipped_single_photo"] == 3 and deconv["type2_n"] == len(data.ids) - 3
    assert any(m["stage"] == "type2" and "3 identities" in m["reason"] for m in report["missing"])
    # the database holds raw templates: "protected" (the templates as stored) is the raw case
    attack = report["attacks"]["deconv"]
    assert attack["protected"]["type1_success"] == attack["raw"]["type1_success"]
