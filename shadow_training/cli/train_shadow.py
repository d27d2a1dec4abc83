"""Train a shadow inversion model S (embedding -> face) for an encoder from a public face dataset.

The dataset is a folder of identity sub-folders (``--dataset``) or LFW (``--lfw``). Photos are detected, aligned to
the encoder's chip and embedded (cached under $ADVFACE_CACHE_DIR/pairs), the identities are split into disjoint
defender / attacker / evaluation groups (see advface.datasets.splits), and the decoder is trained on the chosen group
with the L1 pixel loss (plus an optional identity loss). Checkpoints are written every epoch to --work-dir, and a
rerun with the same settings resumes.
"""

from __future__ import annotations

import argparse
import sys

from advface.errors import AdvfaceError

NAME = "train-shadow"
HELP = "train a shadow inversion model for an encoder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface train-shadow``; the training defaults are :class:`TrainConfig`'s."""
    from advface.inversion.training import TrainConfig  # imports torch: here, not at module level

    defaults = TrainConfig()
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="folder of identity sub-folders of face photos")
    src.add_argument("--lfw", action="store_true", help="use LFW (--lfw-dir or $ADVFACE_LFW_DIR)")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--out", "-o", required=True, help="output checkpoint (.pt)")
    parser.add_argument("--encoder", default="dlib", help="encoder spec (default dlib)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--detector", default="dlib", help="face detector (default dlib)")
    parser.add_argument("--arch", default=defaults.arch, help="decoder architecture (default %(default)s)")
    parser.add_argument(
        "--image-size", type=int, default=defaults.image_size, help="reconstruction size in px (default %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs (default %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="training batch size (default %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument(
        "--id-weight",
        type=float,
        default=defaults.id_weight,
        help=f"weight of the identity loss through the encoder's torch module (default {defaults.id_weight:g}: L1 "
        "only)",
    )
    parser.add_argument(
        "--init",
        default=defaults.init_from,
        help="start from this checkpoint's weights (fine-tuning; same architecture)",
    )
    parser.add_argument(
        "--jitter",
        type=int,
        default=defaults.jitter,
        help="max pixel shift before the identity loss, so faces stay faces (default %(default)s)",
    )
    parser.add_argument(
        "--group",
        default="defender",
        choices=["defender", "attacker"],
        help="identity group to train on (default defender)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the split and of training (default %(default)s)"
    )
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--work-dir", help="folder for per-epoch resumable checkpoints")
    parser.add_argument("--workers", type=int, default=1, help="processes for face detection")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Execute ``advface train-shadow``."""
    from advface.datasets import LFW, IdentityFolderDataset
    from advface.encoders import create_encoder_with_models
    from advface.inversion.training import TrainConfig
    from shadow_training.pipeline import train_shadow

    if args.epochs < 1 or args.batch_size < 1 or args.image_size < 16:
        raise AdvfaceError("--epochs and --batch-size must be >= 1 and --image-size >= 16")
    dataset = LFW(args.lfw_dir) if args.lfw else IdentityFolderDataset(args.dataset)
    encoder = create_encoder_with_models(args.encoder, args.models_dir)
    config = TrainConfig(
        arch=args.arch,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        id_weight=args.id_weight,
        jitter=args.jitter,
        seed=args.seed,
        device=args.device,
        init_from=args.init,
    )
    _model, metadata = train_shadow(
        dataset,
        encoder,
        config,
        out=args.out,
        group=args.group,
        dataset_name="lfw" if args.lfw else str(args.dataset),
        detector=args.detector,
        workers=args.workers,
        work_dir=args.work_dir,
        progress=not args.quiet,
    )
    print(
        f"wrote {args.out}: {metadata['training_data']['photos']} photos of group {args.group}, "
        f"val L1 {metadata['metrics']['val_l1_evaluation_group']:.4f}",
        file=sys.stderr,
    )
    return 0
