"""The `postgres` source: a table or a read-only query, in key-range chunks.

`plan()` scans the keys once (a window over the key order) and cuts a chunk every
`chunk_rows` rows; `read()` streams one chunk with `COPY (SELECT ...) TO STDOUT` in
CSV, parsed into Arrow record batches by Arrow's C++ CSV reader (no Python object per
row). Incremental reads compare `(cursor, key)` rows so ties on the cursor value are
neither skipped nor read twice; a consistent full load reads every chunk from one
snapshot exported by `export_snapshot()`. Pure Python (no Django).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import io
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import marshmallow
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from marshmallow import fields, validate, validates_schema
from psycopg import sql
from psycopg_pool import PoolTimeout

from connectors.base import (
    SOURCE_REF_COLUMN,
    CheckResult,
    Chunk,
    ConnectorContext,
    Source,
    StreamInfo,
)
from connectors.exceptions import (
    ConfigError,
    ConnectorError,
    TerminalError,
    TransientError,
)
from connectors.plugins.sql.common import (
    JSON_METADATA_KEY,
    JSON_METADATA_VALUE,
    KeyList,
    source_refs,
)
from connectors.plugins.sql.pgcommon import PostgresClient, connection_kwargs
from connectors.plugins.sql.queries import read_only_query

#: Bytes of CSV Arrow parses into one record batch.
READ_BLOCK_BYTES = 4 << 20
#: Batch schema metadata naming the cursor and key columns (for `checkpoint`).
CURSOR_METADATA_KEY = b"dis.cursor"
KEY_METADATA_KEY = b"dis.key"
_SNAPSHOT_ID = re.compile(r"^[0-9A-F]+-[0-9A-F]+(-[0-9]+)?$")
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")


class SnapshotGoneError(TransientError):
    """The exported snapshot a chunk reads from no longer exists.

    It lives only while the exporting transaction is open; once that ended the
    chunk cannot be read consistently any more. Retrying does not bring it back:
    the run must be planned again (with a new snapshot).
    """


def _identifier(value: str) -> None:
    if not value or len(value.encode()) > 63 or "\x00" in value:
        raise marshmallow.ValidationError("Must be 1 to 63 bytes, without NUL.")


class CursorPosition(marshmallow.Schema):
    """A saved incremental position: the cursor value and the key of that row."""

    cursor = fields.Raw(required=True, allow_none=False)
    key = fields.List(fields.Raw(allow_none=False), required=True)


class ScopeSchema(marshmallow.Schema):
    """Rows a backfill re-reads: `cursor_from <= cursor < cursor_to`, or `keys`."""

    cursor_from = fields.Raw(load_default=None)
    cursor_to = fields.Raw(load_default=None)
    keys = fields.List(
        fields.List(fields.Raw(allow_none=False)),
        load_default=None,
        validate=validate.Length(min=1, max=100_000),
    )

    @validates_schema
    def _one_kind(self, data: dict[str, Any], **kwargs: Any) -> None:
        ranged = (
            data.get("cursor_from") is not None or data.get("cursor_to") is not None
        )
        if ranged == bool(data.get("keys")):
            raise marshmallow.ValidationError(
                "Give a cursor range (cursor_from/cursor_to) or keys.",
                field_name="scope",
            )


class PostgresReadOptions(marshmallow.Schema):
    """A pipeline's read options for the `postgres` source.

    Either `table` (in `schema`) or `query` (one read-only SELECT). `key` names the
    columns chunks are cut on (default: the table's primary key; required for a
    query). `cursor` turns on incremental reads, `cursor_after` is where the last
    successful run stopped.
    """

    table = fields.String(load_default=None, validate=_identifier)
    schema = fields.String(load_default="public", validate=_identifier)
    query = fields.String(load_default=None)
    key = KeyList(load_default=None)
    cursor = fields.String(load_default=None, validate=_identifier)
    cursor_after = fields.Nested(CursorPosition, load_default=None, allow_none=True)
    #: A backfill's scope: a half-open range of the cursor, or a list of keys.
    scope = fields.Nested(ScopeSchema, load_default=None, allow_none=True)

    @validates_schema
    def _one_relation(self, data: dict[str, Any], **kwargs: Any) -> None:
        if bool(data.get("table")) == bool(data.get("query")):
            raise marshmallow.ValidationError(
                "Give either a table or a query.", field_name="table"
            )
        if data.get("query"):
            try:
                read_only_query(data["query"], "postgres")
            except ConfigError as exc:
                raise marshmallow.ValidationError(
                    str(exc), field_name="query"
                ) from None
            if not data.get("key"):
                raise marshmallow.ValidationError(
                    "Required with a query (a query has no primary key).",
                    field_name="key",
                )
        if data.get("cursor_after") and not data.get("cursor"):
            raise marshmallow.ValidationError(
                "Needs a cursor column.", field_name="cursor_after"
            )
        scope = data.get("scope") or {}
        if (
            scope.get("cursor_from") is not None or scope.get("cursor_to") is not None
        ) and not data.get("cursor"):
            raise marshmallow.ValidationError(
                "A cursor range needs a cursor column.", field_name="scope"
            )


def load_read_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate a `postgres` source's read options.

    Raises:
        ConfigError: with `.errors` from marshmallow.
    """
    try:
        loaded: dict[str, Any] = PostgresReadOptions().load(options)
    except marshmallow.ValidationError as exc:
        error = ConfigError(f"invalid read options: {exc.normalized_messages()}")
        error.errors = exc.normalized_messages()
        raise error from None
    return loaded


