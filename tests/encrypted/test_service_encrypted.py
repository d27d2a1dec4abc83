"""``store.matching: encrypted`` end to end: TemplateService -> encrypted store (SQLite, or PostgreSQL shared by two
sidecars) -> key service over gRPC."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import yaml

from advface.cli.main import main
from advface.config import Config, load_config
from advface.encrypted.errors import KeyServiceUnavailableError
from advface.encrypted.keys import load_binding_key, load_keyservice_folder
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
from advface.encrypted.store import EncryptedPostgresStore
from advface.errors import ConfigError, NotFoundError
from advface.service import TemplateService
from advface.testing.synthetic import dlib_like_people
from server.keyservice import build_keyservice_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(folder: Path, keys_dir: Path, port: int, dsn: str | None = None) -> Config:
    data: dict = {
        "server": {"max_batch": 5, "workers": 2},
        "encoder": {"name": "dlib-torch"},
        "protection": {"steps": 2},
        "store": {
            "data_dir": str(folder / "data"),
            "use_gpu": False,
            "matching": "encrypted",
            "encrypted_keys_dir": str(keys_dir),
            "keyservice_address": f"127.0.0.1:{port}",
            "keyservice_timeout_s": 3.0,
        },
        "keys": {"auto": False},
    }
    if dsn is not None:
        data["store"] |= {"backend": "postgresql", "dsn": dsn}
    (folder / "advface.yaml").write_text(yaml.safe_dump(data))
    return load_config(folder / "advface.yaml", env={})


def _keygen(folder: Path) -> tuple[Path, Path]:
    sidecar, service = folder / "sidecar", folder / "keyservice"
    assert main(["keyservice", "keygen", "--sidecar-dir", str(sidecar), "--keyservice-dir", str(service)]) == 0
    return sidecar, service


def _start(service_dir: Path, threshold: float, port: int, token_dir: Path | None = None):  # noqa: ANN202
    core = KeyServiceCore(
        load_keyservice_folder(service_dir), load_binding_key(service_dir), DecisionPolicy("euclidean", threshold)
    )
    token = ((token_dir or service_dir) / "keyservice.token").read_text().strip()
    server, _ = build_keyservice_server(core, token, port=port)
    server.start()
    return server


def test_sidecar_matches_through_the_key_service(tmp_path: Path) -> None:
    sidecar_dir, service_dir = _keygen(tmp_path)
    port = _free_port()
    service = TemplateService(_config(tmp_path, sidecar_dir, port))  # key service not up yet: starts anyway
    try:
        enrolled, probes = dlib_like_people(4)
        for i, z in enumerate(enrolled):
            asyncio.run(service.enroll("t", f"p{i}", z, {"n": str(i)}))  # no key service needed
        with pytest.raises(KeyServiceUnavailableError):
            asyncio.run(service.verify("t", "p1", probes[1]))
        server = _start(service_dir, service.threshold.value, port)
        try:
            assert service.store.keyservice.wait_ready(10.0)  # type: ignore[attr-defined]
            genuine = asyncio.run(service.verify("t", "p1", probes[1]))
            impostor = asyncio.run(service.verify("t", "p1", probes[2]))
            assert genuine.match and len(genuine.template_id) == 32 and not impostor.match
            found = asyncio.run(service.identify("t", probes[3], top_k=2))
            assert found and found[0].subject_id == "p3" and found[0].match
            assert service.store.keyservice_top_k_max == 10  # type: ignore[attr-defined]  # learnt on first use
            assert len(asyncio.run(service.identify("t", probes[3], top_k=50))) <= 4  # clamped to the service's 10
            with pytest.raises(NotFoundError):
                asyncio.run(service.verify("t", "nobody", probes[0]))
        finally:
            server.stop(0).wait()
        # down again: UNAVAILABLE, nothing stored or lost; enrolment still works
        with pytest.raises(KeyServiceUnavailableError):
            asyncio.run(service.identify("t", probes[0], top_k=1))
        assert asyncio.run(service.count("t")) == 4
        asyncio.run(service.enroll("t", "p4", enrolled[0], {}))
        assert asyncio.run(service.count("t")) == 5
        with pytest.raises(Exception, match="cannot be read back"):
            service.store.subject_vectors("t", "p0")
    finally:
        service.close()


def test_two_sidecars_on_one_postgresql_database(tmp_path: Path, postgres_dsn: str) -> None:
    """store.backend: postgresql through open_encrypted_store: two sidecars share the encrypted tables (each sees
    the other's enrolments and deletions), nothing is written to the data folder, a restart finds everything."""
    sidecar_dir, service_dir = _keygen(tmp_path)
    port = _free_port()
    config = _config(tmp_path, sidecar_dir, port, dsn=postgres_dsn)
    one = TemplateService(config)
    server = _start(service_dir, one.threshold.value, port)
    try:
        assert isinstance(one.store, EncryptedPostgresStore)
        two = TemplateService(config)
        try:
            enrolled, probes = dlib_like_people(4)
            for i in range(3):
                asyncio.run((one if i < 2 else two).enroll("t", f"p{i}", enrolled[i], {"n": str(i)}))
            for service in (one, two):
                assert service.store.keyservice.wait_ready(10.0)  # type: ignore[attr-defined]
            assert asyncio.run(two.verify("t", "p0", probes[0])).match
            assert not asyncio.run(two.verify("t", "p0", probes[1])).match
            assert asyncio.run(one.identify("t", probes[2], top_k=1))[0].subject_id == "p2"
            asyncio.run(one.delete_subject("t", "p1"))
            with pytest.raises(NotFoundError):
                asyncio.run(two.verify("t", "p1", probes[1]))
            assert asyncio.run(two.count("t")) == 2
        finally:
            two.close()
        one.close()
        one = TemplateService(config)  # restarted
        assert one.store.keyservice.wait_ready(10.0)  # type: ignore[attr-defined]
        assert asyncio.run(one.verify("t", "p2", probes[2])).match and asyncio.run(one.count("t")) == 2
    finally:
        one.close()
        server.stop(0).wait()
    assert not list((tmp_path / "data").glob("templates-encrypted*"))


def test_sidecar_refuses_another_key_pair(tmp_path: Path) -> None:
    sidecar_dir, _ = _keygen(tmp_path / "a")
    _, other_service = _keygen(tmp_path / "b")
    port = _free_port()
    server = _start(other_service, -0.6, port, token_dir=sidecar_dir)  # the right token, another key pair
    try:
        with pytest.raises(ConfigError, match="wrong key pair"):
            TemplateService(_config(tmp_path, sidecar_dir, port))
    finally:
        server.stop(0).wait()


def test_incomplete_configuration_refused(tmp_path: Path) -> None:
    sidecar_dir, _ = _keygen(tmp_path)
    config = _config(tmp_path, sidecar_dir, 1)
    import dataclasses

    broken = dataclasses.replace(config, store=dataclasses.replace(config.store, keyservice_address=None))
    with pytest.raises(ConfigError, match="keyservice_address"):
        TemplateService(broken)


def test_keyservice_tls_options(tmp_path: Path) -> None:
    import dataclasses

    from advface.service.stores import _keyservice_tls

    store = _config(tmp_path, tmp_path / "keys", 1).store
    assert _keyservice_tls(store) == {}
    (tmp_path / "ca.pem").write_bytes(b"ca")
    (tmp_path / "c.pem").write_bytes(b"cert")
    (tmp_path / "c.key").write_bytes(b"key")
    with pytest.raises(ConfigError, match="go together"):
        _keyservice_tls(dataclasses.replace(store, keyservice_cert_file=str(tmp_path / "c.pem")))
    with pytest.raises(ConfigError, match="keyservice_ca_file too"):
        _keyservice_tls(
            dataclasses.replace(
                store, keyservice_cert_file=str(tmp_path / "c.pem"), keyservice_key_file=str(tmp_path / "c.key")
            )
        )
    full = dataclasses.replace(
        store,
        keyservice_ca_file=str(tmp_path / "ca.pem"),
        keyservice_cert_file=str(tmp_path / "c.pem"),
        keyservice_key_file=str(tmp_path / "c.key"),
    )
    assert _keyservice_tls(full) == {"root_certificates": b"ca", "client_cert": (b"key", b"cert")}


def test_key_service_of_another_pair_found_on_first_use(tmp_path: Path) -> None:
    """Down at start, then up with another key pair (and the right token): refused before any request is bound."""
    sidecar_dir, _ = _keygen(tmp_path / "a")
    _, other_service = _keygen(tmp_path / "b")
    port = _free_port()
    service = TemplateService(_config(tmp_path, sidecar_dir, port))
    try:
        enrolled, probes = dlib_like_people(1)
        asyncio.run(service.enroll("t", "p0", enrolled[0], {}))
        server = _start(other_service, -0.6, port, token_dir=sidecar_dir)
        try:
            assert service.store.keyservice.wait_ready(10.0)  # type: ignore[attr-defined]
            with pytest.raises(ConfigError, match="wrong key pair"):
                asyncio.run(service.verify("t", "p0", probes[0]))
        finally:
            server.stop(0).wait()
    finally:
        service.close()
