"""A template store on SQLite (the durable truth) with one in-memory faiss index per tenant (search).

Durability and deletion:

- SQLite runs in WAL mode with ``synchronous=FULL``: a write is on disk (fsync'ed) when its method returns;
- ``secure_delete=ON`` overwrites the bytes of deleted rows, and every deletion is followed by a
  ``wal_checkpoint(TRUNCATE)``, so a deleted template's vector is neither in the ``.sqlite`` file nor in its
  ``-wal`` file afterwards (it may linger in free disk blocks below the file system; use disk encryption);
- the database and its lock file are created with mode 0600; one process at a time may open a database (an
  exclusive ``flock`` on ``<path>.lock``), since every process holds its own index.

The ``meta`` table records the format, schema version, dimension and metric: opening a database with another
dimension or metric raises ConfigError. Templates are stored as little-endian float32 BLOBs; their SQLite row ids
(never reused: AUTOINCREMENT) are the faiss ids.

Indexes: ``IndexIDMap2`` over ``IndexFlatL2`` (euclidean) or over ``IndexFlatIP`` on L2-normalised copies of the
vectors (cosine); rebuilt from SQLite when the store opens. With ``IndexOptions(kind="ivf")``, tenants of at least
``min_rows`` templates are also indexed by an approximate ``IndexIVFFlat`` (trained on the tenant's templates,
retrained as it grows; deletions remove its entries too) that answers their searches; smaller tenants stay exact.
Writes commit to SQLite first, then update the index; a search sees a write once its method has returned. With
``use_gpu`` (``"auto"``: when faiss reports a GPU and a tenant holds at least :data:`GPU_MIN_ROWS` templates;
``True``: every tenant, when faiss reports a GPU; never required) searches run on a GPU copy of the flat index
(preferred over the IVF index), rebuilt lazily after deletions.

Encryption at rest (optional ``cipher``, a :class:`~advface.crypto.TemplateCipher`): every vector BLOB is then
AES-256-GCM ciphertext bound to its row (associated data: tenant, subject id, template id; see
:func:`advface.crypto.template_aad`), decrypted only in memory to build the index. The ``meta`` table records
``encryption`` (``aes-256-gcm``) and ``key_ids`` (JSON list of the ids of the keys rows may be under). Opening an
encrypted database without a cipher, with a keyring lacking a key some rows are under (wrong key, unfinished
rotation), or a plaintext database that holds templates with a cipher (without ``migrate_plaintext=True``) raises
ConfigError; a ciphertext that fails authentication makes the open fail with an IntegrityError naming every such
row (:meth:`SQLiteFaissStore.verify_integrity` lists them). :meth:`SQLiteFaissStore.rotate` re-encrypts every row
under a new key in batches of one transaction each: it resumes after a crash, and each row is always readable under
the old or the new key (blobs carry their key id). It also finishes a ``migrate_plaintext`` migration.

Thread safety: writers are serialised; searches run concurrently with each other (a readers-writer lock guards the
indexes, the SQLite connection has its own lock).

Modules: :mod:`~advface.store.sqlite_faiss.store` (the store: opening, reads and writes),
:mod:`~advface.store.sqlite_faiss.database` (the file, its lock, schema, ``meta`` table and transactions),
:mod:`~advface.store.sqlite_faiss.search` (the per-tenant indexes of :mod:`advface.store.faiss_index`, search) and
:mod:`~advface.store.sqlite_faiss.maintenance` (encryption checks, integrity, key rotation, template re-issue).
"""

from advface.store.faiss_index import GPU_MAX_K, GPU_MIN_ROWS, INDEX_KINDS, IVF_MAX_K, IndexOptions
from advface.store.sqlite_faiss.database import FORMAT, SCHEMA_VERSION
from advface.store.sqlite_faiss.store import SQLiteFaissStore

__all__ = [
    "FORMAT",
    "GPU_MAX_K",
    "GPU_MIN_ROWS",
    "INDEX_KINDS",
    "IVF_MAX_K",
    "IndexOptions",
    "SCHEMA_VERSION",
    "SQLiteFaissStore",
]
