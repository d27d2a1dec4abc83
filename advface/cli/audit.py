"""Audit a template database against reconstruction attacks and for the ISO/IEC 24745 properties: irreversibility
(Type-I/II identity inference by decoder, GAN-prior and adaptive attackers), unlinkability (D_sys), renewability
and performance preservation. Writes OUT/report.html (self-contained) and OUT/report.json.

Templates under audit: an embeddings file (--templates, ids = photo paths relative to the dataset root), a store
(--store advface:DATA_DIR?tenant=T, or sqlite:DATA_DIR / postgresql://... with --tenant; opened exactly as the
sidecar opens it from --config: encryption at rest and keyed transform included), or, with neither, the dataset's own
photos protected with --protection. Attackers train on identities disjoint from the audited people and are cached
(--cache-dir). A store is also attacked by a database thief without keys (its raw rows and file bytes).
Torch runs on --threads threads (default 1: more pays off only on idle cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from advface.audit import FULL_ATTACKERS, PROTECTIONS, TARGET_D_SYS
from advface.threads import add_threads_argument, apply_threads

if TYPE_CHECKING:  # pragma: no cover
    from advface.audit.config import AuditConfig

NAME = "audit"
HELP = "audit templates against reconstruction attacks; HTML + JSON report (irreversibility, unlinkability, ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface audit``."""
    parser.add_argument("--data", required=True, help="face dataset: identity folders (or an LFW root)")
    parser.add_argument("--out", required=True, help="folder for report.html and report.json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small subsets (40 identities, 32x32 decoders, 2 epochs, short GAN search): minutes on a CPU",
    )
    parser.add_argument("--encoder", default="dlib", help="face encoder (default dlib)")
    parser.add_argument(
        "--transfer-encoder",
        default="auto",
        metavar="NAME",
        help="second encoder that judges every reconstruction too, untouched by attackers and protection (visual "
        "identity leakage): default auto = mobilefacenet (mobilefacenet_128d.onnx in $ADVFACE_MODELS_DIR) for "
        "dlib templates, dlib for others; none: no transfer judge",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--templates", type=Path, help="embeddings file (.npz with ids) holding the templates to audit")
    source.add_argument(
        "--store",
        help="template store to audit, opened like the sidecar from --config: "
        "advface:DATA_DIR?tenant=T (advface:?tenant=T: the configuration's own store, e.g. "
        "PostgreSQL); sqlite:DATA_DIR "
        "(= advface:DATA_DIR with store.backend sqlite) or a postgresql:// DSN (= the "
        "configuration with store.backend postgresql and that store.dsn) with --tenant. "
        "Subject ids must be photo ids",
    )
    parser.add_argument("--tenant", help="tenant of --store (or ?tenant= of an advface: location)")
    parser.add_argument(
        "--config",
        dest="store_config",
        type=Path,
        metavar="FILE",
        help="the sidecar's configuration (advface.yaml) for --store: encryption key "
        "(encryption), keyed per-tenant transform (keyed_transform), store backend; default: "
        "defaults and ADVFACE_* variables, like advface serve",
    )
    parser.add_argument(
        "--protection",
        choices=PROTECTIONS,
        help="protection applied to the dataset's templates and used for unlinkability, "
        "renewability and the adaptive attacker's enrolments (default advface). Not with "
        "--store: a store is audited with the protection section of its --config",
    )
    parser.add_argument("--rel-l2", type=float, help="AdvFace budget ||delta|| / ||z|| (default: the library's, 0.1)")
    parser.add_argument("--steps", type=int, help="AdvFace steps (default: the library default, as the sidecar)")
    parser.add_argument(
        "--shadow",
        type=Path,
        action="append",
        dest="shadows",
        help="shadow checkpoint (default: the shipped one for the encoder); repeat for the advface-id ensemble",
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        help="secret of the keyed transform (advface keygen file); default: an ephemeral random key; "
        "not with a --store whose --config has a keyed transform (the store's own is used)",
    )
    parser.add_argument(
        "--attackers",
        nargs="+",
        help=f"attackers to run (default full: {' '.join(FULL_ATTACKERS)}; decoder archs: deconv, "
        "resup, pixelshuffle, tokens, modconv, each optionally +id; gan-prior; adaptive; diffusion: the "
        "identity-conditioned generator of advface.generative, trained on the attacker group or --generator)",
    )
    parser.add_argument("--cache-dir", type=Path, help="cache of pairs and trained attackers (default advface cache)")
    parser.add_argument(
        "--no-pairs-cache", action="store_true", help="do not cache the dataset's (embedding, face) pairs on disk"
    )
    parser.add_argument("--no-images", action="store_true", help="leave the image grid out of the report")
    parser.add_argument("--image-size", type=int, help="decoder output size (default 64, quick 32)")
    parser.add_argument("--epochs", type=int, help="training epochs of each decoder (default 20, quick 1)")
    parser.add_argument("--batch-size", type=int, help="decoder training batch size (default 64, quick 16)")
    parser.add_argument("--max-identities", type=int, help="use at most this many identities (0: all; quick 40)")
    parser.add_argument("--max-photos", type=int, help="at most this many photos per identity (0: all; quick 6)")
    parser.add_argument("--per-identity", type=int, help="evaluation photos per person (default 3, quick 2)")
    parser.add_argument("--max-victims", type=int, help="cap on audited templates (0: all; quick 40)")
    parser.add_argument("--train-identities", type=int, help="cap on attacker-group identities (0: all)")
    parser.add_argument("--gan-templates", type=int, help="templates attacked by the GAN prior (default 48, quick 4)")
    parser.add_argument("--gan-steps", type=int, help="GAN-prior search steps (default 60, quick 8)")
    parser.add_argument("--gan-restarts", type=int, help="GAN-prior restarts per template (default 4, quick 2)")
    parser.add_argument(
        "--link-keys",
        type=int,
        help="pairs of tenant keys over which D_sys with the key is measured; the worst is held to "
        f"the {TARGET_D_SYS} target (default 5, quick 3)",
    )
    parser.add_argument(
        "--generator",
        type=Path,
        metavar="CKPT",
        help="diffusion attacker: a trained generator checkpoint (advface train-generator) of the audit's encoder "
        "instead of training one on the attacker group",
    )
    parser.add_argument(
        "--diffusion-guidance",
        type=float,
        metavar="SCALE",
        help="diffusion attacker: reconstruction guidance by the encoder's torch module on the decoded face "
        "(default 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="face-detection processes")
    add_threads_argument(parser, "attacker training, protection and attacks in this process")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """The :class:`AuditConfig` the flags describe."""
    from advface.audit.config import AuditConfig

    overrides = dict(
        encoder=args.encoder,
        transfer_encoder=args.transfer_encoder,
        templates=args.templates,
        store=args.store,
        tenant=args.tenant,
        store_config=args.store_config,
        protection=args.protection,
        rel_l2=args.rel_l2,
        steps=args.steps,
        shadows=tuple(args.shadows) if args.shadows else None,
        key_file=args.key_file,
        attackers=tuple(args.attackers) if args.attackers else None,
        cache_dir=args.cache_dir,
        pairs_cache=not args.no_pairs_cache,
        images=not args.no_images,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_identities=args.max_identities,
        max_photos=args.max_photos,
        per_identity=args.per_identity,
        max_victims=args.max_victims,
        train_identities=args.train_identities,
        gan_templates=args.gan_templates,
        gan_steps=args.gan_steps,
        gan_restarts=args.gan_restarts,
        link_keys=args.link_keys,
        generator=args.generator,
        diffusion_guidance=args.diffusion_guidance,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    )
    if args.quick:
        return AuditConfig.quick_mode(Path(args.data), Path(args.out), **overrides)
    return AuditConfig(
        data=Path(args.data), out=Path(args.out), **{k: v for k, v in overrides.items() if v is not None}
    )


def run(args: argparse.Namespace) -> int:
    """Execute ``advface audit``."""
    from advface.audit.run import run_audit

    apply_threads(args.threads)
    html_path, json_path, result = run_audit(config_from_args(args))
    for name, attack in result.attacks.items():
        t1 = attack.type1_success
        line = (
            f"{name}: Type I @FMR 0.1% raw {100 * t1['raw']:.1f}%, protected {100 * t1['protected']:.1f}%, "
            f"protected+key {100 * t1['protected+key']:.1f}%"
        )
        if result.transfer is not None:
            judged = [
                f"{kind} {100 * value:.1f}%"
                for kind, r in attack.by_templates.items()
                if r.transfer is not None and (value := r.transfer.at_fmr["1e-3"].type1_success) is not None
            ]
            line += f"; judged by {result.transfer.encoder}: " + ", ".join(judged)
        print(line)
    if result.thief_without_keys is not None:
        print(f"database thief: {result.thief_without_keys.summary}")
    if result.unlinkability is not None:
        unl = result.unlinkability
        print("unlinkability D_sys:", {k: round(v, 3) for k, v in unl.d_sys.items()})
        across = unl.across_keys
        print(
            f"AdvFace + key over {across.key_pairs} key pairs: D_sys mean {across.mean:.3f}, worst "
            f"{across.worst:.3f} (target <= {unl.target_d_sys_max}: "
            f"{'met' if unl.key_meets_target else 'not met'}; {across.above_noise_p95} above the 95th "
            "percentile of unlinkable scores)"
        )
    for item in result.missing:
        print(f"missing: {item.stage}: {item.reason}")
    print(f"wrote {html_path} and {json_path}")
    return 0
