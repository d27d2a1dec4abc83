"""The key service's audit log: one JSON line per request, without probe, template, subject or key material.

Each line: UTC time, operation, tenant, number of items and slots asked about, number of decisions released
(matches / candidates), outcome (``ok``, ``refused``, ``rate_limited``, ``error``) and the refusal reason, plus the
first 16 hex digits of the request's MAC as a request id (it reveals nothing about the probe). Never a score, an id,
a nonce or a ciphertext.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
from pathlib import Path
from typing import Any, TextIO

__all__ = ["AuditLog"]


class AuditLog:
    """Appends audit records to a file (created 0600) or a text stream; ``None``: records are only counted."""

    def __init__(self, target: str | os.PathLike[str] | TextIO | None = None) -> None:
        self._lock = threading.Lock()
        self._stream: TextIO | None = None
        self._owned = False
        self.records = 0
        if isinstance(target, (str, os.PathLike)):
            path = Path(target)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._stream = os.fdopen(fd, "a", encoding="utf-8")
            self._owned = True
        elif target is not None:
            self._stream = target

    def record(
        self,
        op: str,
        outcome: str,
        *,
        tenant: str = "",
        items: int = 0,
        slots: int = 0,
        released: int = 0,
        reason: str = "",
        request_id: str = "",
    ) -> dict[str, Any]:
        entry = {
            "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
            "op": op,
            "tenant": tenant,
            "items": items,
            "slots": slots,
            "released": released,
            "outcome": outcome,
        }
        if reason:
            entry["reason"] = reason
        if request_id:
            entry["request"] = request_id[:16]
        with self._lock:
            self.records += 1
            if self._stream is not None:
                self._stream.write(json.dumps(entry, sort_keys=True) + "\n")
                self._stream.flush()
        return entry

    def close(self) -> None:
        with self._lock:
            if self._owned and self._stream is not None:
                self._stream.close()
            self._stream = None
