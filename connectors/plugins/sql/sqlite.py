"""`sqlite`: the zero-configuration local sink (a database file) and source.

The sink has the PostgreSQL sink's semantics: one `BEGIN IMMEDIATE` transaction
(which serialises writers of the file) per write; append deletes what an earlier
attempt of the chunk wrote and inserts the batch, upsert merges the chunk's last row
per key with `INSERT ... ON CONFLICT DO UPDATE`, replace appends into a staging table
that `finalize()` renames in; the fence is checked before COMMIT. Not the fast path:
rows go through `executemany`. The source (SQLAlchemy Core, shared with `mysql`)
lives in `alchemy`. Pure Python (no Django).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import marshmallow
import pyarrow as pa
import pyarrow.compute as pc
from marshmallow import fields, validate

from connectors.base import (
    CHUNK_SEQ_COLUMN,
    RUN_ID_COLUMN,
    SOURCE_REF_COLUMN,
    Capabilities,
    CheckResult,
    Fence,
    Plugin,
    Sink,
    WriteResult,
)
from connectors.exceptions import (
    ConfigError,
    ConnectorError,
    FencedError,
    TerminalError,
    TransientError,
)
from connectors.plugins.sql.alchemy import (
    AlchemySource,
    SqliteReadOptions,
    sqlite_url,
)
from connectors.plugins.sql.common import (
    SqlWriteOptions,
    check_key_columns,
    columns_to_add,
    data_fields,
    index_name,
    is_json,
    last_row_per_key,
    load_write_options,
    staging_table,
    unsupported,
    with_system_columns,
)

DEFAULT_SCHEMA = "main"
#: The temporary table an upsert stages its chunk in.
UPSERT_STAGE = "dis_upsert_stage"


def _validate_path(value: str) -> None:
    if not value or not os.path.isabs(value) or "\x00" in value:
        raise marshmallow.ValidationError("Must be an absolute file path.")


class SqliteConfig(marshmallow.Schema):
    """Config of a SQLite connector: the database file and how long to wait for it."""

    path = fields.String(required=True, validate=_validate_path)
    busy_timeout = fields.Float(load_default=30.0, validate=validate.Range(0, 600))


def sqlite_type(field: pa.Field) -> str:
    """The declared SQLite column type for an Arrow field.

    Decimals and JSON are TEXT (NUMERIC affinity would turn `1.10` into a float);
    dates and timestamps are ISO-8601 text, timestamps with a time zone in UTC with
    an explicit `+00:00` offset.

    Raises:
        ConfigError: for an Arrow type without a mapping.
    """
    t = field.type
    if pa.types.is_dictionary(t):
        return sqlite_type(pa.field(field.name, t.value_type, metadata=field.metadata))
    if is_json(field) or pa.types.is_decimal(t) or t == pa.uint64():
        return "TEXT"
    if (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_null(t)
    ):
        return "TEXT"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_integer(t):
        return "INTEGER"
    if pa.types.is_floating(t):
        return "REAL"
    if pa.types.is_date(t):
        return "DATE"
    if pa.types.is_time(t):
        return "TIME"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    raise unsupported(field, "SQLite")


def _python_values(column: pa.ChunkedArray, field: pa.Field) -> list[Any]:
    """One column as Python values SQLite stores exactly, converted by Arrow kernels."""
    t = field.type
    if pa.types.is_dictionary(t):
        column = column.cast(t.value_type)
        t = t.value_type
    if isinstance(t, pa.JsonType):
        column = pa.chunked_array([c.storage for c in column.chunks], t.storage_type)
    elif pa.types.is_timestamp(t):
        utc = column.cast(pa.timestamp("us", "UTC" if t.tz else None), safe=False)
        text = pc.strftime(utc, format="%Y-%m-%dT%H:%M:%S")
        column = pc.binary_join_element_wise(text, "+00:00", "") if t.tz else text
    elif pa.types.is_boolean(t):
        column = column.cast(pa.int8())
    elif (
        pa.types.is_date(t)
        or pa.types.is_time(t)
        or pa.types.is_decimal(t)
        or t == pa.uint64()
    ):
        column = column.cast(pa.string())
    return column.to_pylist()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqliteSink(Sink):
    """Appends batches to a table of a SQLite file, replacing earlier chunk attempts."""

    def dataset_name(self, options: dict[str, Any]) -> str:
        opts = load_write_options(options, default_schema=DEFAULT_SCHEMA)
        return f"sqlite://{self.config['path']}/{opts['table']}"

    def check(self) -> CheckResult:
        path = self.config["path"]
        if not os.path.exists(path):
            parent = os.path.dirname(path)
            if os.path.isdir(parent) and os.access(parent, os.W_OK):
                return CheckResult(True, f"{path} will be created on first write")
            return CheckResult(False, f"{path} does not exist and cannot be created")
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True)) as conn:
                conn.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            return CheckResult(False, f"cannot open {path}: {exc}")
        return CheckResult(True, f"{path} is a writable SQLite database")

    def prepare(
        self,
        options: dict[str, Any],
        schema: pa.Schema,
        *,
        run_id: int | None = None,
    ) -> None:
        """Create the table and its (run, chunk) index, or check and evolve it.

        Upsert also makes sure a unique index on `key` exists; replace prepares the
        run's staging table `<table>__dis_run_<run_id>` instead of the target.
        Missing data columns are added when the options say `evolve: add_columns`.

        Args:
            options: the pipeline's write options.
            schema: the data columns to store (system columns are left out).
            run_id: the run being prepared; required for `replace`.

        Raises:
            ConfigError: bad options, a key not in the data, or an unmappable type.
            TerminalError: the existing table lacks columns, duplicate keys prevent
                the unique index, or the file is unusable.
            TransientError: the database stayed locked beyond the busy timeout.
        """
        opts = load_write_options(options, default_schema=DEFAULT_SCHEMA)
        table = _table_for(opts, run_id)
        qualified = f"{_quote(opts['schema'])}.{_quote(table)}"
        fields_ = data_fields(schema)
        types = {f.name: sqlite_type(f) for f in fields_}
        if opts["write_mode"] == "upsert":
            check_key_columns(opts["key"], list(types))
        definitions = [f"{_quote(name)} {type_}" for name, type_ in types.items()]
        definitions += [
            f"{_quote(RUN_ID_COLUMN)} INTEGER NOT NULL",
            f"{_quote(CHUNK_SEQ_COLUMN)} INTEGER NOT NULL",
            f"{_quote(SOURCE_REF_COLUMN)} TEXT",
        ]
        try:
            with self._transaction(wal=True) as conn:
                existing = self._columns(conn, opts["schema"], table)
                if existing is None:
                    conn.execute(f"CREATE TABLE {qualified} ({', '.join(definitions)})")
                    _create_run_chunk_index(conn, opts["schema"], table)
                else:
                    _evolve(conn, opts, table, types, existing)
                if opts["write_mode"] == "upsert":
                    _ensure_unique_key(conn, opts["schema"], table, opts["key"])
        except ConnectorError:
            raise
        except sqlite3.Error as exc:
            raise _failure(exc, f"preparing {table}") from exc

    def write(
        self,
        options: dict[str, Any],
        batch: pa.Table,
        *,
        run_id: int,
        chunk_seq: int,
        fence: Fence,
    ) -> WriteResult:
        """Replace the rows of (run_id, chunk_seq) with `batch`, in one transaction.

        Raises:
            FencedError: `fence()` returned False; nothing was committed.
            TransientError: the database stayed locked beyond the busy timeout.
            TerminalError: missing table or column, or another database error.
        """
        opts = load_write_options(options, default_schema=DEFAULT_SCHEMA)
        target = _table_for(opts, run_id)
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        data_fields(batch.schema)
        for field in batch.schema:
            sqlite_type(field)  # refuse unmappable types before opening the file
        upsert = opts["write_mode"] == "upsert"
        if upsert:
            check_key_columns(opts["key"], batch.column_names)
            batch = last_row_per_key(batch, opts["key"])
        table = with_system_columns(batch, run_id=run_id, chunk_seq=chunk_seq)
        columns = [
            _python_values(column, field)
            for field, column in zip(table.schema, table.columns, strict=True)
        ]
        qualified = f"{_quote(opts['schema'])}.{_quote(target)}"
        names = ", ".join(map(_quote, table.column_names))
        marks = ", ".join("?" * table.num_columns)
        # Identifiers are quoted by _quote(); values are bound parameters.
        delete = (
            f"DELETE FROM {qualified} WHERE {_quote(RUN_ID_COLUMN)} = ? "  # noqa: S608
            f"AND {_quote(CHUNK_SEQ_COLUMN)} = ?"
        )
        insert = f"INSERT INTO {qualified} ({names}) VALUES ({marks})"  # noqa: S608
        rows = zip(*columns, strict=True)
        details: dict[str, Any]
        try:
            with self._transaction() as conn:
                if upsert:
                    details = _upsert(conn, qualified, table.column_names, rows, opts)
                else:
                    replaced = conn.execute(delete, (run_id, chunk_seq)).rowcount
                    conn.executemany(insert, rows)
                    details = {"replaced": replaced}
                if not fence():
                    raise FencedError(
                        f"chunk {chunk_seq} of run {run_id}: a newer attempt owns it"
                    )
        except ConnectorError:
            raise
        except sqlite3.Error as exc:
            raise _failure(exc, f"writing to {target}") from exc
        return WriteResult(rows_written=table.num_rows, details=details)

    def finalize(self, options: dict[str, Any], *, run_id: int) -> None:
        """For `replace`: rename the run's staging table in, in one transaction.

        Calling it again (the staging table is gone, the target is there) does
        nothing. Append and upsert have nothing to finalize.

        Raises:
            TerminalError: neither the staging table nor the target exists.
            TransientError: the database stayed locked beyond the busy timeout.
        """
        opts = load_write_options(options, default_schema=DEFAULT_SCHEMA)
        if opts["write_mode"] != "replace":
            return
        schema, table = opts["schema"], opts["table"]
        staging = staging_table(table, run_id)
        old = staging_table(f"{table}__dis_old", run_id)
        try:
            with self._transaction() as conn:
                has_staging = self._columns(conn, schema, staging) is not None
                has_target = self._columns(conn, schema, table) is not None
                if not has_staging:
                    if has_target:
                        return  # swapped by an earlier call
                    raise TerminalError(
                        f"replace of {table}: staging table {staging} does not "
                        "exist (was the run prepared?)"
                    )
                if has_target:
                    conn.execute(
                        f"ALTER TABLE {_quote(schema)}.{_quote(table)} "
                        f"RENAME TO {_quote(old)}"
                    )
                conn.execute(
                    f"ALTER TABLE {_quote(schema)}.{_quote(staging)} "
                    f"RENAME TO {_quote(table)}"
                )
                if has_target:
                    conn.execute(f"DROP TABLE {_quote(schema)}.{_quote(old)}")
                # SQLite cannot rename an index: recreate it under the target's name.
                conn.execute(
                    f"DROP INDEX IF EXISTS {_quote(schema)}."
                    f"{_quote(index_name(staging, 'run_chunk_idx'))}"
                )
                _create_run_chunk_index(conn, schema, table)
        except ConnectorError:
            raise
        except sqlite3.Error as exc:
            raise _failure(exc, f"swapping in {table}") from exc

    # -- helpers -------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, wal: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection in `BEGIN IMMEDIATE`: committed on success, else rolled back."""
        conn = sqlite3.connect(
            self.config["path"],
            timeout=float(self.config.get("busy_timeout", 30.0)),
            isolation_level=None,
        )
        try:
            if wal:  # persistent; lets readers work while a chunk is written
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @staticmethod
    def _columns(conn: sqlite3.Connection, schema: str, table: str) -> set[str] | None:
        rows = conn.execute(
            "SELECT name FROM pragma_table_info(?, ?)",
            (table, schema),
        ).fetchall()
        return {name for (name,) in rows} or None


