"""Protect templates with AdvFace: an embeddings file (.npz) in, a protected embeddings file out.

Each template z is replaced by z + delta, with ||delta|| <= E * ||z|| (E = --rel-l2), delta found by sign-gradient
ascent on a shadow inversion model's reconstruction error (AdvFace, Wang et al. CVPR 2023). ids, failed ids, the
encoder name and fingerprint are copied; the output has the input's shape. Every template's result depends only on
that template and the parameters (--seed, --rel-l2, --steps, --linf, --step-size, --lanes), not on the batch size
or the file's order. Without --shadow, the shadow model advface ships for the encoder is used.

``--method advface-id`` runs identity-aware AdvFace instead (advface.protect.identity_aware): the identity of each
shadow's reconstruction, measured by the encoder's differentiable module, is pushed away from the owner; give it one
``--shadow`` per ensemble member (identity-aware shadows: ``advface train-shadow --id-weight 1``). It has its own
defaults (budget 0.2, 10 steps, 16 lanes) and refuses to run without identity-aware shadows (no --shadow, or only
checkpoints trained without an identity loss) unless --allow-pixel-shadows. It costs far more per template than
plain AdvFace.

``--threads N`` (default 1) protects N lanes at once, each on one thread: the output never depends on N. More than
one thread pays off only on idle cores.

Plain AdvFace slows pixel-only inversion attacks; identity-aware attackers recover most faces at budgets that keep
matching. Do not treat the output as safe to publish.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from tqdm import tqdm

from advface.embeddings_file import EmbeddingsFile, load_embeddings, save_embeddings
from advface.errors import ConfigError
from advface.protect import (
    AdvFaceConfig,
    IdentityAwareConfig,
    ProtectionSpec,
    Protector,
    TemplateProtector,
    load_protector,
    perturbation_stats,
    shipped_shadow_path,
    trained_with_identity_loss,
)
from advface.threads import add_threads_argument, apply_threads

NAME = "protect"
HELP = "embeddings file -> AdvFace-protected embeddings file (.npz)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface protect``."""
    plain, ident = AdvFaceConfig(), IdentityAwareConfig()

    def default(name: str) -> str:
        return f"default {getattr(plain, name)}; advface-id {getattr(ident, name)}"

    parser.add_argument("--in", dest="input", required=True, metavar="IN.npz", help="input embeddings file")
    parser.add_argument("--out", "-o", required=True, metavar="OUT.npz", help="output embeddings file")
    parser.add_argument(
        "--encoder",
        default=None,
        help="encoder the templates come from (picks the shipped shadow); default: the file's, else dlib",
    )
    parser.add_argument(
        "--method",
        choices=["advface", "advface-id"],
        default="advface",
        help="advface (pixel objective, one shadow; default) or advface-id (identity objective, shadow ensemble: "
        "one --shadow per identity-aware shadow; its own defaults for the parameters below)",
    )
    parser.add_argument(
        "--shadow",
        action="append",
        default=None,
        metavar="CKPT",
        help="shadow model checkpoint (advface.inversion format; repeat for advface-id's ensemble); "
        "default for advface: the one shipped for the encoder; advface-id requires its own",
    )
    parser.add_argument(
        "--allow-pixel-shadows",
        "--allow-shipped-shadow",
        dest="allow_pixel_shadows",
        action="store_true",
        help="advface-id: run without identity-aware shadows -- with the pixel shadow shipped for the encoder "
        "when there is no --shadow, or with shadows trained without an identity loss (weak; a warning is printed)",
    )
    parser.add_argument("--seed", type=int, default=None, help=f"random-start seed (default {plain.seed})")
    parser.add_argument(
        "--rel-l2",
        type=float,
        default=None,
        metavar="E",
        help=f"budget ||delta|| / ||z|| per template ({default('rel_l2')})",
    )
    parser.add_argument("--steps", type=int, default=None, help=f"ascent steps ({default('steps')})")
    parser.add_argument(
        "--linf", type=float, default=None, metavar="X", help="also bound every coordinate of delta by X (absolute)"
    )
    parser.add_argument(
        "--step-size",
        type=float,
        default=None,
        metavar="F",
        help="L2 length of one sign step as a fraction of the radius (default 2.5 / steps)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"templates per chunk (default {plain.batch_size}; does not change the result)",
    )
    parser.add_argument(
        "--lanes",
        type=int,
        default=None,
        help=f"rows per shadow call ({default('lanes')}); changes the result slightly: keep it per database",
    )
    add_threads_argument(parser, "that many lanes protected at once, each on one thread; does not change the result")
    parser.add_argument("--device", default=None, help="torch device for the shadow (default cpu)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _warn(message: str) -> None:
    print(f"advface protect: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Execute ``advface protect``."""
    plain = args.method == "advface"
    if plain and args.shadow and len(args.shadow) > 1:
        raise ConfigError("--method advface takes one --shadow (several are for --method advface-id)")
    if plain and args.allow_pixel_shadows:
        raise ConfigError("--allow-pixel-shadows is for --method advface-id")
    threads = apply_threads(args.threads)
    params: dict[str, Any] = dict(
        steps=args.steps,
        rel_l2=args.rel_l2,
        linf=args.linf,
        step_size=args.step_size,
        seed=args.seed,
        batch_size=args.batch_size,
        lanes=args.lanes,
    )
    params = {key: value for key, value in params.items() if value is not None}  # unset: the method's defaults
    config = AdvFaceConfig(**params) if plain else IdentityAwareConfig(**params)
    data = load_embeddings(args.input)
    encoder = args.encoder or data.encoder or "dlib"
    if args.shadow:
        shadows = tuple(args.shadow)
    elif plain or args.allow_pixel_shadows:
        shadows = (str(shipped_shadow_path(encoder)),)
        if not plain:
            _warn(
                f"--method advface-id against the pixel shadow shipped for {encoder} ({shadows[0]}), a one-member "
                "ensemble without identity loss: weak against identity-aware attackers"
            )
    else:
        raise ConfigError(
            "--method advface-id needs identity-aware shadows: one --shadow CKPT per ensemble member (train them "
            "with `advface train-shadow --id-weight 1`, several architectures); --allow-pixel-shadows runs it "
            f"against the pixel shadow shipped for {encoder} instead (weak)"
        )
    dim = int(data.embeddings.shape[1])
    protector = load_protector(
        ProtectionSpec(args.method, shadows, config, encoder), device=args.device, templates=(data.fingerprint, dim)
    )
    paths = ", ".join(str(p) for p in protector.shadow_paths)
    if isinstance(protector, Protector):  # plain AdvFace: its shadow's encoder name, when fingerprints are missing
        trained_for = protector.metadata.get("encoder")
        if trained_for and str(trained_for) != encoder and not (data.fingerprint and protector.encoder_fingerprint):
            raise ConfigError(
                f"shadow model {paths} was trained for encoder {trained_for}, but the templates are from {encoder}"
            )
    elif args.shadow:
        _check_identity_shadows(protector, args.allow_pixel_shadows)

    start = time.perf_counter()
    desc = f"protect ({encoder})" if plain else f"protect advface-id ({encoder})"
    with tqdm(total=len(data.ids), desc=desc, unit="template", disable=args.quiet) as bar:
        protected = protector.protect(data.embeddings, progress=bar.update)
    how = f"shadow {paths}" if plain else f"advface-id shadows {paths}"
    how += f", steps {config.steps}, lanes {config.lanes}, {threads} thread{'s' if threads != 1 else ''}"
    _write(args, data, protected, time.perf_counter() - start, config.rel_l2, how)
    return 0


def _check_identity_shadows(protector: TemplateProtector, allowed: bool) -> None:
    """Refuse (unless ``allowed``) an advface-id ensemble whose every checkpoint says it learnt no identity loss;
    warn about the members that did not."""
    metadata = getattr(protector, "shadow_metadata", ())
    pixel = [
        str(path)
        for path, meta in zip(protector.shadow_paths, metadata, strict=False)
        if trained_with_identity_loss(meta) is False
    ]
    if not pixel:
        return
    if len(pixel) == len(protector.shadow_paths) and not allowed:
        raise ConfigError(
            f"--method advface-id: no identity-aware shadow: {', '.join(pixel)} "
            f"{'was' if len(pixel) == 1 else 'were'} trained without an identity loss (train_config.id_weight 0); "
            "train identity-aware shadows with `advface train-shadow --id-weight 1`, or pass "
            "--allow-pixel-shadows to use them anyway (weak)"
        )
    _warn(f"advface-id ensemble members trained without an identity loss: {', '.join(pixel)}")


def _write(
    args: argparse.Namespace,
    data: EmbeddingsFile,
    protected,
    seconds: float,
    budget: float,  # noqa: ANN001
    how: str,
) -> None:
    stats = perturbation_stats(data.embeddings, protected)
    out = save_embeddings(
        args.out,
        EmbeddingsFile(
            ids=list(data.ids),
            embeddings=protected,
            encoder=data.encoder,
            fingerprint=data.fingerprint,
            failed=dict(data.failed),
        ),
    )
    print(
        f"protected {len(data.ids)} templates (dim {protected.shape[1]}, {how}) in {seconds:.2f} s; "
        f"rel-L2 mean {stats['rel_l2_mean']:.4f} (max {stats['rel_l2_max']:.4f}, budget {budget}), "
        f"cosine to raw mean {stats['cosine_mean']:.4f}; wrote {out}",
        file=sys.stderr,
    )
