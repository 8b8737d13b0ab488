"""`postgres`: a PostgreSQL sink that appends Arrow batches with COPY, once per chunk.

A write is one transaction: an advisory lock on (table, run, chunk), a DELETE of what an
earlier attempt of the chunk wrote, a COPY of the batch (CSV written by Arrow's C++
writer), the caller's fence check, then COMMIT. Pure Python (no Django).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import marshmallow
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from marshmallow import fields, validate
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter
from psycopg_pool import ConnectionPool, PoolTimeout

from connectors.base import (
    CHUNK_SEQ_COLUMN,
    RUN_ID_COLUMN,
    SOURCE_REF_COLUMN,
    SYSTEM_COLUMNS,
    Capabilities,
    CheckResult,
    ConnectorContext,
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
from connectors.plugins.sql.common import (
    MAX_IDENTIFIER_BYTES,
    SqlWriteOptions,
    data_fields,
    is_json,
    load_write_options,
    lock_key,
    missing_columns,
    unsupported,
    with_system_columns,
)

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
APPLICATION_NAME = "dis-connector"
#: Rows per Arrow-to-CSV step inside one COPY (bounds the CSV buffer).
COPY_BATCH_ROWS = 8_192
#: Seconds a write waits for a pooled connection on top of `connect_timeout`.
POOL_WAIT_SECONDS = 20.0
_INT4_MAX = 2**31 - 1


def _validate_host(value: str) -> None:
    # A leading '/' would select a Unix socket directory and '=' smells of a DSN
    # fragment: both are refused so the config stays a plain host name or address.
    if not value or value.startswith("/") or "=" in value or value != value.strip():
        raise marshmallow.ValidationError(
            "Must be a host name or IP address (no socket path, no '=')."
        )


class PostgresConfig(marshmallow.Schema):
    """Config of a PostgreSQL connector; `password` comes from the credential."""

    host = fields.String(required=True, validate=_validate_host)
    port = fields.Integer(load_default=5432, validate=validate.Range(1, 65535))
    database = fields.String(required=True, validate=validate.Length(min=1))
    user = fields.String(required=True, validate=validate.Length(min=1))
    password = fields.String(
        load_default=None, allow_none=True, metadata={"secret": True}
    )
    sslmode = fields.String(load_default="prefer", validate=validate.OneOf(SSL_MODES))
    connect_timeout = fields.Integer(load_default=10, validate=validate.Range(1, 300))
    pool_size = fields.Integer(load_default=4, validate=validate.Range(1, 64))


def connection_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """psycopg connection keyword arguments from a loaded config (never a raw DSN).

    Raises:
        ConfigError: a host that is a socket path or carries '='.
    """
    try:
        _validate_host(str(config.get("host", "")))
    except marshmallow.ValidationError:
        raise ConfigError("host must be a host name or IP address") from None
    kwargs: dict[str, Any] = {
        "host": config["host"],
        "port": int(config.get("port", 5432)),
        "dbname": config["database"],
        "user": config["user"],
        "sslmode": config.get("sslmode", "prefer"),
        "connect_timeout": int(config.get("connect_timeout", 10)),
        "application_name": APPLICATION_NAME,
        "autocommit": True,
    }
    if config.get("password"):
        kwargs["password"] = config["password"]
    return kwargs


_POOLS: dict[str, ConnectionPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(config: dict[str, Any]) -> ConnectionPool:
    """The process's connection pool for `config`, created on first use.

    Keyed by a hash of the connection settings and the process id, so a forked worker
    never reuses its parent's sockets. Before creating a pool, one direct connection
    is made and closed: a pool would hide why it cannot connect (wrong port, unknown
    database) behind a timeout, while the direct attempt fails at once and clearly.

    Raises:
        psycopg.Error: the direct connection failed.
    """
    kwargs = connection_kwargs(config)
    size = int(config.get("pool_size", 4))
    material = json.dumps([os.getpid(), size, kwargs], sort_keys=True, default=str)
    key = hashlib.sha256(material.encode()).hexdigest()
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool.closed:
            psycopg.connect(**kwargs).close()
            pool = ConnectionPool(
                kwargs=kwargs,
                min_size=0,
                max_size=size,
                open=True,
                timeout=kwargs["connect_timeout"] + POOL_WAIT_SECONDS,
                check=ConnectionPool.check_connection,
                name=f"dis-{kwargs['host']}:{kwargs['port']}/{kwargs['dbname']}",
            )
            _POOLS[key] = pool
    return pool


def close_pools() -> None:
    """Close every pool of this process (worker shutdown, tests)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


