"""Bad sources and destinations: a clear error (exit 2), nothing written as if complete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reencode_helpers import make_templates, reencode_args, write_parquet, write_sqlite

from advface.cli.main import main


def _run(shadow: Path, source: str, dest: str, *extra: str) -> int:
    return main(reencode_args(shadow, source, dest, *extra, steps=1, chunk=20))


def _assert_failed(capsys: pytest.CaptureFixture[str], code: int, dest: Path, *words: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert not dest.exists()
    for word in words:
        assert word in err, err


def test_missing_columns(tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids, v = make_templates(10)
    src = write_parquet(tmp_path / "in.parquet", ids, v, vector_column="vec")
    _assert_failed(
        capsys,
        _run(shadow_ckpt, src, f"parquet:{tmp_path / 'o.parquet'}"),
        tmp_path / "o.parquet",
        "missing column",
        "embedding",
        "vector_column",
    )


def test_mixed_dimensions(tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids, v = make_templates(60)
    rows = list(v)
    rows[45] = rows[45][:10]
    src = write_parquet(tmp_path / "in.parquet", ids, rows)
    _assert_failed(
        capsys,
        _run(shadow_ckpt, src, f"parquet:{tmp_path / 'o.parquet'}"),
        tmp_path / "o.parquet",
        "mixed dimensions",
        ids[45],
    )


def test_wrong_dimension_for_the_shadow(tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids, v = make_templates(10, dim=8)
    src = write_parquet(tmp_path / "in.parquet", ids, v)
    _assert_failed(
        capsys,
        _run(shadow_ckpt, src, f"parquet:{tmp_path / 'o.parquet'}"),
        tmp_path / "o.parquet",
        "dimension 8",
        "takes 16",
    )


def test_nan_row(tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids, v = make_templates(50)
    v[33, 4] = np.nan
    src = write_sqlite(tmp_path / "db.sqlite", ids, v)
    dest = tmp_path / "o.parquet"
    _assert_failed(capsys, _run(shadow_ckpt, src, f"parquet:{dest}"), dest, ids[33], "NaN")


def test_duplicate_ids_across_chunks(tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids, v = make_templates(70)
    ids[65] = ids[3]  # chunk 0 and chunk 3 (of 20 rows)
    src = write_parquet(tmp_path / "in.parquet", ids, v)
    _assert_failed(
        capsys,
        _run(shadow_ckpt, src, f"parquet:{tmp_path / 'o.parquet'}"),
        tmp_path / "o.parquet",
        "duplicate id",
        ids[3],
        "chunks 0 and 3",
    )


def test_empty_source(tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_parquet(tmp_path / "in.parquet", [], [])
    _assert_failed(capsys, _run(shadow_ckpt, src, f"parquet:{tmp_path / 'o.parquet'}"), tmp_path / "o.parquet", "empty")
    assert not (tmp_path / ".o.parquet.reencode").exists()


def test_existing_destination_needs_overwrite(
    tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, v = make_templates(30)
    src = write_parquet(tmp_path / "in.parquet", ids, v)
    dest = tmp_path / "o.parquet"
    dest.write_bytes(b"precious")
    assert _run(shadow_ckpt, src, f"parquet:{dest}") == 2
    assert "already exists" in capsys.readouterr().err and dest.read_bytes() == b"precious"
    assert _run(shadow_ckpt, src, f"parquet:{dest}", "--overwrite") == 0
    assert dest.read_bytes() != b"precious"
    # an existing table too
    db_src = write_sqlite(tmp_path / "db.sqlite", ids, v)
    assert (
        _run(
            shadow_ckpt,
            db_src,
            f"sqlite:{tmp_path / 'db.sqlite'}?table=templates2",
            "--work-dir",
            str(tmp_path / "w"),
            "--summary",
            str(tmp_path / "s.json"),
        )
        == 0
    )
    assert (
        _run(
            shadow_ckpt,
            db_src,
            f"sqlite:{tmp_path / 'db.sqlite'}?table=templates2",
            "--work-dir",
            str(tmp_path / "w"),
            "--summary",
            str(tmp_path / "s.json"),
        )
        == 2
    )


@pytest.mark.parametrize(
    "location",
    [
        "foo:bar",
        "parquet:",
        "sqlite:/x.db",
        "sqlite:/x.db?table=a;drop",
        "parquet:/x?colour=red",
        "postgresql://u@h/db",
    ],
)
def test_bad_locations(location: str, tmp_path: Path, shadow_ckpt: Path) -> None:
    from advface.errors import ConfigError
    from advface.reencode.uri import parse_location

    with pytest.raises(ConfigError):
        parse_location(location)


def test_same_source_and_destination(tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids, v = make_templates(10)
    src = write_parquet(tmp_path / "in.parquet", ids, v)
    assert _run(shadow_ckpt, src, src, "--overwrite") == 2
    assert "same" in capsys.readouterr().err


def test_dry_run_writes_nothing(tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids, v = make_templates(40)
    src = write_parquet(tmp_path / "in.parquet", ids, v)
    assert _run(shadow_ckpt, src, f"parquet:{tmp_path / 'o.parquet'}", "--dry-run", "--dry-run-sample", "8") == 0
    assert "dry run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_location_forms() -> None:
    from advface.reencode.uri import parse_location

    loc = parse_location("postgresql://u:secret@db:5432/app?sslmode=require&table=public.templates&id_column=tid")
    assert loc.path == "postgresql://u:secret@db:5432/app?sslmode=require"
    assert loc.options == {"table": "public.templates", "id_column": "tid"}
    assert "secret" not in loc.display()
    loc = parse_location("sqlite:/data/t.db?table=t&vector_format=json")
    assert (loc.scheme, loc.path, loc.options["vector_format"]) == ("sqlite", "/data/t.db", "json")
    assert parse_location("npy:/x/v.npy?ids=/x/ids.txt").options == {"ids": "/x/ids.txt"}
