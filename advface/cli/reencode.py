"""Re-encode an existing template database offline: raw templates in, AdvFace-protected templates out.

Sources and destinations (same forms for both; see docs/reencode.md):
``npz:PATH``, ``npy:VECTORS.npy[?ids=IDS.txt]``, ``parquet:PATH[?id_column=id&vector_column=embedding]``,
``sqlite:PATH?table=T[&id_column=..&vector_column=..&vector_format=blob|json]``,
``postgresql://USER@HOST:PORT/DB?table=T[&id_column=..&vector_column=..]`` (pgvector), and advface's own template
store ``advface:DATA_DIR?tenant=T`` (``advface:?tenant=T``: the store of --config as it is), opened exactly as
``advface serve --config`` opens it (store backend, encryption, keyed per-tenant transform of --config). As a
destination each source id becomes a subject with one template ``T_tenant(AdvFace(z))``, written chunk by chunk
(idempotently: a resumed run replaces, never duplicates); the tenant must be empty (--overwrite deletes its
subjects first). As a source it yields the stored, protected vectors (never raw ones).

--threads N (local engine; default: --config's protection.threads when set, else 1) protects N lanes at once,
each on one thread: the output does not depend on it. Without --lanes each method uses its own default (advface 4,
advface-id 16, as the sidecar does).

The source is streamed in chunks (--chunk-size); progress is committed per chunk, so the same command resumes a
killed run, and the output is identical to an uninterrupted run's (each template's protection depends only on the
template and the parameters). The destination is written atomically at the end, then verified against the source
(same ids, no NaN, within budget, matching on a sample); --swap then replaces the source. Protection parameters
come from the flags, else from --config's ``protection`` section, else the defaults.

``--method advface-id`` (or ``protection.method: advface-id`` in --config) re-encodes with identity-aware AdvFace:
one ``--shadow`` per ensemble member (else ``protection.shadows``; required), the differentiable torch module of
--encoder, ``--no-jitter`` (else ``protection.jitter``). It is deterministic per template like plain AdvFace
(resume, chunk size and engine do not change the output) but costs far more per template (``--dry-run``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from advface.errors import ConfigError
from advface.protect import METHODS, AdvFaceConfig, IdentityAwareConfig, shipped_shadow_path
from advface.reencode.job import Job, JobOptions
from advface.reencode.verify import VerifyOptions
from advface.threads import DEFAULT_THREADS, add_threads_argument, apply_threads, check_threads

NAME = "reencode"
HELP = "re-encode a template database (npz/npy/parquet/sqlite/postgresql/advface store) with AdvFace, resumably"

_DLIB_DISTANCE_THRESHOLD = 0.6  # dlib's published same-person distance (advface.encoders.dlib_runtime)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface reencode``."""
    d = AdvFaceConfig()
    parser.add_argument("--source", required=True, metavar="URI", help="raw templates (see above)")
    parser.add_argument("--dest", required=True, metavar="URI", help="where to write protected templates (new)")
    parser.add_argument("--engine", choices=["local", "ray"], default="local", help="local (default) or ray")
    parser.add_argument("--num-cpus", type=int, default=None, help="ray: CPUs of the local Ray instance")
    parser.add_argument("--ray-address", default=None, help="ray: address of an existing cluster (default: local)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="templates per chunk/commit (default 1024)")
    parser.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="advface config: protection.* (method, shadow(s), jitter, rel_l2, steps, seed); for an "
        "advface: store also "
        "store.*, encryption and keyed_transform, exactly as `advface serve --config` uses them",
    )
    parser.add_argument(
        "--encoder",
        default=None,
        help="encoder of the templates (picks the shipped shadow; advface-id runs its torch module; default dlib)",
    )
    parser.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help="advface (default; pixel objective, one shadow) or advface-id (identity-aware, an "
        "ensemble: one --shadow each); default: --config's protection.method",
    )
    parser.add_argument(
        "--shadow",
        action="append",
        default=None,
        metavar="CKPT",
        help="shadow model (default: shipped for encoder); repeat for advface-id's ensemble "
        "(default: --config's protection.shadows)",
    )
    parser.add_argument(
        "--no-jitter",
        action="store_true",
        help="advface-id: no pixel-shift schedule (default: --config's protection.jitter, else on)",
    )
    parser.add_argument("--seed", type=int, default=None, help=f"random-start seed (default {d.seed})")
    parser.add_argument("--rel-l2", type=float, default=None, metavar="E", help=f"budget (default {d.rel_l2})")
    parser.add_argument("--steps", type=int, default=None, help=f"ascent steps (default {d.steps})")
    parser.add_argument("--linf", type=float, default=None, metavar="X", help="L-inf bound on delta (absolute)")
    parser.add_argument("--step-size", type=float, default=None, metavar="F", help="sign step (default 2.5/steps)")
    parser.add_argument(
        "--lanes",
        type=int,
        default=None,
        help=f"rows per shadow call (default {d.lanes}; advface-id {IdentityAwareConfig.lanes}, as the sidecar)",
    )
    add_threads_argument(
        parser,
        "local engine: that many lanes protected at once, each on one thread; does not change the result "
        "(Ray actors always run on one thread each: size the pool with --num-cpus)",
        default=None,
        default_text="default: --config's protection.threads when set, else 1",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda when present, else cpu; ray: cuda when the cluster has GPUs)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing destination (advface: store: delete the tenant's subjects first)",
    )
    parser.add_argument("--restart", action="store_true", help="discard an unfinished run's progress")
    parser.add_argument(
        "--swap",
        action="store_true",
        help="after verification passes, replace the source by the destination (atomically)",
    )
    parser.add_argument("--verify-only", action="store_true", help="only verify an existing destination")
    parser.add_argument("--dry-run", action="store_true", help="time a sample, estimate the run, write nothing")
    parser.add_argument("--dry-run-sample", type=int, default=32, help="templates timed by --dry-run (default 32)")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="progress folder (default: beside a file destination, else ~/.cache/advface/reencode/<hash>)",
    )
    parser.add_argument(
        "--summary",
        default=None,
        metavar="JSON",
        help="verification summary path (default DEST.verify.json, or reencode-<table>.verify.json)",
    )
    parser.add_argument("--verify-sample", type=int, default=1000, help="templates in the matching sample")
    parser.add_argument(
        "--match-metric",
        choices=["euclidean", "cosine"],
        default=None,
        help="matching check metric (default euclidean for dlib, else cosine)",
    )
    parser.add_argument(
        "--match-threshold",
        type=float,
        default=None,
        help="same-person threshold (default 0.6 euclidean for dlib; none otherwise: not checked)",
    )
    parser.add_argument(
        "--min-match-fraction",
        type=float,
        default=0.99,
        help="share of the sample that must still match its source (default 0.99)",
    )
    parser.add_argument("--tolerance", type=float, default=1e-6, help="slack on the budget checks (default 1e-6)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def protection_config(
    args: argparse.Namespace,
) -> tuple[AdvFaceConfig | IdentityAwareConfig, str | None, str, tuple[str, ...]]:
    """Flags over ``--config``'s protection section over the defaults: ``(parameters, config's shadow, method,
    config's shadows)``."""
    base: dict[str, object] = {}
    shadow: str | None = None
    shadows: tuple[str, ...] = ()
    method, jitter = "advface", True
    if args.config:
        from advface.config import load_config
        from advface.service.key_folder import resolve_key_folder
        from advface.service.protection import protection_seed

        # the deployment's own seed (key folder) when protection.seed is unset: what its sidecar would issue
        section = resolve_key_folder(load_config(args.config)).protection
        if not section.enabled:
            raise ConfigError(f"{args.config}: protection.enabled is false; nothing to re-encode with")
        base = {"rel_l2": section.rel_l2, "steps": section.steps, "seed": protection_seed(section)}
        shadow, method, shadows, jitter = section.shadow, section.method, section.shadows, section.jitter
    method = args.method or method
    for key in ("seed", "rel_l2", "steps", "linf", "step_size"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    if args.lanes is not None:
        base["lanes"] = args.lanes  # else the method's own default (advface 4, advface-id 16: the sidecar's)
    if method == "advface-id":
        base.setdefault("rel_l2", AdvFaceConfig.rel_l2)  # one default budget for both methods (the flag's)
        base["jitter"] = bool(jitter) and not args.no_jitter
        return IdentityAwareConfig(**base), shadow, method, tuple(shadows)  # type: ignore[arg-type]
    if args.no_jitter:
        raise ConfigError("--no-jitter is for --method advface-id")
    if args.shadow and len(args.shadow) > 1:
        raise ConfigError("--method advface takes one --shadow (several are for --method advface-id)")
    return AdvFaceConfig(**base), shadow, method, tuple(shadows)  # type: ignore[arg-type]


def build_job(args: argparse.Namespace) -> Job:
    """The :class:`Job` the flags describe."""
    config, config_shadow, method, config_shadows = protection_config(args)
    encoder = args.encoder or "dlib"
    shadows: tuple[Path, ...] = ()
    if method == "advface-id":
        shadows = tuple(Path(p) for p in (args.shadow or config_shadows))
        if not shadows:
            raise ConfigError(
                "--method advface-id needs its shadow ensemble: one --shadow per member (or "
                "protection.shadows in --config)"
            )
        shadow = shadows[0]
    else:
        shadow = Path(args.shadow[0] if args.shadow else config_shadow or shipped_shadow_path(encoder))
    metric = args.match_metric or ("euclidean" if encoder in ("dlib", "dlib-torch") else "cosine")
    threshold = args.match_threshold
    if threshold is None and metric == "euclidean" and encoder in ("dlib", "dlib-torch"):
        threshold = _DLIB_DISTANCE_THRESHOLD
    verify = VerifyOptions(
        rel_l2=config.rel_l2,
        linf=config.linf,
        tolerance=args.tolerance,
        sample=args.verify_sample,
        match_metric=metric,
        match_threshold=threshold,
        min_match_fraction=args.min_match_fraction,
    )
    return Job(
        JobOptions(
            source=args.source,
            dest=args.dest,
            shadow=shadow,
            config=config,
            verify=verify,
            chunk_size=args.chunk_size,
            engine=args.engine,
            num_cpus=args.num_cpus,
            ray_address=args.ray_address,
            device=args.device,
            overwrite=args.overwrite,
            restart=args.restart,
            swap=args.swap,
            work_dir=Path(args.work_dir) if args.work_dir else None,
            summary=Path(args.summary) if args.summary else None,
            quiet=args.quiet,
            store_config=Path(args.config) if args.config else None,
            method=method,
            shadows=shadows,
            encoder=encoder,
        )
    )


def torch_thread_count(args: argparse.Namespace) -> int:
    """``--threads``, else ``--config``'s ``protection.threads`` when set, else 1; the Ray engine: 1 (its actors, and
    the driver's --dry-run that times one of them, run on one thread)."""
    if args.engine == "ray":
        if args.threads not in (None, 1):
            raise ConfigError(
                "--threads is for the local engine; the Ray engine runs one single-threaded actor per CPU (--num-cpus)"
            )
        return 1
    if args.threads is not None:
        return check_threads(args.threads)
    if args.config:
        from advface.config import load_config

        configured = load_config(args.config).protection.threads
        if configured:
            return int(configured)
    return DEFAULT_THREADS


def run(args: argparse.Namespace) -> int:
    """Execute ``advface reencode``: 0 when done and verified, 1 when verification failed."""
    if sum([args.verify_only, args.dry_run]) > 1:
        raise ConfigError("--verify-only and --dry-run exclude each other")
    apply_threads(torch_thread_count(args))
    job = build_job(args)
    if args.dry_run:
        job.dry_run(args.dry_run_sample)
        return 0
    summary = job.verify_only() if args.verify_only else job.run()
    return 0 if summary["passed"] else 1
