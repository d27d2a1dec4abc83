"""Image-level protection on LFW: identity similarity and verification match rates against each encoder.

Usage (what produced ``benchmarks/results/image_protection.json``)::

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/image_protection.py --count 200 --max-minutes 25

Sample: people of LFW with two or more photos, shuffled with ``--seed``, one person per row (identity-disjoint): the
first photo is protected, the second is the reference "other photo of the same person". For every photo the
benchmark protects it (a) with the full ensemble (white-box for each member), (b) with each encoder alone, which
is the leave-one-out transfer setting for the other encoders, and evaluates the protected photo (c) after each
purification (JPEG 75/50, Gaussian blur, resize down-up, median, OpenCV non-local means, and a small DnCNN denoiser
trained here on LFW people outside the sample). Evaluation is each encoder's standard pipeline (dlib detector run
again on the image being evaluated, the encoder's alignment, non-differentiable), so nothing is assumed about the
face box.

Metrics per encoder and condition: ISM (cosine of clean vs evaluated embedding of the same photo); match rate
against the clean photo itself (``match_self``) and against the person's other, clean photo (``match_other``), at the
encoder's threshold at FMR 0.1% on clean LFW View-2 pairs (``benchmarks/results/lfw_verification.json``); photos where
no face is found count as not matched (and are counted). The photos run are limited by ``--count`` and by
``--max-minutes`` of wall time: the JSON records how many were run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.errors import ImageError  # noqa: E402
from advface.faces.pipeline import FacePolicy  # noqa: E402
from advface.images import load_image  # noqa: E402
from advface.paths import lfw_dir as resolve_lfw_dir  # noqa: E402
from advface.protect.image import ImageProtector, ProtectConfig  # noqa: E402
from advface.protect.image.denoiser import DenoiserConfig, denoise, load_or_train_denoiser  # noqa: E402
from advface.protect.image.purify import standard_purifications  # noqa: E402
from advface.protect.image.quality import psnr, ssim  # noqa: E402
from benchmarks.common import RESULTS_DIR, add_budget_arguments, budget_from_args, budget_tag, write_results  # noqa: E402

VERIFICATION_JSON = RESULTS_DIR / "lfw_verification.json"


def sample_people(root: Path, seed: int) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Shuffled ``(person, photo to protect, other photo)`` for people with >= 2 photos, and the one-photo people."""
    multi, single = [], []
    for person in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
        photos = sorted(person.glob("*.jpg"))
        if len(photos) >= 2:
            multi.append((person.name, photos[0], photos[1]))
        else:
            single.append(person.name)
    order = np.random.default_rng(seed).permutation(len(multi))
    return [multi[i] for i in order], single


def thresholds(names: list[str]) -> dict[str, dict]:
    """Each encoder's View-2 threshold at FAR 1e-3 from the committed verification results."""
    data = json.loads(VERIFICATION_JSON.read_text())
    out = {}
    for name in names:
        entry = data.get(name)
        if entry is None:
            raise SystemExit(f"{VERIFICATION_JSON} has no entry for {name}; run benchmarks/lfw_verification.py")
        out[name] = {
            "threshold": entry["threshold_at_far_1e-3"],
            "detector": entry["detector"],
            "tar_at_far_1e-3": entry["tar_at_far_1e-3"],
        }
    return out


class Evaluator:
    """Detects the face again on each image and embeds it with every encoder's standard pipeline."""

    def __init__(self, protector: ImageProtector) -> None:
        self.protector = protector

    def embed(self, image: np.ndarray) -> dict[str, np.ndarray] | None:
        try:
            face = self.protector.find_face(image)
        except ImageError:
            return None
        return self.protector.embed_standard(image, face)

    def cells(
        self, image: np.ndarray, ref: dict[str, np.ndarray], other: dict[str, np.ndarray] | None
    ) -> dict[str, dict | None]:
        """Per encoder: ISM against ``ref`` (the clean photo's embeddings) and the native scores against ``ref``
        (``score_self``) and the other photo (``score_other``); None where no face is found in ``image``."""
        emb = self.embed(image)
        out: dict[str, dict | None] = {}
        for m in self.protector.members:
            if emb is None:
                out[m.name] = None
                continue
            e, r = emb[m.name], ref[m.name]
            out[m.name] = {
                "ism": float(np.dot(e, r) / (np.linalg.norm(e) * np.linalg.norm(r))),
                "score_self": float(m.encoder.score(r, e)[0]),
                "score_other": None if other is None else float(m.encoder.score(other[m.name], e)[0]),
            }
        return out


