"""Fixtures of the audit tests: a tiny identity-folder dataset built from LFW (symlinks), and one quick audit run
shared by the tests that read its report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from audit_helpers import run_quick_audit

#: People with two or more photos, people with one photo, photos per person.
N_MULTI, N_SINGLE, MAX_PHOTOS = 20, 10, 4


def _link_people(lfw_dir: Path, root: Path) -> list[str]:
    people = sorted(p for p in (lfw_dir / "images").iterdir() if p.is_dir())
    counts = {p: len(list(p.glob("*.jpg"))) for p in people}
    multi = [p for p in people if counts[p] >= 2][:N_MULTI]
    single = [p for p in people if counts[p] == 1][:N_SINGLE]
    for person in multi + single:
        folder = root / person.name
        folder.mkdir(parents=True, exist_ok=True)
        for photo in sorted(person.glob("*.jpg"))[:MAX_PHOTOS]:
            os.symlink(photo, folder / photo.name)
    return [p.name for p in single]


@pytest.fixture(scope="session")
def audit_dataset(lfw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 LFW identities as identity folders (20 with 2-4 photos, 10 with one) plus one unreadable image."""
    root = tmp_path_factory.mktemp("audit_data") / "faces"
    _link_people(lfw_dir, root)
    broken = root / "Zz_Broken_Person"
    broken.mkdir()
    (broken / "Zz_Broken_Person_0001.jpg").write_bytes(b"this is not a JPEG")
    return root


@pytest.fixture(scope="session")
def audit_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache folder shared by the audit runs of the session (pairs and trained attackers)."""
    return tmp_path_factory.mktemp("audit_cache")


@pytest.fixture(scope="session")
def quick_report(audit_dataset: Path, audit_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one ``advface audit --quick`` run on :func:`audit_dataset`."""
    out = tmp_path_factory.mktemp("audit_out")
    assert run_quick_audit(audit_dataset, audit_cache, out) == 0
    return out
