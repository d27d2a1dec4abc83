"""Re-encrypt a template store under a new key (key rotation), or encrypt an unencrypted store.

Rotation: ``advface rotate-key --data-dir DIR --old-key-file OLD --new-key-file NEW`` re-encrypts every template
under NEW in batches (each batch one transaction). It can be interrupted at any point (even by kill -9): every
template stays readable under OLD or NEW, and running the same command again resumes. Stop the sidecar first (a
store is opened by one process at a time), or let it run with ``encryption.key_file: NEW`` and
``encryption.previous_key_files: [OLD]`` -- it writes new templates under NEW and reads both -- and rotate while it
is stopped for a moment. Afterwards configure only NEW and destroy OLD (and backups made under it) when no backup
needs it any more.

Encrypting an unencrypted store: give only ``--new-key-file`` (the store records that a migration is under way;
an interrupted migration also resumes with the same command).

PostgreSQL store: ``--dsn DSN`` (or ``--config advface.yaml`` with ``store.backend: postgresql``; its ``store.dsn``,
or ``ADVFACE_STORE_DSN``). The same rules hold (one transaction per batch, resumable, every row readable under OLD
or NEW); sidecars sharing the database may keep running if they are configured with NEW and OLD (previous key):
re-encryption does not change any vector, so their indexes stay valid.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from advface.crypto import TemplateCipher, load_key_file
from advface.errors import ConfigError

if TYPE_CHECKING:
    from advface.store.base import StoreMetric

NAME = "rotate-key"
HELP = "re-encrypt a template store under a new key (or encrypt an unencrypted one)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface rotate-key``."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", help="the sidecar's store.data_dir (holds templates.sqlite3)")
    where.add_argument("--db", help="the SQLite template database itself")
    where.add_argument("--dsn", help="a PostgreSQL store's connection string (tables <prefix>_*)")
    where.add_argument("--config", help="the sidecar's configuration file (its store section: sqlite or postgresql)")
    parser.add_argument("--table-prefix", default="advface", help="PostgreSQL table prefix (default advface)")
    parser.add_argument("--new-key-file", required=True, help="the key to encrypt under (advface keygen)")
    parser.add_argument(
        "--old-key-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a key the store is (partly) encrypted under; repeat for several; omit to encrypt an unencrypted store",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="templates per transaction (default 1000)")
    parser.add_argument(
        "--allow-insecure-key-permissions",
        action="store_true",
        help="accept key files readable by group or others",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Execute ``advface rotate-key``."""
    from advface.store.sqlite_faiss import SQLiteFaissStore

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    dsn = args.dsn
    if args.config:
        from advface.config import load_config

        store_cfg = load_config(args.config).store
        if store_cfg.backend == "postgresql":
            dsn = store_cfg.dsn or os.environ.get("ADVFACE_STORE_DSN")
            if not dsn:
                raise ConfigError(f"{args.config}: store.backend is postgresql but store.dsn is not set")
        else:
            args.data_dir = store_cfg.data_dir
    if dsn:
        return _run_postgres(args, dsn)
    path = Path(args.db).expanduser() if args.db else Path(args.data_dir).expanduser() / "templates.sqlite3"

    def open_store(dim: int, metric: StoreMetric, ring: TemplateCipher, migrate: bool) -> SQLiteFaissStore:
        return SQLiteFaissStore(path, dim, metric, use_gpu=False, cipher=ring, migrate_plaintext=migrate)

    return _rotate(args, SQLiteFaissStore.read_meta(path), str(path), str(path), open_store)


def _run_postgres(args: argparse.Namespace, dsn: str) -> int:
    """``advface rotate-key`` for a PostgreSQL store."""
    from advface.store.postgres import PostgresStore, redact_dsn

    def open_store(dim: int, metric: StoreMetric, ring: TemplateCipher, migrate: bool) -> PostgresStore:
        return PostgresStore(
            dsn, dim, metric, cipher=ring, table_prefix=args.table_prefix, pool_size=2, migrate_plaintext=migrate
        )

    where = redact_dsn(dsn)
    return _rotate(
        args,
        PostgresStore.read_meta(dsn, args.table_prefix),
        where,
        f"{where} (tables {args.table_prefix}_*)",
        open_store,
    )


def _rotate(
    args: argparse.Namespace,
    meta: Mapping[str, str],
    where: str,
    label: str,
    open_store: Callable[[int, StoreMetric, TemplateCipher, bool], Any],
) -> int:
    """Rotate (or encrypt) the store at ``where`` whose ``meta`` table was read; ``open_store(dim, metric, ring,
    migrate_plaintext)`` opens it; the report names it ``label``."""
    try:
        # the metric is checked by the store's constructor (ConfigError for an unknown one)
        dim, metric = int(meta["dim"]), cast("StoreMetric", meta["metric"])
    except (KeyError, ValueError):
        raise ConfigError(f"{where} is not an advface template store (no dim/metric in meta)") from None
    insecure = bool(args.allow_insecure_key_permissions)
    new_key = load_key_file(args.new_key_file, allow_insecure_permissions=insecure)
    old_keys = [load_key_file(f, allow_insecure_permissions=insecure) for f in args.old_key_file]
    new = TemplateCipher(new_key)
    encrypted = meta.get("encryption", "none") != "none"
    if not encrypted and old_keys:
        raise ConfigError(f"{where} is not encrypted: omit --old-key-file to encrypt it under --new-key-file")
    with open_store(dim, metric, TemplateCipher([new_key, *old_keys]), not encrypted) as store:
        before = store.encryption_info()
        n = store.rotate(new, batch_size=args.batch_size, progress=not args.quiet and os.isatty(2))
        after = store.encryption_info()
    action = "encrypted" if not encrypted or before["plaintext_rows"] else "re-encrypted"
    print(
        f"{action} {n} templates of {label} under key id {new.key_id}; key ids in use before: "
        f"{', '.join(before['key_ids']) or '-'}, now: {', '.join(after['key_ids'])}"
    )
    return 0
