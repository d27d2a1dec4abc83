"""Encodings of vectors and arrays used by the sources and sinks (no I/O policy here).

- SQLite: a vector is a float32 little-endian BLOB (default) or JSON text (``[0.1, ...]``);
- pgvector binary: ``int16 dim, int16 0, float32 x dim`` in network byte order (COPY BINARY, binary results);
- ``.npy`` streams: header then rows, read or written a slice at a time (also inside ``.npz`` zip members).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from advface.errors import EmbeddingError

# --------------------------------------------------------------------------------------------------- SQLite


def blob_to_vector(value: Any, row_id: str) -> np.ndarray:
    """A SQLite vector cell (float32 LE BLOB or JSON text) as a float32 array."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if len(data) % 4:
            raise EmbeddingError(f"id {row_id}: vector BLOB of {len(data)} bytes is not float32 (multiple of 4)")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if isinstance(value, str):
        try:
            values = json.loads(value)
        except ValueError as exc:
            raise EmbeddingError(f"id {row_id}: vector text is not JSON ({exc})") from None
        if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
            raise EmbeddingError(f"id {row_id}: vector JSON must be a list of numbers")
        return np.asarray(values, dtype=np.float32)
    if value is None:
        raise EmbeddingError(f"id {row_id}: vector is NULL")
    raise EmbeddingError(f"id {row_id}: vector of SQLite type {type(value).__name__} (need BLOB or JSON text)")


def vector_to_cell(vector: np.ndarray, fmt: str) -> bytes | str:
    """A float32 vector as a SQLite cell: ``blob`` (float32 LE) or ``json`` (shortest round-trip decimals)."""
    v = np.asarray(vector, dtype="<f4")
    if fmt == "json":
        # float64 text: reads back to exactly the same float32
        return json.dumps(v.astype(np.float64).tolist(), separators=(",", ":"))
    return v.tobytes()


# --------------------------------------------------------------------------------------------------- pgvector


def pgvector_from_binary(data: bytes, row_id: str) -> np.ndarray:
    """Decode pgvector's binary form."""
    if data is None:
        raise EmbeddingError(f"id {row_id}: vector is NULL")
    if len(data) < 4:
        raise EmbeddingError(f"id {row_id}: truncated pgvector value")
    dim, _unused = struct.unpack_from(">hh", data, 0)
    if len(data) != 4 + 4 * dim:
        raise EmbeddingError(f"id {row_id}: pgvector value of {len(data)} bytes for dim {dim}")
    return np.frombuffer(data, dtype=">f4", offset=4).astype(np.float32)


def pgvector_to_binary(vector: np.ndarray) -> bytes:
    """Encode a float32 vector in pgvector's binary form."""
    v = np.asarray(vector, dtype=">f4")
    return struct.pack(">hh", len(v), 0) + v.tobytes()


PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
PGCOPY_TRAILER = struct.pack(">h", -1)


def pgcopy_rows(ids: list[str], vectors: np.ndarray, integer_ids: bool) -> bytes:
    """Rows ``(id, vector)`` in PostgreSQL's binary COPY format (without header and trailer)."""
    out = bytearray()
    v = np.asarray(vectors, dtype=">f4")
    vec_head = struct.pack(">ihh", 4 + 4 * v.shape[1], v.shape[1], 0)
    for row_id, row in zip(ids, v, strict=True):
        out += b"\x00\x02"
        if integer_ids:
            out += struct.pack(">iq", 8, int(row_id))
        else:
            raw = row_id.encode("utf-8")
            out += struct.pack(">i", len(raw)) + raw
        out += vec_head + row.tobytes()
    return bytes(out)


# --------------------------------------------------------------------------------------------------- .npy streams


def read_npy_header(f: IO[bytes], what: str) -> tuple[tuple[int, ...], np.dtype]:
    """Read a ``.npy`` header from ``f`` (positioned at its start): shape and dtype (no pickles, C order)."""
    try:
        major, minor = np.lib.format.read_magic(f)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise EmbeddingError(f"{what}: not a .npy array ({exc})") from None
    if dtype.hasobject:
        raise EmbeddingError(f"{what}: object arrays (pickles) are not read")
    if fortran and len(shape) > 1:
        raise EmbeddingError(f"{what}: Fortran-ordered arrays are not supported; save it in C order")
    return tuple(shape), dtype


def iter_npy_rows(
    f: IO[bytes], shape: tuple[int, ...], dtype: np.dtype, rows: int, skip: int = 0, what: str = "array"
) -> Iterator[np.ndarray]:
    """Yield ``rows``-row slices of the array whose data starts at ``f``'s position, after skipping ``skip`` rows."""
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    total = shape[0]
    done = 0
    if skip:
        _skip(f, skip * row_bytes, what)
        done = skip
    while done < total:
        n = min(rows, total - done)
        data = _read_exact(f, n * row_bytes, what)
        yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))
        done += n


def _skip(f: IO[bytes], nbytes: int, what: str) -> None:
    try:
        f.seek(nbytes, 1)
    except (OSError, ValueError, AttributeError):
        while nbytes:
            got = f.read(min(nbytes, 1 << 24))
            if not got:
                raise EmbeddingError(f"{what}: file is truncated") from None
            nbytes -= len(got)


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    parts: list[bytes] = []
    left = n
    while left:
        got = f.read(left)
        if not got:
            raise EmbeddingError(f"{what}: file is truncated")
        parts.append(got)
        left -= len(got)
    return b"".join(parts)


def write_npy_header(f: IO[bytes], shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Write a ``.npy`` header (version chosen by numpy) for a C-ordered array."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # header over 64 KiB
        np.lib.format.write_array_header_2_0(f, header)
