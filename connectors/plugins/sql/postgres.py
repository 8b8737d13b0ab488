"""`postgres`: a PostgreSQL sink (append, upsert, replace) and source.

Every write is one transaction under an advisory lock on (table, run, chunk) with the
caller's fence checked before COMMIT. Append deletes what an earlier attempt of the
chunk wrote and COPYs the batch (binary encoded by pgpq when every column's type
allows, else CSV written by Arrow's C++ writer); upsert COPYs the chunk's last row per
key into a temporary table and merges it with `INSERT ... ON CONFLICT`; replace
appends into a staging table that `finalize()` swaps in. The source lives in
`postgres_source`. Pure Python (no Django).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pgpq
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlglot
from pgpq.encoders import (
    LargeStringEncoderBuilder,
    StringEncoderBuilder,
    StringViewEncoderBuilder,
)
from pgpq.schema import Jsonb
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter
from psycopg_pool import PoolTimeout

from connectors.base import (
    CHUNK_SEQ_COLUMN,
    RUN_ID_COLUMN,
    SOURCE_REF_COLUMN,
    SYSTEM_COLUMNS,
    Capabilities,
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
    lock_key,
    staging_table,
    unsupported,
    with_system_columns,
)
from connectors.plugins.sql.pgcommon import (
    PostgresClient,
    PostgresConfig,
    close_pools,
    connection_kwargs,
    redact,
    shared_pool,
)
from connectors.plugins.sql.postgres_source import PostgresReadOptions, PostgresSource

__all__ = [
    "PostgresConfig",
    "PostgresPlugin",
    "PostgresSink",
    "PostgresSource",
    "binary_plan",
    "close_pools",
    "connection_kwargs",
    "pg_type",
    "redact",
    "shared_pool",
]

#: Rows per Arrow-to-CSV (or binary) step inside one COPY (bounds the buffer).
COPY_BATCH_ROWS = 8_192
_INT4_MAX = 2**31 - 1
#: The temporary table an upsert stages its chunk in (dropped at commit).
UPSERT_STAGE = "dis_upsert_stage"


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

    Dictionaries are decoded, JSON extension arrays and string views become plain
    strings, float16 becomes float32, date64 becomes date32, and nanosecond
    timestamps are truncated to microseconds (PostgreSQL's precision). Timestamps
    with a time zone become naive UTC wall times: Arrow formats those ~20x faster
    than zoned ones, and the write transaction sets `TimeZone` to UTC so PostgreSQL
    reads them as UTC (binary COPY sends the same UTC microseconds either way).
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
        elif pa.types.is_string_view(t):  # Arrow's CSV writer cannot take them
            column = column.cast(pa.string())
        elif t == pa.float16():
            column = column.cast(pa.float32())
        elif pa.types.is_date64(t):
            column = column.cast(pa.date32())
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


# Built-in type OIDs (fixed across PostgreSQL versions) of the column types that
# binary COPY can fill straight from Arrow.
_BOOL, _INT8, _INT2, _INT4, _TEXT, _JSON = 16, 20, 21, 23, 25, 114
_FLOAT4, _FLOAT8, _BPCHAR, _VARCHAR, _DATE, _TIME = 700, 701, 1042, 1043, 1082, 1083
_TIMESTAMP, _TIMESTAMPTZ, _NUMERIC, _JSONB = 1114, 1184, 1700, 3802
_INTEGERS = {_INT2: pa.int16(), _INT4: pa.int32(), _INT8: pa.int64()}
_TEXTS = frozenset({_TEXT, _VARCHAR, _BPCHAR, _JSON, _JSONB})
_SAME = {
    _BOOL: pa.bool_(),
    _FLOAT4: pa.float32(),
    _FLOAT8: pa.float64(),
    _DATE: pa.date32(),
}


@dataclass(frozen=True)
class BinaryPlan:
    """How a table goes into a binary COPY: the casts it needs, its jsonb columns."""

    casts: Mapping[str, pa.DataType]
    jsonb: frozenset[str]


def binary_plan(
    schema: pa.Schema, column_types: Mapping[str, int]
) -> BinaryPlan | None:
    """Whether `schema` can be COPYed in binary into columns of these type OIDs.

    Binary COPY hands each value to its column type's receive function as it is, so
    every column must arrive in exactly that type's binary form as pgpq writes it:
    integers as the column's width (they are cast to it, and a value that does not
    fit sends the write to CSV), float32/float64 as real/double precision, bool,
    strings as text, varchar, char, json or jsonb (jsonb with its version byte),
    date32 as date, s/ms/us timestamps (zoned or not: both are microseconds, the
    zoned ones UTC) as timestamp or timestamptz, time32/us time64 as time, and
    decimal32/64/128 as numeric. Anything else (a column missing from the table,
    another type such as a domain, uuid or numeric fed by an integer, or an Arrow
    type pgpq cannot write) means CSV for the whole table, where PostgreSQL parses
    text into whatever the column is.

    Args:
        schema: the columns to COPY, as `csv_ready()` left them.
        column_types: the target's columns by name, each with its `atttypid`.

    Returns:
        The plan, or None when the table must go as CSV.
    """
    casts: dict[str, pa.DataType] = {}
    for field in schema:
        wanted = _binary_type(field.type, column_types.get(field.name))
        if wanted is None:
            return None
        if wanted != field.type:
            casts[field.name] = wanted
    jsonb = frozenset(f.name for f in schema if column_types[f.name] == _JSONB)
    return BinaryPlan(casts=casts, jsonb=jsonb)


def _binary_type(t: pa.DataType, oid: int | None) -> pa.DataType | None:
    """The Arrow type pgpq writes as column type `oid`'s binary form, from `t`."""
    if oid in _INTEGERS and pa.types.is_integer(t):
        return _INTEGERS[oid]
    if oid in _TEXTS and (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
    ):
        return t
    if oid in (_TIMESTAMP, _TIMESTAMPTZ) and pa.types.is_timestamp(t):
        return pa.timestamp("us", t.tz) if t.unit != "ns" else None
    if oid == _TIME and (pa.types.is_time32(t) or t == pa.time64("us")):
        return pa.time64("us")
    if oid == _NUMERIC and (
        pa.types.is_decimal32(t)
        or pa.types.is_decimal64(t)
        or pa.types.is_decimal128(t)
    ):
        return t
    if oid in _SAME and _SAME[oid] == t:
        return t
    return None


