"""Throughput of the face pipeline on CPU: detect+align+embed (images/s) and embedding alone per encoder.

Usage::

    python benchmarks/throughput.py --images 256 --batch-size 64

Embedding alone is measured on chips prepared beforehand (dlib 150x150 chips for the dlib encoders, ArcFace
112x112 chips for ONNX ones), so it times the encoder and nothing else. Each timing is the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.datasets import LFW  # noqa: E402
from advface.encoders import ChipSpec, create_encoder  # noqa: E402
from advface.faces import FaceChipper, FacePolicy, create_detector  # noqa: E402
from advface.image_embedder import ImageEmbedder  # noqa: E402
from advface.images import load_image  # noqa: E402
from benchmarks.common import write_results  # noqa: E402


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_chips(paths: list[Path], detector: str, chip: ChipSpec) -> np.ndarray:
    """Aligned chips of the photos where a face is found."""
    chipper = FaceChipper(create_detector(detector), chip, FacePolicy("largest"))
    chips = []
    for path in paths:
        try:
            chips.append(chipper.chips(load_image(path), str(path))[0][1])
        except Exception:  # noqa: BLE001 - a photo without a face is simply not used here
            continue
    return np.stack(chips)


def main() -> None:
    """Run the throughput benchmark and write benchmarks/results/throughput.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lfw-dir")
    parser.add_argument("--models-dir")
    parser.add_argument("--out")
    args = parser.parse_args()

    lfw = LFW(args.lfw_dir)
    paths = [item.path for item in lfw.items[:: max(1, len(lfw) // args.images)]][: args.images]
    files = [(p, str(p)) for p in paths]
    results: dict[str, dict] = {"images": len(paths), "batch_size": args.batch_size}

    pipeline = {}
    for spec in ("dlib", "dlib-torch"):
        for workers in (1, 2):
            embedder = ImageEmbedder(create_encoder(spec), "dlib", "largest", workers=workers)
            seconds = best_time(lambda embedder=embedder: embedder.embed_files(files, progress=False), 1)
            pipeline[f"{spec}_detect_align_embed_workers{workers}"] = round(len(files) / seconds, 2)
            print(f"detect+align+embed ({spec}, {workers} worker(s)): {len(files) / seconds:.1f} images/s", flush=True)
    results["pipeline_images_per_s"] = pipeline

    dlib_chips = make_chips(paths, "dlib", create_encoder("dlib").chip)
    embedding: dict[str, dict] = {}
    encoders = [
        ("dlib", {}),
        ("dlib-torch", {"batch_size": args.batch_size}),
        ("mobilefacenet", {"models_dir": args.models_dir} if args.models_dir else {}),
    ]
    for spec, params in encoders:
        try:
            encoder = create_encoder(spec, **params)
        except Exception as exc:  # noqa: BLE001 - e.g. no models folder configured
            print(f"skipping {spec}: {exc}")
            continue
        chips = dlib_chips if encoder.chip.kind == "dlib" else make_chips(paths, "dlib", encoder.chip)
        encoder.embed(chips[:2])  # warm up
        seconds = best_time(lambda encoder=encoder, chips=chips: encoder.embed(chips), args.repeats)
        embedding[encoder.name] = {
            "chips": len(chips),
            "images_per_s": round(len(chips) / seconds, 2),
            "ms_per_image": round(1000 * seconds / len(chips), 2),
        }
        print(f"embed only ({encoder.name}): {len(chips) / seconds:.1f} chips/s", flush=True)
        module = encoder.torch_module() if spec == "mobilefacenet" else None
        if module is not None:
            import torch

            x = torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255.0

            def run_torch(module=module, x=x) -> None:  # noqa: ANN001 - bound now, not at call time
                with torch.inference_mode():
                    for start in range(0, len(x), args.batch_size):
                        module(x[start : start + args.batch_size])

            seconds = best_time(run_torch, args.repeats)
            embedding[f"{encoder.name} (torch)"] = {
                "chips": len(chips),
                "images_per_s": round(len(chips) / seconds, 2),
                "ms_per_image": round(1000 * seconds / len(chips), 2),
            }
    results["embedding_only"] = embedding
    print("wrote", write_results("throughput", results, args.out))


if __name__ == "__main__":
    main()
