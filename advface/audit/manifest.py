"""The reproducibility bundle of an audit: ``manifest.json`` beside ``report.json``.

It names everything a run depends on without holding a secret: the code revision, the settings (secrets redacted),
the key ids of the keyed transforms (never the keys), a manifest of the dataset's files (count and a hash over their
sorted names and sizes; per-file SHA-256 with ``--manifest-hashes``), the cache keys of the trained attackers, the
seeds, the stages' timings and the run's log lines.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Version of the ``manifest.json`` format.
MANIFEST_VERSION = 1
#: Settings whose value is replaced by :data:`REDACTED` (names matched case-insensitively).
SECRET_NAMES = re.compile(r"password|passwd|secret|token|credential|private|api_key|apikey", re.IGNORECASE)
REDACTED = "<redacted>"
#: Log lines kept in the manifest (the first ones; the count of those left out is recorded).
MAX_LOG_LINES = 2000

JsonDict = dict[str, Any]


def code_revision(package_dir: Path | None = None) -> JsonDict:
    """``{"revision", "dirty", "package_version"}``: ``git rev-parse HEAD`` of the checkout holding the package
    (``"unknown"`` and ``dirty`` None outside a git checkout or without git)."""
    from advface import __version__

    root = package_dir if package_dir is not None else Path(__file__).resolve().parents[2]
    revision, dirty = "unknown", None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        if head.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", head.stdout.strip()):
            revision = head.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"revision": revision, "dirty": dirty, "package_version": __version__}


def _redact_url(text: str) -> str:
    """``scheme://user:password@host`` with the password redacted."""
    return re.sub(r"(://[^:/@\s]+):[^@/\s]+@", rf"\1:{REDACTED}@", text)


def redact(value: Any, name: str = "") -> Any:
    """``value`` with secrets replaced by :data:`REDACTED`: the value of any setting named like a secret, passwords
    of URLs, recursively through dicts and lists."""
    if name and SECRET_NAMES.search(name):
        return REDACTED if value not in (None, "", [], {}) else value
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _redact_url(value)
    return value


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_manifest(root: Path, file_hashes: bool = False) -> JsonDict:
    """The files under ``root`` (links followed): their count, total size and a SHA-256 over the sorted lines
    ``relative/path<TAB>size``; with ``file_hashes`` also ``files``: relative path -> SHA-256 of the content."""
    root = Path(root)
    if not root.is_dir():
        return {"root": str(root), "files": 0, "note": "not a folder"}
    entries: list[tuple[str, int, Path]] = []
    for path in root.rglob("*"):
        try:
            if path.is_file():
                entries.append((path.relative_to(root).as_posix(), path.stat().st_size, path))
        except OSError:  # a dangling link: listed with size -1
            entries.append((path.relative_to(root).as_posix(), -1, path))
    entries.sort()
    digest = hashlib.sha256()
    for rel, size, _ in entries:
        digest.update(f"{rel}\t{size}\n".encode())
    out: JsonDict = {
        "root": str(root),
        "file_count": len(entries),
        "total_bytes": sum(max(size, 0) for _, size, _ in entries),
        "names_and_sizes_sha256": digest.hexdigest(),
        "hash_rule": "sha256 over 'relative/path<TAB>size<LF>' of every file, sorted by path (links followed)",
    }
    if file_hashes:
        out["file_sha256"] = {rel: (_file_sha256(p) if size >= 0 else None) for rel, size, p in entries}
    return out


class _LogCollector(logging.Handler):
    """Formatted log records of the run (the first :data:`MAX_LOG_LINES`)."""

    def __init__(self, sink: RunLog) -> None:
        super().__init__(logging.INFO)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.line(self.format(record))


@dataclass
class RunLog:
    """Timings of the audit's stages and its log lines, for the manifest."""

    started: float = field(default_factory=time.perf_counter)
    #: Stage name -> seconds it ran.
    timings: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    dropped: int = 0
    _handler: _LogCollector | None = None

    def line(self, text: str) -> None:
        """Record one log line, stamped with the seconds since the run started."""
        if len(self.lines) >= MAX_LOG_LINES:
            self.dropped += 1
            return
        self.lines.append(f"+{time.perf_counter() - self.started:8.1f}s {text}")

    def stage(self, name: str, seconds: float, failed: str | None = None) -> None:
        """Record that stage ``name`` ran for ``seconds`` (``failed``: why it failed)."""
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 3)
        self.line(f"stage {name}: {'failed: ' + failed if failed else 'done'} in {seconds:.1f} s")

    def capture(self, logger: str = "advface") -> None:
        """Collect the records of ``logger`` (and its children) until :meth:`release`."""
        if self._handler is None:
            self._handler = _LogCollector(self)
            logging.getLogger(logger).addHandler(self._handler)

    def release(self, logger: str = "advface") -> None:
        """Stop collecting log records."""
        if self._handler is not None:
            logging.getLogger(logger).removeHandler(self._handler)
            self._handler = None


def key_ids(keys: dict[str, Any]) -> dict[str, str]:
    """Role -> ``key_id`` of each keyed transform (public fingerprints; the transforms themselves stay out)."""
    return {role: str(getattr(key, "key_id", "unknown")) for role, key in keys.items()}


def build_manifest(
    *,
    config: Any,
    config_summary: JsonDict,
    report_files: dict[str, Path],
    keys: dict[str, str],
    cache_keys: dict[str, str],
    seeds: dict[str, int | None],
    run_log: RunLog,
    file_hashes: bool = False,
    revision: JsonDict | None = None,
) -> JsonDict:
    """The ``manifest.json`` document of one audit run (see the module's docstring)."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "written": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "code": revision if revision is not None else code_revision(),
        "config": redact(config_summary),
        "key_ids": keys,
        "dataset": dataset_manifest(Path(config.data), file_hashes),
        "attacker_cache_keys": cache_keys,
        "seeds": seeds,
        "timings_s": {**run_log.timings, "total": round(time.perf_counter() - run_log.started, 3)},
        "report_files": {name: {"file": p.name, "sha256": _file_sha256(p)} for name, p in report_files.items()},
        "log": run_log.lines,
        "log_lines_dropped": run_log.dropped,
    }
