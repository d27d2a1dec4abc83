"""Key rotation and template re-issue of PostgresStore on a real PostgreSQL + pgvector server: round trip, wrong
key, tampering, plaintext migration, kill -9 in the middle of a rotation, a second replica during rotation and
re-issue, and the `advface rotate-key` / `advface rotate-transform` commands with `store.backend: postgresql`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import psycopg
import pytest
from rotation_helpers import DIM, check_rotation_survives_kill_9, fill

from advface.crypto import TemplateCipher, generate_key, load_key_file, write_key_file
from advface.errors import ConfigError, IntegrityError
from advface.store.postgres import PostgresStore


def _row_keys(dsn: str) -> list[str | None]:
    """Key id of every template row (None: a plaintext row)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT substring(ciphertext from 2 for 8), vector IS NOT NULL FROM advface_templates ORDER BY id"
        ).fetchall()
    return [None if plain else bytes(kid).hex() for kid, plain in rows]


def test_rotate_round_trip_wrong_key_and_tampering(postgres_dsn: str) -> None:
    old, new = TemplateCipher.generate(), TemplateCipher.generate()
    with PostgresStore(postgres_dsn, DIM, "cosine", cipher=old) as s:
        vectors = fill(s, 50)
        assert s.encryption_info()["key_ids"] == [old.key_id]
    with PostgresStore(postgres_dsn, DIM, "cosine", cipher=new.with_previous(old)) as s:
        assert set(s.encryption_info()["key_ids"]) == {old.key_id, new.key_id}  # type: ignore[call-overload]
        extra = fill(s, 3, seed=9, tenant="u")  # new rows already under the new key
        assert _row_keys(postgres_dsn).count(new.key_id) == 3
        assert s.rotate(new, batch_size=7) == 50
        assert s.rotate(new) == 0  # nothing left
        info = s.encryption_info()
        assert info["key_ids"] == [new.key_id] and info["rotation"] is None
        assert s.search("t", vectors["s5"], 1)[0].subject_id == "s5"
    assert set(_row_keys(postgres_dsn)) == {new.key_id}
    with pytest.raises(ConfigError, match="wrong key"):  # the old key alone no longer opens it
        PostgresStore(postgres_dsn, DIM, "cosine", cipher=old)
    with PostgresStore(postgres_dsn, DIM, "cosine", cipher=new) as s:  # the old key is not needed any more
        for sid in ("s0", "s49"):
            np.testing.assert_array_equal(s.subject_vectors("t", sid)[0], vectors[sid])
        assert s.search("u", extra["s1"], 1)[0].subject_id == "s1"
        template = s.get_subject("t", "s7").template_ids[0]
    # a flipped ciphertext byte is rejected, naming the row: at open, and by a rotation (which then changes nothing)
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(
            "UPDATE advface_templates SET ciphertext = overlay(ciphertext placing "
            "decode(lpad(to_hex(get_byte(ciphertext, 30) # 1), 2, '0'), 'hex') from 31 for 1) WHERE template_id = %s",
            (template,),
        )
    with pytest.raises(IntegrityError, match=template):
        PostgresStore(postgres_dsn, DIM, "cosine", cipher=new)
    third = TemplateCipher.generate()

    class Unchecked(PostgresStore):  # open without building the index, to reach rotate() over a tampered row
        def _rebuild_all(self) -> None:
            pass

    before = _row_keys(postgres_dsn)
    with Unchecked(postgres_dsn, DIM, "cosine", cipher=new) as s:
        with pytest.raises(IntegrityError, match=f"template '{template}' failed authentication during rotation"):
            s.rotate(third, batch_size=100)
    assert _row_keys(postgres_dsn) == before  # the batch was rolled back


def test_plaintext_migration(postgres_dsn: str) -> None:
    with PostgresStore(postgres_dsn, DIM, "euclidean") as s:
        vectors = fill(s, 40)
        with pytest.raises(ConfigError, match="not encrypted"):
            s.rotate(TemplateCipher.generate())
    cipher = TemplateCipher.generate()
    with pytest.raises(ConfigError, match="rotate-key"):
        PostgresStore(postgres_dsn, DIM, "euclidean", cipher=cipher)
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=cipher, migrate_plaintext=True) as s:
        assert s.encryption_info()["plaintext_rows"]
        assert s.search("t", vectors["s3"], 1)[0].subject_id == "s3"  # readable during the migration
        fill(s, 2, seed=5, tenant="u")  # written encrypted at once
        assert s.rotate(cipher, batch_size=16) == 40
        assert not s.encryption_info()["plaintext_rows"]
    assert set(_row_keys(postgres_dsn)) == {cipher.key_id}  # no `vector` column left
    with pytest.raises(ConfigError, match="encrypted templates"):
        PostgresStore(postgres_dsn, DIM, "euclidean")
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=cipher) as s:
        np.testing.assert_array_equal(s.subject_vectors("t", "s9")[0], vectors["s9"])
        assert s.search("t", vectors["s39"], 1)[0].subject_id == "s39"


