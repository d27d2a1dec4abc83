from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import tenseal.sealapi as seal

from advface.encrypted._seal import to_bytes
from advface.encrypted.audit import AuditLog
from advface.encrypted.binding import RequestItem, bind
from advface.encrypted.errors import RateLimitedError, RefusedError
from advface.encrypted.gallery import EncryptedGallery, SlotRef
from advface.encrypted.keys import generate_keys
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
from advface.encrypted.ratelimit import RateLimiter
from advface.encrypted.requests import prepare_refresh, prepare_scores
from advface.errors import ConfigError

DIM = 16


@pytest.fixture
def world(keys, binding_key, rng):  # noqa: ANN001, ANN201
    """A cosine gallery of 30 subjects x 2 templates and a key service at threshold 0.6."""
    centres = rng.standard_normal((30, DIM))
    templates = np.repeat(centres, 2, axis=0) + 0.3 * rng.standard_normal((60, DIM))
    gallery = EncryptedGallery(keys.public, DIM)
    refs = gallery.add(templates)
    subjects = {i: refs[2 * i : 2 * i + 2] for i in range(30)}
    groups = {ref: i for i, pair in subjects.items() for ref in pair}
    stream = io.StringIO()
    core = KeyServiceCore(keys, binding_key, DecisionPolicy("cosine", 0.6, top_k_max=5), audit=AuditLog(stream))
    return gallery, core, templates, centres, subjects, groups, stream


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)) @ (b / np.linalg.norm(b))


def test_verify_matches_plaintext_decision(world, binding_key, rng) -> None:
    gallery, core, templates, centres, subjects, _, _ = world
    for subject in range(30):
        probe = centres[subject] + 0.3 * rng.standard_normal(DIM)
        for claimed in (subject, (subject + 1) % 30):
            prepared = prepare_scores(gallery, binding_key, "verify", "t", probe, refs=subjects[claimed])
            decision = core.verify(prepared.request)
            scores = _cos(templates[2 * claimed : 2 * claimed + 2], probe)
            assert decision.match == (scores.max() >= 0.6)
            if decision.match:
                assert decision.best is not None and decision.best.score is None  # decisions only
                assert prepared.ref(decision.best) == subjects[claimed][int(np.argmax(scores))]
            else:
                assert decision.best is None


def test_identify_top_k_subjects_above_threshold(world, binding_key, rng) -> None:
    gallery, core, templates, centres, subjects, groups, _ = world
    probe = centres[7] + 0.05 * rng.standard_normal(DIM)
    prepared = prepare_scores(gallery, binding_key, "identify", "t", probe, groups=groups, top_k=5)
    found = core.identify(prepared.request)
    per_subject = _cos(templates, probe).reshape(30, 2).max(axis=1)
    expected = [int(s) for s in np.argsort(-per_subject) if per_subject[s] >= 0.6][:5]
    assert [groups[prepared.ref(d)] for d in found] == expected
    assert expected[0] == 7


def test_euclidean_policy_and_released_scores(keys, binding_key, rng) -> None:
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    templates = rng.standard_normal((50, DIM)) * 0.2
    refs = gallery.add(templates)
    core = KeyServiceCore(keys, binding_key, DecisionPolicy("euclidean", -0.6, top_k_max=3, score_decimals=3))
    probe = templates[11] + 0.01
    found = core.identify(prepare_scores(gallery, binding_key, "identify", "t", probe, top_k=3).request)
    distances = np.linalg.norm(templates - probe, axis=1)
    order = [i for i in np.argsort(distances) if distances[i] <= 0.6][:3]
    assert [d.slot for d in found] == [refs[i].slot for i in order]
    assert found[0].score == pytest.approx(-distances[order[0]], abs=1e-3)


def test_refuses_what_is_not_a_bound_score(world, keys, binding_key, rng) -> None:
    gallery, core, *_ = world
    probe = rng.standard_normal(DIM)
    good = prepare_scores(gallery, binding_key, "verify", "t", probe, refs=[SlotRef(0, 0)]).request
    # a stored template column, bound by the key: wrong scale
    column = to_bytes(gallery._blocks[0].columns[0])
    with pytest.raises(RefusedError, match="level or scale"):
        core.verify(bind(binding_key, "verify", "t", keys.fingerprint, [RequestItem(column, (0,))]))
    # a shifted score (constant added): outside the range of scores
    evaluator, encoder = seal.Evaluator(keys.public.context), seal.CKKSEncoder(keys.public.context)
    cipher = gallery.score(probe)[0].ciphertext
    shift = seal.Plaintext()
    encoder.encode(5.0, keys.public.context.first_parms_id(), keys.public.params.score_scale, shift)
    evaluator.add_plain_inplace(cipher, shift)
    with pytest.raises(RefusedError, match="outside the range"):
        core.verify(bind(binding_key, "verify", "t", keys.fingerprint, [RequestItem(to_bytes(cipher), (0,))]))
    # not bound, for another key pair, replayed, wrong operation, garbage
    with pytest.raises(RefusedError, match="not bound"):
        core.verify(dataclasses.replace(good, mac="0" * 64))
    with pytest.raises(RefusedError, match="key pair"):
        core.verify(dataclasses.replace(good, fingerprint="0" * 32))
    with pytest.raises(RefusedError, match="not a identify request"):
        core.identify(good)
    core.verify(good)
    with pytest.raises(RefusedError, match="replayed"):
        core.verify(good)
    with pytest.raises(RefusedError, match="not a valid SEAL object"):
        core.verify(bind(binding_key, "verify", "t", keys.fingerprint, [RequestItem(b"garbage", (0,))]))
    for slots in [(), (0, 0), (5000,)]:
        with pytest.raises(RefusedError):
            core.verify(bind(binding_key, "verify", "t", keys.fingerprint, [RequestItem(column, slots)]))
    for top_k in (0, 6):
        with pytest.raises(RefusedError, match="top_k"):
            core.identify(prepare_scores(gallery, binding_key, "identify", "t", probe, top_k=top_k).request)


