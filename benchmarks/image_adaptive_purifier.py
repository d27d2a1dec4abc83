"""Adaptive purification of protected photos: a thief who owns advface learns to undo protect-image.

Usage (what produced ``benchmarks/results/image_adaptive_purifier.json``)::

    OMP_NUM_THREADS=2 python benchmarks/image_adaptive_purifier.py --train-count 60 --victims 40

The thief protects photos of people of his own with ``protect-image``'s defaults (he has the tool, not the victims'
clean photos) and trains the DnCNN of ``advface.protect.image.denoiser`` on (protected, clean) patches
(:func:`~advface.protect.image.denoiser.train_pair_denoiser`), then runs it on the victims' protected photos before
extracting their identity. AntiPure's concern, at its strongest cheap form: a purifier trained on the protection
itself rather than on generic noise.

Sample: the seeded LFW shuffle of ``benchmarks/image_protection.py``. Victims are its first ``--victims`` people (the
same photos as that benchmark's first rows); the thief's people start at ``--train-offset`` (default 240, past the
200 of that benchmark and the 40 of ``benchmarks/image_transfer.py``), so no person is on both sides. Evaluation as in
that benchmark: face detected again, each encoder's standard pipeline, match at its FMR 0.1% threshold against the
clean photo itself (``match_self``) and the person's other photo (``match_other``). Protected photos are cached as PNG
under ``benchmarks/results/local/`` (not committed: LFW photos are not redistributed), so a rerun protects nothing
again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.faces.pipeline import FacePolicy  # noqa: E402
from advface.images import load_image  # noqa: E402
from advface.paths import lfw_dir as resolve_lfw_dir  # noqa: E402
from advface.protect.image import ImageProtector, ProtectConfig  # noqa: E402
from advface.protect.image.denoiser import DenoiserConfig, denoise, train_pair_denoiser  # noqa: E402
from advface.protect.image.io import save_png  # noqa: E402
from advface.protect.image.quality import psnr  # noqa: E402
from benchmarks.common import RESULTS_DIR, add_budget_arguments, budget_from_args, budget_tag, write_results  # noqa: E402
from benchmarks.image_protection import Evaluator, sample_people, summarise, thresholds  # noqa: E402


def protected_photo(protector: ImageProtector, config: ProtectConfig, photo: Path, cache: Path) -> np.ndarray:
    """``photo`` protected with ``config`` (read from ``cache`` when an earlier run wrote it)."""
    path = cache / f"{photo.stem}.png"
    if path.is_file():
        return np.asarray(Image.open(path).convert("RGB"))
    out = protector.protect([load_image(photo)], config, [photo.name])[0][0]
    save_png(out, path)
    return out


def main() -> None:
    """Protect, train the thief's purifier, evaluate; write benchmarks/results/image_adaptive_purifier.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-offset", type=int, default=240, help="first person of the thief's photos")
    parser.add_argument("--train-count", type=int, default=60, help="people whose protected photos train the purifier")
    parser.add_argument("--victims", type=int, default=40, help="victims: the first people of the shuffled sample")
    parser.add_argument("--steps", type=int, default=1500, help="purifier training steps")
    parser.add_argument("--patch", type=int, default=64, help="training patch size (pixels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lfw-dir")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/image_adaptive_purifier.json)")
    parser.add_argument("--shared-machine", action="store_true", help="record that other jobs shared the CPU")
    add_budget_arguments(parser)
    args = parser.parse_args()
    budget = budget_from_args(args, parser)
    if args.train_offset < args.victims:
        raise SystemExit("--train-offset must be >= --victims: thief and victims must be different people")

    root = resolve_lfw_dir(args.lfw_dir)
    people, _ = sample_people(root, args.seed)
    victims = people[: args.victims]
    thief_people = people[args.train_offset : args.train_offset + args.train_count]
    protector = ImageProtector(device="cpu", policy=FacePolicy.CENTER)
    encoders = protector.encoder_names
    thr = thresholds(encoders)
    evaluator = Evaluator(protector)
    config = ProtectConfig(seed=args.seed, **budget)
    cache = (
        RESULTS_DIR
        / "local"
        / "adaptive_purifier"
        / (
            f"l{config.levels}{budget_tag(config)}-s{config.steps}-fw{config.feature_weight:g}-seed{args.seed}-{'-'.join(encoders)}"
        )
    )
    from tqdm import tqdm

    start = time.perf_counter()
    pairs = [
        (protected_photo(protector, config, photo, cache), load_image(photo))
        for _, photo, _ in tqdm(thief_people, desc="thief protects", unit="photo")
    ]
    purifier_cfg = DenoiserConfig(steps=args.steps, patch=args.patch, seed=args.seed)
    model, info = train_pair_denoiser(pairs, purifier_cfg)
    print(f"adaptive purifier trained: {info}", flush=True)

    rows = []
    quality: dict[str, list[float]] = {"protected": [], "protected+adaptive": [], "clean+adaptive": []}
    for person, photo, other_photo in tqdm(victims, desc="victims", unit="photo"):
        clean = load_image(photo)
        face = protector.find_face(clean, photo.name)
        ref = protector.embed_standard(clean, face)
        other = evaluator.embed(load_image(other_photo))
        protected = protected_photo(protector, config, photo, cache)
        images = {
            "protected": protected,
            "protected+adaptive": denoise(model, protected),
            "clean+adaptive": denoise(model, clean),
        }
        evals = {}
        for cond, img in images.items():
            quality[cond].append(psnr(clean, img))
            evals[cond] = evaluator.cells(img, ref, other)
        rows.append({"person": person, "photo": photo.name, "eval": evals})

    results = summarise(rows, encoders, thr)
    for cond, per_encoder in results.items():
        print(
            cond,
            {
                enc: {k: round(v, 3) for k, v in cell.items() if isinstance(v, float)}
                for enc, cell in per_encoder.items()
            },
            flush=True,
        )
    payload = {
        "protocol": (
            "thief: protect-image defaults on the first photo of people "
            f"{args.train_offset}..{args.train_offset + len(thief_people) - 1} of the seeded LFW shuffle, "
            "DnCNN trained on (protected, clean) patches; victims: people 0.."
            f"{len(victims) - 1}, protected with the same defaults, purified, evaluated as "
            "image_protection.py"
        ),
        "shared_machine": args.shared_machine,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "protection": {
            "budget": config.budget,
            "epsilon_levels": config.levels,
            **({"encoder_weight": config.encoder_weight} if config.encoder_weight is not None else {}),
            "steps": config.steps,
            "feature_weight": config.feature_weight,
            "encoders": encoders,
            "seed": args.seed,
        },
        "purifier": {**info, "config": vars(purifier_cfg)},
        "thresholds": thr,
        "psnr_vs_clean_mean": {cond: float(np.mean(v)) for cond, v in quality.items()},
        "results": results,
        "per_photo": rows,
    }
    print("wrote", write_results("image_adaptive_purifier", payload, Path(args.out) if args.out else None))


if __name__ == "__main__":
    main()
