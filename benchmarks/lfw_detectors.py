"""Face detectors compared on LFW View-2 with one encoder: accuracy, TAR@FAR, photos without a face, detection cost.

Usage::

    python benchmarks/lfw_detectors.py --encoder dlib --detectors dlib dlib:upsample=0 dlib-mmod dlib:upsample=2

Each detector runs the whole View-2 protocol of ``benchmarks/lfw_verification.py`` (every pair photo detected,
aligned and embedded, cached on disk per detector; a photo without a face rejects its pairs). Detection cost is timed
apart, on one thread, on the first ``--time-photos`` pair photos (sorted by name), detection only. The JSON is
written after every detector, so a long run can be stopped and resumed (``--reuse`` keeps the detectors already in
the output file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.datasets import LFW  # noqa: E402
from advface.faces import create_detector  # noqa: E402
from advface.images import load_image  # noqa: E402
from benchmarks.common import RESULTS_DIR, write_results  # noqa: E402
from benchmarks.lfw_verification import evaluate  # noqa: E402


def detection_seconds(detector_spec: str, files: list[Path]) -> dict[str, float]:
    """Mean and worst seconds per photo of detection alone (this process, its thread settings)."""
    detector = create_detector(detector_spec)
    images = [load_image(path) for path in files]
    detector.detect(images[0])  # load the landmark models outside the timing
    times = []
    for image in images:
        start = time.perf_counter()
        detector.detect(image)
        times.append(time.perf_counter() - start)
    return {"photos": len(times), "mean": sum(times) / len(times), "max": max(times)}


def main() -> None:
    """Run every detector and write benchmarks/results/lfw_detectors.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="dlib")
    parser.add_argument("--detectors", nargs="+", default=["dlib", "dlib:upsample=0", "dlib-mmod", "dlib:upsample=2"])
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--workers", type=int, default=1, help="detection processes for the View-2 runs")
    parser.add_argument("--policy", default="center", help="which face of a photo with several (default center)")
    parser.add_argument("--cache", help="embedding cache folder (default $ADVFACE_CACHE_DIR or ~/.cache/advface)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--time-photos", type=int, default=100, help="photos timed per detector (detection only)")
    parser.add_argument("--reuse", action="store_true", help="keep detectors already in the output file")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/lfw_detectors.json)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else RESULTS_DIR / "lfw_detectors.json"
    done: dict = json.loads(out.read_text()).get("detectors", {}) if args.reuse and out.is_file() else {}
    lfw = LFW(args.lfw_dir)
    pairs = lfw.pairs()
    timed = [lfw.path(p) for p in sorted({p.a for p in pairs} | {p.b for p in pairs})[: args.time_photos]]
    results = dict(done)
    for spec in args.detectors:
        if spec in results:
            continue
        res = evaluate(args.encoder, spec, lfw, args)
        res["detect_seconds_per_photo"] = detection_seconds(spec, timed)
        results[spec] = res
        print(
            f"{spec}: accuracy {100 * res['accuracy_mean']:.2f} +- {100 * res['accuracy_std']:.2f}%, "
            f"TAR@FAR=1e-3 {100 * res['tar_at_far_1e-3']:.2f}%, failed photos {res['failed_photos']}, "
            f"detection {res['detect_seconds_per_photo']['mean']:.3f} s/photo",
            flush=True,
        )
        payload = {"protocol": "LFW View-2, 10 folds x 600 pairs", "encoder": args.encoder, "detectors": results}
        write_results("lfw_detectors", payload, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
