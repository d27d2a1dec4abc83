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
from typing import cast

from advface.config import Config, StoreConfig
from advface.errors import ConfigError
from advface.protect.tenant_transform import TenantTransforms, check_db_store_marker, check_store_marker
from advface.service.keys import cipher_from_config
from advface.store.base import StoreMetric, TemplateStore


def open_store(config: Config, dim: int, metric: str) -> TemplateStore:
    """The template store of ``config.store`` for ``dim``-d templates compared with ``metric``, with the cipher of
    ``config.encryption`` (None: not encrypted). ConfigError for a bad location, key or an incompatible store."""
    section = config.store
    cipher = cipher_from_config(config.encryption)
    store_metric = cast(StoreMetric, metric)  # checked by the store's constructor (ConfigError for an unknown one)
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
