"""Maintenance of a serving sidecar through its admin RPCs: its encrypted store (``store.matching: encrypted``) and
its budgets of failed attempts.

``advface maintenance status --target HOST:PORT`` prints the current or last job as JSON;
``advface maintenance rotate-key-pair --target HOST:PORT --new-keys-dir DIR [--blocks-per-second R] [--wait]``
starts (or resumes) re-encrypting the store under the key pair of the sidecar folder ``DIR`` (a path on the sidecar
host, made by ``advface keyservice keygen --next-of``) while the sidecar serves; ``advface maintenance erase-now
--target HOST:PORT [--wait]`` erases every removed template now and rewrites the database. Both return at once with
the job; ``--wait`` follows it with a progress bar until it ends (exit 0 when done, 1 when it failed or stopped: run
the same command again to resume). What each step does and what the operator does after a rotation (point
``store.encrypted_keys_dir`` at the new folder): docs/encrypted-matching.md.

``advface maintenance reset-attempts --target HOST:PORT [--tenant T] --subject S`` clears a subject's lock,
escalation and cap of failed Verify attempts (as re-enrolling it does); ``--caller KEY_ID`` a caller's budget of
failed Identify calls (a token's key id: the first 8 hex digits of its SHA-256, as the sidecar's log lines name it;
``anonymous`` when auth is off). It prints ``{"cleared": true|false}``. Counts live in each sidecar process: reset
every replica (matching.verify_* and identify_* in docs/configuration.md).

The calls need an **admin** token (``auth.tokens`` with ``role: admin``): read from ``--token-file`` (mode 0600)
or ``$ADVFACE_TOKEN``, never from the command line (other users see a process's arguments). TLS: ``--tls`` (system
roots) or ``--ca-file`` (and ``--cert-file`` / ``--key-file`` for mTLS, ``--server-name`` to override the name
checked); without them the channel is plain text (loopback only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from advface.errors import ConfigError

NAME = "maintenance"
HELP = "admin actions on a serving sidecar: rotate or erase its encrypted store, reset failed-attempt budgets"

#: environment variable holding the admin token when ``--token-file`` is not given
TOKEN_ENV = "ADVFACE_TOKEN"
#: job states after which nothing more happens until the next call
FINAL_STATES = ("done", "failed", "stopped", "idle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface maintenance``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="print the current or last maintenance job")
    rotate = actions.add_parser("rotate-key-pair", help="re-encrypt the store under a new key pair while serving")
    rotate.add_argument("--new-keys-dir", required=True, help="the new key pair's sidecar folder, on the sidecar host")
    rotate.add_argument(
        "--blocks-per-second", type=float, default=0.0, help="blocks sent to the key service per second (0: 10)"
    )
    erase = actions.add_parser("erase-now", help="erase every removed template now and rewrite the database")
    reset = actions.add_parser("reset-attempts", help="clear a subject's or a caller's failed-attempt budget")
    reset.add_argument("--tenant", default="default", help="the subject's tenant (default: default)")
    reset.add_argument("--subject", default="", help="the subject whose failed Verify attempts are cleared")
    reset.add_argument("--caller", default="", help="the token key id whose failed Identify calls are cleared")
    for sub in (status, rotate, erase, reset):
        sub.add_argument("--target", required=True, help="the sidecar's HOST:PORT")
        sub.add_argument("--token-file", help=f"admin bearer token file, mode 0600 (default ${TOKEN_ENV})")
        sub.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
        sub.add_argument("--ca-file", help="TLS: the CA certificate to trust (PEM)")
        sub.add_argument("--cert-file", help="mTLS: this client's certificate (PEM)")
        sub.add_argument("--key-file", help="mTLS: this client's private key (PEM)")
        sub.add_argument("--server-name", help="TLS: the name to check in the server's certificate")
        sub.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default 60)")
    for sub in (rotate, erase):
        sub.add_argument("--wait", action="store_true", help="follow the job until it ends")
        sub.add_argument("--poll-s", type=float, default=1.0, help="--wait: seconds between status calls (1)")
        sub.add_argument("--quiet", "-q", action="store_true", help="--wait: no progress bar")


def _client(args: argparse.Namespace) -> Any:
    from advface.client import AdvFaceClient, TlsOptions
    from advface.encrypted.keys import read_token

    tls: bool | TlsOptions = bool(args.tls)
    if args.ca_file or args.cert_file or args.key_file or args.server_name:
        tls = TlsOptions(
            ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file, server_name=args.server_name
        )
    token = read_token(args.token_file, env=TOKEN_ENV, what="admin token")
    return AdvFaceClient(args.target, token=token, tls=tls, timeout=args.timeout)


def _print(job: dict[str, Any]) -> None:
    shown = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in job.items()}
    print(json.dumps(shown, indent=2, sort_keys=True))


def _follow(client: Any, job: dict[str, Any], poll_s: float, quiet: bool) -> dict[str, Any]:
    """Poll the job until it ends, with a progress bar over its blocks."""
    from tqdm import tqdm

    with tqdm(total=job["blocks_total"] or None, desc=job["operation"], unit="block", disable=quiet) as bar:
        while job["state"] not in FINAL_STATES:
            bar.total = job["blocks_total"] or bar.total
            bar.n = min(job["blocks_done"], bar.total or job["blocks_done"])
            bar.refresh()
            time.sleep(poll_s)
            job = client.maintenance_status()
        bar.n = job["blocks_done"]
        bar.refresh()
    return job


def run(args: argparse.Namespace) -> int:
    """Run ``advface maintenance ACTION``; exit 2 when the call is refused (the server's status and reason)."""
    from advface.client import AdvFaceRpcError

    if getattr(args, "poll_s", 1.0) <= 0 or args.timeout <= 0:
        raise ConfigError("--poll-s and --timeout must be positive")
    with _client(args) as client:
        try:
            if args.action == "reset-attempts":
                if not (args.subject or args.caller):
                    raise ConfigError("reset-attempts: name a --subject or a --caller")
                cleared = client.reset_attempts(args.subject, caller=args.caller, tenant=args.tenant)
                print(json.dumps({"cleared": cleared}))
                return 0
            if args.action == "status":
                _print(client.maintenance_status())
                return 0
            if args.action == "rotate-key-pair":
                job = client.rotate_key_pair(args.new_keys_dir, blocks_per_second=args.blocks_per_second)
            else:
                job = client.erase_now()
            if args.wait:
                job = _follow(client, job, args.poll_s, args.quiet)
        except AdvFaceRpcError as exc:
            print(f"advface maintenance {args.action}: {exc}", file=sys.stderr)
            return 2
    _print(job)
    if args.wait and job["state"] != "done":
        print(f"advface maintenance {args.action}: the job ended {job['state']}: {job['last_error']}", file=sys.stderr)
        return 1
    return 0