def test_rotation_survives_kill_9_and_resumes(postgres_dsn: str, tmp_path: Path) -> None:
    check_rotation_survives_kill_9(PostgresStore, postgres_dsn, tmp_path, lambda: _row_keys(postgres_dsn))


def test_replica_during_rotation_and_interrupted_reissue(postgres_dsn: str) -> None:
    """A second store object (another sidecar) keeps answering during a rotation, and sees a re-issue (its index
    is refreshed through the tenant generations); an interrupted re-issue resumes without rewriting a row twice."""
    old, new = TemplateCipher.generate(), TemplateCipher.generate()
    with PostgresStore(postgres_dsn, DIM, "cosine", cipher=old) as s:
        vectors = fill(s, 30)
    ring = new.with_previous(old)
    with (
        PostgresStore(postgres_dsn, DIM, "cosine", cipher=ring) as admin,
        PostgresStore(postgres_dsn, DIM, "cosine", cipher=ring) as replica,
    ):
        before = [replica.search("t", v, 3) for v in vectors.values()]
        assert admin.rotate(new, batch_size=8) == 30
        assert [replica.search("t", v, 3) for v in vectors.values()] == before

        q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((DIM, DIM)))
        q = q.astype(np.float32)
        calls = {"n": 0}

        def crashing(tenant: str, x: np.ndarray) -> np.ndarray:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("killed")
            return x @ q

        with pytest.raises(KeyboardInterrupt):
            admin.transform_vectors(crashing, job="j1", batch_size=7)
        assert admin.transform_job() == "j1"
        with pytest.raises(ConfigError, match="unfinished re-issue job 'j1'"):
            admin.transform_vectors(lambda t, x: x, job="j2")
        assert admin.transform_vectors(lambda t, x: x @ q, job="j1", batch_size=7) == 30 - 14  # 2 batches kept
        admin.finish_transform_job("j1")
        assert admin.transform_job() is None
        for sid, v in vectors.items():  # every row rotated exactly once
            np.testing.assert_allclose(admin.subject_vectors("t", sid)[0], v @ q, atol=1e-5)
        # the replica refreshes its index: probes through the new transform find the same subjects, same scores
        after = [replica.search("t", v @ q, 3) for v in vectors.values()]
        assert [[m.subject_id for m in r] for r in after] == [[m.subject_id for m in r] for r in before]
        np.testing.assert_allclose(
            [[m.score for m in r] for r in after], [[m.score for m in r] for r in before], atol=1e-5
        )


def test_transform_vectors_plaintext_mode(postgres_dsn: str) -> None:
    """In plaintext mode the rewritten `vector` column is what SQL search uses at once (no in-memory index)."""
    with PostgresStore(postgres_dsn, DIM, "euclidean") as s:
        vectors = fill(s, 20)
        vectors.update({f"u{k}": v for k, v in fill(s, 5, seed=2, tenant="u").items()})
        before = s.search("t", vectors["s4"], 5)
        assert s.transform_vectors(lambda t, x: -x if t == "t" else 2 * x, job="neg", batch_size=6) == 25
        np.testing.assert_array_equal(s.subject_vectors("u", "s1")[0], 2 * vectors["us1"])
        after = s.search("t", -vectors["s4"], 5)
        assert [(m.subject_id, round(m.score, 4)) for m in after] == [(m.subject_id, round(m.score, 4)) for m in before]
        s.finish_transform_job("neg")
        with pytest.raises(ConfigError, match="unusable result"):
            s.transform_vectors(lambda t, x: x[:, :3], job="bad")
        assert s.transform_job() == "bad"  # nothing rewritten; the job stays recorded until it is finished
        np.testing.assert_array_equal(s.subject_vectors("t", "s0")[0], -vectors["s0"])


# --------------------------------------------------------------------------------------------------- commands


def _config(tmp_path: Path, dsn: str, extra: str = "") -> Path:
    path = tmp_path / "advface.yaml"
    path.write_text(f"store:\n  backend: postgresql\n  dsn: {dsn!r}\n{extra}", encoding="utf-8")
    return path


