"""Maintenance of a :class:`~advface.store.postgres.PostgresStore`: ``VACUUM FULL``, key rotation
(:meth:`~PostgresMaintenance.rotate`), template re-issue
(:meth:`~advface.store.rotation.TemplateReissue.transform_vectors`) with its job record, and the keyed-transform
marker. Jobs run one batch per transaction, serialised across processes by the advisory lock that
``_meta(conn, lock=True)`` takes; rules shared with the SQLite store are in :mod:`advface.store.rotation`."""

from __future__ import annotations

import abc
import contextlib
import functools
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import psycopg

from advface.crypto import BLOB_VERSION, ENCRYPTED_OVERHEAD, TemplateCipher, template_aad
from advface.errors import ConfigError, DatabaseUnavailableError, IntegrityError, NotFoundError
from advface.store import rotation, sealing
from advface.store.postgres.connection import scalar
from advface.store.postgres.schema import PostgresSchema
from advface.store.postgres.search import PostgresSearch
from advface.store.sealing import (
    NAMES_KEY_META,
    NAMES_META,
    NAMES_PROGRESS_META,
    SEALED,
    SEALING,
    SealedNames,
    wrap_names_key,
)

log = logging.getLogger(__name__)

#: Passes of :meth:`PostgresMaintenance.rotate` over rows written under an old key meanwhile (by other replicas).
ROTATION_PASSES = 5
#: ``meta`` key of the keyed-transform marker (what the templates were issued under; see tenant_transform).
TRANSFORM_MARKER_KEY = "keyed_transform"