def _table_for(opts: dict[str, Any], run_id: int | None) -> str:
    """The table a write goes to: the target, or for replace its staging table.

    Raises:
        ConfigError: replace without a run id.
    """
    if opts["write_mode"] != "replace":
        return str(opts["table"])
    if run_id is None:
        raise ConfigError("write_mode replace needs the run id to stage into")
    return staging_table(opts["table"], run_id)


def _create_run_chunk_index(conn: sqlite3.Connection, schema: str, table: str) -> None:
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {_quote(schema)}."
        f"{_quote(index_name(table, 'run_chunk_idx'))} ON {_quote(table)} "
        f"({_quote(RUN_ID_COLUMN)}, {_quote(CHUNK_SEQ_COLUMN)})"
    )


def _evolve(
    conn: sqlite3.Connection,
    opts: dict[str, Any],
    table: str,
    types: dict[str, str],
    existing: set[str],
) -> None:
    """Add the missing data columns when allowed, else fail naming them."""
    for name in columns_to_add(opts, types, existing, table):
        conn.execute(
            f"ALTER TABLE {_quote(opts['schema'])}.{_quote(table)} "
            f"ADD COLUMN {_quote(name)} {types[name]}"
        )


def _ensure_unique_key(
    conn: sqlite3.Connection, schema: str, table: str, key: list[str]
) -> None:
    """Create a unique index on `key` unless one on exactly those columns exists."""
    indexes = conn.execute(
        'SELECT name FROM pragma_index_list(?, ?) WHERE "unique" AND NOT partial',
        (table, schema),
    ).fetchall()
    for (name,) in indexes:
        columns = conn.execute(
            "SELECT name FROM pragma_index_info(?, ?)", (name, schema)
        ).fetchall()
        if sorted(c for (c,) in columns) == sorted(key):
            return
    conn.execute(
        f"CREATE UNIQUE INDEX {_quote(schema)}.{_quote(index_name(table, 'key_idx'))} "
        f"ON {_quote(table)} ({', '.join(map(_quote, key))})"
    )


