"""Large photos: detection on a downscaled copy (``DlibDetector(max_side=1600)``, the default) against detection on
the full image (``max_side=None``, the pipeline before issue #19), on LFW View-2 pairs upscaled ``--scale`` times.

Usage::

    python benchmarks/large_photos.py --pairs 100 --scale 8

LFW photos are 250 x 250, under the 1600 px that triggers downscaling, so each photo of the chosen pairs (``--pairs``
spread evenly over the 6000, about half of them same-person pairs) is upscaled (bicubic) to ``250 * scale`` px and
encoded as a JPEG (quality 95), as a client would send it. Each photo then goes through the sidecar's pipeline
(decode, detect, pick the face by ``--policy``, align from the full-resolution image, embed; dlib encoder) three
ways:

- ``original``: the 250 x 250 LFW JPEG (the reference);
- ``full``: the upscaled JPEG, detection on the full image (before);
- ``downscaled``: the upscaled JPEG, detection on a copy downscaled to 1600 px on the long side (after).

Reported per way: seconds per photo (median, mean, p95; decoding and detection apart), faces found, verification
accuracy over the pairs at the encoder's published threshold (dlib: distance 0.6) and at the best threshold for
these pairs; and the agreement of the embeddings (cosine and Euclidean distance, per photo) of ``downscaled`` with
``full`` and of both with ``original``. One process, one thread, photos one after the other; the machine's load
average is recorded (other jobs slow the timings, not the embeddings).

``--large-photos N`` (default 3) more photos are upscaled ``--large-scale`` times (default 24: 6000 x 6000, the size
of the issue's finding) and run ``full`` and ``downscaled`` each in a fresh process, to report time per photo and the
process's peak RSS above what it held before the first photo.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.datasets import LFW  # noqa: E402
from advface.encoders import create_encoder  # noqa: E402
from advface.errors import ImageError  # noqa: E402
from advface.faces import DlibDetector, FaceChipper, align_face  # noqa: E402
from advface.faces.detect import DETECT_MAX_SIDE  # noqa: E402
from advface.images import load_image  # noqa: E402
from advface.metrics import best_threshold  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

WAYS = ("original", "full", "downscaled")


def upscaled_jpeg(path: Path, scale: int) -> bytes:
    """The photo at ``path`` upscaled ``scale`` times (bicubic), as JPEG bytes (quality 95)."""
    image = Image.open(path).convert("RGB")
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def embed(data: bytes, chipper: FaceChipper, encoder: Any) -> tuple[np.ndarray | None, dict[str, float]]:
    """The sidecar's pipeline on one photo: its embedding (None: no face) and the seconds of each stage."""
    t0 = time.perf_counter()
    image = load_image(data, max_pixels=80_000_000)
    t1 = time.perf_counter()
    try:
        face = chipper.select(image, "photo")[0]
    except ImageError:
        return None, {"decode": t1 - t0, "detect": time.perf_counter() - t1, "embed": 0.0}
    t2 = time.perf_counter()
    vector = encoder.embed(align_face(image, face, encoder.chip))[0]
    t3 = time.perf_counter()
    return np.asarray(vector, np.float64), {"decode": t1 - t0, "detect": t2 - t1, "embed": t3 - t2}


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``: peak RSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def large_run(way: str, warm_up: bytes, data: list[bytes], policy: str) -> dict[str, Any]:
    """In a fresh process: ``full`` or ``downscaled`` on the photos ``data``; seconds per photo, embeddings, the RSS
    after loading the models and embedding ``warm_up``, and the peak RSS above it while the photos ran (MiB)."""
    encoder = create_encoder("dlib")
    chipper = FaceChipper(DlibDetector(max_side=None if way == "full" else DETECT_MAX_SIDE), encoder.chip, policy)
    embed(warm_up, chipper, encoder)  # loads the landmark models
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    base = _status_mb("VmRSS")
    vectors, times = [], []
    for photo in data:
        vector, seconds = embed(photo, chipper, encoder)
        vectors.append(vector)
        times.append(seconds)
    peak = _status_mb("VmHWM")
    return {"times": times, "vectors": vectors, "rss_before_mb": round(base), "rss_growth_mb": round(peak - base)}


def _seconds(times: list[dict[str, float]]) -> dict[str, Any]:
    total = np.array([sum(t.values()) for t in times])
    return {
        "median": round(float(np.median(total)), 3),
        "mean": round(float(total.mean()), 3),
        "p95": round(float(np.percentile(total, 95)), 3),
        "decode_mean": round(float(np.mean([t["decode"] for t in times])), 3),
        "detect_mean": round(float(np.mean([t["detect"] for t in times])), 3),
        "embed_mean": round(float(np.mean([t["embed"] for t in times])), 4),
    }


def verification(pairs: list[Any], vectors: dict[str, np.ndarray | None], encoder: Any) -> dict[str, Any]:
    """Accuracy over ``pairs`` at the encoder's published threshold and at the best one (a pair with a photo
    without a face counts as rejected)."""
    scores = []
    for pair in pairs:
        a, b = vectors[pair.a], vectors[pair.b]
        scores.append(-np.inf if a is None or b is None else float(encoder.score(a[None], b[None])[0]))
    s = np.array(scores)
    same = np.array([p.same for p in pairs])
    finite = np.isfinite(s)
    s[~finite] = s[finite].min() - 1.0
    out: dict[str, Any] = {"pairs": len(pairs), "same_pairs": int(same.sum())}
    if encoder.default_threshold is not None:
        out["threshold"] = float(encoder.default_threshold)
        out["accuracy"] = round(float(((s >= encoder.default_threshold) == same).mean()), 4)
    best = best_threshold(s, same)
    out["best_threshold"] = round(float(best), 4)
    out["best_accuracy"] = round(float(((s >= best) == same).mean()), 4)
    return out


