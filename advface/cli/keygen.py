"""Generate a template-encryption key: 32 random bytes written as base64 to a new file with mode 0600.

Point ``encryption.key_file`` of the sidecar's configuration at it (or put its content into the environment variable
named by ``encryption.key_env``, default ``ADVFACE_ENCRYPTION_KEY``). The key id printed is a public fingerprint that
the stores record beside the data; the key itself is never printed. Keep a backup of the key: without it the
encrypted templates cannot be read.
"""

from __future__ import annotations

import argparse

from advface.crypto import generate_key, key_fingerprint, write_key_file

NAME = "keygen"
HELP = "generate an encryption key file (mode 0600) for templates at rest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface keygen``."""
    parser.add_argument("--out", "-o", required=True, help="key file to create (must not exist)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file (its old key is lost)")


def run(args: argparse.Namespace) -> int:
    """Execute ``advface keygen``."""
    key = generate_key()
    path = write_key_file(args.out, key, overwrite=args.force)
    print(f"wrote {path} (mode 0600), key id {key_fingerprint(key)}")
    return 0
