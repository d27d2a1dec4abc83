from __future__ import annotations

import numpy as np
import pytest
from encrypted_helpers import decrypt_values

from advface.encrypted.gallery import DEAD, FREE, LIVE, EncryptedGallery, SlotRef
from advface.errors import ConfigError, EmbeddingError, IntegrityError, NotFoundError, PreconditionError

DIM = 12
TOL = 2e-5  # measured error is ~1e-6; the bound leaves room


def _values(keys, gallery: EncryptedGallery, probe: np.ndarray, refs=None, threads: int = 1) -> dict[SlotRef, float]:
    out = {}
    for s in gallery.score(probe, refs, threads=threads):
        v = decrypt_values(keys, s.ciphertext)
        out.update({SlotRef(s.block, slot): float(v[slot]) for slot in s.slots})
    return out


def _plain(metric: str, templates: np.ndarray, probe: np.ndarray) -> np.ndarray:
    if metric == "cosine":
        t = templates / np.linalg.norm(templates, axis=1, keepdims=True)
        return t @ (probe / np.linalg.norm(probe))
    return -((templates - probe) ** 2).sum(axis=1)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_scores_equal_plaintext_across_blocks(keys, rng, metric: str) -> None:
    gallery = EncryptedGallery(keys.public, DIM, metric)
    templates = rng.standard_normal((5000, DIM)) * 0.25
    refs = gallery.add(templates[:3000]) + gallery.add(templates[3000:])
    assert gallery.block_count == 2 and gallery.count() == 5000
    assert refs[0] == SlotRef(0, 0) and refs[4096] == SlotRef(1, 0)
    probe = rng.standard_normal(DIM) * 0.25
    got = _values(keys, gallery, probe)
    expected = _plain(metric, templates, probe)
    assert np.abs(np.array([got[r] for r in refs]) - expected).max() < TOL
    # two threads give the same ciphertext results
    again = _values(keys, gallery, probe, threads=2)
    assert np.abs(np.array([again[r] for r in refs]) - expected).max() < TOL


def test_score_selected_refs_only(keys, rng) -> None:
    gallery = EncryptedGallery(keys.public, DIM)
    refs = gallery.add(rng.standard_normal((10, DIM)))
    scored = gallery.score(rng.standard_normal(DIM), [refs[7], refs[2]])
    assert [(s.block, s.slots) for s in scored] == [(0, (2, 7))]
    with pytest.raises(NotFoundError):
        gallery.score(rng.standard_normal(DIM), [SlotRef(0, 99)])


def test_remove_then_refresh_erases_and_frees(keys, rng) -> None:
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    templates = rng.standard_normal((20, DIM)) * 0.2
    refs = gallery.add(templates)
    gallery.remove([refs[3], refs[5]])
    assert gallery.state(0)[3] == DEAD and gallery.dirty_blocks() == [0]
    probe = rng.standard_normal(DIM) * 0.2
    assert SlotRef(0, 3) not in _values(keys, gallery, probe)
    with pytest.raises(NotFoundError):
        gallery.remove([refs[3]])
    job = gallery.refresh_job(0)
    assert set(job.zero_slots) >= {3, 5} and 0 not in job.zero_slots
    # what the key service does: decrypt (masked values), zero, re-encrypt
    columns = _key_service_refresh(keys, job)
    assert gallery.finish_refresh(job, columns) == 2
    state = gallery.state(0)
    assert state[3] == FREE and state[5] == FREE and state[0] == LIVE
    assert gallery.dirty_blocks() == []
    # the erased slot now encrypts zero in every column: its Euclidean value is -|p|^2
    raw = decrypt_values(keys, gallery.score(probe)[0].ciphertext)
    coef, constant = gallery.probe_coefficients(probe)
    assert abs(raw[3] - constant) < TOL
    live = [r for i, r in enumerate(refs) if i not in (3, 5)]
    got = _values(keys, gallery, probe)
    expected = _plain("euclidean", np.delete(templates, [3, 5], axis=0), probe)
    assert np.abs(np.array([got[r] for r in live]) - expected).max() < TOL
    # freed slots are reused first
    assert gallery.add(templates[:1]) == [SlotRef(0, 3)]


def _key_service_refresh(keys, job) -> list[bytes]:  # noqa: ANN001
    import tenseal.sealapi as seal

    from advface.encrypted._seal import from_bytes, to_bytes

    context = keys.public.context
    encoder = seal.CKKSEncoder(context)
    out = []
    for data in job.masked:
        values = decrypt_values(keys, from_bytes(seal.Ciphertext, context, data, "test"))
        assert np.abs(values).max() > 1e3  # the key service sees masked values only
        values[list(job.zero_slots)] = 0.0
        plain = seal.Plaintext()
        encoder.encode(values.tolist(), context.first_parms_id(), keys.public.params.template_scale, plain)
        cipher = seal.Ciphertext(context)
        keys.public.encryptor().encrypt(plain, cipher)
        out.append(to_bytes(cipher))
    return out


def test_refresh_of_changed_block_refused(keys, rng) -> None:
    gallery = EncryptedGallery(keys.public, DIM)
    refs = gallery.add(rng.standard_normal((4, DIM)))
    gallery.remove([refs[0]])
    job = gallery.refresh_job(0)
    columns = _key_service_refresh(keys, job)
    gallery.add(rng.standard_normal((1, DIM)))  # lands in slot 4 while the refresh runs
    with pytest.raises(PreconditionError, match="changed during its refresh"):
        gallery.finish_refresh(job, columns)
    assert gallery.state(0)[0] == DEAD
    with pytest.raises(IntegrityError, match="columns returned"):
        gallery.finish_refresh(job, columns[:-1])


def test_refresh_rejects_score_ciphertexts(keys, rng) -> None:
    gallery = EncryptedGallery(keys.public, DIM)
    gallery.add(rng.standard_normal((4, DIM)))
    job = gallery.refresh_job(0)
    score = gallery.score(rng.standard_normal(DIM))[0].to_bytes()
    with pytest.raises(IntegrityError, match="not a template ciphertext"):
        gallery.finish_refresh(job, [score] * gallery.columns)


def test_bad_inputs(keys, rng) -> None:
    with pytest.raises(ConfigError):
        EncryptedGallery(keys.public, DIM, "manhattan")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        EncryptedGallery(keys.public, 0)
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    with pytest.raises(EmbeddingError):
        gallery.add(np.zeros((1, DIM)))
    with pytest.raises(EmbeddingError):
        gallery.add(np.full((1, DIM), np.nan))
    with pytest.raises(EmbeddingError, match="max_norm"):
        gallery.add(np.full((1, DIM), 10.0))
    with pytest.raises(EmbeddingError):
        gallery.score(rng.standard_normal(DIM + 1))
    assert gallery.count() == 0 and gallery.block_count == 0


def test_add_is_all_or_nothing(keys, rng) -> None:
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    gallery.add(rng.standard_normal((3, DIM)) * 0.1)
    batch = rng.standard_normal((3, DIM)) * 0.1
    batch[2] *= 1000
    with pytest.raises(EmbeddingError):
        gallery.add(batch)
    assert gallery.count() == 3
