"""Audit a template database against reconstruction attacks and for the ISO/IEC 24745 properties: irreversibility
(Type-I/II identity inference by decoder, GAN-prior and adaptive attackers), unlinkability (D_sys), renewability
and performance preservation. Writes OUT/report.html (self-contained), OUT/report.json and OUT/manifest.json (the
run's reproducibility bundle: code revision, settings, key ids, dataset manifest, cache keys, seeds, timings, logs).

Templates under audit: an embeddings file (--templates, ids = photo paths relative to the dataset root), a store
(--store advface:DATA_DIR?tenant=T, or sqlite:DATA_DIR / postgresql://... with --tenant; opened exactly as the
sidecar opens it from --config: encryption at rest and keyed transform included), or, with neither, the dataset's own
photos protected with --protection (or another scheme: --scheme, --protect-cmd). Attackers train on identities
disjoint from the audited people and are cached (--cache-dir). A store is also attacked by a database thief without
keys (its raw rows and file bytes). With --matching encrypted also the thief with the database and a memory dump of
the sidecar under encrypted matching (a sidecar-like child process). Torch runs on --threads threads (default 1: more
pays off only on idle cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from advface.audit import FULL_ATTACKERS, MATCHINGS, PROTECTIONS, TARGET_D_SYS, TARGET_TYPE1
from advface.threads import add_threads_argument, apply_threads

if TYPE_CHECKING:  # pragma: no cover
    from advface.audit.config import AuditConfig

NAME = "audit"
HELP = "audit templates against reconstruction attacks; HTML + JSON report (irreversibility, unlinkability, ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface audit``."""
    from advface.audit.schemes import CENTRE_DEFAULT

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
    scheme = parser.add_mutually_exclusive_group()
    scheme.add_argument(
        "--scheme",
        metavar="NAME",
        help="audit another protection scheme instead (docs/audit.md, 'Any scheme under audit'): biohash (the "
        "reference BioHashing), mlphash (MLP-hash), polyprotect (PolyProtect-style), MODULE:ATTR (a "
        "ProtectionScheme or a callable (templates, key) -> protected) or an advface.audit_schemes entry point",
    )
    scheme.add_argument(
        "--protect-cmd",
        metavar="CMD",
        help="audit a scheme given as a shell command: {in} and {out} are embeddings files (.npz, ids and "
        "embeddings), {key} (optional) a file holding the key as hex; e.g. 'python my_scheme.py {in} {out} {key}'",
    )
    parser.add_argument(
        "--raw-probes",
        action="store_true",
        help="with --scheme / --protect-cmd: the scheme's templates are compared with raw probes (default: probes "
        "go through the scheme with the enrolment's key)",
    )
    parser.add_argument(
        "--centre",
        action=argparse.BooleanOptionalAction,
        help="with a reference --scheme (biohash, mlphash, polyprotect): hash templates minus the public mean of the "
        "defender group's raw templates (--centre) or as they come (--no-centre); default: "
        + ("--centre" if CENTRE_DEFAULT else "--no-centre"),
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
    parser.add_argument("--epochs", type=int, help="training epochs of each decoder (default 20, quick 2)")
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
    parser.add_argument(
        "--target-type1",
        type=float,
        metavar="RATE",
        help="the verdict's irreversibility target: each attacker's best Type I success at FMR 0.1%% at most RATE, "
        f"by the system encoder and by the transfer judge (default {TARGET_TYPE1})",
    )
    parser.add_argument(
        "--pdf",
        action="store_true",
        help="also write report.pdf (verdict first; needs the pdf extra: pip install 'advface[pdf]')",
    )
    parser.add_argument(
        "--no-scenarios",
        action="store_true",
        help="leave out the scenarios (full disclosure, known pairs, score exposure; docs/audit.md, 'Scenarios')",
    )
    parser.add_argument(
        "--scenario-pool",
        type=int,
        metavar="N",
        help="scenarios: attacker-group photos whose (raw, protected) pairs full disclosure and known pairs learn "
        "from (default 2048; --quick 256)",
    )
    parser.add_argument(
        "--known-pairs-k",
        type=int,
        nargs="+",
        metavar="K",
        help="known pairs: the numbers of leaked pairs (default 1 4 16 64 256 1024; --quick 1 4 16 64; capped by "
        "the pool)",
    )
    parser.add_argument(
        "--score-victims",
        type=int,
        metavar="N",
        help="score exposure: templates rebuilt from the system's answers (default 16; --quick 4)",
    )
    parser.add_argument(
        "--score-budget",
        type=int,
        metavar="N",
        help="score exposure: query cap per template and way of querying (default 2000; --quick 500)",
    )
    parser.add_argument(
        "--matching",
        choices=MATCHINGS,
        help="encrypted: also the thief with the database and a memory dump of the sidecar under encrypted "
        "matching, no key service (a sidecar-like child process enrols the audited templates into an encrypted "
        "store; Linux; the encrypted extra; docs/audit.md, 'Encrypted matching'); default plain: not",
    )
    parser.add_argument(
        "--manifest-hashes",
        action="store_true",
        help="manifest.json (written beside the report): also the SHA-256 of every dataset file (default: one hash "
        "over the sorted file names and sizes)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the identity split, protection and attacks (default %(default)s)"
    )
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
        manifest_hashes=args.manifest_hashes or None,
        target_type1=args.target_type1,
        scheme=args.scheme,
        protect_cmd=args.protect_cmd,
        raw_probes=args.raw_probes or None,
        scheme_centre=args.centre,
        scenarios=False if args.no_scenarios else None,
        pdf=args.pdf or None,
        matching=args.matching,
        scenario_pool=args.scenario_pool,
        known_pairs_k=tuple(args.known_pairs_k) if args.known_pairs_k else None,
        score_victims=args.score_victims,
        score_budget=args.score_budget,
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
        t1 = attack.type1_success  # a kind is absent where a scheme's dimension does not fit the attacker
        line = f"{name}: Type I @FMR 0.1% " + ", ".join(f"{kind} {100 * rate:.1f}%" for kind, rate in t1.items())
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
    if result.utility is not None:
        for label, kinds in result.utility.by_fmr.items():
            print(
                f"FNMR @FMR {label}: "
                + ", ".join(
                    f"{kind} {100 * m.fnmr:.1f}% [{100 * m.fnmr_ci95[0]:.1f}, {100 * m.fnmr_ci95[1]:.1f}]"
                    for kind, m in kinds.items()
                )
                + f" ({next(iter(kinds.values())).genuine_comparisons} genuine, "
                f"{next(iter(kinds.values())).impostor_comparisons} impostor comparisons)"
            )
    if result.encrypted_matching is not None:
        print(f"encrypted matching, database + sidecar memory: {result.encrypted_matching.summary}")
    if result.verdict is not None:
        marks = {True: "met", False: "NOT MET", None: "not measured"}
        for row in result.verdict.rows:
            recovers = row.recovers if row.met is not None else row.recovers.removeprefix("not measured: ")
            print(f"verdict: {row.attacker}: {marks[row.met]}: {recovers}")
    for item in result.missing:
        print(f"missing: {item.stage}: {item.reason}")
    print(f"wrote {html_path}, {json_path} and {json_path.parent / 'manifest.json'}")
    return 0
