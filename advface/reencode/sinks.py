"""Where protected templates are written: at the end of a run, from the part files, atomically.

Files are written to a temporary name beside the destination and renamed over it (``os.replace``); tables are
filled as ``<table>_advf_new`` and renamed to the destination name in one transaction. Either way the destination
is complete or absent (or, with ``--overwrite``, still the old one): never half-written. An existing destination is
refused unless ``overwrite``. Layouts (sources read the same layouts back):

- ``npz``: ``ids`` (unicode) and ``embeddings`` (float32 ``N x D``), uncompressed, like ``advface protect``;
- ``npy``: ``VECTORS.npy`` (float32 ``N x D``) + ids, one per line (default ``VECTORS.ids.txt``; ``?ids=``);
- ``parquet``: ``id`` (string, or int64 for integer ids) and ``embedding`` (list<float32>), row groups of
  :data:`PARQUET_ROW_GROUP` rows (the file's bytes do not depend on the chunk size);
- ``sqlite``: ``id TEXT|INTEGER PRIMARY KEY``, ``embedding BLOB`` (float32 little-endian; ``vector_format=json``:
  JSON text);
- ``postgresql``: ``id text|bigint PRIMARY KEY``, ``embedding vector(D)`` (pgvector), loaded with binary COPY.

Column names follow ``?id_column=`` / ``?vector_column=``.
"""

from __future__ import annotations

import abc
import os
import sqlite3
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advface.errors import AlreadyExistsError, ConfigError, EmbeddingError
from advface.reencode.formats import (
    PGCOPY_HEADER,
    PGCOPY_TRAILER,
    pgcopy_rows,
    vector_to_cell,
    write_npy_header,
)
from advface.reencode.retry import RetryPolicy
from advface.reencode.sources import (
    DEFAULT_ID_COLUMN,
    DEFAULT_VECTOR_COLUMN,
    default_ids_path,
    pg_column_types,
    quote_pg_table,
    table_columns_sqlite,
)
from advface.reencode.uri import Location, parse_location

PARQUET_ROW_GROUP = 65536
STAGING_SUFFIX = "_advf_new"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: identical content gives identical bytes


@dataclass(frozen=True)
class PartSet:
    """What a sink writes: ``count`` rows of dimension ``dim``, produced in order by ``chunks()``."""

    count: int
    dim: int
    id_kind: str
    max_id_chars: int
    chunks: Callable[[], Iterator[tuple[list[str], np.ndarray]]]


class Sink(abc.ABC):
    """A destination for protected templates.

    ``streaming`` sinks (advface's store, :mod:`advface.reencode.store_io`) take each chunk as it is protected
    (``begin``, ``write_chunk``, ``finish``) instead of all parts at the end.
    """

    streaming = False

    def __init__(self, location: Location, overwrite: bool = False) -> None:
        self.location = location
        self.overwrite = overwrite

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the destination already exists."""

    def check_writable(self, resuming: bool = False) -> None:
        """AlreadyExistsError if the destination exists and ``overwrite`` is off (``resuming``, an unfinished run
        already started writing the destination, matters to streaming sinks only)."""
        if self.exists() and not self.overwrite:
            raise AlreadyExistsError(
                f"destination {self.location.display()} already exists; pass --overwrite to replace it"
            )

    @abc.abstractmethod
    def write(self, parts: PartSet) -> None:
        """Write all rows atomically (see module docs)."""

    @abc.abstractmethod
    def swap_into(self, source: Location) -> None:
        """Replace ``source`` by this (written, verified) destination, atomically; the destination name is gone."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections (nothing to do for most sinks)."""

    # the streaming interface (``streaming`` sinks only)

    def begin(self) -> None:
        """Prepare the destination for :meth:`write_chunk` calls."""
        raise NotImplementedError(f"{type(self).__name__} is not a streaming sink")

    def write_chunk(self, ids: list[str], protected: np.ndarray) -> None:
        """Write one chunk of protected templates."""
        raise NotImplementedError(f"{type(self).__name__} is not a streaming sink")

    def finish(self) -> None:
        """Complete the destination after the last :meth:`write_chunk`."""
        raise NotImplementedError(f"{type(self).__name__} is not a streaming sink")

    @property
    def is_file(self) -> bool:
        """Whether this sink is a file (its work folder can live beside it)."""
        return self.location.scheme in ("npz", "npy", "parquet")


# --------------------------------------------------------------------------------------------------- files


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_replace(tmp: Path, path: Path) -> None:
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_swap(dest: Path, source: Path) -> None:
    try:
        os.replace(dest, source)
    except OSError as exc:
        raise ConfigError(f"cannot move {dest} over {source} ({exc}); they must be on one filesystem") from None


