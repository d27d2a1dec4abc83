"""Reading a process's memory as a thief with a memory dump would: every readable and writable mapping of a process,
through Linux's ``/proc/PID/maps`` and ``/proc/PID/mem``.

Only for a process the caller may trace (its own child under the default ``kernel.yama.ptrace_scope`` of 0 or 1).
:func:`dump_unsupported` says, before anything is started, why a platform cannot be measured; the audit then reports
"not measured" with that reason, never a count of zero.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

__all__ = ["dump_unsupported", "read_memory"]

_MAPPING = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S+)")


def dump_unsupported() -> str | None:
    """Why this platform cannot dump a child process's memory (None: it can)."""
    if not sys.platform.startswith("linux"):
        return f"reading another process's memory needs Linux's /proc/PID/mem (platform: {sys.platform})"
    if not Path("/proc/self/maps").is_file() or not Path("/proc/self/mem").exists():
        return "/proc/PID/maps and /proc/PID/mem are not available (no procfs mounted)"
    return None


def read_memory(pid: int) -> bytes:
    """Every readable and writable mapping of process ``pid``, concatenated (mappings that cannot be read, e.g. guard
    pages, are skipped). OSError (e.g. PermissionError) when the process's maps or memory cannot be opened at all."""
    parts = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            match = _MAPPING.match(line)
            if match is None or "r" not in match[3] or "w" not in match[3]:
                continue
            start, stop = int(match[1], 16), int(match[2], 16)
            try:
                mem.seek(start)
                parts.append(mem.read(stop - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(parts)
