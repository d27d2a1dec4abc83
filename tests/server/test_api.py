"""The sidecar's RPCs against a real server: enrolment from embeddings and LFW photos, verification,
identification, deletion, protection of what is stored, bad input, tenants, health, reflection, Info, limits."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from sidecar_harness import DIM, ServerThread, make_config, random_embedding

from advface.api.v1 import SERVICE_NAME
from advface.api.v1 import advface_pb2 as pb
from advface.api.v1 import advface_pb2_grpc as pb_grpc
from advface.client import AdvFaceClient, AdvFaceRpcError
from advface.service.thresholds import CALIBRATED_THRESHOLDS


def _code(excinfo: pytest.ExceptionInfo) -> grpc.StatusCode:
    return excinfo.value.code()


def _count(client: AdvFaceClient, tenant: str = "default") -> int:
    return int(client.info(tenant)["counts"]["tenant_templates"])


def _db_bytes(server: ServerThread) -> bytes:
    """Every byte of the template database files (main file and WAL)."""
    data_dir = Path(server.config.store.data_dir)
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("templates.sqlite3*")) if p.is_file())


def _stored_vector(server: ServerThread, template_id: str) -> np.ndarray:
    path = Path(server.config.store.data_dir) / "templates.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        (blob,) = conn.execute("SELECT vector FROM templates WHERE template_id = ?", (template_id,)).fetchone()
    return np.frombuffer(blob, "<f4")


def _jpeg(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------- service basics


def test_health_serving(server: ServerThread, client: AdvFaceClient) -> None:
    assert client.health() == "SERVING"
    assert client.health(SERVICE_NAME) == "SERVING"


def test_reflection_lists_and_describes_the_service(server: ServerThread) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        methods = {m.name for m in pool.FindServiceByName(SERVICE_NAME).methods}
    assert methods == {
        "Protect",
        "Enroll",
        "EnrollBatch",
        "Verify",
        "Identify",
        "Delete",
        "GetSubject",
        "ListSubjects",
        "Info",
        "ProtectImage",
        "RotateKeyPair",
        "EraseNow",
        "MaintenanceStatus",
        "ResetAttempts",
    }


def test_info_fields(client: AdvFaceClient) -> None:
    info = client.info()
    assert info["encoder"] == {
        "name": "dlib-torch",
        "dim": DIM,
        "metric": "euclidean",
        "fingerprint": info["encoder"]["fingerprint"],
        "detector": "dlib",
        "face_policy": "largest",
    }
    assert info["encoder"]["fingerprint"].startswith("dlib-resnet-v1:")
    protection = info["protection"]
    assert protection["enabled"] and protection["method"] == "advface"
    assert protection["rel_l2"] == pytest.approx(0.1) and protection["steps"] == 2 and protection["seed"] == 0
    assert protection["shadow_model"] == "shadow_dlib.pt" and len(protection["shadow_sha256"]) == 64
    threshold = info["threshold"]
    assert threshold["value"] == pytest.approx(CALIBRATED_THRESHOLDS["dlib-torch"])
    assert threshold["source"] == "calibrated" and "LFW" in threshold["description"]
    assert info["versions"]["api"] == "advface.v1" and info["versions"]["advface"]
    assert info["versions"]["grpc"] == grpc.__version__
    assert info["limits"]["max_batch"] == 5 and info["limits"]["top_k_max"] == 10
    assert info["limits"]["max_receive_bytes"] == 4 * 1024 * 1024
    assert set(info["counts"]) == {"tenant_templates", "tenant_subjects", "total_templates", "total_subjects"}


# ----------------------------------------------------------------------------------------------- the main flow


@pytest.fixture(scope="module")
def lfw_people(lfw_sample: list[Path]) -> dict[str, list[tuple[Path, np.ndarray]]]:
    """Raw embeddings (computed here, outside the server) of both photos of the first five people."""
    from advface.encoders import create_encoder
    from advface.faces import FaceChipper, create_detector
    from advface.images import load_image

    encoder = create_encoder("dlib-torch")
    chipper = FaceChipper(create_detector("dlib"), encoder.chip, "largest")
    people: dict[str, list[tuple[Path, np.ndarray]]] = {}
    for path in lfw_sample[:10]:
        chip = chipper.chips(load_image(path), str(path))[0][1]
        people.setdefault(path.parent.name, []).append((path, encoder.embed(chip)[0]))
    return people


def test_enroll_verify_identify_delete_with_lfw_photos(
    server: ServerThread, client: AdvFaceClient, lfw_people: dict
) -> None:
    tenant = "lfw"
    names = sorted(lfw_people)
    # the person whose two photos are closest, and the person farthest from them
    same = min(names, key=lambda n: np.linalg.norm(lfw_people[n][0][1] - lfw_people[n][1][1]))
    other = max(
        (n for n in names if n != same), key=lambda n: np.linalg.norm(lfw_people[n][1][1] - lfw_people[same][0][1])
    )
    assert np.linalg.norm(lfw_people[same][0][1] - lfw_people[same][1][1]) < 0.5  # a clear genuine pair
    assert np.linalg.norm(lfw_people[other][1][1] - lfw_people[same][0][1]) > 0.7  # a clear impostor

    for name in names:  # enrol the first photo of each person: image bytes, and one as a path
        ids = client.enroll(name, image=lfw_people[name][0][0], metadata={"source": "lfw"}, tenant=tenant)
        assert len(ids) == 1
    assert _count(client, tenant) == len(names)

    genuine = client.verify(same, image=lfw_people[same][1][0].read_bytes(), tenant=tenant)
    assert genuine.match and genuine.score >= genuine.threshold == pytest.approx(CALIBRATED_THRESHOLDS["dlib-torch"])
    assert genuine.template_id == client.get_subject(same, tenant=tenant).template_ids[0]
    impostor = client.verify(same, image=lfw_people[other][1][0], tenant=tenant)
    assert not impostor.match and impostor.score < genuine.score

    top = client.identify(image=lfw_people[same][1][0], top_k=3, tenant=tenant)
    assert len(top) == 3 and top[0].subject_id == same and top[0].match
    assert [m.score for m in top] == sorted((m.score for m in top), reverse=True)
    assert len({m.subject_id for m in top}) == 3
    # a raw probe embedding gives the same answer as its photo
    assert client.identify(embedding=lfw_people[same][1][1], top_k=1, tenant=tenant)[0].subject_id == same

    assert client.delete(subject_id=same, tenant=tenant) == 1
    for call in (
        lambda: client.verify(same, image=lfw_people[same][1][0], tenant=tenant),
        lambda: client.get_subject(same, tenant=tenant),
        lambda: client.delete(subject_id=same, tenant=tenant),
    ):
        with pytest.raises(AdvFaceRpcError) as err:
            call()
        assert _code(err) == grpc.StatusCode.NOT_FOUND
    assert same not in {m.subject_id for m in client.identify(embedding=lfw_people[same][1][1], top_k=5, tenant=tenant)}
    assert _count(client, tenant) == len(names) - 1


def test_stored_templates_are_protected_and_deletion_erases_them(server: ServerThread, client: AdvFaceClient) -> None:
    raw = random_embedding(1)
    (template_id,) = client.enroll("protected-subject", embedding=raw, tenant="privacy")
    stored = _stored_vector(server, template_id)
    assert raw.astype("<f4").tobytes() not in _db_bytes(server)  # the raw vector never reached the database
    distance = np.linalg.norm(stored - raw)
    assert 0 < distance <= 0.1 * np.linalg.norm(raw) * (1 + 1e-4)  # moved, within the rel-L2 budget
    # the stateless Protect gives exactly what Enroll stored (protection is deterministic per template)
    np.testing.assert_array_equal(client.protect(raw), stored)
    # a raw probe still matches its protected template
    assert client.verify("protected-subject", embedding=raw, tenant="privacy").match

    (other_id,) = client.enroll("protected-subject", embedding=random_embedding(2), tenant="privacy")
    assert client.get_subject("protected-subject", tenant="privacy").template_ids == [template_id, other_id]
    assert client.delete(template_id=template_id, tenant="privacy") == 1
    assert stored.astype("<f4").tobytes() not in _db_bytes(server)  # the deleted template is gone from the files
    assert client.get_subject("protected-subject", tenant="privacy").template_ids == [other_id]


def test_protect_batch(client: AdvFaceClient) -> None:
    raw = np.stack([random_embedding(s) for s in range(3)])
    protected = client.protect(raw)
    assert protected.shape == raw.shape and protected.dtype == np.float32
    rel = np.linalg.norm(protected - raw, axis=1) / np.linalg.norm(raw, axis=1)
    assert ((rel > 0) & (rel <= 0.1 + 1e-5)).all()
    np.testing.assert_array_equal(client.protect(raw[1]), protected[1])  # independent of the batch


def test_enroll_batch_list_and_replace(client: AdvFaceClient) -> None:
    tenant = "batch"
    items = [(f"s{i}", random_embedding(100 + i), {"i": str(i)}) for i in range(5)]
    ids = client.enroll_batch(items, tenant=tenant)
    assert [len(t) for t in ids] == [1] * 5
    subjects, token = client.list_subjects(tenant, page_size=2)
    assert [s.subject_id for s in subjects] == ["s0", "s1"] and token
    assert [s.subject_id for s in client.iter_subjects(tenant, page_size=2)] == [f"s{i}" for i in range(5)]
    subject = client.get_subject("s3", tenant=tenant)
    assert subject.metadata == {"i": "3"} and subject.template_ids == ids[3] and subject.created_at is not None
    # appending merges metadata, replacing drops the old templates
    client.enroll("s3", embedding=random_embedding(7), metadata={"extra": "x"}, tenant=tenant)
    assert client.get_subject("s3", tenant=tenant).metadata == {"i": "3", "extra": "x"}
    new = client.enroll("s3", embedding=random_embedding(8), tenant=tenant, replace=True)
    assert client.get_subject("s3", tenant=tenant).template_ids == new
    assert _count(client, tenant) == 5


# ----------------------------------------------------------------------------------------------- bad input


def _no_face_jpeg() -> bytes:
    y = np.linspace(0, 255, 160, dtype=np.float32)
    return _jpeg(np.repeat(np.repeat(y[:, None, None], 160, axis=1), 3, axis=2).astype(np.uint8))


GOOD = random_embedding(42)
NAN = GOOD.copy()
NAN[3] = np.nan
INF = GOOD.copy()
INF[5] = np.inf

BAD_CALLS = {
    "enroll NaN": lambda c: c.enroll("x", embedding=NAN),
    "enroll Inf": lambda c: c.enroll("x", embedding=INF),
    "enroll zero vector": lambda c: c.enroll("x", embedding=np.zeros(DIM)),
    "enroll wrong dimension": lambda c: c.enroll("x", embedding=GOOD[:127]),
    "enroll huge vector": lambda c: c.enroll("x", embedding=GOOD * 1e30),
    "enroll empty id": lambda c: c.enroll("", embedding=GOOD),
    "enroll 129-char id": lambda c: c.enroll("x" * 129, embedding=GOOD),
    "enroll control char id": lambda c: c.enroll("a\nb", embedding=GOOD),
    "enroll long tenant": lambda c: c.enroll("x", embedding=GOOD, tenant="t" * 129),
    "enroll too much metadata": lambda c: c.enroll("x", embedding=GOOD, metadata={f"k{i}": "v" for i in range(33)}),
    "enroll garbage image": lambda c: c.enroll("x", image=b"\x89PNG not really an image"),
    "enroll truncated jpeg": lambda c: c.enroll("x", image=_jpeg(np.full((64, 64, 3), 128, np.uint8))[:200]),
    "enroll image without face": lambda c: c.enroll("x", image=_no_face_jpeg()),
    "batch over max_batch": lambda c: c.enroll_batch([(f"b{i}", GOOD) for i in range(6)]),
    "batch with one bad item": lambda c: c.enroll_batch([("b0", GOOD), ("b1", NAN), ("b2", GOOD)]),
    "batch with a repeated id": lambda c: c.enroll_batch([("b0", GOOD), ("b0", GOOD)]),
    "batch with a faceless image": lambda c: c.enroll_batch([("b0", GOOD), ("b1", _no_face_jpeg())]),
    "protect over max_batch": lambda c: c.protect(np.stack([GOOD] * 6)),
    "protect NaN": lambda c: c.protect(NAN),
    "verify NaN probe": lambda c: c.verify("x", embedding=NAN),
    "identify wrong dimension": lambda c: c.identify(embedding=GOOD[:64]),
    "identify top_k over limit": lambda c: c.identify(embedding=GOOD, top_k=11),
    "identify garbage image": lambda c: c.identify(image=b"garbage"),
    "list bad page token": lambda c: c.list_subjects(page_token="not-a-token"),
    "delete empty subject id": lambda c: c.delete(subject_id=""),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_invalid_argument_and_stores_nothing(client: AdvFaceClient, case: str) -> None:
    client.enroll("bad-input-anchor", embedding=GOOD, tenant="default", replace=True)  # verify needs a subject
    before = client.info()["counts"]
    with pytest.raises(AdvFaceRpcError) as err:
        BAD_CALLS[case](client)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert err.value.details()
    assert client.info()["counts"] == before


def test_image_errors_say_why(client: AdvFaceClient) -> None:
    with pytest.raises(AdvFaceRpcError) as err:
        client.enroll("x", image=_no_face_jpeg())
    assert "no face" in err.value.details()
    with pytest.raises(AdvFaceRpcError) as err:
        client.enroll("x", image=b"garbage")
    assert "not a readable image" in err.value.details()


def test_face_without_input_is_invalid(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.AdvFaceStub(channel)
        for call, request in (
            (stub.Enroll, pb.EnrollRequest(subject_id="x")),
            (stub.Enroll, pb.EnrollRequest(subject_id="x", face=pb.Face(image=b""))),
            (stub.Delete, pb.DeleteRequest()),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_subjects_and_tenants(client: AdvFaceClient) -> None:
    client.enroll("alice", embedding=GOOD, tenant="tenant-a", replace=True)
    for call in (
        lambda: client.get_subject("nobody", tenant="tenant-a"),
        lambda: client.verify("nobody", embedding=GOOD, tenant="tenant-a"),
        lambda: client.delete(template_id="0" * 32, tenant="tenant-a"),
        lambda: client.get_subject("alice", tenant="never-used"),
    ):
        with pytest.raises(AdvFaceRpcError) as err:
            call()
        assert _code(err) == grpc.StatusCode.NOT_FOUND
    assert client.identify(embedding=GOOD, top_k=3, tenant="never-used") == []
    assert client.list_subjects("never-used") == ([], "")
    assert _count(client, "never-used") == 0


def test_tenant_isolation(client: AdvFaceClient) -> None:
    client.enroll("shared-name", embedding=random_embedding(5), metadata={"owner": "a"}, tenant="iso-a")
    client.enroll("shared-name", embedding=random_embedding(6), metadata={"owner": "b"}, tenant="iso-b")
    assert client.get_subject("shared-name", tenant="iso-a").metadata == {"owner": "a"}
    assert client.get_subject("shared-name", tenant="iso-b").metadata == {"owner": "b"}
    only_b = client.enroll("only-b", embedding=random_embedding(9), tenant="iso-b")
    hits = client.identify(embedding=random_embedding(9), top_k=5, tenant="iso-a")
    assert "only-b" not in {m.subject_id for m in hits}
    with pytest.raises(AdvFaceRpcError) as err:
        client.delete(template_id=only_b[0], tenant="iso-a")  # another tenant's template id
    assert _code(err) == grpc.StatusCode.NOT_FOUND
    assert client.delete(subject_id="shared-name", tenant="iso-a") == 1
    assert client.get_subject("shared-name", tenant="iso-b").metadata == {"owner": "b"}


def test_expired_deadline_stores_nothing(client: AdvFaceClient) -> None:
    before = _count(client, "deadline")
    with pytest.raises(AdvFaceRpcError) as err:
        client.enroll("late", embedding=GOOD, tenant="deadline", timeout=1e-4)
    assert _code(err) == grpc.StatusCode.DEADLINE_EXCEEDED
    import time

    time.sleep(0.5)  # had the server gone on after the deadline, the template would be there by now
    assert _count(client, "deadline") == before


# ----------------------------------------------------------------------------------------------- limits, restart


def test_request_over_max_receive_is_resource_exhausted(tmp_path: Path, start_server) -> None:
    srv = start_server(make_config(tmp_path, server={"max_receive_mb": 1}))
    with srv.client() as c:
        with pytest.raises(AdvFaceRpcError) as err:
            c.enroll("big", image=b"\xff" * (1024 * 1024 + 1))
        assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _count(c) == 0


def test_restart_keeps_enrolments(tmp_path: Path, start_server) -> None:
    config = make_config(tmp_path)
    first = start_server(config)
    with first.client() as c:
        ids = c.enroll("persistent", embedding=GOOD, metadata={"k": "v"})
        c.enroll_batch([("p1", random_embedding(11)), ("p2", random_embedding(12))])
    first.stop(grace=1.0)
    second = start_server(config)
    with second.client() as c:
        subject = c.get_subject("persistent")
        assert subject.template_ids == ids and subject.metadata == {"k": "v"}
        assert c.verify("persistent", embedding=GOOD).match
        assert c.identify(embedding=random_embedding(12), top_k=1)[0].subject_id == "p2"
        assert _count(c) == 3


def test_protection_disabled_stores_raw_and_refuses_protect(tmp_path: Path, start_server) -> None:
    srv = start_server(make_config(tmp_path, protection={"enabled": False}))
    with srv.client() as c:
        info = c.info()
        assert not info["protection"]["enabled"] and info["protection"]["method"] == "none"
        assert info["threshold"]["source"] == "encoder-default" and info["threshold"]["value"] == pytest.approx(-0.6)
        (template_id,) = c.enroll("plain", embedding=GOOD)
        np.testing.assert_array_equal(_stored_vector(srv, template_id), GOOD)
        with pytest.raises(AdvFaceRpcError) as err:
            c.protect(GOOD)
        assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION


def test_config_threshold_wins(tmp_path: Path, start_server) -> None:
    srv = start_server(make_config(tmp_path, matching={"threshold": -0.01}))
    with srv.client() as c:
        assert c.info()["threshold"]["source"] == "config"
        c.enroll("strict", embedding=GOOD)
        result = c.verify("strict", embedding=GOOD)  # protected template vs raw probe: distance > 0.01
        assert result.threshold == pytest.approx(-0.01) and not result.match


def test_concurrent_enrolments_are_protected_exactly_as_alone(server: ServerThread, client: AdvFaceClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    raws = [random_embedding(500 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: client.enroll(f"c{i}", embedding=raws[i], tenant="concurrent")[0], range(8)))
    # coalesced or not, each template is protected as if alone
    expected = np.concatenate([client.protect(np.stack(raws[:4])), client.protect(np.stack(raws[4:]))])
    for i, template_id in enumerate(ids):
        np.testing.assert_array_equal(_stored_vector(server, template_id), expected[i])
    assert _count(client, "concurrent") == 8