class PostgresSink(PostgresClient, Sink):
    """Writes batches to a PostgreSQL table: append, upsert by key, or replace."""

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self._kwargs = connection_kwargs(config)

    def dataset_name(self, options: dict[str, Any]) -> str:
        opts = load_write_options(options, default_schema="public")
        return f"postgres://{self._target}.{opts['schema']}.{opts['table']}"

    # -- prepare -------------------------------------------------------------------

    def prepare(
        self,
        options: dict[str, Any],
        schema: pa.Schema,
        *,
        run_id: int | None = None,
    ) -> None:
        """Create the target (or check and evolve it) for `schema`.

        Append and upsert write to the table named in the options; upsert also makes
        sure a unique index on `key` exists (creating it when missing). Replace
        creates the run's staging table `<table>__dis_run_<run_id>` instead.
        An existing table that lacks data columns gets them added when the options
        say `evolve: add_columns`; otherwise (and always for missing system
        columns) `prepare` fails naming them.

        Args:
            options: the pipeline's write options.
            schema: the data columns to store (system columns are left out).
            run_id: the run being prepared; required for `replace`.

        Raises:
            ConfigError: bad options, a key not in the data, or a column type
                PostgreSQL cannot take.
            TerminalError: the schema is missing, the existing table lacks columns,
                duplicate keys prevent the unique index, or permission is denied.
            TransientError: the server cannot be reached.
        """
        opts = load_write_options(options, default_schema="public")
        schema_name = opts["schema"]
        table = self._table_for(opts, run_id)
        fields_ = data_fields(schema)
        types = {f.name: pg_type(f) for f in fields_}
        if opts["write_mode"] == "upsert":
            check_key_columns(opts["key"], list(types))
        definitions = [
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(type_))
            for name, type_ in types.items()
        ]
        definitions += [
            sql.SQL("{} bigint NOT NULL").format(sql.Identifier(RUN_ID_COLUMN)),
            sql.SQL("{} integer NOT NULL").format(sql.Identifier(CHUNK_SEQ_COLUMN)),
            sql.SQL("{} text").format(sql.Identifier(SOURCE_REF_COLUMN)),
        ]
        qualified = sql.Identifier(schema_name, table)
        key = lock_key("prepare", self._kwargs["dbname"], schema_name, opts["table"])
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
                            sql.Identifier(index_name(table, "run_chunk_idx")),
                            qualified,
                            sql.Identifier(RUN_ID_COLUMN),
                            sql.Identifier(CHUNK_SEQ_COLUMN),
                        )
                    )
                else:
                    self._evolve(conn, opts, table, types, existing)
                if opts["write_mode"] == "upsert":
                    self._ensure_unique_key(conn, schema_name, table, opts["key"])
        except ConnectorError:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, f"preparing {schema_name}.{table}") from None

    @staticmethod
    def _evolve(
        conn: psycopg.Connection[Any],
        opts: dict[str, Any],
        table: str,
        types: dict[str, str],
        existing: set[str],
    ) -> None:
        """Add the missing data columns when allowed, else fail naming them."""
        label = f"{opts['schema']}.{table}"
        for name in columns_to_add(opts, types, existing, label):
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    sql.Identifier(opts["schema"], table),
                    sql.Identifier(name),
                    sql.SQL(types[name]),
                )
            )

    @staticmethod
    def _ensure_unique_key(
        conn: psycopg.Connection[Any],
        schema_name: str,
        table: str,
        key: list[str],
    ) -> None:
        """Create a unique index on `key` unless one on exactly those columns exists."""
        qualified = sql.Identifier(schema_name, table)
        found = conn.execute(
            "SELECT 1 FROM pg_index i "
            "WHERE i.indrelid = %s::regclass AND i.indisunique "
            "AND i.indpred IS NULL AND i.indexprs IS NULL "
            "AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text) "
            "     FROM unnest(i.indkey) AS k(attnum) JOIN pg_attribute a "
            "     ON a.attrelid = i.indrelid AND a.attnum = k.attnum) = %s::text[]",
            (qualified.as_string(conn), sorted(key)),
        ).fetchone()
        if found:
            return
        conn.execute(
            sql.SQL("CREATE UNIQUE INDEX {} ON {} ({})").format(
                sql.Identifier(index_name(table, "key_idx")),
                qualified,
                sql.SQL(", ").join(map(sql.Identifier, key)),
            )
        )

    # -- write ---------------------------------------------------------------------

    def write(
        self,
        options: dict[str, Any],
        batch: pa.Table,
        *,
        run_id: int,
        chunk_seq: int,
        fence: Fence,
    ) -> WriteResult:
        """Write `batch` for (run_id, chunk_seq) in one transaction, idempotently.

        Append (and replace, into its staging table) first deletes the rows an
        earlier attempt of the chunk wrote. Upsert keeps the last row of each key
        within the batch and merges those into the table in key order; rows from
        before the run stay. The advisory lock's two int4 keys are a 32-bit hash of
        (database, schema, table, run_id) and chunk_seq: attempts of one chunk of one
        table always take the same lock; a hash collision between different chunks
        only makes them wait for each other, never write wrongly.

        Returns:
            `rows_written` (rows appended or upserted) and `details`: `replaced`
            (rows of an earlier attempt deleted, or for upsert rows updated) and,
            for upsert, `inserted` and `updated`.

        Raises:
            FencedError: `fence()` returned False; nothing was committed.
            TransientError: connection lost, timeout, deadlock: retry.
            TerminalError: missing table/column, permission denied, bad data, a
                NULL key in an upsert.
        """
        opts = load_write_options(options, default_schema="public")
        schema_name, table_name = opts["schema"], self._table_for(opts, run_id)
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        data_fields(batch.schema)  # name checks
        for field in batch.schema:
            if field.name not in SYSTEM_COLUMNS:
                pg_type(field)  # refuse unmappable types before touching the server
        upsert = opts["write_mode"] == "upsert"
        if upsert:
            check_key_columns(opts["key"], batch.column_names)
            batch = last_row_per_key(batch, opts["key"])
        table = with_system_columns(
            csv_ready(batch), run_id=run_id, chunk_seq=chunk_seq
        )
        key1 = lock_key(self._kwargs["dbname"], schema_name, opts["table"], run_id)
        key2 = chunk_seq if 0 <= chunk_seq <= _INT4_MAX else lock_key(chunk_seq)
        details: dict[str, Any]
        try:
            with (
                self._connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
            ):
                cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (key1, key2))
                cur.execute("SET LOCAL TimeZone TO 'UTC'")  # see csv_ready()
                if upsert:
                    details = _upsert(cur, schema_name, table_name, table, opts["key"])
                    written = details["inserted"] + details["updated"]
                else:
                    delete = sql.SQL("DELETE FROM {} WHERE {} = %s AND {} = %s").format(
                        sql.Identifier(schema_name, table_name),
                        sql.Identifier(RUN_ID_COLUMN),
                        sql.Identifier(CHUNK_SEQ_COLUMN),
                    )
                    cur.execute(delete, (run_id, chunk_seq))
                    details = {"replaced": cur.rowcount}
                    _copy(cur, sql.Identifier(schema_name, table_name), table)
                    written = table.num_rows
                if not fence():
                    raise FencedError(
                        f"chunk {chunk_seq} of run {run_id}: a newer attempt owns it"
                    )
        except ConnectorError:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, f"writing to {schema_name}.{table_name}") from None
        return WriteResult(rows_written=written, details=details)

    # -- finalize ------------------------------------------------------------------

    def finalize(self, options: dict[str, Any], *, run_id: int) -> None:
        """For `replace`: swap the run's staging table in, atomically.

        One transaction renames the current table away, renames the staging table
        to the target name, drops the old table and renames the staging table's
        index. Calling it again (the staging table is gone, the target is there)
        does nothing. Append and upsert have nothing to finalize.

        Raises:
            TerminalError: neither the staging table nor the target exists, or the
                old table cannot be dropped (a view depends on it...).
            TransientError: the server cannot be reached.
        """
        opts = load_write_options(options, default_schema="public")
        if opts["write_mode"] != "replace":
            return
        schema_name, table = opts["schema"], opts["table"]
        staging = staging_table(table, run_id)
        old = staging_table(f"{table}__dis_old", run_id)
        key = lock_key("prepare", self._kwargs["dbname"], schema_name, table)
        rename = sql.SQL("ALTER TABLE {} RENAME TO {}")
        try:
            with self._connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (key, -1))
                has_staging = self._columns(conn, schema_name, staging) is not None
                has_target = self._columns(conn, schema_name, table) is not None
                if not has_staging:
                    if has_target:
                        return  # swapped by an earlier call
                    raise TerminalError(
                        f"replace of {schema_name}.{table}: staging table {staging} "
                        "does not exist (was the run prepared?)"
                    )
                if has_target:
                    conn.execute(
                        rename.format(
                            sql.Identifier(schema_name, table), sql.Identifier(old)
                        )
                    )
                conn.execute(
                    rename.format(
                        sql.Identifier(schema_name, staging), sql.Identifier(table)
                    )
                )
                if has_target:
                    conn.execute(
                        sql.SQL("DROP TABLE {}").format(
                            sql.Identifier(schema_name, old)
                        )
                    )
                conn.execute(
                    sql.SQL("ALTER INDEX IF EXISTS {} RENAME TO {}").format(
                        sql.Identifier(
                            schema_name, index_name(staging, "run_chunk_idx")
                        ),
                        sql.Identifier(index_name(table, "run_chunk_idx")),
                    )
                )
        except ConnectorError:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, f"swapping in {schema_name}.{table}") from None

    # -- backfill ------------------------------------------------------------------

    def backfill(self, options: dict[str, Any], values: pa.Table) -> WriteResult:
        """Add `values`' data columns to the table and set them on written rows.

        One transaction: `ALTER TABLE ... ADD COLUMN IF NOT EXISTS` per data column,
        COPY `values` into a temporary table, then `UPDATE ... FROM` it matching
        `_run_id` and `_source_ref`. A row rewritten since by another run (upsert)
        no longer matches: it keeps the newer values.

        Returns:
            `rows_written`: rows updated.

        Raises:
            ConfigError: bad options, replace mode (its table is swapped per run),
                or a column type PostgreSQL cannot take.
            TerminalError: the table does not exist, permission denied, bad data.
            TransientError: the server cannot be reached.
        """
        opts = load_write_options(options, default_schema="public")
        if opts["write_mode"] == "replace":
            raise ConfigError("back-fill needs append or upsert (replace swaps tables)")
        fields_ = data_fields(values.schema)
        types = {f.name: pg_type(f) for f in fields_}
        if not types or values.num_rows == 0:
            return WriteResult(rows_written=0)
        schema_name, table_name = opts["schema"], opts["table"]
        target = sql.Identifier(schema_name, table_name)
        stage = sql.Identifier("dis_backfill_stage")
        keys = [RUN_ID_COLUMN, SOURCE_REF_COLUMN]
        table = csv_ready(values.select([*keys, *types]))
        lock = lock_key("prepare", self._kwargs["dbname"], schema_name, table_name)
        try:
            with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (lock, -1))
                cur.execute("SET LOCAL TimeZone TO 'UTC'")  # see csv_ready()
                if self._columns(conn, schema_name, table_name) is None:
                    raise TerminalError(f"table {schema_name}.{table_name} is missing")
                definitions = [
                    sql.SQL("{} bigint").format(sql.Identifier(RUN_ID_COLUMN)),
                    sql.SQL("{} text").format(sql.Identifier(SOURCE_REF_COLUMN)),
                ]
                for name, type_ in types.items():
                    cur.execute(
                        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                            target, sql.Identifier(name), sql.SQL(type_)
                        )
                    )
                    definitions.append(
                        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(type_))
                    )
                cur.execute(
                    sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(
                        stage, sql.SQL(", ").join(definitions)
                    )
                )
                _copy(cur, stage, table)
                cur.execute(
                    sql.SQL("UPDATE {} AS t SET {} FROM {} AS s WHERE {}").format(
                        target,
                        sql.SQL(", ").join(
                            sql.SQL("{} = s.{}").format(
                                sql.Identifier(n), sql.Identifier(n)
                            )
                            for n in types
                        ),
                        stage,
                        sql.SQL(" AND ").join(
                            sql.SQL("t.{} = s.{}").format(
                                sql.Identifier(k), sql.Identifier(k)
                            )
                            for k in keys
                        ),
                    )
                )
                updated = cur.rowcount
        except ConnectorError:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(
                exc, f"back-filling {schema_name}.{table_name}"
            ) from None
        return WriteResult(rows_written=updated)

    # -- helpers -------------------------------------------------------------------

    @staticmethod
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


