"""--verify-only catches tampering; --swap replaces the source only after verification passes."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from reencode_helpers import make_templates, read_all, reencode_args, write_parquet, write_postgres, write_sqlite

from advface.cli.main import main


def _args(shadow: Path, source: str, dest: str, *extra: str) -> list[str]:
    return reencode_args(shadow, source, dest, *extra, chunk=40)


@pytest.fixture()
def reencoded(tmp_path: Path, shadow_ckpt: Path) -> tuple[str, Path, list[str], np.ndarray]:
    ids, vectors = make_templates(120)
    src = write_sqlite(tmp_path / "db.sqlite", ids, vectors)
    assert (
        main(
            _args(
                shadow_ckpt,
                src,
                f"sqlite:{tmp_path / 'db.sqlite'}?table=protected",
                "--work-dir",
                str(tmp_path / "w"),
                "--summary",
                str(tmp_path / "s.json"),
            )
        )
        == 0
    )
    return src, tmp_path / "db.sqlite", ids, vectors


def _verify(shadow: Path, src: str, db: Path, summary: Path) -> tuple[int, dict]:
    code = main([*_args(shadow, src, f"sqlite:{db}?table=protected", "--summary", str(summary)), "--verify-only"])
    return code, json.loads(summary.read_text())


def test_verify_only_passes_on_untouched_output(reencoded, shadow_ckpt: Path, tmp_path: Path) -> None:  # noqa: ANN001
    src, db, ids, _ = reencoded
    code, summary = _verify(shadow_ckpt, src, db, tmp_path / "v.json")
    assert code == 0 and summary["passed"] and summary["destination_count"] == len(ids)
    assert summary["rel_l2_max"] <= 0.1 + 1e-6 and summary["matching"]["sample"] == len(ids)


@pytest.mark.parametrize("tamper", ["over_budget", "nan", "missing", "extra", "raw_copy"])
def test_verify_only_catches_tampering(
    tamper: str,
    reencoded,
    shadow_ckpt: Path,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    src, db, ids, vectors = reencoded
    conn = sqlite3.connect(db)
    if tamper == "over_budget":
        conn.execute("UPDATE protected SET embedding = ? WHERE id = ?", ((vectors[5] * 1.5).tobytes(), ids[5]))
    elif tamper == "nan":
        bad = vectors[7].copy()
        bad[0] = np.nan
        conn.execute("UPDATE protected SET embedding = ? WHERE id = ?", (bad.tobytes(), ids[7]))
    elif tamper == "missing":
        conn.execute("DELETE FROM protected WHERE id = ?", (ids[9],))
    elif tamper == "extra":
        conn.execute("INSERT INTO protected VALUES ('intruder', ?)", (vectors[0].tobytes(),))
    else:  # the raw templates copied over: within budget (delta 0), but not protected
        conn.execute("UPDATE protected SET embedding = (SELECT embedding FROM templates t WHERE t.id = protected.id)")
    conn.commit()
    conn.close()
    code, summary = _verify(shadow_ckpt, src, db, tmp_path / "v.json")
    assert code == 1 and not summary["passed"]
    text = " ".join(summary["failures"])
    expected = {
        "over_budget": ids[5],
        "nan": ids[7],
        "missing": ids[9],
        "extra": "intruder",
        "raw_copy": "not protected",
    }[tamper]
    assert expected in text


def test_swap_sqlite_replaces_source_after_verification(
    reencoded,
    shadow_ckpt: Path,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    _, db, ids, vectors = reencoded
    src = write_sqlite(tmp_path / "db2.sqlite", ids, vectors)
    assert (
        main(
            _args(
                shadow_ckpt,
                src,
                f"sqlite:{tmp_path / 'db2.sqlite'}?table=new",
                "--swap",
                "--work-dir",
                str(tmp_path / "w2"),
                "--summary",
                str(tmp_path / "s2.json"),
            )
        )
        == 0
    )
    conn = sqlite3.connect(tmp_path / "db2.sqlite")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"templates"}
    got_ids, got = read_all(src)
    assert got_ids == ids
    ref = dict(zip(*read_all(f"sqlite:{db}?table=protected"), strict=True))
    np.testing.assert_array_equal(got, np.stack([ref[i] for i in ids]))


def test_swap_refused_when_table_has_other_columns(tmp_path: Path, shadow_ckpt: Path) -> None:
    ids, vectors = make_templates(30)
    src = write_sqlite(tmp_path / "db.sqlite", ids, vectors, extra_column=True)
    code = main(
        _args(
            shadow_ckpt,
            src,
            f"sqlite:{tmp_path / 'db.sqlite'}?table=new",
            "--swap",
            "--work-dir",
            str(tmp_path / "w"),
            "--summary",
            str(tmp_path / "s.json"),
        )
    )
    assert code == 2
    _, raw = read_all(src)
    np.testing.assert_array_equal(raw, vectors)  # the source is untouched


def test_swap_not_done_when_verification_fails(tmp_path: Path, shadow_ckpt: Path) -> None:
    ids, vectors = make_templates(60)
    src = write_parquet(tmp_path / "in.parquet", ids, vectors)
    before = (tmp_path / "in.parquet").read_bytes()
    code = main(
        _args(shadow_ckpt, src, f"parquet:{tmp_path / 'out.parquet'}", "--swap", "--match-threshold", "1e-9")
    )  # nothing can match: verification fails
    assert code == 1
    assert (tmp_path / "in.parquet").read_bytes() == before
    summary = json.loads((tmp_path / "out.parquet.verify.json").read_text())
    assert summary["swapped"] is False


def test_swap_parquet_and_postgres(tmp_path: Path, shadow_ckpt: Path, postgres_dsn: str) -> None:
    ids, vectors = make_templates(50)
    src = write_parquet(tmp_path / "in.parquet", ids, vectors)
    assert main(_args(shadow_ckpt, src, f"parquet:{tmp_path / 'out.parquet'}", "--swap")) == 0
    assert not (tmp_path / "out.parquet").exists()
    got_ids, got = read_all(src)
    assert got_ids == ids and not np.array_equal(got, vectors)

    pg_src = write_postgres(postgres_dsn, ids, vectors)
    assert (
        main(
            _args(
                shadow_ckpt,
                pg_src,
                f"{postgres_dsn}?table=new",
                "--swap",
                "--work-dir",
                str(tmp_path / "w"),
                "--summary",
                str(tmp_path / "s.json"),
            )
        )
        == 0
    )
    pg_ids, pg = read_all(pg_src)
    order = {i: k for k, i in enumerate(ids)}
    np.testing.assert_array_equal(pg, got[[order[i] for i in pg_ids]])
    import psycopg

    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT to_regclass('new')").fetchone()[0] is None
