"""advface.service.TemplateService on arrays, without gRPC: the pipeline, its validation, deadlines and errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from advface.config import Config, load_config
from advface.crypto import generate_key, write_key_file
from advface.errors import (
    ConfigError,
    DeadlineExceededError,
    NotFoundError,
    PreconditionError,
    ValidationError,
)
from advface.service import EnrolItem, TemplateService
from advface.testing.synthetic import dlib_like_people

DIM = 128


def _config(folder: Path, **sections: dict) -> Config:
    base: dict = {
        "server": {"max_batch": 5, "workers": 2},
        "encoder": {"name": "dlib-torch"},
        "protection": {"steps": 2},
        "store": {"data_dir": str(folder / "data"), "use_gpu": False},
        "matching": {"top_k_max": 10},
        "keys": {"auto": False},  # plain AdvFace templates (the key folder's defaults: test_key_folder.py)
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "advface.yaml").write_text(yaml.safe_dump(base))
    return load_config(folder / "advface.yaml", env={})


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemplateService]:
    svc = TemplateService(_config(tmp_path_factory.mktemp("svc")))
    yield svc
    svc.close()


def test_enrol_verify_identify_delete_on_arrays(service: TemplateService) -> None:
    enrolled, probes = dlib_like_people(4)
    for i, z in enumerate(enrolled):
        ids = run(service.enroll("t", f"p{i}", z, {"badge": str(i)}))
        assert len(ids) == 1 and len(ids[0]) == 32
    stored = np.asarray(service.store.subject_vectors("t", "p0"))
    assert not np.allclose(stored, enrolled[0])  # protected, never the raw embedding
    assert np.linalg.norm(stored - enrolled[0]) <= 0.1 * np.linalg.norm(enrolled[0]) + 1e-5  # within the budget
    genuine = run(service.verify("t", "p1", probes[1]))
    impostor = run(service.verify("t", "p1", probes[2]))
    assert genuine.match and not impostor.match and genuine.threshold == service.threshold.value
    best = run(service.identify("t", probes[3], top_k=2))
    assert best[0].subject_id == "p3" and best[0].match and len(best) == 2
    info = run(service.get_subject("t", "p2"))
    assert info.metadata == {"badge": "2"}
    subjects, token = run(service.list_subjects("t", page_size=3))
    assert [s.subject_id for s in subjects] == ["p0", "p1", "p2"] and token
    assert run(service.count("t")) == 4 and run(service.count("t", subjects=True)) == 4
    assert run(service.delete_subject("t", "p3")) == 1
    with pytest.raises(NotFoundError):
        run(service.verify("t", "p3", probes[3]))
    assert [c.subject_id for c in run(service.identify("t", probes[3], top_k=3))] != ["p3"]


def test_batch_enrolment_and_stateless_protection(service: TemplateService) -> None:
    enrolled, _ = dlib_like_people(3, seed=1)
    items = [EnrolItem(f"b{i}", z, {}) for i, z in enumerate(enrolled)]
    ids = run(service.enroll_batch("batch", items))
    assert [len(t) for t in ids] == [1, 1, 1]
    protected = run(service.protect(enrolled, tenant=None))
    # protection depends only on the row and the parameters: what Protect returns is what Enroll stored
    np.testing.assert_allclose(protected[1], np.asarray(service.store.subject_vectors("batch", "b1"))[0], atol=1e-6)
    assert run(service.enroll_batch("batch", [])) == []


def test_every_request_is_validated_before_anything_changes(service: TemplateService) -> None:
    z = dlib_like_people(1, seed=2)[0][0]
    before = run(service.count())
    bad_requests = [
        service.enroll("t", "", z, {}),  # empty id
        service.enroll("t", "x", z, {"k" * 65: "v"}),  # metadata key too long
        service.enroll("t", "x", z[:5], {}),  # wrong dimension
        service.enroll("t", "x", np.full(DIM, np.nan, np.float32), {}),
        service.enroll("t", "x", np.zeros(DIM, np.float32), {}),
        service.enroll("t", "x", b"", {}),  # empty photo
        service.enroll("t", "x", b"not an image", {}),
        service.enroll_batch("t", [EnrolItem("same", z, {}), EnrolItem("same", z, {})]),
        service.enroll_batch("t", [EnrolItem(f"s{i}", z, {}) for i in range(6)]),  # over max_batch 5
        service.protect(np.stack([z] * 6), None),
        service.identify("t", z, top_k=11),  # over top_k_max 10
        service.list_subjects("t", page_token="forged"),
    ]
    for request in bad_requests:
        with pytest.raises(ValidationError):
            run(request)
    assert run(service.count()) == before
    with pytest.raises(NotFoundError):
        run(service.verify("t", "nobody", z))
    with pytest.raises(NotFoundError):
        run(service.delete_template("t", "0" * 32))


def test_a_passed_deadline_stops_before_storing(service: TemplateService) -> None:
    z = dlib_like_people(1, seed=3)[0][0]
    with pytest.raises(DeadlineExceededError, match="before protecting"):
        run(service.enroll("late", "x", z, {}, deadline=time.monotonic() - 1))
    with pytest.raises(DeadlineExceededError, match="before deleting"):
        run(service.delete_subject("late", "x", deadline=time.monotonic() - 1))
    assert run(service.count("late")) == 0


def test_protection_off_and_photo_protection_off(tmp_path: Path) -> None:
    svc = TemplateService(_config(tmp_path, protection={"enabled": False}, image_protection={"enabled": False}))
    try:
        z = dlib_like_people(1, seed=4)[0][0]
        run(svc.enroll("t", "raw", z, {}))
        np.testing.assert_allclose(np.asarray(svc.store.subject_vectors("t", "raw"))[0], z)
        assert svc.protection_method == "none" and svc.threshold.source == "encoder-default"
        assert not svc.protection().enabled
        with pytest.raises(PreconditionError, match="protection is disabled"):
            run(svc.protect(z[None], None))
        with pytest.raises(PreconditionError, match="image protection is disabled"):
            run(svc.protect_image(b"\x89PNG"))
        assert not svc.image_protection.loaded
    finally:
        svc.close()


def test_keyed_transform_marker_is_checked_at_start(tmp_path: Path) -> None:
    secret = tmp_path / "t.key"
    write_key_file(secret, generate_key())
    keyed = {"enabled": True, "secret_file": str(secret)}
    svc = TemplateService(_config(tmp_path, keyed_transform=keyed))
    try:
        run(svc.enroll("acme", "a", dlib_like_people(1, seed=5)[0][0], {}))
        summary = svc.protection("acme")
        assert summary.keyed_transform and summary.transform_key_id == svc.transforms.key_id("acme")  # type: ignore[union-attr]
        assert svc.protection().transform_key_id == ""
    finally:
        svc.close()
    # the same store without the transform: refused at start (matching would silently fail otherwise)
    with pytest.raises(ConfigError, match="issued under keyed transform"):
        TemplateService(_config(tmp_path))


class _EncryptedStoreSpy:
    """An encrypted-matching store that keeps the arrays the service hands it (and copies of their values)."""

    matching = "encrypted"

    def __init__(self) -> None:
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []

    def _keep(self, array: np.ndarray) -> None:
        self.kept.append((array, np.array(array, copy=True)))

    def add(self, tenant: str, subject_id: str, vectors: np.ndarray, metadata: dict, replace: bool = False) -> list:
        self._keep(vectors)
        return ["t0"]

    def add_many(self, tenant: str, entries: list) -> list:
        for _subject, vectors, _metadata in entries:
            self._keep(vectors)
        return [["t"] for _ in entries]

    def get_subject(self, tenant: str, subject_id: str) -> None:
        return None

    def verify_encrypted(self, tenant: str, subject_id: str, probe: np.ndarray) -> tuple[bool, str, None]:
        self._keep(probe)
        return True, "t0", None

    def identify_encrypted(self, tenant: str, probe: np.ndarray, k: int) -> list:
        self._keep(probe)
        return []

    def close(self) -> None:
        pass


def test_encrypted_matching_zeroes_the_calls_plaintext_buffers(
    tmp_path: Path, lfw_sample: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import advface.service.templates as templates_module

    wiped: list[np.ndarray] = []
    real_wipe = templates_module.wipe

    def recording_wipe(*buffers: np.ndarray | None) -> None:
        wiped.extend(b for b in buffers if b is not None)
        real_wipe(*buffers)

    monkeypatch.setattr(templates_module, "wipe", recording_wipe)
    spy = _EncryptedStoreSpy()
    svc = TemplateService(_config(tmp_path), store=spy)  # type: ignore[arg-type]
    try:
        assert svc.encrypted_matching
        enrolled, probes = dlib_like_people(3)
        run(svc.enroll("t", "p0", enrolled[0], {}))
        run(svc.enroll_batch("t", [EnrolItem("p1", enrolled[1], {}), EnrolItem("p2", enrolled[2], {})]))
        run(svc.verify("t", "p0", probes[0]))
        run(svc.identify("t", probes[1], top_k=1))
        run(svc.verify("t", "p0", lfw_sample[0].read_bytes()))  # a photo: its chip and embedding
    finally:
        svc.close()
    assert len(spy.kept) == 6
    for array, values in spy.kept:  # what the store saw was real, and is gone once the call returned
        assert np.abs(values).sum() > 0
        assert not array.any()
    (chip,) = [a for a in wiped if a.dtype == np.uint8 and a.ndim == 3]  # the face chip cut from the photo
    assert chip.shape == (150, 150, 3) and not chip.any()
    assert all(not a.any() for a in wiped if a.flags.writeable)


def test_plain_matching_leaves_buffers_alone(service: TemplateService) -> None:
    assert not service.encrypted_matching