def _copy(cur: psycopg.Cursor[Any], target: sql.Composable, table: pa.Table) -> None:
    """COPY `table` into `target`: binary when `binary_plan()` allows, else CSV.

    Binary costs PostgreSQL less CPU to parse than CSV, and pgpq encodes it faster
    than Arrow writes CSV. The target's column types are read in the same
    transaction (one catalog query), so a table created by someone else with other
    types still loads (as CSV when they do not match).
    """
    if not table.num_rows:
        return
    plan = binary_plan(table.schema, _column_types(cur, target))
    binary = None if plan is None else _cast_for_binary(table, plan)
    if plan is None or binary is None:
        _copy_csv(cur, target, table)
    else:
        _copy_binary(cur, target, binary, plan.jsonb)


def _copy_csv(
    cur: psycopg.Cursor[Any], target: sql.Composable, table: pa.Table
) -> None:
    """COPY `table` into `target` as CSV written by Arrow, piece by piece."""
    copy = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
        target, sql.SQL(", ").join(map(sql.Identifier, table.column_names))
    )
    write_options = pacsv.WriteOptions(include_header=False)
    writer = QueuedLibpqWriter(cur)
    with cur.copy(copy, writer=writer) as copier:
        for part in table.to_batches(max_chunksize=COPY_BATCH_ROWS):
            buffer = pa.BufferOutputStream()
            pacsv.write_csv(part, buffer, write_options)
            copier.write(memoryview(buffer.getvalue()))


