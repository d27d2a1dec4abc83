"""Where raw templates are read from, a chunk at a time (never the whole source in memory).

Every source yields :class:`RawChunk` s of exactly ``chunk_size`` rows (the last may be shorter), in a fixed order:
file order for files, ``rowid`` order for SQLite, id order for PostgreSQL (keyset pagination: each page is one
short query, so a lost connection only repeats a page). A chunk's ``cursor`` says where the next one starts and is
saved in the journal, so a resumed run starts there. Ids travel as strings; ``id_kind`` remembers integer ids so
that SQL and Parquet sinks write them back as integers.
"""

from __future__ import annotations

import abc
import functools
import sqlite3
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from advface.errors import ConfigError, EmbeddingError
from advface.reencode.formats import blob_to_vector, iter_npy_rows, pgvector_from_binary, read_npy_header
from advface.reencode.retry import RetryPolicy
from advface.reencode.uri import Location, parse_location

DEFAULT_ID_COLUMN = "id"
DEFAULT_VECTOR_COLUMN = "embedding"


@dataclass
class RawChunk:
    """Consecutive source rows: string ids, float32 ``N x D`` vectors, and where the next chunk starts."""

    ids: list[str]
    vectors: np.ndarray
    cursor: Any = None


class Source(abc.ABC):
    """A readable collection of ``(id, vector)`` rows."""

    id_kind: str = "text"  # "text" or "integer"

    def __init__(self, location: Location) -> None:
        self.location = location

    @abc.abstractmethod
    def count(self) -> int:
        """Number of rows."""

    @abc.abstractmethod
    def chunks(self, chunk_size: int, rows_done: int = 0, cursor: Any = None) -> Iterator[RawChunk]:
        """Chunks of ``chunk_size`` rows, starting after ``rows_done`` rows (files) or after ``cursor`` (SQL)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release files and connections."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stack_rows(ids: list[str], rows: list[np.ndarray], where: str) -> np.ndarray:
    """Rows of one chunk as an ``N x D`` float32 array; EmbeddingError naming the first row of another dimension."""
    if not rows:
        return np.zeros((0, 0), np.float32)
    dim = len(rows[0])
    for row_id, row in zip(ids, rows, strict=True):
        if row.ndim != 1 or len(row) != dim:
            raise EmbeddingError(f"{where}: mixed dimensions: id {row_id} has {row.size} values, id {ids[0]} has {dim}")
    return np.stack(rows).astype(np.float32, copy=False)


def _rechunk(pieces: Iterator[tuple[list[str], np.ndarray]], size: int, start_row: int) -> Iterator[RawChunk]:
    """Regroup pieces of any length into chunks of exactly ``size`` rows (cursor: rows done after the chunk)."""
    buf_ids: list[str] = []
    buf_vecs: list[np.ndarray] = []
    held = 0
    done = start_row
    for ids, vecs in pieces:
        buf_ids.extend(ids)
        buf_vecs.append(vecs)
        held += len(ids)
        while held >= size:
            allv = np.concatenate(buf_vecs) if len(buf_vecs) > 1 else buf_vecs[0]
            done += size
            yield RawChunk(buf_ids[:size], np.ascontiguousarray(allv[:size]), done)
            buf_ids, buf_vecs, held = buf_ids[size:], [allv[size:]], held - size
    if held:
        allv = np.concatenate(buf_vecs) if len(buf_vecs) > 1 else buf_vecs[0]
        yield RawChunk(buf_ids, np.ascontiguousarray(allv), done + held)


# --------------------------------------------------------------------------------------------------- files


def _ids_as_strings(arr: np.ndarray, where: str) -> tuple[list[str], str]:
    if arr.dtype.kind == "U":
        return [str(x) for x in arr.tolist()], "text"
    if arr.dtype.kind in "iu":
        return [str(int(x)) for x in arr.tolist()], "integer"
    raise EmbeddingError(f"{where}: ids must be strings or integers, got dtype {arr.dtype}")


def _check_vector_dtype(dtype: np.dtype, shape: tuple[int, ...], where: str) -> None:
    if dtype.kind != "f" or len(shape) != 2:
        raise EmbeddingError(f"{where}: vectors must be a 2-D float array, got {dtype} of shape {shape}")


class NpzSource(Source):
    """``npz:PATH``: an advface embeddings file (``ids`` and ``embeddings`` members), read by streaming."""

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        self.path = Path(location.path)
        if not self.path.is_file():
            raise ConfigError(f"source {self.path} does not exist")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise EmbeddingError(f"{self.path}: not an .npz file ({exc})") from None
        names = set(self._zip.namelist())
        if not {"ids.npy", "embeddings.npy"} <= names:
            self._zip.close()
            raise EmbeddingError(f"{self.path}: not an embeddings file (needs 'ids' and 'embeddings' arrays)")
        with self._zip.open("ids.npy") as f:
            self._ids_shape, self._ids_dtype = read_npy_header(f, f"{self.path}:ids")
        with self._zip.open("embeddings.npy") as f:
            self._shape, self._dtype = read_npy_header(f, f"{self.path}:embeddings")
        _check_vector_dtype(self._dtype, self._shape, str(self.path))
        if self._ids_shape != (self._shape[0],):
            raise EmbeddingError(f"{self.path}: {self._ids_shape} ids for embeddings of shape {self._shape}")
        self.id_kind = "integer" if self._ids_dtype.kind in "iu" else "text"

    def count(self) -> int:
        return int(self._shape[0])

    def chunks(self, chunk_size: int, rows_done: int = 0, cursor: Any = None) -> Iterator[RawChunk]:
        with self._zip.open("ids.npy") as fi, self._zip.open("embeddings.npy") as fv:
            read_npy_header(fi, "ids")
            read_npy_header(fv, "embeddings")
            id_rows = iter_npy_rows(fi, self._ids_shape, self._ids_dtype, chunk_size, rows_done, str(self.path))
            vec_rows = iter_npy_rows(fv, self._shape, self._dtype, chunk_size, rows_done, str(self.path))
            done = rows_done
            for ids_arr, vecs in zip(id_rows, vec_rows, strict=True):
                ids, _ = _ids_as_strings(ids_arr, str(self.path))
                done += len(ids)
                yield RawChunk(ids, vecs.astype(np.float32), done)

    def close(self) -> None:
        self._zip.close()


def default_ids_path(vectors_path: Path) -> Path:
    """``X.npy`` -> ``X.ids.txt``: where ``npy:`` looks for ids when ``?ids=`` is not given."""
    name = vectors_path.name[:-4] if vectors_path.name.endswith(".npy") else vectors_path.name
    return vectors_path.with_name(name + ".ids.txt")


class NpySource(Source):
    """``npy:VECTORS.npy[?ids=IDS]``: a float ``N x D`` ``.npy`` plus ids (text, one per line, or a ``.npy``)."""

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        self.path = Path(location.path)
        self.ids_path = Path(location.options["ids"]) if "ids" in location.options else default_ids_path(self.path)
        for p in (self.path, self.ids_path):
            if not p.is_file():
                raise ConfigError(f"source {p} does not exist")
        with self.path.open("rb") as f:
            self._shape, self._dtype = read_npy_header(f, str(self.path))
        _check_vector_dtype(self._dtype, self._shape, str(self.path))
        self._ids_npy = self.ids_path.suffix == ".npy"
        if self._ids_npy:
            with self.ids_path.open("rb") as f:
                self._ids_shape, self._ids_dtype = read_npy_header(f, str(self.ids_path))
            if self._ids_shape != (self._shape[0],):
                raise EmbeddingError(f"{self.ids_path}: {self._ids_shape} ids for vectors of shape {self._shape}")
            self.id_kind = "integer" if self._ids_dtype.kind in "iu" else "text"

    def count(self) -> int:
        return int(self._shape[0])

    def _text_ids(self, f: IO[str], chunk_size: int, skip: int) -> Iterator[list[str]]:
        for _ in range(skip):
            f.readline()
        batch: list[str] = []
        for line in f:
            batch.append(line.rstrip("\n").rstrip("\r"))
            if len(batch) == chunk_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def chunks(self, chunk_size: int, rows_done: int = 0, cursor: Any = None) -> Iterator[RawChunk]:
        with self.path.open("rb") as fv:
            read_npy_header(fv, str(self.path))
            vec_rows = iter_npy_rows(fv, self._shape, self._dtype, chunk_size, rows_done, str(self.path))
            if self._ids_npy:
                fi: Any = self.ids_path.open("rb")
                read_npy_header(fi, str(self.ids_path))
                id_batches: Iterator[list[str]] = (
                    _ids_as_strings(a, str(self.ids_path))[0]
                    for a in iter_npy_rows(fi, self._ids_shape, self._ids_dtype, chunk_size, rows_done)
                )
            else:
                fi = self.ids_path.open("r", encoding="utf-8")
                id_batches = self._text_ids(fi, chunk_size, rows_done)
            try:
                done = rows_done
                for vecs in vec_rows:
                    ids = next(id_batches, [])
                    if len(ids) != len(vecs):
                        raise EmbeddingError(f"{self.ids_path}: fewer ids than the {self.count()} vectors")
                    done += len(ids)
                    yield RawChunk(ids, vecs.astype(np.float32), done)
                if next(id_batches, None):
                    raise EmbeddingError(f"{self.ids_path}: more ids than the {self.count()} vectors")
            finally:
                fi.close()


class ParquetSource(Source):
    """``parquet:PATH[?id_column=id&vector_column=embedding]``: id (string or integer), vector (list of floats)."""

    def __init__(self, location: Location) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(location)
        self.path = Path(location.path)
        if not self.path.is_file():
            raise ConfigError(f"source {self.path} does not exist")
        self.id_column = location.option("id_column", DEFAULT_ID_COLUMN)
        self.vector_column = location.option("vector_column", DEFAULT_VECTOR_COLUMN)
        try:
            self._file = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise EmbeddingError(f"{self.path}: not a Parquet file ({exc})") from None
        schema = self._file.schema_arrow
        missing = [c for c in (self.id_column, self.vector_column) if c not in schema.names]
        if missing:
            raise EmbeddingError(
                f"{self.path}: missing column(s) {', '.join(missing)} "
                f"(has: {', '.join(schema.names)}); "
                "name them with ?id_column=...&vector_column=..."
            )
        id_type = schema.field(self.id_column).type
        if pa.types.is_integer(id_type):
            self.id_kind = "integer"
        elif not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise EmbeddingError(f"{self.path}: id column {self.id_column} is {id_type}, need string or integer")
        vtype = schema.field(self.vector_column).type
        if not (
            pa.types.is_list(vtype) or pa.types.is_large_list(vtype) or pa.types.is_fixed_size_list(vtype)
        ) or not pa.types.is_floating(vtype.value_type):
            raise EmbeddingError(f"{self.path}: vector column {self.vector_column} is {vtype}, need a list of floats")

    def count(self) -> int:
        return int(self._file.metadata.num_rows)

    def _vectors(self, column: Any, ids: list[str]) -> np.ndarray:
        import pyarrow.compute as pc

        if column.null_count:
            bad = ids[int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])]
            raise EmbeddingError(f"{self.path}: id {bad} has no vector (null)")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            i = int(np.flatnonzero(lengths != lengths[0])[0])
            raise EmbeddingError(
                f"{self.path}: mixed dimensions: id {ids[i]} has {lengths[i]} values, id {ids[0]} has {lengths[0]}"
            )
        flat = pc.list_flatten(column)
        if flat.null_count:
            raise EmbeddingError(f"{self.path}: a vector holds null values (near id {ids[0]})")
        values = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        dim = int(lengths[0]) if len(lengths) else 0
        return values.reshape(len(ids), dim)

    def _pieces(self, rows_done: int, batch_rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
        meta = self._file.metadata
        skip = rows_done
        groups: list[int] = []
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if skip >= n and not groups:
                skip -= n
                continue
            groups.append(g)
        if not groups:
            return
        for batch in self._batches(groups, batch_rows):
            if skip:
                cut = min(skip, batch.num_rows)
                batch = batch.slice(cut)
                skip -= cut
                if batch.num_rows == 0:
                    continue
            id_col = batch.column(0)
            if id_col.null_count:
                raise EmbeddingError(f"{self.path}: null id in column {self.id_column}")
            ids = [str(x) for x in id_col.to_pylist()]
            yield ids, self._vectors(batch.column(1), ids)

    def _batches(self, groups: list[int], batch_rows: int) -> Iterator[Any]:
        # One row group at a time: iter_batches over many groups keeps buffers alive (RSS grew ~0.5 GB per 1M
        # templates); per group, memory stays at one row group's worth.
        for g in groups:
            yield from self._file.iter_batches(
                batch_size=batch_rows, row_groups=[g], columns=[self.id_column, self.vector_column]
            )

    def chunks(self, chunk_size: int, rows_done: int = 0, cursor: Any = None) -> Iterator[RawChunk]:
        yield from _rechunk(self._pieces(rows_done, chunk_size), chunk_size, rows_done)


# --------------------------------------------------------------------------------------------------- SQL


class SQLiteSource(Source):
    """``sqlite:PATH?table=T[&id_column=id&vector_column=embedding]``: vectors as float32 BLOBs or JSON text.

    Read in ``rowid`` order (keyset pagination on rowid); the file is opened read-only.
    """

    def __init__(self, location: Location, retry: RetryPolicy | None = None) -> None:
        super().__init__(location)
        self.path = Path(location.path)
        if not self.path.is_file():
            raise ConfigError(f"source {self.path} does not exist")
        self.table = location.options["table"]
        self.id_column = location.option("id_column", DEFAULT_ID_COLUMN)
        self.vector_column = location.option("vector_column", DEFAULT_VECTOR_COLUMN)
        self.retry = retry or RetryPolicy()
        self._conn = self._connect()
        columns = table_columns_sqlite(self._conn, self.table)
        if not columns:
            raise ConfigError(f"{self.path}: no table {self.table}")
        missing = [c for c in (self.id_column, self.vector_column) if c not in columns]
        if missing:
            raise EmbeddingError(
                f"{self.path}: table {self.table} has no column(s) {', '.join(missing)} (has: {', '.join(columns)})"
            )
        first = self._conn.execute(f'SELECT typeof("{self.id_column}") FROM "{self.table}" LIMIT 1').fetchone()
        self.id_kind = "integer" if first and first[0] == "integer" else "text"

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)

    def _reconnect(self) -> None:
        try:
            self._conn.close()
        finally:
            self._conn = self._connect()

    def count(self) -> int:
        return int(
            self.retry.call(
                lambda: self._conn.execute(f'SELECT count(*) FROM "{self.table}"').fetchone()[0],
                f"{self.path}: count",
                self._reconnect,
            )
        )

    def chunks(self, chunk_size: int, rows_done: int = 0, cursor: Any = None) -> Iterator[RawChunk]:
        last = -(2**63) if cursor is None else int(cursor)
        sql = (
            f'SELECT rowid, "{self.id_column}", "{self.vector_column}" FROM "{self.table}" '
            "WHERE rowid > ? ORDER BY rowid LIMIT ?"
        )

        def read(after: int) -> list[Any]:
            return self._conn.execute(sql, (after, chunk_size)).fetchall()

        while True:
            rows = self.retry.call(functools.partial(read, last), f"{self.path}: read {self.table}", self._reconnect)
            if not rows:
                return
            ids = [_sql_id(r[1], self.id_kind, str(self.path)) for r in rows]
            vectors = stack_rows(ids, [blob_to_vector(r[2], i) for r, i in zip(rows, ids, strict=True)], str(self.path))
            last = int(rows[-1][0])
            yield RawChunk(ids, vectors, last)
            if len(rows) < chunk_size:
                return

    def close(self) -> None:
        self._conn.close()


def table_columns_sqlite(conn: sqlite3.Connection, table: str) -> list[str]:
    """Column names of ``table`` (empty when there is no such table)."""
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")').fetchall()]


def _sql_id(value: Any, kind: str, where: str) -> str:
    if value is None:
        raise EmbeddingError(f"{where}: a row has a NULL id")
    if kind == "integer":
        if not isinstance(value, int):
            raise EmbeddingError(f"{where}: mixed id types: {value!r} among integer ids")
        return str(value)
    if isinstance(value, int):
        raise EmbeddingError(f"{where}: mixed id types: integer {value} among text ids")
    return str(value)


def quote_pg_table(table: str) -> str:
    """``schema.table`` or ``table`` quoted for PostgreSQL (identifiers were checked by the URI parser)."""
    return ".".join(f'"{p}"' for p in table.split("."))


class PostgresSource(Source):
    """``postgresql://USER@HOST:PORT/DB?table=T[&id_column=id&vector_column=embedding]``: a pgvector column.

    Read in id order by keyset pagination (``WHERE id >= last ORDER BY id LIMIT n``; the id column needs an index,
    which a primary key has), reconnecting with backoff when the connection drops.
    """

    def __init__(self, location: Location, retry: RetryPolicy | None = None) -> None:
        super().__init__(location)
        self.dsn = location.path
        self.table = location.options["table"]
        self.id_column = location.option("id_column", DEFAULT_ID_COLUMN)
        self.vector_column = location.option("vector_column", DEFAULT_VECTOR_COLUMN)
        self.retry = retry or RetryPolicy()
        self._conn: Any = None
        self.retry.call(self._reconnect, f"{location.display()}: connect")
        types = pg_column_types(self._conn, self.table)
        if not types:
            raise ConfigError(f"{location.display()}: no table {self.table}")
        missing = [c for c in (self.id_column, self.vector_column) if c not in types]
        if missing:
            raise EmbeddingError(
                f"{location.display()}: table {self.table} has no column(s) {', '.join(missing)} "
                f"(has: {', '.join(types)})"
            )
        if types[self.vector_column] != "vector":
            raise EmbeddingError(
                f"{location.display()}: column {self.vector_column} is {types[self.vector_column]}, "
                "need a pgvector vector"
            )
        self.id_kind = "integer" if types[self.id_column] in ("int2", "int4", "int8") else "text"

    def _reconnect(self) -> None:
        import psycopg

        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - the old connection is gone anyway
                pass
        self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)

    def count(self) -> int:
        def q() -> int:
            return int(self._conn.execute(f"SELECT count(*) FROM {quote_pg_table(self.table)}").fetchone()[0])

        return self.retry.call(q, f"{self.location.display()}: count", self._reconnect)

    def chunks(self, chunk_size: int, rows_done: int = 0, cursor: Any = None) -> Iterator[RawChunk]:
        t, ic, vc = quote_pg_table(self.table), f'"{self.id_column}"', f'"{self.vector_column}"'
        first_sql = f"SELECT {ic}, {vc} FROM {t} ORDER BY {ic} LIMIT %s"
        next_sql = f"SELECT {ic}, {vc} FROM {t} WHERE {ic} >= %s ORDER BY {ic} LIMIT %s"
        last: Any = cursor
        where = self.location.display()
        while True:
            if last is None:
                rows = self._fetch(first_sql, (chunk_size,))
            else:
                key = int(last) if self.id_kind == "integer" else str(last)
                rows = self._fetch(next_sql, (key, chunk_size + 1))
                if rows and _same_key(rows[0][0], key):
                    rows = rows[1:]  # the previous chunk's last row
                    if rows and _same_key(rows[0][0], key):
                        raise EmbeddingError(f"{where}: duplicate id {key}")
                else:
                    pass  # the previous last row was deleted meanwhile: nothing to drop
            if not rows:
                return
            ids = [_sql_id(r[0], self.id_kind, where) for r in rows]
            vectors = stack_rows(ids, [pgvector_from_binary(r[1], i) for r, i in zip(rows, ids, strict=True)], where)
            last = rows[-1][0]
            yield RawChunk(ids, vectors, last if self.id_kind == "integer" else str(last))
            if len(rows) < chunk_size:
                return

    def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        def q() -> list[Any]:
            with self._conn.cursor(binary=True) as cur:
                cur.execute(sql, params)
                return cur.fetchall()

        return self.retry.call(q, f"{self.location.display()}: read {self.table}", self._reconnect)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _same_key(value: Any, key: Any) -> bool:
    return (str(value) if not isinstance(key, int) else value) == key


def pg_column_types(conn: Any, table: str) -> dict[str, str]:
    """``{column: udt_name}`` of ``table`` (``schema.table`` or a table on the search path); empty if none."""
    schema, _, name = table.rpartition(".")
    rows = conn.execute(
        "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (quote_pg_table(table),),
    ).fetchall()
    del schema, name
    return {r[0]: r[1] for r in rows}


def open_source(
    location: str | Location,
    retry: RetryPolicy | None = None,
    *,
    store_config: str | Path | None = None,
    dim: int | None = None,
    untransform: bool = False,
) -> Source:
    """Open the source at ``location`` (see :mod:`advface.reencode.uri`). An ``advface:`` store is opened from the
    sidecar's configuration file ``store_config`` (None: defaults); ``dim`` is needed for a PostgreSQL store;
    ``untransform`` reads it through the inverse keyed transform (verification)."""
    loc = parse_location(location) if isinstance(location, str) else location
    if loc.scheme == "advface":
        from advface.reencode.store_io import open_store_source

        return open_store_source(loc, store_config, dim, untransform)
    if loc.scheme == "npz":
        return NpzSource(loc)
    if loc.scheme == "npy":
        return NpySource(loc)
    if loc.scheme == "parquet":
        return ParquetSource(loc)
    if loc.scheme == "sqlite":
        return SQLiteSource(loc, retry)
    return PostgresSource(loc, retry)
