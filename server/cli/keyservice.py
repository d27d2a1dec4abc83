"""The key service of encrypted matching: it holds the CKKS secret key and answers the sidecar with decisions only.

``advface keyservice keygen --sidecar-dir S --keyservice-dir K`` makes a key pair and writes two folders (mode
0700, files 0600): ``S`` for the sidecar host (public key, binding key, token) and ``K`` for the key-service host
(the same plus the secret key). Never copy ``K``'s ``ckks-secret.seal`` to the sidecar host. With
``--wrap-key-file``, ``--wrap-key-env`` or ``--wrap-kms-hook`` the secret key is stored only wrapped under that
32-byte key (``ckks-secret.seal.enc``), and ``serve`` needs the same flag to unwrap it.

``advface keyservice serve --dir K --metric euclidean --threshold -0.6`` serves ``advface.keyservice.v1.KeyService``
(proto/advface/keyservice/v1/keyservice.proto) on 127.0.0.1:50061. Every call needs ``authorization: Bearer
<token>``: the token is read from ``--token-file`` (default ``K/keyservice.token``, mode 0600) or the environment
variable ``ADVFACE_KEYSERVICE_TOKEN``. The secret key is the folder's ``ckks-secret.seal`` (or its wrapped form).
The threshold, metric, ``--top-k-max`` and ``--score-decimals`` are the service's own: the sidecar cannot choose
them. Requests must be bound by the sidecar (HMAC under ``binding.key``), fresh (``--window-s``) and never
replayed, and are rate-limited per operation (``--verify-rate``, ``--identify-rate``, ``--refresh-rate``: requests
per second, bursts of twice that). ``--audit-log FILE`` appends one JSON line per request (no ids, scores or probe
data). After ``--lock-after-refusals`` (10) requests that carry the sidecar's MAC but are not score results
(forgeries), the service locks until restarted. ``--tls-cert`` and ``--tls-key`` enable TLS; ``--tls-client-ca``
also requires client certificates (mTLS).

Prints ``advface keyservice serving on HOST:PORT`` once requests are accepted; SIGTERM or SIGINT stops it.

Rotation to a new key pair: ``keygen --next-of S`` makes the new pair's two folders with the binding key and token
of the current folder ``S``; ``serve --dir K --next-dir S2`` (the current secret key, and the new pair's sidecar
folder) also re-encrypts blocks under the new public key (``Rotate``, ``--rotate-rate``); ``rotate-store --config
advface.yaml --new-keys-dir S2`` (on the sidecar host, with the sidecar stopped) re-encrypts every block of the
store through it, resumably, and swaps them at once; then point ``store.encrypted_keys_dir`` at ``S2`` and serve
``K2``. While the sidecar serves, its admin RPC ``RotateKeyPair`` does the same; give ``--next-dir`` the new pair's
key-service folder ``K2`` instead, so that this service also decides under the new pair after the swap. See
docs/encrypted-matching.md.

Rotation of the binding key (the HMAC key binding requests; the store's integrity key and the wrapping of its names
key derive from it): ``rotate-binding start --dir K [--grace-s 86400] [--sidecar-dir S]`` (key-service host) makes a
new binding key current in ``K`` and accepts the previous one for the grace period (a running ``serve`` picks it up
by itself); the new key goes to the sidecar host as ``S/binding.key.next``. ``rotate-binding store --config
advface.yaml`` (sidecar host, sidecar stopped) re-tags every block under the new key, re-wraps the names key and
makes ``binding.key.next`` the sidecar's ``binding.key``; both steps resume when run again. ``rotate-binding finish
--dir K`` refuses the previous key at once instead of at the end of the grace period.

Forced erasure: ``erase --config advface.yaml`` (sidecar host, sidecar stopped, key service up) erases every
removed template now and rewrites the database file (VACUUM, WAL checkpoint) so that no earlier version of a block
is left on disk.
"""

from __future__ import annotations

import argparse
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from advface.config import Config
    from advface.encrypted.keys import PublicKeys, SecretKeys

