"""A template store whose templates are CKKS ciphertexts: subjects, the slot map and the gallery's blocks in SQLite
or PostgreSQL.

:class:`EncryptedStore` implements :class:`~advface.store.base.TemplateStore` (same ids, tenants, metadata,
paging and validation) except that templates can never be read back: :meth:`~EncryptedStore.subject_vectors`
and :meth:`~EncryptedStore.search` raise :class:`~advface.errors.PreconditionError`. Matching goes through
:meth:`~EncryptedStore.verify_encrypted` and :meth:`~EncryptedStore.identify_encrypted`, which score the
plaintext probe against the encrypted blocks of the tenant and ask the key service for the decision. Enrolment and
deletion never need the key service; erasing removed templates (:meth:`~EncryptedStore.erase`) does: with
``auto_erase`` (the default when a key service is given) a background thread erases them after each deletion, and
retries every ``erase_retry_s`` while the key service is down (removed templates are dead slots meanwhile: never
scored or released, still encrypted in their block).

The store logic is written once; its rows go through a :class:`~advface.encrypted.database.BlockDatabase`:
:class:`EncryptedSQLiteStore` (one SQLite file, :mod:`advface.encrypted.sqlite_database`) or
:class:`EncryptedPostgresStore` (tables in a PostgreSQL database, :mod:`advface.encrypted.postgres_database`), thin
wrappers of :class:`EncryptedStore`'s one constructor that name the database; the options all three take are
:class:`EncryptedStoreOptions`.

Processes. SQLite: one process opens a database at a time (``<file>.lock``, as for the SQLite store): a sidecar and
``advface reencode`` never write the same store together. PostgreSQL: several processes may open one database;
each tenant carries a generation, every write locks the tenant's row and bumps it, and a process whose copy of a
tenant is older reloads it (checking every block again) before it scores or changes it. Rotations and compaction
need the store open in one process only (refused otherwise).

Durability: every change (enrolment, deletion) rewrites the blocks it touched and the slot map in one transaction
(SQLite: WAL, ``synchronous=FULL``, ``secure_delete=ON``; PostgreSQL: ``synchronous_commit=on``); when the
transaction fails, the tenant's gallery is reloaded from the database, so memory never holds what the database does
not. Integrity: each block row is an authenticated block (:mod:`advface.encrypted.blocks`) under a per-tenant key
derived from the integrity key; on open (and on every reload), every block is checked and the live slots of the
blocks must be exactly the slots of the template rows, so an altered, swapped or rolled-back block is detected and
named (:class:`~advface.errors.IntegrityError`). A database made under another key pair, dimension or metric is
refused (:class:`~advface.errors.ConfigError`).

Subject ids and metadata are sealed (:mod:`advface.store.sealing`, as in SQLite stores created encrypted): the
``subject_id`` columns hold keyed hashes, the ``metadata`` column AES-256-GCM ciphertext of id and metadata, under a
names key wrapped in the ``meta`` table under a key derived from the binding key (the sidecar's secret, beside the
public key). A thief of the database alone reads tenants, template ids, times and ciphertexts: no subject id,
metadata value or template. Stores made before sealing existed keep plain names.

Key-pair rotation (:meth:`~EncryptedStore.rotate_key_pair`): every block re-encrypted under a new key pair
through the key service, resumable, swapped in one transaction; binding-key rotation
(:meth:`~EncryptedStore.rotate_binding_key`): every block re-tagged, resumable.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict, Unpack

import numpy as np

from advface.crypto import TemplateCipher
from advface.encrypted._seal import to_bytes
from advface.encrypted.binding import BoundRequest, binding_fingerprint
from advface.encrypted.blocks import block_tag_ok, decode_block, encode_block, encode_block_data, retag_block
from advface.encrypted.database import BlockDatabase
from advface.encrypted.errors import KeyServiceUnavailableError, RateLimitedError
from advface.encrypted.gallery import DEAD, FREE, LIVE, EncryptedGallery, GalleryMetric, SlotRef
from advface.encrypted.keys import PublicKeys
from advface.encrypted.keyservice import Decision, VerifyDecision
from advface.encrypted.memory import scrub_caches, wipe
from advface.encrypted.requests import prepare_refresh, prepare_rotate, prepare_scores
from advface.encrypted.sqlite_database import SQLiteBlockDatabase
from advface.errors import ClosedError, ConfigError, IntegrityError, NotFoundError, PreconditionError
from advface.store.base import (
    MAX_PAGE_SIZE,
    Match,
    StoreMetric,
    SubjectInfo,
    TemplateStore,
    check_add_many,
    check_dim_metric,
    check_id,
    check_metadata,
    check_positive_int,
    check_probe,
    decode_page_token,
    encode_page_token,
)
from advface.store.sealing import (
    NAMES_KEY_META,
    NAMES_META,
    PlainNames,
    SealedNames,
    names_from_meta,
    new_sealed_names,
    unwrap_names_key,
    wrap_names_key,
)

__all__ = [
    "EncryptedPostgresStore",
    "EncryptedSQLiteStore",
    "EncryptedStore",
    "EncryptedStoreOptions",
    "KeyServiceLike",
    "integrity_key_for",
    "names_cipher",
]

log = logging.getLogger("advface.store")

FORMAT = "advface.encrypted-store.v1"

#: ``meta`` key of the fingerprint of the key pair an unfinished rotation goes to
ROTATION_META = "rotation_target"
#: ``meta`` keys of the binding key's fingerprint, and of the new one during an unfinished binding-key rotation
BINDING_META = "binding_fingerprint"
BINDING_ROTATION_META = "binding_rotation_target"
#: ``meta`` key of the keyed-transform marker (what the templates were issued under; as in the PostgreSQL store)
TRANSFORM_MARKER_META = "keyed_transform"
#: a tenant's generation in memory after a failed reload: reloaded again before its next use
_STALE = -1


class KeyServiceLike(Protocol):
    """What the store needs of a key service: the in-process core or the gRPC client."""

    def verify(self, request: BoundRequest) -> VerifyDecision: ...

    def identify(self, request: BoundRequest) -> list[Decision]: ...

    def refresh(self, request: BoundRequest) -> list[bytes]: ...

    # and, for key-pair rotation: ``rotate(request) -> list[bytes]`` (KeyServiceCore.rotate)


class EncryptedStoreOptions(TypedDict, total=False):
    """The keyword options of :class:`EncryptedStore`, passed unchanged by :class:`EncryptedSQLiteStore` and
    :class:`EncryptedPostgresStore`; their defaults are stated once, in ``EncryptedStore.__init__``.

    ``keyservice``: the key service (none: enrolment and deletion only); ``integrity_key``: authenticates the
    blocks (:func:`integrity_key_for`; none: checksums only); ``threads``: scoring threads; ``auto_erase``: a
    background thread erases removed templates (with a key service), retrying every ``erase_retry_s`` while it is
    down; ``next_binding``: ``(binding key, integrity key)`` of an unfinished binding-key rotation."""

    keyservice: KeyServiceLike | None
    integrity_key: bytes | None
    threads: int
    auto_erase: bool
    erase_retry_s: float
    next_binding: tuple[bytes, bytes | None] | None


class EncryptedStore(TemplateStore):
    """Encrypted templates in a :class:`~advface.encrypted.database.BlockDatabase` opened by ``open_database``;
    thread-safe (one lock serialises changes and scoring). This constructor is the one way to build the store;
    :class:`EncryptedSQLiteStore` and :class:`EncryptedPostgresStore` are thin wrappers that name the database
    (options: :class:`EncryptedStoreOptions`)."""

    matching = "encrypted"

    def __init__(
        self,
        open_database: Callable[[], BlockDatabase],
        keys: PublicKeys,
        binding_key: bytes,
        dim: int,
        metric: StoreMetric,
        *,
        keyservice: KeyServiceLike | None = None,
        integrity_key: bytes | None = None,
        threads: int = 1,
        auto_erase: bool = True,
        erase_retry_s: float = 30.0,
        next_binding: tuple[bytes, bytes | None] | None = None,
    ) -> None:
        self.dim, self.metric = check_dim_metric(dim, metric)
        self.keys = keys
        self.keyservice = keyservice
        #: the key service's top_k limit once its handshake succeeded: Identify asks for at most that many
        self.keyservice_top_k_max: int | None = None
        self._handshake_done = False
        self.threads = int(threads)
        self._binding_key = bytes(binding_key)
        self._integrity_key = integrity_key
        #: (binding key, integrity key) of an unfinished binding-key rotation: blocks already re-tagged under it are
        #: accepted (only :meth:`rotate_binding_key` and ``advface keyservice rotate-binding`` pass it)
        self._next_binding = (bytes(next_binding[0]), next_binding[1]) if next_binding is not None else None
        self._names: PlainNames | SealedNames = PlainNames()  # set by _check_meta: sealed unless made before sealing
        self._lock = threading.RLock()
        self._closed = False
        self._galleries: dict[str, EncryptedGallery] = {}
        self._slots: dict[str, dict[SlotRef, tuple[str, str]]] = {}
        #: the generation each tenant's copy was loaded at (None where the database is not shared)
        self._generations: dict[str, int | None] = {}
        self.database = open_database()
        #: the store in messages (its file, or its DSN without the password and its tables)
        self.where = self.database.where
        try:
            self._check_meta()
            with self.database.snapshot():
                for tenant in self.database.tenants_with_rows():
                    self._reload(tenant)
        except BaseException:
            self.database.close()
            raise
        self.erase_retry_s = float(erase_retry_s)
        self._erase_wakeup = threading.Event()
        self._eraser: threading.Thread | None = None
        if auto_erase and keyservice is not None:
            self._eraser = threading.Thread(target=self._erase_loop, name="advface-erase", daemon=True)
            self._eraser.start()
            self._erase_wakeup.set()  # removed templates left by an earlier run

    # ------------------------------------------------------------------ opening

    def _check_meta(self) -> None:
        want = {
            "format": FORMAT,
            "fingerprint": self.keys.fingerprint,
            "dim": str(self.dim),
            "metric": self.metric,
        }
        with self._transaction():
            self.database.lock_meta()  # one process creates or seals it
            have = self.database.meta()
            if not have:
                self._names, sealed = new_sealed_names(names_cipher(self._binding_key))
                recorded = {BINDING_META: binding_fingerprint(self._binding_key)}
                self.database.put_meta([*want.items(), *sealed.items(), *recorded.items()])
                return
            self._check_keys_meta(have)
            for name in ("dim", "metric"):
                if have.get(name) != want[name]:
                    raise ConfigError(f"{self.where} was made for {name} {have.get(name)}, not {want[name]}")
            self._check_binding_meta(have)
            # during a binding-key rotation, subject rows already resealed under the new key open too
            cipher = names_cipher(self._binding_key, *([self._next_binding[0]] if self._next_binding else []))
            if NAMES_META not in have and not self.database.has_subjects():
                self._names, sealed = new_sealed_names(cipher)  # an empty store made before sealing: sealed from now on
                self.database.put_meta(list(sealed.items()))
                return
            self._names = names_from_meta(have, cipher, self.where)

    def _check_keys_meta(self, have: dict[str, str]) -> None:
        """ConfigError unless ``meta`` is an encrypted store's under this store's key pair."""
        if have.get("format") != FORMAT:
            raise ConfigError(f"{self.where} is not an encrypted template store ({have.get('format')!r})")
        if have.get("fingerprint") != self.keys.fingerprint and have.get(ROTATION_META) == self.keys.fingerprint:
            raise ConfigError(
                f"{self.where}: the rotation to key pair {self.keys.fingerprint} is unfinished; open the store with "
                f"its current key pair {have.get('fingerprint')} and run the rotation again to finish it"
            )
        if have.get("fingerprint") != self.keys.fingerprint:
            raise ConfigError(
                f"{self.where} holds templates encrypted under key pair {have.get('fingerprint')}, not under this "
                f"sidecar's public key {self.keys.fingerprint}: wrong key pair (after a rotation, RotateKeyPair or "
                "`advface keyservice rotate-store`, set store.encrypted_keys_dir to the new key pair's folder)"
            )

    def _check_binding_meta(self, have: dict[str, str]) -> None:
        """ConfigError when the store is under another binding key, or a binding-key rotation is unfinished and
        this opening does not carry its new key."""
        mine = binding_fingerprint(self._binding_key)
        recorded = have.get(BINDING_META)
        if recorded is not None and recorded != mine:
            raise ConfigError(
                f"{self.where} is under binding key {recorded}, not this sidecar's {mine}: if a binding-key rotation "
                "was interrupted after the store switched, run `advface keyservice rotate-binding store` again "
                "to finish it; otherwise use the store's key folder"
            )
        target = have.get(BINDING_ROTATION_META)
        if target is None:
            return
        if self._next_binding is None:
            raise ConfigError(
                f"{self.where}: the rotation to binding key {target} is unfinished; run `advface keyservice "
                "rotate-binding store` again to finish it"
            )
        if binding_fingerprint(self._next_binding[0]) != target:
            raise ConfigError(f"{self.where}: an unfinished binding-key rotation goes to {target}, not to this key")

    @property
    def binding_fingerprint(self) -> str:
        """The fingerprint of the binding key this store is opened with."""
        return binding_fingerprint(self._binding_key)

    @property
    def sealed_names(self) -> bool:
        """Whether subject ids and metadata are sealed at rest (every store made since sealing exists)."""
        return self._names.sealed

    def _tenant_key(self, tenant: str) -> bytes | None:
        return _tenant_key(self._integrity_key, tenant)

    def _reload(self, tenant: str) -> None:
        """Rebuild a tenant's gallery and slot map from the database, checking every block."""
        self._generations[tenant] = _STALE  # until this reload succeeds
        with self.database.snapshot():
            generation = self.database.generation(tenant)
            gallery = EncryptedGallery(self.keys, self.dim, self._gallery_metric)
            key = self._tenant_key(tenant)
            for index, (block, data) in enumerate(self.database.blocks(tenant)):
                what = f"{self.where} tenant {tenant!r} block {block}"
                if block != index:
                    raise IntegrityError(f"{what}: blocks are not contiguous (block {index} missing)")
                block_key = key
                if self._next_binding is not None:  # a block re-tagged by an unfinished binding-key rotation
                    next_key = _tenant_key(self._next_binding[1], tenant)
                    if not block_tag_ok(data, key) and block_tag_ok(data, next_key):
                        block_key = next_key
                header, state, columns = decode_block(gallery, data, block_key, what)
                if header.get("block") != block:
                    raise IntegrityError(f"{what}: holds block {header.get('block')} (swapped)")
                gallery.import_block(block, int(header["generation"]), state, columns)
            subjects = self._subject_ids(tenant)
            slots: dict[SlotRef, tuple[str, str]] = {}
            for template_id, stored, block, slot in self.database.template_rows(tenant):
                if stored not in subjects:
                    raise IntegrityError(f"{self.where} tenant {tenant!r}: template {template_id} has no subject row")
                slots[SlotRef(block, slot)] = (template_id, subjects[stored])
        live = set(gallery.live_slots())
        if live != set(slots):
            raise IntegrityError(
                f"{self.where} tenant {tenant!r}: {len(live ^ set(slots))} slots differ between the encrypted blocks "
                "and the template rows (altered or rolled back)"
            )
        self._galleries[tenant] = gallery
        self._slots[tenant] = slots
        self._generations[tenant] = generation

    def _sync(self, tenant: str) -> None:
        """Reload ``tenant`` when the database holds another generation of it than memory (another process of a
        shared database changed it, or a reload failed); nothing for a single-process database."""
        if self._generations.get(tenant) == _STALE:
            self._reload(tenant)
        elif self.database.shared and self.database.generation(tenant) != self._generations.get(tenant):
            self._check_keys_meta(self.database.meta())  # not rotated meanwhile by another process
            self._reload(tenant)

    def _subject_ids(self, tenant: str) -> dict[str, str]:
        """Stored id -> subject id of every subject row of ``tenant`` (sealed rows opened; IntegrityError naming the
        tenant when one fails authentication, e.g. moved to another subject's row)."""
        return {stored: self._unpack(tenant, stored, text)[0] for stored, text in self.database.subject_rows(tenant)}

    def _unpack(self, tenant: str, stored: str, text: str) -> tuple[str, dict[str, str]]:
        """A subject row's ``(subject id, metadata)``; IntegrityError naming the store and tenant."""
        try:
            return self._names.unpack(tenant, stored, text)
        except (IntegrityError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{self.where} tenant {tenant!r}: a subject row fails to open ({exc})") from None

    @property
    def _gallery_metric(self) -> GalleryMetric:
        return "cosine" if self.metric == "cosine" else "euclidean"

    def _gallery(self, tenant: str) -> EncryptedGallery:
        if tenant not in self._galleries:
            self._galleries[tenant] = EncryptedGallery(self.keys, self.dim, self._gallery_metric)
            self._slots[tenant] = {}
        return self._galleries[tenant]

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the encrypted template store is closed")

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return self.database.transaction()

    @contextlib.contextmanager
    def _write(self, tenant: str) -> Iterator[None]:
        """One write transaction on ``tenant``: its writers serialised across processes, its copy in memory
        reloaded first when another process changed it, its generation bumped on commit."""
        with self._transaction():
            stored = self.database.lock_tenant(tenant)
            if stored != self._generations.get(tenant) and (stored is not None or tenant in self._generations):
                if self.database.shared:
                    self._check_keys_meta(self.database.meta())
                self._reload(tenant)
            yield
            new = self.database.bump_generation(tenant)
        self._generations[tenant] = new

    def _write_blocks(self, tenant: str, gallery: EncryptedGallery, blocks: set[int]) -> None:
        key = self._tenant_key(tenant)
        self.database.put_blocks(tenant, [(block, encode_block(gallery, block, key)) for block in sorted(blocks)])

    # ------------------------------------------------------------------ changes

    def add_many(
        self,
        tenant: str,
        items: Sequence[tuple[str, np.ndarray, Mapping[str, str] | None]],
        *,
        replace: bool = False,
    ) -> list[list[str]]:
        checked = check_add_many(tenant, items, self.dim, replace)
        if not checked:
            return []
        # plaintext copies made here are wiped before returning (advface.encrypted.memory); the caller's arrays
        # are the caller's to wipe
        ours = [v for (_, v, _), item in zip(checked, items) if not _caller_owns(v, item)]
        vectors = np.concatenate([v for _, v, _ in checked])
        try:
            with self._lock:
                self._check_open()
                wipe(self._gallery(tenant).template_values(vectors))  # EmbeddingError before any change
                try:
                    return self._add(tenant, checked, vectors, replace)
                except BaseException:
                    self._reload(tenant)
                    raise
        finally:
            wipe(vectors, *ours)
            scrub_caches()

    def _add(
        self,
        tenant: str,
        checked: list[tuple[str, np.ndarray, dict[str, str] | None]],
        vectors: np.ndarray,
        replace: bool,
    ) -> list[list[str]]:
        ids: list[list[str]] = []
        now = time.time()
        with self._write(tenant):
            gallery, slots, names = self._gallery(tenant), self._slots[tenant], self._names
            removed: list[SlotRef] = []
            if replace:
                wanted = {subject for subject, _, _ in checked}
                removed = [ref for ref, (_, subject) in slots.items() if subject in wanted]
            if removed:
                gallery.remove(removed)
            refs = gallery.add(vectors)
            if removed:
                self.database.delete_templates_at(tenant, [(r.block, r.slot) for r in removed])
            position = 0
            for subject_id, subject_vectors, metadata in checked:
                stored = names.stored_id(tenant, subject_id)
                row = self.database.subject(tenant, stored)
                if row is None:
                    self.database.insert_subject(
                        tenant, stored, names.pack(tenant, stored, subject_id, dict(metadata or {})), now
                    )
                else:
                    old = self._unpack(tenant, stored, row[0])[1]
                    merged = dict(metadata or {}) if replace else {**old, **(metadata or {})}
                    merged = check_metadata(merged, f"metadata of subject {subject_id!r} after merging")
                    self.database.update_subjects(tenant, [(stored, names.pack(tenant, stored, subject_id, merged))])
                seq = self.database.max_seq(tenant, stored)
                new_ids = [uuid.uuid4().hex for _ in range(len(subject_vectors))]
                self.database.insert_templates(
                    [
                        (template_id, tenant, stored, seq + 1 + i, refs[position + i].block, refs[position + i].slot)
                        for i, template_id in enumerate(new_ids)
                    ]
                )
                position += len(subject_vectors)
                ids.append(new_ids)
            self._write_blocks(tenant, gallery, {r.block for r in refs} | {r.block for r in removed})
        for ref in removed:
            slots.pop(ref, None)
        if removed:
            self._erase_wakeup.set()
        position = 0
        for (subject_id, subject_vectors, _), new_ids in zip(checked, ids):
            for i, template_id in enumerate(new_ids):
                slots[refs[position + i]] = (template_id, subject_id)
            position += len(subject_vectors)
        return ids

    def delete_subject(self, tenant: str, subject_id: str) -> int:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        with self._lock:
            self._check_open()
            self._sync(tenant)
            if not self._subject_exists(tenant, subject_id) and not self._refs_of(tenant, subject_id):
                raise NotFoundError(f"subject {subject_id!r} not found in tenant {tenant!r}")
            return self._remove(tenant, lambda: (self._refs_of(tenant, subject_id), {subject_id}))

    def _refs_of(self, tenant: str, subject_id: str) -> list[SlotRef]:
        return [ref for ref, (_, subject) in self._slots.get(tenant, {}).items() if subject == subject_id]

    def delete_template(self, tenant: str, template_id: str) -> str:
        check_id(tenant, "tenant")
        check_id(template_id, "template_id")
        found: list[str] = []

        def what() -> tuple[list[SlotRef], set[str]]:
            slots = self._slots.get(tenant, {})
            hits = [(ref, subject) for ref, (tid, subject) in slots.items() if tid == template_id]
            if not hits:
                raise NotFoundError(f"template {template_id!r} not found in tenant {tenant!r}")
            ref, subject_id = hits[0]
            found.append(subject_id)
            last = sum(1 for _, s in slots.values() if s == subject_id) == 1
            return [ref], {subject_id} if last else set()

        with self._lock:
            self._check_open()
            self._sync(tenant)
            if not any(tid == template_id for tid, _ in self._slots.get(tenant, {}).values()):
                raise NotFoundError(f"template {template_id!r} not found in tenant {tenant!r}")
            self._remove(tenant, what)
            return found[-1]

    def _remove(self, tenant: str, what: Callable[[], tuple[list[SlotRef], set[str]]]) -> int:
        """Remove the slots and subjects ``what()`` names (called inside the write, on the tenant's current copy);
        the number of slots removed."""
        try:
            with self._write(tenant):
                refs, delete_subjects = what()
                if refs:
                    self._galleries[tenant].remove(refs)
                self.database.delete_templates_at(tenant, [(r.block, r.slot) for r in refs])
                self.database.delete_subjects(tenant, [self._names.stored_id(tenant, s) for s in delete_subjects])
                if refs:
                    self._write_blocks(tenant, self._galleries[tenant], {r.block for r in refs})
        except BaseException:
            if tenant in self._galleries:
                self._reload(tenant)
            raise
        for ref in refs:
            self._slots[tenant].pop(ref, None)
        self._erase_wakeup.set()
        return len(refs)

    def erase(self, tenant: str, attempts: int = 3, *, on_block: Callable[[], None] | None = None) -> int:
        """Erase removed templates of ``tenant`` through the key service (a refresh of each block holding some);
        returns how many slots were erased. The key service is called outside the store's lock; a block that
        changed meanwhile is started again (at most ``attempts`` times per block); ``on_block()`` after each block
        refreshed. KeyServiceUnavailableError leaves everything as it was."""
        check_id(tenant, "tenant")
        keyservice = self._require_keyservice()
        erased = 0
        tries: dict[int, int] = {}
        while True:
            with self._lock:
                self._check_open()
                self._sync(tenant)
                gallery = self._galleries.get(tenant)
                dirty = [b for b in gallery.dirty_blocks() if tries.get(b, 0) < attempts] if gallery else []
                if gallery is None or not dirty:
                    return erased
                block = dirty[0]
                tries[block] = tries.get(block, 0) + 1
                job = gallery.refresh_job(block)
                request = prepare_refresh(gallery, self._binding_key, tenant, job)
            columns = keyservice.refresh(request)
            with self._lock:
                self._check_open()
                if tenant not in self._galleries:
                    return erased
                try:
                    with self._write(tenant):
                        gallery = self._galleries[tenant]
                        freed = gallery.finish_refresh(job, columns)  # PreconditionError: nothing changed
                        self._write_blocks(tenant, gallery, {block})
                except PreconditionError:
                    continue  # the block changed while the key service worked: start it again
                except BaseException:
                    self._reload(tenant)
                    raise
                erased += freed
            if on_block is not None:
                on_block()

    def _erase_loop(self) -> None:
        """Background erasure: woken by each deletion (and every ``erase_retry_s``), erases every tenant's removed
        templates; a key service that is down or rate-limiting is tried again later."""
        while True:
            self._erase_wakeup.wait(self.erase_retry_s)
            self._erase_wakeup.clear()
            if self._closed:
                return
            for tenant in list(self._galleries):
                try:
                    self.erase(tenant)
                except ClosedError:
                    return
                except (KeyServiceUnavailableError, RateLimitedError) as exc:
                    log.info("erasure of removed templates postponed: %s", exc)
                    break
                except Exception:  # noqa: BLE001 - logged; the removed slots stay dead (never scored) meanwhile
                    log.exception("erasure of removed templates of a tenant failed")

    # ------------------------------------------------------------------ key-pair rotation

    def rotate_key_pair(
        self,
        new_keys: PublicKeys,
        keyservice: KeyServiceLike | None = None,
        *,
        progress: Callable[[int, int, int], None] | None = None,
        pause: Callable[[], None] | None = None,
    ) -> int:
        """Re-encrypt every block of every tenant under ``new_keys`` through the key service (``keyservice``, else
        the store's), which must hold the current secret key and ``new_keys`` as its next key pair
        (:meth:`KeyServiceCore.rotate`); returns the number of blocks re-encrypted by this call.

        Each block goes through the masked protocol of erasure (the key service sees ``t + r`` only and returns
        ciphertexts under the new public key; removed templates are erased on the way) and is kept in the
        ``rotated`` table with the generation it came from, one transaction per block; the store stays under the
        current key pair until every block is done, then one transaction swaps all blocks and the fingerprint.
        The store keeps serving meanwhile: its lock is released while the key service works on a block, so
        matching and changes go on under the current key pair; a block changed meanwhile (an enrolment, a deletion,
        an erasure) is done again, and the swap happens under the lock once every block's re-encrypted copy is
        of its current generation. Interrupted (kill -9, key service down: KeyServiceUnavailableError, or
        ``pause`` raising), it is resumed by calling it again on the store opened with the current key pair:
        blocks already done and unchanged since are skipped. ``progress(done, total, written)`` reports the blocks
        whose copy is current, the blocks, and those re-encrypted by this call (at each pass over the blocks and
        after each block); ``pause()`` runs before each block (a pace, a stop). PostgreSQL: refused while another
        process has the store open. The binding key (and with it the integrity key and the sealed names) does not
        change."""
        service = keyservice if keyservice is not None else self._require_keyservice()
        rotate = getattr(service, "rotate", None)
        if not callable(rotate):
            raise PreconditionError("this key service cannot rotate key pairs")
        if new_keys.params != self.keys.params:
            raise ConfigError("the new key pair must have the same CKKS parameters")
        if new_keys.fingerprint == self.keys.fingerprint:
            raise ConfigError(f"the store is already under key pair {new_keys.fingerprint}")
        done = 0
        with contextlib.ExitStack() as exclusive:
            try:
                with self._lock:
                    self._check_open()
                    target = self.database.meta().get(ROTATION_META)
                    if target not in (None, new_keys.fingerprint):
                        raise ConfigError(
                            f"{self.where}: a rotation to key pair {target} is unfinished; finish it first"
                        )
                    exclusive.enter_context(self.database.exclusive("a key-pair rotation"))
                    with self._transaction():
                        self.database.put_meta([(ROTATION_META, new_keys.fingerprint)])
                while True:
                    with self._lock:
                        self._check_open()
                        self._sync_all()
                        todo, total = self._rotation_todo()
                        if progress is not None:
                            progress(total - len(todo), total, done)
                        if not todo:  # every copy current: swap under the lock, nothing can change in between
                            with self._transaction():
                                self.database.swap_rotated(new_keys.fingerprint)
                                self.database.delete_meta(ROTATION_META)
                            self.keys = new_keys
                            self._handshake_done = False  # the key service must now hold the new key pair
                            for tenant in list(self._galleries):
                                self._reload(tenant)
                            return done
                    for position, (tenant, block) in enumerate(todo):
                        if pause is not None:
                            pause()
                        written = self._rotate_block(tenant, block, new_keys, rotate)
                        done += written
                        if progress is not None and written:
                            progress(total - len(todo) + position + 1, total, done)
            finally:
                _release_exclusive(self, exclusive)

    def _sync_all(self) -> None:
        """Every tenant of the database loaded and current (before a rotation)."""
        for tenant in self.database.tenants_with_rows():
            self._sync(tenant) if tenant in self._galleries else self._reload(tenant)

    def _rotation_todo(self) -> tuple[list[tuple[str, int]], int]:
        """Under the lock: the ``(tenant, block)`` whose re-encrypted copy is missing or older than the block, and
        the number of blocks."""
        todo, total = [], 0
        for tenant in sorted(self._galleries):
            gallery = self._galleries[tenant]
            total += gallery.block_count
            for block in range(gallery.block_count):
                if self.database.rotated_generation(tenant, block) != gallery.generation(block):
                    todo.append((tenant, block))
        return todo, total

    def _rotate_block(self, tenant: str, block: int, new_keys: PublicKeys, rotate: Any) -> int:
        """Re-encrypt one block unless its copy is current; the key service is called outside the lock, and the copy
        is kept only when the block did not change meanwhile. 1 when a copy was written, else 0."""
        with self._lock:
            self._check_open()
            self._sync(tenant)
            gallery = self._galleries.get(tenant)
            if gallery is None or block >= gallery.block_count:
                return 0
            if self.database.rotated_generation(tenant, block) == gallery.generation(block):
                return 0  # done by an earlier, interrupted run, and unchanged since
            job = gallery.refresh_job(block)
            state = gallery.state(block).copy()
            request = prepare_rotate(gallery, self._binding_key, tenant, job, new_keys.fingerprint)
        columns = rotate(request)
        target = EncryptedGallery(new_keys, self.dim, self._gallery_metric)
        fresh = [to_bytes(c) for c in target.unmask(job, columns)]
        state[state != LIVE] = FREE
        data = encode_block_data(target, block, job.generation + 1, state, fresh, self._tenant_key(tenant))
        with self._lock:
            self._check_open()
            self._sync(tenant)
            gallery = self._galleries.get(tenant)
            if gallery is None or block >= gallery.block_count or gallery.generation(block) != job.generation:
                return 0  # changed while the key service worked: done again on the next pass
            with self._transaction():
                self.database.put_rotated(tenant, block, job.generation, data)
        return 1

    def unfinished_rotation(self) -> str | None:
        """The fingerprint of the key pair an unfinished key-pair rotation goes to (None: none)."""
        with self._lock:
            self._check_open()
            return self.database.meta().get(ROTATION_META)

    # ------------------------------------------------------------------ binding-key rotation

    def rotate_binding_key(self, new_binding_key: bytes, new_integrity_key: bytes | None) -> int:
        """Move the store to a new binding key (the integrity key derived from it, :func:`integrity_key_for`):
        every block is re-tagged under the new integrity key, one transaction per block, then one transaction
        re-wraps the names key and records the new binding key's fingerprint. Returns the blocks re-tagged by this
        call. Interrupted, it is resumed by calling it again (the store opened with the old key and
        ``next_binding``): blocks already re-tagged are skipped. No key service is needed; the store's lock is held
        throughout (run it with the sidecar stopped; PostgreSQL: refused while another process has the store
        open). Refused while a key-pair rotation is unfinished."""
        new_binding_key = bytes(new_binding_key)
        if len(new_binding_key) < 32:
            raise ConfigError("the new binding key must be at least 32 bytes")
        target = binding_fingerprint(new_binding_key)
        if target == binding_fingerprint(self._binding_key):
            raise ConfigError(f"the store is already under binding key {target}")
        with self._lock, self.database.exclusive("a binding-key rotation"):
            self._check_open()
            have = self.database.meta()
            if ROTATION_META in have or self.database.rotation_rows():
                raise ConfigError(f"{self.where}: a key-pair rotation is unfinished; finish it first")
            if have.get(BINDING_ROTATION_META) not in (None, target):
                raise ConfigError(
                    f"{self.where}: a rotation to binding key {have[BINDING_ROTATION_META]} is unfinished; finish it"
                )
            self._next_binding = (new_binding_key, new_integrity_key)
            with self._transaction():
                self.database.put_meta([(BINDING_ROTATION_META, target)])
            done = 0
            self._reseal_subjects(new_binding_key, have)
            for tenant in sorted(self.database.tenants_with_rows()):
                old_key, new_key = self._tenant_key(tenant), _tenant_key(new_integrity_key, tenant)
                for block in self.database.block_numbers(tenant):
                    data = self.database.block(tenant, block)
                    if data is None or block_tag_ok(data, new_key):
                        continue  # re-tagged by an earlier, interrupted run
                    what = f"{self.where} tenant {tenant!r} block {block}"
                    with self._transaction():
                        self.database.lock_tenant(tenant)
                        self.database.put_blocks(tenant, [(block, retag_block(data, old_key, new_key, what))])
                        self.database.bump_generation(tenant)
                    done += 1
            new_meta = {BINDING_META: target}
            if have.get(NAMES_KEY_META):
                names_key = unwrap_names_key(names_cipher(self._binding_key), have[NAMES_KEY_META])
                new_meta[NAMES_KEY_META] = wrap_names_key(names_cipher(new_binding_key), names_key)
            with self._transaction():
                self.database.put_meta(list(new_meta.items()))
                self.database.delete_meta(BINDING_ROTATION_META)
            self._binding_key, self._integrity_key, self._next_binding = new_binding_key, new_integrity_key, None
            self._names = names_from_meta(self.database.meta(), names_cipher(new_binding_key), self.where)
            return done

    def _reseal_subjects(self, new_binding_key: bytes, have: dict[str, str]) -> None:
        """Re-encrypt sealed subject rows not yet under the new binding key's names cipher (one transaction per
        tenant; rows done by an interrupted run are skipped)."""
        if not isinstance(self._names, SealedNames):
            return
        new_cipher = names_cipher(new_binding_key)
        names = names_from_meta(have, names_cipher(self._binding_key, new_binding_key), self.where)
        assert isinstance(names, SealedNames)
        self._names = names
        for tenant in self.database.subject_tenants():
            todo = [
                (stored, text)
                for stored, text in self.database.subject_rows(tenant)
                if names.key_id_of(text) != new_cipher.key_id
            ]
            if not todo:
                continue
            with self._transaction():
                self.database.update_subjects(
                    tenant, [(stored, names.reseal(tenant, stored, text, new_cipher)) for stored, text in todo]
                )

    # ------------------------------------------------------------------ forced erasure

    def compact(self, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
        """Erase every removed template of every tenant now, through the key service (:meth:`erase`), then rewrite
        the database so that no earlier version of a block is left in it (SQLite: ``VACUUM`` and a truncating WAL
        checkpoint, ``secure_delete`` already zeroes freed pages; PostgreSQL: ``VACUUM FULL`` of the store's
        tables). Returns ``erased`` (slots erased by this call), ``pending`` (dead slots left: a block that kept
        changing) and ``bytes`` (database file size; PostgreSQL: the tables' size). ``progress(done, total)`` is
        called with the blocks refreshed so far and the blocks holding removed templates at the start.
        The store keeps serving meanwhile (the key service is called outside its lock; the rewrite holds it).
        KeyServiceUnavailableError when the key service is down (the database is then not rewritten); refused
        while a key-pair rotation is unfinished (its table holds copies of blocks), and on PostgreSQL while another
        process has the store open."""
        self._require_keyservice()
        with contextlib.ExitStack() as exclusive:
            try:
                with self._lock:
                    self._check_open()
                    have = self.database.meta()
                    if ROTATION_META in have or self.database.rotation_rows():
                        raise PreconditionError(f"{self.where}: a key-pair rotation is unfinished; finish it first")
                    exclusive.enter_context(self.database.exclusive("compaction"))
                    self._sync_all()
                    tenants = sorted(self._galleries)
                    total = sum(len(self._galleries[t].dirty_blocks()) for t in tenants)
                refreshed = [0]

                def one_block() -> None:
                    refreshed[0] += 1
                    if progress is not None:
                        progress(min(refreshed[0], total), total)

                if progress is not None:
                    progress(0, total)
                erased = sum(self.erase(tenant, on_block=one_block) for tenant in tenants)
                with self._lock:
                    self._check_open()
                    pending = 0
                    for gallery in self._galleries.values():
                        pending += sum(int((gallery.state(b) == DEAD).sum()) for b in gallery.dirty_blocks())
                    size = self.database.compact()
            finally:
                _release_exclusive(self, exclusive)
        return {"erased": erased, "pending": pending, "bytes": size}

    # ------------------------------------------------------------------ matching

    def _require_keyservice(self) -> KeyServiceLike:
        """The key service, after its handshake (a gRPC client that was down at start is checked on first use:
        ConfigError when it holds another key pair)."""
        if self.keyservice is None:
            raise PreconditionError("this encrypted store has no key service configured")
        handshake = getattr(self.keyservice, "handshake", None)
        if not self._handshake_done and callable(handshake):
            self.handshake_done(int(handshake(self.keys.fingerprint).top_k_max))
        return self.keyservice

    def handshake_done(self, top_k_max: int | None) -> None:
        """Record a successful handshake with the key service and its ``top_k`` limit."""
        self.keyservice_top_k_max = top_k_max
        self._handshake_done = True

    def verify_encrypted(self, tenant: str, subject_id: str, probe: Any) -> tuple[bool, str, float | None]:
        """``(match, best template id if matched else "", released score or None)`` for ``probe`` against the
        subject's encrypted templates, decided by the key service (NotFoundError before any scoring)."""
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        with _checked_probe(probe, self.dim) as query:
            keyservice = self._require_keyservice()
            with self._lock:
                self._check_open()
                self._sync(tenant)
                slots = self._slots.get(tenant, {})
                refs = sorted(ref for ref, (_, subject) in slots.items() if subject == subject_id)
                if not refs:
                    raise NotFoundError(f"subject {subject_id!r} not found in tenant {tenant!r}")
                prepared = prepare_scores(
                    self._galleries[tenant], self._binding_key, "verify", tenant, query, refs=refs, threads=self.threads
                )
        decision = keyservice.verify(prepared.request)
        if not decision.match or decision.best is None:
            return False, "", None
        best = decision.best
        ref = prepared.ref(best) if 0 <= best.item < len(prepared.blocks) else None
        template_id = slots.get(ref, ("", ""))[0] if ref is not None else ""
        return True, template_id, best.score

    def identify_encrypted(self, tenant: str, probe: Any, k: int) -> list[Match]:
        """The best ``k`` subjects at or above the key service's threshold (score NaN unless it releases scores)."""
        check_id(tenant, "tenant")
        k = check_positive_int(k, "k", 1000)
        if self.keyservice_top_k_max is not None:
            k = min(k, self.keyservice_top_k_max)
        with _checked_probe(probe, self.dim) as query:
            keyservice = self._require_keyservice()
            with self._lock:
                self._check_open()
                self._sync(tenant)
                gallery = self._galleries.get(tenant)
                slots = dict(self._slots.get(tenant, {}))
                if gallery is None or not slots:
                    return []
                numbers: dict[str, int] = {}
                groups = {ref: numbers.setdefault(subject, len(numbers)) for ref, (_, subject) in slots.items()}
                prepared = prepare_scores(
                    gallery, self._binding_key, "identify", tenant, query, groups=groups, top_k=k, threads=self.threads
                )
        out = []
        for decision in keyservice.identify(prepared.request):
            if not 0 <= decision.item < len(prepared.blocks) or prepared.ref(decision) not in slots:
                continue  # not a slot of this request: ignore what the key service should not have returned
            template_id, subject_id = slots[prepared.ref(decision)]
            score = math.nan if decision.score is None else float(decision.score)
            out.append(Match(subject_id, template_id, score))
        return out

    def subject_vectors(self, tenant: str, subject_id: str) -> np.ndarray:
        raise PreconditionError("encrypted templates cannot be read back; use verify_encrypted")

    def search(self, tenant: str, probe: np.ndarray, k: int) -> list[Match]:
        raise PreconditionError("encrypted templates are searched through the key service; use identify_encrypted")

    # ------------------------------------------------------------------ reading

    def _subject_exists(self, tenant: str, subject_id: str) -> bool:
        return self.database.subject(tenant, self._names.stored_id(tenant, subject_id)) is not None

    def get_subject(self, tenant: str, subject_id: str) -> SubjectInfo:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        with self._lock:
            self._check_open()
            with self.database.snapshot():
                return self._info(tenant, subject_id)

    def _info(self, tenant: str, subject_id: str) -> SubjectInfo:
        stored = self._names.stored_id(tenant, subject_id)
        row = self.database.subject(tenant, stored)
        if row is None:
            raise NotFoundError(f"subject {subject_id!r} not found in tenant {tenant!r}")
        return self._row_info(tenant, stored, row[0], row[1])

    def _row_info(self, tenant: str, stored: str, text: str, created_at: float) -> SubjectInfo:
        """The SubjectInfo of a subject row (its id and metadata opened)."""
        subject_id, metadata = self._unpack(tenant, stored, text)
        return SubjectInfo(subject_id, metadata, self.database.template_ids(tenant, stored), float(created_at))

    def list_subjects(self, tenant: str, page_size: int = 100, page_token: str = "") -> tuple[list[SubjectInfo], str]:
        check_id(tenant, "tenant")
        size = check_positive_int(page_size, "page_size", MAX_PAGE_SIZE)
        after = decode_page_token(page_token)
        with self._lock:
            self._check_open()
            with self.database.snapshot():
                rows = self.database.subject_page(tenant, after, size + 1)
                page = [self._row_info(tenant, *r) for r in rows[:size]]
        token = encode_page_token(rows[size - 1][0]) if len(rows) > size else ""  # stored ids: sealed, fixed order
        return page, token

    def count(self, tenant: str | None = None, *, subjects: bool = False) -> int:
        with self._lock:
            self._check_open()
            if tenant is not None:
                check_id(tenant, "tenant")
            return self.database.count("subjects" if subjects else "templates", tenant)

    def tenants(self) -> list[str]:
        with self._lock:
            self._check_open()
            return self.database.subject_tenants()

    def read_transform_marker(self) -> dict[str, Any] | None:
        """What the templates were issued under (the keyed-transform marker, kept in ``meta`` so that every sidecar
        on a shared database sees it; None: never recorded). The SQLite store keeps it in a file beside the
        database instead (:func:`advface.service.stores.check_transform_marker`)."""
        with self._lock:
            self._check_open()
            value = self.database.meta().get(TRANSFORM_MARKER_META)
        if value is None:
            return None
        try:
            marker = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"{self.where}: unreadable keyed-transform marker ({exc})") from None
        if not isinstance(marker, dict):
            raise ConfigError(f"{self.where}: unreadable keyed-transform marker (not an object)")
        return marker

    def write_transform_marker(self, value: Mapping[str, Any] | None) -> None:
        """Record (None: remove) the keyed-transform marker in ``meta``, durably."""
        with self._lock:
            self._check_open()
            with self._transaction():
                if value is None:
                    self.database.delete_meta(TRANSFORM_MARKER_META)
                else:
                    self.database.put_meta([(TRANSFORM_MARKER_META, json.dumps(dict(value), sort_keys=True))])

    def live_slot_count(self, tenant: str) -> int:
        """Live slots of the tenant's gallery (equals its template count)."""
        with self._lock:
            gallery = self._galleries.get(tenant)
            return (
                0 if gallery is None else int(sum((gallery.state(b) == LIVE).sum() for b in range(gallery.block_count)))
            )

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._erase_wakeup.set()
                self.database.close()
                close = getattr(self.keyservice, "close", None)
                if callable(close):
                    close()
                self._galleries.clear()
                self._slots.clear()
                self._generations.clear()


class EncryptedSQLiteStore(EncryptedStore):
    """Encrypted templates in one SQLite file (:mod:`advface.encrypted.sqlite_database`; one process at a time): a
    thin wrapper, ``EncryptedStore(lambda: SQLiteBlockDatabase(path), ...)`` with ``path`` kept as ``self.path``;
    options: :class:`EncryptedStoreOptions`."""

    def __init__(
        self,
        path: str | Path,
        keys: PublicKeys,
        binding_key: bytes,
        dim: int,
        metric: StoreMetric,
        **options: Unpack[EncryptedStoreOptions],
    ) -> None:
        self.path = Path(path)
        super().__init__(lambda: SQLiteBlockDatabase(self.path), keys, binding_key, dim, metric, **options)

    @property
    def _db(self) -> sqlite3.Connection:
        """The SQLite connection (tests and tools read rows through it)."""
        assert isinstance(self.database, SQLiteBlockDatabase)
        return self.database.conn


class EncryptedPostgresStore(EncryptedStore):
    """Encrypted templates in a PostgreSQL database at ``dsn`` (:mod:`advface.encrypted.postgres_database`: tables
    ``<table_prefix>_*``, several processes may open it): a thin wrapper, ``EncryptedStore(lambda:
    PostgresBlockDatabase(dsn, ...), ...)``; options: :class:`EncryptedStoreOptions`. DatabaseUnavailableError when
    the server cannot be reached."""

    def __init__(
        self,
        dsn: str,
        keys: PublicKeys,
        binding_key: bytes,
        dim: int,
        metric: StoreMetric,
        *,
        table_prefix: str | None = None,
        connect_timeout: float = 10.0,
        **options: Unpack[EncryptedStoreOptions],
    ) -> None:
        from advface.encrypted.postgres_database import TABLE_PREFIX_DEFAULT, PostgresBlockDatabase

        prefix = TABLE_PREFIX_DEFAULT if table_prefix is None else table_prefix
        super().__init__(
            lambda: PostgresBlockDatabase(dsn, table_prefix=prefix, connect_timeout=connect_timeout),
            keys,
            binding_key,
            dim,
            metric,
            **options,
        )


def _release_exclusive(store: EncryptedStore, exclusive: contextlib.ExitStack) -> None:
    """Leave :meth:`BlockDatabase.exclusive` under the store's lock (it uses the store's connection); nothing to
    release once the store is closed (closing the connection released it)."""
    with store._lock:
        if store._closed:
            exclusive.pop_all()
        else:
            exclusive.close()


@contextlib.contextmanager
def _checked_probe(probe: Any, dim: int) -> Iterator[np.ndarray]:
    """The checked probe (``dim`` float32 values); a copy made by the check is wiped on leaving."""
    checked = check_probe(probe, dim)
    try:
        yield checked[0]
    finally:
        if not (isinstance(probe, np.ndarray) and np.shares_memory(checked, probe)):
            wipe(checked)


def _caller_owns(checked: np.ndarray, item: Any) -> bool:
    """Whether a checked vector array is (a view of) the array the caller passed in ``item``."""
    given = item[1] if isinstance(item, Sequence) and len(item) > 1 else None
    return isinstance(given, np.ndarray) and np.shares_memory(checked, given)


def integrity_key_for(binding_key: bytes) -> bytes:
    """The key that authenticates an encrypted store's blocks, derived from the sidecar's binding key (as
    ``store.matching: encrypted`` opens it)."""
    return hmac.new(binding_key, b"advface encrypted store integrity", "sha256").digest()


def _tenant_key(integrity_key: bytes | None, tenant: str) -> bytes | None:
    """The per-tenant block key under ``integrity_key`` (None: checksums only)."""
    if integrity_key is None:
        return None
    return hmac.new(integrity_key, b"advface encrypted store tenant\x00" + tenant.encode(), "sha256").digest()


def names_cipher(binding_key: bytes, *others: bytes) -> TemplateCipher:
    """The cipher wrapping an encrypted store's names key and sealing its subject rows: a key derived from the
    binding key (encrypting), plus keys derived from ``others`` (decrypting too: a binding-key rotation)."""
    return TemplateCipher(
        [hmac.new(k, b"advface encrypted store names", "sha256").digest() for k in (binding_key, *others)]
    )
