"""Token auth (UNAUTHENTICATED / PERMISSION_DENIED, health and reflection exempt) and TLS / mutual TLS."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from sidecar_harness import ServerThread, make_config, random_embedding

from advface.client import AdvFaceClient, AdvFaceRpcError, TlsOptions

ADMIN = "admin-token-0123456789abcdef"
ACME = "acme-token-0123456789abcdef"
TOKENS = {ADMIN: {"tenants": "*", "role": "admin"}, ACME: {"tenants": ["acme"], "role": "client"}}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> ServerThread:
    srv = ServerThread(make_config(tmp_path_factory.mktemp("auth"), auth={"enabled": True, "tokens": TOKENS}))
    yield srv
    srv.stop()


def _code_of(call) -> grpc.StatusCode:
    with pytest.raises(AdvFaceRpcError) as err:
        call()
    return err.value.code()


def test_missing_or_unknown_token_is_unauthenticated(auth_server: ServerThread) -> None:
    v = random_embedding(0)
    for token in (None, "wrong-token-0123456789abcdef"):
        with auth_server.client(token=token) as c:
            assert _code_of(lambda: c.enroll("x", embedding=v, tenant="acme")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code_of(lambda: c.info("acme")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code_of(lambda: c.protect(v)) == grpc.StatusCode.UNAUTHENTICATED
            assert c.health() == "SERVING"  # health is exempt
    with grpc.insecure_channel(auth_server.address) as channel:  # a malformed header
        from advface.api.v1 import advface_pb2 as pb
        from advface.api.v1 import advface_pb2_grpc as pb_grpc

        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.AdvFaceStub(channel).Info(
                pb.InfoRequest(tenant="acme"), metadata=(("authorization", ACME),), timeout=30
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tenants_of_a_token(auth_server: ServerThread) -> None:
    v = random_embedding(1)
    with auth_server.client(token=ACME) as acme, auth_server.client(token=ADMIN) as admin:
        assert acme.enroll("alice", embedding=v, tenant="acme")
        assert acme.verify("alice", embedding=v, tenant="acme").match
        for call in (
            lambda: acme.enroll("bob", embedding=v, tenant="other"),
            lambda: acme.identify(embedding=v, tenant="other"),
            lambda: acme.get_subject("alice", tenant="other"),
            lambda: acme.list_subjects("other"),
            lambda: acme.delete(subject_id="alice", tenant="other"),
            lambda: acme.info("other"),
            lambda: acme.enroll("bob", embedding=v),  # the default tenant is a tenant like any other
        ):
            assert _code_of(call) == grpc.StatusCode.PERMISSION_DENIED
        # admin: every tenant, and server-wide counts in Info (clients see their tenant's only)
        admin.enroll("carol", embedding=v, tenant="other")
        assert admin.get_subject("alice", tenant="acme").subject_id == "alice"
        assert admin.info("acme")["counts"]["total_templates"] == 2
        counts = acme.info("acme")["counts"]
        assert counts["tenant_templates"] == 1 and counts["total_templates"] == 0
        assert acme.protect(v).shape == v.shape  # stateless: any valid token
        assert acme.info()["counts"]["tenant_templates"] == 0  # Info without a tenant works for any token


def test_auth_denials_store_nothing(auth_server: ServerThread) -> None:
    with auth_server.client(token=ADMIN) as admin:
        before = admin.info("victim")["counts"]
        with auth_server.client(token=ACME) as acme:
            _code_of(lambda: acme.enroll("x", embedding=random_embedding(2), tenant="victim"))
        with auth_server.client() as anonymous:
            _code_of(lambda: anonymous.enroll("x", embedding=random_embedding(2), tenant="victim"))
        assert admin.info("victim")["counts"] == before


# ----------------------------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=advface test CA",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    return d


def test_tls_and_mutual_tls(tmp_path: Path, pki: Path, start_server) -> None:
    tls = {"cert_file": str(pki / "server.pem"), "key_file": str(pki / "server.key")}
    srv = start_server(make_config(tmp_path / "tls", tls=tls))
    with srv.client(tls=TlsOptions(ca_file=pki / "ca.pem")) as c:
        assert c.enroll("alice", embedding=random_embedding(3))
        assert c.health() == "SERVING"
    with srv.client() as plain:  # plain text against a TLS port fails
        assert _code_of(lambda: plain.info()) == grpc.StatusCode.UNAVAILABLE

    srv = start_server(make_config(tmp_path / "mtls", tls={**tls, "client_ca_file": str(pki / "ca.pem")}))
    with srv.client(
        tls={"ca_file": pki / "ca.pem", "cert_file": pki / "client.pem", "key_file": pki / "client.key"}, timeout=20
    ) as c:
        assert c.info()["encoder"]["dim"] == 128
    with AdvFaceClient(srv.address, tls=TlsOptions(ca_file=pki / "ca.pem"), timeout=20) as no_cert:
        assert _code_of(lambda: no_cert.info()) == grpc.StatusCode.UNAVAILABLE