class _FileSink(Sink):
    def __init__(self, location: Location, overwrite: bool = False) -> None:
        super().__init__(location, overwrite)
        self.path = Path(location.path)

    def exists(self) -> bool:
        return self.path.exists()

    def _check_swap(self, source: Location) -> Path:
        if source.scheme != self.location.scheme:
            raise ConfigError(
                f"--swap needs source and destination of one kind, got {source.scheme} and {self.location.scheme}"
            )
        return Path(source.path)


class NpzSink(_FileSink):
    """``npz:PATH``: an advface embeddings file, written as a stream of zip members."""

    def write(self, parts: PartSet) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(self.path)
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                id_dtype = np.dtype(f"<U{max(parts.max_id_chars, 1)}") if parts.id_kind == "text" else np.dtype("<i8")
                with zf.open(zipfile.ZipInfo("ids.npy", _ZIP_DATE), "w", force_zip64=True) as f:
                    write_npy_header(f, (parts.count,), id_dtype)
                    for ids, _ in parts.chunks():
                        f.write(
                            np.asarray(
                                [int(i) for i in ids] if parts.id_kind == "integer" else ids, dtype=id_dtype
                            ).tobytes()
                        )
                with zf.open(zipfile.ZipInfo("embeddings.npy", _ZIP_DATE), "w", force_zip64=True) as f:
                    write_npy_header(f, (parts.count, parts.dim), np.dtype("<f4"))
                    for _, vectors in parts.chunks():
                        f.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
            _fsync_replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def swap_into(self, source: Location) -> None:
        _file_swap(self.path, self._check_swap(source))


class NpySink(_FileSink):
    """``npy:VECTORS.npy[?ids=IDS.txt]``: vectors ``.npy`` and a text file of ids (one per line)."""

    def __init__(self, location: Location, overwrite: bool = False) -> None:
        super().__init__(location, overwrite)
        self.ids_path = Path(location.options["ids"]) if "ids" in location.options else default_ids_path(self.path)
        if self.ids_path.suffix == ".npy":
            raise ConfigError(f"npy destination: ids are written as text, one per line; {self.ids_path} ends in .npy")

    def exists(self) -> bool:
        return self.path.exists() or self.ids_path.exists()

    def write(self, parts: PartSet) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp_v, tmp_i = _tmp_beside(self.path), _tmp_beside(self.ids_path)
        try:
            with tmp_v.open("wb") as fv, tmp_i.open("w", encoding="utf-8", newline="\n") as fi:
                write_npy_header(fv, (parts.count, parts.dim), np.dtype("<f4"))
                for ids, vectors in parts.chunks():
                    bad = next((i for i in ids if "\n" in i or "\r" in i), None)
                    if bad is not None:
                        raise EmbeddingError(f"id {bad!r} has a line break; use an npz or parquet destination")
                    fi.write("".join(i + "\n" for i in ids))
                    fv.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
            _fsync_replace(tmp_i, self.ids_path)  # ids first: the vectors file appearing marks completion
            _fsync_replace(tmp_v, self.path)
        finally:
            tmp_v.unlink(missing_ok=True)
            tmp_i.unlink(missing_ok=True)

    def swap_into(self, source: Location) -> None:
        src = self._check_swap(source)
        src_ids = Path(source.options["ids"]) if "ids" in source.options else default_ids_path(src)
        if src_ids.suffix == ".npy":
            raise ConfigError("--swap of npy needs a text ids file on both sides")
        _file_swap(self.ids_path, src_ids)
        _file_swap(self.path, src)


class ParquetSink(_FileSink):
    """``parquet:PATH[?id_column=id&vector_column=embedding]``."""

    def write(self, parts: PartSet) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        id_col = self.location.option("id_column", DEFAULT_ID_COLUMN)
        vec_col = self.location.option("vector_column", DEFAULT_VECTOR_COLUMN)
        id_type = pa.int64() if parts.id_kind == "integer" else pa.string()
        schema = pa.schema([(id_col, id_type), (vec_col, pa.list_(pa.float32()))])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(self.path)
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                buf_ids: list[str] = []
                buf_vecs: list[np.ndarray] = []
                held = 0

                def flush(n: int) -> None:
                    nonlocal buf_ids, buf_vecs, held
                    allv = np.concatenate(buf_vecs) if len(buf_vecs) > 1 else buf_vecs[0]
                    ids, vecs = buf_ids[:n], np.ascontiguousarray(allv[:n], dtype=np.float32)
                    offsets = pa.array(np.arange(0, (n + 1) * parts.dim, parts.dim, dtype=np.int32))
                    col = pa.ListArray.from_arrays(offsets, pa.array(vecs.reshape(-1)))
                    idv = pa.array([int(i) for i in ids] if parts.id_kind == "integer" else ids, type=id_type)
                    writer.write_table(pa.Table.from_arrays([idv, col], schema=schema), row_group_size=n)
                    buf_ids, buf_vecs, held = buf_ids[n:], [allv[n:]], held - n

                for ids, vectors in parts.chunks():
                    buf_ids.extend(ids)
                    buf_vecs.append(vectors)
                    held += len(ids)
                    while held >= PARQUET_ROW_GROUP:
                        flush(PARQUET_ROW_GROUP)
                if held:
                    flush(held)
            _fsync_replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def swap_into(self, source: Location) -> None:
        _file_swap(self.path, self._check_swap(source))


