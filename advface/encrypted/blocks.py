"""The on-disk form of an encrypted gallery: one authenticated file per block plus an authenticated manifest.

Block file (``block-NNNNNN.ckks``)::

    magic "ADVFACE-CKKS-BLOCK1\\n" | header length (u32) | header JSON | slot states (N/2 bytes)
    | for each column: length (u32) + SEAL ciphertext | tag (32 bytes)

The tag is HMAC-SHA256 under the gallery's integrity key (the sidecar's at-rest key) of everything before it, or a
plain SHA-256 checksum when no key is configured (then only accidental corruption is detected). The header names the
key pair (fingerprint), block index, generation, dimension and metric; the manifest (``gallery.json``, tagged the
same way) lists every block with its generation and tag, so a missing, swapped, rolled-back or altered block is
detected and named on load (:class:`~advface.errors.IntegrityError`). Files are written atomically (temporary file,
fsync, rename), blocks first and the manifest last.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from advface.encrypted.gallery import EncryptedGallery, GalleryMetric
from advface.encrypted.keys import PublicKeys
from advface.errors import IntegrityError

__all__ = [
    "block_tag_ok",
    "decode_block",
    "encode_block",
    "encode_block_data",
    "load_gallery",
    "retag_block",
    "save_gallery",
]

MAGIC = b"ADVFACE-CKKS-BLOCK1\n"
MANIFEST = "gallery.json"
_TAG = 32


def _tag(key: bytes | None, data: bytes) -> bytes:
    if key is None:
        return hashlib.sha256(b"advface ckks checksum\x00" + data).digest()
    return hmac.new(key, b"advface ckks block\x00" + data, hashlib.sha256).digest()


def block_name(index: int) -> str:
    return f"block-{index:06d}.ckks"


def encode_block(gallery: EncryptedGallery, index: int, key: bytes | None) -> bytes:
    """The authenticated bytes of one block."""
    generation, state, columns = gallery.export_block(index)
    return encode_block_data(gallery, index, generation, state, columns, key)


def encode_block_data(
    gallery: EncryptedGallery, index: int, generation: int, state: np.ndarray, columns: list[bytes], key: bytes | None
) -> bytes:
    """The authenticated bytes of block ``index`` with the given contents, under ``gallery``'s key pair and shape
    (a rotation encodes blocks for the new key pair before its gallery holds them)."""
    header = json.dumps(
        {
            "block": index,
            "generation": generation,
            "fingerprint": gallery.keys.fingerprint,
            "dim": gallery.dim,
            "metric": gallery.metric,
            "columns": gallery.columns,
            "slots": gallery.slots,
            "auth": "hmac-sha256" if key is not None else "sha256",
        },
        sort_keys=True,
    ).encode()
    parts = [MAGIC, struct.pack(">I", len(header)), header, state.astype(np.uint8).tobytes()]
    for data in columns:
        parts += [struct.pack(">I", len(data)), data]
    body = b"".join(parts)
    return body + _tag(key, body)


def block_tag_ok(data: bytes, key: bytes | None) -> bool:
    """Whether ``data`` is a block authenticated under ``key`` (the tag only: nothing is parsed)."""
    if len(data) < len(MAGIC) + 4 + _TAG or not data.startswith(MAGIC):
        return False
    return hmac.compare_digest(data[-_TAG:], _tag(key, data[:-_TAG]))


def retag_block(data: bytes, old_key: bytes | None, new_key: bytes | None, what: str) -> bytes:
    """The block ``data`` authenticated under ``new_key`` instead of ``old_key`` (same contents); IntegrityError
    naming ``what`` when it does not authenticate under ``old_key``."""
    if not block_tag_ok(data, old_key):
        raise IntegrityError(f"{what}: authentication failed (tampered, truncated, or written under another key)")
    body = data[:-_TAG]
    return body + _tag(new_key, body)


def decode_block(
    gallery: EncryptedGallery, data: bytes, key: bytes | None, what: str
) -> tuple[dict[str, Any], np.ndarray, list[Any]]:
    """``(header, states, ciphertexts)`` of a block file; IntegrityError naming ``what`` when anything is off."""
    if len(data) < len(MAGIC) + 4 + _TAG or not data.startswith(MAGIC):
        raise IntegrityError(f"{what}: not an encrypted gallery block")
    body, tag = data[:-_TAG], data[-_TAG:]
    if not hmac.compare_digest(tag, _tag(key, body)):
        raise IntegrityError(f"{what}: authentication failed (tampered, truncated, or written under another key)")
    pos = len(MAGIC)
    (size,) = struct.unpack_from(">I", body, pos)
    pos += 4
    try:
        header = json.loads(body[pos : pos + size])
    except ValueError:
        raise IntegrityError(f"{what}: unreadable header") from None
    pos += size
    expected = {
        "fingerprint": gallery.keys.fingerprint,
        "dim": gallery.dim,
        "metric": gallery.metric,
        "columns": gallery.columns,
        "slots": gallery.slots,
    }
    for name, value in expected.items():
        if header.get(name) != value:
            raise IntegrityError(f"{what}: {name} is {header.get(name)!r}, this gallery's is {value!r}")
    if pos + gallery.slots > len(body):
        raise IntegrityError(f"{what}: truncated slot states")
    state = np.frombuffer(body, np.uint8, gallery.slots, pos).copy()
    pos += gallery.slots
    columns = []
    for c in range(gallery.columns):
        if pos + 4 > len(body):
            raise IntegrityError(f"{what}: truncated at column {c}")
        (size,) = struct.unpack_from(">I", body, pos)
        pos += 4
        columns.append(gallery.load_ciphertext(body[pos : pos + size], f"{what}, column {c}"))
        pos += size
    if pos != len(body):
        raise IntegrityError(f"{what}: {len(body) - pos} trailing bytes")
    return header, state, columns


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_gallery(
    gallery: EncryptedGallery, folder: str | os.PathLike[str], key: bytes | None, blocks: list[int] | None = None
) -> Path:
    """Write ``blocks`` (default: all) and then the manifest of every block to ``folder``."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    manifest_path = path / MANIFEST
    entries: dict[int, dict[str, Any]] = {}
    if blocks is not None and manifest_path.exists():
        entries = {e["block"]: e for e in _read_manifest(gallery, path, key)["blocks"]}
    for index in range(gallery.block_count) if blocks is None else blocks:
        data = encode_block(gallery, index, key)
        _write_atomic(path / block_name(index), data)
        entries[index] = {"block": index, "generation": gallery.generation(index), "tag": data[-_TAG:].hex()}
    listed = [entries[i] for i in range(gallery.block_count)]
    doc = {"fingerprint": gallery.keys.fingerprint, "dim": gallery.dim, "metric": gallery.metric, "blocks": listed}
    body = json.dumps(doc, sort_keys=True).encode()
    _write_atomic(manifest_path, json.dumps({"manifest": doc, "tag": _tag(key, body).hex()}, indent=1).encode())
    return path