def _copy_binary(
    cur: psycopg.Cursor[Any],
    target: sql.Composable,
    table: pa.Table,
    jsonb: frozenset[str],
) -> None:
    """COPY `table` into `target` in binary encoded by pgpq, piece by piece.

    Raises:
        TerminalError: a value pgpq cannot encode (a date or timestamp outside
            PostgreSQL's range, which the server refuses from CSV too).
    """
    copy = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT binary)").format(
        target, sql.SQL(", ").join(map(sql.Identifier, table.column_names))
    )
    encoder = _binary_encoder(table.schema, jsonb)
    writer = QueuedLibpqWriter(cur)
    with cur.copy(copy, writer=writer) as copier:
        copier.write(encoder.write_header())
        for part in table.to_batches(max_chunksize=COPY_BATCH_ROWS):
            try:
                copier.write(encoder.write_batch(part))
            except ValueError as exc:
                name = target.as_string(cur.connection)
                raise TerminalError(f"binary COPY into {name}: {exc}") from None
        copier.write(encoder.finish())


def _column_types(cur: psycopg.Cursor[Any], target: sql.Composable) -> dict[str, int]:
    """The type OID of each column of `target` (a table visible in this session)."""
    rows = cur.execute(
        "SELECT attname::text, atttypid::int FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (target.as_string(cur.connection),),
    ).fetchall()
    return dict(rows)


