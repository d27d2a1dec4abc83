"""The template store under audit, opened the one way advface opens a store: as the sidecar does
(:class:`advface.reencode.store_io.StoreTarget` -> :func:`server.servicer.open_store`, with the encryption at rest of
the configuration's ``encryption`` section and the keyed per-tenant transform of its ``keyed_transform`` section),
read through :class:`advface.reencode.store_io.AdvfaceStoreSource` (stored, decrypted vectors).

Locations (``--store``; ``--config FILE`` is the sidecar's configuration, None: defaults and ``ADVFACE_*`` variables):

* ``advface:DATA_DIR?tenant=T``: exactly the ``advface reencode`` location (an empty ``DATA_DIR`` means the
  configuration's own store, the only form for a PostgreSQL backend);
* ``sqlite:DATA_DIR`` (or ``sqlite:DATA_DIR/templates.sqlite3``) with ``--tenant T``: the same as
  ``advface:DATA_DIR?tenant=T`` with ``store.backend`` set to ``sqlite``;
* ``postgresql://DSN`` with ``--tenant T``: the same as ``advface:?tenant=T`` with ``store.backend: postgresql`` and
  ``store.dsn`` set to the DSN.

Every other setting (encryption, keyed transform, SQLite index options) comes from the configuration. An encrypted
store opened without its key fails with the store's ConfigError (never a plaintext fallback). Subject ids must be
the dataset's photo ids; a subject with several templates is audited with its first one.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advface.audit.data import TemplateDatabase, check_db
from advface.errors import ConfigError, EmbeddingError

_TEMPLATE_ID = re.compile(r"[0-9a-f]{32}")
_CHUNK = 1000


@dataclass
class StoreInfo:
    """How the audited store was opened and what protects it (kept in memory only: ``transforms`` holds a secret)."""

    where: str
    backend: str
    tenant: str
    encrypted: bool
    transforms: Any  # advface.protect.tenant_transform.TenantTransforms | None
    protection: Any  # the configuration's protection section: how the sidecar protected what it stored
    data_dir: Path | None
    dsn: str | None
    templates: int

    @property
    def database_file(self) -> Path | None:
        """The SQLite database file (None for PostgreSQL)."""
        return None if self.data_dir is None else self.data_dir / "templates.sqlite3"

    def describe(self) -> dict[str, Any]:
        """What the report says about the store (no secret, no password)."""
        t = self.transforms
        return {
            "store": self.where,
            "backend": self.backend,
            "tenant": self.tenant,
            "encrypted_at_rest": self.encrypted,
            "keyed_transform": None
            if t is None
            else {"version": t.version, "norm": t.norm, "key_id": t.key_id(self.tenant)},
            "tenant_templates": self.templates,
        }


def _tenant_of(store: str, tenant: str | None) -> str:
    if tenant:
        return tenant
    raise ConfigError(f"--store {store.split('?')[0]!r} needs --tenant (or write advface:DATA_DIR?tenant=NAME)")


def store_target(store: str, tenant: str | None, config_path: str | Path | None, encoder_name: str, metric: str) -> Any:
    """The :class:`~advface.reencode.store_io.StoreTarget` of ``--store`` (see the module docs), with the audit's
    encoder name and metric; ConfigError for a malformed location or a tenant given twice differently."""
    from advface.config import load_config
    from advface.reencode.store_io import StoreTarget
    from advface.reencode.uri import Location, parse_location
    from advface.service.key_folder import resolve_key_folder

    if store.startswith("advface:"):
        text = store
        if "?" not in store:
            text = f"{store}?tenant={_tenant_of(store, tenant)}"
        location = parse_location(text)
        if tenant and location.options["tenant"] != tenant:
            raise ConfigError(f"--tenant {tenant!r} differs from the tenant of --store {store!r}")
        target = StoreTarget.resolve(location, config_path)
        return dataclasses.replace(target, encoder_name=encoder_name, metric=metric)
    if store.startswith("sqlite:"):
        from advface.store.base import check_id

        name = check_id(_tenant_of(store, tenant), "tenant")
        path = Path(store.removeprefix("sqlite:")).expanduser()
        if path.name == "templates.sqlite3" and not path.is_dir():
            path = path.parent
        elif path.is_file():
            raise ConfigError(f"--store {store!r}: give the store's folder (the one holding templates.sqlite3)")
        config = load_config(config_path)
        config = dataclasses.replace(
            config, store=dataclasses.replace(config.store, backend="sqlite", data_dir=str(path))
        )
        config = resolve_key_folder(config, create=False)
        location = Location("advface", str(path), {"tenant": name}, f"advface:{path}?tenant={name}")
        return StoreTarget(location, config, name, "sqlite", path, encoder_name, metric)
    if store.startswith(("postgresql://", "postgres://")):
        from advface.store.base import check_id

        name = check_id(_tenant_of("postgresql://...", tenant), "tenant")
        config = load_config(config_path)
        config = dataclasses.replace(config, store=dataclasses.replace(config.store, backend="postgresql", dsn=store))
        config = resolve_key_folder(config, create=False)
        location = Location("advface", "", {"tenant": name}, f"{store} (tenant {name})")
        return StoreTarget(location, config, name, "postgresql", None, encoder_name, metric)
    raise ConfigError(
        f"unsupported --store {store!r}: use advface:DATA_DIR?tenant=T, sqlite:DATA_DIR or a postgresql:// DSN"
    )


def load_templates_store(
    store: str,
    tenant: str | None,
    dim: int,
    metric: str,
    *,
    config_path: str | Path | None = None,
    encoder_name: str = "dlib",
) -> TemplateDatabase:
    """The first template of every subject of the tenant, as stored (decrypted; after the keyed transform when the
    configuration has one, with the un-transformed vectors beside them). ConfigError when the store does not exist
    or cannot be opened with this configuration (an encrypted store without its key, another transform secret);
    EmbeddingError when it is empty or of another dimension."""
    from advface.reencode.store_io import AdvfaceStoreSource

    hint = (
        ""
        if config_path
        else " (the store is opened like `advface serve --config FILE`: pass the sidecar's configuration with --config)"
    )
    try:
        target = store_target(store, tenant, config_path, encoder_name, metric)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{hint}") from None
    if target.backend == "sqlite" and not target.database_exists():
        raise ConfigError(f"no template database at {target.data_dir / 'templates.sqlite3'}")
    try:
        source = AdvfaceStoreSource(target.location, target, dim)
    except ConfigError as exc:
        raise ConfigError(f"{target.where()}: {exc}{hint}") from None
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    seen: set[str] = set()
    try:
        templates = source.count()
        for chunk in source.chunks(_CHUNK):
            for row_id, vector in zip(chunk.ids, chunk.vectors, strict=True):
                head, sep, tail = row_id.rpartition("#")
                subject = head if sep and _TEMPLATE_ID.fullmatch(tail) else row_id
                if subject not in seen:  # first template of each subject
                    seen.add(subject)
                    ids.append(subject)
                    vectors.append(vector)
        transforms = source.transforms
    finally:
        source.close()
    where = target.where()
    if not ids:
        raise EmbeddingError(f"{where}: the template database is empty")
    order = sorted(range(len(ids)), key=ids.__getitem__)  # by subject id, whatever order the store pages in
    db = check_db([ids[i] for i in order], np.stack([vectors[i] for i in order]), dim, where)
    if transforms is not None:
        db.untransformed = transforms.for_tenant(target.tenant).invert(db.vectors)
    db.store = StoreInfo(
        where=where,
        backend=target.backend,
        tenant=target.tenant,
        encrypted=bool(target.config.encryption.enabled),
        transforms=transforms,
        protection=target.config.protection,
        data_dir=target.data_dir,
        dsn=str(target.config.store.dsn) if target.backend == "postgresql" else None,
        templates=templates,
    )
    return db
