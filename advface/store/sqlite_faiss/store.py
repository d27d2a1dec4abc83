"""The :class:`SQLiteFaissStore` itself: opening, the vector codec (BLOBs, encrypted or not), writes, reads and
closing; its database, search and maintenance are mixins (see :mod:`advface.store.sqlite_faiss`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from advface.crypto import TemplateCipher, template_aad
from advface.errors import ConfigError, IntegrityError, NotFoundError
from advface.store import rotation
from advface.store.base import (
    MAX_PAGE_SIZE,
    StoreMetric,
    SubjectInfo,
    TemplateStore,
    check_add_many,
    check_dim_metric,
    check_id,
    check_metadata,
    check_positive_int,
    decode_page_token,
    encode_page_token,
)
from advface.store.faiss_index import GpuSearch, IndexOptions, RWLock, TenantIndex
from advface.store.sealing import PlainNames, SubjectNames
from advface.store.sqlite_faiss.database import SQLiteDatabase
from advface.store.sqlite_faiss.maintenance import SQLiteMaintenance
from advface.store.sqlite_faiss.search import SealedRowError, SQLiteSearch

log = logging.getLogger(__name__)


class SQLiteFaissStore(SQLiteMaintenance, SQLiteSearch, SQLiteDatabase, TemplateStore):
    """Templates in the SQLite database ``path`` (created if missing), searched with faiss; see
    :mod:`advface.store.sqlite_faiss`.

    ``dim`` and ``metric`` must match those the database was made with. ``use_gpu``: ``"auto"`` (default),
    ``True`` or ``False``. ``index``: how tenants are searched (:class:`~advface.store.faiss_index.IndexOptions`).
    ``cipher``: encrypt vectors at rest; ``migrate_plaintext``: with a cipher, open a plaintext database and start
    encrypting it (finished by :meth:`rotate`). Opening problems raise ConfigError; a closed store, ClosedError.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        dim: int,
        metric: StoreMetric,
        *,
        use_gpu: bool | str = "auto",
        index: IndexOptions | None = None,
        cipher: TemplateCipher | None = None,
        migrate_plaintext: bool = False,
    ) -> None:
        self.dim, self.metric = check_dim_metric(dim, metric)
        if cipher is not None and not isinstance(cipher, TemplateCipher):
            raise ConfigError(f"cipher must be a TemplateCipher, got {type(cipher).__name__}")
        self._cipher = cipher
        self._migrate_plaintext = bool(migrate_plaintext)
        self._plaintext_rows = False  # an encryption migration is under way: rows of 4*dim bytes are plaintext
        self._names: SubjectNames = PlainNames()  # sealed in stores created encrypted (set by _check_encryption)
        if use_gpu not in ("auto", True, False):
            raise ConfigError(f"use_gpu must be 'auto', true or false, got {use_gpu!r}")
        self.path = Path(path).expanduser()
        self.index_options = index if index is not None else IndexOptions()
        if not isinstance(self.index_options, IndexOptions):
            raise ConfigError(f"index must be an IndexOptions, got {type(index).__name__}")
        self._write_mutex = threading.Lock()  # one writer at a time, SQL and index together
        self._db_lock = threading.Lock()  # the SQLite connection
        self._index_lock = RWLock()  # self._tenants
        self._tenants: dict[str, TenantIndex] = {}
        self._closed = False
        self._gpu: GpuSearch | None = None
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        try:
            self._lock_fd = self._acquire_process_lock()
            self._conn = self._open_database()
            self._check_meta()
            self._check_encryption()
            self._gpu = GpuSearch.open(use_gpu)
            started = time.perf_counter()
            try:
                self._rebuild()
            except SealedRowError:
                raise
            except IntegrityError:
                raise self._integrity_report() from None
            log.debug(
                "opened %s: %d templates, %d tenants, index built in %.3f s",
                self.path,
                sum(t.ntotal for t in self._tenants.values()),
                len(self._tenants),
                time.perf_counter() - started,
            )
        except BaseException:
            self._release()
            raise

    @property
    def sealed_names(self) -> bool:
        """Whether subject ids and metadata are sealed at rest (:mod:`advface.store.sealing`: stores created
        encrypted); :meth:`list_subjects` then pages in the order of their keyed hashes."""
        return self._names.sealed

    # ----------------------------------------------------------------------------------------------- vector codec

    def _blobs_to_array(
        self, blobs: Sequence[bytes], tenant: str = "", labels: Sequence[tuple[str, str]] = ()
    ) -> np.ndarray:
        """Stored BLOBs -> ``N x dim`` float32 (decrypted first when the store is encrypted; ``labels``: the
        (subject id, template id) of each BLOB, needed then)."""
        if self._cipher is not None:
            blobs = self._decrypt_blobs(blobs, tenant, labels)
        size = 4 * self.dim
        for blob in blobs:
            if len(blob) != size:
                raise ConfigError(f"template store {self.path} is corrupt: a {len(blob)}-byte vector, expected {size}")
        joined = b"".join(blobs)
        return np.frombuffer(joined, dtype="<f4").astype(np.float32).reshape(len(blobs), self.dim)

    def _encode_vector(self, vector: np.ndarray, tenant: str, subject_id: str, template_id: str) -> bytes:
        """The BLOB stored for ``vector``: little-endian float32, encrypted when the store has a cipher."""
        raw = np.asarray(vector).astype("<f4").tobytes()
        if self._cipher is None:
            return raw
        return self._cipher.encrypt(raw, template_aad(tenant, template_id, subject_id))

    def _decrypt_blobs(self, blobs: Sequence[bytes], tenant: str, labels: Sequence[tuple[str, str]]) -> list[bytes]:
        """The plaintexts of encrypted BLOBs (plaintext rows of an unfinished migration as they are); one
        IntegrityError naming every row that fails authentication."""
        cipher = self._cipher
        assert cipher is not None and len(labels) == len(blobs), "encrypted BLOBs need their labels"
        plain_size = 4 * self.dim
        out: list[bytes] = []
        bad: list[str] = []
        for blob, (subject_id, template_id) in zip(blobs, labels):
            if self._plaintext_rows and len(blob) == plain_size:  # not yet migrated
                out.append(blob)
                continue
            try:
                out.append(cipher.decrypt(blob, template_aad(tenant, template_id, subject_id)))
            except IntegrityError as exc:
                bad.append(f"{rotation.row_label(tenant, subject_id, template_id)}: {exc}")
        if bad:
            raise IntegrityError(
                f"template store {self.path}: {len(bad)} template(s) failed authentication: " + "; ".join(bad[:10])
            )
        return out

    def _subject_row(self, conn: sqlite3.Connection, tenant: str, subject_id: str) -> tuple[int, str, str, float]:
        """``(row id, stored id, metadata column, created_at)`` of a subject; NotFoundError if unknown."""
        stored = self._names.stored_id(tenant, subject_id)
        row = conn.execute(
            "SELECT id, metadata, created_at FROM subjects WHERE tenant = ? AND subject_id = ?", (tenant, stored)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"subject {subject_id!r} not found in tenant {tenant!r}")
        return row[0], stored, row[1], row[2]

    # ----------------------------------------------------------------------------------------------- writes

    def add_many(
        self,
        tenant: str,
        items: Sequence[tuple[str, np.ndarray, Mapping[str, str] | None]],
        *,
        replace: bool = False,
    ) -> list[list[str]]:
        checked = check_add_many(tenant, items, self.dim, replace)
        if not checked:
            self._check_open()
            return []
        result: list[list[str]] = []
        added: list[tuple[int, str, str]] = []
        removed: list[int] = []
        now = time.time()
        names = self._names
        with self._write_mutex:
            with self._transaction() as conn:
                for subject_id, vectors, metadata in checked:
                    stored = names.stored_id(tenant, subject_id)
                    row = conn.execute(
                        "SELECT id, metadata FROM subjects WHERE tenant = ? AND subject_id = ?", (tenant, stored)
                    ).fetchone()
                    if row is None:
                        pk = conn.execute(
                            "INSERT INTO subjects (tenant, subject_id, metadata, created_at) VALUES (?, ?, ?, ?)",
                            (tenant, stored, names.pack(tenant, stored, subject_id, dict(metadata or {})), now),
                        ).lastrowid
                    else:
                        pk = row[0]
                        if replace:
                            old = [r[0] for r in conn.execute("SELECT id FROM templates WHERE subject = ?", (pk,))]
                            conn.execute("DELETE FROM templates WHERE subject = ?", (pk,))
                            removed.extend(old)
                            merged = dict(metadata or {})
                        else:
                            merged = {**names.unpack(tenant, stored, row[1])[1], **(metadata or {})}
                        merged = check_metadata(merged, f"metadata of subject {subject_id!r} after merging")
                        conn.execute(
                            "UPDATE subjects SET metadata = ? WHERE id = ?",
                            (names.pack(tenant, stored, subject_id, merged), pk),
                        )
                    ids: list[str] = []
                    for vector in vectors:
                        template_id = uuid.uuid4().hex
                        rowid = conn.execute(
                            "INSERT INTO templates (template_id, subject, vector, created_at) VALUES (?, ?, ?, ?)",
                            (template_id, pk, self._encode_vector(vector, tenant, stored, template_id), now),
                        ).lastrowid
                        assert rowid is not None  # set by every INSERT
                        ids.append(template_id)
                        added.append((int(rowid), subject_id, template_id))
                    result.append(ids)
            vectors_all = np.concatenate([c[1] for c in checked])
            self._update_index(tenant, removed, added, vectors_all)
            if removed:
                self._checkpoint()
        return result

    def delete_subject(self, tenant: str, subject_id: str) -> int:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        with self._write_mutex:
            with self._transaction() as conn:
                pk = self._subject_row(conn, tenant, subject_id)[0]
                rowids = [r[0] for r in conn.execute("SELECT id FROM templates WHERE subject = ?", (pk,))]
                conn.execute("DELETE FROM templates WHERE subject = ?", (pk,))
                conn.execute("DELETE FROM subjects WHERE id = ?", (pk,))
            self._update_index(tenant, rowids, [], None)
            self._checkpoint()
        return len(rowids)

    def delete_template(self, tenant: str, template_id: str) -> str:
        check_id(tenant, "tenant")
        check_id(template_id, "template_id")
        with self._write_mutex:
            with self._transaction() as conn:
                row = conn.execute(
                    "SELECT t.id, t.subject, s.subject_id, s.metadata FROM templates t "
                    "JOIN subjects s ON s.id = t.subject WHERE t.template_id = ? AND s.tenant = ?",
                    (template_id, tenant),
                ).fetchone()
                if row is None:
                    raise NotFoundError(f"template {template_id!r} not found in tenant {tenant!r}")
                rowid, pk = row[0], row[1]
                subject_id = self._names.unpack(tenant, row[2], row[3])[0]
                conn.execute("DELETE FROM templates WHERE id = ?", (rowid,))
                if conn.execute("SELECT COUNT(*) FROM templates WHERE subject = ?", (pk,)).fetchone()[0] == 0:
                    conn.execute("DELETE FROM subjects WHERE id = ?", (pk,))
            self._update_index(tenant, [rowid], [], None)
            self._checkpoint()
        return subject_id

    # ----------------------------------------------------------------------------------------------- reads

    def get_subject(self, tenant: str, subject_id: str) -> SubjectInfo:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        conn = self._check_open()
        with self._db_lock:
            pk, stored, metadata, created_at = self._subject_row(conn, tenant, subject_id)
            ids = [r[0] for r in conn.execute("SELECT template_id FROM templates WHERE subject = ? ORDER BY id", (pk,))]
        return SubjectInfo(subject_id, self._names.unpack(tenant, stored, metadata)[1], ids, float(created_at))

    def list_subjects(self, tenant: str, page_size: int = 100, page_token: str = "") -> tuple[list[SubjectInfo], str]:
        check_id(tenant, "tenant")
        page_size = check_positive_int(page_size, "page_size", MAX_PAGE_SIZE)
        after = decode_page_token(page_token)
        conn = self._check_open()
        with self._db_lock:
            rows = conn.execute(
                "SELECT id, subject_id, metadata, created_at FROM subjects "
                "WHERE tenant = ? AND subject_id > ? ORDER BY subject_id LIMIT ?",
                (tenant, after, page_size + 1),
            ).fetchall()
            more = len(rows) > page_size
            rows = rows[:page_size]
            templates: dict[int, list[str]] = {r[0]: [] for r in rows}
            if rows:
                marks = ",".join("?" * len(rows))
                for pk, template_id in conn.execute(
                    f"SELECT subject, template_id FROM templates WHERE subject IN ({marks}) ORDER BY id",
                    [r[0] for r in rows],
                ):
                    templates[pk].append(template_id)
        page = []
        for pk, stored, metadata, created_at in rows:
            subject_id, values = self._names.unpack(tenant, stored, metadata)
            page.append(SubjectInfo(subject_id, values, templates[pk], float(created_at)))
        return page, (encode_page_token(rows[-1][1]) if more else "")

    def subject_vectors(self, tenant: str, subject_id: str) -> np.ndarray:
        check_id(tenant, "tenant")
        check_id(subject_id, "subject_id")
        conn = self._check_open()
        with self._db_lock:
            pk, stored = self._subject_row(conn, tenant, subject_id)[:2]
            rows = conn.execute(
                "SELECT vector, template_id FROM templates WHERE subject = ? ORDER BY id", (pk,)
            ).fetchall()
        return self._blobs_to_array([r[0] for r in rows], tenant, [(stored, r[1]) for r in rows])

    def count(self, tenant: str | None = None, *, subjects: bool = False) -> int:
        if tenant is not None:
            check_id(tenant, "tenant")
        conn = self._check_open()
        args: tuple[str, ...] = ()
        if subjects:
            sql = "SELECT COUNT(*) FROM subjects"
            if tenant is not None:
                sql, args = sql + " WHERE tenant = ?", (tenant,)
        else:
            sql = "SELECT COUNT(*) FROM templates"
            if tenant is not None:
                sql = "SELECT COUNT(*) FROM templates t JOIN subjects s ON s.id = t.subject WHERE s.tenant = ?"
                args = (tenant,)
        with self._db_lock:
            return int(conn.execute(sql, args).fetchone()[0])

    def tenants(self) -> list[str]:
        conn = self._check_open()
        with self._db_lock:
            return [r[0] for r in conn.execute("SELECT DISTINCT tenant FROM subjects ORDER BY tenant")]

    # ----------------------------------------------------------------------------------------------- closing

    def close(self) -> None:
        with self._write_mutex:
            if self._closed:
                return
            self._closed = True
            with self._index_lock.write():
                self._release()

    def _release(self) -> None:
        """Drop the indexes, close the connection and release the file lock."""
        self._tenants = {}
        self._gpu = None
        if self._conn is not None:
            with self._db_lock:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._closed = True

    def __del__(self) -> None:  # a forgotten store still releases its lock file
        with contextlib.suppress(Exception):
            if not getattr(self, "_closed", True):
                self._release()

    def __repr__(self) -> str:
        return f"SQLiteFaissStore({str(self.path)!r}, dim={self.dim}, metric={self.metric!r})"
