"""`advface maintenance`: the admin token is read safely before any call (the calls themselves are tested against a
serving sidecar in tests/server/test_maintenance_rpcs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from advface.cli.main import main


def test_refuses_without_a_safe_admin_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ADVFACE_TOKEN", raising=False)
    target = ["--target", "127.0.0.1:1"]
    assert main(["maintenance", "status", *target]) == 2
    assert "no admin token" in capsys.readouterr().err
    token = tmp_path / "admin.token"
    token.write_text("admin-token-0123456789abcdef\n")
    token.chmod(0o644)
    assert main(["maintenance", "erase-now", *target, "--token-file", str(token)]) == 2
    assert "accessible by group or others" in capsys.readouterr().err
    assert main(["maintenance", "status", *target, "--token-file", str(tmp_path / "missing")]) == 2
    assert "token file" in capsys.readouterr().err
    token.chmod(0o600)
    assert main(["maintenance", "erase-now", *target, "--token-file", str(token), "--wait", "--poll-s", "0"]) == 2
    assert "--poll-s" in capsys.readouterr().err


def test_a_sidecar_that_is_down_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ADVFACE_TOKEN", "admin-token-0123456789abcdef")
    assert main(["maintenance", "status", "--target", "127.0.0.1:1", "--timeout", "2"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