NAME = "keyservice"
HELP = "key service of encrypted matching: key generation, and the gRPC service that holds the secret key"

#: as in advface.encrypted.keys (not imported here: building the parser must not load TenSEAL)
TOKEN_FILE = "keyservice.token"
TOKEN_ENV = "ADVFACE_KEYSERVICE_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Actions and flags of ``advface keyservice``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = actions.add_parser("keygen", help="make a key pair: a sidecar folder and a key-service folder")
    keygen.add_argument("--sidecar-dir", required=True, help="folder for the sidecar host (no secret key)")
    keygen.add_argument("--keyservice-dir", required=True, help="folder for the key-service host (secret key)")
    _add_wrap_flags(keygen, "store the secret key wrapped (AES-256-GCM) under the 32-byte key")
    keygen.add_argument(
        "--next-of",
        metavar="DIR",
        help="the next key pair of a rotation: reuse the binding key and token of this existing folder",
    )
    serve = actions.add_parser("serve", help="serve the key service (gRPC)")
    serve.add_argument("--dir", required=True, help="the key-service folder made by `advface keyservice keygen`")
    serve.add_argument("--metric", required=True, choices=["cosine", "euclidean"], help="the gallery's metric")
    serve.add_argument(
        "--threshold",
        required=True,
        type=float,
        help="decision threshold on the store's score (cosine similarity, or minus the Euclidean distance)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50061, help="port, 0 for any free one (default 50061)")
    serve.add_argument(
        "--token-file", help=f"bearer token file, mode 0600 (default DIR/{TOKEN_FILE}, else ${TOKEN_ENV})"
    )
    serve.add_argument("--top-k-max", type=int, default=10, help="most candidates an Identify may release (10)")
    serve.add_argument("--score-decimals", type=int, help="also release scores rounded to this many decimals")
    serve.add_argument("--window-s", type=float, default=30.0, help="accepted age of a request in seconds (30)")
    serve.add_argument("--verify-rate", type=float, default=100.0, help="Verify requests per second (100)")
    serve.add_argument("--identify-rate", type=float, default=10.0, help="Identify requests per second (10)")
    serve.add_argument("--refresh-rate", type=float, default=1.0, help="Refresh requests per second (1)")
    serve.add_argument(
        "--next-dir",
        metavar="DIR",
        help="rotation: the next key pair's folder (made with `keygen --next-of`); enables Rotate. Its key-service "
        "folder (with the secret key) also lets this service decide under the next key pair once the store has "
        "swapped (a rotation while the sidecar serves: RotateKeyPair); its sidecar folder does not",
    )
    serve.add_argument("--rotate-rate", type=float, default=10.0, help="Rotate requests (blocks) per second (10)")
    serve.add_argument(
        "--lock-after-refusals",
        type=int,
        default=10,
        help="lock the service after this many requests that carry the sidecar's MAC but are not score results "
        "(forgeries: a legitimate sidecar never sends one); 0: never lock (default 10)",
    )
    serve.add_argument("--audit-log", help="append the audit log to this file (created 0600)")
    _add_wrap_flags(serve, "unwrap a wrapped secret key with the 32-byte key")
    serve.add_argument("--tls-cert", help="server certificate (PEM); with --tls-key enables TLS")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", help="CA of client certificates (PEM): requires mTLS")
    rotate = actions.add_parser(
        "rotate-store",
        help="re-encrypt the sidecar's encrypted store under the next key pair (sidecar host, sidecar stopped)",
    )
    rotate.add_argument("--config", help="the sidecar's configuration (its store and current key folder)")
    rotate.add_argument("--new-keys-dir", required=True, help="the next key pair's sidecar folder")
    binding = actions.add_parser(
        "rotate-binding",
        help="rotate the binding key: start (key-service host), store (sidecar host), finish (end the grace period)",
    )
    steps = binding.add_subparsers(dest="step", metavar="STEP", required=True)
    start = steps.add_parser("start", help="key-service host: a new binding key, the previous accepted for a while")
    start.add_argument("--dir", required=True, help="the key-service folder")
    start.add_argument(
        "--grace-s",
        type=float,
        default=86400.0,
        help="seconds the previous binding key stays accepted (default 86400: one day)",
    )
    start.add_argument(
        "--sidecar-dir",
        help="also write the new key as binding.key.next into this sidecar folder (when it is reachable from here)",
    )
    start.add_argument(
        "--force",
        action="store_true",
        help="start although an earlier rotation's grace period runs (its previous key is refused at once)",
    )
    store = steps.add_parser(
        "store", help="sidecar host, sidecar stopped: move the store and the sidecar folder to binding.key.next"
    )
    store.add_argument("--config", help="the sidecar's configuration (its store and key folder)")
    finish = steps.add_parser("finish", help="key-service host: refuse the previous binding key from now on")
    finish.add_argument("--dir", required=True, help="the key-service folder")
    erase = actions.add_parser(
        "erase",
        help="erase removed templates now and rewrite the store's database file (sidecar host, sidecar stopped)",
    )
    erase.add_argument("--config", help="the sidecar's configuration (store.matching: encrypted)")


def _add_wrap_flags(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--wrap-key-file", help=f"{what} in this file (mode 0600, as `advface keygen` writes)")
    group.add_argument("--wrap-key-env", metavar="NAME", help=f"{what} held (base64) by this environment variable")
    group.add_argument("--wrap-kms-hook", metavar="MODULE:FUNCTION", help=f"{what} returned by this function")


def _wrap_key(args: argparse.Namespace) -> bytes | None:
    from advface.crypto import key_from_env, key_from_kms_hook, load_key_file

    if args.wrap_key_file:
        return load_key_file(args.wrap_key_file)
    if args.wrap_key_env:
        return key_from_env(args.wrap_key_env)
    if args.wrap_kms_hook:
        return key_from_kms_hook(args.wrap_kms_hook)
    return None


def _write_token(folder: Path, token: str) -> None:
    fd = os.open(folder / TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    """Execute ``advface keyservice``."""
    if args.action == "keygen":
        return _keygen(args)
    if args.action == "rotate-store":
        return _rotate_store(args)
    if args.action == "rotate-binding":
        return _rotate_binding(args)
    if args.action == "erase":
        return _erase(args)
    return _serve(args)


def _keygen(args: argparse.Namespace) -> int:
    from advface.encrypted.keys import generate_keys, new_binding_key, write_keyservice_folder, write_sidecar_folder
    from advface.errors import ConfigError

    if Path(args.sidecar_dir).resolve() == Path(args.keyservice_dir).resolve():
        raise ConfigError("the sidecar and key-service folders must differ")
    keys = generate_keys()
    if args.next_of:
        from advface.encrypted.keys import load_binding_key, read_token

        binding, token = load_binding_key(args.next_of), read_token(None, args.next_of)
    else:
        binding, token = new_binding_key(), secrets.token_urlsafe(32)
    service = write_keyservice_folder(args.keyservice_dir, keys, binding, _wrap_key(args))
    sidecar = write_sidecar_folder(args.sidecar_dir, keys, binding)
    _write_token(service, token)
    _write_token(sidecar, token)
    print(f"key pair {keys.fingerprint}: sidecar folder {sidecar}, key-service folder {service} (secret key)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from advface.config import TLSConfig
    from advface.encrypted.audit import AuditLog
    from advface.encrypted.keys import load_binding_key, load_binding_keyring, load_keyservice_folder, read_token
    from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
    from advface.encrypted.ratelimit import RateLimiter
    from advface.errors import ConfigError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    token = read_token(args.token_file, args.dir)
    keys = load_keyservice_folder(args.dir, _wrap_key(args))
    policy = DecisionPolicy(args.metric, args.threshold, args.top_k_max, args.score_decimals)
    rates = {
        "verify": args.verify_rate,
        "identify": args.identify_rate,
        "refresh": args.refresh_rate,
        "rotate": args.rotate_rate,
    }
    for op, rate in rates.items():
        if not rate > 0:
            raise ConfigError(f"--{op}-rate must be > 0, got {rate}")
    limiter = RateLimiter({op: (rate, max(1.0, 2 * rate)) for op, rate in rates.items()})
    tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    binding = load_binding_key(args.dir)
    next_keys: PublicKeys | SecretKeys | None = None
    if args.next_dir:
        from advface.encrypted.keys import SECRET_FILE, WRAPPED_SECRET_FILE, load_sidecar_folder

        next_folder = Path(args.next_dir).expanduser()
        if (next_folder / SECRET_FILE).exists() or (next_folder / WRAPPED_SECRET_FILE).exists():
            # the next pair's key-service folder: also decide under it once a serving sidecar has swapped
            next_keys = load_keyservice_folder(next_folder, _wrap_key(args))
        else:
            next_keys = load_sidecar_folder(next_folder)
        if load_binding_key(args.next_dir) != binding:
            raise ConfigError(f"--next-dir {args.next_dir} has another binding key: make it with `keygen --next-of`")
    core = KeyServiceCore(
        keys,
        load_binding_keyring(args.dir),
        policy,
        limiter=limiter,
        audit=AuditLog(args.audit_log) if args.audit_log else None,
        window_s=args.window_s,
        lock_after_refusals=args.lock_after_refusals or None,
        next_keys=next_keys,
        reload_binding=lambda: load_binding_keyring(args.dir),  # picks up `rotate-binding start` while serving
    )
    from server.keyservice import serve_keyservice  # grpc is imported only here

    def ready(address: str) -> None:
        print(f"advface keyservice serving on {address} (key pair {keys.fingerprint})", flush=True)

    serve_keyservice(core, token, args.host, args.port, tls=tls, ready=ready)
    return 0


def _rotate_store(args: argparse.Namespace) -> int:
    """Re-encrypt the encrypted store of ``--config`` under the key pair of ``--new-keys-dir``."""
    from advface.config import load_config
    from advface.encrypted.keys import load_binding_key, load_sidecar_folder
    from advface.encrypted.store import EncryptedStore
    from advface.errors import ConfigError
    from advface.service.stores import open_store

    config = load_config(args.config)
    section = config.store
    if section.matching != "encrypted" or not section.encrypted_keys_dir:
        raise ConfigError("rotate-store needs store.matching: encrypted (and store.encrypted_keys_dir) in --config")
    new_keys = load_sidecar_folder(args.new_keys_dir)
    if load_binding_key(args.new_keys_dir) != load_binding_key(Path(section.encrypted_keys_dir).expanduser()):
        raise ConfigError(f"{args.new_keys_dir} has another binding key: make it with `keygen --next-of`")
    meta = _store_meta(config)
    store = open_store(config, int(meta["dim"]), meta["metric"])
    try:
        assert isinstance(store, EncryptedStore)  # store.matching: encrypted
        blocks = store.rotate_key_pair(new_keys)
    finally:
        store.close()
    print(
        f"rotated {blocks} block(s) to key pair {new_keys.fingerprint}: now set store.encrypted_keys_dir to "
        f"{args.new_keys_dir} and serve the new key-service folder"
    )
    return 0


def _sidecar_section(config_path: str | None, what: str) -> tuple[Config, Path, str]:
    """``(config, key folder, where the store is)`` of a sidecar configuration with encrypted matching."""
    from advface.config import load_config
    from advface.errors import ConfigError
    from advface.service.stores import encrypted_store_where

    config = load_config(config_path)
    section = config.store
    if section.matching != "encrypted" or not section.encrypted_keys_dir:
        raise ConfigError(f"{what} needs store.matching: encrypted (and store.encrypted_keys_dir) in --config")
    folder = Path(section.encrypted_keys_dir).expanduser()
    return config, folder, encrypted_store_where(section)


def _rotate_binding(args: argparse.Namespace) -> int:
    """``rotate-binding start | store | finish``."""
    import time

    from advface.encrypted import keys as k
    from advface.errors import ConfigError

    if args.step == "start":
        new = k.start_binding_rotation(args.dir, args.grace_s, force=args.force)
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(k.load_binding_keyring(args.dir).previous_until))
        where = f"copy {Path(args.dir) / k.BINDING_FILE} to the sidecar folder as {k.BINDING_NEXT_FILE} (mode 0600)"
        if args.sidecar_dir:
            target = Path(args.sidecar_dir).expanduser() / k.BINDING_NEXT_FILE
            if target.exists() and k.load_key_file(target) != new:
                raise ConfigError(f"{target} holds another key; remove it if it is from an abandoned rotation")
            if not target.exists():
                k.write_key_file(target, new)
            where = f"wrote {target}"
        print(
            f"binding key {k.binding_fingerprint(new)} is current; the previous one is accepted until {until}. "
            f"Next: {where}, then run `advface keyservice rotate-binding store` on the sidecar host"
        )
        return 0
    if args.step == "finish":
        found = k.end_binding_grace(args.dir)
        print("the previous binding key is refused from now on" if found else "no previous binding key was accepted")
        return 0
    return _rotate_binding_store(args)


def _rotate_binding_store(args: argparse.Namespace) -> int:
    """Move the sidecar's store to ``binding.key.next``, then make it the folder's binding key."""
    from advface.encrypted import keys as k
    from advface.encrypted.binding import binding_fingerprint
    from advface.encrypted.store import BINDING_META, integrity_key_for
    from advface.service.stores import encrypted_store_meta, make_encrypted_store
    from advface.store.base import check_dim_metric

    config, folder, _ = _sidecar_section(args.config, "rotate-binding store")
    new = k.load_key_file(folder / k.BINDING_NEXT_FILE)
    old = k.load_binding_key(folder)
    blocks = 0
    meta = encrypted_store_meta(config.store)
    if meta and meta.get(BINDING_META) != binding_fingerprint(new):  # else: none yet, or done before an interruption
        dim, metric = check_dim_metric(int(meta["dim"]), meta.get("metric"))
        store = make_encrypted_store(
            config.store,
            k.load_sidecar_folder(folder),
            old,
            dim,
            metric,
            integrity_key=integrity_key_for(old),
            next_binding=(new, integrity_key_for(new)),
        )
        try:
            blocks = store.rotate_binding_key(new, integrity_key_for(new))
        finally:
            store.close()
    k.install_next_binding_key(folder)
    print(
        f"re-tagged {blocks} block(s); {folder / k.BINDING_FILE} is now binding key {binding_fingerprint(new)}: "
        "start the sidecar"
    )
    return 0


def _erase(args: argparse.Namespace) -> int:
    """Erase removed templates now and compact the database file."""
    from advface.encrypted.store import EncryptedStore
    from advface.service.stores import open_store

    config, _, where = _sidecar_section(args.config, "erase")
    meta = _store_meta(config)
    store = open_store(config, int(meta["dim"]), meta["metric"])
    try:
        assert isinstance(store, EncryptedStore)  # store.matching: encrypted
        report = store.compact()
    finally:
        store.close()
    print(
        f"erased {report['erased']} removed template(s); {report['pending']} still pending; "
        f"{where} rewritten ({report['bytes']} bytes)"
    )
    return 0 if report["pending"] == 0 else 1


def _store_meta(config: Config) -> dict[str, str]:
    """``dim`` and ``metric`` of the encrypted store of ``config`` (ConfigError when there is none)."""
    from advface.service.stores import encrypted_store_meta, encrypted_store_where

    meta = encrypted_store_meta(config.store)
    if "dim" not in meta or "metric" not in meta:
        from advface.errors import ConfigError

        if config.store.backend == "sqlite" and not meta:
            raise ConfigError(f"template store {encrypted_store_where(config.store)} does not exist")
        raise ConfigError(f"{encrypted_store_where(config.store)} is not an encrypted template store")
    return meta
