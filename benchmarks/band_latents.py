"""How much of each frequency band of the protection a generator's personaliser sees, by generator size.

Usage::

    python benchmarks/band_latents.py --protected-dir benchmarks/results/local/diffusion_defences/<config-tag> \
        --generators benchmarks/models/generator_attacker.pt generator_attacker128.pt [--split-size 64] \
        [--band-sigma 0.5] [--out benchmarks/results/band_latents.json]

The training-based threat fine-tunes on the latents of the photos' face chips (dlib's 150-px chip, resized to the
generator's size, encoded by its autoencoder). For every protected photo in ``--protected-dir`` (a cache folder of
``benchmarks/diffusion_defences.py``: PNGs named by the first 16 hex digits of the sha1 of the LFW photo id) the
perturbation is split into bands as ``diffusion_defences.py --band`` splits it (:func:`band_split`), at the pixel of
a generator of ``--split-size`` px (so that the same split is measured on every generator), and each band and the
whole perturbation are carried through each generator's input path:

- ``pixel_share``: the band's change of the generator-size chip, as a share of the whole perturbation's (L2);
- ``latent_share``: the same in the generator's latents (what fine-tuning learns from);
- ``latent_relative``: the band's latent change relative to the clean latent's norm.

A band the generator's input keeps little of cannot be what personalisation learns, whatever its visibility: this
is the necessary condition for a protection that lives in the high band, measured before any threat is run.
Photos in which dlib finds no face are skipped (counted in ``photos_skipped``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.datasets import LFW  # noqa: E402
from advface.datasets.pairs import resize_faces  # noqa: E402
from advface.encoders.dlib_runtime import DLIB_CHIP  # noqa: E402
from advface.errors import AdvfaceError  # noqa: E402
from advface.faces.align import align_face  # noqa: E402
from advface.faces.pipeline import FaceChipper  # noqa: E402
from advface.generative.model import IdentityGenerator, load_generator  # noqa: E402
from advface.images import load_image  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.diffusion_defences import (  # noqa: E402
    BAND_SIGMA,
    BANDS,
    band_split,
    cached_photo_name,
    generator_pixel,
)

PARTS = ("whole", *BANDS)


def cached_photos(folder: Path, dataset: LFW) -> list[tuple[Path, Path]]:
    """``(clean photo, protected photo)`` of every cached PNG in ``folder``, in LFW order."""
    found = {p.stem for p in folder.glob("*.png")}
    pairs = []
    for item in dataset:
        name = cached_photo_name(item.id)
        if name in found:
            pairs.append((Path(item.path), folder / f"{name}.png"))
    if not pairs:
        raise SystemExit(f"{folder}: no cached protected photo of an LFW photo id")
    return pairs


def share(part: np.ndarray, whole: np.ndarray) -> float:
    """L2 norm of ``part`` over that of ``whole`` (0 when the whole is 0)."""
    norm = float(np.linalg.norm(whole))
    return float(np.linalg.norm(part)) / norm if norm else 0.0


def measure(
    generators: dict[str, IdentityGenerator], pairs: list[tuple[Path, Path]], split_size: int, sigma: float
) -> dict[str, Any]:
    """Per generator, the means over photos of each part's pixel and latent shares (module docstring)."""
    chipper = FaceChipper("dlib", DLIB_CHIP, "largest")
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in generators}
    pixels: list[float] = []
    skipped = 0
    for clean_path, protected_path in pairs:
        clean, protected = load_image(clean_path), load_image(protected_path)
        try:
            face = chipper.select(clean, str(clean_path.name))[0]
        except AdvfaceError:
            skipped += 1
            continue
        photo_pixel = generator_pixel(face, DLIB_CHIP, split_size)
        pixels.append(photo_pixel)
        bands = band_split(clean, protected, photo_pixel, sigma)
        photos = {"clean": clean, "whole": protected, **bands}
        keys = list(photos)
        chips = np.stack([align_face(photos[key], face, DLIB_CHIP) for key in keys])  # one face for all
        for name, generator in generators.items():
            resized = resize_faces(chips, generator.image_size)
            small = dict(zip(keys, resized.astype(np.float32), strict=True))
            latents = dict(zip(keys, generator.encode(resized).cpu().numpy(), strict=True))
            whole_pixel, whole_latent = small["whole"] - small["clean"], latents["whole"] - latents["clean"]
            out = rows[name]
            for part in PARTS:
                pixel_change = small[part] - small["clean"]
                latent_change = latents[part] - latents["clean"]
                out.setdefault(f"{part}_pixel_share", []).append(share(pixel_change, whole_pixel))
                out.setdefault(f"{part}_latent_share", []).append(share(latent_change, whole_latent))
                out.setdefault(f"{part}_latent_relative", []).append(share(latent_change, latents["clean"]))
    results = {
        name: {
            "image_size": generators[name].image_size,
            **{key: float(np.mean(values)) for key, values in sorted(found.items())},
        }
        for name, found in rows.items()
    }
    return {
        "generators": results,
        "photos": len(pixels),
        "photos_skipped": skipped,
        "split_pixel_mean": float(np.mean(pixels)) if pixels else None,
    }


def main() -> None:
    """Measure and write benchmarks/results/band_latents.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protected-dir", required=True, help="a diffusion_defences.py cache folder of protected PNGs")
    parser.add_argument(
        "--generators", nargs="+", required=True, help="generator checkpoints to carry the bands through"
    )
    parser.add_argument(
        "--split-size",
        type=int,
        default=64,
        help="the generator size whose pixel sets the band split (default 64, the attacker model's)",
    )
    parser.add_argument(
        "--band-sigma",
        type=float,
        default=BAND_SIGMA,
        help=f"the split's Gaussian sigma in pixels of that size (default {BAND_SIGMA}, as diffusion_defences.py)",
    )
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/band_latents.json)")
    args = parser.parse_args()
    if args.split_size < 16 or args.band_sigma <= 0:
        parser.error("--split-size must be >= 16 and --band-sigma > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    generators = {path: load_generator(path) for path in args.generators}
    pairs = cached_photos(Path(args.protected_dir), LFW(args.lfw_dir))
    payload = {
        "settings": {
            "split_size": args.split_size,
            "band_sigma": args.band_sigma,
            "protected_dir": Path(args.protected_dir).name,
        },
        **measure(generators, pairs, args.split_size, args.band_sigma),
    }
    print(f"wrote {write_results('band_latents', payload, args.out)}")


if __name__ == "__main__":
    main()
