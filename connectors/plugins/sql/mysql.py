"""`mysql`: MariaDB/MySQL as a source and a sink, through SQLAlchemy Core + PyMySQL.

The URL is built with `URL.create` from validated fields (never a DSN string); the
password comes from the credential and never appears in an error. The sink has the
PostgreSQL sink's semantics: a write takes a named lock on (table, run, chunk)
(`GET_LOCK`, the advisory lock of MySQL), then in one transaction appends (after
deleting an earlier attempt's rows) or upserts (`INSERT ... ON DUPLICATE KEY UPDATE`
from a temporary table, the last row of each key, in key order), checks the fence
and commits. Pure Python (no Django).
"""

from __future__ import annotations

import hashlib
from typing import Any

import marshmallow
import pyarrow as pa
import sqlalchemy as sa
from marshmallow import fields, validate
from pymysql.constants import FIELD_TYPE
from sqlalchemy.engine import URL

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
from connectors.plugins.sql.alchemy import AlchemySource, SqlReadOptions, shared_engine
from connectors.plugins.sql.common import (
    SqlWriteOptions,
    check_key_columns,
    columns_to_add,
    data_fields,
    index_name,
    is_json,
    last_row_per_key,
    load_write_options,
    unsupported,
    with_system_columns,
)
from connectors.plugins.sql.pgcommon import validate_host

#: Seconds a write waits for the chunk's named lock.
LOCK_WAIT_SECONDS = 60
UPSERT_STAGE = "dis_upsert_stage"


class MysqlConfig(marshmallow.Schema):
    """Config of a MariaDB/MySQL connector; `password` comes from the credential."""

    host = fields.String(required=True, validate=validate_host)
    port = fields.Integer(load_default=3306, validate=validate.Range(1, 65535))
    database = fields.String(required=True, validate=validate.Length(min=1, max=64))
    user = fields.String(required=True, validate=validate.Length(min=1))
    password = fields.String(
        load_default=None, allow_none=True, metadata={"secret": True}
    )
    connect_timeout = fields.Integer(load_default=10, validate=validate.Range(1, 300))
    pool_size = fields.Integer(load_default=4, validate=validate.Range(1, 64))


def mysql_url(config: dict[str, Any]) -> URL:
    """The SQLAlchemy URL of a loaded config, built field by field.

    Raises:
        ConfigError: a host that is a socket path or carries '='.
    """
    try:
        validate_host(str(config.get("host", "")))
    except marshmallow.ValidationError:
        raise ConfigError("host must be a host name or IP address") from None
    return URL.create(
        "mysql+pymysql",
        username=config["user"],
        password=config.get("password") or None,
        host=config["host"],
        port=int(config.get("port", 3306)),
        database=config["database"],
        query={"charset": "utf8mb4"},
    )


def _engine_options(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "pool_size": int(config.get("pool_size", 4)),
        "max_overflow": 0,
        "pool_pre_ping": True,
        "pool_recycle": 3600,
        "connect_args": {"connect_timeout": int(config.get("connect_timeout", 10))},
    }


def mysql_type(field: pa.Field, *, key: bool = False) -> str:
    """The MariaDB/MySQL column type for an Arrow field.

    Text is LONGTEXT, or VARCHAR(255) in an upsert key (an index needs a length).
    Zoned timestamps are stored as UTC in DATETIME(6).

    Raises:
        ConfigError: for an Arrow type without a mapping.
    """
    t = field.type
    if pa.types.is_dictionary(t):
        return mysql_type(pa.field(field.name, t.value_type, metadata=field.metadata))
    if is_json(field):
        return "JSON"
    if (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_null(t)
    ):
        return "VARCHAR(255)" if key else "LONGTEXT"
    simple = {
        pa.bool_(): "BOOLEAN",
        pa.int8(): "TINYINT",
        pa.int16(): "SMALLINT",
        pa.uint8(): "SMALLINT",
        pa.int32(): "INT",
        pa.uint16(): "INT",
        pa.int64(): "BIGINT",
        pa.uint32(): "BIGINT",
        pa.uint64(): "BIGINT UNSIGNED",
        pa.float16(): "FLOAT",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
    }
    if t in simple:
        return simple[t]
    if pa.types.is_decimal(t) and t.precision <= 65:
        return f"DECIMAL({t.precision},{t.scale})"
    if pa.types.is_date(t):
        return "DATE"
    if pa.types.is_time(t):
        return "TIME(6)"
    if pa.types.is_timestamp(t):
        return "DATETIME(6)"
    raise unsupported(field, "MariaDB/MySQL")


