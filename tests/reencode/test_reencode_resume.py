"""Chunking independence and crash-resume: a run killed with SIGKILL and rerun writes the same bytes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from reencode_helpers import kill_9_midway, make_templates, reencode_args, write_parquet, write_sqlite

from advface.cli.main import main


def _args(shadow: Path, source: str, dest: str, chunk: int, steps: int = 2) -> list[str]:
    return reencode_args(shadow, source, dest, steps=steps, chunk=chunk)


def test_output_does_not_depend_on_chunk_size(tmp_path: Path, shadow_ckpt: Path) -> None:
    ids, vectors = make_templates(230)
    src = write_parquet(tmp_path / "in.parquet", ids, vectors)
    outputs = []
    for chunk in (7, 64, 500):
        out = tmp_path / f"out{chunk}.parquet"
        assert main(_args(shadow_ckpt, src, f"parquet:{out}", chunk)) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    # and of the source's order: the same rows shuffled give the same protected vector per id
    import numpy as np

    from advface.reencode.sources import open_source

    perm = np.random.default_rng(1).permutation(len(ids))
    src2 = write_parquet(tmp_path / "shuffled.parquet", [ids[i] for i in perm], vectors[perm])
    assert main(_args(shadow_ckpt, src2, f"parquet:{tmp_path / 'outs.parquet'}", 33)) == 0
    with (
        open_source(f"parquet:{tmp_path / 'out7.parquet'}") as a,
        open_source(f"parquet:{tmp_path / 'outs.parquet'}") as b,
    ):
        va = {i: v for c in a.chunks(1000) for i, v in zip(c.ids, c.vectors, strict=True)}
        vb = {i: v for c in b.chunks(1000) for i, v in zip(c.ids, c.vectors, strict=True)}
    assert va.keys() == vb.keys() and all(np.array_equal(va[k], vb[k]) for k in va)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "sqlite"])
def test_kill_9_then_rerun_gives_identical_output(kind: str, tmp_path: Path, shadow_ckpt: Path) -> None:
    ids, vectors = make_templates(300)
    if kind == "parquet":
        src = write_parquet(tmp_path / "in.parquet", ids, vectors)
        dest, ref = f"parquet:{tmp_path / 'out.parquet'}", f"parquet:{tmp_path / 'ref.parquet'}"
        work = tmp_path / ".out.parquet.reencode"
    else:
        src = write_sqlite(tmp_path / "db.sqlite", ids, vectors)
        dest, ref = f"sqlite:{tmp_path / 'out.sqlite'}?table=t", f"sqlite:{tmp_path / 'ref.sqlite'}?table=t"
        work = tmp_path / "work"
    extra = [] if kind == "parquet" else ["--work-dir", str(work), "--summary", str(tmp_path / "s.json")]
    args = [*_args(shadow_ckpt, src, dest, 10, steps=12), *extra]
    kill_9_midway(args, work, total=30)
    assert not Path(dest.split(":", 1)[1].split("?")[0]).exists() or kind == "sqlite"

    assert main(args) == 0  # resumes
    summary_path = tmp_path / ("out.parquet.verify.json" if kind == "parquet" else "s.json")
    import json

    summary = json.loads(summary_path.read_text())
    assert summary["passed"] and summary["reencode"]["resumed_from"] >= 40
    ref_extra = (
        []
        if kind == "parquet"
        else ["--work-dir", str(tmp_path / "work-ref"), "--summary", str(tmp_path / "s-ref.json")]
    )
    assert main([*_args(shadow_ckpt, src, ref, 10, steps=12), *ref_extra]) == 0  # uninterrupted
    if kind == "parquet":
        assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "ref.parquet").read_bytes()
    else:
        a = sqlite3.connect(tmp_path / "out.sqlite").execute("SELECT id, embedding FROM t ORDER BY rowid").fetchall()
        b = sqlite3.connect(tmp_path / "ref.sqlite").execute("SELECT id, embedding FROM t ORDER BY rowid").fetchall()
        assert a == b and len(a) == 300
    assert not work.exists()


def test_rerun_with_other_parameters_is_refused(tmp_path: Path, shadow_ckpt: Path) -> None:
    from advface.protect import AdvFaceConfig
    from advface.reencode.job import Job, JobOptions
    from advface.reencode.progress import Journal
    from advface.reencode.verify import VerifyOptions

    ids, vectors = make_templates(50)
    src = write_parquet(tmp_path / "in.parquet", ids, vectors)
    dest = f"parquet:{tmp_path / 'out.parquet'}"
    job = Job(
        JobOptions(
            source=src, dest=dest, shadow=shadow_ckpt, config=AdvFaceConfig(steps=2), verify=VerifyOptions(rel_l2=0.1)
        )
    )
    Journal(job.work_dir, job.params()).close()  # an unfinished run with steps=2
    assert main(_args(shadow_ckpt, src, dest, 10, steps=3)) == 2
    assert not (tmp_path / "out.parquet").exists()
    assert main([*_args(shadow_ckpt, src, dest, 10, steps=3), "--restart"]) == 0
