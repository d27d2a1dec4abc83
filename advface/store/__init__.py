"""Durable, tenant-isolated storage and search of protected templates.

- :class:`TemplateStore` -- the interface (:mod:`advface.store.base`), with :class:`Match` and :class:`SubjectInfo`;
- :class:`SQLiteFaissStore` -- SQLite as the durable truth, one faiss index per tenant for search.
- :class:`advface.store.postgres.PostgresStore` -- PostgreSQL + pgvector, searched in SQL (shared by several
  sidecars); imported from its module, so that psycopg is only loaded when it is used.
"""

from advface.store.base import Match, SubjectInfo, TemplateStore
from advface.store.sqlite_faiss import SQLiteFaissStore

__all__ = ["Match", "SQLiteFaissStore", "SubjectInfo", "TemplateStore"]
