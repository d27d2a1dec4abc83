"""Memory hygiene of the sidecar's encrypted-matching path: plaintext templates and probes must not outlive their call.

Freeing memory does not erase it: a memory dump of the sidecar finds the values of freed numpy buffers, Python float
objects, C++ vectors and SEAL plaintexts until something else happens to reuse their bytes
(docs/encrypted-matching.md measures it). This module erases what the gallery owns and scrubs the allocator caches
that keep freed blocks around:

- :func:`wipe` zeroes arrays and bytearrays in place; :func:`wipe_floats` zeroes the value of Python float objects
  made by the caller (``ndarray.tolist()``), which are immutable from Python but live in memory we own;
  :func:`wipe_plaintext` zeroes a SEAL plaintext's coefficients (an encoded template decodes without any key);
- :func:`scrub_caches` empties glibc's per-thread cache (*tcache*, blocks up to 1,032 bytes) and numpy's small-block
  cache (up to 1,023 bytes) of old contents after each operation, on the thread that ran it, and then calls
  :func:`clear_vector_registers`;
- :func:`clear_vector_registers` overwrites the vector registers that glibc's ``memmove``/``memcpy`` load (on
  AVX-512 machines zmm16-zmm24) with zeros, on the calling thread. A 128-d float32 template is a 512-byte copy, which
  that memmove makes through eight 64-byte registers; they keep its values until the thread's next copy of that
  size. A register is not memory, but it gets there: when a thread exits (a worker pool's shutdown) the dynamic
  linker's lazy-binding trampoline saves the whole register file on the thread's stack (``xsavec``), and glibc keeps
  the stacks of exited threads mapped for reuse; a core dump holds every thread's registers too.

glibc's ``mallopt(M_PERTURB)`` (every ``free`` overwrites the freed bytes) is deliberately *not* used: it changes the
allocator for every native library in the process, and with it on, the Ray re-encoding engine crashed
(segmentation fault in the test suite), so freed buffers of other code keep their bytes until reused.

What no function here reaches: other registers than memmove's (numpy's and torch's SIMD kernels use them too; the
benchmark's ``--locate`` runs found no template value there, but nothing here clears them), memory of other
threads' tcaches, Python ``bytes`` and ``str`` objects made by other code (e.g. a gRPC request's payload), and SEAL's
memory pool beyond the plaintexts the gallery wipes. All of it is best-effort on other C libraries than glibc
(:func:`scrub_caches` then scrubs numpy's cache only).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["clear_vector_registers", "scrub_caches", "wipe", "wipe_floats", "wipe_plaintext"]

#: largest request served from glibc's per-thread cache (64 bins of 16 bytes), and blocks kept per bin
_TCACHE_MAX = 1032
_TCACHE_COUNT = 7
#: numpy keeps freed data buffers under this many bytes, up to this many per size
_NUMPY_CACHE_MAX = 1024
_NUMPY_CACHE_COUNT = 7

#: bytes :func:`clear_vector_registers` copies: over eight 64-byte vectors, so that glibc's memmove takes its path
#: through all nine vector registers it uses (below glibc's ``rep movsb`` threshold, 2 KiB or more on x86-64)
_REGISTER_COPY = 1024
#: the zeros it copies, and where (the destination only ever holds zeros, so threads may share it)
_ZEROS = ctypes.create_string_buffer(_REGISTER_COPY)
_ZEROS_SINK = ctypes.create_string_buffer(_REGISTER_COPY)

_libc_lock = threading.Lock()
_libc: Any = None
_libc_checked = False
#: offset of a float's value in its object (CPython's PyFloatObject: header then the double); checked at import
_FLOAT_VALUE_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p)


def _float_layout_ok() -> bool:
    probe = float.fromhex("0x1.123456789abcdp-3")  # a fresh object, not a constant of this module's code
    try:
        return ctypes.c_double.from_address(id(probe) + _FLOAT_VALUE_OFFSET).value == probe
    except (ValueError, OSError):  # pragma: no cover - not CPython
        return False


_FLOATS_WIPEABLE = sys.implementation.name == "cpython" and _float_layout_ok()


def _glibc() -> Any:
    """The C library when it is glibc (malloc, free), else None."""
    global _libc, _libc_checked
    with _libc_lock:
        if not _libc_checked:
            _libc_checked = True
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # noqa: B018 - glibc only
                libc.malloc.restype = ctypes.c_void_p
                libc.malloc.argtypes = [ctypes.c_size_t]
                libc.free.restype = None
                libc.free.argtypes = [ctypes.c_void_p]
                _libc = libc
            except (OSError, AttributeError):  # pragma: no cover - musl, macOS, Windows
                _libc = None
        return _libc


def scrub_caches(numpy_sizes: Iterable[int] = ()) -> None:
    """Overwrite what the calling thread's glibc tcache and numpy's small-block cache (the buckets of
    ``numpy_sizes`` bytes) still hold of freed blocks: take every cached block, zero it, give it back."""
    libc = _glibc()
    if libc is not None:
        for size in range(24, _TCACHE_MAX + 1, 16):  # one request size per tcache bin
            blocks = [libc.malloc(size) for _ in range(_TCACHE_COUNT)]
            for block in blocks:
                if block:
                    ctypes.memset(block, 0, size)
            for block in blocks:
                libc.free(block)
    for size in sorted(set(numpy_sizes)):
        if 0 < size < _NUMPY_CACHE_MAX:
            buffers = [np.empty(size, np.uint8) for _ in range(_NUMPY_CACHE_COUNT)]
            for buffer in buffers:
                buffer.fill(0)
            del buffers
    clear_vector_registers()


def clear_vector_registers() -> None:
    """Overwrite, on the calling thread, the vector registers that ``memmove`` loads with zeros (module docs): one
    copy of 1 KiB of zeros through the C library's ``memmove``, whatever its CPU-specific version."""
    ctypes.memmove(_ZEROS_SINK, _ZEROS, _REGISTER_COPY)


def wipe(*buffers: Any) -> None:
    """Zero numpy arrays (writeable, owning or viewing memory we own) and bytearrays in place; None is skipped."""
    for buffer in buffers:
        if buffer is None:
            continue
        if isinstance(buffer, np.ndarray):
            if buffer.flags.writeable:
                buffer.fill(0)
        elif isinstance(buffer, (bytearray, memoryview)):
            ctypes.memset((ctypes.c_char * len(buffer)).from_buffer(buffer), 0, len(buffer))
        else:
            raise TypeError(f"cannot wipe a {type(buffer).__name__}")


def wipe_floats(values: Iterable[Any]) -> None:
    """Zero the value of each Python ``float`` object in ``values`` in place. Only for floats the caller made itself
    (``ndarray.tolist()``) and holds alone: the objects are changed, not replaced. A no-op outside CPython."""
    if not _FLOATS_WIPEABLE:  # pragma: no cover - other interpreters
        return
    offset = _FLOAT_VALUE_OFFSET
    for value in values:
        if type(value) is float and value != 0.0:
            ctypes.memset(id(value) + offset, 0, 8)


def wipe_plaintext(plain: Any) -> None:
    """Zero a SEAL plaintext's coefficients (an encoded template or probe decodes without any key)."""
    plain.set_zero()
