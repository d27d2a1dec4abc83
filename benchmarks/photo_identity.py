"""Identity left in the protected photos themselves: each judge's match rate and ISM between a person's photos (clean,
then protected) and the person's fourth photo, the one ``benchmarks/diffusion_defences.py`` compares generated faces
with. It tells which judge still sees the person in the photos the attacker learns from, before any generator.

Usage::

    python benchmarks/photo_identity.py --attacker benchmarks/models/generator_attacker128.pt \\
        --cache encoders+deflection+antipure-feb9c5b220 --people 40 [--people-from 0] [--resize 128] [--out ...]

``--cache`` is a folder of protected photos under ``benchmarks/results/local/diffusion_defences/`` (a
``diffusion_defences.py`` run's cache tag; every photo of the chosen people must be in it). The people, their first
three photos and the compared fourth are those of ``diffusion_defences.py`` with the same ``--attacker``,
``--people`` and ``--people-from``; the face chips are cut as the attacker cuts them, and ``--resize S`` first takes
them down to ``S`` px and back (what survives the generator's size). The judges are ``diffusion_defences.py``'s:
the attacker model's conditioning encoder (``system``), ``transfer`` and ``unseen``. Per photo set (``clean``,
``protected``) the JSON holds :class:`benchmarks.diffusion_defences.Tally`'s cell (match at FMR 0.1%, ISM, impostor
ISM, rank-1, per person).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.datasets import LFW  # noqa: E402
from advface.datasets.pairs import resize_faces  # noqa: E402
from advface.generative.model import load_generator  # noqa: E402
from advface.images import load_image  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.diffusion_defences import (  # noqa: E402
    LOCAL,
    PHOTOS_PER_PERSON,
    Attacker,
    Tally,
    cached_photo_name,
    evaluation_people,
)
from benchmarks.generative_eval import UNSEEN_JUDGE, Judges  # noqa: E402


def photo_chips(attacker: Attacker, photos: list[np.ndarray], resize: int | None) -> np.ndarray | None:
    """The photos' face chips as the attacker cuts them (optionally down to ``resize`` px and back); None when a
    photo has no face."""
    chips = [attacker.chips(photo) for photo in photos]
    if any(c is None for c in chips):
        return None
    stacked = np.stack([c for c in chips if c is not None])
    return stacked if resize is None else resize_faces(resize_faces(stacked, resize), stacked.shape[1])


def main() -> None:
    """Measure and write benchmarks/results/photo_identity.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacker", required=True, help="attacker model checkpoint (its encoder, size and people)")
    parser.add_argument("--cache", required=True, help="protected-photo cache folder (a diffusion_defences.py tag)")
    parser.add_argument("--people", type=int, default=20, help="evaluation people (default 20)")
    parser.add_argument("--people-from", type=int, default=0, help="skip this many people first (default 0)")
    parser.add_argument("--resize", type=int, default=None, help="take the chips down to this size and back")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out")
    args = parser.parse_args()
    folder = LOCAL / args.cache
    if not folder.is_dir():
        parser.error(f"no protected-photo cache {folder}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = LFW(args.lfw_dir)
    paths = {item.id: Path(item.path) for item in dataset}
    generator = load_generator(args.attacker)
    judges = Judges(generator, dataset, args.models_dir, unseen=UNSEEN_JUDGE)
    attacker = Attacker(generator, judges, args)
    people = evaluation_people(judges, PHOTOS_PER_PERSON + 1)[args.people_from : args.people_from + args.people]
    tally = Tally(judges)
    for _, ids in people:
        own, reference = ids[:PHOTOS_PER_PERSON], ids[PHOTOS_PER_PERSON]
        cached = [folder / f"{cached_photo_name(pid)}.png" for pid in own]
        missing = [path for path in cached if not path.is_file()]
        if missing:
            parser.error(f"{len(missing)} photo(s) of a chosen person are not in {folder}; protect them first")
        clean = [load_image(paths[pid]) for pid in own]
        protected = [load_image(path) for path in cached]
        for name, photos in (("clean", clean), ("protected", protected)):
            tally.add(name, photo_chips(attacker, photos, args.resize), reference, len(own))
    payload = {
        "settings": {
            "attacker": args.attacker,
            "cache": args.cache,
            "people": len(people),
            "people_from": args.people_from,
            "photos_per_person": PHOTOS_PER_PERSON,
            "resize": args.resize,
        },
        "thresholds": judges.thresholds(),
        **tally.summary(),
    }
    print({k: payload[k]["match"] for k in ("clean", "protected")}, "match (system judge)")
    print(f"wrote {write_results('photo_identity', payload, args.out)}")


if __name__ == "__main__":
    main()
