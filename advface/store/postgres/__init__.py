"""A template store on PostgreSQL + pgvector: several sidecar replicas can share one database (scale-out).

Tables (``<prefix>`` is ``table_prefix``, default ``advface``)::

    <prefix>_meta        key -> value: format, schema version, dimension, metric, encryption mode
    <prefix>_tenants     one row per tenant holding subjects: a write generation and template/subject counts
    <prefix>_subjects    (tenant, subject_id) unique, metadata (JSON text), created_at (Unix seconds)
    <prefix>_templates   template_id (32 hex), tenant, subject, vector vector(dim) or ciphertext bytea, created_at

The schema is created on first use (the ``vector`` extension too, when the role may create it) and checked on every
open: another format, schema version, dimension, metric or encryption mode raises ConfigError.

Search, plaintext mode (no ``cipher``): done in SQL, so every replica sees every committed write at once. Tenants
with at most ``exact_max`` templates are searched exactly (a scan of the tenant's rows: the same results as faiss's
flat index, up to float rounding); larger tenants through the HNSW index on ``vector`` (``vector_cosine_ops`` or
``vector_l2_ops``), with iterative index scans so that the tenant filter never starves the result: candidates are
over-fetched and reduced to each subject's best template; when the index yields fewer distinct subjects than asked
(and the tenant has more), the search falls back to an exact scan. HNSW search is approximate: see the benchmark
(``benchmarks/store_postgres.py``) for its recall. Scores: cosine similarity (``1 - (v <=> q)``) or minus the
Euclidean distance (``-(v <-> q)``), as in :class:`~advface.store.sqlite_faiss.SQLiteFaissStore`.

Encrypted mode (``cipher`` given, e.g. :class:`advface.crypto.TemplateCipher`): vectors are stored only as
ciphertext (``bytea``; AAD = tenant, subject and template id: a ciphertext moved to another row fails to decrypt)
and the ``vector`` column stays NULL: a stolen database (or its backups, WAL, replicas) yields no vectors. Search then
runs on an in-memory faiss index per tenant, rebuilt from decrypted rows at open, like the SQLite store. Each write
bumps the tenant's ``generation`` (from a sequence); a search first reads it (one primary-key lookup) and rebuilds
the tenant's index when another process changed the tenant. Several replicas may therefore share an encrypted
database, but each keeps a full copy of the index and rebuilds a tenant after every foreign write: it is meant for
one replica per database (or rarely-written tenants). Subject ids and metadata are sealed in encrypted mode, as in
the SQLite store (:mod:`advface.store.sealing`): ``subject_id`` holds a keyed hash (lookups work, ``list_subjects``
pages in hash order), ``metadata`` AES-GCM ciphertext bound to the row, and the names key is kept wrapped in
``meta``. A store that held subjects before it was encrypted is sealed by :meth:`PostgresStore.rotate` (resumable);
replicas opened before take the sealed ids up from ``meta`` at their next call.

Keys and maintenance jobs (as in the SQLite store; rules shared in :mod:`advface.store.rotation`): ``meta`` records
``key_ids`` (keys rows may be under; a cipher lacking one of the keys in use is refused at open, naming the missing
key and an unfinished rotation), ``rotation`` (target of an unfinished :meth:`PostgresStore.rotate`),
``plaintext_rows`` (a plaintext store opened with ``migrate_plaintext=True`` until ``rotate`` has encrypted it),
``transform_job`` (progress of :meth:`PostgresStore.transform_vectors`) and ``keyed_transform`` (what the templates
were issued under). Jobs run one batch per transaction, serialised across processes by an advisory lock. A
re-issue (``transform_vectors``) locks each batch's tenants and bumps their generations, so other replicas rebuild
their in-memory indexes; they must not enrol while it runs (their writes would use the old transform).
:meth:`PostgresStore.bulk_add` loads large batches with COPY and an HNSW rebuild.

Durability: autocommit is off and every method is one transaction; ``synchronous_commit`` is set to ``on`` on every
connection (PostgreSQL's default), so a write is flushed to the server's WAL when its method returns.

Deletion: ``DELETE`` removes the rows at once for every reader, but PostgreSQL keeps the old tuples' bytes (dead
tuples) in the table, index and WAL files until VACUUM reclaims the space and later writes overwrite it; autovacuum
does this eventually, without erasing the bytes. :meth:`PostgresStore.vacuum` runs ``VACUUM FULL`` on the subject
and template tables, which rewrites them and their indexes into new files (the old files are removed: the bytes may
remain in free disk blocks and in WAL segments until they are recycled; use disk encryption, or the encrypted mode,
where deleted rows only ever held ciphertext).

Thread safety: connections come from a small pool (one per concurrent call, at most ``pool_size``); writes of one
tenant are serialised by a row lock on the tenant's row (taken first in every write transaction, in every replica),
so concurrent writers cannot deadlock or miscount. In encrypted mode the writes of one store object are also
serialised in-process (the index update follows the commit).

Modules: :mod:`~advface.store.postgres.store` (the store: options, tenant rows, reads and writes),
:mod:`~advface.store.postgres.connection` (DSNs, the connection pool, pgvector's type, transactions),
:mod:`~advface.store.postgres.schema` (tables, ``meta``, checks at open), :mod:`~advface.store.postgres.search`
(SQL exact / HNSW search, the encrypted mode's faiss indexes) and :mod:`~advface.store.postgres.maintenance`
(vacuum, key rotation, template re-issue, the keyed-transform marker).
"""

from advface.store.postgres.connection import redact_dsn
from advface.store.postgres.maintenance import TRANSFORM_MARKER_KEY
from advface.store.postgres.schema import FORMAT, HNSW_MAX_DIM, PGVECTOR_MAX_DIM, SCHEMA_VERSION
from advface.store.postgres.store import (
    BULK_MAINTENANCE_WORK_MEM,
    BULK_REBUILD_FRACTION,
    EXACT_MAX_DEFAULT,
    Cipher,
    PostgresStore,
)

__all__ = [
    "BULK_MAINTENANCE_WORK_MEM",
    "BULK_REBUILD_FRACTION",
    "Cipher",
    "EXACT_MAX_DEFAULT",
    "FORMAT",
    "HNSW_MAX_DIM",
    "PGVECTOR_MAX_DIM",
    "PostgresStore",
    "SCHEMA_VERSION",
    "TRANSFORM_MARKER_KEY",
    "redact_dsn",
]
