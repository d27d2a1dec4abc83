"""LFW View-2 verification of face encoders: 10-fold accuracy (threshold fit on the other 9 folds) and TAR@FAR.

Usage::

    python benchmarks/lfw_verification.py --encoders dlib mobilefacenet --workers 2

Every photo of the 6000 pairs is detected, aligned to the encoder's chip and embedded (cached on disk, so reruns are
cheap). A photo where detection fails makes its pairs count as "different" (a rejection), which is the honest, strict
choice; the number of such photos and pairs is reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.datasets import LFW  # noqa: E402
from advface.datasets.cache import EmbeddingCache  # noqa: E402
from advface.encoders import create_encoder_with_models  # noqa: E402
from advface.image_embedder import ImageEmbedder  # noqa: E402
from benchmarks.common import view2_verification, write_results  # noqa: E402

DEFAULT_DETECTORS = {"dlib": "dlib", "dlib-torch": "dlib"}


def evaluate(encoder_spec: str, detector: str, lfw: LFW, args: argparse.Namespace) -> dict:
    """Embed the pair photos with one encoder and compute the verification metrics."""
    encoder = create_encoder_with_models(encoder_spec, args.models_dir)
    pairs = lfw.pairs()
    photos = sorted({p.a for p in pairs} | {p.b for p in pairs})
    cache = EmbeddingCache(args.cache) if not args.no_cache else None
    embedder = ImageEmbedder(encoder, detector, args.policy, cache=cache, workers=args.workers)
    start = time.perf_counter()
    result = embedder.embed_files([(lfw.path(p), p) for p in photos])
    seconds = time.perf_counter() - start
    embeddings = dict(zip(result.ids, result.embeddings))
    return {
        "encoder": encoder.name,
        "encoder_spec": encoder_spec,
        "fingerprint": encoder.fingerprint,
        "detector": detector,
        "face_policy": args.policy,
        "metric": encoder.metric,
        "pairs": len(pairs),
        "photos": len(photos),
        "failed_photos": len(result.failed),
        "failed_reasons": sorted(set(result.failed.values())),
        **view2_verification(encoder, pairs, embeddings, embeddings),
        "embed_seconds": round(seconds, 1),
    }


def main() -> None:
    """Run the benchmark and write benchmarks/results/lfw_verification.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoders", nargs="+", default=["dlib", "mobilefacenet"])
    parser.add_argument(
        "--detector",
        action="append",
        default=[],
        metavar="ENCODER=DETECTOR",
        help="detector per encoder (default: dlib for dlib encoders, scrfd for ONNX encoders)",
    )
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--workers", type=int, default=2, help="detection processes")
    parser.add_argument(
        "--policy",
        default="center",
        help="which face of a photo with several (default center: LFW's subject is centred)",
    )
    parser.add_argument("--cache", help="embedding cache folder (default $ADVFACE_CACHE_DIR or ~/.cache/advface)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/lfw_verification.json)")
    args = parser.parse_args()
    detectors = dict(DEFAULT_DETECTORS)
    for item in args.detector:
        name, _, det = item.partition("=")
        detectors[name] = det
    lfw = LFW(args.lfw_dir)
    results = {}
    for spec in args.encoders:
        detector = detectors.get(spec, "scrfd")
        if detector == "scrfd" and args.models_dir:
            detector = f"scrfd:{Path(args.models_dir) / 'scrfd_2.5g_bnkps.onnx'}"
        res = evaluate(spec, detector, lfw, args)
        results[spec] = res
        print(
            f"{spec}: accuracy {100 * res['accuracy_mean']:.2f} +- {100 * res['accuracy_std']:.2f}%, "
            f"TAR@FAR=1e-3 {100 * res['tar_at_far_1e-3']:.2f}%, failed photos {res['failed_photos']}",
            flush=True,
        )
    print(
        "wrote",
        write_results("lfw_verification", {"protocol": "LFW View-2, 10 folds x 600 pairs", **results}, args.out),
    )


if __name__ == "__main__":
    main()
