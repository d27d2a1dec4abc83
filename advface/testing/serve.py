"""Waiting for an ``advface serve`` subprocess to accept requests (tests and benchmarks)."""

from __future__ import annotations

import subprocess
import threading

#: The line ``advface serve`` prints on stdout once it accepts requests, followed by ``HOST:PORT``.
READY = "advface serving on "


def wait_ready(proc: subprocess.Popen, timeout: float) -> str | None:
    """The address ``proc`` (``advface serve`` with text stdout piped) reports once ready, or None after
    ``timeout`` seconds or when its stdout closes first."""
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY):
                found.append(line[len(READY) :].strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None