def test_cli_rotate_key_postgresql(postgres_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from advface.cli.main import main

    with PostgresStore(postgres_dsn, DIM, "cosine") as s:
        vectors = fill(s, 30)
    for name in ("a", "b"):
        assert main(["keygen", "--out", str(tmp_path / f"{name}.key")]) == 0
    capsys.readouterr()
    config = _config(tmp_path, postgres_dsn)
    assert main(["rotate-key", "--config", str(config), "--new-key-file", str(tmp_path / "a.key"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "encrypted 30 templates" in out and "password" not in out
    assert main(["rotate-key", "--dsn", postgres_dsn, "--new-key-file", str(tmp_path / "b.key")]) == 2  # no old key
    assert "wrong key" in capsys.readouterr().err
    assert (
        main(
            [
                "rotate-key",
                "--dsn",
                postgres_dsn,
                "--old-key-file",
                str(tmp_path / "a.key"),
                "--new-key-file",
                str(tmp_path / "b.key"),
                "--batch-size",
                "4",
                "-q",
            ]
        )
        == 0
    )
    assert "re-encrypted 30 templates" in capsys.readouterr().out
    b = TemplateCipher(load_key_file(tmp_path / "b.key"))
    assert set(_row_keys(postgres_dsn)) == {b.key_id}
    with PostgresStore(postgres_dsn, DIM, "cosine", cipher=b) as s:
        np.testing.assert_array_equal(s.subject_vectors("t", "s3")[0], vectors["s3"])


def test_cli_rotate_transform_postgresql(postgres_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Templates issued under keyed transform v1 (marker in the database), re-issued under v2 by the command:
    search results for probes through the new transform are those of the old probes through the old one."""
    from advface.cli.main import main
    from advface.protect.tenant_transform import TenantTransforms, check_db_store_marker, rotate_store

    secret_file = write_key_file(tmp_path / "transform.key", generate_key())
    enc_file = write_key_file(tmp_path / "enc.key", generate_key())
    secret, cipher = load_key_file(secret_file), TemplateCipher(load_key_file(enc_file))
    old = TenantTransforms(secret, DIM, version=1, norm=1.4)
    new = TenantTransforms(secret, DIM, version=2, norm=1.4)
    raw = np.random.default_rng(7).standard_normal((24, DIM)).astype(np.float32)
    probes = raw + 0.2 * np.random.default_rng(8).standard_normal(raw.shape).astype(np.float32)
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=cipher) as s:
        check_db_store_marker(s, old, 0)  # what a sidecar does at start: records the marker of an empty store
        for tenant in ("a", "b"):
            s.add_many(tenant, [(f"p{i}", old.apply(tenant, raw[i : i + 1]), None) for i in range(len(raw))])
        before = {t: [s.search(t, old.apply(t, p[None])[0], 5) for p in probes] for t in ("a", "b")}
        with pytest.raises(ConfigError, match="was not issued under the given old transform"):
            rotate_store(s, None, new, TenantTransforms(secret, DIM, version=3, norm=1.4))
    config = _config(
        tmp_path,
        postgres_dsn,
        textwrap.dedent(f"""\
        encryption:
          key_file: {str(enc_file)!r}
        keyed_transform:
          enabled: true
          secret_file: {str(secret_file)!r}
          version: 1
          norm: 1.4
        """),
    )
    assert main(["rotate-transform", "--config", str(config), "--new-version", "2", "--batch-size", "5", "-q"]) == 0
    assert "re-issued 48 templates" in capsys.readouterr().out
    with PostgresStore(postgres_dsn, DIM, "euclidean", cipher=cipher) as s:
        check_db_store_marker(s, new, s.count())  # the sidecar now starts with version 2 ...
        with pytest.raises(ConfigError, match="under keyed transform version 2"):
            check_db_store_marker(s, old, s.count())  # ... and refuses version 1
        assert s.transform_job() is None
        for t in ("a", "b"):
            after = [s.search(t, new.apply(t, p[None])[0], 5) for p in probes]
            assert [[m.subject_id for m in r] for r in after] == [[m.subject_id for m in r] for r in before[t]]
            np.testing.assert_allclose(
                [[m.score for m in r] for r in after], [[m.score for m in r] for r in before[t]], atol=1e-4
            )
    # done: the store's marker now says version 2, so a rerun has nothing to do (and changes nothing)
    assert main(["rotate-transform", "--config", str(config), "--new-version", "2", "-q"]) == 2
    assert "nothing to do" in capsys.readouterr().err
