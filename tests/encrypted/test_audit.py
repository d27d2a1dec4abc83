from __future__ import annotations

import io
import json
import stat
from pathlib import Path

from advface.encrypted.audit import AuditLog


def test_file_is_private_and_lines_are_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record("verify", "ok", tenant="t", items=1, slots=2, released=1, request_id="ab" * 32)
    log.record("identify", "refused", reason="replayed")
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["op"] == "verify" and lines[0]["request"] == "ab" * 8
    assert lines[1]["reason"] == "replayed" and "request" not in lines[1]
    assert log.records == 2


def test_stream_and_none() -> None:
    stream = io.StringIO()
    AuditLog(stream).record("refresh", "ok")
    assert json.loads(stream.getvalue())["op"] == "refresh"
    counted = AuditLog(None)
    counted.record("verify", "ok")
    assert counted.records == 1
