"""Durable, tenant-isolated storage and search of protected templates.

- :class:`TemplateStore` -- the interface (:mod:`advface.store.base`), with :class:`Match` and :class:`SubjectInfo`;
- :class:`SQLiteFaissStore` -- SQLite as the durable truth, one faiss index per tenant for search.
- :class:`advface.store.postgres.PostgresStore` -- PostgreSQL + pgvector, searched in SQL (shared by several
  sidecars); imported from its package, so that psycopg is only loaded when it is used.

Shared by both: :mod:`advface.store.faiss_index` (the per-tenant faiss indexes and their kNN search) and
:mod:`advface.store.rotation` (rules of key rotation and template re-issue).
"""

from advface.store.base import Match, SubjectInfo, TemplateStore
from advface.store.sqlite_faiss import SQLiteFaissStore

__all__ = ["Match", "SQLiteFaissStore", "SubjectInfo", "TemplateStore"]
