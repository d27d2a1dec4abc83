"""advface's own template store as a re-encoding destination and source: ``advface:DATA_DIR?tenant=T``.

The store is opened exactly as ``advface serve --config X`` opens it (:func:`advface.service.open_checked_store`):
the backend (``store.backend``: SQLite + faiss in ``store.data_dir``, or PostgreSQL + pgvector at ``store.dsn``),
the encryption at rest of the ``encryption`` section and the keyed per-tenant transform of the ``keyed_transform``
section (:func:`advface.service.transforms_from_config`, applied with :meth:`TenantTransforms.apply`, the
function the sidecar's Enroll path uses after AdvFace), its marker checked for every backend. ``DATA_DIR`` replaces
``store.data_dir`` of the configuration (SQLite backend); an empty ``DATA_DIR`` (``advface:?tenant=T``) means the
configuration's store as it is, which is the only form allowed with the PostgreSQL backend. The only option is
``tenant`` (required).

As a destination: each source row becomes one subject (subject id = the source id; no metadata) holding exactly
one template, ``T_tenant(AdvFace(z))``. Template ids are made by the store (32 hex characters of a random UUID4, as
for Enroll), so they differ between runs; subjects, vectors and counts do not. Chunks are written to the store as
they are protected, each in one ``add_many(..., replace=True)`` transaction, so a chunk written again after a crash
(kill -9 between the store's commit and the journal's) replaces its own subjects instead of duplicating them; no
part files are written. The tenant must be empty unless the run resumes an unfinished run to it (the work folder's
journal says the destination was started) or ``--overwrite`` is given (the tenant's subjects are then deleted when
the run starts: not atomic). Unlike the file and table sinks the destination fills up while the run goes on; a
sidecar on the same SQLite store cannot start meanwhile (the store is opened by one process at a time), one on a
PostgreSQL store sees the tenant growing. ``--swap`` is refused. The keyed-transform marker is checked and
recorded like the sidecar does at start (:func:`advface.service.check_transform_marker`).

As a source: one row per template, the stored (decrypted) vectors, i.e. protected ones (after the keyed transform
when it is on), never raw. The id is the subject id, or ``SUBJECT#TEMPLATE_ID`` for subjects with several
templates; rows come in subject-id order.

An encrypted store (``store.matching: encrypted``, docs/encrypted-matching.md) is written the same way: each
chunk's templates are encrypted into the tenant's blocks in one transaction (its subject ids sealed), a chunk
written again replaces its subjects (their old slots become dead and are erased through the key service later);
no key service is needed to write. Its templates cannot be read back: it is no source, and its verification checks
ids and, through the key service, matching on a sample (:mod:`advface.reencode.verify_encrypted`).

Verification of an ``advface:`` destination reads the vectors back through the inverse of the tenant's keyed
transform. Without norm equalisation (``keyed_transform.norm: null``, or the transform off) that gives the AdvFace
output itself and every check is the usual one. With norm equalisation the stored template keeps only the
direction of the AdvFace output, so verification checks that direction (:class:`VerifyOptions.direction_only`):
the budget check becomes ``sin(angle(p, s)) <= rel_l2`` (a necessary condition of ``||p - s|| <= rel_l2 ||s||``),
and the L-inf and matching checks use the point of that direction closest to the source (optimistic).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import numpy as np

from advface.errors import AlreadyExistsError, ConfigError, EmbeddingError, ValidationError
from advface.reencode.sinks import PartSet, Sink
from advface.reencode.sources import RawChunk, Source
from advface.reencode.uri import Location

if TYPE_CHECKING:
    from advface.config import Config
    from advface.protect.tenant_transform import TenantTransforms
    from advface.reencode.verify import VerifyOptions
    from advface.store.base import TemplateStore

STORE_OPTION_KEYS = ("tenant",)
#: Name recorded as the "part" of a chunk in the journal when it went straight into the store (no part file).
STORE_PART = "in-destination-store"
_PAGE = 1000  # subjects per list_subjects call (the store's maximum)


def parse_store_location(text: str, rest: str) -> Location:
    """Parse ``advface:DATA_DIR?tenant=T`` (``rest``: what follows ``advface:``); ConfigError when malformed."""
    from advface.store.base import check_id

    path, _, query = rest.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    unknown = sorted(set(options) - set(STORE_OPTION_KEYS))
    if unknown:
        raise ConfigError(
            f"location {text!r}: unknown option(s) {', '.join(unknown)}; an advface store takes only ?tenant=NAME"
        )
    if "tenant" not in options:
        raise ConfigError(f"location {text!r}: an advface store needs ?tenant=NAME")
    try:
        check_id(options["tenant"], "tenant")
    except ValidationError as exc:
        raise ConfigError(f"location {text!r}: {exc}") from None
    return Location("advface", path, options, text)


@dataclasses.dataclass
class StoreTarget:
    """Everything needed to open the store of an ``advface:`` location the way the sidecar does."""

    location: Location
    config: Config  # with store.data_dir replaced by the location's folder
    tenant: str
    backend: str
    data_dir: Path | None
    encoder_name: str
    metric: str

    @classmethod
    def resolve(cls, location: Location, config_path: str | Path | None) -> StoreTarget:
        """Read the configuration (``config_path``; None: defaults and ``ADVFACE_*`` variables, like the sidecar)."""
        from advface.config import load_config

        config = load_config(config_path)
        backend = str(config.store.backend)
        data_dir: Path | None = None
        if backend == "sqlite":
            data_dir = Path(location.path or config.store.data_dir).expanduser()
            config = dataclasses.replace(config, store=dataclasses.replace(config.store, data_dir=str(data_dir)))
        elif location.path:
            raise ConfigError(
                f"{location.display()}: the configuration's store is PostgreSQL (store.dsn), which has no folder; "
                f"write advface:?tenant={location.options['tenant']}"
            )
        from advface.service.key_folder import resolve_key_folder

        config = resolve_key_folder(config)  # the sidecar's key folder: the store is written as it would write it
        encoder_name, metric = _encoder_name_metric(config.encoder.name)
        return cls(location, config, location.options["tenant"], backend, data_dir, encoder_name, metric)

    def where(self) -> str:
        """The store for messages (no password)."""
        if self.backend == "sqlite":
            return f"tenant {self.tenant!r} of the store in {self.data_dir}"
        from advface.store.postgres import redact_dsn

        return f"tenant {self.tenant!r} of the PostgreSQL store {redact_dsn(str(self.config.store.dsn))}"

    @property
    def encrypted(self) -> bool:
        """Whether the store keeps CKKS ciphertexts (``store.matching: encrypted``)."""
        return str(self.config.store.matching) == "encrypted"

    def _database_file(self) -> Path:
        assert self.data_dir is not None  # SQLite only
        return self.data_dir / ("templates-encrypted.sqlite3" if self.encrypted else "templates.sqlite3")

    def database_exists(self) -> bool:
        """Whether the store exists (SQLite: its database file; PostgreSQL: assumed, the DSN is checked on open)."""
        return self.backend != "sqlite" or (self.data_dir is not None and self._database_file().is_file())

    def stored_dim(self) -> int | None:
        """The dimension an existing SQLite store was made with (None: no such store, or PostgreSQL)."""
        if self.backend != "sqlite" or not self.database_exists():
            return None
        from advface.store.sqlite_faiss import SQLiteFaissStore

        meta = SQLiteFaissStore.read_meta(self._database_file())  # the meta table of either kind of store
        return int(meta["dim"]) if meta.get("dim") else None

    def transforms(self, dim: int) -> TenantTransforms | None:
        """The tenant transforms of the ``keyed_transform`` section (None when off), as the sidecar builds them."""
        from advface.service.keys import transforms_from_config

        return transforms_from_config(self.config.keyed_transform, dim, self.encoder_name)

    def open(self, dim: int, transforms: TenantTransforms | None) -> TemplateStore:
        """The store, opened as the sidecar opens it: the keyed-transform marker checked (and recorded on an empty
        store), whatever the backend."""
        from advface.service.stores import open_checked_store

        return open_checked_store(self.config, dim, self.metric, transforms)


def _encoder_name_metric(spec: Any) -> tuple[str, str]:
    """The encoder's name and metric (the store's metric, as the sidecar picks it); dlib's are known without
    loading the model."""
    from advface.encoders.registry import parse_encoder_spec

    name, _ = parse_encoder_spec(spec)
    if name in ("dlib", "dlib-torch"):
        return name, "euclidean"
    from advface.encoders.registry import create_encoder

    encoder = create_encoder(spec)
    return str(encoder.name), str(encoder.metric)


def _tenant_subjects(store: Any, tenant: str) -> int:
    return int(store.count(tenant, subjects=True))


class AdvfaceStoreSink(Sink):
    """``advface:DATA_DIR?tenant=T`` as a destination (see the module docs); writes chunk by chunk."""

    streaming = True

    def __init__(self, location: Location, overwrite: bool, target: StoreTarget, dim: int) -> None:
        super().__init__(location, overwrite)
        self.target = target
        stored = target.stored_dim()
        if stored is not None and stored != dim:
            raise ConfigError(
                f"{target.where()}: the store holds {stored}-d templates, the shadow model makes "
                f"{dim}-d ones (wrong --config, --shadow or --encoder?)"
            )
        self.dim = dim
        self.transforms = target.transforms(dim)
        self._store: Any = None

    @property
    def store(self) -> Any:
        """The open store (opened on first use)."""
        if self._store is None:
            self._store = self.target.open(self.dim, self.transforms)
        return self._store

    def exists(self) -> bool:
        """Whether the tenant already holds subjects."""
        if not self.target.database_exists():
            return False
        return _tenant_subjects(self.store, self.target.tenant) > 0

    def check_writable(self, resuming: bool = False) -> None:
        """AlreadyExistsError for a non-empty tenant, unless ``resuming`` an unfinished run to it or ``overwrite``."""
        if resuming:
            self.store  # noqa: B018 - opens it: configuration and marker errors now, before any protection
            return
        if self.exists() and not self.overwrite:
            n = _tenant_subjects(self.store, self.target.tenant)
            raise AlreadyExistsError(
                f"destination {self.target.where()} already holds {n} subject(s); re-encoding fills an empty tenant "
                "(pass --overwrite to delete its subjects first, or pick another tenant)"
            )

    def begin(self) -> None:
        """Prepare a fresh run: with ``overwrite``, delete the tenant's subjects (idempotent: repeatable)."""
        store, tenant = self.store, self.target.tenant
        if not self.overwrite:
            return
        while True:
            page, _ = store.list_subjects(tenant, page_size=_PAGE)
            if not page:
                return
            for info in page:
                store.delete_subject(tenant, info.subject_id)

    def write_chunk(self, ids: list[str], protected: np.ndarray) -> None:
        """Store one chunk: subject ``id`` gets ``T_tenant(protected row)`` as its only template (one transaction;
        a repeated chunk replaces the subjects it wrote before)."""
        if not ids:
            return
        templates = protected if self.transforms is None else self.transforms.apply(self.target.tenant, protected)
        templates = np.ascontiguousarray(templates, dtype=np.float32)
        items = [(row_id, templates[i : i + 1], None) for i, row_id in enumerate(ids)]
        try:
            self.store.add_many(self.target.tenant, items, replace=True)
        except ValidationError as exc:
            raise EmbeddingError(f"{self.target.where()}: {exc}") from None

    def finish(self) -> None:
        """Close the store (everything was committed chunk by chunk)."""
        self.close()

    def write(self, parts: PartSet) -> None:
        """Write all parts (the non-streaming interface; the job streams instead)."""
        if parts.dim != self.dim:
            raise EmbeddingError(f"parts of dimension {parts.dim} for a {self.dim}-d store")
        for ids, vectors in parts.chunks():
            self.write_chunk(ids, vectors)
        self.finish()

    def swap_into(self, source: Location) -> None:
        raise ConfigError(
            "--swap is not supported with an advface store destination: the sidecar's store is "
            "filled in place; remove the raw source yourself once verification passed"
        )

    def close(self) -> None:
        """Release the store (its lock, for SQLite)."""
        if self._store is not None:
            self._store.close()
            self._store = None