def arrow_type(oid: int, precision: int | None, scale: int | None) -> pa.DataType:
    """The Arrow type a PostgreSQL column of type `oid` is read as.

    Types without an exact Arrow counterpart (intervals, arrays, bytea, ranges,
    numerics without a declared precision...) are read as their text form.
    """
    if oid == 1700:
        if precision and scale is not None and precision <= 76:
            return (
                pa.decimal128(precision, scale)
                if precision <= 38
                else (pa.decimal256(precision, scale))
            )
        return pa.string()
    return _OID_TYPES.get(oid, pa.string())


_OID_TYPES: dict[int, pa.DataType] = {
    16: pa.bool_(),
    20: pa.int64(),
    21: pa.int16(),
    23: pa.int32(),
    26: pa.int64(),
    700: pa.float32(),
    701: pa.float64(),
    1082: pa.date32(),
    1083: pa.time64("us"),
    1114: pa.timestamp("us"),
    1184: pa.timestamp("us", "UTC"),
}
_JSON_OIDS = (114, 3802)


def _field(name: str, oid: int, precision: int | None, scale: int | None) -> pa.Field:
    metadata = {JSON_METADATA_KEY: JSON_METADATA_VALUE} if oid in _JSON_OIDS else None
    return pa.field(name, arrow_type(oid, precision, scale), metadata=metadata)


