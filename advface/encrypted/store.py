"""A template store whose templates are CKKS ciphertexts: SQLite for subjects, the slot map and the gallery's blocks.

:class:`EncryptedSQLiteStore` implements :class:`~advface.store.base.TemplateStore` (same ids, tenants, metadata,
paging and validation) except that templates can never be read back: :meth:`~EncryptedSQLiteStore.subject_vectors`
and :meth:`~EncryptedSQLiteStore.search` raise :class:`~advface.errors.PreconditionError`. Matching goes through
:meth:`~EncryptedSQLiteStore.verify_encrypted` and :meth:`~EncryptedSQLiteStore.identify_encrypted`, which score the
plaintext probe against the encrypted blocks of the tenant and ask the key service for the decision. Enrolment and
deletion never need the key service; erasing removed templates (:meth:`~EncryptedSQLiteStore.erase`) does: with
``auto_erase`` (the default when a key service is given) a background thread erases them after each deletion, and
retries every ``erase_retry_s`` while the key service is down (removed templates are dead slots meanwhile: never
scored or released, still encrypted in their block).

One process opens a database at a time (``<file>.lock``, as for the SQLite store): a sidecar and ``advface
reencode`` never write the same store together.

Durability: every change (enrolment, deletion) rewrites the blocks it touched and the slot map in one SQLite
transaction (WAL, ``synchronous=FULL``, ``secure_delete=ON``); when the transaction fails, the tenant's gallery is
reloaded from the database, so memory never holds what the database does not. Integrity: each block row is an
authenticated block (:mod:`advface.encrypted.blocks`) under a per-tenant key derived from the integrity key; on open,
every block is checked and the live slots of the blocks must be exactly the slots of the template rows, so an
altered, swapped or rolled-back block is detected and named (:class:`~advface.errors.IntegrityError`). A database
made under another key pair, dimension or metric is refused (:class:`~advface.errors.ConfigError`).

Subject ids and metadata are sealed (:mod:`advface.store.sealing`, as in SQLite stores created encrypted): the
``subject_id`` columns hold keyed hashes, the ``metadata`` column AES-256-GCM ciphertext of id and metadata, under a
names key wrapped in the ``meta`` table under a key derived from the binding key (the sidecar's secret, beside the
public key). A thief of the database file alone reads tenants, template ids, times and ciphertexts: no subject id,
metadata value or template. Stores made before sealing existed keep plain names.

Key-pair rotation (:meth:`~EncryptedSQLiteStore.rotate_key_pair`): every block re-encrypted under a new key pair
through the key service, resumable, swapped in one transaction. Not yet: PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from advface.crypto import TemplateCipher
from advface.encrypted._seal import to_bytes
from advface.encrypted.binding import BoundRequest, binding_fingerprint
from advface.encrypted.blocks import block_tag_ok, decode_block, encode_block, encode_block_data, retag_block
from advface.encrypted.errors import KeyServiceUnavailableError, RateLimitedError
from advface.encrypted.gallery import DEAD, FREE, LIVE, EncryptedGallery, GalleryMetric, SlotRef
from advface.encrypted.keys import PublicKeys
from advface.encrypted.keyservice import Decision, VerifyDecision
from advface.encrypted.memory import scrub_caches, wipe
from advface.encrypted.requests import prepare_refresh, prepare_rotate, prepare_scores
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
from advface.store.sqlite_faiss.database import acquire_process_lock

__all__ = ["EncryptedSQLiteStore", "KeyServiceLike", "integrity_key_for", "names_cipher"]

log = logging.getLogger("advface.store")

FORMAT = "advface.encrypted-store.v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subjects (
    tenant TEXT NOT NULL, subject_id TEXT NOT NULL, metadata TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (tenant, subject_id));
CREATE TABLE IF NOT EXISTS templates (
    template_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, subject_id TEXT NOT NULL, seq INTEGER NOT NULL,
    block INTEGER NOT NULL, slot INTEGER NOT NULL, UNIQUE (tenant, block, slot));
CREATE INDEX IF NOT EXISTS templates_subject ON templates (tenant, subject_id, seq);
CREATE TABLE IF NOT EXISTS blocks (tenant TEXT NOT NULL, block INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (tenant, block));
CREATE TABLE IF NOT EXISTS rotated (tenant TEXT NOT NULL, block INTEGER NOT NULL, source_generation INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (tenant, block));
"""
#: ``meta`` key of the fingerprint of the key pair an unfinished rotation goes to
ROTATION_META = "rotation_target"
#: ``meta`` keys of the binding key's fingerprint, and of the new one during an unfinished binding-key rotation
BINDING_META = "binding_fingerprint"
BINDING_ROTATION_META = "binding_rotation_target"


