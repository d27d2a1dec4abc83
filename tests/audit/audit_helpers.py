"""Helpers shared by the audit tests."""

from __future__ import annotations

from pathlib import Path

from advface.cli.main import main


def run_quick_audit(dataset: Path, cache: Path, out: Path, *extra: str) -> int:
    """``advface audit --quick --quiet`` on ``dataset`` into ``out`` with the attacker cache ``cache`` and the
    ``extra`` arguments; the exit code."""
    return main(
        ["audit", "--quick", "--quiet", "--data", str(dataset), "--out", str(out), "--cache-dir", str(cache), *extra]
    )