def _python_values(column: pa.ChunkedArray, field: pa.Field) -> list[Any]:
    t = field.type
    if pa.types.is_dictionary(t):
        column = column.cast(t.value_type)
        t = t.value_type
    if isinstance(t, pa.JsonType):
        column = pa.chunked_array([c.storage for c in column.chunks], t.storage_type)
    elif pa.types.is_timestamp(t) and t.tz:
        column = column.cast(pa.timestamp("us"), safe=False)  # naive UTC
    elif t == pa.float16():
        column = column.cast(pa.float32())
    return column.to_pylist()


_READ_TYPES: dict[int, pa.DataType] = {
    FIELD_TYPE.TINY: pa.int64(),
    FIELD_TYPE.SHORT: pa.int64(),
    FIELD_TYPE.LONG: pa.int64(),
    FIELD_TYPE.INT24: pa.int64(),
    FIELD_TYPE.LONGLONG: pa.int64(),
    FIELD_TYPE.YEAR: pa.int64(),
    FIELD_TYPE.FLOAT: pa.float64(),
    FIELD_TYPE.DOUBLE: pa.float64(),
    FIELD_TYPE.DATE: pa.date32(),
    FIELD_TYPE.DATETIME: pa.timestamp("us"),
    FIELD_TYPE.TIMESTAMP: pa.timestamp("us"),
    FIELD_TYPE.TIME: pa.duration("us"),
    FIELD_TYPE.VARCHAR: pa.string(),
    FIELD_TYPE.VAR_STRING: pa.string(),
    FIELD_TYPE.STRING: pa.string(),
    FIELD_TYPE.JSON: pa.string(),
    FIELD_TYPE.ENUM: pa.string(),
}


class MysqlSource(AlchemySource):
    """Reads a MariaDB/MySQL table or read-only query in key-range chunks.

    Reads run in `READ ONLY` transactions; the engine's pool (`pool_size`) bounds
    how many chunks a worker process reads at once.
    """

    dialect = "mysql"
    options_schema = SqlReadOptions

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self._url_value = mysql_url(config)

    def _url(self) -> URL:
        return self._url_value

    def _engine_options(self) -> dict[str, Any]:
        return _engine_options(self.config)

    def _begin_read_only(self, conn: sa.Connection) -> None:
        conn.rollback()
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    def _column_types(
        self, conn: sa.Connection, opts: dict[str, Any], description: Any
    ) -> dict[str, pa.DataType]:
        types: dict[str, pa.DataType] = {}
        for name, code, _, _, precision, scale, _ in description or ():
            if code in (FIELD_TYPE.DECIMAL, FIELD_TYPE.NEWDECIMAL):
                # PyMySQL reports the display length: digits plus sign and point.
                digits = max(int(precision or 0) - (1 if scale else 0) - 1, 1)
                if digits <= 38:
                    types[name] = pa.decimal128(digits, int(scale or 0))
            elif code in _READ_TYPES:
                types[name] = _READ_TYPES[code]
        return types


