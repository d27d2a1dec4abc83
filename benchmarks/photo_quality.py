"""Imperceptibility of image protection: uniform vs perceptual budget on LFW photos, and grids of synthetic faces.

Usage (what produced ``benchmarks/results/photo_quality.json`` and ``docs/images/protect-grid-*.png``)::

    nice -n 10 python benchmarks/photo_quality.py --count 30 --threads 1 --shared-machine --grids 3

and the SSIM budget's rows (``benchmarks/results/photo_quality_ssim.json``, ``photo_quality_ssim_photo.json``;
commands in ``benchmarks/RESULTS.md``)::

    nice -n 10 python benchmarks/photo_quality.py --count 24 --threads 1 --shared-machine --guidance encoders \
        --variants uniform ssim ssim:target=0.95 ssim:target=0.93 --out benchmarks/results/photo_quality_ssim.json

Sample: LFW people shuffled with ``--seed``, the first photo of each (identity-disjoint), ``--count`` of them. Each
photo's face is detected once and protected with every variant (``uniform``, ``perceptual``, ``ssim``, ``jnd``, or
``NAME:KEY=VALUE,...`` to change the budget ``levels`` (default: the budget's own, ssim 12, the others 8), the
``encoder_weight`` (default: the budget's own, ssim 3, the others 1; before 2026-12-06 every variant defaulted to 8
levels and weight 1, so the commands of earlier results read ``ssim`` as ``ssim:levels=8,encoder_weight=1``),
``steps`` or parameters of the budget map, of the SSIM
budget or of the JND budget, e.g. ``ssim:target=0.95``, ``ssim:photo_target=0.97`` (the whole photo's SSIM
constraint), ``ssim:scales=3`` (both constraints multi-scale), ``jnd:target=1.5`` or ``jnd:statistic=top``) at the
default
settings otherwise (60 steps, EOT, feature term, the default ensemble: dlib-torch + MobileFaceNet when its model file
is present; ``--guidance`` the terms, default the library's: the first table, ``results/photo_quality.json``, was run
when that was ``encoders`` alone). Per variant the JSON gives
quality (PSNR, SSIM, SSIM on the face box and, as ``ssim_face_half`` / ``ssim_face_quarter``, on it at 1/2 and 1/4
resolution, GMSD, mean CIEDE2000 colour difference, the share of pixels changed, the
mean absolute change in levels, and the change's visibility in JND units from
:mod:`advface.protect.image.visibility`: ``vis_above_jnd`` / ``vis_above_jnd_face`` the share of pixels above 1 JND
over the photo / the face box, ``vis_p95`` / ``vis_p95_face`` the 95th percentile, ``vis_pooled`` /
``vis_pooled_face`` the Minkowski mean), protection strength (per encoder, from the protection report:
``cosine_after`` of clean vs protected through the encoder's standard pipeline, and ``matched_after`` at the
encoder's threshold) and seconds per photo. "At least as strong" means: per encoder, matched share not higher and
mean cosine not higher than the uniform budget's.

``--skip N`` leaves out the first N photos of the sample (to continue a run that ``--max-minutes`` cut short);
``--merge A.json B.json --out C.json`` joins such parts (same settings, disjoint photos) and recomputes the summary.

Grids (``--grids N``): N synthetic faces from the DCGAN of the ``gan-face-generate`` package (64 px, upscaled to
``--grid-size``, padded so the detector finds the face; no real person), each written as one PNG under
``docs/images/`` (or ``--grid-dir``): top row clean | uniform | ssim (or the ``--grid-variants``), bottom
row the perturbation amplified x``--amplify`` around grey (the clean face, then each variant's perturbation); the
JSON's ``grids`` gives each column's numbers; ``surrogate`` names the defender surrogate (its digest) when a selected
term uses one. ``--visibility-maps`` also writes ``protect-grid-N-visibility.png``
beside each grid: each variant's visibility map (black 0, white 2 JND or more) in the grid's column order. LFW photos
are never written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.errors import ImageError  # noqa: E402
from advface.images import load_image  # noqa: E402
from advface.paths import lfw_dir as resolve_lfw_dir  # noqa: E402
from advface.protect.image import ImageProtector, ProtectConfig  # noqa: E402
from advface.protect.image.guidance import NEEDS_SURROGATE, parse_guidance  # noqa: E402
from advface.protect.image.jnd_budget import JndBudget  # noqa: E402
from advface.protect.image.perceptual import PerceptualBudget  # noqa: E402
from advface.protect.image.ssim_budget import SsimBudget, face_ssim_per_scale  # noqa: E402
from advface.protect.image.visibility import (  # noqa: E402
    VisibilityModel,
    VisibilityReport,
    visibility,
    visibility_image,
)
from benchmarks.common import RESULTS_DIR, command_line, surrogate_record, write_results  # noqa: E402

VERIFICATION_JSON = RESULTS_DIR / "lfw_verification.json"
DOCS_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def variant_config(spec: str, base: ProtectConfig) -> ProtectConfig:
    """``uniform``, ``perceptual``, ``ssim``, ``jnd`` or ``NAME:KEY=VALUE,...`` -> the config. Keys: ``steps``,
    ``levels`` (the budget epsilon in uint8 levels), ``encoder_weight`` (``ProtectConfig.encoder_weight``),
    ``antipure_identity_weight`` (``AntiPureConfig.identity_weight``) and, for
    perceptual, ssim and jnd, the fields of PerceptualBudget,
    SsimBudget or JndBudget (numbers, booleans, and jnd's ``statistic``; not its ``model``)."""
    name, _, options = spec.partition(":")
    params_type: type[PerceptualBudget] | type[SsimBudget] | type[JndBudget] = {
        "ssim": SsimBudget,
        "jnd": JndBudget,
    }.get(name, PerceptualBudget)
    fields = {f.name: f.type for f in dataclasses.fields(params_type) if f.name != "model"}
    values: dict[str, Any] = {}
    steps, epsilon, encoder_weight, antipure = base.steps, base.epsilon, base.encoder_weight, base.antipure
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key in ("steps", "levels"):
            steps, epsilon = (int(value), epsilon) if key == "steps" else (steps, int(value) / 255)
            continue
        if key == "encoder_weight":
            encoder_weight = float(value)
            continue
        if key == "antipure_identity_weight":
            antipure = dataclasses.replace(antipure, identity_weight=float(value))
            continue
        if name == "uniform" or key not in fields:
            raise SystemExit(f"unknown {name} parameter {key!r} (known: {', '.join(fields)})")
        if fields[key] in (str, "str"):
            values[key] = value
        elif fields[key] in (bool, "bool"):
            if value.lower() not in ("0", "1", "false", "true"):
                raise SystemExit(f"{name} parameter {key!r} takes 0 / 1 / false / true, got {value!r}")
            values[key] = value.lower() in ("1", "true")
        else:
            integer = fields[key] in (int, "int")
            try:
                values[key] = int(value) if integer else float(value)
            except ValueError:
                kind = "an integer" if integer else "a number"
                raise SystemExit(f"{name} parameter {key!r} takes {kind}, got {value!r}") from None
    common: dict[str, Any] = {
        "steps": steps,
        "epsilon": epsilon,
        "encoder_weight": encoder_weight,
        "antipure": antipure,
    }
    if name == "uniform":
        return dataclasses.replace(base, budget="uniform", **common)
    if name == "ssim":
        return dataclasses.replace(base, budget="ssim", ssim=SsimBudget(**values), **common)
    if name == "jnd":
        return dataclasses.replace(base, budget="jnd", jnd=JndBudget(**values), **common)
    if name != "perceptual":
        raise SystemExit(f"unknown variant {spec!r}")
    params = PerceptualBudget(**values)
    return dataclasses.replace(base, budget="perceptual", perceptual=params, **common)


def sample_photos(root: Path, count: int, seed: int) -> list[Path]:
    """The first photo of ``count`` LFW people, people shuffled with ``seed``."""
    people = sorted(p for p in (root / "images").iterdir() if p.is_dir())
    order = np.random.default_rng(seed).permutation(len(people))
    photos = []
    for i in order:
        files = sorted(people[i].glob("*.jpg"))
        if files:
            photos.append(files[0])
        if len(photos) >= count:
            break
    return photos


def colour_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean CIEDE2000 difference of two uint8 RGB images."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    return float(deltaE_ciede2000(rgb2lab(a), rgb2lab(b)).mean())


def coarse_face_ssim(clean: np.ndarray, protected: np.ndarray, box: tuple[float, ...]) -> dict[str, float]:
    """SSIM of the face box at 1/2 and 1/4 resolution (2 x 2 average pooling per level; what the multi-scale
    constraint, ``ssim:scales=3``, holds): a smooth, feature-sized change that the full-resolution SSIM barely
    sees lowers these."""

    def tensor(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]

    levels = face_ssim_per_scale(tensor(clean), tensor(protected), [box], scales=3)[0].tolist()
    return {"ssim_face_half": levels[1], "ssim_face_quarter": levels[2]}


#: Visibility numbers of a row (``vis_`` + :meth:`VisibilityReport.to_dict`'s keys, less ``max``).
VISIBILITY_KEYS = (
    "vis_above_jnd",
    "vis_above_jnd_face",
    "vis_p95",
    "vis_p95_face",
    "vis_pooled",
    "vis_pooled_face",
)


def visibility_numbers(report: VisibilityReport) -> dict[str, float]:
    """The :data:`VISIBILITY_KEYS` of a visibility report (one with a face box)."""
    values = {f"vis_{k}": v for k, v in report.to_dict().items()}
    return {k: float(v) for k in VISIBILITY_KEYS if (v := values[k]) is not None}


def photo_row(
    clean: np.ndarray, protected: np.ndarray, report: dict[str, Any], box: tuple[float, ...]
) -> dict[str, Any]:
    """Quality and strength numbers of one protected photo (``box``: its face box)."""
    diff = np.abs(clean.astype(np.int16) - protected.astype(np.int16))
    return {
        "psnr": report["psnr"],
        "ssim": report["ssim"],
        "ssim_face": report["ssim_face"],
        **coarse_face_ssim(clean, protected, box),
        "gmsd": report["gmsd"],
        **visibility_numbers(visibility(clean, protected, box)),
        "delta_e2000": colour_difference(clean, protected),
        "changed_share": float((diff > 0).mean()),
        "mean_abs_levels": float(diff.mean()),
        "linf_levels": report["linf_levels"],
        "seconds": report["seconds"],
        "similarity": report["similarity"],
    }


def fmr_thresholds(encoders: list[str]) -> dict[str, float]:
    """Each encoder's threshold at FMR 0.1 % on clean LFW View-2 (``results/lfw_verification.json``), in its score
    (dlib: minus the distance; MobileFaceNet: the cosine); encoders without an entry are left out."""
    data = json.loads(VERIFICATION_JSON.read_text()) if VERIFICATION_JSON.is_file() else {}
    return {e: float(data[e]["threshold_at_far_1e-3"]) for e in encoders if isinstance(data.get(e), dict)}


def summarise(rows: list[dict[str, Any]], encoders: list[str]) -> dict[str, Any]:
    """Means (and minima or maxima where the worst photo matters) over photos of one variant."""
    thresholds = fmr_thresholds(encoders)

    def stats(key: str) -> dict[str, float]:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}

    out: dict[str, Any] = {"n": len(rows)}
    for key in ("psnr", "ssim", "ssim_face", "gmsd", "delta_e2000", "changed_share", "mean_abs_levels"):
        out[key] = stats(key)
    for key in ("ssim_face_half", "ssim_face_quarter", *VISIBILITY_KEYS):  # absent from files written before
        if all(key in r for r in rows):
            out[key] = stats(key)
    out["seconds_per_photo"] = {
        "mean": float(np.mean([r["seconds"] for r in rows])),
        "median": float(np.median([r["seconds"] for r in rows])),
        "max": float(np.max([r["seconds"] for r in rows])),
    }
    out["ssim_face_at_least_0.97"] = float(np.mean([r["ssim_face"] >= 0.97 for r in rows]))
    out["psnr_at_least_35"] = float(np.mean([r["psnr"] >= 35 for r in rows]))
    strength: dict[str, Any] = {}
    for name in encoders:
        cos = np.array([r["similarity"][name]["cosine_after"] for r in rows])
        entry: dict[str, Any] = {"cosine_after_mean": float(cos.mean()), "cosine_after_max": float(cos.max())}
        matched = [r["similarity"][name].get("matched_after") for r in rows]
        if all(m is not None for m in matched):
            entry["matched_after_share"] = float(np.mean(matched))
        if name in thresholds:  # the score is the cosine where the report has no score_after
            scores = [r["similarity"][name].get("score_after", r["similarity"][name]["cosine_after"]) for r in rows]
            entry["matched_fmr1e-3_share"] = float(np.mean([s >= thresholds[name] for s in scores]))
        rand = np.array([r["similarity"][name]["cosine_random"] for r in rows])
        entry["cosine_random_mean"] = float(rand.mean())
        strength[name] = entry
    out["strength"] = strength
    return out