def _upsert(
    conn: sqlite3.Connection,
    qualified: str,
    names: list[str],
    rows: Any,
    opts: dict[str, Any],
) -> dict[str, int]:
    """Stage the rows (one per key) in a temporary table and merge them in key order."""
    key = opts["key"]
    columns = ", ".join(map(_quote, names))
    keys = ", ".join(map(_quote, key))
    stage = f"temp.{_quote(UPSERT_STAGE)}"
    conn.execute(f"DROP TABLE IF EXISTS {stage}")
    # Identifiers are quoted by _quote(); values are bound parameters.
    conn.execute(
        f"CREATE TABLE {stage} AS SELECT {columns} FROM {qualified} WHERE 0"  # noqa: S608
    )
    marks = ", ".join("?" * len(names))
    conn.executemany(f"INSERT INTO {stage} VALUES ({marks})", rows)  # noqa: S608
    total = conn.execute(f"SELECT count(*) FROM {stage}").fetchone()[0]  # noqa: S608
    updated = conn.execute(
        f"SELECT count(*) FROM {stage} JOIN {qualified} USING ({keys})"  # noqa: S608
    ).fetchone()[0]
    updates = ", ".join(
        f"{_quote(n)} = excluded.{_quote(n)}" for n in names if n not in key
    )
    conn.execute(
        f"INSERT INTO {qualified} ({columns}) SELECT {columns} FROM {stage} "  # noqa: S608
        f"WHERE true ORDER BY {keys} ON CONFLICT ({keys}) DO UPDATE SET {updates}"
    )
    conn.execute(f"DROP TABLE {stage}")
    return {"inserted": total - updated, "updated": updated, "replaced": updated}


