"""``advface keyservice``: keygen folders, token handling, and a served process answering the client."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from advface.cli.main import main
from advface.encrypted.keys import load_sidecar_folder, read_token
from advface.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_help_documents_the_service(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["keyservice", "--help"])
    out = capsys.readouterr().out
    assert "secret key" in out and "keygen" in out and "serve" in out


def test_keygen_writes_two_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["keyservice", "keygen", "--sidecar-dir", str(tmp_path / "s"), "--keyservice-dir", str(tmp_path / "k")])
        == 0
    )
    assert not (tmp_path / "s" / "ckks-secret.seal").exists()
    assert (tmp_path / "k" / "ckks-secret.seal").exists()
    token = tmp_path / "s" / "keyservice.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert read_token(None, tmp_path / "s") == read_token(None, tmp_path / "k")
    assert load_sidecar_folder(tmp_path / "s").fingerprint in capsys.readouterr().out
    # again into the same folders: refused, nothing overwritten
    assert (
        main(["keyservice", "keygen", "--sidecar-dir", str(tmp_path / "s"), "--keyservice-dir", str(tmp_path / "k")])
        == 2
    )
    assert (
        main(["keyservice", "keygen", "--sidecar-dir", str(tmp_path / "x"), "--keyservice-dir", str(tmp_path / "x")])
        == 2
    )


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "token"
    file.write_text("a" * 20 + "\n")
    file.chmod(0o644)
    with pytest.raises(ConfigError, match="group or others"):
        read_token(file)
    file.chmod(0o600)
    assert read_token(file) == "a" * 20
    monkeypatch.delenv("ADVFACE_KEYSERVICE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="no key service token"):
        read_token(None, tmp_path / "nowhere")
    monkeypatch.setenv("ADVFACE_KEYSERVICE_TOKEN", "short")
    with pytest.raises(ConfigError, match="16 characters"):
        read_token(None)


def test_serve_process_answers_and_stops(tmp_path: Path) -> None:
    from advface.encrypted.client import KeyServiceClient

    assert (
        main(["keyservice", "keygen", "--sidecar-dir", str(tmp_path / "s"), "--keyservice-dir", str(tmp_path / "k")])
        == 0
    )
    audit = tmp_path / "audit.log"
    command = [sys.executable, "-m", "advface.cli.main", "keyservice", "serve", "--dir", str(tmp_path / "k")]
    command += ["--metric", "cosine", "--threshold", "0.5", "--port", "0", "--audit-log", str(audit)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("advface keyservice serving on 127.0.0.1:"), line or (proc.stderr and proc.stderr.read())
        address = line.split()[4]
        fingerprint = load_sidecar_folder(tmp_path / "s").fingerprint
        with KeyServiceClient(address, read_token(None, tmp_path / "s")) as client:
            assert client.handshake(fingerprint).metric == "cosine"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600


def test_serve_refuses_a_sidecar_folder(tmp_path: Path) -> None:
    assert (
        main(["keyservice", "keygen", "--sidecar-dir", str(tmp_path / "s"), "--keyservice-dir", str(tmp_path / "k")])
        == 0
    )
    code = main(["keyservice", "serve", "--dir", str(tmp_path / "s"), "--metric", "cosine", "--threshold", "0.5"])
    assert code == 2
    assert os.path.exists(tmp_path / "s" / "ckks-public.seal")


def test_keygen_and_serve_with_a_wrapped_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from advface.encrypted.keys import load_keyservice_folder

    wrap = os.urandom(32)
    monkeypatch.setenv("KS_WRAP", base64.b64encode(wrap).decode())
    args = ["keyservice", "keygen", "--sidecar-dir", str(tmp_path / "s"), "--keyservice-dir", str(tmp_path / "k")]
    assert main([*args, "--wrap-key-env", "KS_WRAP"]) == 0
    assert not (tmp_path / "k" / "ckks-secret.seal").exists()
    assert load_keyservice_folder(tmp_path / "k", wrap)
    # serve without the wrapping key: a configuration error before anything listens
    assert main(["keyservice", "serve", "--dir", str(tmp_path / "k"), "--metric", "cosine", "--threshold", "0.5"]) == 2


def _encrypted_store_section(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, object]:
    """The ``store`` section of an encrypted store on ``backend`` (PostgreSQL: a fresh database)."""
    section: dict[str, object] = {"data_dir": str(tmp_path / "data"), "use_gpu": False, "matching": "encrypted"}
    if backend == "postgresql":
        section |= {"backend": "postgresql", "dsn": request.getfixturevalue("postgres_dsn")}
    return section


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rotation_to_a_next_key_pair_over_grpc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str, request: pytest.FixtureRequest
) -> None:
    """keygen --next-of, a key service with --next-dir's key pair (built in-process here), rotate-store, then the
    store served under the new pair only."""
    import numpy as np
    import yaml

    from advface.config import load_config
    from advface.encrypted.keys import load_binding_key, load_keyservice_folder
    from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
    from advface.encrypted.store import EncryptedStore
    from advface.service.stores import open_store
    from server.keyservice import build_keyservice_server

    s1, k1, s2, k2 = (tmp_path / n for n in ("s1", "k1", "s2", "k2"))
    assert main(["keyservice", "keygen", "--sidecar-dir", str(s1), "--keyservice-dir", str(k1)]) == 0
    keygen = ["keyservice", "keygen", "--sidecar-dir", str(s2), "--keyservice-dir", str(k2)]
    assert main([*keygen, "--next-of", str(s1)]) == 0
    assert load_binding_key(s2) == load_binding_key(s1) and read_token(None, k2) == read_token(None, s1)
    other = tmp_path / "other"
    assert main(["keyservice", "keygen", "--sidecar-dir", str(other), "--keyservice-dir", str(tmp_path / "ko")]) == 0
    serve = ["keyservice", "serve", "--dir", str(k1), "--metric", "euclidean", "--threshold", "-0.3", "--port", "0"]
    capsys.readouterr()
    assert main([*serve, "--next-dir", str(other)]) == 2  # another binding key: refused before serving
    assert "another binding key" in capsys.readouterr().err

    policy = DecisionPolicy("euclidean", -0.3)
    token = read_token(None, k1)

    def config(keys_dir: Path, port: int) -> Path:
        store = _encrypted_store_section(backend, tmp_path, request)
        store |= {"encrypted_keys_dir": str(keys_dir), "keyservice_address": f"127.0.0.1:{port}"}
        path = tmp_path / f"{keys_dir.name}.yaml"
        path.write_text(yaml.safe_dump({"store": store, "keys": {"auto": False}}))
        return path

    people = np.random.default_rng(5).standard_normal((3, 8)) * 0.3
    rotating = KeyServiceCore(
        load_keyservice_folder(k1), load_binding_key(k1), policy, next_keys=load_sidecar_folder(s2)
    )
    server, port = build_keyservice_server(rotating, token)
    server.start()
    try:
        with open_store(load_config(config(s1, port)), 8, "euclidean") as store:
            store.add_many("t", [(f"p{i}", people[i][None], None) for i in range(3)])
        assert main(["keyservice", "rotate-store", "--config", str(config(s1, port)), "--new-keys-dir", str(s2)]) == 0
        assert "rotated 1 block(s)" in capsys.readouterr().out
    finally:
        server.stop(0)
    new_core = KeyServiceCore(load_keyservice_folder(k2), load_binding_key(k2), policy)
    server, port = build_keyservice_server(new_core, token)
    server.start()
    try:
        with open_store(load_config(config(s2, port)), 8, "euclidean") as store:
            assert isinstance(store, EncryptedStore)
            assert store.verify_encrypted("t", "p1", people[1])[0]
            assert not store.verify_encrypted("t", "p1", people[2])[0]
        with pytest.raises(ConfigError, match="wrong key pair"):
            open_store(load_config(config(s1, port)), 8, "euclidean")
    finally:
        server.stop(0)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_binding_rotation_and_erase_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str, request: pytest.FixtureRequest
) -> None:
    """rotate-binding start (with a running key service that picks the new key up), store, finish; erase."""
    import numpy as np
    import yaml

    from advface.config import load_config
    from advface.encrypted.keys import BINDING_NEXT_FILE, load_binding_key, load_binding_keyring, load_keyservice_folder
    from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
    from advface.encrypted.store import EncryptedPostgresStore, EncryptedSQLiteStore
    from advface.service.stores import open_store
    from server.keyservice import build_keyservice_server

    s, k = tmp_path / "s", tmp_path / "k"
    assert main(["keyservice", "keygen", "--sidecar-dir", str(s), "--keyservice-dir", str(k)]) == 0
    old = load_binding_key(s)
    core = KeyServiceCore(
        load_keyservice_folder(k),
        load_binding_keyring(k),
        DecisionPolicy("euclidean", -0.3),
        reload_binding=lambda: load_binding_keyring(k),
    )
    server, port = build_keyservice_server(core, read_token(None, k))
    server.start()
    store_section = _encrypted_store_section(backend, tmp_path, request)
    store_section |= {"encrypted_keys_dir": str(s), "keyservice_address": f"127.0.0.1:{port}"}
    config = tmp_path / "advface.yaml"
    config.write_text(yaml.safe_dump({"store": store_section, "keys": {"auto": False}}))
    people = np.random.default_rng(3).standard_normal((3, 8)) * 0.3
    try:
        with open_store(load_config(config), 8, "euclidean") as store:
            store.add_many("t", [(f"p{i}", people[i][None], None) for i in range(3)])
            store.delete_subject("t", "p2")
        capsys.readouterr()
        start = ["keyservice", "rotate-binding", "start", "--dir", str(k), "--grace-s", "3600", "--sidecar-dir", str(s)]
        assert main(start) == 0
        assert "accepted until" in capsys.readouterr().out and (s / BINDING_NEXT_FILE).exists()
        assert main(start) == 2  # a second rotation while the grace period runs: refused
        assert "grace period" in capsys.readouterr().err
        assert main(["keyservice", "rotate-binding", "store", "--config", str(config)]) == 0
        assert "re-tagged 1 block(s)" in capsys.readouterr().out
        assert load_binding_key(s) == load_binding_key(k) != old and not (s / BINDING_NEXT_FILE).exists()
        with open_store(load_config(config), 8, "euclidean") as store:  # the running key service took the new key
            assert isinstance(store, EncryptedPostgresStore if backend == "postgresql" else EncryptedSQLiteStore)
            assert store.verify_encrypted("t", "p1", people[1])[0]
            assert not store.verify_encrypted("t", "p1", people[0])[0]
        assert main(["keyservice", "erase", "--config", str(config)]) == 0
        assert "0 still pending" in capsys.readouterr().out
        assert main(["keyservice", "rotate-binding", "finish", "--dir", str(k)]) == 0
        assert load_binding_keyring(k).previous is None
    finally:
        server.stop(0)