def test_linear_forgery_is_no_more_than_a_probe(world, keys, binding_key) -> None:
    """Documented limit: whoever holds the binding key can submit a linear combination of columns (here
    column 0 alone). It passes, and decides exactly what the probe e_0 decides through the normal path."""
    gallery, core, *_ = world
    encoder, evaluator = seal.CKKSEncoder(keys.public.context), seal.Evaluator(keys.public.context)
    one = seal.Plaintext()
    encoder.encode(1.0, keys.public.context.first_parms_id(), keys.public.params.probe_scale, one)
    forged = seal.Ciphertext(keys.public.context)
    evaluator.multiply_plain(gallery._blocks[0].columns[0], one, forged)
    slots = (0, 1)
    via_forgery = core.verify(
        bind(binding_key, "verify", "t", keys.fingerprint, [RequestItem(to_bytes(forged), slots)])
    )
    e0 = np.zeros(DIM)
    e0[0] = 1.0
    via_probe = core.verify(
        prepare_scores(gallery, binding_key, "verify", "t", e0, refs=[SlotRef(0, 0), SlotRef(0, 1)]).request
    )
    assert via_forgery.match == via_probe.match


def test_rate_limit_and_audit_without_ids(keys, binding_key, world, rng) -> None:
    gallery, _, _, _, subjects, _, _ = world
    stream = io.StringIO()
    now = [0.0]
    core = KeyServiceCore(
        keys,
        binding_key,
        DecisionPolicy("cosine", 0.6),
        limiter=RateLimiter({"verify": (1.0, 2)}, clock=lambda: now[0]),
        audit=AuditLog(stream),
    )
    for _ in range(2):
        core.verify(
            prepare_scores(
                gallery, binding_key, "verify", "tenant-x", rng.standard_normal(DIM), refs=subjects[3]
            ).request
        )
    with pytest.raises(RateLimitedError):
        core.verify(
            prepare_scores(
                gallery, binding_key, "verify", "tenant-x", rng.standard_normal(DIM), refs=subjects[3]
            ).request
        )
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["outcome"] for line in lines] == ["ok", "ok", "rate_limited"]
    allowed = {"time", "op", "tenant", "items", "slots", "released", "outcome", "reason", "request"}
    assert all(set(line) <= allowed for line in lines)
    assert lines[0]["slots"] == 2 and lines[0]["tenant"] == "tenant-x"


def test_refresh_through_the_key_service(world, keys, binding_key) -> None:
    gallery, core, templates, *_ = world
    gallery.remove([SlotRef(0, 4)])
    job = gallery.refresh_job(0)
    columns = core.refresh(prepare_refresh(gallery, binding_key, "t", job))
    assert gallery.finish_refresh(job, columns) == 1
    assert gallery.add(templates[:1]) == [SlotRef(0, 4)]
    # a refresh request cannot be turned into a decision
    with pytest.raises(RefusedError):
        core.verify(prepare_refresh(gallery, binding_key, "t", gallery.refresh_job(0)))


def test_configuration_checks(keys) -> None:
    with pytest.raises(ConfigError):
        DecisionPolicy("dot", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DecisionPolicy("cosine", float("nan"))
    with pytest.raises(ConfigError):
        DecisionPolicy("cosine", 0.5, top_k_max=0)
    with pytest.raises(ConfigError, match="binding key"):
        KeyServiceCore(keys, b"short", DecisionPolicy("cosine", 0.5))
    assert KeyServiceCore(generate_keys(), b"k" * 32, DecisionPolicy("cosine", 0.5)).fingerprint != keys.fingerprint


def test_locks_after_forged_requests(world, keys, binding_key, rng) -> None:
    gallery, _, _, _, subjects, _, _ = world
    core = KeyServiceCore(keys, binding_key, DecisionPolicy("cosine", 0.6), lock_after_refusals=2)
    column = to_bytes(gallery._blocks[0].columns[0])
    forged = [RequestItem(column, (0,))]
    with pytest.raises(RefusedError, match="not bound"):  # no MAC: anyone with the token; does not count
        core.verify(dataclasses.replace(bind(binding_key, "verify", "t", keys.fingerprint, forged), mac="0" * 64))
    assert core.forged_requests == 0
    for _ in range(2):
        with pytest.raises(RefusedError, match="level or scale"):
            core.verify(bind(binding_key, "verify", "t", keys.fingerprint, forged))
    assert core.locked
    with pytest.raises(RefusedError, match="locked"):
        core.verify(
            prepare_scores(gallery, binding_key, "verify", "t", rng.standard_normal(DIM), refs=subjects[0]).request
        )
    with pytest.raises(ConfigError):
        KeyServiceCore(keys, binding_key, DecisionPolicy("cosine", 0.6), lock_after_refusals=0)