def _cast_for_binary(table: pa.Table, plan: BinaryPlan) -> pa.Table | None:
    """`table` with the plan's casts applied; None when a value does not fit."""
    for name, type_ in plan.casts.items():
        index = table.schema.get_field_index(name)
        try:
            column = table.column(index).cast(type_)  # safe: no overflow, no loss
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        table = table.set_column(index, pa.field(name, type_), column)
    return table


def _binary_encoder(
    schema: pa.Schema, jsonb: frozenset[str]
) -> pgpq.ArrowToPostgresBinaryEncoder:
    """pgpq's encoder for `schema`; the `jsonb` columns get jsonb's version byte."""
    if not jsonb:
        return pgpq.ArrowToPostgresBinaryEncoder(schema)
    infer = pgpq.ArrowToPostgresBinaryEncoder.infer_encoder
    builders = {
        f.name: _JSONB_BUILDERS[f.type].new_with_output(f, Jsonb())
        if f.name in jsonb
        else infer(f)
        for f in schema
    }
    return pgpq.ArrowToPostgresBinaryEncoder.new_with_encoders(schema, builders)


_JSONB_BUILDERS = {
    pa.string(): StringEncoderBuilder,
    pa.large_string(): LargeStringEncoderBuilder,
    pa.string_view(): StringViewEncoderBuilder,
}


