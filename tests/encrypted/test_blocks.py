from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from encrypted_helpers import decrypt_values

from advface.encrypted.blocks import block_name, load_gallery, save_gallery
from advface.encrypted.gallery import EncryptedGallery
from advface.encrypted.keys import generate_keys
from advface.errors import IntegrityError

DIM = 6
KEY = b"k" * 32


@pytest.fixture
def saved(tmp_path: Path, keys, rng) -> tuple[EncryptedGallery, Path, np.ndarray]:
    gallery = EncryptedGallery(keys.public, DIM)
    templates = rng.standard_normal((4100, DIM))
    gallery.add(templates)
    gallery.remove(gallery.live_slots()[:2])
    save_gallery(gallery, tmp_path, KEY)
    return gallery, tmp_path, templates


def test_round_trip(saved, keys, rng) -> None:
    gallery, folder, _ = saved
    again = load_gallery(keys.public, folder, DIM, "cosine", KEY)
    assert again.block_count == 2 and again.count() == gallery.count()
    assert (again.state(0) == gallery.state(0)).all()
    probe = rng.standard_normal(DIM)
    a = decrypt_values(keys, gallery.score(probe)[1].ciphertext)
    b = decrypt_values(keys, again.score(probe)[1].ciphertext)
    assert np.abs(a - b).max() < 1e-9


def test_flipped_byte_detected_and_named(saved, keys) -> None:
    _, folder, _ = saved
    path = folder / block_name(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"block-000001\.ckks: authentication failed"):
        load_gallery(keys.public, folder, DIM, "cosine", KEY)


def test_wrong_integrity_key(saved, keys) -> None:
    _, folder, _ = saved
    with pytest.raises(IntegrityError, match="gallery.json: authentication failed"):
        load_gallery(keys.public, folder, DIM, "cosine", b"x" * 32)


def test_missing_swapped_and_rolled_back_blocks(saved, keys, rng) -> None:
    gallery, folder, _ = saved
    old = (folder / block_name(0)).read_bytes()
    gallery.add(rng.standard_normal((1, DIM)))  # dead slots are not reused: these land in block 1
    gallery.add(rng.standard_normal((1, DIM)))
    save_gallery(gallery, folder, KEY, blocks=[1])
    # block 1 changed; put back its old bytes -> rollback detected
    (folder / block_name(0)).write_bytes((folder / block_name(1)).read_bytes())
    with pytest.raises(IntegrityError, match="swapped"):
        load_gallery(keys.public, folder, DIM, "cosine", KEY)
    (folder / block_name(0)).write_bytes(old)
    gallery2 = load_gallery(keys.public, folder, DIM, "cosine", KEY)
    assert gallery2.block_count == 2
    (folder / block_name(1)).unlink()
    with pytest.raises(IntegrityError, match="block 1 is missing"):
        load_gallery(keys.public, folder, DIM, "cosine", KEY)


def test_rollback_detected(tmp_path: Path, keys, rng) -> None:
    gallery = EncryptedGallery(keys.public, DIM)
    gallery.add(rng.standard_normal((3, DIM)))
    save_gallery(gallery, tmp_path, KEY)
    old = (tmp_path / block_name(0)).read_bytes()
    gallery.add(rng.standard_normal((1, DIM)))
    save_gallery(gallery, tmp_path, KEY, blocks=[0])
    (tmp_path / block_name(0)).write_bytes(old)
    with pytest.raises(IntegrityError, match="rolled back or replaced"):
        load_gallery(keys.public, tmp_path, DIM, "cosine", KEY)


def test_other_key_pair_or_shape_refused(saved) -> None:
    _, folder, _ = saved
    with pytest.raises(IntegrityError, match="key pair"):
        load_gallery(generate_keys().public, folder, DIM, "cosine", KEY)


def test_checksum_mode_without_key(tmp_path: Path, keys, rng) -> None:
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    gallery.add(rng.standard_normal((3, DIM)) * 0.1)
    save_gallery(gallery, tmp_path, None)
    assert load_gallery(keys.public, tmp_path, DIM, "euclidean", None).count() == 3
    with pytest.raises(IntegrityError):
        load_gallery(keys.public, tmp_path, DIM, "euclidean", KEY)
    with pytest.raises(IntegrityError, match="dim"):
        load_gallery(keys.public, tmp_path, DIM + 1, "euclidean", None)
