"""The sidecar on its defaults (the key folder on): a first start stores nothing readable without the key folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sidecar_harness import ServerThread, make_config, random_embedding

from advface.service.key_folder import KEY_NAMES


def test_first_start_on_the_defaults_stores_nothing_readable_without_the_key_folder(
    tmp_path: Path, start_server
) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys"
    config = make_config(tmp_path / "srv", protection={"seed": None}, keys={"auto": True, "dir": str(keys)})
    server: ServerThread = start_server(config)
    raws = [random_embedding(s) for s in range(3)]
    names = [f"Firstname Lastname-{i}" for i in range(3)]
    with server.client() as client:
        for name, raw in zip(names, raws):
            client.enroll(name, embedding=raw, tenant="door-7", metadata={"email": f"{name[-1]}.person@example.org"})
        assert client.verify(names[1], embedding=raws[1], tenant="door-7").match
        assert client.identify(embedding=raws[2], top_k=1, tenant="door-7")[0].subject_id == names[2]
        assert sorted(s.subject_id for s in client.iter_subjects("door-7")) == sorted(names)
        info = client.info("door-7")
        protected = client.protect(np.stack(raws), tenant="door-7")
    server.stop()
    assert sorted(p.name for p in keys.iterdir()) == sorted(KEY_NAMES)
    assert info["protection"]["keyed_transform"]
    on_disk = b"".join(p.read_bytes() for p in sorted((tmp_path / "srv" / "data").rglob("*")) if p.is_file())
    for raw, prot in zip(raws, protected):
        assert raw.astype("<f4").tobytes()[:16] not in on_disk and prot.astype("<f4").tobytes()[:16] not in on_disk
    for text in [*names, "person@example.org", "email"]:
        assert text.encode() not in on_disk