def _upsert(
    cur: psycopg.Cursor[Any],
    schema_name: str,
    table_name: str,
    table: pa.Table,
    key: list[str],
) -> dict[str, int]:
    """COPY `table` (one row per key) into a temporary table and merge it."""
    target = sql.Identifier(schema_name, table_name)
    stage = sql.Identifier(UPSERT_STAGE)
    columns = sql.SQL(", ").join(map(sql.Identifier, table.column_names))
    keys = sql.SQL(", ").join(map(sql.Identifier, key))
    cur.execute(
        sql.SQL(
            "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA"
        ).format(stage, columns, target)
    )
    _copy(cur, stage, table)
    updates = sql.SQL(", ").join(
        sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(n), sql.Identifier(n))
        for n in table.column_names
        if n not in key
    )
    # Rows go in key order so concurrent upserts lock shared keys in one order.
    cur.execute(
        sql.SQL(
            "WITH merged AS (INSERT INTO {} AS t ({}) SELECT {} FROM {} "
            "ORDER BY {} ON CONFLICT ({}) DO UPDATE SET {} "
            "RETURNING (t.xmax = 0) AS inserted) "
            "SELECT count(*) FILTER (WHERE inserted), count(*) FROM merged"
        ).format(target, columns, columns, stage, keys, keys, updates)
    )
    row = cur.fetchone()
    inserted, total = (int(row[0]), int(row[1])) if row else (0, 0)
    return {
        "inserted": inserted,
        "updated": total - inserted,
        "replaced": total - inserted,
    }


