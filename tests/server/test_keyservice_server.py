"""The key-service gRPC process (server/keyservice.py) through the sidecar's client (advface.encrypted.client)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from advface.config import TLSConfig
from advface.encrypted.errors import KeyServiceUnavailableError, RateLimitedError, RefusedError
from advface.encrypted.gallery import EncryptedGallery
from advface.encrypted.keys import generate_keys, new_binding_key
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
from advface.encrypted.ratelimit import RateLimiter
from advface.encrypted.requests import prepare_refresh, prepare_scores
from advface.errors import ConfigError

pytest.importorskip("tenseal")
from advface.encrypted.client import KeyServiceClient  # noqa: E402
from server.keyservice import build_keyservice_server  # noqa: E402

DIM = 8
TOKEN = "t" * 24


@pytest.fixture(scope="module")
def setup():  # noqa: ANN201
    keys = generate_keys()
    binding = new_binding_key()
    rng = np.random.default_rng(5)
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    templates = rng.standard_normal((40, DIM)) * 0.2
    refs = gallery.add(templates)
    core = KeyServiceCore(
        keys,
        binding,
        DecisionPolicy("euclidean", -0.3, top_k_max=3),
        limiter=RateLimiter({"refresh": (0.001, 1)}),
    )
    server, port = build_keyservice_server(core, TOKEN)
    server.start()
    yield keys, binding, gallery, templates, refs, f"127.0.0.1:{port}"
    server.stop(0)


def test_verify_identify_refresh_over_grpc(setup) -> None:
    keys, binding, gallery, templates, refs, address = setup
    with KeyServiceClient(address, TOKEN) as client:
        reply = client.handshake(keys.fingerprint)
        assert (reply.metric, reply.top_k_max, reply.slots) == ("euclidean", 3, 4096)
        probe = templates[3] + 0.01
        prepared = prepare_scores(gallery, binding, "verify", "t", probe, refs=refs[3:5])
        decision = client.verify(prepared.request)
        assert decision.match and decision.best is not None and prepared.ref(decision.best) == refs[3]
        assert decision.best.score is None
        no = client.verify(prepare_scores(gallery, binding, "verify", "t", probe, refs=refs[10:11]).request)
        assert not no.match and no.best is None
        found = client.identify(prepare_scores(gallery, binding, "identify", "t", probe, top_k=3).request)
        assert found and found[0].slot == refs[3].slot
        gallery.remove([refs[39]])
        job = gallery.refresh_job(0)
        assert gallery.finish_refresh(job, client.refresh(prepare_refresh(gallery, binding, "t", job))) == 1
        with pytest.raises(RateLimitedError):
            client.refresh(prepare_refresh(gallery, binding, "t", gallery.refresh_job(0)))


def test_refusals_and_wrong_token(setup) -> None:
    keys, binding, gallery, templates, refs, address = setup
    request = prepare_scores(gallery, binding, "verify", "t", templates[0], refs=refs[:1]).request
    with KeyServiceClient(address, TOKEN) as client:
        with pytest.raises(RefusedError, match="not bound"):
            client.verify(dataclasses.replace(request, mac="0" * 64))
        with pytest.raises(ConfigError, match="wrong key pair"):
            client.handshake(generate_keys().fingerprint)
    with KeyServiceClient(address, "x" * 24) as client:
        with pytest.raises(ConfigError, match="does not accept this token"):
            client.verify(request)


def test_unreachable_key_service_is_unavailable(setup) -> None:
    keys, binding, gallery, templates, refs, _ = setup
    request = prepare_scores(gallery, binding, "verify", "t", templates[0], refs=refs[:1]).request
    with KeyServiceClient("127.0.0.1:1", TOKEN, timeout_s=2.0) as client:
        with pytest.raises(KeyServiceUnavailableError, match="unavailable"):
            client.verify(request)


def test_short_token_refused() -> None:
    keys = generate_keys()
    core = KeyServiceCore(keys, new_binding_key(), DecisionPolicy("cosine", 0.5))
    with pytest.raises(ConfigError, match="16 characters"):
        build_keyservice_server(core, "short")
    with pytest.raises(ConfigError, match="empty"):
        KeyServiceClient("127.0.0.1:1", "")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and server / client certificates for 127.0.0.1 (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    d = tmp_path_factory.mktemp("ks-pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=keyservice test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


def test_mutual_tls(pki: Path) -> None:
    keys = generate_keys()
    core = KeyServiceCore(keys, new_binding_key(), DecisionPolicy("cosine", 0.5))
    tls = TLSConfig(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    server, port = build_keyservice_server(core, TOKEN, tls=tls)
    server.start()
    address = f"127.0.0.1:{port}"
    ca = (pki / "ca.pem").read_bytes()
    client_cert = ((pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes())
    try:
        with KeyServiceClient(address, TOKEN, root_certificates=ca, client_cert=client_cert) as client:
            assert client.handshake(keys.fingerprint).fingerprint == keys.fingerprint
        with KeyServiceClient(address, TOKEN, root_certificates=ca, timeout_s=2.0) as client:  # no client certificate
            with pytest.raises(KeyServiceUnavailableError):
                client.handshake(keys.fingerprint)
        with KeyServiceClient(address, TOKEN, timeout_s=2.0) as client:  # plaintext to a TLS server
            with pytest.raises(KeyServiceUnavailableError):
                client.handshake(keys.fingerprint)
    finally:
        server.stop(0)
