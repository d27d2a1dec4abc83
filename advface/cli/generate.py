"""Generate faces of an identity with advface's generator: the training-free personalisation threat.

``--from-photo IMG`` (repeatable): each photo is detected, aligned and embedded by the generator's encoder, and
``--n`` new faces of that identity are written as ``OUT/<photo stem>_<k>.png``. ``--from-embeddings IN.npz``: the
embeddings of an ``advface embed`` / ``advface protect`` file (e.g. stolen templates) are used directly, one set of
faces per id (``OUT/<row>_<k>.png``; ids can be names, so files are numbered by row). ``--personalise`` learns the
person from all ``--from-photo`` photos together (training-based threat) instead of using their embeddings:
``--personalise-method finetune`` (default, DreamBooth analogue: a copy of the model and an identity condition are
fine-tuned on the photos; ``--personalise-start embedding`` starts the condition at the photos' mean embedding, not at
random) or ``condition`` (textual-inversion analogue: only the condition is learned), for ``--personalise-steps``
Adam steps at ``--personalise-lr`` (each method's own defaults). ``--identity-guidance S`` pulls every sampling step
towards the identity through ``--encoder``'s gradient (the white-box attacker): towards each embedding for the
training-free threat, towards the photos' mean embedding with ``--personalise``. The model's encoder must match
``--encoder`` (checked by fingerprint).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from advface.generative.config import CONDITION_STARTS, FinetuneConfig, PersonaliseConfig

if TYPE_CHECKING:
    import numpy as np

    from advface.encoders.base import FaceEncoder

NAME = "generate"
HELP = "generate faces of an identity (photo, embeddings or a few photos) with advface's generator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface generate``."""
    parser.add_argument("--model", required=True, help="generator checkpoint (advface train-generator)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-photo", action="append", metavar="IMG", help="photo of the person (repeatable)")
    src.add_argument("--from-embeddings", metavar="NPZ", help="embeddings file (ids + embeddings)")
    parser.add_argument("--out", "-o", required=True, help="output folder for PNG files")
    parser.add_argument("--n", type=int, default=4, help="faces per identity (default 4)")
    parser.add_argument(
        "--personalise",
        action="store_true",
        help="learn the person from all --from-photo photos (training-based threat)",
    )
    parser.add_argument(
        "--personalise-method",
        choices=("finetune", "condition"),
        default="finetune",
        help="finetune: fine-tune a copy of the model and a condition (DreamBooth analogue, default); condition: "
        "learn only the condition (textual-inversion analogue)",
    )
    parser.add_argument(
        "--personalise-start",
        choices=CONDITION_STARTS,
        default="random",
        help="--personalise-method finetune: where the identity condition starts: random (default) or embedding (the "
        "photos' mean --encoder embedding, as an attacker who has the encoder would start)",
    )
    parser.add_argument(
        "--personalise-steps",
        type=int,
        default=None,
        help=f"Adam steps of --personalise (default: finetune {FinetuneConfig.steps}, condition "
        f"{PersonaliseConfig.steps})",
    )
    parser.add_argument(
        "--personalise-lr",
        type=float,
        default=None,
        help=f"learning rate of --personalise: the model's weights for finetune (default {FinetuneConfig.lr:g}), "
        f"the condition for condition (default {PersonaliseConfig.lr:g})",
    )
    parser.add_argument(
        "--identity-guidance",
        type=float,
        default=0.0,
        help="pull each sampling step towards the embedding (with --personalise: the photos' mean embedding) through "
        "--encoder's gradient, at this scale (default 0: off; 0.05 is the white-box attacker of the benchmarks)",
    )
    parser.add_argument("--encoder", default="dlib", help="encoder of the photos' embeddings (default dlib)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--detector", default="dlib", help="face detector (default dlib)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and personalisation seed (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def run(args: argparse.Namespace) -> int:
    """Execute ``advface generate``."""
    import numpy as np

    from advface.encoders import create_encoder_with_models
    from advface.errors import ConfigError
    from advface.generative.model import load_generator
    from advface.generative.threats import generate_from_embeddings, personalise

    _check(args)
    out = Path(args.out)
    encoder: FaceEncoder | None
    if args.from_embeddings:
        from advface.embeddings_file import load_embeddings

        data = load_embeddings(args.from_embeddings)
        generator = load_generator(args.model, device=args.device, encoder_fingerprint=data.fingerprint)
        encoder = create_encoder_with_models(args.encoder, args.models_dir) if args.identity_guidance > 0 else None
        if encoder is not None and encoder.fingerprint != data.fingerprint:
            raise ConfigError(
                f"--identity-guidance: the embeddings file's templates are not --encoder {args.encoder}'s"
            )
        embeddings, names = data.embeddings, [str(i) for i in range(len(data.ids))]
    else:
        encoder = create_encoder_with_models(args.encoder, args.models_dir)
        generator = load_generator(args.model, device=args.device, encoder_fingerprint=encoder.fingerprint)
        chips = _chips(args.from_photo, encoder, args.detector)
        if args.personalise:
            size = generator.image_size
            small = np.stack([_resize(c, size) for c in chips])
            embedded = encoder.embed(np.stack(chips))
            start = embedded if args.personalise_start == "embedding" else None
            faces = personalise(
                generator,
                small,
                args.n,
                config=_personalise_config(args),
                embeddings=start,
                steps=args.steps,
                guidance=args.guidance,
                seed=args.seed,
                encoder=encoder,
                guide_scale=args.identity_guidance,
                guide_target=embedded.mean(axis=0),
            )[None]
            _write(faces, ["personalised"], out)
            return 0
        embeddings, names = encoder.embed(np.stack(chips)), [Path(p).stem for p in args.from_photo]
    faces = generate_from_embeddings(
        generator,
        embeddings,
        args.n,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        encoder=encoder,
        guide_scale=args.identity_guidance,
    )
    _write(faces, names, out)
    return 0


def _write(faces: np.ndarray, names: list[str], out: Path) -> None:
    """``OUT/<name>_<k>.png`` for the ``k``-th face of each name's group."""
    from advface.protect.image.io import save_png

    written = 0
    for name, group in zip(names, faces, strict=True):
        for k, face in enumerate(group):
            save_png(face, out / f"{name}_{k}.png")
            written += 1
    print(f"wrote {written} faces to {out}", file=sys.stderr)


def _check(args: argparse.Namespace) -> None:
    """ConfigError for flags that do not fit together, before anything is loaded."""
    from advface.errors import ConfigError

    if args.n < 1 or args.steps < 1:
        raise ConfigError("--n and --steps must be >= 1")
    if args.personalise and not args.from_photo:
        raise ConfigError("--personalise learns from --from-photo photos")
    if args.personalise_start == "embedding" and not (args.personalise and args.personalise_method == "finetune"):
        raise ConfigError("--personalise-start embedding applies to --personalise --personalise-method finetune")
    tuned = [f for f in ("steps", "lr") if getattr(args, f"personalise_{f}") is not None]
    if tuned and not args.personalise:
        raise ConfigError(f"--personalise-{tuned[0]} applies to --personalise")
    if args.personalise_steps is not None and args.personalise_steps < 1:
        raise ConfigError("--personalise-steps must be >= 1")
    if args.personalise_lr is not None and not 0 < args.personalise_lr < 1:
        raise ConfigError("--personalise-lr must be in (0, 1)")
    if not 0 <= args.identity_guidance < float("inf"):
        raise ConfigError("--identity-guidance must be a finite number >= 0")


def _personalise_config(args: argparse.Namespace) -> FinetuneConfig | PersonaliseConfig:
    """The chosen method's settings: its defaults, with ``--personalise-steps`` / ``--personalise-lr`` where given."""
    how: FinetuneConfig | PersonaliseConfig = (
        FinetuneConfig(seed=args.seed) if args.personalise_method == "finetune" else PersonaliseConfig(seed=args.seed)
    )
    given = {f: getattr(args, f"personalise_{f}") for f in ("steps", "lr")}
    return dataclasses.replace(how, **{f: v for f, v in given.items() if v is not None})


def _chips(photos: list[str], encoder: FaceEncoder, detector: str) -> list[np.ndarray]:
    """The encoder chip of the largest face of each photo; ImageError naming a photo without a face."""
    from advface.faces import FaceChipper, FacePolicy, create_detector
    from advface.images import load_image

    chipper = FaceChipper(create_detector(detector), encoder.chip, FacePolicy("largest"))
    return [chipper.chips(load_image(p), p)[0][1] for p in photos]


def _resize(chip: np.ndarray, size: int) -> np.ndarray:
    """A chip resized to the generator's face size."""
    from advface.datasets.pairs import resize_faces

    return resize_faces(chip[None], size)[0]
