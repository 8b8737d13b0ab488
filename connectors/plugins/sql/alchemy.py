"""SQL sources through SQLAlchemy Core: `mysql` (MariaDB/MySQL) and `sqlite`.

A table or a read-only query, cut into key ranges like the PostgreSQL source (one
ordered scan of the keys with `row_number()`), read in a read-only transaction with
a streaming cursor and turned into Arrow arrays column by column. No snapshot: a
chunk sees the data as of its own read. Engines are pooled per worker process.
Pure Python (no Django).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import marshmallow
import pyarrow as pa
import sqlalchemy as sa
from marshmallow import fields, validates_schema
from sqlalchemy.engine import URL, Engine

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
from connectors.plugins.sql.common import KeyList, source_refs
from connectors.plugins.sql.queries import read_only_query

#: Rows fetched from the streaming cursor per Arrow record batch.
FETCH_ROWS = 50_000


def _identifier(value: str) -> None:
    if not value or len(value.encode()) > 63 or "\x00" in value:
        raise marshmallow.ValidationError("Must be 1 to 63 bytes, without NUL.")


class SqlReadOptions(marshmallow.Schema):
    """Read options of the `mysql` and `sqlite` sources.

    Either `table` (in `schema`, default the connection's database) or `query` (one
    read-only SELECT); `key` names the chunking columns (default: the primary key;
    required for a query).
    """

    table = fields.String(load_default=None, validate=_identifier)
    schema = fields.String(load_default=None, validate=_identifier)
    query = fields.String(load_default=None)
    key = KeyList(load_default=None)

    #: The sqlglot dialect queries are checked in (set per subclass).
    dialect: ClassVar[str] = "mysql"

    @validates_schema
    def _one_relation(self, data: dict[str, Any], **kwargs: Any) -> None:
        if bool(data.get("table")) == bool(data.get("query")):
            raise marshmallow.ValidationError(
                "Give either a table or a query.", field_name="table"
            )
        if data.get("query"):
            try:
                read_only_query(data["query"], self.dialect)
            except ConfigError as exc:
                raise marshmallow.ValidationError(
                    str(exc), field_name="query"
                ) from None
            if not data.get("key"):
                raise marshmallow.ValidationError(
                    "Required with a query (a query has no primary key).",
                    field_name="key",
                )


class SqliteReadOptions(SqlReadOptions):
    """Read options of the `sqlite` source (queries checked as SQLite)."""

    dialect = "sqlite"


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(url: URL, **kwargs: Any) -> Engine:
    """The process's engine (and pool) for `url` and `kwargs`, created on first use.

    Keyed by a hash of the URL (password included, never stored in clear in the
    key) and the process id, so a forked worker never reuses its parent's sockets.
    """
    material = repr((os.getpid(), url.render_as_string(hide_password=False), kwargs))
    key = hashlib.sha256(material.encode()).hexdigest()
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = sa.create_engine(url, hide_parameters=True, **kwargs)
            _ENGINES[key] = engine
    return engine


def dispose_engines() -> None:
    """Close every pooled connection of this process (worker shutdown, tests)."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        engine.dispose()


def sqlite_url(path: str) -> URL:
    """A read-only SQLite URL for the file at `path`."""
    return URL.create("sqlite", database=f"file:{path}?mode=ro", query={"uri": "true"})


def arrow_values(values: list[Any], type_: pa.DataType | None) -> pa.Array:
    """One column of Python values as an Arrow array (type inferred when None)."""
    if type_ is None:
        array = pa.array(values)
        return array.cast(pa.string()) if pa.types.is_null(array.type) else array
    return pa.array(values, type_)


