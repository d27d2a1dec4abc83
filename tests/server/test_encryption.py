"""The sidecar with encryption at rest configured: templates are stored encrypted, matching works, and a wrong or
missing key stops the sidecar at start."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sidecar_harness import ServerThread, make_config, random_embedding

from advface.crypto import blob_key_id, generate_key, key_fingerprint, write_key_file
from advface.errors import ConfigError


def _files(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("templates.sqlite3*")) if p.is_file())


def test_sidecar_end_to_end_with_encryption(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    key, other = generate_key(), generate_key()
    write_key_file(tmp_path / "k.key", key)
    write_key_file(tmp_path / "other.key", other)
    data_dir = tmp_path / "srv" / "data"
    config = make_config(tmp_path / "srv", encryption={"key_file": str(tmp_path / "k.key")})
    server: ServerThread = start_server(config)
    raws = [random_embedding(s) for s in range(4)]
    with server.client() as client:
        ids = [client.enroll(f"p{i}", embedding=raw, tenant="enc")[0] for i, raw in enumerate(raws)]
        protected = client.protect(np.stack(raws))
        assert client.verify("p2", embedding=raws[2], tenant="enc").match
        assert client.identify(embedding=raws[3], top_k=1, tenant="enc")[0].subject_id == "p3"
        on_disk = _files(data_dir)
        for raw, prot in zip(raws, protected):  # neither the raw nor the protected vector is on disk
            assert raw.astype("<f4").tobytes()[:16] not in on_disk
            assert prot.astype("<f4").tobytes()[:16] not in on_disk
    server.stop()
    with sqlite3.connect(f"file:{data_dir / 'templates.sqlite3'}?mode=ro", uri=True) as conn:
        blobs = dict(conn.execute("SELECT template_id, vector FROM templates").fetchall())
    assert set(blobs) == set(ids) and {blob_key_id(b) for b in blobs.values()} == {key_fingerprint(key)}

    with pytest.raises(ConfigError, match="no encryption key is configured"):
        start_server(make_config(tmp_path / "srv"))
    with pytest.raises(ConfigError, match="wrong key"):
        start_server(make_config(tmp_path / "srv", encryption={"key_file": str(tmp_path / "other.key")}))
    # the new key with the old one as previous: starts, reads everything, writes under the new key
    server = start_server(
        make_config(
            tmp_path / "srv",
            encryption={"key_file": str(tmp_path / "other.key"), "previous_key_files": [str(tmp_path / "k.key")]},
        )
    )
    with server.client() as client:
        assert client.verify("p1", embedding=raws[1], tenant="enc").match
    server.stop()
