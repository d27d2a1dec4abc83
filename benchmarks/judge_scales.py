"""The scale of each judge's ISM: mean cosine similarity of genuine and of impostor pairs of clean LFW photos.

Usage::

    python benchmarks/judge_scales.py [--judges mobilefacenet,facenet] [--out benchmarks/results/judge_scales.json]

The diffusion benchmarks report ISM (mean cosine between generated faces and another photo of the person) for every
judge; cosines of different networks sit on different scales (an encoder whose impostor pairs average 0.15 cannot
give an ISM near 0 for a face of nobody). Each judge embeds LFW through its own detection and alignment (the same
cached embeddings and FMR 0.1% threshold as the benchmarks' judges); genuine pairs are all pairs of photos of one
person, impostor pairs a seeded random sample of photos of two different people.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.audit.transfer import build_transfer_judge  # noqa: E402
from advface.datasets import LFW  # noqa: E402
from advface.encoders.dlib_runtime import DLIB_CHIP  # noqa: E402
from benchmarks.common import write_results  # noqa: E402


def pair_cosines(embeddings: np.ndarray, identities: np.ndarray, impostors: int, seed: int) -> dict[str, float]:
    """Mean (and spread of) cosine over every genuine pair and ``impostors`` random impostor pairs."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    genuine: list[np.ndarray] = []
    for person in np.unique(identities):
        rows = np.flatnonzero(identities == person)
        if len(rows) > 1:
            block = unit[rows] @ unit[rows].T
            genuine.append(block[np.triu_indices(len(rows), k=1)])
    same = np.concatenate(genuine)
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(unit), impostors), rng.integers(0, len(unit), impostors)
    keep = identities[a] != identities[b]
    other = (unit[a[keep]] * unit[b[keep]]).sum(axis=1)
    return {
        "genuine_mean": float(same.mean()),
        "genuine_std": float(same.std()),
        "genuine_pairs": int(len(same)),
        "impostor_mean": float(other.mean()),
        "impostor_std": float(other.std()),
        "impostor_pairs": int(keep.sum()),
    }


def main() -> None:
    """Measure and write benchmarks/results/judge_scales.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judges", default="mobilefacenet,facenet", help="judge encoders, comma-separated")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--impostors", type=int, default=200_000, help="random impostor pairs drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    dataset = LFW(args.lfw_dir)
    identity_of = {item.id: item.identity for item in dataset}
    judges = {}
    for name in filter(None, args.judges.split(",")):
        judge = build_transfer_judge(name, dataset, DLIB_CHIP, seed=0, use_cache=True, models_dir=args.models_dir)
        ids = sorted(judge.index, key=judge.index.__getitem__)
        identities = np.array([identity_of[i] for i in ids])
        judges[name] = {
            "fmr_1e-3": judge.thresholds["1e-3"],
            "photos": len(ids),
            **pair_cosines(judge.embeddings, identities, args.impostors, args.seed),
        }
        print(name, {k: round(v, 3) for k, v in judges[name].items()}, flush=True)
    print(f"wrote {write_results('judge_scales', {'judges': judges}, args.out)}")


if __name__ == "__main__":
    main()