def _read_manifest(gallery: EncryptedGallery, path: Path, key: bytes | None) -> dict[str, Any]:
    what = str(path / MANIFEST)
    try:
        outer = json.loads((path / MANIFEST).read_text())
        doc = outer["manifest"]
        tag = bytes.fromhex(outer["tag"])
    except FileNotFoundError:
        raise IntegrityError(f"{what} is missing") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise IntegrityError(f"{what}: unreadable") from None
    if not hmac.compare_digest(tag, _tag(key, json.dumps(doc, sort_keys=True).encode())):
        raise IntegrityError(f"{what}: authentication failed (tampered, or written under another key)")
    if doc.get("fingerprint") != gallery.keys.fingerprint:
        raise IntegrityError(f"{what}: written for key pair {doc.get('fingerprint')}, not {gallery.keys.fingerprint}")
    if doc.get("dim") != gallery.dim or doc.get("metric") != gallery.metric:
        raise IntegrityError(f"{what}: gallery of dim {doc.get('dim')} / {doc.get('metric')}")
    return dict(doc)


def load_gallery(
    keys: PublicKeys, folder: str | os.PathLike[str], dim: int, metric: GalleryMetric, key: bytes | None
) -> EncryptedGallery:
    """The gallery saved in ``folder``; IntegrityError naming the first file that fails its checks."""
    gallery = EncryptedGallery(keys, dim, metric)
    path = Path(folder)
    doc = _read_manifest(gallery, path, key)
    for index, entry in enumerate(doc["blocks"]):
        file = path / block_name(index)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{file}: block {index} is missing") from None
        header, state, columns = decode_block(gallery, data, key, str(file))
        if header.get("block") != index or entry.get("block") != index:
            raise IntegrityError(f"{file}: holds block {header.get('block')}, expected {index} (swapped)")
        if entry.get("tag") != data[-_TAG:].hex() or entry.get("generation") != header.get("generation"):
            raise IntegrityError(f"{file}: not the version the manifest names (rolled back or replaced)")
        gallery.import_block(index, int(header["generation"]), state, columns)
    return gallery
