"""``advface reencode --dest advface:DATA_DIR?tenant=T`` into an encrypted store (``store.matching: encrypted``):
CKKS blocks written chunk by chunk, resumable after a crash between the store's commit and the journal's, verified
by ids and by matching through the key service; the database holds no template, subject id or raw bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from reencode_helpers import DIM, make_templates, write_parquet

from advface.cli.main import main
from advface.config import load_config
from advface.errors import ConfigError
from advface.reencode.progress import Journal
from advface.reencode.sources import open_source

pytest.importorskip("tenseal")
from advface.encrypted.keys import load_binding_key, load_keyservice_folder  # noqa: E402
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore  # noqa: E402
from server.keyservice import build_keyservice_server  # noqa: E402

TENANT = "acme"


@pytest.fixture
def keyservice(tmp_path: Path) -> Any:
    """Key folders from ``advface keyservice keygen`` and a running key service; ``(sidecar folder, address,
    server)``."""
    sidecar_dir, service_dir = tmp_path / "sidecar", tmp_path / "keyservice"
    assert main(["keyservice", "keygen", "--sidecar-dir", str(sidecar_dir), "--keyservice-dir", str(service_dir)]) == 0
    core = KeyServiceCore(
        load_keyservice_folder(service_dir), load_binding_key(service_dir), DecisionPolicy("euclidean", -0.6)
    )
    server, port = build_keyservice_server(core, (service_dir / "keyservice.token").read_text().strip())
    server.start()
    yield sidecar_dir, f"127.0.0.1:{port}", server
    server.stop(0)


def _config(tmp_path: Path, shadow: Path, sidecar_dir: Path, address: str) -> Path:
    """A sidecar configuration with an encrypted SQLite store and a keyed transform (pure rotation)."""
    from advface.crypto import generate_key, write_key_file

    secret = tmp_path / "transform.key"
    write_key_file(secret, generate_key())
    cfg = {
        "store": {
            "backend": "sqlite",
            "data_dir": str(tmp_path / "store"),
            "use_gpu": False,
            "matching": "encrypted",
            "encrypted_keys_dir": str(sidecar_dir),
            "keyservice_address": address,
            "keyservice_timeout_s": 2.0,
        },
        "protection": {"shadow": str(shadow), "steps": 2, "rel_l2": 0.1, "seed": 0},
        "keys": {"auto": False},
        "keyed_transform": {"enabled": True, "secret_file": str(secret), "norm": None},
    }
    path = tmp_path / "advface.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _args(config: Path, source: str, dest: str, *extra: str) -> list[str]:
    return ["reencode", "--source", source, "--dest", dest, "--config", str(config), "--chunk-size", "8", "-q", *extra]


def _store(config: Path) -> Any:
    from advface.service import open_store

    return open_store(load_config(config), DIM, "euclidean")


def _probe(config: Path, raw: np.ndarray) -> np.ndarray:
    from advface.service import transforms_from_config

    transforms = transforms_from_config(load_config(config).keyed_transform, DIM, "dlib")
    assert transforms is not None
    return transforms.apply(TENANT, raw[None, :])[0]


def test_reencode_into_an_encrypted_store_resumes_and_verifies(
    tmp_path: Path,
    shadow_ckpt: Path,
    keyservice: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sidecar_dir, address, server = keyservice
    ids, vectors = make_templates(40)
    src = write_parquet(tmp_path / "raw.parquet", ids, vectors)
    config = _config(tmp_path, shadow_ckpt, sidecar_dir, address)
    dest = f"advface:{tmp_path / 'store'}?tenant={TENANT}"
    work = tmp_path / "work"

    # the worst moment: chunk 3 is in the store but not in the journal (like kill -9 between the two commits)
    original = Journal.commit_chunk
    calls = {"n": 0}

    class Crash(BaseException):
        pass

    def crashing(self: Journal, *a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash
        original(self, *a, **k)

    monkeypatch.setattr(Journal, "commit_chunk", crashing)
    with pytest.raises(Crash):
        main(_args(config, src, dest, "--work-dir", str(work)))
    monkeypatch.setattr(Journal, "commit_chunk", original)
    with _store(config) as store:
        assert store.count(TENANT) == 24  # three chunks of 8 stored, two of them journaled

    summary_path = tmp_path / "s.json"
    assert main(_args(config, src, dest, "--work-dir", str(work), "--summary", str(summary_path))) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["passed"] and summary["encrypted"] and summary["reencode"]["resumed_from"] == 16
    assert summary["destination_count"] == 40 and summary["missing"] == summary["extra"] == 0
    assert summary["matching"]["sample"] == 40 and summary["matching"]["match_fraction"] == 1.0
    assert not work.exists()

    with _store(config) as store:  # chunk 3 written twice: replaced, not duplicated
        assert store.matching == "encrypted" and store.sealed_names
        assert store.count(TENANT) == store.count(TENANT, subjects=True) == store.live_slot_count(TENANT) == 40
        for i in (0, 17, 39):
            assert store.verify_encrypted(TENANT, ids[i], _probe(config, vectors[i]))[0]
            assert not store.verify_encrypted(TENANT, ids[i], _probe(config, vectors[i - 1]))[0]
            assert store.identify_encrypted(TENANT, _probe(config, vectors[i]), 1)[0].subject_id == ids[i]
        capsys.readouterr()
        assert main(_args(config, src, dest, "--verify-only")) == 2  # one process at a time: a sidecar, or reencode
        assert "already open" in capsys.readouterr().err
    on_disk = b"".join(p.read_bytes() for p in sorted((tmp_path / "store").rglob("*")) if p.is_file())
    for row_id, raw in zip(ids, vectors):
        assert row_id.encode() not in on_disk and raw.astype("<f4").tobytes()[:16] not in on_disk

    # an encrypted store is no source: its templates cannot be read back
    with open_source(dest, store_config=config) as source:
        assert source.count() == 40
        with pytest.raises(ConfigError, match="encrypted store"):
            next(iter(source.chunks(8)))

    # verification with the key service down: ids still checked, matching noted as not checked
    server.stop(0).wait()
    assert main(_args(config, src, dest, "--verify-only", "--summary", str(summary_path))) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["passed"] and summary["matching"]["passed"] is None
    assert "key service is unavailable" in summary["matching"]["note"]