def redact(text: str, password: str | None) -> str:
    """`text` without the password and without any `password=...` fragment."""
    if password:
        text = text.replace(password, "***")
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)


def pg_type(field: pa.Field) -> str:
    """The PostgreSQL column type for an Arrow field.

    Raises:
        ConfigError: for an Arrow type without a mapping (binary, nested...).
    """
    t = field.type
    if is_json(field):
        return "jsonb"
    if pa.types.is_dictionary(t):
        return pg_type(pa.field(field.name, t.value_type, metadata=field.metadata))
    for check, name in _SIMPLE_TYPES:
        if check(t):
            return name
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision},{t.scale})"
    raise unsupported(field, "PostgreSQL")


_SIMPLE_TYPES = (
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "text"),
    (pa.types.is_string_view, "text"),
    (pa.types.is_null, "text"),
    (pa.types.is_boolean, "boolean"),
    (lambda t: t in (pa.int8(), pa.int16(), pa.uint8()), "smallint"),
    (lambda t: t in (pa.int32(), pa.uint16()), "integer"),
    (lambda t: t in (pa.int64(), pa.uint32()), "bigint"),
    (lambda t: t == pa.uint64(), "numeric(20,0)"),
    (lambda t: t in (pa.float16(), pa.float32()), "real"),
    (lambda t: t == pa.float64(), "double precision"),
    (pa.types.is_date, "date"),
    (pa.types.is_time, "time"),
)


def csv_ready(table: pa.Table) -> pa.Table:
    """Cast the columns Arrow's CSV writer or COPY cannot take as they are.

    Dictionaries are decoded, JSON extension arrays become their strings, float16
    becomes float32, date64 becomes date32, and nanosecond timestamps are truncated
    to microseconds (PostgreSQL's precision). Timestamps with a time zone become
    naive UTC wall times: Arrow formats those ~20x faster than zoned ones, and the
    write transaction sets `TimeZone` to UTC so PostgreSQL reads them as UTC.
    """
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        t = field.type
        if pa.types.is_dictionary(t):
            column = column.cast(t.value_type)
            t = t.value_type
        if isinstance(t, pa.JsonType):
            column = pa.chunked_array(
                [chunk.storage for chunk in column.chunks], t.storage_type
            )
        elif pa.types.is_timestamp(t) and (t.tz or t.unit == "ns"):
            unit = "us" if t.unit == "ns" else t.unit
            column = column.cast(pa.timestamp(unit), safe=False)  # keeps UTC values
        elif t == pa.float16():
            column = column.cast(pa.float32())
        elif pa.types.is_date64(t):
            column = column.cast(pa.date32())
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


