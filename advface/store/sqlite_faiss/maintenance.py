"""Maintenance of a :class:`~advface.store.sqlite_faiss.SQLiteFaissStore`: the encryption state checked at open,
integrity checks, key rotation (:meth:`~SQLiteMaintenance.rotate`) and template re-issue
(:meth:`~advface.store.rotation.TemplateReissue.transform_vectors`); rules shared with the PostgreSQL store are in
:mod:`advface.store.rotation`."""

from __future__ import annotations

import abc
import json
import logging
import sqlite3
import threading
from collections.abc import Callable

import numpy as np

from advface.crypto import BLOB_VERSION, ENCRYPTED_OVERHEAD, ENCRYPTION_SCHEME, TemplateCipher, template_aad
from advface.errors import ConfigError, IntegrityError
from advface.store import rotation, sealing
from advface.store.sealing import (
    NAMES_KEY_META,
    NAMES_META,
    NAMES_PROGRESS_META,
    SEALING,
    SealedNames,
    names_from_meta,
    new_sealed_names,
    wrap_names_key,
)
from advface.store.sqlite_faiss.search import SQLiteSearch

log = logging.getLogger(__name__)


class SQLiteMaintenance(SQLiteSearch, rotation.TemplateReissue):
    """Encryption checks, integrity, key rotation and re-issue of :class:`~advface.store.sqlite_faiss.SQLiteFaissStore`
    (a mixin; uses the store's transactions, ``meta`` table, index rebuild and its vector codec:
    :meth:`_blobs_to_array`, :meth:`_encode_vector`)."""

    _cipher: TemplateCipher | None
    _migrate_plaintext: bool
    _plaintext_rows: bool  # an encryption migration is under way: rows of 4*dim bytes are plaintext
    _write_mutex: threading.Lock

    @abc.abstractmethod
    def _encode_vector(self, vector: np.ndarray, tenant: str, subject_id: str, template_id: str) -> bytes:
        """The BLOB stored for ``vector``, encrypted when the store has a cipher (the store's)."""

    def _row_key_ids(self, conn: sqlite3.Connection) -> set[str]:
        """Ids of the keys the encrypted rows are under (a full scan)."""
        rows = conn.execute(
            "SELECT DISTINCT hex(substr(vector, 2, 8)) FROM templates WHERE length(vector) = ?",
            (4 * self.dim + ENCRYPTED_OVERHEAD,),
        )
        return {r[0].lower() for r in rows}

    def _check_encryption(self) -> None:
        """Match the database's encryption state (``meta``) with the cipher given; ConfigError on a mismatch."""
        conn = self._check_open()
        cipher = self._cipher
        with self._transaction():
            meta = self._meta(conn)
            state = meta.get("encryption", "none")
            has_rows = conn.execute("SELECT EXISTS (SELECT 1 FROM templates)").fetchone()[0] == 1
            if state == "none":
                if cipher is None:
                    return
                if has_rows and not self._migrate_plaintext:
                    raise ConfigError(
                        f"template store {self.path} holds unencrypted templates but an encryption key is configured; "
                        "encrypt it first with `advface rotate-key --new-key-file KEY` (or open it without a key)"
                    )
                values = {
                    "encryption": ENCRYPTION_SCHEME,
                    "key_ids": json.dumps([cipher.key_id]),
                    "plaintext_rows": "1" if has_rows else None,
                }
                if not has_rows:  # a new store: subject ids and metadata sealed too (advface.store.sealing)
                    self._names, sealed = new_sealed_names(cipher)
                    values.update(sealed)
                self._set_meta(conn, values)
                self._plaintext_rows = has_rows
                if has_rows:
                    log.warning("template store %s: encrypting its existing templates (migration started)", self.path)
                return
            if state != ENCRYPTION_SCHEME:
                raise ConfigError(f"template store {self.path} uses unknown encryption {state!r}")
            key_ids = [str(k) for k in json.loads(meta.get("key_ids", "[]"))]
            if cipher is None:
                raise ConfigError(
                    f"template store {self.path} is encrypted (key id(s) {', '.join(key_ids) or '?'}) but no "
                    "encryption key is configured (section `encryption`)"
                )
            self._plaintext_rows = meta.get("plaintext_rows") == "1"
            if any(not cipher.has_key(k) for k in key_ids):
                used = self._row_key_ids(conn)
                rotation.check_keys_present(used, cipher.has_key, cipher.key_ids, meta, str(self.path))
                key_ids = [k for k in key_ids if k in used]
            recorded = rotation.key_ids_at_open(meta, key_ids, cipher.key_id, str(self.path))
            if recorded is not None:
                self._set_meta(conn, {"key_ids": recorded})
            resume_sealing = meta.get(NAMES_META) == SEALING
            if not resume_sealing:
                self._names = names_from_meta(meta, cipher, str(self.path))
                if not self._names.sealed and not self._plaintext_rows:
                    log.warning(sealing.PLAIN_NAMES_WARNING, self.path)
        if resume_sealing:  # a sealing pass was interrupted (rotate-key killed): finish it before anything reads
            log.warning("template store %s: resuming the sealing of its subject ids", self.path)
            self._seal_names(sealing.RESUME_BATCH)

    def encryption_info(self) -> dict[str, object]:
        """The store's encryption state: ``encrypted``, ``key_ids`` (rows may be under), ``primary_key_id``,
        ``rotation`` (target key id of an unfinished rotation, or None), ``plaintext_rows`` (migration unfinished)."""
        conn = self._check_open()
        with self._db_lock:
            meta = self._meta(conn)
        return rotation.encryption_state(meta, self._cipher)

    def verify_integrity(self) -> list[tuple[str, str, str, str]]:
        """Decrypt every row; ``(tenant, subject id, template id, reason)`` of each one that fails (empty: all good,
        or the store is not encrypted)."""
        conn = self._check_open()
        cipher = self._cipher
        if cipher is None:
            return []
        bad: list[tuple[str, str, str, str]] = []
        with self._db_lock:
            cursor = conn.execute(
                "SELECT s.tenant, s.subject_id, t.template_id, t.vector FROM templates t "
                "JOIN subjects s ON s.id = t.subject ORDER BY t.id"
            )
            while rows := cursor.fetchmany(4096):
                for tenant, subject_id, template_id, blob in rows:
                    if self._plaintext_rows and len(blob) == 4 * self.dim:
                        continue
                    try:
                        cipher.decrypt(blob, template_aad(tenant, template_id, subject_id))
                    except IntegrityError as exc:
                        bad.append((tenant, subject_id, template_id, str(exc)))
        return bad

    def _integrity_report(self) -> IntegrityError:
        """The IntegrityError that refuses to open a store whose rows fail authentication, naming them."""
        bad = self.verify_integrity()
        listed = "; ".join(rotation.row_label(t, s, i) for t, s, i, _ in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        return IntegrityError(
            f"template store {self.path}: {len(bad)} encrypted template(s) failed authentication (tampered, "
            f"truncated or moved between rows): {listed}{more}. The store was not opened; restore it from a backup "
            "or delete these templates"
        )

    def rotate(self, new_cipher: TemplateCipher, *, batch_size: int = 1000, progress: bool = False) -> int:
        """Re-encrypt every template under ``new_cipher``'s primary key; returns the number of rows rewritten.

        The store's keyring (old keys) is kept for reading until the end, and new writes use the new key at once.
        Each batch of ``batch_size`` rows is one transaction, so a crash loses at most the batch under way; running
        ``rotate`` again (with a keyring holding the old and the new key) resumes. Also encrypts the plaintext rows
        of a store opened with ``migrate_plaintext=True``. IntegrityError (naming the row) if a row fails
        authentication; the batch is then rolled back. ConfigError when the store is not encrypted or
        ``new_cipher`` is not a TemplateCipher; ValidationError for a bad ``batch_size``.
        """
        batch_size, current = rotation.check_rotation(new_cipher, batch_size, self._cipher, str(self.path))
        from tqdm.auto import tqdm

        with self._write_mutex:
            ring = new_cipher.with_previous(current)
            with self._transaction() as conn:
                key_ids = rotation.merged_key_ids(self._meta(conn), ring.key_id)
                values = {"key_ids": key_ids, "rotation": ring.key_id}
                names = self._names
                if isinstance(names, SealedNames):  # the names key re-wrapped first: it never changes
                    values[NAMES_KEY_META] = wrap_names_key(ring, names.key)
                    self._names = SealedNames(ring, names.key)
                self._set_meta(conn, values)
            self._cipher = ring
        target = bytes.fromhex(f"{BLOB_VERSION:02x}" + ring.key_id)
        pending_sql = "NOT (length(t.vector) = ? AND substr(t.vector, 1, ?) = ?)"
        pending_args = (4 * self.dim + ENCRYPTED_OVERHEAD, len(target), target)
        with self._db_lock:
            total = (
                self._check_open()
                .execute(f"SELECT COUNT(*) FROM templates t WHERE {pending_sql}", pending_args)
                .fetchone()[0]
            )
        done = 0
        last = 0
        with tqdm(total=total, desc="re-encrypting templates", unit="tpl", disable=not progress) as bar:
            while True:
                with self._write_mutex, self._transaction() as conn:
                    rows = conn.execute(
                        "SELECT t.id, s.tenant, s.subject_id, t.template_id, t.vector FROM templates t "
                        f"JOIN subjects s ON s.id = t.subject WHERE t.id > ? AND {pending_sql} ORDER BY t.id LIMIT ?",
                        (last, *pending_args, batch_size),
                    ).fetchall()
                    updates = []
                    for rowid, tenant, subject_id, template_id, blob in rows:
                        aad = template_aad(tenant, template_id, subject_id)
                        if self._plaintext_rows and len(blob) == 4 * self.dim:
                            updates.append((ring.encrypt(blob, aad), rowid))
                        else:
                            row = rotation.row_label(tenant, subject_id, template_id)
                            updates.append((rotation.reencrypt(ring, blob, aad, row, str(self.path)), rowid))
                    conn.executemany("UPDATE templates SET vector = ? WHERE id = ?", updates)
                if not rows:
                    break
                last = rows[-1][0]
                done += len(rows)
                bar.update(len(rows))
        done_subjects = self._seal_names(batch_size)  # a store that held subjects before it was encrypted
        done_subjects += self._reseal_subjects(ring, batch_size)
        with self._write_mutex:
            with self._transaction() as conn:
                self._set_meta(conn, {"key_ids": json.dumps([ring.key_id]), "rotation": None, "plaintext_rows": None})
            self._plaintext_rows = False
            self._cipher = new_cipher
            if isinstance(self._names, SealedNames):
                self._names = SealedNames(new_cipher, self._names.key)
            self._checkpoint()  # old ciphertexts / plaintexts leave the -wal file (secure_delete clears the pages)
        log.info(
            "template store %s: %d templates and %d subject rows re-encrypted under key %s",
            self.path,
            done,
            done_subjects,
            ring.key_id,
        )
        return done

    def _seal_names(self, batch_size: int) -> int:
        """Seal plain subject ids and metadata (a store that held subjects before it was encrypted; see
        :mod:`advface.store.sealing`), one transaction per batch of subject rows with their templates re-encrypted
        for the stored ids; resumable. Returns the subject rows sealed (0 when already sealed). Lookups by id from
        other threads of this process may miss while it runs (``advface rotate-key`` runs it alone)."""
        cipher = self._cipher
        if cipher is None or self._names.sealed:
            return 0
        plain_size = 4 * self.dim
        done = 0
        with self._write_mutex:
            with self._transaction() as conn:
                names, upto, values = sealing.begin_sealing(self._meta(conn), cipher, str(self.path))
                self._set_meta(conn, values)
            while True:
                with self._transaction() as conn:
                    rows = conn.execute(
                        "SELECT id, tenant, subject_id, metadata FROM subjects WHERE id > ? ORDER BY id LIMIT ?",
                        (upto, batch_size),
                    ).fetchall()
                    if not rows:
                        self._set_meta(conn, sealing.sealing_done())
                        break
                    for pk, tenant, subject_id, text in rows:
                        stored, packed, rebind = sealing.seal_plain_row(names, tenant, subject_id, text)
                        templates = conn.execute(
                            "SELECT id, template_id, vector FROM templates WHERE subject = ?", (pk,)
                        ).fetchall()
                        conn.executemany(
                            "UPDATE templates SET vector = ? WHERE id = ?",
                            [
                                (blob if self._plaintext_rows and len(blob) == plain_size else rebind(blob, tid), rowid)
                                for rowid, tid, blob in templates
                            ],
                        )
                        conn.execute(
                            "UPDATE subjects SET subject_id = ?, metadata = ? WHERE id = ?", (stored, packed, pk)
                        )
                    upto = rows[-1][0]
                    self._set_meta(conn, {NAMES_PROGRESS_META: str(upto)})
                    done += len(rows)
            self._names = names
        if done:
            log.info("template store %s: sealed the ids and metadata of %d subjects", self.path, done)
        return done

    def _reseal_subjects(self, ring: TemplateCipher, batch_size: int) -> int:
        """Re-encrypt the sealed subject rows not yet under ``ring``'s primary key (one transaction per batch)."""
        names = self._names
        if not isinstance(names, SealedNames):
            return 0
        done, last = 0, 0
        while True:
            with self._write_mutex, self._transaction() as conn:
                rows = conn.execute(
                    "SELECT id, tenant, subject_id, metadata FROM subjects WHERE id > ? ORDER BY id LIMIT ?",
                    (last, batch_size),
                ).fetchall()
                updates = names.reseal_rows(rows, ring)
                conn.executemany("UPDATE subjects SET metadata = ? WHERE id = ?", updates)
            if not rows:
                return done
            last = rows[-1][0]
            done += len(updates)

    def _reissue_start(self, job: str) -> int:
        with self._write_mutex, self._transaction() as conn:
            resumed = rotation.resume_point(self._meta(conn).get("transform_job"), job, str(self.path))
            if resumed is None:
                self._set_meta(conn, {"transform_job": rotation.job_state(job, 0)})
            return int(conn.execute("SELECT COUNT(*) FROM templates WHERE id > ?", (resumed or 0,)).fetchone()[0])

    def _reissue_batch(self, fn: Callable[[str, np.ndarray], np.ndarray], job: str, batch_size: int) -> int:
        with self._write_mutex, self._transaction() as conn:
            last = rotation.resume_point(self._meta(conn).get("transform_job"), job, str(self.path))
            if last is None:
                raise ConfigError(f"template store {self.path}: re-issue job {job!r} was finished meanwhile")
            rows = conn.execute(
                "SELECT t.id, s.tenant, s.subject_id, t.template_id, t.vector FROM templates t "
                "JOIN subjects s ON s.id = t.subject WHERE t.id > ? ORDER BY t.id LIMIT ?",
                (last, batch_size),
            ).fetchall()
            if not rows:
                return 0
            updates = []
            for tenant, items in rotation.group_by_tenant(rows, lambda r: r[1]).items():
                labels = [(i[2], i[3]) for i in items]
                vectors = self._blobs_to_array([i[4] for i in items], tenant, labels)
                out = rotation.apply_transform(fn, tenant, vectors)
                for (rowid, _, subject_id, template_id, _), vec in zip(items, out):
                    updates.append((self._encode_vector(vec, tenant, subject_id, template_id), rowid))
            conn.executemany("UPDATE templates SET vector = ? WHERE id = ?", updates)
            self._set_meta(conn, {"transform_job": rotation.job_state(job, rows[-1][0])})
        return len(rows)

    def _reissue_end(self) -> None:
        with self._write_mutex:
            self._rebuild()
            self._checkpoint()

    def transform_job(self) -> str | None:
        """The unfinished (or finished but not yet closed) :meth:`transform_vectors` job, if any."""
        with self._db_lock:
            state = self._meta(self._check_open()).get("transform_job")
        return rotation.recorded_job(state)

    def finish_transform_job(self, job: str) -> None:
        """Forget ``job``'s progress record (after every row was rewritten and the caller recorded the result)."""
        with self._write_mutex, self._transaction() as conn:
            rotation.check_finish(self._meta(conn).get("transform_job"), job, str(self.path))
            self._set_meta(conn, {"transform_job": None})