def at_least_as_strong(candidate: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Per encoder: matched share not higher and mean cosine not higher than the reference's."""
    for name, ref in reference["strength"].items():
        cand = candidate["strength"][name]
        if cand["cosine_after_mean"] > ref["cosine_after_mean"]:
            return False
        for key in ("matched_after_share", "matched_fmr1e-3_share"):
            if cand.get(key, 0.0) > ref.get(key, 0.0):
                return False
    return True


# ---------------------------------------------------------------------------------------------------- grids


def synthetic_faces(indices: list[int], size: int, seed: int) -> list[np.ndarray]:
    """DCGAN faces (gan-face-generate) number ``indices`` of the latents drawn with ``seed``, upscaled (bicubic) from
    64 px to ``size`` px."""
    from PIL import Image

    from advface.audit.attacks.gan_prior import LATENT_DIM, load_generator

    generator = load_generator("cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(max(indices) + 1, LATENT_DIM, 1, 1, generator=gen)
        raw = generator(z)[indices]
    faces = ((raw.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BICUBIC)) for f in faces]


def write_grids(
    protector: ImageProtector,
    base: ProtectConfig,
    indices: list[int],
    size: int,
    amplify: float,
    seed: int,
    variants: tuple[str, ...] = ("uniform", "perceptual"),
    folder: Path = DOCS_IMAGES,
    visibility_maps: bool = False,
) -> list[dict[str, Any]]:
    """Protect the synthetic faces ``indices`` with each of ``variants`` (one column each) and write one grid PNG
    per face into ``folder`` (and, with ``visibility_maps``, one PNG of each variant's visibility map); returns
    their numbers (faces the detector misses are left out)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Any]] = []
    for index, face_image in zip(indices, synthetic_faces(indices, size, seed)):
        try:
            face = protector.find_face(face_image, "<synthetic>")
        except ImageError:
            continue
        tiles, diffs, numbers = [face_image], [np.full_like(face_image, 128)], {}
        maps: list[np.ndarray] = []
        for spec in variants:
            config = variant_config(spec, base)
            protected, report = protector.protect([face_image], config, faces=[face])[0]
            delta = protected.astype(np.float64) - face_image.astype(np.float64)
            tiles.append(protected)
            diffs.append(np.clip(128 + amplify * delta, 0, 255).astype(np.uint8))
            seen = visibility(face_image, protected, tuple(face.box))
            maps.append(visibility_image(seen))
            numbers[spec] = {
                "psnr": report.psnr,
                "ssim": report.ssim,
                "ssim_face": report.ssim_face,
                **coarse_face_ssim(face_image, protected, tuple(face.box)),
                "gmsd": report.gmsd,
                **visibility_numbers(seen),
                "linf_levels": report.linf_levels,
                "cosine_after": {k: v["cosine_after"] for k, v in report.similarity.items()},
            }
        grid = np.concatenate([np.concatenate(tiles, axis=1), np.concatenate(diffs, axis=1)], axis=0)
        path = folder / f"protect-grid-{len(written) + 1}.png"
        Image.fromarray(grid).save(path, optimize=True)
        if visibility_maps:
            Image.fromarray(np.concatenate(maps, axis=1)).save(path.with_name(f"{path.stem}-visibility.png"))
        written.append(
            {
                "file": str(path.relative_to(DOCS_IMAGES.parent.parent)) if folder == DOCS_IMAGES else str(path),
                "face_index": index,
                "bytes": path.stat().st_size,
                **numbers,
            }
        )
    return written


def resummarise(path: Path) -> None:
    """Recompute ``summary`` (and the strength comparison) of a results file from its ``per_photo`` rows."""
    doc = json.loads(path.read_text())
    summary = {v: summarise(rows, doc["encoders"]) for v, rows in doc["per_photo"].items() if rows}
    if "uniform" in summary:
        for s in summary.values():
            s["at_least_as_strong_as_uniform"] = at_least_as_strong(s, summary["uniform"])
    doc["summary"] = summary
    doc["summary_recomputed_by"] = command_line()
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"rewrote the summary of {path}")


def merge(parts: list[Path], out: Path) -> None:
    """One results file from ``parts`` run with the same variants, encoders and settings on disjoint photos (e.g. a
    run cut short by ``--max-minutes`` and its continuation with ``--skip``): their per-photo rows in order, the
    summary recomputed from them, each part's command, date, load and wall time kept under ``parts``."""
    docs = [json.loads(p.read_text()) for p in parts]
    first = docs[0]
    for path, doc in zip(parts[1:], docs[1:]):
        for key in ("encoders", "config", "jnd_defaults", "ssim_defaults", "visibility_model"):
            if doc.get(key) != first.get(key):
                raise SystemExit(f"{path}: {key} differs from {parts[0]}'s; not merged")
        if list(doc["per_photo"]) != list(first["per_photo"]):
            raise SystemExit(f"{path}: variants differ from {parts[0]}'s; not merged")
    photos = [row["photo"] for doc in docs for row in next(iter(doc["per_photo"].values()))]
    if len(set(photos)) != len(photos):
        raise SystemExit("the parts share photos; not merged")
    keep = ("command", "date", "machine", "load_average", "photos_run", "wall_seconds", "photos_skipped")
    merged = {k: v for k, v in first.items() if k not in keep + ("summary", "per_photo", "grids")}
    merged["parts"] = [{k: doc.get(k) for k in keep} | {"file": str(p)} for p, doc in zip(parts, docs)]
    merged["photos_run"] = len(photos)
    merged["grids"] = [g for doc in docs for g in doc.get("grids", [])]
    merged["per_photo"] = {v: [row for doc in docs for row in doc["per_photo"][v]] for v in first["per_photo"]}
    path = write_results("photo_quality", merged, out)
    resummarise(path)


def _line(variant: str, row: dict[str, Any], encoders: list[str]) -> str:
    cos = [round(row["similarity"][e]["cosine_after"], 3) for e in encoders]
    face = f"{row['ssim_face']:.3f}/{row['ssim_face_quarter']:.3f}"
    seen = f"{row['vis_above_jnd_face']:.3f}/{row['vis_p95_face']:.2f}"
    return (
        f"{variant} psnr {row['psnr']:.1f} ssim_face(/4) {face} gmsd {row['gmsd']:.4f} "
        f"vis_face(>1,p95) {seen} cos {cos}"
    )


def main() -> None:
    """Run the comparison and write the results JSON (and grids)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=30, help="LFW photos (one per person)")
    parser.add_argument("--variants", nargs="+", default=["uniform", "perceptual"], help="budgets to compare")
    parser.add_argument("--encoders", nargs="+", default=None, help="ensemble (default: advface's default)")
    parser.add_argument("--steps", type=int, default=ProtectConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--guidance",
        default=",".join(ProtectConfig.guidance),
        help="guidance terms, comma-separated (default: the library's; the first table used encoders alone)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="start no new photo after this wall time")
    parser.add_argument(
        "--grids", type=int, nargs="*", default=[], metavar="I", help="DCGAN faces (latent numbers) to write grids of"
    )
    parser.add_argument("--grid-size", type=int, default=200, help="face size (px) in the grids")
    parser.add_argument("--amplify", type=float, default=8.0, help="amplification of the difference row")
    parser.add_argument(
        "--grid-variants",
        nargs="+",
        default=["uniform", "ssim"],
        help="the grids' columns after the clean face (variants as --variants; default uniform ssim: the default "
        "until 2026-12-06 and the default since)",
    )
    parser.add_argument(
        "--grid-dir", default=None, help="folder of the grid PNGs (default docs/images, the committed grids)"
    )
    parser.add_argument(
        "--visibility-maps",
        action="store_true",
        help="also write each grid's visibility maps (protect-grid-N-visibility.png; black 0, white >= 2 JND)",
    )
    parser.add_argument(
        "--skip", type=int, default=0, help="leave out the first N photos of the sample (to continue a run cut short)"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="only merge results files of the same settings on disjoint photos into --out (summary recomputed)",
    )
    parser.add_argument("--lfw-dir")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/photo_quality.json)")
    parser.add_argument("--shared-machine", action="store_true", help="record that other jobs shared the CPU")
    parser.add_argument(
        "--resummarise",
        metavar="JSON",
        help="only recompute the summary of an existing results file from its per-photo rows, and rewrite it",
    )
    args = parser.parse_args()
    if args.resummarise:
        resummarise(Path(args.resummarise))
        return
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out")
        merge([Path(p) for p in args.merge], Path(args.out))
        return
    torch.set_num_threads(args.threads)
    base = ProtectConfig(steps=args.steps, seed=args.seed, guidance=parse_guidance(args.guidance))
    protector = ImageProtector(args.encoders)
    encoders = protector.encoder_names
    started = time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    photos: list[str] = []
    skipped: list[str] = []
    if args.count > 0:
        root = Path(args.lfw_dir) if args.lfw_dir else resolve_lfw_dir()
        for path in sample_photos(root, args.count, args.seed)[args.skip :]:
            if time.perf_counter() - started > args.max_minutes * 60:
                break
            image = load_image(path)
            try:
                face = protector.find_face(image, str(path))
            except ImageError as exc:
                skipped.append(f"{path.name}: {exc.reason}")
                continue
            photos.append(path.name)
            for spec in args.variants:
                protected, report = protector.protect([image], variant_config(spec, base), faces=[face])[0]
                rows[spec].append(photo_row(image, protected, report.to_dict(), tuple(face.box)))
            print(f"{len(photos):3d} {path.name}: " + "  ".join(_line(v, rows[v][-1], encoders) for v in args.variants))
    summary = {v: summarise(r, encoders) for v, r in rows.items() if r}
    reference = summary.get("uniform")
    if reference is not None:
        for s in summary.values():
            s["at_least_as_strong_as_uniform"] = at_least_as_strong(s, reference)
    grids: list[dict[str, Any]] = []
    if args.grids:
        folder = Path(args.grid_dir) if args.grid_dir else DOCS_IMAGES
        grid_variants = tuple(args.grid_variants)
        grids = write_grids(
            protector,
            base,
            args.grids,
            args.grid_size,
            args.amplify,
            args.seed,
            grid_variants,
            folder,
            args.visibility_maps,
        )
    payload = {
        "protocol": "LFW, first photo of shuffled people; face detected once (dlib); each variant protects the same "
        "photo and face; strength from the protection report (each encoder's standard pipeline on the clean face box, "
        "clean vs protected); quality on the written uint8 PNG",
        "shared_machine": args.shared_machine,
        "load_average": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "config": {
            "steps": base.steps,
            "epsilon_levels": {spec: variant_config(spec, base).levels for spec in args.variants},
            "seed": base.seed,
            "eot": base.eot,
            "guidance": list(base.guidance),
        },
        # the defender surrogate behind the deflection and AntiPure terms (the shipped one; its digest says which)
        "surrogate": surrogate_record() if NEEDS_SURROGATE & set(base.guidance) else None,
        "perceptual_defaults": PerceptualBudget().__dict__,
        "ssim_defaults": SsimBudget().__dict__,
        "jnd_defaults": {k: v for k, v in JndBudget().__dict__.items() if k != "model"},
        "visibility_model": dataclasses.asdict(VisibilityModel()),
        "encoders": encoders,
        "ensemble_notes": protector.notes,
        "photos_run": len(photos),
        "photos_skipped": skipped,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "grids": grids,
        "per_photo": {v: [{"photo": p, **r} for p, r in zip(photos, rs)] for v, rs in rows.items()},
    }
    path = write_results("photo_quality", payload, args.out)
    print(f"wrote {path}")
    for v, s in summary.items():
        strength = {
            e: (round(x["cosine_after_mean"], 3), x.get("matched_after_share")) for e, x in s["strength"].items()
        }
        print(
            f"{v}: psnr {s['psnr']['mean']:.2f} ssim {s['ssim']['mean']:.4f} ssim_face {s['ssim_face']['mean']:.4f} "
            f"(1/2: {s['ssim_face_half']['mean']:.4f}, 1/4: {s['ssim_face_quarter']['mean']:.4f}) "
            f"gmsd {s['gmsd']['mean']:.4f} dE {s['delta_e2000']['mean']:.2f} "
            f"vis face >1 JND {s['vis_above_jnd_face']['mean']:.3f} p95 {s['vis_p95_face']['mean']:.2f} "
            f"pooled {s['vis_pooled_face']['mean']:.2f} (photo >1 JND {s['vis_above_jnd']['mean']:.3f}) "
            f"s/photo {s['seconds_per_photo']['mean']:.1f} strength {strength} "
            f"as-strong {s.get('at_least_as_strong_as_uniform')}"
        )


if __name__ == "__main__":
    main()
