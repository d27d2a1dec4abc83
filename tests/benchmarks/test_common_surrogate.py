"""benchmarks/common.py: how a result names the defender surrogate it protected with."""

from __future__ import annotations

import hashlib
from pathlib import Path

from advface.generative.shipped import shipped_surrogate_path
from benchmarks.common import surrogate_record


def test_the_shipped_surrogate_is_named_shipped_with_its_digest() -> None:
    digest = hashlib.sha256(shipped_surrogate_path().read_bytes()).hexdigest()[:16]
    assert surrogate_record() == {"path": "shipped", "sha256_16": digest}


def test_another_surrogate_is_named_by_its_path_and_contents(tmp_path: Path) -> None:
    model = tmp_path / "other.pt"
    model.write_bytes(b"not the shipped model")
    record = surrogate_record(model)
    assert record["path"] == str(model)
    assert record["sha256_16"] == hashlib.sha256(b"not the shipped model").hexdigest()[:16]
    assert record["sha256_16"] != surrogate_record()["sha256_16"]
