"""Embed face photos: images or folders in, an embeddings file (.npz with ``ids`` and ``embeddings``) out.

Files given directly keep the id they were given as; files found in a folder get their path relative to that folder.
Files without a usable face are reported (stderr and the file's ``failed_ids``/``failed_reasons``) and skipped.
The output holds RAW embeddings: keep it private, or protect it with advface before storing it.
"""

from __future__ import annotations

import argparse
import sys

from advface.datasets.cache import EmbeddingCache
from advface.embeddings_file import save_embeddings
from advface.encoders import create_encoder_with_models
from advface.errors import AdvfaceError
from advface.image_embedder import ImageEmbedder
from advface.images import iter_image_files

NAME = "embed"
HELP = "images or folders -> embeddings file (.npz)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface embed``."""
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--out", "-o", required=True, help="output .npz file")
    parser.add_argument(
        "--encoder",
        default="dlib",
        help="encoder: dlib (default), dlib-torch, mobilefacenet, onnx:/path/to/model.onnx",
    )
    parser.add_argument(
        "--detector",
        default="dlib",
        help="face detector: dlib (HOG, default), dlib-mmod (CNN), either with :upsample=N, scrfd (from --models-dir), "
        "scrfd:/path/to/model.onnx",
    )
    parser.add_argument(
        "--policy",
        default="largest",
        choices=["largest", "best-score", "center", "all", "single"],
        help="several faces in a photo: embed the largest (default), the most confident, the one nearest the "
        "image centre, all (ids get #k), or fail the photo (single)",
    )
    parser.add_argument("--models-dir", help="folder of ONNX models (default: $ADVFACE_MODELS_DIR)")
    parser.add_argument("--batch-size", type=int, default=64, help="chips per encoder batch (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="processes for detection/alignment (default 1)")
    parser.add_argument(
        "--cache",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="reuse/store embeddings in an on-disk cache (DIR, default $ADVFACE_CACHE_DIR or ~/.cache/advface); "
        "for public datasets only",
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any file fails")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Execute ``advface embed``."""
    if args.batch_size < 1 or args.workers < 1:
        raise AdvfaceError("--batch-size and --workers must be >= 1")
    detector = args.detector
    if detector == "scrfd" and args.models_dir:
        detector = f"scrfd:{args.models_dir.rstrip('/')}/scrfd_2.5g_bnkps.onnx"
    files = list(dict((image_id, (path, image_id)) for path, image_id in iter_image_files(args.paths)).values())
    if not files:
        raise AdvfaceError("no image files found in the given paths")
    encoder = create_encoder_with_models(args.encoder, args.models_dir)
    cache = EmbeddingCache(args.cache or None) if args.cache is not None else None
    embedder = ImageEmbedder(
        encoder, detector, args.policy, cache=cache, batch_size=args.batch_size, workers=args.workers
    )
    result = embedder.embed_files(files, progress=not args.quiet)
    out = save_embeddings(args.out, result)
    for image_id, reason in result.failed.items():
        print(f"skipped {image_id}: {reason}", file=sys.stderr)
    print(
        f"wrote {len(result.ids)} embeddings (dim {encoder.dim}, encoder {encoder.name}) to {out}; "
        f"{len(result.failed)} of {len(files)} files failed",
        file=sys.stderr,
    )
    if not result.ids:
        return 1
    return 1 if args.strict and result.failed else 0