class KeyServiceLike(Protocol):
    """What the store needs of a key service: the in-process core or the gRPC client."""

    def verify(self, request: BoundRequest) -> VerifyDecision: ...

    def identify(self, request: BoundRequest) -> list[Decision]: ...

    def refresh(self, request: BoundRequest) -> list[bytes]: ...

    # and, for key-pair rotation: ``rotate(request) -> list[bytes]`` (KeyServiceCore.rotate)


class EncryptedSQLiteStore(TemplateStore):
    """Encrypted templates in one SQLite file; thread-safe (one lock serialises changes and scoring)."""

    matching = "encrypted"

    def __init__(
        self,
        path: str | Path,
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
        self.path = Path(path)
        self._lock = threading.RLock()
        self._closed = False
        self._lock_fd = acquire_process_lock(self.path)  # one process at a time (a sidecar, or `advface reencode`)
        try:
            if not self.path.exists():  # private before SQLite creates it (the -wal/-shm files copy its mode)
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except BaseException:
            self._release_process_lock()
            raise
        try:
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON", "foreign_keys=ON"):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.executescript(_SCHEMA)
            self._check_meta()
            self._galleries: dict[str, EncryptedGallery] = {}
            self._slots: dict[str, dict[SlotRef, tuple[str, str]]] = {}
            tenants = "SELECT tenant FROM blocks UNION SELECT tenant FROM templates"
            for (tenant,) in self._db.execute(tenants).fetchall():
                self._reload(tenant)
        except BaseException:
            self._db.close()
            self._release_process_lock()
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
        have = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not have:
            self._names, sealed = new_sealed_names(names_cipher(self._binding_key))
            recorded = {BINDING_META: binding_fingerprint(self._binding_key)}
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [*want.items(), *sealed.items(), *recorded.items()]
                )
            return
        if have.get("format") != FORMAT:
            raise ConfigError(f"{self.path} is not an encrypted template store ({have.get('format')!r})")
        if have.get("fingerprint") != self.keys.fingerprint and have.get(ROTATION_META) == self.keys.fingerprint:
            raise ConfigError(
                f"{self.path}: the rotation to key pair {self.keys.fingerprint} is unfinished; open the store with "
                f"its current key pair {have.get('fingerprint')} and run the rotation again to finish it"
            )
        if have.get("fingerprint") != self.keys.fingerprint:
            raise ConfigError(
                f"{self.path} holds templates encrypted under key pair {have.get('fingerprint')}, not under this "
                f"sidecar's public key {self.keys.fingerprint}: wrong key pair"
            )
        for name in ("dim", "metric"):
            if have.get(name) != want[name]:
                raise ConfigError(f"{self.path} was made for {name} {have.get(name)}, not {want[name]}")
        self._check_binding_meta(have)
        # during a binding-key rotation, subject rows already resealed under the new key open too
        cipher = names_cipher(self._binding_key, *([self._next_binding[0]] if self._next_binding else []))
        if NAMES_META not in have and self._db.execute("SELECT 1 FROM subjects LIMIT 1").fetchone() is None:
            self._names, sealed = new_sealed_names(cipher)  # an empty store made before sealing: sealed from now on
            with self._transaction():
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", list(sealed.items()))
            return
        self._names = names_from_meta(have, cipher, str(self.path))

    def _check_binding_meta(self, have: dict[str, str]) -> None:
        """ConfigError when the store is under another binding key, or a binding-key rotation is unfinished and
        this opening does not carry its new key."""
        mine = binding_fingerprint(self._binding_key)
        recorded = have.get(BINDING_META)
        if recorded is not None and recorded != mine:
            raise ConfigError(
                f"{self.path} is under binding key {recorded}, not this sidecar's {mine}: if a binding-key rotation "
                "was interrupted after the store switched, run `advface keyservice rotate-binding store` again "
                "to finish it; otherwise use the store's key folder"
            )
        target = have.get(BINDING_ROTATION_META)
        if target is None:
            return
        if self._next_binding is None:
            raise ConfigError(
                f"{self.path}: the rotation to binding key {target} is unfinished; run `advface keyservice "
                "rotate-binding store` again to finish it"
            )
        if binding_fingerprint(self._next_binding[0]) != target:
            raise ConfigError(f"{self.path}: an unfinished binding-key rotation goes to {target}, not to this key")

    @property
    def sealed_names(self) -> bool:
        """Whether subject ids and metadata are sealed at rest (every store made since sealing exists)."""
        return self._names.sealed

    def _tenant_key(self, tenant: str) -> bytes | None:
        return _tenant_key(self._integrity_key, tenant)

    def _reload(self, tenant: str) -> None:
        """Rebuild a tenant's gallery and slot map from the database, checking every block."""
        gallery = EncryptedGallery(self.keys, self.dim, self._gallery_metric)
        key = self._tenant_key(tenant)
        rows = self._db.execute("SELECT block, data FROM blocks WHERE tenant=? ORDER BY block", (tenant,)).fetchall()
        for index, (block, data) in enumerate(rows):
            what = f"{self.path} tenant {tenant!r} block {block}"
            if block != index:
                raise IntegrityError(f"{what}: blocks are not contiguous (block {index} missing)")
            block_key = key
            if self._next_binding is not None:  # a block re-tagged by an unfinished binding-key rotation
                next_key = _tenant_key(self._next_binding[1], tenant)
                if not block_tag_ok(bytes(data), key) and block_tag_ok(bytes(data), next_key):
                    block_key = next_key
            header, state, columns = decode_block(gallery, bytes(data), block_key, what)
            if header.get("block") != block:
                raise IntegrityError(f"{what}: holds block {header.get('block')} (swapped)")
            gallery.import_block(block, int(header["generation"]), state, columns)
        subjects = self._subject_ids(tenant)
        slots: dict[SlotRef, tuple[str, str]] = {}
        for template_id, stored, block, slot in self._db.execute(
            "SELECT template_id, subject_id, block, slot FROM templates WHERE tenant=?", (tenant,)
        ):
            if stored not in subjects:
                raise IntegrityError(f"{self.path} tenant {tenant!r}: template {template_id} has no subject row")
            slots[SlotRef(int(block), int(slot))] = (str(template_id), subjects[stored])
        live = set(gallery.live_slots())
        if live != set(slots):
            raise IntegrityError(
                f"{self.path} tenant {tenant!r}: {len(live ^ set(slots))} slots differ between the encrypted blocks "
                "and the template rows (altered or rolled back)"
            )
        self._galleries[tenant] = gallery
        self._slots[tenant] = slots

    def _subject_ids(self, tenant: str) -> dict[str, str]:
        """Stored id -> subject id of every subject row of ``tenant`` (sealed rows opened; IntegrityError naming the
        tenant when one fails authentication, e.g. moved to another subject's row)."""
        out = {}
        for stored, text in self._db.execute("SELECT subject_id, metadata FROM subjects WHERE tenant=?", (tenant,)):
            out[str(stored)] = self._unpack(tenant, str(stored), str(text))[0]
        return out

    def _unpack(self, tenant: str, stored: str, text: str) -> tuple[str, dict[str, str]]:
        """A subject row's ``(subject id, metadata)``; IntegrityError naming the store and tenant."""
        try:
            return self._names.unpack(tenant, stored, text)
        except (IntegrityError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{self.path} tenant {tenant!r}: a subject row fails to open ({exc})") from None

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

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _write_blocks(self, tenant: str, gallery: EncryptedGallery, blocks: set[int]) -> None:
        key = self._tenant_key(tenant)
        for block in sorted(blocks):
            self._db.execute(
                "INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)", (tenant, block, encode_block(gallery, block, key))
            )

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
                gallery = self._gallery(tenant)
                wipe(gallery.template_values(vectors))  # EmbeddingError before any change
                try:
                    return self._add(tenant, gallery, checked, vectors, replace)
                except BaseException:
                    self._reload(tenant)
                    raise
        finally:
            wipe(vectors, *ours)
            scrub_caches()

    def _add(
        self,
        tenant: str,
        gallery: EncryptedGallery,
        checked: list[tuple[str, np.ndarray, dict[str, str] | None]],
        vectors: np.ndarray,
        replace: bool,
    ) -> list[list[str]]:
        slots = self._slots[tenant]
        removed: list[SlotRef] = []
        if replace:
            wanted = {subject for subject, _, _ in checked}
            removed = [ref for ref, (_, subject) in slots.items() if subject in wanted]
        if removed:
            gallery.remove(removed)
        refs = gallery.add(vectors)
        ids: list[list[str]] = []
        now = time.time()
        names = self._names
        with self._transaction():
            if removed:
                self._db.executemany(
                    "DELETE FROM templates WHERE tenant=? AND block=? AND slot=?",
                    [(tenant, r.block, r.slot) for r in removed],
                )
            position = 0
            for subject_id, vectors, metadata in checked:
                stored = names.stored_id(tenant, subject_id)
                row = self._db.execute(
                    "SELECT metadata FROM subjects WHERE tenant=? AND subject_id=?", (tenant, stored)
                ).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO subjects VALUES (?, ?, ?, ?)",
                        (tenant, stored, names.pack(tenant, stored, subject_id, dict(metadata or {})), now),
                    )
                else:
                    old = self._unpack(tenant, stored, row[0])[1]
                    merged = dict(metadata or {}) if replace else {**old, **(metadata or {})}
                    merged = check_metadata(merged, f"metadata of subject {subject_id!r} after merging")
                    self._db.execute(
                        "UPDATE subjects SET metadata=? WHERE tenant=? AND subject_id=?",
                        (names.pack(tenant, stored, subject_id, merged), tenant, stored),
                    )
                (seq,) = self._db.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM templates WHERE tenant=? AND subject_id=?", (tenant, stored)
                ).fetchone()
                new_ids = []
                for i in range(len(vectors)):
                    ref = refs[position + i]
                    template_id = uuid.uuid4().hex
                    self._db.execute(
                        "INSERT INTO templates VALUES (?, ?, ?, ?, ?, ?)",
                        (template_id, tenant, stored, int(seq) + 1 + i, ref.block, ref.slot),
                    )
                    new_ids.append(template_id)
                position += len(vectors)
                ids.append(new_ids)
            self._write_blocks(tenant, gallery, {r.block for r in refs} | {r.block for r in removed})
        for ref in removed:
            slots.pop(ref, None)
        if removed:
            self._erase_wakeup.set()
        position = 0
        for (subject_id, vectors, _), new_ids in zip(checked, ids):
            for i, template_id in enumerate(new_ids):
                slots[refs[position + i]] = (template_id, subject_id)
            position += len(vectors)
        return ids

    def delete_subject(self, tenant: str, subject_id: str) -> int:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        with self._lock:
            self._check_open()
            slots = self._slots.get(tenant, {})
            refs = [ref for ref, (_, subject) in slots.items() if subject == subject_id]
            if not refs and not self._subject_exists(tenant, subject_id):
                raise NotFoundError(f"subject {subject_id!r} not found in tenant {tenant!r}")
            self._remove(tenant, refs, delete_subjects={subject_id})
            return len(refs)

    def delete_template(self, tenant: str, template_id: str) -> str:
        check_id(tenant, "tenant")
        check_id(template_id, "template_id")
        with self._lock:
            self._check_open()
            slots = self._slots.get(tenant, {})
            found = [(ref, subject) for ref, (tid, subject) in slots.items() if tid == template_id]
            if not found:
                raise NotFoundError(f"template {template_id!r} not found in tenant {tenant!r}")
            ref, subject_id = found[0]
            last = sum(1 for _, s in slots.values() if s == subject_id) == 1
            self._remove(tenant, [ref], delete_subjects={subject_id} if last else set())
            return subject_id

    def _remove(self, tenant: str, refs: list[SlotRef], delete_subjects: set[str]) -> None:
        try:
            if refs:
                self._galleries[tenant].remove(refs)
            with self._transaction():
                self._db.executemany(
                    "DELETE FROM templates WHERE tenant=? AND block=? AND slot=?",
                    [(tenant, r.block, r.slot) for r in refs],
                )
                self._db.executemany(
                    "DELETE FROM subjects WHERE tenant=? AND subject_id=?",
                    [(tenant, self._names.stored_id(tenant, s)) for s in delete_subjects],
                )
                if refs:
                    self._write_blocks(tenant, self._galleries[tenant], {r.block for r in refs})
        except BaseException:
            if tenant in self._galleries:
                self._reload(tenant)
            raise
        for ref in refs:
            self._slots[tenant].pop(ref, None)
        self._erase_wakeup.set()

    def erase(self, tenant: str, attempts: int = 3) -> int:
        """Erase removed templates of ``tenant`` through the key service (a refresh of each block holding some);
        returns how many slots were erased. The key service is called outside the store's lock; a block that
        changed meanwhile is started again (at most ``attempts`` times per block). KeyServiceUnavailableError
        leaves everything as it was."""
        check_id(tenant, "tenant")
        keyservice = self._require_keyservice()
        erased = 0
        tries: dict[int, int] = {}
        while True:
            with self._lock:
                self._check_open()
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
                gallery = self._galleries.get(tenant)
                if gallery is None:
                    return erased
                try:
                    freed = gallery.finish_refresh(job, columns)
                except PreconditionError:
                    continue  # the block changed while the key service worked: start it again
                try:
                    with self._transaction():
                        self._write_blocks(tenant, gallery, {block})
                except BaseException:
                    self._reload(tenant)
                    raise
                erased += freed

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

    def rotate_key_pair(self, new_keys: PublicKeys, keyservice: KeyServiceLike | None = None) -> int:
        """Re-encrypt every block of every tenant under ``new_keys`` through the key service (``keyservice``, else
        the store's), which must hold the current secret key and ``new_keys`` as its next key pair
        (:meth:`KeyServiceCore.rotate`); returns the number of blocks re-encrypted by this call.

        Each block goes through the masked protocol of erasure (the key service sees ``t + r`` only and returns
        ciphertexts under the new public key; removed templates are erased on the way) and is kept in the
        ``rotated`` table with the generation it came from, one transaction per block; the store stays under the
        current key pair until every block is done, then one transaction swaps all blocks and the fingerprint.
        Interrupted (kill -9, key service down: KeyServiceUnavailableError), it is resumed by calling it again on
        the store opened with the current key pair: blocks already done and unchanged since are skipped, changed
        ones are done again. The store's lock is held throughout (matching waits): run it with the sidecar
        stopped. The binding key (and with it the integrity key and the sealed names) does not change."""
        service = keyservice if keyservice is not None else self._require_keyservice()
        rotate = getattr(service, "rotate", None)
        if not callable(rotate):
            raise PreconditionError("this key service cannot rotate key pairs")
        if new_keys.params != self.keys.params:
            raise ConfigError("the new key pair must have the same CKKS parameters")
        if new_keys.fingerprint == self.keys.fingerprint:
            raise ConfigError(f"the store is already under key pair {new_keys.fingerprint}")
        with self._lock:
            self._check_open()
            target = dict(self._db.execute("SELECT key, value FROM meta").fetchall()).get(ROTATION_META)
            if target not in (None, new_keys.fingerprint):
                raise ConfigError(f"{self.path}: a rotation to key pair {target} is unfinished; finish it first")
            with self._transaction():
                self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (ROTATION_META, new_keys.fingerprint))
            done = sum(self._rotate_tenant(tenant, new_keys, rotate) for tenant in sorted(self._galleries))
            with self._transaction():
                self._db.execute(
                    "UPDATE blocks SET data = (SELECT r.data FROM rotated r WHERE r.tenant = blocks.tenant "
                    "AND r.block = blocks.block)"
                )
                self._db.execute("DELETE FROM rotated")
                self._db.execute("UPDATE meta SET value=? WHERE key='fingerprint'", (new_keys.fingerprint,))
                self._db.execute("DELETE FROM meta WHERE key=?", (ROTATION_META,))
            self.keys = new_keys
            self._handshake_done = False  # the key service must now hold the new key pair
            for tenant in list(self._galleries):
                self._reload(tenant)
            return done

    def _rotate_tenant(self, tenant: str, new_keys: PublicKeys, rotate: Any) -> int:
        """Re-encrypt the blocks of ``tenant`` not yet in ``rotated`` at their current generation."""
        gallery = self._galleries[tenant]
        target = EncryptedGallery(new_keys, self.dim, self._gallery_metric)
        key = self._tenant_key(tenant)
        done = 0
        for block in range(gallery.block_count):
            row = self._db.execute(
                "SELECT source_generation FROM rotated WHERE tenant=? AND block=?", (tenant, block)
            ).fetchone()
            if row is not None and int(row[0]) == gallery.generation(block):
                continue  # done by an earlier, interrupted run, and unchanged since
            job = gallery.refresh_job(block)
            columns = rotate(prepare_rotate(gallery, self._binding_key, tenant, job, new_keys.fingerprint))
            fresh = [to_bytes(c) for c in target.unmask(job, columns)]
            state = gallery.state(block).copy()
            state[state != LIVE] = FREE
            data = encode_block_data(target, block, job.generation + 1, state, fresh, key)
            with self._transaction():
                self._db.execute(
                    "INSERT OR REPLACE INTO rotated VALUES (?, ?, ?, ?)", (tenant, block, job.generation, data)
                )
            done += 1
        return done

    # ------------------------------------------------------------------ binding-key rotation

    def rotate_binding_key(self, new_binding_key: bytes, new_integrity_key: bytes | None) -> int:
        """Move the store to a new binding key (the integrity key derived from it, :func:`integrity_key_for`):
        every block is re-tagged under the new integrity key, one transaction per block, then one transaction
        re-wraps the names key and records the new binding key's fingerprint. Returns the blocks re-tagged by this
        call. Interrupted, it is resumed by calling it again (the store opened with the old key and
        ``next_binding``): blocks already re-tagged are skipped. No key service is needed; the store's lock is held
        throughout (run it with the sidecar stopped). Refused while a key-pair rotation is unfinished."""
        new_binding_key = bytes(new_binding_key)
        if len(new_binding_key) < 32:
            raise ConfigError("the new binding key must be at least 32 bytes")
        target = binding_fingerprint(new_binding_key)
        if target == binding_fingerprint(self._binding_key):
            raise ConfigError(f"the store is already under binding key {target}")
        with self._lock:
            self._check_open()
            have = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if ROTATION_META in have or self._db.execute("SELECT 1 FROM rotated LIMIT 1").fetchone() is not None:
                raise ConfigError(f"{self.path}: a key-pair rotation is unfinished; finish it first")
            if have.get(BINDING_ROTATION_META) not in (None, target):
                raise ConfigError(
                    f"{self.path}: a rotation to binding key {have[BINDING_ROTATION_META]} is unfinished; finish it"
                )
            self._next_binding = (new_binding_key, new_integrity_key)
            with self._transaction():
                self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (BINDING_ROTATION_META, target))
            done = 0
            self._reseal_subjects(new_binding_key, have)
            for tenant in sorted(self._galleries):
                old_key, new_key = self._tenant_key(tenant), _tenant_key(new_integrity_key, tenant)
                blocks = [
                    b for (b,) in self._db.execute("SELECT block FROM blocks WHERE tenant=? ORDER BY block", (tenant,))
                ]
                for block in blocks:
                    (data,) = self._db.execute(
                        "SELECT data FROM blocks WHERE tenant=? AND block=?", (tenant, block)
                    ).fetchone()
                    if block_tag_ok(bytes(data), new_key):
                        continue  # re-tagged by an earlier, interrupted run
                    what = f"{self.path} tenant {tenant!r} block {block}"
                    with self._transaction():
                        self._db.execute(
                            "UPDATE blocks SET data=? WHERE tenant=? AND block=?",
                            (retag_block(bytes(data), old_key, new_key, what), tenant, block),
                        )
                    done += 1
            new_meta = {BINDING_META: target}
            if have.get(NAMES_KEY_META):
                names_key = unwrap_names_key(names_cipher(self._binding_key), have[NAMES_KEY_META])
                new_meta[NAMES_KEY_META] = wrap_names_key(names_cipher(new_binding_key), names_key)
            with self._transaction():
                self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(new_meta.items()))
                self._db.execute("DELETE FROM meta WHERE key=?", (BINDING_ROTATION_META,))
            self._binding_key, self._integrity_key, self._next_binding = new_binding_key, new_integrity_key, None
            have = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            self._names = names_from_meta(have, names_cipher(new_binding_key), str(self.path))
            return done

    def _reseal_subjects(self, new_binding_key: bytes, have: dict[str, str]) -> None:
        """Re-encrypt sealed subject rows not yet under the new binding key's names cipher (one transaction per
        tenant; rows done by an interrupted run are skipped)."""
        if not isinstance(self._names, SealedNames):
            return
        new_cipher = names_cipher(new_binding_key)
        names = names_from_meta(have, names_cipher(self._binding_key, new_binding_key), str(self.path))
        assert isinstance(names, SealedNames)
        self._names = names
        tenants = [t for (t,) in self._db.execute("SELECT DISTINCT tenant FROM subjects ORDER BY tenant")]
        for tenant in tenants:
            rows = self._db.execute("SELECT subject_id, metadata FROM subjects WHERE tenant=?", (tenant,)).fetchall()
            todo = [
                (str(stored), str(text)) for stored, text in rows if names.key_id_of(str(text)) != new_cipher.key_id
            ]
            if not todo:
                continue
            with self._transaction():
                self._db.executemany(
                    "UPDATE subjects SET metadata=? WHERE tenant=? AND subject_id=?",
                    [(names.reseal(tenant, stored, text, new_cipher), tenant, stored) for stored, text in todo],
                )

    # ------------------------------------------------------------------ forced erasure

    def compact(self) -> dict[str, int]:
        """Erase every removed template of every tenant now, through the key service (:meth:`erase`), then rewrite
        the database file so that no earlier version of a block is left in it: ``VACUUM`` and a truncating WAL
        checkpoint (``secure_delete`` already zeroes freed pages). Returns ``erased`` (slots erased by this call),
        ``pending`` (dead slots left: a block that kept changing) and ``bytes`` (database file size).
        KeyServiceUnavailableError when the key service is down (the database is then not rewritten); refused
        while a key-pair rotation is unfinished (its table holds copies of blocks)."""
        self._require_keyservice()
        with self._lock:
            self._check_open()
            have = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if ROTATION_META in have or self._db.execute("SELECT 1 FROM rotated LIMIT 1").fetchone() is not None:
                raise PreconditionError(f"{self.path}: a key-pair rotation is unfinished; finish it first")
            tenants = sorted(self._galleries)
        erased = sum(self.erase(tenant) for tenant in tenants)
        with self._lock:
            self._check_open()
            pending = 0
            for gallery in self._galleries.values():
                pending += sum(int((gallery.state(b) == DEAD).sum()) for b in gallery.dirty_blocks())
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            size = self.path.stat().st_size
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
        stored = self._names.stored_id(tenant, subject_id)
        row = self._db.execute("SELECT 1 FROM subjects WHERE tenant=? AND subject_id=?", (tenant, stored))
        return row.fetchone() is not None

    def get_subject(self, tenant: str, subject_id: str) -> SubjectInfo:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        with self._lock:
            self._check_open()
            return self._info(tenant, subject_id)

    def _info(self, tenant: str, subject_id: str) -> SubjectInfo:
        stored = self._names.stored_id(tenant, subject_id)
        row = self._db.execute(
            "SELECT metadata, created_at FROM subjects WHERE tenant=? AND subject_id=?", (tenant, stored)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"subject {subject_id!r} not found in tenant {tenant!r}")
        return self._row_info(tenant, stored, row[0], row[1])

    def _row_info(self, tenant: str, stored: str, text: str, created_at: float) -> SubjectInfo:
        """The SubjectInfo of a subject row (its id and metadata opened)."""
        subject_id, metadata = self._unpack(tenant, stored, text)
        ids = [
            r[0]
            for r in self._db.execute(
                "SELECT template_id FROM templates WHERE tenant=? AND subject_id=? ORDER BY seq", (tenant, stored)
            )
        ]
        return SubjectInfo(subject_id, metadata, ids, float(created_at))

    def list_subjects(self, tenant: str, page_size: int = 100, page_token: str = "") -> tuple[list[SubjectInfo], str]:
        check_id(tenant, "tenant")
        size = check_positive_int(page_size, "page_size", MAX_PAGE_SIZE)
        after = decode_page_token(page_token)
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT subject_id, metadata, created_at FROM subjects WHERE tenant=? AND subject_id > ? "
                "ORDER BY subject_id LIMIT ?",
                (tenant, after, size + 1),
            ).fetchall()
            page = [self._row_info(tenant, *r) for r in rows[:size]]
        token = encode_page_token(rows[size - 1][0]) if len(rows) > size else ""  # stored ids: sealed, fixed order
        return page, token

    def count(self, tenant: str | None = None, *, subjects: bool = False) -> int:
        table = "subjects" if subjects else "templates"
        with self._lock:
            self._check_open()
            if tenant is None:
                return int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            check_id(tenant, "tenant")
            return int(self._db.execute(f"SELECT COUNT(*) FROM {table} WHERE tenant=?", (tenant,)).fetchone()[0])

    def tenants(self) -> list[str]:
        with self._lock:
            self._check_open()
            return [r[0] for r in self._db.execute("SELECT DISTINCT tenant FROM subjects ORDER BY tenant")]

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
                self._db.close()
                close = getattr(self.keyservice, "close", None)
                if callable(close):
                    close()
                self._galleries.clear()
                self._slots.clear()
                self._release_process_lock()

    def _release_process_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


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


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
