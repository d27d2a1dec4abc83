"""The budgets of failed attempts on a real sidecar (per subject for Verify, its hard cap, per token for Identify):
the status code, the other RPCs, re-enrolment, metrics."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sidecar_harness import ACME_TOKEN, ADMIN_TOKEN, make_config, random_embedding

from advface.client import AdvFaceRpcError

#: the key id the sidecar gives ACME_TOKEN (its logs' name for the token): the first 8 hex digits of its SHA-256
ACME_KEY_ID = hashlib.sha256(ACME_TOKEN.encode()).hexdigest()[:8]


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


def test_a_capped_subject_answers_resource_exhausted_until_re_enrolled(tmp_path: Path, start_server) -> None:  # noqa: ANN001
    config = make_config(
        tmp_path, matching={"verify_max_failures": 10, "verify_max_consecutive_failures": 3, "verify_window_s": 60.0}
    )
    server = start_server(config)
    url = server.sidecar.metrics_server.url
    with server.client() as c:
        c.enroll("victim", embedding=random_embedding(1))
        for seed in (10, 11, 12):
            assert not c.verify("victim", random_embedding(seed)).match
        for _ in range(2):
            with pytest.raises(AdvFaceRpcError) as capped:
                c.verify("victim", random_embedding(1))  # the genuine probe too
            assert capped.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "3 in a row since the last match" in str(capped.value.details())
        assert value(_samples(url), "advface_verify_capped_subjects") == 1
        c.enroll("victim", embedding=random_embedding(1), replace=True)  # the operator re-enrols the subject
        assert c.verify("victim", random_embedding(1)).match
        for seed in (13, 14, 15):  # capped again ...
            assert not c.verify("victim", random_embedding(seed)).match
        assert c.reset_attempts("victim")  # ... and cleared by the admin RPC (auth off: every caller is admin)
        assert c.verify("victim", random_embedding(1)).match
        assert not c.reset_attempts("bystander")  # nothing counted: nothing cleared
        with pytest.raises(AdvFaceRpcError) as nothing_named:
            c.reset_attempts()
        assert nothing_named.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    samples = _samples(url)
    assert value(samples, "advface_verify_capped_total") == 2
    assert value(samples, "advface_verify_capped_subjects") == 0
    assert value(samples, "advface_verify_refused_locked_total") == 2
    assert value(samples, "advface_rpc_requests_total", method="Verify", code="RESOURCE_EXHAUSTED") == 2


def test_failed_identify_calls_are_counted_per_token(tmp_path: Path, start_server) -> None:  # noqa: ANN001
    tokens = {ADMIN_TOKEN: {"tenants": "*", "role": "admin"}, ACME_TOKEN: {"tenants": ["acme"], "role": "client"}}
    config = make_config(
        tmp_path,
        auth={"enabled": True, "tokens": tokens},
        matching={"identify_max_failures": 2, "identify_window_s": 600.0},
    )
    server = start_server(config)
    url = server.sidecar.metrics_server.url
    with server.client(token=ADMIN_TOKEN) as admin, server.client(token=ACME_TOKEN) as acme:
        admin.enroll("victim", embedding=random_embedding(1), tenant="acme")
        for seed in (10, 11):  # strangers: no candidate accepted
            assert not any(m.match for m in acme.identify(random_embedding(seed), top_k=1, tenant="acme"))
        with pytest.raises(AdvFaceRpcError) as locked:
            acme.identify(random_embedding(1), top_k=1, tenant="acme")  # a probe that would match, too
        assert locked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many failed Identify calls for this caller" in str(locked.value.details())
        assert admin.identify(random_embedding(1), top_k=1, tenant="acme")[0].match  # another token: its own budget
        assert acme.verify("victim", random_embedding(1), tenant="acme").match  # Verify is counted per subject
        with pytest.raises(AdvFaceRpcError) as denied:  # a client token may not reset budgets
            acme.reset_attempts(caller=ACME_KEY_ID, tenant="acme")
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert admin.reset_attempts(caller=ACME_KEY_ID, tenant="acme")  # the operator clears acme's budget
        assert acme.identify(random_embedding(1), top_k=1, tenant="acme")[0].match
    samples = _samples(url)
    assert value(samples, "advface_identify_lockouts_total") == 1
    assert value(samples, "advface_identify_refused_locked_total") == 1
    assert value(samples, "advface_rpc_requests_total", method="Identify", code="RESOURCE_EXHAUSTED") == 1
