"""Opening the configured template store, the one way every part of advface opens it.

:func:`open_store` builds the store the ``store`` section names (``sqlite``: SQLite + faiss in ``store.data_dir``;
``postgresql``: PostgreSQL + pgvector at ``store.dsn``), encrypted at rest when the ``encryption`` section names a
key. :func:`check_transform_marker` compares the keyed-transform configuration with the one the store's templates
were issued under, for every backend (SQLite: a marker file in the data folder; PostgreSQL: a row of the store's
own meta table, shared by every replica), and records it on an empty store. :func:`open_checked_store` does both:
the sidecar, ``advface reencode`` and ``advface audit`` open stores through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack, cast

from advface.config import Config, StoreConfig
from advface.errors import ConfigError
from advface.protect.tenant_transform import TenantTransforms, check_db_store_marker, check_store_marker
from advface.service.keys import cipher_from_config
from advface.store.base import StoreMetric, TemplateStore

if TYPE_CHECKING:
    from advface.encrypted.keys import PublicKeys
    from advface.encrypted.store import EncryptedStore, EncryptedStoreOptions

#: the encrypted store's file in ``store.data_dir`` (backend sqlite)
ENCRYPTED_SQLITE_NAME = "templates-encrypted.sqlite3"


def open_store(config: Config, dim: int, metric: str) -> TemplateStore:
    """The template store of ``config.store`` for ``dim``-d templates compared with ``metric``, with the cipher of
    ``config.encryption`` (None: not encrypted). ConfigError for a bad location, key or an incompatible store."""
    section = config.store
    store_metric = cast(StoreMetric, metric)  # checked by the store's constructor (ConfigError for an unknown one)
    if section.matching == "encrypted":
        return open_encrypted_store(section, dim, store_metric)
    cipher = cipher_from_config(config.encryption)
    if section.backend == "postgresql":
        from advface.store.postgres import PostgresStore

        if not section.dsn:
            raise ConfigError("store.backend is postgresql but store.dsn is not set (or ADVFACE_STORE_DSN)")
        return PostgresStore(section.dsn, dim, store_metric, cipher=cipher)
    if section.backend != "sqlite":
        raise ConfigError(f"store backend {section.backend!r} is not supported (use 'sqlite' or 'postgresql')")
    from advface.store.sqlite_faiss import IndexOptions, SQLiteFaissStore

    if not section.data_dir:
        raise ConfigError("store.data_dir is not set")
    index = IndexOptions(
        kind=section.index, min_rows=section.ivf_min_rows, nlist=section.ivf_nlist, nprobe=section.ivf_nprobe
    )
    return SQLiteFaissStore(
        section.database_path.expanduser(), dim, store_metric, use_gpu=section.use_gpu, index=index, cipher=cipher
    )


def open_encrypted_store(section: StoreConfig, dim: int, metric: StoreMetric) -> TemplateStore:
    """``store.matching: encrypted``: the store of CKKS ciphertexts (:func:`make_encrypted_store`: SQLite
    ``templates-encrypted.sqlite3`` in ``store.data_dir``, or PostgreSQL tables ``advface_enc_*`` at ``store.dsn``)
    with a client of the key service. ConfigError when a key file is missing or altered, or when the key service
    holds another key pair (the sidecar refuses to start); a key service that is down only logs a warning (Verify
    and Identify answer UNAVAILABLE until it is up). See docs/encrypted-matching.md."""
    import logging

    from advface.encrypted.client import KeyServiceClient
    from advface.encrypted.errors import KeyServiceUnavailableError
    from advface.encrypted.keys import load_binding_key, load_sidecar_folder, read_token
    from advface.encrypted.store import integrity_key_for

    _check_encrypted_backend(section)
    if not section.encrypted_keys_dir or not section.keyservice_address:
        raise ConfigError("store.matching: encrypted needs store.encrypted_keys_dir and store.keyservice_address")
    folder = Path(section.encrypted_keys_dir).expanduser()
    keys = load_sidecar_folder(folder)
    binding = load_binding_key(folder)
    client = KeyServiceClient(
        section.keyservice_address,
        read_token(None, folder),
        timeout_s=section.keyservice_timeout_s,
        **_keyservice_tls(section),
    )
    top_k_max = None
    try:
        top_k_max = int(client.handshake(keys.fingerprint).top_k_max)
    except KeyServiceUnavailableError as exc:
        logging.getLogger("advface.store").warning("key service not reachable at start: %s", exc)
    except BaseException:
        client.close()
        raise
    # block integrity (tamper detection) under a key derived from the binding key, which lives beside the public key
    integrity = integrity_key_for(binding)
    try:
        store = make_encrypted_store(section, keys, binding, dim, metric, keyservice=client, integrity_key=integrity)
    except BaseException:
        client.close()
        raise
    if top_k_max is not None:
        store.handshake_done(top_k_max)
    return store


def _check_encrypted_backend(section: StoreConfig) -> None:
    """ConfigError unless ``store.backend`` can hold an encrypted store (and has its location)."""
    if section.backend == "postgresql":
        if not section.dsn:
            raise ConfigError("store.backend is postgresql but store.dsn is not set (or ADVFACE_STORE_DSN)")
    elif section.backend == "sqlite":
        if not section.data_dir:
            raise ConfigError("store.data_dir is not set")
    else:
        raise ConfigError(f"store backend {section.backend!r} is not supported (use 'sqlite' or 'postgresql')")


def encrypted_store_where(section: StoreConfig) -> str:
    """Where the encrypted store of ``section`` lives, for messages (a file, or a DSN without its password)."""
    _check_encrypted_backend(section)
    if section.backend == "postgresql":
        from advface.encrypted.postgres_database import TABLE_PREFIX_DEFAULT
        from advface.store.postgres import redact_dsn

        return f"{redact_dsn(str(section.dsn))} (tables {TABLE_PREFIX_DEFAULT}_*)"
    return str(Path(section.data_dir).expanduser() / ENCRYPTED_SQLITE_NAME)


def make_encrypted_store(
    section: StoreConfig,
    keys: PublicKeys,
    binding_key: bytes,
    dim: int,
    metric: StoreMetric,
    **options: Unpack[EncryptedStoreOptions],
) -> EncryptedStore:
    """The encrypted store of ``section``'s backend (``options``:
    :class:`~advface.encrypted.store.EncryptedStoreOptions`), without a key-service client unless given one."""
    from advface.encrypted.store import EncryptedPostgresStore, EncryptedSQLiteStore

    _check_encrypted_backend(section)
    if section.backend == "postgresql":
        return EncryptedPostgresStore(str(section.dsn), keys, binding_key, dim, metric, **options)
    path = Path(section.data_dir).expanduser() / ENCRYPTED_SQLITE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return EncryptedSQLiteStore(path, keys, binding_key, dim, metric, **options)


def encrypted_store_meta(section: StoreConfig) -> dict[str, str]:
    """The ``meta`` rows of ``section``'s encrypted store (``dim``, ``metric``, fingerprints...), read without
    opening it; empty when it does not exist yet."""
    _check_encrypted_backend(section)
    if section.backend == "postgresql":
        from advface.encrypted.postgres_database import read_meta

        return read_meta(str(section.dsn))
    from advface.store.sqlite_faiss import SQLiteFaissStore

    path = Path(section.data_dir).expanduser() / ENCRYPTED_SQLITE_NAME
    return SQLiteFaissStore.read_meta(path) if path.exists() else {}


def _keyservice_tls(section: StoreConfig) -> dict[str, Any]:
    """TLS options of the key-service client from ``store.keyservice_*_file`` (empty: plaintext gRPC)."""
    ca, cert, key = section.keyservice_ca_file, section.keyservice_cert_file, section.keyservice_key_file
    if (cert is None) != (key is None):
        raise ConfigError("store.keyservice_cert_file and store.keyservice_key_file go together")
    if cert is not None and ca is None:
        raise ConfigError("mTLS to the key service needs store.keyservice_ca_file too")
    if ca is None:
        return {}

    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise ConfigError(f"store.{what}: cannot read {path} ({exc.strerror or exc})") from None

    options: dict[str, Any] = {"root_certificates": read(ca, "keyservice_ca_file")}
    if cert is not None and key is not None:
        options["client_cert"] = (read(key, "keyservice_key_file"), read(cert, "keyservice_cert_file"))
    return options


def check_transform_marker(section: StoreConfig, store: TemplateStore, transforms: TenantTransforms | None) -> None:
    """ConfigError unless the store's templates were issued under ``transforms`` (None: no keyed transform), or the
    store is empty; records the marker when it should be (see :mod:`advface.protect.tenant_transform`)."""
    if section.backend == "sqlite":
        check_store_marker(Path(section.data_dir).expanduser(), transforms, int(store.count()))
    else:
        check_db_store_marker(store, transforms, int(store.count()))


def open_checked_store(config: Config, dim: int, metric: str, transforms: TenantTransforms | None) -> TemplateStore:
    """:func:`open_store`, then :func:`check_transform_marker` (the store is closed again when the check fails)."""
    store = open_store(config, dim, metric)
    try:
        check_transform_marker(config.store, store, transforms)
    except BaseException:
        store.close()
        raise
    return store