def jsonable(value: Any) -> Any:
    """A key or cursor value as JSON that PostgreSQL reads back to the same value.

    Numbers stay numbers (decimals become strings, so nothing is rounded); times
    become ISO-8601 strings, which PostgreSQL casts back to the column's type.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    return str(value)


def _row(values: Sequence[Any]) -> sql.Composable:
    return sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Literal, values)))


class PostgresSource(PostgresClient, Source):
    """Reads a PostgreSQL table or read-only query as Arrow batches, by key range.

    Each read holds one pooled connection, so the pool's size (`pool_size`) bounds
    how many chunks of this connector a worker process reads at once.
    """

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self._kwargs = connection_kwargs(config)

    # -- contract --------------------------------------------------------------------

    def check(self) -> CheckResult:
        """Connect directly (not through the pool) and run `SELECT 1`."""
        return PostgresClient.check(self)

    def discover(self) -> list[StreamInfo]:
        """Every table and view outside the system schemas, as `schema.table`.

        Raises:
            TransientError | TerminalError: the catalog cannot be read.
        """
        query = (
            "SELECT n.nspname, c.relname, a.attname, a.atttypid, "
            "information_schema._pg_numeric_precision(a.atttypid, a.atttypmod), "
            "information_schema._pg_numeric_scale(a.atttypid, a.atttypmod) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = c.oid "
            "AND a.attnum > 0 AND NOT a.attisdropped "
            "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') "
            "AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_temp\\_%%' "
            "AND has_table_privilege(c.oid, 'SELECT') "
            "ORDER BY n.nspname, c.relname, a.attnum"
        )
        try:
            with self._connection() as conn:
                rows = conn.execute(query, (list(_SYSTEM_SCHEMAS),)).fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, "listing tables") from None
        streams: dict[str, list[pa.Field]] = {}
        for schema, table, column, oid, precision, scale in rows:
            streams.setdefault(f"{schema}.{table}", []).append(
                _field(column, oid, precision, scale)
            )
        return [StreamInfo(name, pa.schema(f)) for name, f in streams.items()]

    def plan(
        self,
        options: dict[str, Any],
        *,
        chunk_rows: int,
        snapshot: str | None = None,
    ) -> Iterator[Chunk]:
        """Cut the read into key ranges of about `chunk_rows` rows.

        One ordered scan of the keys (a `row_number()` window) picks every
        `chunk_rows`-th key as a boundary; chunk n reads `lower < key <= upper`
        (`None` = unbounded). Incremental reads first fix where this run stops:
        the greatest `(cursor, key)` now (`cursor_upto`); every chunk reads
        `cursor_after < (cursor, key) <= cursor_upto`, so rows committed later are
        left to the next run, and `cursor_upto` is the position to save once the
        run succeeded. No new row plans no chunk.

        Args:
            options: the read options (see `PostgresReadOptions`).
            chunk_rows: rows per chunk.
            snapshot: an id from `export_snapshot()`; the plan and every chunk
                then see the database as of that snapshot.

        Yields:
            Chunks with spec `{"lower", "upper", "snapshot", "key", "cursor",
            "cursor_after", "cursor_upto"}` (all JSON).

        Raises:
            ConfigError: bad options, a table without primary key and no `key`.
            TerminalError: missing table or column, permission denied.
            SnapshotGoneError: the snapshot no longer exists.
            TransientError: the server cannot be reached.
        """
        opts = load_read_options(options)
        if chunk_rows < 1:
            raise ConfigError("chunk_rows must be at least 1")
        _check_snapshot(snapshot)
        try:
            with self._read_transaction(snapshot) as conn:
                relation = self._relation(opts)
                key = opts["key"] or self._primary_key(conn, opts)
                cursor = opts["cursor"]
                after = _position(opts["cursor_after"], key, cursor)
                upto = None
                if cursor:
                    upto = self._upto(conn, relation, cursor, key, after)
                    if upto is None:
                        return
                where = _incremental_filter(cursor, key, after, upto)
                where += _scope_filter(cursor, key, opts["scope"])
                bounds = self._boundaries(conn, relation, key, where, chunk_rows)
                last = bounds[-1] if bounds else None
                if self._has_rows_after(conn, relation, key, where, last):
                    bounds.append(None)
        except ConnectorError:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, f"planning {self._name(opts)}") from None
        lower: list[Any] | None = None
        for seq, upper in enumerate(bounds):
            yield Chunk(
                seq,
                {
                    "lower": lower,
                    "upper": upper,
                    "snapshot": snapshot,
                    "key": key,
                    "cursor": cursor,
                    "cursor_after": after,
                    "cursor_upto": upto,
                    "scope": opts["scope"],
                },
            )
            lower = upper

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        """Stream the chunk's rows as Arrow record batches, ordered by key.

        Reads run in a READ ONLY transaction; with a snapshot in the chunk, first
        `SET TRANSACTION ISOLATION LEVEL REPEATABLE READ` and
        `SET TRANSACTION SNAPSHOT`. Each batch carries `_source_ref`
        (`<schema>.<table>#<key>`, or `query#<key>`; composite keys joined by `,`)
        and, in its schema metadata, the cursor and key column names for
        `checkpoint()`.

        Raises:
            SnapshotGoneError: the chunk's snapshot no longer exists.
            TerminalError: missing table or column, permission denied, a value
                Arrow cannot parse.
            TransientError: connection lost, timeout.
        """
        opts = load_read_options(options)
        spec = chunk.spec
        key: list[str] = list(spec["key"])
        cursor: str | None = spec.get("cursor")
        snapshot = spec.get("snapshot")
        _check_snapshot(snapshot)
        relation = self._relation(opts)
        filters = _incremental_filter(
            cursor, key, spec.get("cursor_after"), spec.get("cursor_upto")
        )
        filters += _scope_filter(cursor, key, spec.get("scope"))
        keys = _row_of(key)
        if spec.get("lower") is not None:
            filters.append(sql.SQL("{} > {}").format(keys, _row(spec["lower"])))
        if spec.get("upper") is not None:
            filters.append(sql.SQL("{} <= {}").format(keys, _row(spec["upper"])))
        where = sql.SQL(" AND ").join(filters) if filters else sql.SQL("true")
        order = sql.SQL(", ").join(map(sql.Identifier, key))
        metadata = {
            CURSOR_METADATA_KEY: (cursor or "").encode(),
            KEY_METADATA_KEY: json.dumps(key).encode(),
        }
        prefix = self._name(opts)
        try:
            with self._read_transaction(snapshot) as conn, conn.cursor() as cur:
                cur.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(relation))
                description = cur.description or []
                schema = pa.schema(
                    _field(c.name, c.type_code, c.precision, c.scale)
                    for c in description
                )
                missing = [k for k in key if k not in schema.names]
                if missing:
                    raise TerminalError(
                        f"{prefix}: key column(s) {', '.join(missing)} not found"
                    )
                copy = sql.SQL(
                    "COPY (SELECT * FROM {} WHERE {} ORDER BY {}) TO STDOUT "
                    "WITH (FORMAT csv)"
                ).format(relation, where, order)
                with cur.copy(copy) as copier:
                    for batch in _parse_csv(_CopyStream(copier), schema):
                        refs = source_refs(prefix, batch, key)
                        names = [
                            n for n in batch.schema.names if n != SOURCE_REF_COLUMN
                        ]
                        columns = [batch.column(n) for n in names]
                        fields_ = [batch.schema.field(n) for n in names]
                        out = pa.RecordBatch.from_arrays(
                            [*columns, refs],
                            schema=pa.schema(
                                [*fields_, pa.field(SOURCE_REF_COLUMN, pa.string())],
                                metadata=metadata,
                            ),
                        )
                        yield out
        except ConnectorError:
            raise
        except pa.ArrowInvalid as exc:
            raise TerminalError(f"reading {prefix}: {exc}") from None
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, f"reading {prefix}") from None

    # -- snapshots and checkpoints -----------------------------------------------------

    @contextmanager
    def export_snapshot(self) -> Iterator[str]:
        """Open a REPEATABLE READ transaction and export its snapshot.

        The snapshot id can be passed to `plan(..., snapshot=...)`; it stays valid
        while this context is open (one dedicated connection, outside the pool),
        so keep it open until every chunk of the run has been read.

        Yields:
            The snapshot id (e.g. `00000003-0000001B-1`).

        Raises:
            TransientError | TerminalError: the server cannot be reached or refuses.
        """
        try:
            conn = psycopg.connect(**self._kwargs)
        except psycopg.Error as exc:
            raise self._failure(exc, "exporting a snapshot") from None
        try:
            try:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                row = conn.execute("SELECT pg_export_snapshot()").fetchone()
            except psycopg.Error as exc:
                raise self._failure(exc, "exporting a snapshot") from None
            yield str(row[0]) if row else ""
        finally:
            # End the transaction before closing: the snapshot is gone the moment
            # this returns (a bare close lets the server end it a little later).
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            conn.close()

    @staticmethod
    def checkpoint(
        batch: pa.RecordBatch | pa.Table, options: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The greatest `(cursor, key)` of a batch `read()` yielded, as JSON.

        The result has the shape of the `cursor_after` option. Rows whose cursor
        is NULL are left out (incremental reads never read them). Text keys are
        compared by code point here, which may differ from the database's
        collation: the position to save after a successful run is the plan's
        `cursor_upto` (on every chunk), which the database computed.

        Args:
            batch: a batch from `read()`.
            options: the read options; needed only when the batch lost the
                schema metadata `read()` put on it.

        Returns:
            `{"cursor": value, "key": [values]}`, or None for a batch without rows
            or a read that is not incremental.
        """
        metadata = batch.schema.metadata or {}
        cursor = (metadata.get(CURSOR_METADATA_KEY) or b"").decode()
        key = json.loads(metadata.get(KEY_METADATA_KEY) or b"[]")
        if options:
            cursor = options.get("cursor") or cursor
            key = list(options.get("key") or key)
        if not cursor or not key:
            return None
        table = pa.table({"c": batch.column(cursor), **{
            f"k{n}": batch.column(name) for n, name in enumerate(key)
        }})  # fmt: skip
        table = table.filter(pc.is_valid(table.column("c")))
        if table.num_rows == 0:
            return None
        order = [("c", "descending")] + [
            (f"k{n}", "descending") for n in range(len(key))
        ]
        top = table.take(pc.select_k_unstable(table, 1, order)).to_pylist()[0]
        return {
            "cursor": jsonable(top["c"]),
            "key": [jsonable(top[f"k{n}"]) for n in range(len(key))],
        }

    # -- helpers -------------------------------------------------------------------

    @contextmanager
    def _read_transaction(
        self, snapshot: str | None
    ) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a READ ONLY transaction (on `snapshot` if given)."""
        with self._connection() as conn, conn.transaction():
            if snapshot:
                conn.execute(
                    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                )
                try:
                    conn.execute(
                        sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                            sql.Literal(snapshot)
                        )
                    )
                except psycopg.errors.InvalidParameterValue:
                    raise SnapshotGoneError(
                        f"snapshot {snapshot} no longer exists on {self._target}: "
                        "the exporting transaction ended; plan the run again"
                    ) from None
            else:
                conn.execute("SET TRANSACTION READ ONLY")
            conn.execute("SET LOCAL TimeZone TO 'UTC'")
            conn.execute("SET LOCAL DateStyle TO 'ISO, YMD'")
            conn.execute("SET LOCAL IntervalStyle TO 'iso_8601'")
            conn.execute("SET LOCAL bytea_output TO 'hex'")
            yield conn

    @staticmethod
    def _relation(opts: dict[str, Any]) -> sql.Composable:
        if opts["table"]:
            return sql.Identifier(opts["schema"], opts["table"])
        checked = read_only_query(opts["query"], "postgres")
        return sql.SQL("({}) AS dis_query").format(sql.SQL(checked))  # type: ignore[arg-type]

    def fingerprint(self, options: dict[str, Any]) -> str | None:
        """The table's write counters (inserted, updated, deleted rows) and size: a
        resumed run refuses to read a plan's key ranges again after they change.

        PostgreSQL publishes these counters within about a second of a commit. A
        query has no fingerprint (None).
        """
        opts = load_read_options(options)
        if not opts["table"]:
            return None
        try:
            with self._connection() as conn:
                row = conn.execute(
                    "SELECT s.n_tup_ins, s.n_tup_upd, s.n_tup_del, "
                    "pg_relation_size(c.oid) FROM pg_class c "
                    "LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid "
                    "WHERE c.oid = to_regclass(%s)",
                    [sql.Identifier(opts["schema"], opts["table"]).as_string(conn)],
                ).fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc, f"fingerprinting {self._name(opts)}") from None
        if row is None:
            return None
        return "pg:" + ":".join(str(v) for v in row)

    @staticmethod
    def _name(opts: dict[str, Any]) -> str:
        return f"{opts['schema']}.{opts['table']}" if opts["table"] else "query"

    @staticmethod
    def _primary_key(conn: psycopg.Connection[Any], opts: dict[str, Any]) -> list[str]:
        """The primary key columns of the table, in index order.

        Raises:
            TerminalError: no such table.
            ConfigError: the table has no primary key.
        """
        qualified = sql.Identifier(opts["schema"], opts["table"]).as_string(conn)
        exists = conn.execute("SELECT to_regclass(%s)", (qualified,)).fetchone()
        if not exists or exists[0] is None:
            raise TerminalError(
                f"table {opts['schema']}.{opts['table']} does not exist"
            )
        rows = conn.execute(
            "SELECT a.attname FROM pg_index i "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY k.n",
            (qualified,),
        ).fetchall()
        if not rows:
            raise ConfigError(
                f"table {opts['schema']}.{opts['table']} has no primary key: "
                "name the key columns in the read options"
            )
        return [name for (name,) in rows]

    @staticmethod
    def _upto(
        conn: psycopg.Connection[Any],
        relation: sql.Composable,
        cursor: str,
        key: list[str],
        after: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        """The greatest (cursor, key) past `after` now, or None when there is none."""
        where = _incremental_filter(cursor, key, after, None)
        columns = [cursor, *key]
        row = conn.execute(
            sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT 1").format(
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                relation,
                sql.SQL(" AND ").join(where),
                sql.SQL(", ").join(
                    sql.SQL("{} DESC").format(sql.Identifier(c)) for c in columns
                ),
            )
        ).fetchone()
        if row is None:
            return None
        return {"cursor": jsonable(row[0]), "key": [jsonable(v) for v in row[1:]]}

    @staticmethod
    def _boundaries(
        conn: psycopg.Connection[Any],
        relation: sql.Composable,
        key: list[str],
        where: list[sql.Composable],
        chunk_rows: int,
    ) -> list[list[Any] | None]:
        """Every `chunk_rows`-th key in key order: one scan of the keys."""
        keys = sql.SQL(", ").join(map(sql.Identifier, key))
        query = sql.SQL(
            "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS dis_n "
            "FROM {} WHERE {}) AS numbered WHERE mod(dis_n, {}) = 0 ORDER BY {}"
        ).format(
            keys,
            keys,
            keys,
            relation,
            sql.SQL(" AND ").join(where) if where else sql.SQL("true"),
            sql.Literal(chunk_rows),
            keys,
        )
        with conn.cursor() as cur:
            cur.execute(query)
            return [[jsonable(v) for v in row] for row in cur]

    @staticmethod
    def _has_rows_after(
        conn: psycopg.Connection[Any],
        relation: sql.Composable,
        key: list[str],
        where: list[sql.Composable],
        last: list[Any] | None,
    ) -> bool:
        filters = list(where)
        if last is not None:
            filters.append(sql.SQL("{} > {}").format(_row_of(key), _row(last)))
        row = conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(
                relation,
                sql.SQL(" AND ").join(filters) if filters else sql.SQL("true"),
            )
        ).fetchone()
        return bool(row and row[0])


def _check_snapshot(snapshot: str | None) -> None:
    if snapshot is not None and not _SNAPSHOT_ID.match(snapshot):
        raise ConfigError(f"{snapshot!r} is not a PostgreSQL snapshot id")


def _position(
    position: dict[str, Any] | None, key: list[str], cursor: str | None
) -> dict[str, Any] | None:
    if position is None or not cursor:
        return None
    if len(position["key"]) != len(key):
        raise ConfigError(
            f"cursor_after has {len(position['key'])} key value(s); "
            f"the key ({', '.join(key)}) has {len(key)}"
        )
    return {"cursor": position["cursor"], "key": list(position["key"])}


def _row_of(columns: Sequence[str]) -> sql.Composable:
    return sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Identifier, columns)))


def _incremental_filter(
    cursor: str | None,
    key: list[str],
    after: dict[str, Any] | None,
    upto: dict[str, Any] | None,
) -> list[sql.Composable]:
    """`cursor IS NOT NULL AND (cursor, key) > after AND (cursor, key) <= upto`."""
    if not cursor:
        return []
    position = _row_of([cursor, *key])
    filters: list[sql.Composable] = [
        sql.SQL("{} IS NOT NULL").format(sql.Identifier(cursor))
    ]
    if after is not None:
        filters.append(
            sql.SQL("{} > {}").format(position, _row([after["cursor"], *after["key"]]))
        )
    if upto is not None:
        filters.append(
            sql.SQL("{} <= {}").format(position, _row([upto["cursor"], *upto["key"]]))
        )
    return filters


def _scope_filter(
    cursor: str | None, key: list[str], scope: dict[str, Any] | None
) -> list[sql.Composable]:
    """A backfill's rows: `cursor_from <= cursor < cursor_to`, or `key IN keys`."""
    if not scope:
        return []
    filters: list[sql.Composable] = []
    if scope.get("keys"):
        width = {len(k) for k in scope["keys"]}
        if width != {len(key)}:
            raise ConfigError(
                f"scope keys must have {len(key)} value(s) each (key {', '.join(key)})"
            )
        filters.append(
            sql.SQL("{} IN ({})").format(
                _row_of(key), sql.SQL(", ").join(_row(k) for k in scope["keys"])
            )
        )
    if cursor and scope.get("cursor_from") is not None:
        filters.append(
            sql.SQL("{} >= {}").format(
                sql.Identifier(cursor), sql.Literal(scope["cursor_from"])
            )
        )
    if cursor and scope.get("cursor_to") is not None:
        filters.append(
            sql.SQL("{} < {}").format(
                sql.Identifier(cursor), sql.Literal(scope["cursor_to"])
            )
        )
    return filters


