"""Durable, tenant-isolated storage and search of protected templates.

- :class:`TemplateStore` -- the interface (:mod:`advface.store.base`), with :class:`Match` and :class:`SubjectInfo`;
- :class:`SQLiteFaissStore` -- SQLite as the durable truth, one faiss index per tenant for search.
"""

from advface.store.base import Match, SubjectInfo, TemplateStore
from advface.store.sqlite_faiss import SQLiteFaissStore

__all__ = ["Match", "SQLiteFaissStore", "SubjectInfo", "TemplateStore"]
