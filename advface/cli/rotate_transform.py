"""Re-issue every template of a sidecar's store (SQLite or PostgreSQL) under a new keyed-transform version
(or secret, or norm).

``advface rotate-transform --config advface.yaml --new-version 2`` reads the store folder, encryption key, transform
secret and norm from the sidecar's configuration file (its ``keyed_transform`` section describes the templates as
they are now), and rewrites every template ``v`` of tenant ``t`` as ``T_new,t(T_old,t^-1(v))`` in batches (one
transaction each). Interrupted at any point (even by kill -9), the same command resumes; the sidecar refuses to
start on a half-rotated store. Afterwards set ``keyed_transform.version`` (and the secret / norm, if changed) to the
new values. Stop the sidecar first (a store is opened by one process at a time).

Without ``--config``: ``--data-dir`` and ``--secret-file`` (plus ``--encryption-key-file`` for an encrypted store).

PostgreSQL store (``store.backend: postgresql`` in ``--config``, or ``--dsn``): the marker lives in the store's
``meta`` table (every replica reads it at start), the job's progress too; each batch bumps the generations of its
tenants, so running replicas refresh their indexes. Stop enrolment on every replica while it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

from advface.errors import ConfigError

if TYPE_CHECKING:
    from advface.store.base import StoreMetric

NAME = "rotate-transform"
HELP = "re-issue a store's templates under a new keyed-transform version (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface rotate-transform``."""
    parser.add_argument("--config", help="the sidecar's configuration file (store, encryption, keyed_transform)")
    parser.add_argument("--data-dir", help="the store folder (default: store.data_dir of --config)")
    parser.add_argument(
        "--dsn",
        help="a PostgreSQL store's connection string (default: store.dsn of --config when "
        "store.backend is postgresql, or ADVFACE_STORE_DSN)",
    )
    parser.add_argument("--table-prefix", default="advface", help="PostgreSQL table prefix (default advface)")
    parser.add_argument("--secret-file", help="the current transform secret (default: from --config)")
    parser.add_argument(
        "--encryption-key-file",
        action="append",
        default=[],
        metavar="FILE",
        help="key(s) of an encrypted store (default: the encryption section of --config)",
    )
    parser.add_argument("--new-version", type=int, required=True, help="key version to re-issue under (>= 1)")
    parser.add_argument("--new-secret-file", help="re-issue under another secret too (default: the same secret)")
    parser.add_argument(
        "--new-norm",
        help="norm equalisation of the new transform: 'auto', a number or 'null' (default: the current norm)",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="templates per transaction (default 1000)")
    parser.add_argument(
        "--allow-insecure-key-permissions",
        action="store_true",
        help="accept secret / key files readable by group or others",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Execute ``advface rotate-transform``."""
    from advface.config import default_config, load_config
    from advface.crypto import TemplateCipher, load_key_file
    from advface.protect.tenant_transform import TenantTransforms, read_marker, resolve_norm, rotate_store
    from advface.service.key_folder import resolve_key_folder
    from advface.service.keys import cipher_from_config, load_transform_secret
    from advface.store.sqlite_faiss import SQLiteFaissStore

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    config = load_config(args.config) if args.config else default_config()
    dsn = args.dsn
    if dsn is None and config.store.backend == "postgresql" and not args.data_dir:
        dsn = config.store.dsn or os.environ.get("ADVFACE_STORE_DSN")
        if not dsn:
            raise ConfigError("store.backend is postgresql but store.dsn is not set (or ADVFACE_STORE_DSN)")
    elif config.store.backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"rotate-transform does not support store.backend {config.store.backend!r}")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else Path(config.store.data_dir)
    path = data_dir / "templates.sqlite3"
    if dsn is None and not path.is_file():
        raise ConfigError(f"no template store at {path}")
    # the key folder's transform secret and encryption key, for the store given
    where_store = (
        dataclasses.replace(config.store, backend="postgresql", dsn=dsn)
        if dsn is not None
        else dataclasses.replace(config.store, backend="sqlite", data_dir=str(data_dir))
    )
    config = resolve_key_folder(dataclasses.replace(config, store=where_store), create=False)
    insecure = bool(args.allow_insecure_key_permissions)
    kt = config.keyed_transform
    if args.secret_file:
        secret = load_key_file(args.secret_file, allow_insecure_permissions=insecure)
    else:
        if not kt.enabled:
            raise ConfigError("give --secret-file, or --config with keyed_transform enabled (the current secret)")
        secret = load_transform_secret(kt)
    new_secret = (
        load_key_file(args.new_secret_file, allow_insecure_permissions=insecure) if args.new_secret_file else secret
    )
    if dsn is not None:
        from advface.store.postgres import PostgresStore, redact_dsn

        meta = PostgresStore.read_meta(dsn, args.table_prefix)
        recorded = json.loads(meta["keyed_transform"]) if "keyed_transform" in meta else None
        where = f"{redact_dsn(dsn)} (tables {args.table_prefix}_*)"
    else:
        meta = SQLiteFaissStore.read_meta(path)
        recorded = read_marker(data_dir)
        where = str(data_dir)
    current = recorded.get("rotating_from", recorded) if recorded else None
    if not current or not current.get("enabled"):
        raise ConfigError(
            f"{where} holds no templates issued under a keyed transform (no marker); enable the "
            "transform on an empty store, or re-encode from raw templates"
        )
    # the metric is checked by the store's constructor (ConfigError for an unknown one)
    dim, metric = int(meta["dim"]), cast("StoreMetric", meta["metric"])
    old = TenantTransforms(secret, dim, version=int(current["version"]), norm=current.get("norm"))
    new_norm = (
        old.norm
        if args.new_norm is None
        else resolve_norm(
            _norm_arg(args.new_norm), str(config.encoder.name if isinstance(config.encoder.name, str) else "custom")
        )
    )
    new = TenantTransforms(new_secret, dim, version=args.new_version, norm=new_norm)
    cipher: TemplateCipher | None
    if args.encryption_key_file:
        keys = [load_key_file(f, allow_insecure_permissions=insecure) for f in args.encryption_key_file]
        cipher = TemplateCipher(keys)
    else:
        cipher = cipher_from_config(config.encryption)
    progress = not args.quiet and os.isatty(2)
    if dsn is not None:
        with PostgresStore(dsn, dim, metric, cipher=cipher, table_prefix=args.table_prefix, pool_size=2) as pg:
            n = rotate_store(pg, None, old, new, batch_size=args.batch_size, progress=progress)
    else:
        with SQLiteFaissStore(path, dim, metric, use_gpu=False, cipher=cipher) as store:
            n = rotate_store(store, data_dir, old, new, batch_size=args.batch_size, progress=progress)
        where = str(path)
    norm = "off" if new.norm is None else f"{new.norm:g}"
    print(
        f"re-issued {n} templates of {where} under keyed transform version {new.version} (norm {norm}); set "
        f"keyed_transform.version: {new.version} in the sidecar's configuration"
        + (" and its secret to --new-secret-file" if args.new_secret_file else "")
    )
    return 0


def _norm_arg(text: str) -> object:
    low = text.strip().lower()
    if low in ("auto", "null", "none", "off"):
        return low
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--new-norm must be 'auto', a number or 'null', got {text!r}") from None