# --------------------------------------------------------------------------------------------------- SQL


def _staging_name(table: str) -> str:
    name = table.rpartition(".")[2] + STAGING_SUFFIX
    if len(name) > 63:
        raise ConfigError(f"table name {table} is too long for its staging table {name} (63 characters at most)")
    return name


def _check_swap_columns(columns: list[str], id_col: str, vec_col: str, where: str) -> None:
    extra = [c for c in columns if c not in (id_col, vec_col)]
    if extra:
        raise ConfigError(
            f"--swap refused: source table {where} has other columns ({', '.join(extra)}) that the protected table "
            "lacks; keep the new table and update the source with your own SQL instead"
        )


class SQLiteSink(Sink):
    """``sqlite:PATH?table=T[&id_column=id&vector_column=embedding&vector_format=blob|json]``."""

    def __init__(self, location: Location, overwrite: bool = False) -> None:
        super().__init__(location, overwrite)
        self.path = Path(location.path)
        self.table = location.options["table"]
        self.id_column = location.option("id_column", DEFAULT_ID_COLUMN)
        self.vector_column = location.option("vector_column", DEFAULT_VECTOR_COLUMN)
        self.fmt = location.option("vector_format", "blob")

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA secure_delete=ON")
        return conn

    def exists(self) -> bool:
        if not self.path.exists():
            return False
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return bool(table_columns_sqlite(conn, self.table))
        finally:
            conn.close()

    def write(self, parts: PartSet) -> None:
        stage = _staging_name(self.table)
        id_type = "INTEGER" if parts.id_kind == "integer" else "TEXT"
        vec_type = "TEXT" if self.fmt == "json" else "BLOB"
        conn = self._connect()
        try:
            conn.execute(f'DROP TABLE IF EXISTS "{stage}"')
            conn.execute(
                f'CREATE TABLE "{stage}" ("{self.id_column}" {id_type} PRIMARY KEY NOT NULL, '
                f'"{self.vector_column}" {vec_type} NOT NULL)'
            )
            sql = f'INSERT INTO "{stage}" VALUES (?, ?)'
            for ids, vectors in parts.chunks():
                keys: list[Any] = [int(i) for i in ids] if parts.id_kind == "integer" else ids
                conn.execute("BEGIN")
                conn.executemany(sql, zip(keys, (vector_to_cell(v, self.fmt) for v in vectors), strict=True))
                conn.execute("COMMIT")
            conn.execute("BEGIN IMMEDIATE")
            if table_columns_sqlite(conn, self.table):
                if not self.overwrite:
                    conn.execute("ROLLBACK")
                    raise AlreadyExistsError(
                        f"destination {self.location.display()} appeared meanwhile; pass --overwrite to replace it"
                    )
                conn.execute(f'DROP TABLE "{self.table}"')
            conn.execute(f'ALTER TABLE "{stage}" RENAME TO "{self.table}"')
            conn.execute("COMMIT")
        finally:
            conn.close()

    def swap_into(self, source: Location) -> None:
        if source.scheme != "sqlite" or Path(source.path).resolve() != self.path.resolve():
            raise ConfigError("--swap of a SQLite table needs the destination table in the source's database file")
        src_table = source.options["table"]
        conn = self._connect()
        try:
            _check_swap_columns(
                table_columns_sqlite(conn, src_table),
                source.option("id_column", DEFAULT_ID_COLUMN),
                source.option("vector_column", DEFAULT_VECTOR_COLUMN),
                src_table,
            )
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f'DROP TABLE "{src_table}"')  # secure_delete: the raw vectors' pages are zeroed
            conn.execute(f'ALTER TABLE "{self.table}" RENAME TO "{src_table}"')
            conn.execute("COMMIT")
        finally:
            conn.close()