class MysqlSink(Sink):
    """Writes batches to a MariaDB/MySQL table: append or upsert by key."""

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self._url = mysql_url(config)
        self._secret = str(config.get("password") or "")

    @property
    def engine(self) -> sa.Engine:
        return shared_engine(self._url, **_engine_options(self.config))

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        opts = load_write_options(options, default_schema=self.config["database"])
        if opts["write_mode"] == "replace":
            raise ConfigError("the mysql sink supports append and upsert")
        return opts

    def dataset_name(self, options: dict[str, Any]) -> str:
        opts = self._options(options)
        host = f"{self.config['host']}:{self.config.get('port', 3306)}"
        return f"mysql://{host}/{opts['schema']}.{opts['table']}"

    def check(self) -> CheckResult:
        """Open a pooled connection and run `SELECT VERSION()`."""
        try:
            with self.engine.connect() as conn:
                version = conn.exec_driver_sql("SELECT VERSION()").scalar()
        except sa.exc.SQLAlchemyError as exc:
            return CheckResult(False, f"cannot connect: {self._text(exc)}")
        return CheckResult(True, f"connected to {self._url.host} ({version})")

    def prepare(
        self,
        options: dict[str, Any],
        schema: pa.Schema,
        *,
        run_id: int | None = None,
    ) -> None:
        """Create the table (or check and evolve it); for upsert, a unique key index.

        Args:
            options: the pipeline's write options.
            schema: the data columns to store.
            run_id: accepted for symmetry with the other SQL sinks; unused.

        Raises:
            ConfigError: bad options, a key not in the data, an unmappable type.
            TerminalError: the database is missing, the table lacks columns,
                duplicate keys prevent the unique index.
            TransientError: the server cannot be reached, the lock timed out.
        """
        opts = self._options(options)
        key = opts["key"] or []
        fields_ = data_fields(schema)
        types = {f.name: mysql_type(f, key=f.name in key) for f in fields_}
        if opts["write_mode"] == "upsert":
            check_key_columns(key, list(types))
        q = self._quote
        qualified = f"{q(opts['schema'])}.{q(opts['table'])}"
        definitions = [f"{q(n)} {t}" for n, t in types.items()] + [
            f"{q(RUN_ID_COLUMN)} BIGINT NOT NULL",
            f"{q(CHUNK_SEQ_COLUMN)} INT NOT NULL",
            f"{q(SOURCE_REF_COLUMN)} TEXT",
            f"INDEX {q(index_name(opts['table'], 'run_chunk_idx'))} "
            f"({q(RUN_ID_COLUMN)}, {q(CHUNK_SEQ_COLUMN)})",
        ]
        try:
            with self._locked(("prepare", opts["schema"], opts["table"])) as conn:
                if not conn.exec_driver_sql(
                    "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                    (opts["schema"],),
                ).first():
                    raise TerminalError(f"database {opts['schema']} does not exist")
                existing = {
                    name
                    for (name,) in conn.exec_driver_sql(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = %s AND table_name = %s",
                        (opts["schema"], opts["table"]),
                    )
                }
                if not existing:
                    conn.exec_driver_sql(
                        f"CREATE TABLE {qualified} ({', '.join(definitions)}) "
                        "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
                    )
                else:
                    self._evolve(conn, opts, qualified, types, existing)
                if opts["write_mode"] == "upsert":
                    self._ensure_unique_key(conn, opts, qualified, key)
        except ConnectorError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise self._failure(exc, f"preparing {opts['table']}") from None

    def _evolve(
        self,
        conn: sa.Connection,
        opts: dict[str, Any],
        qualified: str,
        types: dict[str, str],
        existing: set[str],
    ) -> None:
        label = f"{opts['schema']}.{opts['table']}"
        for name in columns_to_add(opts, types, existing, label):
            conn.exec_driver_sql(
                f"ALTER TABLE {qualified} ADD COLUMN {self._quote(name)} {types[name]}"
            )

    def _ensure_unique_key(
        self, conn: sa.Connection, opts: dict[str, Any], qualified: str, key: list[str]
    ) -> None:
        rows = conn.exec_driver_sql(
            "SELECT index_name, column_name FROM information_schema.statistics "
            "WHERE table_schema = %s AND table_name = %s AND non_unique = 0",
            (opts["schema"], opts["table"]),
        ).fetchall()
        indexes: dict[str, set[str]] = {}
        for name, column in rows:
            indexes.setdefault(name, set()).add(column)
        if set(key) in indexes.values():
            return
        conn.exec_driver_sql(
            f"CREATE UNIQUE INDEX {self._quote(index_name(opts['table'], 'key_idx'))} "
            f"ON {qualified} ({', '.join(map(self._quote, key))})"
        )

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

        Raises:
            FencedError: `fence()` returned False; nothing was committed.
            TransientError: connection lost, lock wait timeout, deadlock.
            TerminalError: missing table/column, bad data, a NULL upsert key.
        """
        opts = self._options(options)
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        data_fields(batch.schema)
        for field in batch.schema:
            if field.name not in SYSTEM_COLUMNS:
                mysql_type(field)
        upsert = opts["write_mode"] == "upsert"
        if upsert:
            check_key_columns(opts["key"], batch.column_names)
            batch = last_row_per_key(batch, opts["key"])
        table = with_system_columns(batch, run_id=run_id, chunk_seq=chunk_seq)
        columns = [
            _python_values(column, field)
            for field, column in zip(table.schema, table.columns, strict=True)
        ]
        rows = list(zip(*columns, strict=True))
        q = self._quote
        qualified = f"{q(opts['schema'])}.{q(opts['table'])}"
        names = ", ".join(map(q, table.column_names))
        marks = ", ".join(["%s"] * table.num_columns)
        details: dict[str, Any]
        try:
            with self._locked(
                ("write", opts["schema"], opts["table"], run_id, chunk_seq)
            ) as conn:
                if upsert:
                    details = self._upsert(
                        conn, qualified, table.column_names, rows, opts
                    )
                else:
                    deleted = conn.exec_driver_sql(
                        f"DELETE FROM {qualified} WHERE {q(RUN_ID_COLUMN)} = %s "  # noqa: S608
                        f"AND {q(CHUNK_SEQ_COLUMN)} = %s",
                        (run_id, chunk_seq),
                    ).rowcount
                    if rows:
                        conn.exec_driver_sql(
                            f"INSERT INTO {qualified} ({names}) VALUES ({marks})",  # noqa: S608
                            rows,
                        )
                    details = {"replaced": deleted}
                if not fence():
                    raise FencedError(
                        f"chunk {chunk_seq} of run {run_id}: a newer attempt owns it"
                    )
        except ConnectorError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise self._failure(exc, f"writing to {opts['table']}") from None
        return WriteResult(rows_written=table.num_rows, details=details)

    def _upsert(
        self,
        conn: sa.Connection,
        qualified: str,
        names: list[str],
        rows: list[tuple[Any, ...]],
        opts: dict[str, Any],
    ) -> dict[str, int]:
        q = self._quote
        key = opts["key"]
        columns = ", ".join(map(q, names))
        stage = q(UPSERT_STAGE)
        conn.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {stage}")
        conn.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {stage} AS SELECT {columns} FROM {qualified} "  # noqa: S608
            "WHERE 1 = 0"
        )
        if rows:
            marks = ", ".join(["%s"] * len(names))
            conn.exec_driver_sql(
                f"INSERT INTO {stage} ({columns}) VALUES ({marks})",  # noqa: S608
                rows,
            )
        on = " AND ".join(f"s.{q(k)} = t.{q(k)}" for k in key)
        updated = int(
            conn.exec_driver_sql(
                f"SELECT COUNT(*) FROM {stage} s JOIN {qualified} t ON {on}"  # noqa: S608
            ).scalar()
            or 0
        )
        updates = ", ".join(f"{q(n)} = VALUES({q(n)})" for n in names if n not in key)
        conn.exec_driver_sql(
            f"INSERT INTO {qualified} ({columns}) SELECT {columns} FROM {stage} "  # noqa: S608
            f"ORDER BY {', '.join(map(q, key))} ON DUPLICATE KEY UPDATE {updates}"
        )
        conn.exec_driver_sql(f"DROP TEMPORARY TABLE {stage}")
        return {
            "inserted": len(rows) - updated,
            "updated": updated,
            "replaced": updated,
        }

    def close(self) -> None:
        """Pools stay open for the next chunk; `dispose_engines()` closes them."""

    # -- helpers -------------------------------------------------------------------

    def _quote(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    class _Locked:
        """A connection holding a named lock, in a transaction committed on exit."""

        def __init__(self, sink: MysqlSink, parts: tuple[Any, ...]) -> None:
            text = "\x00".join(map(str, parts)).encode()
            self.name = "dis:" + hashlib.blake2b(text, digest_size=16).hexdigest()
            self.sink = sink
            self.conn: sa.Connection | None = None

        def __enter__(self) -> sa.Connection:
            conn = self.sink.engine.connect()
            self.conn = conn
            got = conn.exec_driver_sql(
                "SELECT GET_LOCK(%s, %s)", (self.name, LOCK_WAIT_SECONDS)
            ).scalar()
            if got != 1:
                conn.close()
                raise TransientError(f"timed out waiting for lock {self.name}")
            conn.commit()
            conn.begin()
            return conn

        def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
            conn = self.conn
            assert conn is not None  # noqa: S101 - set by __enter__
            try:
                if kind is None:
                    conn.commit()
                else:
                    conn.rollback()
            finally:
                try:
                    conn.exec_driver_sql("SELECT RELEASE_LOCK(%s)", (self.name,))
                    conn.commit()
                finally:
                    conn.close()

    def _locked(self, parts: tuple[Any, ...]) -> MysqlSink._Locked:
        return MysqlSink._Locked(self, parts)

    def _text(self, exc: BaseException) -> str:
        original = getattr(exc, "orig", None) or exc
        text = " ".join(str(original).split())
        return text.replace(self._secret, "***") if self._secret else text

    def _failure(self, exc: sa.exc.SQLAlchemyError, doing: str) -> ConnectorError:
        message = f"{doing}: {self._text(exc)}"
        code = getattr(getattr(exc, "orig", None), "args", (0,))[0]
        if code in (1205, 1213, 2003, 2006, 2013):  # lock wait, deadlock, gone
            return TransientError(message)
        if isinstance(exc, sa.exc.OperationalError) and code not in (
            1044,
            1045,
            1049,
            1054,
            1062,
            1146,
        ):
            return TransientError(message)
        return TerminalError(message)


class MysqlPlugin(Plugin):
    """MariaDB/MySQL: a chunked source and an exactly-once append/upsert sink."""

    kind = "mysql"
    title = "MariaDB / MySQL"
    config_schema = MysqlConfig
    capabilities = Capabilities(
        source=True,
        sink=True,
        upsert=True,
        discover=True,
        chunkable=True,
        exactly_once=True,
    )
    source_class = MysqlSource
    sink_class = MysqlSink
    read_options_schema = SqlReadOptions
    write_options_schema = SqlWriteOptions

    @classmethod
    def data_hosts(cls, config: dict[str, Any]) -> list[tuple[str, str, int]]:
        return [("host", str(config["host"]), int(config.get("port") or 3306))]
