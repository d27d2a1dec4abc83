"""The Ray engine (local Ray, 2 CPUs) writes exactly what the local engine writes; real protection end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from reencode_helpers import make_templates, read_all, write_parquet

from advface.cli.main import main


@pytest.mark.slow
def test_ray_engine_matches_local(tmp_path: Path, shadow_ckpt: Path) -> None:
    pytest.importorskip("ray.data")
    ids, vectors = make_templates(160)
    src = write_parquet(tmp_path / "in.parquet", ids, vectors)
    common = [
        "--source",
        src,
        "--shadow",
        str(shadow_ckpt),
        "--steps",
        "3",
        "--chunk-size",
        "25",
        "--match-threshold",
        "1.0",
        "-q",
    ]
    assert main(["reencode", *common, "--dest", f"parquet:{tmp_path / 'local.parquet'}"]) == 0
    assert (
        main(
            ["reencode", *common, "--dest", f"parquet:{tmp_path / 'ray.parquet'}", "--engine", "ray", "--num-cpus", "2"]
        )
        == 0
    )
    assert (tmp_path / "local.parquet").read_bytes() == (tmp_path / "ray.parquet").read_bytes()
    summary = json.loads((tmp_path / "ray.parquet.verify.json").read_text())
    assert summary["passed"] and summary["reencode"]["engine"] == "ray"


def test_real_protection_with_the_shipped_shadow(tmp_path: Path) -> None:
    """Default parameters and the shipped dlib shadow: within budget, moved, still matching (dlib threshold)."""
    from advface.protect import shipped_shadow_path

    shipped = shipped_shadow_path("dlib")
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((4, 128))
    raw = centres[rng.integers(0, 4, 12)] + 0.3 * rng.standard_normal((12, 128))
    vectors = (raw / np.linalg.norm(raw, axis=1, keepdims=True) * 0.6).astype(np.float32)  # dlib-like norms
    ids = [f"subject{i}" for i in range(12)]
    src = write_parquet(tmp_path / "in.parquet", ids, vectors)
    dest = f"parquet:{tmp_path / 'out.parquet'}"
    assert main(["reencode", "--source", src, "--dest", dest, "--encoder", "dlib", "--chunk-size", "5", "-q"]) == 0
    summary = json.loads((tmp_path / "out.parquet.verify.json").read_text())
    assert summary["passed"], summary["failures"]
    assert summary["matching"]["threshold"] == 0.6 and summary["matching"]["match_fraction"] == 1.0
    _, out = read_all(dest)
    rel = np.linalg.norm(out - vectors, axis=1) / np.linalg.norm(vectors, axis=1)
    assert (rel <= 0.1 + 1e-6).all() and (rel > 0.09).all()  # sign ascent ends on the budget's boundary
    from advface.protect import AdvFaceConfig, Protector

    expected = Protector.from_checkpoint(shipped, config=AdvFaceConfig()).protect(vectors)
    np.testing.assert_array_equal(out, expected)