class _CopyStream(io.RawIOBase):
    """A read-only file over the data of a `COPY ... TO STDOUT` (for Arrow)."""

    def __init__(self, copy: psycopg.Copy) -> None:
        self._copy = copy
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # libpq hands COPY data over one row at a time: fill the whole buffer so
        # Arrow gets large blocks and Python is entered once per buffer, not per row.
        view = memoryview(buffer).cast("B")
        size = len(view)
        filled = min(size, len(self._pending))
        view[:filled] = self._pending[:filled]
        self._pending = self._pending[filled:]
        read = self._copy.read
        while filled < size:
            data = read()
            if not data:
                break
            end = filled + len(data)
            if end <= size:
                view[filled:end] = data
                filled = end
            else:
                room = size - filled
                view[filled:] = data[:room]
                self._pending = memoryview(data)[room:]
                filled = size
        return filled


def _parse_csv(stream: io.RawIOBase, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Record batches of PostgreSQL CSV (NULL unquoted empty, '' quoted)."""
    reader = pacsv.open_csv(
        io.BufferedReader(stream, buffer_size=READ_BLOCK_BYTES),
        read_options=pacsv.ReadOptions(
            column_names=schema.names, block_size=READ_BLOCK_BYTES
        ),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={f.name: f.type for f in schema},
            true_values=["t"],
            false_values=["f"],
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    for batch in reader:
        if batch.num_rows:
            yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)