def _failure(exc: sqlite3.Error, doing: str) -> ConnectorError:
    message = f"{doing}: {exc}"
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and (
        "locked" in text or "busy" in text or "disk i/o" in text
    ):
        return TransientError(message)
    return TerminalError(message)


class SqliteSource(AlchemySource):
    """Reads a table or a read-only query of a SQLite file in key-range chunks.

    The file is opened read-only (`mode=ro`) with `PRAGMA query_only`.
    """

    dialect = "sqlite"
    options_schema = SqliteReadOptions

    def _url(self) -> Any:
        return sqlite_url(self.config["path"])

    def _engine_options(self) -> dict[str, Any]:
        return {"connect_args": {"timeout": float(self.config.get("busy_timeout", 30))}}

    def _begin_read_only(self, conn: Any) -> None:
        conn.exec_driver_sql("PRAGMA query_only = 1")

    def _column_types(
        self, conn: Any, opts: dict[str, Any], description: Any
    ) -> dict[str, pa.DataType]:
        """Arrow types from the table's declared types (SQLite stores any value)."""
        if not opts["table"]:
            return {}
        rows = conn.exec_driver_sql(
            "SELECT name, upper(type) FROM pragma_table_info(?, ?)",
            (opts["table"], opts["schema"] or DEFAULT_SCHEMA),
        ).fetchall()
        types: dict[str, pa.DataType] = {}
        for name, declared in rows:
            if "INT" in declared or declared == "BOOLEAN":
                types[name] = pa.int64()
            elif any(word in declared for word in ("REAL", "FLOA", "DOUB")):
                types[name] = pa.float64()
            elif declared == "" or "BLOB" in declared:
                continue
            else:
                types[name] = pa.string()
        return types


class SqlitePlugin(Plugin):
    """SQLite: a local source and sink (append, upsert, replace)."""

    kind = "sqlite"
    title = "SQLite"
    config_schema = SqliteConfig
    capabilities = Capabilities(
        source=True,
        sink=True,
        upsert=True,
        discover=True,
        chunkable=True,
        exactly_once=True,
    )
    source_class = SqliteSource
    sink_class = SqliteSink
    read_options_schema = SqliteReadOptions
    write_options_schema = SqlWriteOptions