def summarise(rows: list[dict], encoders: list[str], thr: dict[str, dict]) -> dict[str, dict]:
    """Per condition and encoder: mean/median ISM, match rates, faces not found."""
    conditions = list(rows[0]["eval"]) if rows else []
    out: dict[str, dict] = {}
    for cond in conditions:
        out[cond] = {}
        for enc in encoders:
            cells = [r["eval"][cond][enc] for r in rows]
            found = [c for c in cells if c is not None]
            ism = [c["ism"] for c in found]
            t = thr[enc]["threshold"]
            out[cond][enc] = {
                "n": len(cells),
                "no_face": len(cells) - len(found),
                "ism_mean": float(np.mean(ism)) if ism else None,
                "ism_median": float(np.median(ism)) if ism else None,
                "match_self": float(np.mean([c is not None and c["score_self"] >= t for c in cells])),
                "match_other": float(
                    np.mean([c is not None and c["score_other"] is not None and c["score_other"] >= t for c in cells])
                ),
            }
    return out


def grid_png(examples: list[tuple[np.ndarray, np.ndarray]], path: Path, crop: int = 170, amplify: float = 10.0) -> None:
    """Rows of clean / protected / amplified difference (centre ``crop`` px of each photo)."""
    from PIL import Image

    rows = []
    for clean, protected in examples:
        h, w = clean.shape[:2]
        y, x = (h - crop) // 2, (w - crop) // 2
        c, p = clean[y : y + crop, x : x + crop], protected[y : y + crop, x : x + crop]
        diff = np.clip((p.astype(np.int16) - c.astype(np.int16)) * amplify + 128, 0, 255).astype(np.uint8)
        rows.append(np.hstack([c, p, diff]))
    Image.fromarray(np.vstack(rows)).save(path, optimize=True)


