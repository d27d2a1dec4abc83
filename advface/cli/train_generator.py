"""Train advface's identity-conditioned face generator (a latent diffusion model) on one identity group.

The dataset is a folder of identity sub-folders (``--dataset``) or LFW (``--lfw``). Photos are detected, aligned and
embedded by ``--encoder`` (cached under $ADVFACE_CACHE_DIR/pairs); the project's identity-disjoint split gives the
``--group``: ``defender`` (the defender surrogate that photo protection may use) or ``attacker`` (the model that
threats and audits run on); evaluation identities are never trained on. ``--extra-dcgan N`` adds N faces sampled
from the DCGAN of ``gan-face-generate``, detected, aligned and embedded like the photos (kept in the work folder).
Stage 1 trains the autoencoder (``--ae-steps``), stage 2 the latent denoiser (``--steps``). The work folder
(``--work-dir``, default OUT.work) holds a checkpoint written every ``--checkpoint-minutes``: the same command resumes
a killed run, with the same result for the same ``--seed``. CPU by default, CUDA when present (``--device``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "train-generator"
HELP = "train the identity-conditioned face generator (latent diffusion) on one identity group"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface train-generator``."""
    from advface.generative.config import GeneratorTrainConfig as C

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="folder of identity sub-folders of face photos")
    src.add_argument("--lfw", action="store_true", help="use LFW (--lfw-dir or $ADVFACE_LFW_DIR)")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--group", required=True, choices=["defender", "attacker"], help="identity group to train on")
    parser.add_argument("--out", "-o", required=True, help="output checkpoint (.pt)")
    parser.add_argument("--work-dir", help="resumable training state (default: OUT.work)")
    parser.add_argument("--encoder", default="dlib", help="encoder whose embeddings condition the model (default dlib)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--detector", default="dlib", help="face detector (default dlib)")
    parser.add_argument(
        "--image-size", type=int, default=C.image_size, help=f"face size in px (default {C.image_size})"
    )
    parser.add_argument("--ae-steps", type=int, default=C.ae_steps, help=f"autoencoder steps (default {C.ae_steps})")
    parser.add_argument("--steps", type=int, default=C.steps, help=f"denoiser steps (default {C.steps})")
    parser.add_argument("--batch", type=int, default=C.batch, help=f"denoiser batch (default {C.batch})")
    parser.add_argument("--width", type=int, default=C.width, help=f"denoiser base width (default {C.width})")
    parser.add_argument("--seed", type=int, default=C.seed, help="seed of every random draw of training")
    parser.add_argument(
        "--extra-dcgan",
        type=int,
        default=C.extra_dcgan,
        metavar="N",
        help=f"also train on N faces sampled from the DCGAN of gan-face-generate (latents seeded with --seed), "
        f"detected, aligned and embedded like the photos; samples without a face are dropped (default {C.extra_dcgan})",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=C.checkpoint_minutes,
        help=f"minutes between work-folder checkpoints (default {C.checkpoint_minutes:g})",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes for face detection")
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="write OUT from the work folder's last checkpoint (the model as trained so far, EMA weights) and stop, "
        "without training; a running training is not disturbed",
    )
    parser.add_argument(
        "--half",
        action="store_true",
        help="store OUT's weights in float16 (half the file; they are computed in float32 when loaded): how the "
        "shipped defender surrogate is written",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Execute ``advface train-generator``."""
    from advface.datasets import LFW, IdentityFolderDataset
    from advface.encoders import create_encoder_with_models
    from advface.errors import ConfigError
    from advface.generative.config import GeneratorTrainConfig
    from advface.generative.data import group_training_data
    from advface.generative.extra_faces import cached_dcgan_faces, with_extra_faces
    from advface.generative.model import save_generator
    from advface.generative.training import GeneratorTrainer

    config = GeneratorTrainConfig(
        image_size=args.image_size,
        ae_steps=args.ae_steps,
        steps=args.steps,
        batch=args.batch,
        width=args.width,
        seed=args.seed,
        extra_dcgan=args.extra_dcgan,
        device=args.device,
        threads=args.threads,
        checkpoint_minutes=args.checkpoint_minutes,
    )
    config.check()
    dataset = LFW(args.lfw_dir) if args.lfw else IdentityFolderDataset(args.dataset)
    encoder = create_encoder_with_models(args.encoder, args.models_dir)
    name = "lfw" if args.lfw else str(args.dataset)
    data = group_training_data(
        dataset,
        encoder,
        args.group,
        image_size=args.image_size,
        detector=args.detector,
        workers=args.workers,
        dataset_name=name,
        progress=not args.quiet,
    )
    work_dir = Path(args.work_dir) if args.work_dir else Path(str(args.out) + ".work")
    if config.extra_dcgan:
        extra = cached_dcgan_faces(
            work_dir,
            config.extra_dcgan,
            encoder,
            seed=config.seed,
            image_size=args.image_size,
            detector=args.detector,
            progress=not args.quiet,
        )
        data = with_extra_faces(data, extra)
        print(
            f"DCGAN extra faces: {extra.kept} of {extra.sampled} samples kept ({extra.sampled - extra.kept} without a "
            f"face dropped)",
            file=sys.stderr,
        )
    metadata = {"role": args.group, "encoder": encoder.name, "encoder_fingerprint": encoder.fingerprint}
    trainer = GeneratorTrainer(config, data, work_dir, metadata, progress=not args.quiet)
    if args.snapshot:
        if trainer.stage == "autoencoder":
            raise ConfigError(f"{work_dir}: no denoiser checkpoint yet (stage autoencoder, step {trainer.step})")
        save_generator(args.out, trainer.generator(), half=args.half)
        print(f"wrote {args.out}: snapshot at {trainer.stage} step {trainer.step}", file=sys.stderr)
        return 0
    generator = trainer.run()
    save_generator(args.out, generator, half=args.half)
    print(
        f"wrote {args.out}: {data.description['photos']} photos of group {args.group} "
        f"({len(data.faces)} faces with mirrors), autoencoder {config.ae_steps} + denoiser {config.steps} steps",
        file=sys.stderr,
    )
    return 0
