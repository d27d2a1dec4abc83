"""The thief with the database and a memory dump of the sidecar under encrypted matching, no key service (attackers
B and C of docs/threat-model.md against ``store.matching: encrypted``): what they read of the templates and probes.

:func:`dump_sidecar` runs the sidecar-like child process (:mod:`advface.audit.sidecar_child`: the template service
over an encrypted SQLite store holding the public and binding keys only, the key service a stub without keys),
which enrols the given templates and verifies the given probes; then it reads every readable and writable mapping of
the child (:mod:`advface.audit.memory_dump`) and the database files, kills the child and looks for each template and
probe there (:mod:`advface.audit.recovered`: exact float32 / float64 coordinates, the probes' quantised coefficients,
the SEAL plaintext encodings of the template columns). On a platform without ``/proc/PID/mem``, or where the child's
memory cannot be read, the result says "not measured" and why; it never reports a zero it did not measure.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advface.audit.memory_dump import dump_unsupported, read_memory
from advface.audit.recovered import (
    WordIndex,
    forms,
    found_coordinates,
    plaintext_words,
    plaintexts_found,
    probe_coefficients,
    summarise,
)

__all__ = ["CHILD_TIMEOUT_S", "SidecarDump", "dump_sidecar"]

#: Seconds the child may take to enrol and verify before it is killed and the scenario fails.
CHILD_TIMEOUT_S = 900.0

_CONFIG = """encoder: {{name: {encoder}}}
server: {{workers: 1}}
store: {{data_dir: {data}, use_gpu: false}}
keys: {{auto: false}}
protection: {{enabled: false}}
"""


@dataclass
class SidecarDump:
    """What the thief found. ``measured`` False: ``reason`` says why nothing was measured (the masks are empty).

    The masks are ``N x D`` (templates) / ``M x D`` (probes) booleans of the coordinates found exactly."""

    measured: bool
    reason: str = ""
    templates: int = 0
    probes: int = 0
    memory_bytes: int = 0
    database_bytes: int = 0
    database_files: list[str] = field(default_factory=list)
    #: Coordinates found in the memory dump / the database files, as values and as plaintext encodings.
    memory_templates: np.ndarray | None = None
    memory_plaintexts: np.ndarray | None = None
    memory_probes: np.ndarray | None = None
    database_templates: np.ndarray | None = None
    database_plaintexts: np.ndarray | None = None
    keep: bool = False

    def counts(self) -> dict[str, Any]:
        """Rows recovered (``half`` / ``full``) per place and form, and the union over places and forms."""
        if not self.measured:
            return {}
        assert self.memory_templates is not None and self.memory_plaintexts is not None
        assert self.memory_probes is not None and self.database_templates is not None
        assert self.database_plaintexts is not None
        return {
            "memory_templates": summarise(self.memory_templates),
            "memory_plaintexts": summarise(self.memory_plaintexts),
            "memory_probes": summarise(self.memory_probes),
            "database_templates": summarise(self.database_templates),
            "database_plaintexts": summarise(self.database_plaintexts),
        }

    def templates_found(self) -> np.ndarray:
        """``N x D``: template coordinates found anywhere (memory or database, as values or plaintexts)."""
        assert self.measured and self.memory_templates is not None
        hit = self.memory_templates.copy()
        for other in (self.memory_plaintexts, self.database_templates, self.database_plaintexts):
            assert other is not None
            hit |= other
        return hit

    def probes_found(self) -> np.ndarray:
        """``M x D``: probe coordinates found in the memory dump."""
        assert self.measured and self.memory_probes is not None
        return self.memory_probes


def _write_rows(path: Path, rows: np.ndarray) -> None:
    path.write_bytes(np.ascontiguousarray(rows, "<f4").tobytes())


def _run_child(command: list[str], log: Path, timeout_s: float) -> tuple[subprocess.Popen[bytes], bool]:
    """Start the child; wait for its ``ready`` line (True) or its end / the timeout (False)."""
    with open(log, "wb") as err:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err)
    timer = threading.Timer(timeout_s, child.kill)
    timer.start()
    try:
        assert child.stdout is not None
        ready = child.stdout.readline().strip() == b"ready"
    finally:
        timer.cancel()
    return child, ready


def dump_sidecar(
    templates: np.ndarray,
    probes: np.ndarray,
    *,
    encoder: str,
    metric: str,
    workdir: Path,
    keep: bool = False,
    timeout_s: float = CHILD_TIMEOUT_S,
) -> SidecarDump:
    """Run the sidecar-like child on ``templates`` (enrolled) and ``probes`` (verified) with the encoder ``encoder``
    (the service's; its ``metric``), dump its memory, read its database files, count what is found (module docs).
    ``keep``: the deliberately leaky child (:mod:`advface.audit.sidecar_child`). RuntimeError when the child fails."""
    t = np.ascontiguousarray(templates, np.float32)
    p = np.ascontiguousarray(probes, np.float32)
    if t.ndim != 2 or len(t) == 0 or p.ndim != 2 or p.shape[1] != t.shape[1]:
        raise ValueError(f"need N x D templates (N >= 1) and M x D probes, got {t.shape} and {p.shape}")
    dim = t.shape[1]
    why = dump_unsupported()
    if why is not None:
        return SidecarDump(False, why, len(t), len(p), keep=keep)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"  # the database files: all the thief reads besides the memory
    data.mkdir(exist_ok=True)
    inputs = workdir / "inputs"
    inputs.mkdir(exist_ok=True)
    _write_rows(inputs / "templates.f32", t)
    _write_rows(inputs / "probes.f32", p)
    config = inputs / "advface.yaml"
    config.write_text(_CONFIG.format(encoder=encoder, data=data))
    command = [
        sys.executable,
        "-m",
        "advface.audit.sidecar_child",
        "--config",
        str(config),
        "--database",
        str(data / "templates-encrypted.sqlite3"),
        "--templates",
        str(inputs / "templates.f32"),
        "--probes",
        str(inputs / "probes.f32"),
        "--dim",
        str(dim),
        "--metric",
        metric,
        *(["--keep"] if keep else []),
    ]
    log = inputs / "child.log"
    child, ready = _run_child(command, log, timeout_s)
    try:
        if not ready:
            child.kill()
            child.wait()
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the sidecar-like child process failed (exit {child.returncode}): {tail}")
        try:
            memory = read_memory(child.pid)
        except OSError as exc:
            return SidecarDump(False, f"the child's memory could not be read: {exc}", len(t), len(p), keep=keep)
    finally:
        child.kill()
        child.wait()
    files = sorted(f for f in data.rglob("*") if f.is_file())
    words = plaintext_words(t, metric)
    coefficients = probe_coefficients(p, metric)
    wanted = (*forms(t), *forms(p, (coefficients,)), words)
    memory_index = WordIndex(memory).narrowed(*wanted)  # one pass over the dump for every form
    del memory
    database = WordIndex(b"".join(f.read_bytes() for f in files)).narrowed(*wanted)
    return SidecarDump(
        True,
        templates=len(t),
        probes=len(p),
        memory_bytes=memory_index.size,
        database_bytes=database.size,
        database_files=[f.name for f in files],
        memory_templates=found_coordinates(memory_index, t),
        memory_plaintexts=plaintexts_found(memory_index, words),
        memory_probes=found_coordinates(memory_index, p, (coefficients,)),
        database_templates=found_coordinates(database, t),
        database_plaintexts=plaintexts_found(database, words),
        keep=keep,
    )
