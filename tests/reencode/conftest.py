"""Fixtures of the re-encoding tests: a small shadow model (dim 16) and raw-template tables."""

from __future__ import annotations

from pathlib import Path

import pytest

inversion = pytest.importorskip("advface.inversion")

DIM = 16


@pytest.fixture(scope="session")
def shadow_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained deconv shadow for 16-d templates (plumbing tests; real protection uses the shipped one)."""
    import torch

    torch.manual_seed(0)
    model = inversion.build_decoder("deconv", DIM, 16, width=0.05, hidden=0)
    path = tmp_path_factory.mktemp("shadow") / "shadow.pt"
    return inversion.save_decoder(path, model, {"encoder": "dlib", "encoder_fingerprint": "fp", "role": "shadow"})


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default summaries (``reencode-<table>.verify.json`` in the working directory) and work folders of table
    destinations (under the cache) land in the test's own folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADVFACE_CACHE_DIR", str(tmp_path / "cache"))