class PostgresPlugin(Plugin):
    """PostgreSQL: a chunked, incremental source and an exactly-once sink."""

    kind = "postgres"
    title = "PostgreSQL"
    config_schema = PostgresConfig
    capabilities = Capabilities(
        source=True,
        sink=True,
        incremental=True,
        upsert=True,
        discover=True,
        chunkable=True,
        exactly_once=True,
        backfill=True,
    )
    source_class = PostgresSource
    sink_class = PostgresSink
    read_options_schema = PostgresReadOptions
    write_options_schema = SqlWriteOptions

    @classmethod
    def data_hosts(cls, config: dict[str, Any]) -> list[tuple[str, str, int]]:
        return [("host", str(config["host"]), int(config.get("port") or 5432))]

    @classmethod
    def run_action(
        cls,
        config: dict[str, Any],
        action: str,
        params: dict[str, Any],
        context: ConnectorContext | None = None,
    ) -> dict[str, Any]:
        """`sql`: one statement (`statement`, positional `params`) in a transaction."""
        if action != "sql":
            return super().run_action(config, action, params, context)
        cls.check_data_hosts(config, context)
        return SqlAction(config).run(params)


class SqlAction(PostgresClient):
    """A workflow's `sql` node: one parameterised statement, in its own transaction.

    The statement is an operator's (e.g. `REFRESH MATERIALIZED VIEW`, `CALL`): any
    single statement is allowed, values go in `params`, never into the text.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._kwargs = connection_kwargs(config)

    def run(self, params: dict[str, Any]) -> dict[str, Any]:
        statement = params.get("statement")
        if not isinstance(statement, str) or not statement.strip():
            raise ConfigError("sql action: a statement is required")
        if len([s for s in sqlglot.parse(statement, read="postgres") if s]) != 1:
            raise ConfigError("sql action: exactly one statement")
        values = params.get("params") or []
        if not isinstance(values, list):
            raise ConfigError("sql action: params must be a list")
        try:
            with self._connection() as conn, conn.transaction():
                cursor = conn.execute(statement, values)
                return {"rowcount": cursor.rowcount}
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, "running the sql action") from None