class AdvfaceStoreSource(Source):
    """``advface:DATA_DIR?tenant=T`` as a source: the tenant's stored vectors (see the module docs).

    ``untransform``: read through the inverse of the tenant's keyed transform (what verification compares with
    the raw source; with norm equalisation only the direction of the AdvFace output comes back).
    """

    def __init__(self, location: Location, target: StoreTarget, dim: int | None, untransform: bool = False) -> None:
        super().__init__(location)
        self.target = target
        if not target.database_exists():
            raise ConfigError(f"source {location.display()}: no template store at {target.data_dir}")
        stored = target.stored_dim()
        dim = stored if stored is not None else dim
        if dim is None:
            raise ConfigError(f"{target.where()}: template dimension unknown")
        self.dim = int(dim)
        self.transforms = target.transforms(self.dim)
        self.untransform = bool(untransform and self.transforms is not None)
        self._store = target.open(self.dim, self.transforms)

    @property
    def encrypted(self) -> bool:
        """Whether the store is encrypted (its templates cannot be read: no chunks; verified by
        :meth:`verify_against`)."""
        return self.target.encrypted

    def verify_against(
        self, source: Source, options: VerifyOptions, progress: Callable[[int], object] | None = None
    ) -> dict[str, Any]:
        """Verify this encrypted store's tenant against ``source`` (:mod:`advface.reencode.verify_encrypted`)."""
        from advface.reencode.verify_encrypted import verify_encrypted_store

        tenant, transforms = self.target.tenant, self.transforms

        def probe_of(raw: np.ndarray) -> np.ndarray:
            row = np.asarray(raw, dtype=np.float32)[None, :]
            return (row if transforms is None else transforms.apply(tenant, row))[0]

        return verify_encrypted_store(source, self._store, tenant, probe_of, options, progress=progress)

    @property
    def norm_equalised(self) -> bool:
        """Whether the stored templates were norm-equalised by the keyed transform (only directions come back)."""
        return self.transforms is not None and self.transforms.norm is not None

    def count(self) -> int:
        return int(self._store.count(self.target.tenant))

    def chunks(self, chunk_size: int, rows_done: int = 0, cursor: Any = None) -> Iterator[RawChunk]:
        from advface.store.base import encode_page_token

        if self.encrypted:
            raise ConfigError(
                f"{self.target.where()} is an encrypted store (store.matching: encrypted): its templates cannot be "
                "read back, so it cannot be a re-encoding source"
            )
        tenant = self.target.tenant
        token = encode_page_token(str(cursor)) if cursor else ""
        ids: list[str] = []
        rows: list[np.ndarray] = []
        while True:
            page, token = self._store.list_subjects(tenant, page_size=_PAGE, page_token=token)
            for info in page:
                vectors = self._store.subject_vectors(tenant, info.subject_id)
                if len(vectors) == 1:
                    ids.append(info.subject_id)
                else:
                    ids += [f"{info.subject_id}#{t}" for t in info.template_ids]
                rows += list(vectors)
                if len(ids) >= chunk_size:
                    yield RawChunk(ids, self._view(rows), info.subject_id)
                    ids, rows = [], []
            if not token:
                break
        if ids:
            yield RawChunk(ids, self._view(rows), None)

    def _view(self, rows: list[np.ndarray]) -> np.ndarray:
        vectors = np.ascontiguousarray(np.stack(rows), dtype=np.float32)
        if self.untransform:
            assert self.transforms is not None  # untransform is only set with transforms
            vectors = self.transforms.for_tenant(self.target.tenant).invert(vectors)
        return vectors

    def close(self) -> None:
        self._store.close()


def open_store_sink(location: Location, overwrite: bool, config_path: str | Path | None, dim: int) -> AdvfaceStoreSink:
    """The sink of an ``advface:`` destination (``dim``: the protected templates' dimension)."""
    return AdvfaceStoreSink(location, overwrite, StoreTarget.resolve(location, config_path), dim)


def open_store_source(
    location: Location, config_path: str | Path | None, dim: int | None = None, untransform: bool = False
) -> AdvfaceStoreSource:
    """The source of an ``advface:`` location (``dim`` is needed only for a PostgreSQL store)."""
    return AdvfaceStoreSource(location, StoreTarget.resolve(location, config_path), dim, untransform)