class PostgresSink(Sink):
    """``postgresql://...?table=T[&id_column=id&vector_column=embedding]``: a new pgvector table."""

    def __init__(self, location: Location, overwrite: bool = False, retry: RetryPolicy | None = None) -> None:
        super().__init__(location, overwrite)
        self.dsn = location.path
        self.table = location.options["table"]
        self.id_column = location.option("id_column", DEFAULT_ID_COLUMN)
        self.vector_column = location.option("vector_column", DEFAULT_VECTOR_COLUMN)
        self.retry = retry or RetryPolicy()

    def _connect(self) -> Any:
        import psycopg

        return self.retry.call(
            lambda: psycopg.connect(self.dsn, autocommit=True, connect_timeout=10),
            f"{self.location.display()}: connect",
        )

    def exists(self) -> bool:
        with self._connect() as conn:
            return bool(pg_column_types(conn, self.table))

    def _qualified(self, name: str) -> str:
        schema = self.table.rpartition(".")[0]
        return quote_pg_table(f"{schema}.{name}" if schema else name)

    def write(self, parts: PartSet) -> None:
        stage = self._qualified(_staging_name(self.table))
        id_type = "bigint" if parts.id_kind == "integer" else "text"
        pk = f"advf_pk_{uuid.uuid4().hex[:16]}"  # unique constraint name: renames never collide with old ones
        target_name = self.table.rpartition(".")[2]

        def load() -> None:
            with self._connect() as conn:
                conn.execute(f"DROP TABLE IF EXISTS {stage}")
                conn.execute(
                    f'CREATE TABLE {stage} ("{self.id_column}" {id_type} NOT NULL, '
                    f'"{self.vector_column}" vector({parts.dim}) NOT NULL, '
                    f'CONSTRAINT "{pk}" PRIMARY KEY ("{self.id_column}"))'
                )
                with (
                    conn.cursor() as cur,
                    cur.copy(
                        f'COPY {stage} ("{self.id_column}", "{self.vector_column}") FROM STDIN (FORMAT BINARY)'
                    ) as copy,
                ):
                    copy.write(PGCOPY_HEADER)
                    for ids, vectors in parts.chunks():
                        copy.write(pgcopy_rows(ids, vectors, parts.id_kind == "integer"))
                    copy.write(PGCOPY_TRAILER)
                with conn.transaction():
                    if pg_column_types(conn, self.table):
                        if not self.overwrite:
                            raise AlreadyExistsError(
                                f"destination {self.location.display()} appeared meanwhile; "
                                "pass --overwrite to replace it"
                            )
                        conn.execute(f"DROP TABLE {quote_pg_table(self.table)}")
                    conn.execute(f'ALTER TABLE {stage} RENAME TO "{target_name}"')

        self.retry.call(load, f"{self.location.display()}: write")

    def swap_into(self, source: Location) -> None:
        if source.scheme != "postgresql" or source.path != self.location.path:
            raise ConfigError(
                "--swap of a PostgreSQL table needs the destination table in the source's database "
                "(same connection string)"
            )
        src_table = source.options["table"]
        if src_table.rpartition(".")[0] != self.table.rpartition(".")[0]:
            raise ConfigError("--swap needs source and destination tables in one schema")
        with self._connect() as conn:
            _check_swap_columns(
                list(pg_column_types(conn, src_table)),
                source.option("id_column", DEFAULT_ID_COLUMN),
                source.option("vector_column", DEFAULT_VECTOR_COLUMN),
                src_table,
            )
            with conn.transaction():
                conn.execute(f"DROP TABLE {quote_pg_table(src_table)}")
                conn.execute(f'ALTER TABLE {quote_pg_table(self.table)} RENAME TO "{src_table.rpartition(".")[2]}"')


def open_sink(
    location: str | Location,
    overwrite: bool = False,
    retry: RetryPolicy | None = None,
    *,
    store_config: str | Path | None = None,
    dim: int | None = None,
) -> Sink:
    """The sink for ``location`` (see :mod:`advface.reencode.uri`); an ``advface:`` store needs the sidecar's
    configuration file ``store_config`` (None: defaults) and the templates' ``dim``."""
    loc = parse_location(location) if isinstance(location, str) else location
    if loc.scheme == "advface":
        from advface.reencode.store_io import open_store_sink

        if dim is None:
            raise ConfigError("an advface store destination needs the templates' dimension")
        return open_store_sink(loc, overwrite, store_config, dim)
    if loc.scheme == "npz":
        return NpzSink(loc, overwrite)
    if loc.scheme == "npy":
        return NpySink(loc, overwrite)
    if loc.scheme == "parquet":
        return ParquetSink(loc, overwrite)
    if loc.scheme == "sqlite":
        return SQLiteSink(loc, overwrite)
    return PostgresSink(loc, overwrite, retry)
