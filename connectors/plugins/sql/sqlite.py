"""`sqlite`: the zero-configuration local sink (a database file), append mode.

Same semantics as the PostgreSQL sink: one `BEGIN IMMEDIATE` transaction (which
serialises writers of the file) deletes what an earlier attempt of the chunk wrote,
inserts the batch, checks the fence and commits. Not the fast path: rows go through
`executemany`. Pure Python (no Django).
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
    SYSTEM_COLUMNS,
    Capabilities,
    CheckResult,
    Fence,
    Plugin,
    Sink,
    WriteResult,
)
from connectors.exceptions import (
    ConnectorError,
    FencedError,
    TerminalError,
    TransientError,
)
from connectors.plugins.sql.common import (
    SqlWriteOptions,
    data_fields,
    is_json,
    load_write_options,
    missing_columns,
    unsupported,
    with_system_columns,
)

DEFAULT_SCHEMA = "main"


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

    def prepare(self, options: dict[str, Any], schema: pa.Schema) -> None:
        """Create the table and its (run, chunk) index, or check its columns.

        Raises:
            ConfigError: bad options or an unmappable column type.
            TerminalError: the existing table lacks columns, or the file is unusable.
            TransientError: the database stayed locked beyond the busy timeout.
        """
        opts = load_write_options(options, default_schema=DEFAULT_SCHEMA)
        qualified = f"{_quote(opts['schema'])}.{_quote(opts['table'])}"
        fields_ = data_fields(schema)
        definitions = [f"{_quote(f.name)} {sqlite_type(f)}" for f in fields_]
        definitions += [
            f"{_quote(RUN_ID_COLUMN)} INTEGER NOT NULL",
            f"{_quote(CHUNK_SEQ_COLUMN)} INTEGER NOT NULL",
            f"{_quote(SOURCE_REF_COLUMN)} TEXT",
        ]
        index = _quote(f"{opts['table']}_run_chunk_idx")
        try:
            with self._transaction(wal=True) as conn:
                existing = self._columns(conn, opts["schema"], opts["table"])
                if existing is None:
                    conn.execute(f"CREATE TABLE {qualified} ({', '.join(definitions)})")
                    conn.execute(
                        f"CREATE INDEX IF NOT EXISTS {_quote(opts['schema'])}.{index} "
                        f"ON {_quote(opts['table'])} "
                        f"({_quote(RUN_ID_COLUMN)}, {_quote(CHUNK_SEQ_COLUMN)})"
                    )
                    return
                required = [f.name for f in fields_] + list(SYSTEM_COLUMNS)
                missing = missing_columns(required, existing)
                if missing:
                    raise TerminalError(
                        f"table {opts['table']} exists but lacks column(s) "
                        f"{', '.join(missing)}: add them or write to another table"
                    )
        except ConnectorError:
            raise
        except sqlite3.Error as exc:
            raise _failure(exc, f"preparing {opts['table']}") from exc

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
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        data_fields(batch.schema)
        for field in batch.schema:
            sqlite_type(field)  # refuse unmappable types before opening the file
        table = with_system_columns(batch, run_id=run_id, chunk_seq=chunk_seq)
        columns = [
            _python_values(column, field)
            for field, column in zip(table.schema, table.columns, strict=True)
        ]
        qualified = f"{_quote(opts['schema'])}.{_quote(opts['table'])}"
        names = ", ".join(map(_quote, table.column_names))
        marks = ", ".join("?" * table.num_columns)
        # Identifiers are quoted by _quote(); values are bound parameters.
        delete = (
            f"DELETE FROM {qualified} WHERE {_quote(RUN_ID_COLUMN)} = ? "  # noqa: S608
            f"AND {_quote(CHUNK_SEQ_COLUMN)} = ?"
        )
        insert = f"INSERT INTO {qualified} ({names}) VALUES ({marks})"  # noqa: S608
        try:
            with self._transaction() as conn:
                replaced = conn.execute(delete, (run_id, chunk_seq)).rowcount
                conn.executemany(insert, zip(*columns, strict=True))
                if not fence():
                    raise FencedError(
                        f"chunk {chunk_seq} of run {run_id}: a newer attempt owns it"
                    )
        except ConnectorError:
            raise
        except sqlite3.Error as exc:
            raise _failure(exc, f"writing to {opts['table']}") from exc
        return WriteResult(rows_written=table.num_rows, details={"replaced": replaced})

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


def _failure(exc: sqlite3.Error, doing: str) -> ConnectorError:
    message = f"{doing}: {exc}"
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and (
        "locked" in text or "busy" in text or "disk i/o" in text
    ):
        return TransientError(message)
    return TerminalError(message)


class SqlitePlugin(Plugin):
    """SQLite: the local append sink, idempotent per (run, chunk)."""

    kind = "sqlite"
    title = "SQLite"
    config_schema = SqliteConfig
    capabilities = Capabilities(sink=True, exactly_once=True)
    sink_class = SqliteSink
    write_options_schema = SqlWriteOptions
