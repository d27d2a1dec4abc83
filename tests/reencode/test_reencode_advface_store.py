"""``advface reencode --dest advface:DATA_DIR?tenant=T``: raw templates straight into the sidecar's own store.

Each test opens the store afterwards the way the sidecar does (``server.servicer.open_store`` from the same
config) and searches it with the raw template as probe (through the keyed transform when it is on, as the
sidecar's Identify path does): every subject must come back first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from reencode_helpers import DIM, kill_9_midway, make_templates, write_parquet

from advface.cli.main import main
from advface.config import load_config
from advface.errors import AlreadyExistsError, ConfigError
from advface.reencode.progress import Journal
from advface.reencode.sources import open_source
from advface.reencode.store_io import AdvfaceStoreSink

TENANT = "acme"


def _config(
    tmp_path: Path,
    shadow: Path,
    *,
    encrypted: bool = False,
    keyed: str | None = None,
    store: dict[str, Any] | None = None,
    name: str = "advface.yaml",
) -> Path:
    """A sidecar configuration: sqlite store in tmp_path/store (unless ``store``), optional encryption key and
    keyed transform (``keyed``: "null" for a pure rotation, "auto" for norm equalisation)."""
    from advface.crypto import generate_key, write_key_file

    cfg: dict[str, Any] = {
        "store": store or {"backend": "sqlite", "data_dir": str(tmp_path / "store"), "use_gpu": False},
        "protection": {"shadow": str(shadow), "steps": 2, "rel_l2": 0.1, "seed": 0},
        "keys": {"auto": False},  # exactly the keys below (the key folder's defaults: tests/service/test_key_folder.py)
    }
    if encrypted:
        key = tmp_path / "at-rest.key"
        if not key.exists():
            write_key_file(key, generate_key())
        cfg["encryption"] = {"key_file": str(key)}
    if keyed is not None:
        secret = tmp_path / "transform.key"
        if not secret.exists():
            write_key_file(secret, generate_key())
        cfg["keyed_transform"] = {
            "enabled": True,
            "secret_file": str(secret),
            "norm": None if keyed == "null" else keyed,
        }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _args(config: Path, source: str, dest: str, *extra: str, chunk: int = 16) -> list[str]:
    return [
        "reencode",
        "--source",
        source,
        "--dest",
        dest,
        "--config",
        str(config),
        "--chunk-size",
        str(chunk),
        "--match-threshold",
        "1.0",
        "-q",
        *extra,
    ]


def _sidecar_store(config: Path) -> Any:
    """The store as ``advface serve --config`` opens it (the tiny shadow makes 16-d templates; dlib: euclidean)."""
    from advface.service import open_store

    return open_store(load_config(config), DIM, "euclidean")


def _probe(config: Path, raw: np.ndarray) -> np.ndarray:
    """A raw probe as the sidecar's Identify path prepares it (its keyed transform, when on)."""
    from advface.service import transforms_from_config

    transforms = transforms_from_config(load_config(config).keyed_transform, DIM, "dlib")
    return raw[None, :] if transforms is None else transforms.apply(TENANT, raw[None, :])


def _stored(config: Path) -> dict[str, np.ndarray]:
    with _sidecar_store(config) as store:
        out = {}
        token = ""
        while True:
            page, token = store.list_subjects(TENANT, page_size=1000, page_token=token)
            for info in page:
                assert len(info.template_ids) == 1
                out[info.subject_id] = store.subject_vectors(TENANT, info.subject_id)[0]
            if not token:
                return out


def _assert_found_by_search(config: Path, ids: list[str], vectors: np.ndarray) -> None:
    with _sidecar_store(config) as store:
        assert store.count(TENANT) == len(ids) and store.count(TENANT, subjects=True) == len(ids)
        for i in range(0, len(ids), 7):
            matches = store.search(TENANT, _probe(config, vectors[i])[0], 3)
            assert matches[0].subject_id == ids[i]