class PostgresMaintenance(PostgresSearch, PostgresSchema, rotation.TemplateReissue):
    """Vacuum, key rotation, re-issue and the transform marker of :class:`~advface.store.postgres.PostgresStore`
    (a mixin; uses the store's transactions, ``meta`` table, index rebuild and its tenant locks and vector columns:
    :meth:`_lock_tenant`, :meth:`_vector_columns`)."""

    @abc.abstractmethod
    def _lock_tenant(self, conn: psycopg.Connection, tenant: str, *, create: bool) -> tuple[int, int]:
        """Lock the tenant's row and give it a new generation: ``(old, new)`` (the store's)."""

    @abc.abstractmethod
    def _vector_columns(self, tenant: str, subject_id: str, template_id: str, vector: np.ndarray) -> tuple[Any, Any]:
        """``(vector, ciphertext)`` column values of one template (the store's)."""

    def vacuum(self) -> None:
        """``VACUUM FULL`` the subject and template tables: rewrites them and their indexes without the dead
        tuples of deleted or replaced rows (see :mod:`advface.store.postgres`). Locks the tables exclusively while it
        runs."""
        self._check_open()
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self._connect_timeout))) as conn:
                for table in (self._t["templates"], self._t["subjects"]):
                    conn.execute(f"VACUUM FULL {table}")
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"vacuum: PostgreSQL is unavailable: {exc}") from None

    def encryption_info(self) -> dict[str, object]:
        """The store's encryption state: ``encrypted``, ``key_ids`` (rows may be under), ``primary_key_id``,
        ``rotation`` (target key id of an unfinished rotation, or None), ``plaintext_rows`` (migration unfinished)."""
        return rotation.encryption_state(self._run(self._meta, what="encryption_info"), self.cipher)

    def rotate(self, new_cipher: TemplateCipher, *, batch_size: int = 1000, progress: bool = False) -> int:
        """Re-encrypt every template under ``new_cipher``'s primary key; returns the number of rows rewritten.

        As :meth:`SQLiteFaissStore.rotate <advface.store.sqlite_faiss.SQLiteFaissStore.rotate>`: the store's
        keyring stays readable until the end and new writes use the new key at once; each batch of ``batch_size``
        rows (locked ``FOR UPDATE``) is one transaction, so a crash (even kill -9) loses at most the batch under way
        and running ``rotate`` again (keyring with old and new key) resumes: rows already under the new key are
        skipped. Also encrypts the plaintext rows of a store opened with ``migrate_plaintext=True``. Rows written
        under an old key meanwhile by another replica are picked up by further passes; the rotation is recorded
        as finished (``meta``: ``key_ids`` = the new key only) only when no row is left under another key. Vectors
        do not change, so other replicas' indexes stay valid (no generation is bumped); they need both keys until
        the end. IntegrityError (naming the row) if a row fails authentication; that batch is rolled back.
        ConfigError when the store is not encrypted or ``new_cipher`` is not a TemplateCipher; ValidationError for
        a bad ``batch_size``.
        """
        self._check_open()
        batch_size, current = rotation.check_rotation(new_cipher, batch_size, self.cipher, self._where())
        from tqdm.auto import tqdm

        ring = new_cipher.with_previous(current)
        tt, s = self._t["templates"], self._t["subjects"]
        where = self._where()

        names = self._names

        def start(conn: psycopg.Connection) -> None:
            meta = self._meta(conn, lock=True)
            values = {"key_ids": rotation.merged_key_ids(meta, ring.key_id), "rotation": ring.key_id}
            if isinstance(names, SealedNames):  # the names key re-wrapped first: it never changes
                values[NAMES_KEY_META] = wrap_names_key(ring, names.key)
            self._set_meta(conn, values)

        with self._write_mutex:
            self._run(start, what="rotate")
            self.cipher = ring
            if isinstance(names, SealedNames):
                self._names = SealedNames(ring, names.key)
        target = bytes([BLOB_VERSION]) + bytes.fromhex(ring.key_id)
        pending = "(t.ciphertext IS NULL OR length(t.ciphertext) <> %s OR substring(t.ciphertext from 1 for 9) <> %s)"
        pending_args = (4 * self.dim + ENCRYPTED_OVERHEAD, target)
        count_sql = f"SELECT COUNT(*) FROM {tt} t WHERE {pending}"
        total = int(self._run(lambda conn: scalar(conn.execute(count_sql, pending_args)), what="rotate"))

        def batch(conn: psycopg.Connection, last: int) -> list[int]:
            self._meta(conn, lock=True)  # one maintenance job at a time
            with conn.cursor(binary=True) as cur:
                cur.execute(
                    f"SELECT t.id, t.tenant, s.subject_id, t.template_id, t.vector, t.ciphertext FROM {tt} t "
                    f"JOIN {s} s ON s.id = t.subject WHERE t.id > %s AND {pending} ORDER BY t.id LIMIT %s "
                    "FOR UPDATE OF t",
                    (last, *pending_args, batch_size),
                )
                rows = cur.fetchall()
                updates = []
                for rowid, tenant, subject_id, template_id, vector, blob in rows:
                    aad = template_aad(tenant, template_id, subject_id)
                    row = rotation.row_label(tenant, subject_id, template_id)
                    if vector is not None:
                        if not self._plaintext_rows:
                            raise IntegrityError(f"template store {where}: {row} is stored in plaintext")
                        updates.append((ring.encrypt(vector.astype("<f4").tobytes(), aad), rowid))
                    else:
                        updates.append((rotation.reencrypt(ring, blob, aad, row, where), rowid))
                if updates:
                    cur.executemany(f"UPDATE {tt} SET vector = NULL, ciphertext = %b WHERE id = %s", updates)
            return [r[0] for r in rows]

        def finish(conn: psycopg.Connection) -> int:
            self._meta(conn, lock=True)
            left = int(scalar(conn.execute(count_sql, pending_args))) + self._sealed_rows_left(conn, ring.key_id)
            if not left:
                self._set_meta(conn, {"key_ids": json.dumps([ring.key_id]), "rotation": None, "plaintext_rows": None})
            return left

        done = resealed = 0
        with tqdm(total=total, desc="re-encrypting templates", unit="tpl", disable=not progress) as bar:
            for _ in range(ROTATION_PASSES):
                last = 0
                while ids := self._run(functools.partial(batch, last=last), what="rotate"):
                    last = ids[-1]
                    done += len(ids)
                    bar.update(len(ids))
                resealed += self._seal_names(batch_size)  # a store that held subjects before it was encrypted
                resealed += self._reseal_subjects(ring, batch_size)
                left = self._run(finish, what="rotate")
                if not left:
                    break
                bar.total = (bar.total or 0) + left
            else:
                raise ConfigError(
                    f"template store {where}: {left} template(s) keep being written under another key during the "
                    "rotation; configure every replica with the new key (and the old one as previous) and run again"
                )
        self._plaintext_rows = False
        self.cipher = new_cipher
        if isinstance(self._names, SealedNames):
            self._names = SealedNames(new_cipher, self._names.key)
        log.info(
            "template store %s: %d templates and %d subject rows re-encrypted under key %s",
            where,
            done,
            resealed,
            ring.key_id,
        )
        return done

    def _sealed_rows_left(self, conn: psycopg.Connection, key_id: str) -> int:
        """Sealed subject rows not under key ``key_id`` (0 when subject ids are not sealed)."""
        names = self._names
        if not isinstance(names, SealedNames):
            return 0
        rows = conn.execute(f"SELECT metadata FROM {self._t['subjects']}")
        return sum(1 for (text,) in rows if names.key_id_of(text) != key_id)

    def _seal_names(self, batch_size: int) -> int:
        """Seal plain subject ids and metadata (a store that held subjects before it was encrypted; see
        :mod:`advface.store.sealing`): one transaction per batch of subject rows, with their tenants locked (as
        writers do) and their templates re-encrypted for the stored ids; progress is read and recorded in ``meta``
        under the maintenance lock, so an interrupted pass resumes and two processes never seal a row twice.
        Starting it locks the tenant table once (in-flight writes finish first; every later write of a replica
        with plain ids then waits for the pass: DatabaseUnavailableError, try again) and such replicas take up the
        sealed ids when it ends. Returns the subject rows sealed."""
        cipher = self.cipher
        if cipher is None or self._names.sealed:
            return 0
        s, tt, where = self._t["subjects"], self._t["templates"], self._where()

        def start(conn: psycopg.Connection) -> SealedNames | None:
            conn.execute(f"LOCK TABLE {self._t['tenants']} IN EXCLUSIVE MODE")
            meta = self._meta(conn, lock=True)
            if meta.get(NAMES_META) == SEALED:
                return None
            names, _, values = sealing.begin_sealing(meta, cipher, where)
            self._set_meta(conn, values)
            return names

        def batch(conn: psycopg.Connection, names: SealedNames) -> int:
            meta = self._meta(conn, lock=True)  # one maintenance job at a time
            if meta.get(NAMES_META) != SEALING:
                return 0  # finished by another process
            upto = int(meta.get(NAMES_PROGRESS_META, "0"))
            head = conn.execute(f"SELECT id, tenant FROM {s} WHERE id > %s ORDER BY id LIMIT %s", (upto, batch_size))
            head_rows = head.fetchall()
            if not head_rows:
                self._set_meta(conn, sealing.sealing_done())
                return 0
            hi = int(head_rows[-1][0])
            locked: set[str] = set()

            def lock(tenants: set[str]) -> None:
                for tenant in sorted(tenants - locked):  # tenant rows first, as every writer does
                    with contextlib.suppress(NotFoundError):
                        self._lock_tenant(conn, tenant, create=False)
                    locked.add(tenant)

            lock({r[1] for r in head_rows})
            rows = conn.execute(
                f"SELECT id, tenant, subject_id, metadata FROM {s} WHERE id > %s AND id <= %s ORDER BY id FOR UPDATE",
                (upto, hi),
            ).fetchall()
            lock({r[1] for r in rows})
            with conn.cursor(binary=True) as cur:
                for pk, tenant, subject_id, text in rows:
                    stored, packed, rebind = sealing.seal_plain_row(names, tenant, subject_id, text)
                    cur.execute(f"SELECT id, template_id, ciphertext FROM {tt} WHERE subject = %s FOR UPDATE", (pk,))
                    updates = [(rebind(blob, tid), rowid) for rowid, tid, blob in cur.fetchall() if blob is not None]
                    if updates:  # (a plaintext row of an unfinished migration is encrypted later with the stored id)
                        cur.executemany(f"UPDATE {tt} SET ciphertext = %b WHERE id = %s", updates)
                    cur.execute(f"UPDATE {s} SET subject_id = %s, metadata = %s WHERE id = %s", (stored, packed, pk))
            self._set_meta(conn, {NAMES_PROGRESS_META: str(hi)})
            return len(rows) or -1  # -1: an empty id range (rows deleted meanwhile), go on

        names = self._run(start, what="sealing subject ids")
        done = 0
        if names is not None:
            while n := self._run(functools.partial(batch, names=names), what="sealing subject ids"):
                done += max(n, 0)
        self._names = self._run(self._current_names, what="sealing subject ids")
        if done:
            log.info("template store %s: sealed the ids and metadata of %d subjects", where, done)
        return done

    def _reseal_subjects(self, ring: TemplateCipher, batch_size: int) -> int:
        """Re-encrypt the sealed subject rows not yet under ``ring``'s primary key (one transaction per batch of
        rows locked FOR UPDATE); returns the number rewritten."""
        names = self._names
        if not isinstance(names, SealedNames):
            return 0
        s = self._t["subjects"]

        def batch(conn: psycopg.Connection, last: int) -> tuple[int, int]:
            self._meta(conn, lock=True)  # one maintenance job at a time
            rows = conn.execute(
                f"SELECT id, tenant, subject_id, metadata FROM {s} WHERE id > %s ORDER BY id LIMIT %s FOR UPDATE",
                (last, batch_size),
            ).fetchall()
            updates = names.reseal_rows(rows, ring)
            if updates:
                with conn.cursor() as cur:
                    cur.executemany(f"UPDATE {s} SET metadata = %s WHERE id = %s", updates)
            return (int(rows[-1][0]) if rows else 0), len(updates)

        done, last = 0, 0
        while True:
            last, n = self._run(functools.partial(batch, last=last), what="rotate")
            if not last:
                return done
            done += n

    def _reissue_start(self, job: str) -> int:
        self._check_open()
        tt, where = self._t["templates"], self._where()

        def start(conn: psycopg.Connection) -> int:
            resumed = rotation.resume_point(self._meta(conn, lock=True).get("transform_job"), job, where)
            if resumed is None:
                self._set_meta(conn, {"transform_job": rotation.job_state(job, 0)})
            return int(scalar(conn.execute(f"SELECT COUNT(*) FROM {tt} WHERE id > %s", (resumed or 0,))))

        return int(self._run(start, what="transform_vectors"))

    def _reissue_batch(self, fn: Callable[[str, np.ndarray], np.ndarray], job: str, batch_size: int) -> int:
        """Also locks the rows' tenants (as writers do) and bumps their generations, so other replicas rebuild their
        in-memory indexes (encrypted mode) and plaintext-mode searches see each batch atomically. Other replicas
        must not enrol while a re-issue runs (their writes would use the old transform)."""
        tt, s = self._t["templates"], self._t["subjects"]
        where = self._where()

        def batch(conn: psycopg.Connection) -> int:
            last = rotation.resume_point(self._meta(conn, lock=True).get("transform_job"), job, where)
            if last is None:
                raise ConfigError(f"template store {where}: re-issue job {job!r} was finished by another process")
            head = conn.execute(
                f"SELECT id, tenant FROM {tt} WHERE id > %s ORDER BY id LIMIT %s", (last, batch_size)
            ).fetchall()
            if not head:
                return 0
            hi = int(head[-1][0])
            locked: set[str] = set()

            def lock(tenants: set[str]) -> None:
                for tenant in sorted(tenants - locked):  # tenant rows first, as every writer does
                    with contextlib.suppress(NotFoundError):  # deleted meanwhile: its rows are gone too
                        self._lock_tenant(conn, tenant, create=False)
                    locked.add(tenant)

            lock({r[1] for r in head})
            with conn.cursor(binary=True) as cur:
                cur.execute(
                    f"SELECT t.id, t.tenant, s.subject_id, t.template_id, t.vector, t.ciphertext FROM {tt} t "
                    f"JOIN {s} s ON s.id = t.subject WHERE t.id > %s AND t.id <= %s ORDER BY t.id FOR UPDATE OF t",
                    (last, hi),
                )
                rows = cur.fetchall()
                lock({r[1] for r in rows})
                updates = []
                for tenant, items in rotation.group_by_tenant(rows, lambda r: r[1]).items():
                    vectors = np.stack([self._decode(tenant, r[2], r[3], r[4], r[5]) for r in items])
                    out = rotation.apply_transform(fn, tenant, vectors)
                    for r, vec in zip(items, out):
                        updates.append((*self._vector_columns(tenant, r[2], r[3], vec), r[0]))
                if updates:
                    cur.executemany(f"UPDATE {tt} SET vector = %b, ciphertext = %b WHERE id = %s", updates)
            self._set_meta(conn, {"transform_job": rotation.job_state(job, hi)})
            return len(rows) or -1  # -1: an empty id range (rows deleted meanwhile), go on

        return int(self._run(batch, what="transform_vectors"))

    def _reissue_end(self) -> None:
        if self.cipher is not None:
            with self._write_mutex:
                self._rebuild_all()

    def transform_job(self) -> str | None:
        """The unfinished (or finished but not yet closed) :meth:`transform_vectors` job, if any."""
        return rotation.recorded_job(self._run(self._meta, what="transform_job").get("transform_job"))

    def finish_transform_job(self, job: str) -> None:
        """Forget ``job``'s progress record (after every row was rewritten and the caller recorded the result)."""

        def write(conn: psycopg.Connection) -> None:
            rotation.check_finish(self._meta(conn, lock=True).get("transform_job"), job, self._where())
            self._set_meta(conn, {"transform_job": None})

        self._run(write, what="finish_transform_job")

    def read_transform_marker(self) -> dict[str, Any] | None:
        """What the templates were issued under (keyed-transform marker, kept in ``meta``; None: never recorded)."""
        value = self._run(self._meta, what="read_transform_marker").get(TRANSFORM_MARKER_KEY)
        if value is None:
            return None
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"{self._where()}: unreadable keyed-transform marker ({exc})") from None

    def write_transform_marker(self, value: Mapping[str, Any] | None) -> None:
        """Record (None: remove) the keyed-transform marker in ``meta``, durably."""
        text = None if value is None else json.dumps(dict(value), sort_keys=True)
        self._run(lambda conn: self._set_meta(conn, {TRANSFORM_MARKER_KEY: text}), what="write_transform_marker")
