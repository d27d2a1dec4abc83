"""Helpers of the encrypted-matching tests (imported by name: the tests folder is on sys.path)."""

from __future__ import annotations

import numpy as np

from advface.encrypted.keys import SecretKeys


def decrypt_values(keys: SecretKeys, cipher) -> np.ndarray:  # noqa: ANN001
    """Test helper: the slot values of a ciphertext (what only the key service can do)."""
    import tenseal.sealapi as seal

    plain = seal.Plaintext()
    keys.decryptor().decrypt(cipher, plain)
    return np.asarray(seal.CKKSEncoder(keys.public.context).decode_double(plain))


class Backend:
    """Where a test's encrypted stores live: an SQLite file per ``name`` in ``folder``, or tables with prefix
    ``advface_enc`` (``advface_enc_<name>`` for other names) in the PostgreSQL database ``dsn``."""

    TABLES = ("meta", "subjects", "templates", "blocks", "rotated", "tenants")

    def __init__(self, name: str, folder, dsn: str | None = None) -> None:  # noqa: ANN001
        self.name, self.folder, self.dsn = name, folder, dsn

    def prefix(self, name: str = "t") -> str:
        return "advface_enc" if name == "t" else f"advface_enc_{name}"

    def open(self, public, binding_key: bytes, dim: int, metric: str = "euclidean", *, name: str = "t", **kw):  # noqa: ANN001, ANN201
        """The store ``name`` of this backend (the same one on every call)."""
        from advface.encrypted.store import EncryptedPostgresStore, EncryptedSQLiteStore

        if self.dsn is None:
            return EncryptedSQLiteStore(self.folder / f"{name}.sqlite3", public, binding_key, dim, metric, **kw)
        return EncryptedPostgresStore(self.dsn, public, binding_key, dim, metric, table_prefix=self.prefix(name), **kw)

    def sql(self, statement: str, params: tuple = (), *, name: str = "t") -> list[tuple]:
        """Run one statement on the raw database, outside the store (tables named as in SQLite, ``?`` parameters):
        what a thief or a tampering insider with database access does."""
        import re
        import sqlite3

        if self.dsn is None:
            raw = sqlite3.connect(self.folder / f"{name}.sqlite3")
            try:
                rows = raw.execute(statement, params).fetchall()
                raw.commit()
                return rows
            finally:
                raw.close()
        import psycopg

        tables = "|".join(self.TABLES)
        statement = re.sub(rf"\b({tables})\b", lambda m: f"{self.prefix(name)}_{m.group(1)}", statement)
        with psycopg.connect(self.dsn, autocommit=True) as raw:
            cur = raw.execute(statement.replace("?", "%s"), params)
            return (
                [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in cur.fetchall()]
                if cur.description
                else []
            )

    def stored_bytes(self, *, name: str = "t") -> bytes:
        """Everything the store keeps: the SQLite file and its WAL, or every row of its PostgreSQL tables."""
        from pathlib import Path

        if self.dsn is None:
            path = self.folder / f"{name}.sqlite3"
            return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
        out = []
        for table in self.TABLES:
            for row in self.sql(f"SELECT * FROM {table}", name=name):
                out.extend(v if isinstance(v, bytes) else str(v).encode() for v in row)
        return b"\n".join(out)