class AlchemySource(Source):
    """A table or read-only query of a SQLAlchemy database, read in key ranges.

    Subclasses set `dialect` (sqlglot's) and build the URL from validated fields.
    """

    dialect: ClassVar[str] = ""
    options_schema: ClassVar[type[SqlReadOptions]] = SqlReadOptions

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self._secret = str(config.get("password") or "")

    # -- to specialise ---------------------------------------------------------------

    def _url(self) -> URL:
        raise NotImplementedError

    def _engine_options(self) -> dict[str, Any]:
        return {}

    def _ref_prefix(self, opts: dict[str, Any]) -> str:
        return str(opts["table"]) if opts.get("table") else "query"

    def _begin_read_only(self, conn: sa.Connection) -> None:
        """Make the connection's next transaction read-only."""

    def _column_types(
        self, conn: sa.Connection, opts: dict[str, Any], description: Any
    ) -> dict[str, pa.DataType]:
        return {}

    # -- contract --------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return shared_engine(self._url(), **self._engine_options())

    def check(self) -> CheckResult:
        """Open a connection and run `SELECT 1`."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError as exc:
            return CheckResult(False, f"cannot connect: {self._text(exc)}")
        return CheckResult(True, f"connected ({self.engine.dialect.name})")

    def discover(self) -> list[StreamInfo]:
        """Every table with a schema inferred from its column types."""
        try:
            inspector = sa.inspect(self.engine)
            streams = []
            for table in inspector.get_table_names():
                columns = inspector.get_columns(table)
                streams.append(
                    StreamInfo(
                        table,
                        pa.schema(
                            (c["name"], _arrow_of_sqltype(c["type"])) for c in columns
                        ),
                    )
                )
        except sa.exc.SQLAlchemyError as exc:
            raise self._failure(exc, "listing tables") from None
        return streams

    def plan(self, options: dict[str, Any], *, chunk_rows: int) -> Iterator[Chunk]:
        """Key ranges of about `chunk_rows` rows from one ordered scan of the keys.

        Yields:
            Chunks with spec `{"lower", "upper", "snapshot": None, "key"}`.

        Raises:
            ConfigError: bad options, no primary key and no `key`.
            TerminalError: missing table, permission denied.
            TransientError: the server cannot be reached.
        """
        opts = self._load(options)
        if chunk_rows < 1:
            raise ConfigError("chunk_rows must be at least 1")
        try:
            with self.engine.connect() as conn:
                self._begin_read_only(conn)
                key = opts["key"] or self._primary_key(conn, opts)
                keys = ", ".join(map(self._quote, key))
                relation = self._relation(opts)
                rows = conn.execute(
                    sa.text(
                        f"SELECT {keys} FROM (SELECT {keys}, row_number() OVER "  # noqa: S608
                        f"(ORDER BY {keys}) AS dis_n FROM {relation}) AS numbered "
                        f"WHERE dis_n % :n = 0 ORDER BY {keys}"
                    ),
                    {"n": chunk_rows},
                ).fetchall()
                bounds: list[list[Any] | None] = [
                    [_jsonable(v) for v in row] for row in rows
                ]
                where, params = self._range(key, bounds[-1] if bounds else None, None)
                more = conn.execute(
                    sa.text(f"SELECT 1 FROM {relation} WHERE {where} LIMIT 1"),  # noqa: S608
                    params,
                ).first()
                if more is not None:
                    bounds.append(None)
        except ConnectorError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise self._failure(exc, f"planning {self._ref_prefix(opts)}") from None
        lower: list[Any] | None = None
        for seq, upper in enumerate(bounds):
            yield Chunk(
                seq, {"lower": lower, "upper": upper, "snapshot": None, "key": key}
            )
            lower = upper

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        """Stream the chunk's rows (ordered by key) as Arrow record batches.

        Raises:
            TerminalError: missing table or column, a value of an unexpected type.
            TransientError: connection lost, timeout.
        """
        opts = self._load(options)
        key = list(chunk.spec["key"])
        where, params = self._range(key, chunk.spec["lower"], chunk.spec["upper"])
        relation = self._relation(opts)
        keys = ", ".join(map(self._quote, key))
        prefix = self._ref_prefix(opts)
        try:
            with self.engine.connect() as conn:
                self._begin_read_only(conn)
                result = conn.execution_options(stream_results=True).execute(
                    sa.text(
                        f"SELECT * FROM {relation} WHERE {where} ORDER BY {keys}"  # noqa: S608
                    ),
                    params,
                )
                names = list(result.keys())
                types = self._column_types(conn, opts, result.cursor.description)
                while rows := result.fetchmany(FETCH_ROWS):
                    columns = [
                        arrow_values(list(values), types.get(name))
                        for name, values in zip(
                            names, zip(*rows, strict=True), strict=True
                        )
                    ]
                    batch = pa.RecordBatch.from_arrays(columns, names=names)
                    refs = source_refs(prefix, batch, key)
                    keep = [n for n in names if n != SOURCE_REF_COLUMN]
                    yield pa.RecordBatch.from_arrays(
                        [batch.column(n) for n in keep] + [refs],
                        names=[*keep, SOURCE_REF_COLUMN],
                    )
                conn.rollback()
        except ConnectorError:
            raise
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise TerminalError(f"reading {prefix}: {exc}") from None
        except sa.exc.SQLAlchemyError as exc:
            raise self._failure(exc, f"reading {prefix}") from None

    def close(self) -> None:
        """Pools stay open for the next chunk; `dispose_engines()` closes them."""

    # -- helpers -------------------------------------------------------------------

    def _load(self, options: dict[str, Any]) -> dict[str, Any]:
        try:
            loaded: dict[str, Any] = self.options_schema().load(options)
        except marshmallow.ValidationError as exc:
            error = ConfigError(f"invalid read options: {exc.normalized_messages()}")
            error.errors = exc.normalized_messages()
            raise error from None
        return loaded

    def _quote(self, name: str) -> str:
        return str(self.engine.dialect.identifier_preparer.quote(name))

    def _relation(self, opts: dict[str, Any]) -> str:
        if opts["table"]:
            table = self._quote(opts["table"])
            return f"{self._quote(opts['schema'])}.{table}" if opts["schema"] else table
        return f"({read_only_query(opts['query'], self.dialect)}) AS dis_query"

    def _range(
        self, key: list[str], lower: list[Any] | None, upper: list[Any] | None
    ) -> tuple[str, dict[str, Any]]:
        row = "(" + ", ".join(map(self._quote, key)) + ")"
        filters, params = ["1 = 1"], {}
        for name, values, op in (("lo", lower, ">"), ("hi", upper, "<=")):
            if values is None:
                continue
            marks = [f":{name}{n}" for n in range(len(values))]
            filters.append(f"{row} {op} ({', '.join(marks)})")
            params.update({f"{name}{n}": v for n, v in enumerate(values)})
        return " AND ".join(filters), params

    def _primary_key(self, conn: sa.Connection, opts: dict[str, Any]) -> list[str]:
        inspector = sa.inspect(conn)
        if not inspector.has_table(opts["table"], schema=opts["schema"]):
            raise TerminalError(f"table {opts['table']} does not exist")
        columns = inspector.get_pk_constraint(opts["table"], schema=opts["schema"])
        key = list(columns.get("constrained_columns") or [])
        if not key:
            raise ConfigError(
                f"table {opts['table']} has no primary key: "
                "name the key columns in the read options"
            )
        return key

    def _text(self, exc: BaseException) -> str:
        original = getattr(exc, "orig", None) or exc
        text = " ".join(str(original).split())
        return text.replace(self._secret, "***") if self._secret else text

    def _failure(self, exc: sa.exc.SQLAlchemyError, doing: str) -> ConnectorError:
        message = f"{doing}: {self._text(exc)}"
        if isinstance(exc, sa.exc.OperationalError | sa.exc.TimeoutError):
            lowered = message.lower()
            if any(
                word in lowered
                for word in ("access denied", "unknown database", "no such table")
            ):
                return TerminalError(message)
            return TransientError(message)
        return TerminalError(message)


def _arrow_of_sqltype(type_: Any) -> pa.DataType:
    """The Arrow type of a SQLAlchemy column type (as reflected)."""
    try:
        python = type_.python_type
    except NotImplementedError:
        return pa.string()
    if isinstance(type_, sa.Numeric) and python is decimal.Decimal:
        precision, scale = type_.precision, type_.scale
        if precision and scale is not None and precision <= 38:
            return pa.decimal128(precision, scale)
        return pa.string()
    return {
        bool: pa.bool_(),
        int: pa.int64(),
        float: pa.float64(),
        str: pa.string(),
        bytes: pa.binary(),
        dt.datetime: pa.timestamp("us"),
        dt.date: pa.date32(),
        dt.time: pa.time64("us"),
        dt.timedelta: pa.duration("us"),
    }.get(python, pa.string())


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return (
            value.isoformat(sep=" ")
            if isinstance(value, dt.datetime)
            else (value.isoformat())
        )
    return str(value)