def _load_rows(path: Path) -> dict[str, dict]:
    """Per-photo rows of an earlier run (by person); a torn last line (killed mid-write) is ignored."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["person"]] = row
    return done


def main() -> None:  # noqa: PLR0915 - one linear script
    """Run the benchmark; write benchmarks/results/image_protection.json and the grid PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200, help="photos (people) to protect at most")
    parser.add_argument("--max-minutes", type=float, default=25.0, help="start no new photo after this wall time")
    add_budget_arguments(parser)
    parser.add_argument("--steps", type=int, default=ProtectConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--feature-weight",
        type=float,
        default=ProtectConfig.feature_weight,
        help="weight of the feature-level term (0: embeddings only, the method before 2026-12-03)",
    )
    parser.add_argument("--no-loo", action="store_true", help="skip the leave-one-out (single-encoder) runs")
    parser.add_argument("--grid", type=int, default=4, help="faces in the image grid")
    parser.add_argument("--lfw-dir")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/image_protection.json)")
    parser.add_argument(
        "--grid-out",
        help="grid PNG (default benchmarks/results/local/image_protection_grid.png, "
        "not committed: LFW photos are not redistributed)",
    )
    parser.add_argument("--shared-machine", action="store_true", help="record that other jobs shared the CPU")
    parser.add_argument(
        "--rows-file",
        help="per-photo results, appended as each photo finishes and reused by a rerun "
        "with the same settings (default benchmarks/results/local/image_protection_rows-*.jsonl)",
    )
    args = parser.parse_args()
    budget = budget_from_args(args, parser)

    root = resolve_lfw_dir(args.lfw_dir)
    people, single = sample_people(root, args.seed)
    protector = ImageProtector(device="cpu", policy=FacePolicy.CENTER)
    encoders = protector.encoder_names
    thr = thresholds(encoders)
    evaluator = Evaluator(protector)
    config = ProtectConfig(steps=args.steps, seed=args.seed, feature_weight=args.feature_weight, **budget)

    denoiser_cfg = DenoiserConfig()
    model, denoiser_info = load_or_train_denoiser(root, [p for p, _, _ in people], denoiser_cfg)
    print(f"denoiser ready ({denoiser_info})", flush=True)
    purifiers = {**standard_purifications(), "dncnn": lambda img: denoise(model, img)}

    rows: list[dict] = []
    skipped: list[dict] = []
    examples: list[tuple[np.ndarray, np.ndarray]] = []
    start = time.perf_counter()
    out_path = Path(args.out) if args.out else RESULTS_DIR / "image_protection.json"
    from tqdm import tqdm

    loo = not args.no_loo and len(encoders) > 1
    rows_path = (
        Path(args.rows_file)
        if args.rows_file
        else (
            RESULTS_DIR / "local" / f"image_protection_rows{budget_tag(config)}-l{config.levels}-s{config.steps}"
            f"-seed{args.seed}"
            f"-fw{config.feature_weight:g}"
            f"{'' if loo else '-noloo'}.jsonl"
        )
    )
    done = _load_rows(rows_path)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(people[: args.count], desc="protect", unit="photo")
    for person, photo, other_photo in bar:
        if person in done:  # measured by an earlier run with the same settings
            rows.append(done[person])
            continue
        if (time.perf_counter() - start) / 60 > args.max_minutes:
            break
        clean = load_image(photo)
        other = evaluator.embed(load_image(other_photo))
        try:
            face = protector.find_face(clean, photo.name)
        except ImageError as exc:
            skipped.append({"person": person, "reason": exc.reason})
            continue
        ref = protector.embed_standard(clean, face)
        t = time.perf_counter()
        protected, report = protector.protect([clean], config, [photo.name], faces=[face])[0]
        seconds = time.perf_counter() - t
        images = {"clean": clean, "ensemble": protected}
        rng = np.random.default_rng(args.seed)
        noise = rng.integers(-config.levels, config.levels + 1, size=clean.shape)
        images["random-noise"] = np.clip(clean.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        if loo:
            for enc in encoders:
                images[f"only-{enc}"] = protector.subset([enc]).protect([clean], config, faces=[face])[0][0]
        for name, fn in purifiers.items():
            images[f"ensemble+{name}"] = fn(protected)
            images[f"clean+{name}"] = fn(clean)
        evals = {cond: evaluator.cells(img, ref, other) for cond, img in images.items()}
        rows.append(
            {
                "person": person,
                "photo": photo.name,
                "seconds": seconds,
                "psnr": psnr(clean, protected),
                "ssim": ssim(clean, protected),
                "linf": report.linf_levels,
                "eval": evals,
                "torch_threads": torch.get_num_threads(),
                "load_average": os.getloadavg()[0],
            }
        )
        with rows_path.open("a") as fh:
            fh.write(json.dumps(rows[-1]) + "\n")
        if len(examples) < args.grid:
            examples.append((clean, protected))
        bar.set_postfix(s=f"{seconds:.1f}", psnr=f"{rows[-1]['psnr']:.1f}")
        if len(rows) % 10 == 0:
            print(json.dumps(summarise(rows, encoders, thr)["ensemble"]), flush=True)

    wall = time.perf_counter() - start
    secs = np.array([r["seconds"] for r in rows])
    payload = {
        "protocol": (
            "LFW, identity-disjoint: one protected photo per person (people with >= 2 photos, shuffled with the seed); "
            "evaluation re-detects the face (dlib HOG, centre policy) and embeds with each encoder's standard "
            "pipeline; "
            "match = score >= the encoder's FMR 0.1% threshold from clean LFW View-2; no face = not matched"
        ),
        "shared_machine": args.shared_machine,
        "photos_requested": args.count,
        "photos_run": len(rows),
        "photos_skipped": skipped,
        "stopped_by_time_limit": len(rows) + len(skipped) < min(args.count, len(people)),
        "max_minutes": args.max_minutes,
        "wall_seconds": round(wall, 1),
        "config": {
            "budget": config.budget,
            "epsilon": config.effective_epsilon,
            "epsilon_levels": config.levels,
            **({"encoder_weight": config.encoder_weight} if config.encoder_weight is not None else {}),
            "steps": config.steps,
            "step_fraction": config.step_fraction,
            "eot": config.eot,
            "eot_config": vars(config.eot_config),
            "random_start": config.random_start,
            "feature_weight": config.feature_weight,
            "feature_layers": {m.name: list(m.feature_layers) for m in protector.members},
            "seed": args.seed,
        },
        "encoders": encoders,
        "ensemble_notes": protector.notes,
        "thresholds": thr,
        "denoiser": denoiser_info,
        "quality": {
            "psnr_mean": float(np.mean([r["psnr"] for r in rows])),
            "psnr_min": float(np.min([r["psnr"] for r in rows])),
            "ssim_mean": float(np.mean([r["ssim"] for r in rows])),
            "ssim_min": float(np.min([r["ssim"] for r in rows])),
            "linf_max_levels": int(max(r["linf"] for r in rows)),
        },
        "seconds_per_photo_ensemble": {
            "mean": float(secs.mean()),
            "median": float(np.median(secs)),
            "p90": float(np.percentile(secs, 90)),
            "max": float(secs.max()),
            "device": "cpu",
            "torch_threads": sorted({r.get("torch_threads", 1) for r in rows}),
            "load_average_median": float(np.median([r.get("load_average", float("nan")) for r in rows])),
        },
        "rows_file": str(rows_path.relative_to(RESULTS_DIR.parent.parent))
        if rows_path.is_relative_to(RESULTS_DIR.parent.parent)
        else str(rows_path),
        "results": summarise(rows, encoders, thr),
        "per_photo": [{k: v for k, v in r.items() if k != "eval"} for r in rows],
    }
    print("wrote", write_results("image_protection", payload, out_path))
    grid = Path(args.grid_out) if args.grid_out else RESULTS_DIR / "local" / "image_protection_grid.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    if examples:
        grid_png(examples, grid)
        print("wrote", grid)


if __name__ == "__main__":
    main()
