"""Quick check that picks the audit's ``--diffusion-guidance``: the ``diffusion`` attacker's reconstruction
guidance scale, tried on people that are neither audited nor in the attacker model's training data.

Usage::

    python benchmarks/diffusion_guidance_check.py --model generator_attacker.pt [--group defender] [--people 20]
        [--scales 0 0.02 0.05 0.1 0.2] [--out benchmarks/results/diffusion_guidance_check.json]

People: the first ``--people`` (name order) of LFW's ``--group`` (split seed 0, default the *defender* group: the
attacker model never trained on them and the audit never audits them, so choosing the scale here does not tune it on
the audited people) with two or more photos. For each scale, one seeded sample per person is drawn exactly as the
audit's attacker draws it (:func:`advface.audit.attacks.diffusion.reconstruct_templates`: DDIM 25 steps,
classifier-free guidance 3, seed 0) from the system embedding of the person's photo A, and judged at FMR 0.1% like
the audit: Type I against photo A, Type II against photo B, by the system encoder (which the guided attacker
optimises against) and by the transfer judge (MobileFaceNet for dlib; untouched by the attacker). Samples are not
written (likenesses of LFW people).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.audit.attacks.diffusion import reconstruct_templates  # noqa: E402
from advface.datasets import LFW  # noqa: E402
from advface.datasets.splits import GROUPS, split_identities  # noqa: E402
from advface.generative.model import load_generator  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.generative_eval import Judges  # noqa: E402


def main() -> None:
    """Measure each scale and write benchmarks/results/diffusion_guidance_check.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="attacker generator checkpoint (advface train-generator)")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--group", choices=GROUPS, default="defender", help="people tried (default defender)")
    parser.add_argument("--people", type=int, default=20, help="people (default 20)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.people < 1 or any(s < 0 for s in args.scales):
        raise SystemExit("--people must be >= 1 and every scale >= 0")

    generator = load_generator(args.model)
    trained_on = (generator.metadata.get("training_data") or {}).get("group")
    if trained_on == args.group:
        raise SystemExit(f"--group {args.group}: the model was trained on those people; pick another group")
    judges = Judges(generator, LFW(args.lfw_dir), args.models_dir)
    clean = judges.pairs.without_flips()
    split = split_identities(clean.identities.tolist(), seed=0)
    photos: dict[str, list[int]] = {}
    for i, person in enumerate(clean.identities.tolist()):
        if person in split.group(args.group):
            photos.setdefault(person, []).append(i)
    people = sorted(p for p, rows in photos.items() if len(rows) >= 2)[: args.people]
    templates = np.stack([clean.embeddings[photos[p][0]] for p in people])
    own = [str(clean.ids[photos[p][0]]) for p in people]
    other = [str(clean.ids[photos[p][1]]) for p in people]

    rows = []
    for scale in args.scales:
        started = time.perf_counter()
        faces = reconstruct_templates(
            generator, templates, seed=args.seed, guide_scale=scale, encoder=judges.scorer if scale > 0 else None
        )
        seconds = (time.perf_counter() - started) / len(people)
        type1, type2 = judges.summary(judges.score(faces, own)), judges.summary(judges.score(faces, other))
        rows.append(
            {
                "scale": scale,
                "type1_system": type1["system_match"],
                "type1_transfer": type1["transfer_match"],
                "type2_system": type2["system_match"],
                "type2_transfer": type2["transfer_match"],
                "type1_transfer_faces": type1["transfer_faces"],
                "type2_transfer_faces": type2["transfer_faces"],
                "seconds_per_face": seconds,
            }
        )
        print(
            f"scale {scale:g}: Type I system {type1['system_match']:.3f} transfer {type1['transfer_match']}, "
            f"Type II system {type2['system_match']:.3f} transfer {type2['transfer_match']} ({seconds:.2f} s/face)",
            flush=True,
        )

    payload = {
        "model": {"path": str(args.model), "trained_on": trained_on},
        "settings": {"group": args.group, "people": len(people), "scales": args.scales, "seed": args.seed},
        "thresholds": judges.thresholds(),
        "scales": rows,
    }
    print(f"wrote {write_results('diffusion_guidance_check', payload, args.out)}")


if __name__ == "__main__":
    main()