@pytest.mark.parametrize("setting", ["plain", "encrypted+rotation"])
def test_parquet_into_store_then_sidecar_finds_each_subject(tmp_path: Path, shadow_ckpt: Path, setting: str) -> None:
    ids, vectors = make_templates(60)
    src = write_parquet(tmp_path / "raw.parquet", ids, vectors)
    config = _config(tmp_path, shadow_ckpt, encrypted=setting != "plain", keyed="null" if setting != "plain" else None)
    dest = f"advface:{tmp_path / 'store'}?tenant={TENANT}"
    assert main(_args(config, src, dest)) == 0
    _assert_found_by_search(config, ids, vectors)

    # the stored templates are exactly T(AdvFace(z)) of the file sink's AdvFace(z) (same protection, any sink)
    ref = tmp_path / "ref.parquet"
    assert main(_args(config, src, f"parquet:{ref}")) == 0
    with open_source(f"parquet:{ref}") as s:
        protected = {i: v for c in s.chunks(1000) for i, v in zip(c.ids, c.vectors, strict=True)}
    stored = _stored(config)
    assert stored.keys() == set(ids)
    for row_id, p in protected.items():
        want = _probe(config, p)[0]  # the transform applied to the protected vector
        np.testing.assert_allclose(stored[row_id], want, rtol=0, atol=1e-6)
        assert not np.allclose(stored[row_id], vectors[ids.index(row_id)], atol=1e-4)  # never the raw vector

    if setting != "plain":  # encrypted at rest: the vectors' bytes are not in the database file
        blob = (tmp_path / "store" / "templates.sqlite3").read_bytes()
        assert stored[ids[0]].astype("<f4").tobytes() not in blob
        assert json.loads((tmp_path / "store" / "keyed_transform.json").read_text())["enabled"] is True

    # verification alone, against the store: passes, with the full budget check (pure rotation is invertible)
    summary_path = tmp_path / "v.json"
    assert main(_args(config, src, dest, "--verify-only", "--summary", str(summary_path))) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["passed"] and summary["destination_count"] == 60 and summary["over_budget"] == 0
    assert summary["options"]["direction_only"] is False
    assert 0 < summary["rel_l2_max"] <= 0.1 + 1e-5

    # as a source: the stored (protected) vectors, subject ids as ids
    with open_source(dest, store_config=config) as s:
        assert s.count() == 60
        got = {i: v for c in s.chunks(25) for i, v in zip(c.ids, c.vectors, strict=True)}
    assert got.keys() == stored.keys() and all(np.array_equal(got[k], stored[k]) for k in got)


def test_norm_equalised_transform_verifies_directions(tmp_path: Path, shadow_ckpt: Path) -> None:
    ids, vectors = make_templates(40)
    src = write_parquet(tmp_path / "raw.parquet", ids, vectors)
    config = _config(tmp_path, shadow_ckpt, keyed="auto")
    dest = f"advface:{tmp_path / 'store'}?tenant={TENANT}"
    summary_path = tmp_path / "s.json"
    assert main(_args(config, src, dest, "--summary", str(summary_path))) == 0
    _assert_found_by_search(config, ids, vectors)
    summary = json.loads(summary_path.read_text())
    assert summary["passed"] and summary["options"]["direction_only"] is True
    assert 0 < summary["rel_l2_max"] <= 0.1 + 1e-5
    norms = np.linalg.norm(np.stack(list(_stored(config).values())), axis=1)
    np.testing.assert_allclose(norms, 1.4253, rtol=1e-5)  # dlib's calibrated norm

    # a store holding raw templates (passed through the transform only) fails verification: not protected
    from advface.service import open_checked_store, transforms_from_config

    other = _config(
        tmp_path,
        shadow_ckpt,
        keyed="auto",
        store={"backend": "sqlite", "use_gpu": False, "data_dir": str(tmp_path / "bad")},
        name="bad.yaml",
    )
    transforms = transforms_from_config(load_config(other).keyed_transform, DIM, "dlib")
    # the marker is recorded while the store is empty, as the sidecar does at start
    with open_checked_store(load_config(other), DIM, "euclidean", transforms) as store:
        store.add_many(TENANT, [(i, transforms.apply(TENANT, v[None, :]), None) for i, v in zip(ids, vectors)])
    bad = tmp_path / "bad.json"
    assert (
        main(_args(other, src, f"advface:{tmp_path / 'bad'}?tenant={TENANT}", "--verify-only", "--summary", str(bad)))
        == 1
    )
    assert json.loads(bad.read_text())["unchanged"] == len(ids)