class PostgresSink(Sink):
    """Appends batches to a PostgreSQL table, replacing earlier attempts of a chunk."""

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self._kwargs = connection_kwargs(config)

    # -- naming --------------------------------------------------------------------

    @property
    def _target(self) -> str:
        return f"{self._kwargs['host']}:{self._kwargs['port']}/{self._kwargs['dbname']}"

    def dataset_name(self, options: dict[str, Any]) -> str:
        opts = load_write_options(options, default_schema="public")
        return f"postgres://{self._target}.{opts['schema']}.{opts['table']}"

    # -- contract --------------------------------------------------------------------

    def check(self) -> CheckResult:
        """Connect directly (not through the pool) and run `SELECT 1`."""
        user = self._kwargs["user"]
        try:
            with psycopg.connect(**self._kwargs) as conn:
                row = conn.execute(
                    "SELECT 1, current_setting('server_version')"
                ).fetchone()
        except psycopg.Error as exc:
            return CheckResult(
                False, f"cannot connect to {self._target} as {user}: {self._text(exc)}"
            )
        version = row[1] if row else "?"
        return CheckResult(
            True, f"connected to {self._target} as {user} (PostgreSQL {version})"
        )

    def prepare(self, options: dict[str, Any], schema: pa.Schema) -> None:
        """Create the table (and its (run, chunk) index) or check its columns.

        Raises:
            ConfigError: bad options, or a column type PostgreSQL cannot take.
            TerminalError: the schema is missing, the existing table lacks columns,
                or permission is denied.
            TransientError: the server cannot be reached.
        """
        opts = load_write_options(options, default_schema="public")
        schema_name, table = opts["schema"], opts["table"]
        fields_ = data_fields(schema)
        definitions = [
            sql.SQL("{} {}").format(sql.Identifier(f.name), sql.SQL(pg_type(f)))
            for f in fields_
        ]
        definitions += [
            sql.SQL("{} bigint NOT NULL").format(sql.Identifier(RUN_ID_COLUMN)),
            sql.SQL("{} integer NOT NULL").format(sql.Identifier(CHUNK_SEQ_COLUMN)),
            sql.SQL("{} text").format(sql.Identifier(SOURCE_REF_COLUMN)),
        ]
        qualified = sql.Identifier(schema_name, table)
        required = [f.name for f in fields_] + list(SYSTEM_COLUMNS)
        key = lock_key("prepare", self._kwargs["dbname"], schema_name, table)
        try:
            with self._connection() as conn, conn.transaction():
                # Serialise concurrent prepares: CREATE TABLE IF NOT EXISTS can still
                # collide on the catalog when two sessions run it at once.
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (key, -1))
                existing = self._columns(conn, schema_name, table)
                if existing is None:
                    conn.execute(
                        sql.SQL("CREATE TABLE {} ({})").format(
                            qualified, sql.SQL(", ").join(definitions)
                        )
                    )
                    conn.execute(
                        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({}, {})").format(
                            sql.Identifier(_index_name(table)),
                            qualified,
                            sql.Identifier(RUN_ID_COLUMN),
                            sql.Identifier(CHUNK_SEQ_COLUMN),
                        )
                    )
                    return
                missing = missing_columns(required, existing)
                if missing:
                    raise TerminalError(
                        f"table {schema_name}.{table} exists but lacks column(s) "
                        f"{', '.join(missing)}: add them or write to another table"
                    )
        except ConnectorError:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, f"preparing {schema_name}.{table}") from None

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

        The advisory lock's two int4 keys are a 32-bit hash of (database, schema,
        table, run_id) and chunk_seq: attempts of one chunk of one table always take
        the same lock; a hash collision between different chunks only makes them wait
        for each other, never write wrongly.

        Raises:
            FencedError: `fence()` returned False; nothing was committed.
            TransientError: connection lost, timeout, deadlock: retry.
            TerminalError: missing table/column, permission denied, bad data.
        """
        opts = load_write_options(options, default_schema="public")
        schema_name, table_name = opts["schema"], opts["table"]
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        data_fields(batch.schema)  # name checks
        for field in batch.schema:
            if field.name not in SYSTEM_COLUMNS:
                pg_type(field)  # refuse unmappable types before touching the server
        table = with_system_columns(
            csv_ready(batch), run_id=run_id, chunk_seq=chunk_seq
        )
        qualified = sql.Identifier(schema_name, table_name)
        copy = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
            qualified, sql.SQL(", ").join(map(sql.Identifier, table.column_names))
        )
        delete = sql.SQL("DELETE FROM {} WHERE {} = %s AND {} = %s").format(
            qualified, sql.Identifier(RUN_ID_COLUMN), sql.Identifier(CHUNK_SEQ_COLUMN)
        )
        key1 = lock_key(self._kwargs["dbname"], schema_name, table_name, run_id)
        key2 = chunk_seq if 0 <= chunk_seq <= _INT4_MAX else lock_key(chunk_seq)
        write_options = pacsv.WriteOptions(include_header=False)
        try:
            with (
                self._connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
            ):
                cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (key1, key2))
                cur.execute("SET LOCAL TimeZone TO 'UTC'")  # see csv_ready()
                cur.execute(delete, (run_id, chunk_seq))
                replaced = cur.rowcount
                if table.num_rows:
                    writer = QueuedLibpqWriter(cur)
                    with cur.copy(copy, writer=writer) as copier:
                        for part in table.to_batches(max_chunksize=COPY_BATCH_ROWS):
                            buffer = pa.BufferOutputStream()
                            pacsv.write_csv(part, buffer, write_options)
                            copier.write(memoryview(buffer.getvalue()))
                if not fence():
                    raise FencedError(
                        f"chunk {chunk_seq} of run {run_id}: a newer attempt owns it"
                    )
        except ConnectorError:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, f"writing to {schema_name}.{table_name}") from None
        return WriteResult(rows_written=table.num_rows, details={"replaced": replaced})

    # -- helpers -------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with shared_pool(self.config).connection() as conn:
            yield conn

    @staticmethod
    def _columns(
        conn: psycopg.Connection[Any], schema_name: str, table: str
    ) -> set[str] | None:
        """Column names of schema.table, None when there is no such table.

        Raises:
            TerminalError: when the schema itself does not exist.
        """
        row = conn.execute(
            "SELECT n.oid, c.oid FROM pg_namespace n "
            "LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %s "
            "AND c.relkind IN ('r', 'p') WHERE n.nspname = %s",
            (table, schema_name),
        ).fetchone()
        if row is None:
            raise TerminalError(f"schema {schema_name} does not exist")
        if row[1] is None:
            return None
        names = conn.execute(
            "SELECT attname FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (row[1],),
        ).fetchall()
        return {name for (name,) in names}

    def _text(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split())
        return redact(text, self._kwargs.get("password"))

    def _failure(self, exc: BaseException, doing: str) -> ConnectorError:
        """Class a driver error by what to do next; never with the password in it."""
        if isinstance(exc, PoolTimeout):
            # The pool hides why it could not connect: ask the server directly once.
            try:
                psycopg.connect(**self._kwargs).close()
            except psycopg.Error as direct:
                exc = direct
            else:
                return TransientError(
                    f"{doing}: no free connection to {self._target} in the pool"
                )
        message = f"{doing} on {self._target}: {self._text(exc)}"
        sqlstate = getattr(exc, "sqlstate", None) or ""
        text = str(exc)
        if (
            sqlstate.startswith("28")  # invalid authorization
            or sqlstate == "3D000"  # database does not exist
            or "authentication failed" in text
            or ("database" in text and "does not exist" in text)
        ):
            return TerminalError(message)
        if sqlstate == "25006":  # read-only transaction: a failover in progress
            return TransientError(message)
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return TransientError(message)
        return TerminalError(message)


def _index_name(table: str) -> str:
    name = f"{table}_run_chunk_idx"
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        digest = hashlib.blake2b(table.encode(), digest_size=6).hexdigest()
        name = f"dis_{digest}_run_chunk_idx"
    return name


class PostgresPlugin(Plugin):
    """PostgreSQL: an append sink, idempotent per (run, chunk), loaded with COPY."""

    kind = "postgres"
    title = "PostgreSQL"
    config_schema = PostgresConfig
    capabilities = Capabilities(sink=True, exactly_once=True)
    sink_class = PostgresSink
    write_options_schema = SqlWriteOptions
