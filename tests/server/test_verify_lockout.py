"""The per-subject budget of failed Verify attempts on a real sidecar: the status code, the other RPCs, metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sidecar_harness import make_config, random_embedding

from advface.client import AdvFaceRpcError


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_locked_subject_answers_resource_exhausted(tmp_path: Path, start_server) -> None:  # noqa: ANN001
    config = make_config(tmp_path, matching={"verify_max_failures": 2, "verify_window_s": 600.0})
    server = start_server(config)
    url = server.sidecar.metrics_server.url
    with server.client() as c:
        c.enroll("victim", embedding=random_embedding(1))
        c.enroll("bystander", embedding=random_embedding(2))
        for seed in (10, 11):
            assert not c.verify("victim", random_embedding(seed)).match
        with pytest.raises(AdvFaceRpcError) as locked:
            c.verify("victim", random_embedding(1))  # the genuine probe too, until the window ends
        assert locked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many failed Verify attempts" in str(locked.value.details())
        assert c.verify("bystander", random_embedding(2)).match  # other subjects answer as before
        assert c.identify(random_embedding(1), top_k=1)[0].subject_id == "victim"  # 1:N is not per subject
    samples = _samples(url)
    assert value(samples, "advface_verify_lockouts_total") == 1
    assert value(samples, "advface_verify_refused_locked_total") == 1
    assert value(samples, "advface_verify_tracked_subjects") == 1
    assert value(samples, "advface_rpc_requests_total", method="Verify", code="RESOURCE_EXHAUSTED") == 1
