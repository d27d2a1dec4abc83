"""Re-derive :data:`advface.faces.align.DLIB_CHIP_FIVE`: where the five ArcFace landmarks lie in dlib chips.

Run ``python -m advface.faces.measure_template --count 200`` (LFW from ``$ADVFACE_LFW_DIR``). Each photo is
detected with :class:`~advface.faces.detect.DlibDetector`; its 68-point ArcFace landmarks are mapped into the
dlib chip (``get_face_chip_details(shape5, size, padding)``); the mean over faces is printed in chip pixels and
in dlib's unit face coordinates (what ``DLIB_CHIP_FIVE`` stores).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from advface.faces.align import apply_matrix, dlib_chip_matrix
from advface.faces.detect import DlibDetector
from advface.images import load_image
from advface.paths import lfw_dir


def chip_landmarks(paths: Iterable[Path], size: int = 150, padding: float = 0.25) -> np.ndarray:
    """``N x 5 x 2`` ArcFace landmarks in dlib chip pixels, one row per photo with a face (largest face)."""
    detector = DlibDetector(upsample=1, arcface_landmarks=True)
    rows = []
    for path in paths:
        faces = detector.detect(load_image(path))
        if faces:
            face = faces[0]
            rows.append(apply_matrix(dlib_chip_matrix(face.dlib_shape, size, padding), face.landmarks))
    return np.asarray(rows).reshape(-1, 5, 2)


def to_unit(points: np.ndarray, size: int, padding: float) -> np.ndarray:
    """Chip pixels to dlib's unit face coordinates (inverse of ``dlib_chip_template``)."""
    return points / size * (1.0 + 2.0 * padding) - padding


def spread_sample(root: Path, count: int) -> list[Path]:
    """``count`` LFW photos spread evenly over the sorted file list."""
    files = sorted((root / "images").glob("*/*.jpg"))
    step = max(1, len(files) // count)
    return files[::step][:count]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lfw-dir", default=None)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--padding", type=float, default=0.25)
    args = parser.parse_args(argv)
    files = spread_sample(lfw_dir(args.lfw_dir), args.count)
    points = chip_landmarks(files, args.size, args.padding)
    mean = points.mean(axis=0)
    np.set_printoptions(precision=5, suppress=True)
    print(f"{len(points)} faces of {len(files)} photos")
    print("mean chip pixels:\n", mean)
    print("std chip pixels:\n", points.std(axis=0))
    print("unit coordinates (DLIB_CHIP_FIVE):\n", to_unit(mean, args.size, args.padding))


if __name__ == "__main__":
    main()
