"""Prometheus metrics of a real sidecar: scrape /metrics over HTTP after RPCs (including refused ones)."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sidecar_harness import ACME_TOKEN, ADMIN_TOKEN, make_config, random_embedding

from advface.client import AdvFaceRpcError
from advface.config import load_config
from advface.errors import ConfigError
from server.metrics import LATENCY_BUCKETS


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, sorted labels) -> value`` of every sample at ``url``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_rpcs(tmp_path: Path, start_server) -> None:  # noqa: ANN001
    tokens = {ADMIN_TOKEN: {"tenants": "*", "role": "admin"}, ACME_TOKEN: {"tenants": ["acme"]}}
    server = start_server(make_config(tmp_path, auth={"enabled": True, "tokens": tokens}))
    sidecar = server.sidecar
    assert sidecar.metrics_server is not None and sidecar.metrics_server.port > 0
    url = sidecar.metrics_server.url
    before = scrape(url)
    assert value(before, "advface_store_templates") == 0
    assert value(before, "advface_rpc_in_flight", method="Enroll") == 0
    info = [k for k in before if k[0] == "advface_build_info"]
    assert len(info) == 1 and ("protection", "advface") in info[0][1] and ("encoder", "dlib-torch") in info[0][1]

    with server.client(token=ADMIN_TOKEN) as c:
        for i in range(3):
            c.enroll(f"person-{i}", embedding=random_embedding(i), tenant="acme")
        c.identify(random_embedding(0), top_k=2, tenant="acme")
        with pytest.raises(AdvFaceRpcError) as bad:
            c.enroll("person-x", embedding=[0.0] * 128, tenant="acme")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(AdvFaceRpcError) as missing:
            c.verify("nobody", random_embedding(9), tenant="acme")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with server.client(token="wrong-token-0123456789abcdef") as c, pytest.raises(AdvFaceRpcError) as denied:
        c.identify(random_embedding(0), tenant="acme")
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with server.client(token=ACME_TOKEN) as c, pytest.raises(AdvFaceRpcError) as forbidden:
        c.identify(random_embedding(0), tenant="other")
    assert forbidden.value.code() == grpc.StatusCode.PERMISSION_DENIED

    after = scrape(url)
    assert value(after, "advface_rpc_requests_total", method="Enroll", code="OK") == 3
    assert value(after, "advface_rpc_requests_total", method="Enroll", code="INVALID_ARGUMENT") == 1
    assert value(after, "advface_rpc_requests_total", method="Identify", code="OK") == 1
    assert value(after, "advface_rpc_requests_total", method="Verify", code="NOT_FOUND") == 1
    assert value(after, "advface_rpc_requests_total", method="Identify", code="UNAUTHENTICATED") == 1
    assert value(after, "advface_rpc_requests_total", method="Identify", code="PERMISSION_DENIED") == 1
    # latency histogram: every Enroll observed, bucket edges from 1 ms to 10 s
    assert value(after, "advface_rpc_duration_seconds_count", method="Enroll") == 4
    assert value(after, "advface_rpc_duration_seconds_bucket", method="Enroll", le="+Inf") == 4
    assert value(after, "advface_rpc_duration_seconds_sum", method="Enroll") > 0
    edges = sorted(
        float(dict(k[1])["le"])
        for k in after
        if k[0] == "advface_rpc_duration_seconds_bucket" and dict(k[1])["method"] == "Enroll"
    )
    assert edges[0] == LATENCY_BUCKETS[0] == 0.001 and edges[-2] == 10.0
    assert value(after, "advface_rpc_in_flight", method="Enroll") == 0
    # store and protection
    assert value(after, "advface_store_templates") == 3 and value(after, "advface_store_subjects") == 3
    assert value(after, "advface_protection_batch_rows_count") == sidecar.servicer.service.batcher.calls >= 1
    assert value(after, "advface_protection_batch_rows_sum") == sidecar.servicer.service.batcher.rows == 3
    assert value(after, "advface_protection_batch_duration_seconds_sum") > 0
    # no ids or biometric data in any label
    for _, labels in after:
        for _, label_value in labels:
            assert "person" not in label_value and "acme" not in label_value


def test_unknown_method_names_are_not_labels(tmp_path: Path, start_server) -> None:  # noqa: ANN001
    tokens = {ADMIN_TOKEN: {"tenants": "*", "role": "admin"}}
    server = start_server(make_config(tmp_path, auth={"enabled": True, "tokens": tokens}))
    channel = grpc.insecure_channel(server.address)
    call = channel.unary_unary("/advface.v1.AdvFace/NoSuchMethod-abc123")
    with pytest.raises(grpc.RpcError):
        call(b"", timeout=10)
    channel.close()
    samples = scrape(server.sidecar.metrics_server.url)
    assert value(samples, "advface_rpc_requests_total", method="other", code="UNAUTHENTICATED") == 1
    assert not any("abc123" in v for _, labels in samples for _, v in labels)


def test_metrics_disabled_and_port_in_use(tmp_path: Path, start_server) -> None:  # noqa: ANN001
    server = start_server(make_config(tmp_path / "a", metrics={"enabled": False}))
    assert server.sidecar.metrics is None and server.sidecar.metrics_server is None
    assert server.servicer.metrics is None
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=r"metrics: cannot listen on 127\.0\.0\.1:\d+"):
            start_server(make_config(tmp_path / "b", metrics={"port": port}))


def test_metrics_config_keys(tmp_path: Path) -> None:
    cfg = load_config(None, env={})
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (True, "127.0.0.1", 9464)
    cfg = load_config(
        None, env={"ADVFACE_METRICS_PORT": "0", "ADVFACE_METRICS_ENABLED": "false", "ADVFACE_METRICS_HOST": "::1"}
    )
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (False, "::1", 0)
    path = tmp_path / "c.yaml"
    for text, message in [
        ("metrics: {port: 70000}", r"metrics\.port: must be in \[0, 65535\]"),
        ("metrics: {enabled: maybe}", r"metrics\.enabled: expected true or false"),
        ("metrics: {path: /x}", r"metrics\.path: unknown key"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path, env={})
    with pytest.raises(ConfigError, match="ADVFACE_METRICS_PORT"):
        load_config(None, env={"ADVFACE_METRICS_PORT": "http"})
