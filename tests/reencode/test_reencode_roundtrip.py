"""Each source and sink kind round-trips: the destination holds exactly the protected source templates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reencode_helpers import (
    make_templates,
    read_all,
    reencode_args,
    write_npy,
    write_npz,
    write_parquet,
    write_postgres,
    write_sqlite,
)

from advface.cli.main import main
from advface.protect import AdvFaceConfig, Protector
from advface.reencode.uri import parse_location

STEPS = 2


def _expected(shadow: Path, vectors: np.ndarray) -> np.ndarray:
    return Protector.from_checkpoint(shadow, config=AdvFaceConfig(steps=STEPS)).protect(vectors)


def _reencode(shadow: Path, source: str, dest: str, *extra: str) -> int:
    return main(reencode_args(shadow, source, dest, *extra, steps=STEPS))


@pytest.mark.parametrize("kind", ["npz", "npy", "parquet", "sqlite", "sqlite-json"])
def test_file_and_sqlite_round_trip(kind: str, tmp_path: Path, shadow_ckpt: Path) -> None:
    ids, vectors = make_templates(150)
    if kind == "npz":
        src, dst = write_npz(tmp_path / "in.npz", ids, vectors), f"npz:{tmp_path / 'out.npz'}"
    elif kind == "npy":
        src, dst = write_npy(tmp_path / "in.npy", ids, vectors), f"npy:{tmp_path / 'out.npy'}"
    elif kind == "parquet":
        src, dst = write_parquet(tmp_path / "in.parquet", ids, vectors), f"parquet:{tmp_path / 'out.parquet'}"
    elif kind == "sqlite":
        src = write_sqlite(tmp_path / "db.sqlite", ids, vectors)
        dst = f"sqlite:{tmp_path / 'db.sqlite'}?table=protected"
    else:
        src = write_sqlite(tmp_path / "db.sqlite", ids, vectors, fmt="json")
        dst = f"sqlite:{tmp_path / 'db.sqlite'}?table=protected&vector_format=json"
    assert _reencode(shadow_ckpt, src, dst) == 0
    out_ids, out = read_all(dst)
    assert out_ids == ids
    np.testing.assert_array_equal(out, _expected(shadow_ckpt, vectors))
    assert not np.array_equal(out, vectors)
    # the work folder is gone; the summary is there
    loc = parse_location(dst)
    if kind in ("npz", "npy", "parquet"):
        assert not (tmp_path / f".{Path(loc.path).name}.reencode").exists()
        assert (tmp_path / f"{Path(loc.path).name}.verify.json").is_file()
    if kind == "npz":
        from advface.embeddings_file import load_embeddings

        data = load_embeddings(tmp_path / "out.npz")  # the advface embeddings-file format
        assert data.ids == ids


def test_cross_kind_and_integer_ids(tmp_path: Path, shadow_ckpt: Path) -> None:
    ids, vectors = make_templates(90)
    int_ids = list(range(1000, 1090))
    src = write_sqlite(tmp_path / "db.sqlite", int_ids, vectors)
    dst = f"parquet:{tmp_path / 'out.parquet'}?id_column=template&vector_column=vec"
    assert _reencode(shadow_ckpt, src, dst, "--summary", str(tmp_path / "s.json")) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["template", "vec"]
    assert str(table.schema.field("template").type) == "int64"
    assert table.column("template").to_pylist() == int_ids
    np.testing.assert_array_equal(
        np.asarray(table.column("vec").to_pylist(), np.float32), _expected(shadow_ckpt, vectors)
    )


def test_postgres_round_trip(postgres_dsn: str, tmp_path: Path, shadow_ckpt: Path) -> None:
    ids, vectors = make_templates(130)
    src = write_postgres(postgres_dsn, ids, vectors)
    dst = f"{postgres_dsn}?table=protected"
    assert (
        _reencode(shadow_ckpt, src, dst, "--work-dir", str(tmp_path / "work"), "--summary", str(tmp_path / "s.json"))
        == 0
    )
    out_ids, out = read_all(dst)
    order = np.argsort(ids)  # PostgreSQL is read in id order
    assert out_ids == sorted(ids)
    np.testing.assert_array_equal(out, _expected(shadow_ckpt, vectors)[order])
    # and back out of PostgreSQL into a file, integer ids into bigint
    int_src = write_postgres(postgres_dsn, list(range(130)), vectors, table="ints")
    assert (
        _reencode(
            shadow_ckpt,
            int_src,
            f"{postgres_dsn}?table=ints_protected",
            "--work-dir",
            str(tmp_path / "work2"),
            "--summary",
            str(tmp_path / "s2.json"),
        )
        == 0
    )
    import psycopg

    with psycopg.connect(postgres_dsn) as conn:
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'ints_protected'"
            ).fetchall()
        )
    assert types["id"] == "bigint"


def test_postgres_connection_loss_is_retried(postgres_dsn: str, shadow_ckpt: Path) -> None:
    """The server drops the reading connection between pages: the source reconnects and loses no row."""
    import psycopg

    from advface.reencode.retry import RetryPolicy
    from advface.reencode.sources import open_source

    ids, vectors = make_templates(100)
    src = write_postgres(postgres_dsn, ids, vectors)
    got: list[str] = []
    with (
        open_source(src, RetryPolicy(attempts=3, base_delay=0.05)) as source,
        psycopg.connect(postgres_dsn, autocommit=True) as admin,
    ):
        for n, chunk in enumerate(source.chunks(30)):
            got += chunk.ids
            if n == 1:
                pid = source._conn.info.backend_pid  # noqa: SLF001
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert got == sorted(ids)


def test_postgres_gives_up_resumably(postgres_dsn: str) -> None:
    from advface.errors import DatabaseUnavailableError
    from advface.reencode.retry import RetryPolicy
    from advface.reencode.sources import open_source

    ids, vectors = make_templates(40)
    src = write_postgres(postgres_dsn, ids, vectors)
    with open_source(src, RetryPolicy(attempts=2, base_delay=0.01)) as source:
        source.dsn = source.dsn.replace("127.0.0.1:", "127.0.0.1:1")  # reconnects go to a closed port
        source._conn.close()  # noqa: SLF001
        with pytest.raises(DatabaseUnavailableError, match="rerun the same command to resume"):
            list(source.chunks(10))
