"""Leave-one-out transfer of image protection: which dlib feature layer carries a dlib-only perturbation over.

The question: which layer makes a perturbation optimised on dlib alone fool MobileFaceNet, which it never sees.

Usage (what produced ``benchmarks/results/image_transfer.json``)::

    OMP_NUM_THREADS=2 python benchmarks/image_transfer.py --offset 200 --count 40

Each photo is protected with dlib-torch alone (MobileFaceNet never sees it) under every variant below, then
evaluated exactly as ``benchmarks/image_protection.py`` evaluates (face detected again, each encoder's standard
pipeline, match at each encoder's FMR 0.1% threshold, against the clean photo itself and the person's other photo).
The sample is the same seeded shuffle of LFW people as that benchmark; ``--offset 200`` takes people it does not
use, so the layer chosen here is checked on photos that played no part in choosing it.

Variants: ``embedding`` (descriptor cosine only, ``feature_weight`` 0: the method before the feature term),
``stage1`` / ``stage2`` / ``stage3`` (descriptor plus the output of dlib's first / second / third stage, weight 1;
``stage3`` is the default, ``DlibResNet.transfer_layers``), ``stage2+3`` (both).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.faces.pipeline import FacePolicy  # noqa: E402
from advface.images import load_image  # noqa: E402
from advface.paths import lfw_dir as resolve_lfw_dir  # noqa: E402
from advface.protect.image import ImageProtector, ProtectConfig  # noqa: E402
from advface.protect.image.quality import psnr  # noqa: E402
from benchmarks.common import add_budget_arguments, budget_from_args, write_results  # noqa: E402
from benchmarks.image_protection import Evaluator, sample_people, summarise, thresholds  # noqa: E402

#: Variant -> (feature_weight, dlib layers). Layer paths index ``DlibResNet.net`` (ReLU after a stage's last unit).
VARIANTS: dict[str, tuple[float, tuple[str, ...]]] = {
    "embedding": (0.0, ()),
    "stage1": (1.0, ("net.9",)),
    "stage2": (1.0, ("net.17",)),
    "stage3": (1.0, ("net.23",)),
    "stage2+3": (1.0, ("net.17", "net.23")),
}


def main() -> None:
    """Run the variants; write benchmarks/results/image_transfer.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--offset", type=int, default=200, help="skip this many people of the shuffled sample")
    parser.add_argument("--count", type=int, default=40, help="people (photos) to protect")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lfw-dir")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/image_transfer.json)")
    parser.add_argument("--shared-machine", action="store_true", help="record that other jobs shared the CPU")
    add_budget_arguments(parser)
    args = parser.parse_args()
    budget = budget_from_args(args, parser)

    root = resolve_lfw_dir(args.lfw_dir)
    people, _ = sample_people(root, args.seed)
    people = people[args.offset : args.offset + args.count]
    protector = ImageProtector(device="cpu", policy=FacePolicy.CENTER)
    if protector.encoder_names != ["dlib-torch", "mobilefacenet"]:
        raise SystemExit(f"needs dlib-torch and MobileFaceNet (set ADVFACE_MODELS_DIR); got {protector.encoder_names}")
    thr = thresholds(protector.encoder_names)
    evaluator = Evaluator(protector)
    surrogate = protector.subset(["dlib-torch"])
    module = surrogate.members[0].module
    rows: list[dict] = []
    from tqdm import tqdm

    start = time.perf_counter()
    for person, photo, other_photo in tqdm(people, desc="transfer", unit="photo"):
        clean = load_image(photo)
        other = evaluator.embed(load_image(other_photo))
        face = protector.find_face(clean, photo.name)
        ref = protector.embed_standard(clean, face)
        row: dict = {"person": person, "seconds": {}, "psnr": {}, "eval": {}}
        for variant in args.variants:
            weight, layers = VARIANTS[variant]
            module.transfer_layers = layers  # instance attribute: this benchmark's choice of layers
            t = time.perf_counter()
            out = surrogate.protect(
                [clean], ProtectConfig(seed=args.seed, feature_weight=weight, **budget), faces=[face]
            )[0][0]
            row["seconds"][variant] = time.perf_counter() - t
            row["psnr"][variant] = psnr(clean, out)
            row["eval"][variant] = evaluator.cells(out, ref, other)
        rows.append(row)
    del module.transfer_layers  # back to the class default

    summary = summarise(rows, protector.encoder_names, thr)
    for variant, entry in summary.items():
        entry.update(
            {
                "feature_weight": VARIANTS[variant][0],
                "dlib_layers": list(VARIANTS[variant][1]),
                "photos": len(rows),
                "psnr_mean": float(np.mean([r["psnr"][variant] for r in rows])),
                "seconds_mean": float(np.mean([r["seconds"][variant] for r in rows])),
            }
        )
        mfn, dlib = entry["mobilefacenet"], entry["dlib-torch"]
        print(
            f"{variant:10s} MobileFaceNet ISM {mfn['ism_mean']:.3f} match self {mfn['match_self']:.1%} "
            f"other {mfn['match_other']:.1%} | dlib match self {dlib['match_self']:.1%} "
            f"| PSNR {entry['psnr_mean']:.2f} dB | {entry['seconds_mean']:.1f} s",
            flush=True,
        )
    chosen = ProtectConfig(**budget)
    payload = {
        "protocol": (
            f"dlib-torch-only protection (60 steps, budget {budget['budget']} at {chosen.levels}/255, encoder weight "
            f"{chosen.effective_encoder_weight:g}, EOT, seed), evaluated as image_protection.py; "
            f"people {args.offset}..{args.offset + len(people) - 1} of the seeded LFW shuffle"
        ),
        "shared_machine": args.shared_machine,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "thresholds": thr,
        "results": summary,
        "per_photo": rows,
    }
    print("wrote", write_results("image_transfer", payload, Path(args.out) if args.out else None))


if __name__ == "__main__":
    main()