def agreement(x: dict[str, np.ndarray | None], y: dict[str, np.ndarray | None]) -> dict[str, Any]:
    """Per-photo cosine and Euclidean distance of two ways' embeddings (photos with a face both ways), and the three
    photos of lowest cosine."""
    ids = [k for k in x if x[k] is not None and y.get(k) is not None]
    a = np.stack([x[k] for k in ids])  # type: ignore[misc]
    b = np.stack([y[k] for k in ids])  # type: ignore[misc]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    dist = np.linalg.norm(a - b, axis=1)
    worst = np.argsort(cos)[:3]
    return {
        "photos": len(ids),
        "worst": {ids[i]: round(float(cos[i]), 5) for i in worst},
        "cosine_mean": round(float(cos.mean()), 5),
        "cosine_min": round(float(cos.min()), 5),
        "cosine_p5": round(float(np.percentile(cos, 5)), 5),
        "distance_mean": round(float(dist.mean()), 4),
        "distance_max": round(float(dist.max()), 4),
    }


def main() -> None:
    """Run the benchmark and write benchmarks/results/large_photos.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100, help="View-2 pairs, spread evenly over the 6000")
    parser.add_argument("--scale", type=int, default=8, help="upscaling factor of the 250 x 250 photos")
    parser.add_argument("--policy", default="center", help="which face of a photo with several (LFW: centred)")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--large-photos", type=int, default=3, help="photos of the timing and memory run")
    parser.add_argument("--large-scale", type=int, default=24, help="their upscaling factor (24: 6000 x 6000)")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/large_photos.json)")
    args = parser.parse_args()
    if 250 * args.scale <= DETECT_MAX_SIDE:
        parser.error(f"--scale {args.scale}: {250 * args.scale} px is not over {DETECT_MAX_SIDE}, nothing downscaled")

    lfw = LFW(args.lfw_dir)
    every = lfw.pairs()
    pairs = [every[i * len(every) // args.pairs] for i in range(args.pairs)]
    photos = sorted({p.a for p in pairs} | {p.b for p in pairs})
    encoder = create_encoder("dlib")
    chippers = {
        "original": FaceChipper(DlibDetector(), encoder.chip, args.policy),
        "full": FaceChipper(DlibDetector(max_side=None), encoder.chip, args.policy),
        "downscaled": FaceChipper(DlibDetector(), encoder.chip, args.policy),
    }
    load_before = os.getloadavg()
    vectors: dict[str, dict[str, np.ndarray | None]] = {way: {} for way in WAYS}
    times: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    started = time.perf_counter()
    for n, photo in enumerate(photos, start=1):
        small = lfw.path(photo).read_bytes()
        big = upscaled_jpeg(lfw.path(photo), args.scale)
        for way in WAYS:
            vectors[way][photo], seconds = embed(small if way == "original" else big, chippers[way], encoder)
            times[way].append(seconds)
        if n % 20 == 0 or n == len(photos):
            print(f"{n}/{len(photos)} photos, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    size = 250 * args.scale
    result = {
        "photos": len(photos),
        "photo_size": f"{size}x{size} JPEG q95 (LFW 250x250 upscaled {args.scale}x, bicubic)",
        "detector": f"dlib HOG, upsample 1; downscaled: max_side {DETECT_MAX_SIDE}",
        "encoder": encoder.name,
        "policy": args.policy,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "seconds_per_photo": {way: _seconds(times[way]) for way in WAYS},
        "faces_found": {way: sum(v is not None for v in vectors[way].values()) for way in WAYS},
        "verification": {way: verification(pairs, vectors[way], encoder) for way in WAYS},
        "agreement": {
            "downscaled_vs_full": agreement(vectors["downscaled"], vectors["full"]),
            "downscaled_vs_original": agreement(vectors["downscaled"], vectors["original"]),
            "full_vs_original": agreement(vectors["full"], vectors["original"]),
        },
    }
    if args.large_photos:
        files = [str(lfw.path(p)) for p in photos[:: max(1, len(photos) // args.large_photos)][: args.large_photos]]
        large: dict[str, Any] = {"photos": len(files), "photo_size": f"{250 * args.large_scale} px square JPEG q95"}
        runs = {}
        context = multiprocessing.get_context("spawn")
        data = [upscaled_jpeg(Path(f), args.large_scale) for f in files]
        warm_up = Path(files[0]).read_bytes()
        for way in ("downscaled", "full"):
            with context.Pool(1) as pool:
                runs[way] = pool.apply(large_run, (way, warm_up, data, args.policy))
            large[way] = {
                "seconds_per_photo": _seconds(runs[way]["times"]),
                "rss_before_mb": runs[way]["rss_before_mb"],
                "rss_growth_mb": runs[way]["rss_growth_mb"],
            }
            print(f"large {way}: {large[way]}", file=sys.stderr, flush=True)
        ids = [str(Path(f).relative_to(lfw.root)) for f in files]
        large["agreement_downscaled_vs_full"] = agreement(
            dict(zip(ids, runs["downscaled"]["vectors"])), dict(zip(ids, runs["full"]["vectors"]))
        )
        result["large"] = large
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    path = write_results("large_photos", result, args.out)
    print(path)
    for key in ("seconds_per_photo", "faces_found", "verification", "agreement", "large"):
        print(key, result.get(key))


if __name__ == "__main__":
    main()
