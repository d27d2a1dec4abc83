"""advface reencode --method advface-id: identity-aware AdvFace through the same per-chunk function, deterministic
per template (chunk size and resume do not change the output), selectable by flags or by --config.

Tiny untrained shadows (dim 128, two architectures) and the dlib-torch encoder's torch module; one ascent step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from reencode_helpers import make_templates, read_all, write_parquet

from advface.cli.main import main
from advface.protect import IdentityAwareConfig, ProtectionSpec, load_protector
from advface.testing.tiny_models import tiny_shadow_files

DIM = 128
N = 24


@pytest.fixture(scope="module")
def shadows(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tiny_shadow_files(tmp_path_factory.mktemp("id-shadows"), DIM, ("deconv", "resup"))


@pytest.fixture
def source(tmp_path: Path) -> tuple[str, list[str], np.ndarray]:
    ids, vectors = make_templates(N, dim=DIM)
    return write_parquet(tmp_path / "in.parquet", ids, vectors), ids, vectors


def _args(shadows: list[Path], src: str, dest: str, chunk: int) -> list[str]:
    out = [
        "reencode",
        "--source",
        src,
        "--dest",
        dest,
        "--method",
        "advface-id",
        "--encoder",
        "dlib-torch",
        "--steps",
        "1",
        "--lanes",
        "4",
        "--chunk-size",
        str(chunk),
        "-q",
    ]
    for p in shadows:
        out += ["--shadow", str(p)]
    return out


def test_deterministic_across_chunk_sizes_and_equal_to_the_library(
    tmp_path: Path, shadows: list[Path], source: tuple[str, list[str], np.ndarray]
) -> None:
    src, ids, vectors = source
    outputs = []
    for chunk in (5, N):
        out = tmp_path / f"out{chunk}.parquet"
        assert main(_args(shadows, src, f"parquet:{out}", chunk)) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    got_ids, got = read_all(f"parquet:{tmp_path / 'out5.parquet'}")
    assert got_ids == ids
    spec = ProtectionSpec(
        "advface-id", tuple(map(str, shadows)), IdentityAwareConfig(steps=1, lanes=4, rel_l2=0.1), encoder="dlib-torch"
    )
    np.testing.assert_array_equal(got, load_protector(spec).protect(vectors))
    rel = np.linalg.norm(got - vectors, axis=1) / np.linalg.norm(vectors, axis=1)
    assert (rel > 0.05).all() and (rel <= 0.1 + 1e-5).all()
    # not plain AdvFace with the first shadow
    plain = tmp_path / "plain.parquet"
    assert (
        main(
            [
                "reencode",
                "--source",
                src,
                "--dest",
                f"parquet:{plain}",
                "--shadow",
                str(shadows[0]),
                "--steps",
                "1",
                "--lanes",
                "4",
                "-q",
            ]
        )
        == 0
    )
    assert not np.array_equal(read_all(f"parquet:{plain}")[1], got)


def test_resume_after_a_crash_gives_the_same_bytes(
    tmp_path: Path,
    shadows: list[Path],
    source: tuple[str, list[str], np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import advface.reencode.engine_local as engine_local

    src, _, _ = source
    whole = tmp_path / "whole.parquet"
    assert main(_args(shadows, src, f"parquet:{whole}", 5)) == 0
    real = engine_local.reencode_chunk
    calls = []

    def crash_on_third(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a kill between chunks
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_local, "reencode_chunk", crash_on_third)
    resumed = tmp_path / "resumed.parquet"
    assert main(_args(shadows, src, f"parquet:{resumed}", 5)) != 0  # interrupted after 2 of 5 chunks
    assert len(calls) == 3 and not resumed.exists()
    monkeypatch.setattr(engine_local, "reencode_chunk", real)
    capsys.readouterr()
    assert main(_args(shadows, src, f"parquet:{resumed}", 5)) == 0
    assert "resuming: 10 of 24 templates already done" in capsys.readouterr().err
    assert resumed.read_bytes() == whole.read_bytes()


def test_selected_by_config_and_other_method_refused_on_resume(
    tmp_path: Path, shadows: list[Path], source: tuple[str, list[str], np.ndarray]
) -> None:
    src, _, _ = source
    config = tmp_path / "advface.yaml"
    config.write_text(
        yaml.safe_dump(
            {"protection": {"method": "advface-id", "shadows": [str(p) for p in shadows], "steps": 1, "seed": 0}}
        )
    )
    by_flags, by_config = tmp_path / "flags.parquet", tmp_path / "config.parquet"
    assert main(_args(shadows, src, f"parquet:{by_flags}", 7)) == 0
    assert (
        main(
            [
                "reencode",
                "--source",
                src,
                "--dest",
                f"parquet:{by_config}",
                "--config",
                str(config),
                "--encoder",
                "dlib-torch",
                "--lanes",
                "4",
                "-q",
            ]
        )
        == 0
    )
    assert by_flags.read_bytes() == by_config.read_bytes()


def test_bad_input(
    tmp_path: Path, shadows: list[Path], source: tuple[str, list[str], np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    src, _, _ = source
    dest = f"parquet:{tmp_path / 'out.parquet'}"
    base = ["reencode", "--source", src, "--dest", dest, "--encoder", "dlib-torch", "-q"]
    assert main([*base, "--method", "advface-id"]) == 2
    assert "needs its shadow ensemble" in capsys.readouterr().err
    assert main([*base, "--method", "advface-id", "--shadow", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*base, "--shadow", str(shadows[0]), "--shadow", str(shadows[1])]) == 2
    assert "several are for --method advface-id" in capsys.readouterr().err
    assert main([*base, "--shadow", str(shadows[0]), "--no-jitter"]) == 2
    assert "--no-jitter is for --method advface-id" in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.slow
def test_ray_engine_matches_local(
    tmp_path: Path, shadows: list[Path], source: tuple[str, list[str], np.ndarray]
) -> None:
    """Each Ray actor loads the ensemble and the encoder module once; the bytes equal the local engine's."""
    pytest.importorskip("ray.data")
    src, _, _ = source
    local, ray_out = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert main(_args(shadows, src, f"parquet:{local}", 8)) == 0
    assert main([*_args(shadows, src, f"parquet:{ray_out}", 8), "--engine", "ray", "--num-cpus", "2"]) == 0
    assert local.read_bytes() == ray_out.read_bytes()