def test_crash_between_store_and_journal_commit_then_resume(
    tmp_path: Path, shadow_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst moment: a chunk is in the store but not yet in the journal. The rerun writes it again (replacing
    its subjects) and the result equals an uninterrupted run's."""
    ids, vectors = make_templates(70)
    src = write_parquet(tmp_path / "raw.parquet", ids, vectors)
    config = _config(tmp_path, shadow_ckpt, encrypted=True, keyed="null")
    ref_config = _config(
        tmp_path,
        shadow_ckpt,
        encrypted=True,
        keyed="null",
        name="ref.yaml",
        store={"backend": "sqlite", "data_dir": str(tmp_path / "ref"), "use_gpu": False},
    )
    assert main(_args(ref_config, src, f"advface:{tmp_path / 'ref'}?tenant={TENANT}")) == 0

    dest = f"advface:{tmp_path / 'store'}?tenant={TENANT}"
    work = tmp_path / "work"
    original = Journal.commit_chunk
    calls = {"n": 0}

    class Crash(BaseException):
        pass

    def crashing(self: Journal, *a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash  # like kill -9: not an AdvfaceError, nothing handles it
        original(self, *a, **k)

    monkeypatch.setattr(Journal, "commit_chunk", crashing)
    with pytest.raises(Crash):
        main(_args(config, src, dest, "--work-dir", str(work)))
    monkeypatch.setattr(Journal, "commit_chunk", original)
    with _sidecar_store(config) as store:
        assert store.count(TENANT) == 48  # three chunks of 16 stored, two of them journaled

    # a rerun without the work folder's say-so would refuse the non-empty tenant; with it, it resumes
    summary_path = tmp_path / "s.json"
    assert main(_args(config, src, dest, "--work-dir", str(work), "--summary", str(summary_path))) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["passed"] and summary["reencode"]["resumed_from"] == 32
    assert not work.exists()
    got, ref = _stored(config), _stored(ref_config)
    assert got.keys() == ref.keys() == set(ids)
    assert all(np.array_equal(got[k], ref[k]) for k in ids)
    _assert_found_by_search(config, ids, vectors)


def test_bad_locations_and_non_empty_tenant(
    tmp_path: Path, shadow_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, vectors = make_templates(20)
    src = write_parquet(tmp_path / "raw.parquet", ids, vectors)
    config = _config(tmp_path, shadow_ckpt)
    store_dir = tmp_path / "store"
    for dest, words in [
        (f"advface:{store_dir}?tenant={TENANT}&table=x", ["unknown option", "table", "tenant=NAME"]),
        (f"advface:{store_dir}", ["needs ?tenant=NAME"]),
        (f"advface:{store_dir}?tenant=%20bad", ["tenant", "whitespace"]),
    ]:
        assert main(_args(config, src, dest)) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
        assert not store_dir.exists()

    # a tenant that already holds subjects is refused, and nothing in it changes
    with _sidecar_store(config) as store:
        store.add(TENANT, "someone", np.ones(DIM, np.float32))
    dest = f"advface:{store_dir}?tenant={TENANT}"
    assert main(_args(config, src, dest)) == 2
    err = capsys.readouterr().err
    assert "already holds 1 subject" in err and "--overwrite" in err
    assert set(_stored(config)) == {"someone"}
    with pytest.raises(ConfigError, match="--swap"):
        from advface.cli.main import build_parser
        from advface.cli.reencode import build_job

        build_job(build_parser().parse_args(_args(config, src, dest, "--swap"))).run()
    # another tenant of the same store is fine; --overwrite empties the tenant first
    assert main(_args(config, src, f"advface:{store_dir}?tenant=other")) == 0
    assert main(_args(config, src, dest, "--overwrite")) == 0
    assert set(_stored(config)) == set(ids)

    # PostgreSQL backend: the store is store.dsn, a folder is refused
    pg = _config(
        tmp_path, shadow_ckpt, store={"backend": "postgresql", "dsn": "postgresql://u@127.0.0.1:1/db"}, name="pg.yaml"
    )
    assert main(_args(pg, src, f"advface:{store_dir}?tenant={TENANT}")) == 2
    assert "advface:?tenant=" in capsys.readouterr().err


def test_sink_refuses_dimension_of_another_store(tmp_path: Path, shadow_ckpt: Path) -> None:
    config = _config(tmp_path, shadow_ckpt)
    with _sidecar_store(config) as store:
        store.add(TENANT, "x", np.ones(DIM, np.float32))
    from advface.reencode.store_io import StoreTarget
    from advface.reencode.uri import parse_location

    loc = parse_location(f"advface:{tmp_path / 'store'}?tenant=t2")
    with pytest.raises(ConfigError, match="16-d templates"):
        AdvfaceStoreSink(loc, False, StoreTarget.resolve(loc, config), 32)
    mine = parse_location(f"advface:{tmp_path / 'store'}?tenant={TENANT}")
    sink = AdvfaceStoreSink(mine, False, StoreTarget.resolve(mine, config), DIM)
    try:
        with pytest.raises(AlreadyExistsError):
            sink.check_writable()
    finally:
        sink.close()


def test_postgresql_store(tmp_path: Path, shadow_ckpt: Path, postgres_dsn: str) -> None:
    ids, vectors = make_templates(30)
    src = write_parquet(tmp_path / "raw.parquet", ids, vectors)
    config = _config(
        tmp_path, shadow_ckpt, encrypted=True, keyed="null", store={"backend": "postgresql", "dsn": postgres_dsn}
    )
    summary_path = tmp_path / "s.json"
    assert main(_args(config, src, f"advface:?tenant={TENANT}", "--summary", str(summary_path))) == 0
    assert json.loads(summary_path.read_text())["passed"]
    _assert_found_by_search(config, ids, vectors)


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted(tmp_path: Path, shadow_ckpt: Path) -> None:
    ids, vectors = make_templates(300)
    src = write_parquet(tmp_path / "raw.parquet", ids, vectors)
    config = _config(tmp_path, shadow_ckpt, encrypted=True, keyed="null")
    dest = f"advface:{tmp_path / 'store'}?tenant={TENANT}"
    work = tmp_path / "work"
    args = [*_args(config, src, dest, "--work-dir", str(work), "--steps", "12", chunk=10)]
    kill_9_midway(args, work, total=30)

    # --restart would start over on a tenant that now holds subjects: refused, the work folder kept
    assert main([*args, "--restart"]) == 2
    assert (work / "journal.sqlite").exists()
    summary_path = tmp_path / "s.json"
    assert main([*args, "--summary", str(summary_path)]) == 0  # resumes
    summary = json.loads(summary_path.read_text())
    assert summary["passed"] and summary["reencode"]["resumed_from"] >= 40 and not work.exists()

    ref_config = _config(
        tmp_path,
        shadow_ckpt,
        encrypted=True,
        keyed="null",
        name="ref.yaml",
        store={"backend": "sqlite", "data_dir": str(tmp_path / "ref"), "use_gpu": False},
    )
    assert (
        main(_args(ref_config, src, f"advface:{tmp_path / 'ref'}?tenant={TENANT}", "--steps", "12", chunk=10)) == 0
    )  # uninterrupted
    got, ref = _stored(config), _stored(ref_config)
    assert got.keys() == ref.keys() == set(ids)
    assert all(np.array_equal(got[k], ref[k]) for k in ids)
