"""The sidecar-like process of the audit's encrypted-matching scenario (:mod:`advface.audit.encrypted_thief`), run as
``python -m advface.audit.sidecar_child``; not a command for users.

It plays what ``advface serve`` runs below gRPC with ``store.matching: encrypted``: a
:class:`~advface.service.TemplateService` (the configuration file given, protection off: the templates it is given
are the protection's output already) over an :class:`~advface.encrypted.store.EncryptedSQLiteStore` that holds the
public key and the binding key only. The key service is a stub in this process that answers "no match" to every
Verify, so no secret key is in its memory either (as with a real key service in another process).

It enrols the templates of ``--templates`` one call at a time (as Enroll does), then verifies the probes of
``--probes`` (as Verify does, probe ``i`` against subject ``i mod N``). Both files are raw little-endian float32 rows,
read one row at a time into one buffer that the caller (this process) zeroes after each call, as a careful caller of
the service does. Then it closes the service, collects garbage, prints ``ready`` and waits to be dumped and killed.

``--keep`` makes a deliberately leaky sidecar: it keeps a copy of every template and probe it handled (the audit's
tests use it to check that a leak is detected).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path

import numpy as np

from advface.encrypted.binding import BoundRequest
from advface.encrypted.keyservice import Decision, VerifyDecision

#: The tenant the child enrols into.
TENANT = "audit"
#: Seconds the child waits to be killed after ``ready`` (the parent kills it at once).
WAIT_S = 3600.0


class _NoMatch:
    """The key-service stub: every Verify is answered "no match", Identify finds no one; it holds no key."""

    def verify(self, request: BoundRequest) -> VerifyDecision:
        return VerifyDecision(False)

    def identify(self, request: BoundRequest) -> list[Decision]:
        return []

    def refresh(self, request: BoundRequest) -> list[bytes]:
        raise RuntimeError("the audit's key-service stub does not erase")


def _rows(path: Path, dim: int) -> tuple[int, int]:
    size = path.stat().st_size
    if size % (4 * dim):
        raise SystemExit(f"{path}: {size} bytes is not a whole number of {dim}-value float32 rows")
    return size // (4 * dim), 4 * dim


def main(argv: list[str] | None = None) -> int:
    """Enrol, verify, print ``ready``, wait (module docs)."""
    parser = argparse.ArgumentParser(prog="python -m advface.audit.sidecar_child", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="the service's configuration file")
    parser.add_argument("--database", type=Path, required=True, help="the encrypted SQLite store to create")
    parser.add_argument("--templates", type=Path, required=True, help="float32 rows to enrol")
    parser.add_argument("--probes", type=Path, required=True, help="float32 rows to verify")
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--metric", choices=("euclidean", "cosine"), required=True)
    parser.add_argument("--keep", action="store_true", help="keep a copy of everything handled (a leaky sidecar)")
    args = parser.parse_args(argv)

    from advface.config import load_config
    from advface.encrypted.keys import generate_keys, new_binding_key
    from advface.encrypted.memory import wipe
    from advface.encrypted.store import EncryptedSQLiteStore, integrity_key_for
    from advface.service import TemplateService

    n, row_bytes = _rows(args.templates, args.dim)
    m, _ = _rows(args.probes, args.dim)
    binding_key = new_binding_key()
    store = EncryptedSQLiteStore(
        args.database,
        generate_keys().public,  # the secret key is dropped here: only the public keys stay in this process
        binding_key,
        args.dim,
        args.metric,
        integrity_key=integrity_key_for(binding_key),
        keyservice=_NoMatch(),
        auto_erase=False,
    )
    service = TemplateService(load_config(args.config, env={}), store=store)
    kept: list[np.ndarray] = []
    buffer = bytearray(row_bytes)
    row = np.frombuffer(buffer, np.float32)
    with open(args.templates, "rb", buffering=0) as templates, open(args.probes, "rb", buffering=0) as probes:
        for i in range(n):
            templates.readinto(buffer)
            if args.keep:
                kept.append(row.copy())
            asyncio.run(service.enroll(TENANT, f"subject-{i}", row, {}))
            wipe(buffer)
        for i in range(m):
            probes.readinto(buffer)
            if args.keep:
                kept.append(row.copy())
            asyncio.run(service.verify(TENANT, f"subject-{i % n}", row))
            wipe(buffer)
    service.close()
    gc.collect()
    print("ready", flush=True)
    time.sleep(WAIT_S)
    return 0 if kept is not None else 1


if __name__ == "__main__":
    sys.exit(main())
