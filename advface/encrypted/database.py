"""Where an encrypted store keeps its rows: the persistence interface of
:class:`~advface.encrypted.store.EncryptedStore`, with two implementations (SQLite:
:mod:`advface.encrypted.sqlite_database`; PostgreSQL: :mod:`advface.encrypted.postgres_database`).

The store logic (galleries, sealing, integrity checks, erasure, rotations) is written once, against this interface;
an implementation only reads and writes rows. Tables, whatever the backend:

- ``meta``: key -> value (format, key-pair fingerprint, dimension, metric, wrapped names key, rotation targets);
- ``subjects``: (tenant, stored subject id) -> sealed id and metadata, creation time;
- ``templates``: template id -> tenant, stored subject id, sequence number, block and slot;
- ``blocks``: (tenant, block) -> one authenticated block (:mod:`advface.encrypted.blocks`);
- ``rotated``: (tenant, block) -> the block re-encrypted by an unfinished key-pair rotation, and the generation it
  came from.

Every change runs inside :meth:`BlockDatabase.transaction` (all or nothing). A backend that several processes may
open at once (:attr:`BlockDatabase.shared`) keeps a *generation* per tenant: :meth:`lock_tenant` serialises the
tenant's writers across processes and returns the generation, :meth:`bump_generation` records a change, and a process
whose copy of the tenant is older reloads it (see :class:`~advface.encrypted.store.EncryptedStore`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Literal

__all__ = ["BlockDatabase", "SubjectRow", "TemplateRow"]

#: ``(template_id, tenant, stored subject id, seq, block, slot)``
TemplateRow = tuple[str, str, str, int, int, int]
#: ``(stored subject id, sealed text, created_at)``
SubjectRow = tuple[str, str, float]


class BlockDatabase(abc.ABC):
    """The rows of one encrypted store. Not thread-safe: the store calls it under its own lock."""

    #: the database in messages (a file path, or a DSN without its password and the tables)
    where: str
    #: whether other processes may open the same database at once (then tenants carry generations)
    shared: bool = False

    # ------------------------------------------------------------------ transactions

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """One write transaction: committed on leaving, rolled back on any exception."""

    @abc.abstractmethod
    def snapshot(self) -> AbstractContextManager[None]:
        """Consistent reads for the ``with`` block (inside a transaction: nothing more)."""

    def lock_meta(self) -> None:
        """Inside a transaction: serialise the creation and checks of ``meta`` across processes."""
        return None

    def lock_tenant(self, tenant: str) -> int | None:
        """Inside a transaction: serialise the writers of ``tenant`` across processes; its generation (None where
        the backend is not shared)."""
        return None

    def bump_generation(self, tenant: str) -> int | None:
        """Inside a transaction (after :meth:`lock_tenant`): record a change of ``tenant``; its new generation."""
        return None

    def generation(self, tenant: str) -> int | None:
        """The tenant's generation now (None: not shared, or a tenant without rows)."""
        return None

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """For the ``with`` block, make sure this process is the only one with the store open, for ``what`` (a
        rotation, compaction): ConfigError otherwise. Single-process backends hold that already."""
        yield

    # ------------------------------------------------------------------ meta

    @abc.abstractmethod
    def meta(self) -> dict[str, str]:
        """Every ``meta`` row."""

    @abc.abstractmethod
    def put_meta(self, items: Iterable[tuple[str, str]]) -> None:
        """Insert or replace ``meta`` rows."""

    @abc.abstractmethod
    def delete_meta(self, key: str) -> None:
        """Delete one ``meta`` row (if any)."""

    # ------------------------------------------------------------------ blocks

    @abc.abstractmethod
    def tenants_with_rows(self) -> list[str]:
        """Tenants with a block or a template row."""

    @abc.abstractmethod
    def blocks(self, tenant: str) -> list[tuple[int, bytes]]:
        """``(block, data)`` of every block of ``tenant``, by block number."""

    @abc.abstractmethod
    def block(self, tenant: str, block: int) -> bytes | None:
        """One block's data (None: no such block)."""

    @abc.abstractmethod
    def block_numbers(self, tenant: str) -> list[int]:
        """The block numbers of ``tenant``, ascending."""

    @abc.abstractmethod
    def put_blocks(self, tenant: str, blocks: Sequence[tuple[int, bytes]]) -> None:
        """Insert or replace blocks of ``tenant``."""

    # ------------------------------------------------------------------ templates

    @abc.abstractmethod
    def template_rows(self, tenant: str) -> list[tuple[str, str, int, int]]:
        """``(template_id, stored subject id, block, slot)`` of every template of ``tenant``."""

    @abc.abstractmethod
    def insert_templates(self, rows: Sequence[TemplateRow]) -> None:
        """Insert template rows."""

    @abc.abstractmethod
    def delete_templates_at(self, tenant: str, refs: Sequence[tuple[int, int]]) -> None:
        """Delete the template rows at ``(block, slot)`` of ``tenant``."""

    @abc.abstractmethod
    def max_seq(self, tenant: str, stored: str) -> int:
        """The highest sequence number of a subject's templates (0: none)."""

    @abc.abstractmethod
    def template_ids(self, tenant: str, stored: str) -> list[str]:
        """A subject's template ids, in enrolment order."""

    # ------------------------------------------------------------------ subjects

    @abc.abstractmethod
    def subject_rows(self, tenant: str) -> list[tuple[str, str]]:
        """``(stored subject id, sealed text)`` of every subject of ``tenant``."""

    @abc.abstractmethod
    def subject(self, tenant: str, stored: str) -> tuple[str, float] | None:
        """``(sealed text, created_at)`` of one subject (None: unknown)."""

    @abc.abstractmethod
    def insert_subject(self, tenant: str, stored: str, text: str, created_at: float) -> None:
        """Insert one subject row."""

    @abc.abstractmethod
    def update_subjects(self, tenant: str, rows: Sequence[tuple[str, str]]) -> None:
        """Set the sealed text of subjects: ``(stored id, text)``."""

    @abc.abstractmethod
    def delete_subjects(self, tenant: str, stored: Sequence[str]) -> None:
        """Delete subject rows."""

    @abc.abstractmethod
    def has_subjects(self) -> bool:
        """Whether any subject row exists."""

    @abc.abstractmethod
    def subject_page(self, tenant: str, after: str, limit: int) -> list[SubjectRow]:
        """Up to ``limit`` subjects of ``tenant`` with stored ids after ``after``, by stored id."""

    @abc.abstractmethod
    def count(self, table: Literal["subjects", "templates"], tenant: str | None) -> int:
        """Rows of ``table`` (of one tenant, or all)."""

    @abc.abstractmethod
    def subject_tenants(self) -> list[str]:
        """Tenants holding subjects, sorted."""

    # ------------------------------------------------------------------ key-pair rotation

    @abc.abstractmethod
    def rotated_generation(self, tenant: str, block: int) -> int | None:
        """The source generation of a block already re-encrypted by an unfinished rotation (None: not yet)."""

    @abc.abstractmethod
    def put_rotated(self, tenant: str, block: int, source_generation: int, data: bytes) -> None:
        """Keep a re-encrypted block until the swap."""

    @abc.abstractmethod
    def rotation_rows(self) -> bool:
        """Whether any re-encrypted block is waiting for the swap."""

    @abc.abstractmethod
    def swap_rotated(self, fingerprint: str) -> None:
        """Inside a transaction: every block replaced by its re-encrypted version, those cleared, and the store's
        key-pair fingerprint set to ``fingerprint`` (shared backends bump every tenant's generation)."""

    # ------------------------------------------------------------------ erasure and closing

    @abc.abstractmethod
    def compact(self) -> int:
        """Rewrite the storage so that no earlier version of a row is left in it (outside a transaction); the
        store's size in bytes afterwards."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection (and release what :meth:`exclusive` or opening took)."""
