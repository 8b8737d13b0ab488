"""The `files` sink: one file per (run, chunk), written whole or not at all.

`write()` serialises the batch (CSV, JSON Lines, Parquet or Avro) to a temporary
name in the target directory, takes the chunk's lock, calls the fence, and renames
the file into place (`<directory>/<prefix>run-<run>-chunk-<seq:06d>.<ext>`). A
reader never sees half a file; a retry of the chunk replaces its file; a fenced
attempt deletes its temporary file and leaves the earlier file alone. Pure Python
(no Django).
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
from collections.abc import Callable
from typing import IO, Any

import fastavro
import marshmallow
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from marshmallow import fields, validate

from connectors.base import (
    CHUNK_SEQ_COLUMN,
    RUN_ID_COLUMN,
    SOURCE_REF_COLUMN,
    CheckResult,
    ConnectorContext,
    Fence,
    Sink,
    WriteResult,
)
from connectors.exceptions import ConfigError, FencedError, TerminalError
from connectors.plugins.files.csvscan import iter_records
from connectors.plugins.files.records import JSON_METADATA, to_json_text
from connectors.plugins.files.storage import (
    BLOCK_SIZE,
    Storage,
    io_errors,
    make_storage,
    os_error,
)

SINK_FORMATS = ("csv", "jsonl", "parquet", "avro")
EXTENSION = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet", "avro": "avro"}
COMPRESSION_EXTENSION = {"none": "", "gzip": ".gz", "zstd": ".zst"}
#: Rows serialised at a time by the row-wise writers (JSON Lines, Avro).
ROWS_PER_STEP = 10_000

_AVRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PREFIX = re.compile(r"^[A-Za-z0-9._=-]*$")


def _validate_directory(value: str) -> None:
    parts = value.replace("\\", "/").split("/")
    if value.startswith("/") or ".." in parts or "\x00" in value:
        raise marshmallow.ValidationError(
            "Must be a relative directory inside the connector's root."
        )


class FilesWriteOptions(marshmallow.Schema):
    """A pipeline's write options for the files connector."""

    directory = fields.String(load_default="", validate=_validate_directory)
    prefix = fields.String(
        load_default="",
        validate=validate.Regexp(_PREFIX, error="Letters, digits, '.', '_', '=', '-'."),
    )
    format = fields.String(load_default=None, validate=validate.OneOf(SINK_FORMATS))
    compression = fields.String(
        load_default="none", validate=validate.OneOf(list(COMPRESSION_EXTENSION))
    )
    write_mode = fields.String(
        load_default="append",
        validate=validate.OneOf(
            ["append"],
            error="The files sink appends (one file per run and chunk); "
            "upsert and replace need a table.",
        ),
    )


def load_write_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate a pipeline's write options.

    Raises:
        ConfigError: with `.errors` mapping option name to messages.
    """
    try:
        return FilesWriteOptions().load(options)
    except marshmallow.ValidationError as exc:
        error = ConfigError(f"invalid write options: {exc.normalized_messages()}")
        error.errors = exc.normalized_messages()
        raise error from None


def _is_json(field: pa.Field) -> bool:
    return (field.metadata or {}).get(b"dis.type") == JSON_METADATA[b"dis.type"]


class FilesSink(Sink):
    """Writes each chunk of a run as one file under the connector's root."""

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self.storage: Storage = make_storage(config, self.context)

    def _settings(self, options: dict[str, Any]) -> dict[str, Any]:
        loaded = load_write_options(options)
        fmt = loaded["format"] or self.config.get("format", "csv")
        if fmt not in SINK_FORMATS:
            raise ConfigError(
                f"the files sink writes {', '.join(SINK_FORMATS)}, not {fmt}"
            )
        loaded["format"] = fmt
        if loaded["compression"] != "none" and fmt not in ("csv", "jsonl"):
            raise ConfigError(
                f"compression applies to csv and jsonl; {fmt} compresses internally"
            )
        return loaded

    def file_path(self, options: dict[str, Any], *, run_id: int, chunk_seq: int) -> str:
        """The path (relative to the root) of the file of (run, chunk).

        Returns:
            `<directory>/<prefix>run-<run_id>-chunk-<chunk_seq:06d>.<ext>`.
        """
        settings = self._settings(options)
        name = (
            f"{settings['prefix']}run-{run_id}-chunk-{chunk_seq:06d}."
            f"{EXTENSION[settings['format']]}"
            f"{COMPRESSION_EXTENSION[settings['compression']]}"
        )
        return (
            posixpath.join(settings["directory"], name)
            if settings["directory"]
            else name
        )

    # -- contract ------------------------------------------------------------------

    def check(self) -> CheckResult:
        return self.storage.check()

    def prepare(
        self, options: dict[str, Any], schema: pa.Schema, *, run_id: int | None = None
    ) -> None:
        """Check the options and the schema, and create the directory.

        Raises:
            ConfigError: bad options, a column named like a system column, or (Avro)
                a column name Avro does not allow.
        """
        settings = self._settings(options)
        clash = sorted({RUN_ID_COLUMN, CHUNK_SEQ_COLUMN} & set(schema.names))
        if clash:
            raise ConfigError(f"the data has system column(s) {', '.join(clash)}")
        if settings["format"] == "avro":
            avro_schema(schema)
        try:
            self.storage.makedirs(settings["directory"])
        except io_errors() as exc:
            raise os_error(settings["directory"] or ".", exc) from exc

    def write(
        self,
        options: dict[str, Any],
        batch: pa.Table,
        *,
        run_id: int,
        chunk_seq: int,
        fence: Fence,
    ) -> WriteResult:
        """Write the chunk's file, replacing an earlier attempt's.

        Returns:
            `rows_written`; details `path` (relative to the root), `url` and
            `replaced` (rows of the file this one replaced).

        Raises:
            FencedError: the fence said the attempt is superseded (nothing changed).
        """
        settings = self._settings(options)
        path = self.file_path(options, run_id=run_id, chunk_seq=chunk_seq)
        table = with_system_columns(batch, run_id=run_id, chunk_seq=chunk_seq)
        writer = _WRITERS[settings["format"]]

        def produce(stream: IO[bytes]) -> None:
            if settings["compression"] == "none":
                writer(table, stream, self.config)
                return
            raw = pa.PythonFile(_KeepOpen(stream), mode="w")
            with pa.CompressedOutputStream(raw, settings["compression"]) as packed:
                writer(table, packed, self.config)

        def before_commit() -> None:
            if not fence():
                raise FencedError(
                    f"run {run_id} chunk {chunk_seq}: a newer attempt owns the chunk"
                )

        try:
            with self.storage.chunk_lock(path):
                replaced = (
                    self._rows_in(path, settings) if self.storage.exists(path) else 0
                )
                self.storage.write_atomically(path, produce, before_commit)
        except io_errors() as exc:
            raise os_error(path, exc) from exc
        return WriteResult(
            table.num_rows,
            {"path": path, "url": self.storage.url(path), "replaced": replaced},
        )

    def dataset_name(self, options: dict[str, Any]) -> str:
        """`file:///root/<directory>` or `s3://bucket/<root>/<directory>`."""
        settings = self._settings(options)
        url = self.storage.url(posixpath.join(settings["directory"] or ".", "x"))
        return url[: -len("/x")].removesuffix("/.")

    def _rows_in(self, path: str, settings: dict[str, Any]) -> int:
        """Rows of the file an earlier attempt wrote (the `replaced` figure)."""
        fmt = settings["format"]
        with self.storage.open(path, settings["compression"]) as stream:
            if fmt == "parquet":
                return int(pq.ParquetFile(stream).metadata.num_rows)
            if fmt == "avro":
                return sum(b.num_records for b in fastavro.block_reader(stream))
            records = sum(
                len(starts)
                for starts, _ in iter_records(
                    stream,
                    block_size=BLOCK_SIZE,
                    quote=None if fmt == "jsonl" else ord('"'),
                )
            )
        return max(records - 1, 0) if fmt == "csv" else records


class _KeepOpen:
    """A write-only view of a stream whose `close()` leaves the stream open.

    Closing a compressing stream closes what it writes to; the temporary file
    must stay open until it is flushed and synced.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.closed = False

    def write(self, data: bytes) -> int:
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def with_system_columns(batch: pa.Table, *, run_id: int, chunk_seq: int) -> pa.Table:
    """The batch's data columns, then `_run_id`, `_chunk_seq`, `_source_ref`."""
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    n = batch.num_rows
    data = batch.drop_columns(
        [c for c in (SOURCE_REF_COLUMN,) if c in batch.column_names]
    )
    refs = (
        batch.column(SOURCE_REF_COLUMN)
        if SOURCE_REF_COLUMN in batch.column_names
        else pa.nulls(n, pa.string())
    )
    data = data.append_column(
        pa.field(RUN_ID_COLUMN, pa.int64()), pa.array([run_id] * n, pa.int64())
    )
    data = data.append_column(
        pa.field(CHUNK_SEQ_COLUMN, pa.int64()), pa.array([chunk_seq] * n, pa.int64())
    )
    return data.append_column(pa.field(SOURCE_REF_COLUMN, pa.string()), refs)


# -- writers ---------------------------------------------------------------------------


def _write_csv(table: pa.Table, stream: Any, config: dict[str, Any]) -> None:
    # CSV has no nested values: structs, lists and maps are written as JSON text.
    pacsv.write_csv(
        _nested_as_json(table),
        stream,
        write_options=pacsv.WriteOptions(
            include_header=True, delimiter=config.get("delimiter", ",")
        ),
    )


def _json_default(value: Any) -> Any:
    import base64
    import decimal

    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.time | dt.timedelta):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _write_jsonl(table: pa.Table, stream: Any, config: dict[str, Any]) -> None:
    json_columns = [f.name for f in table.schema if _is_json(f)]
    for batch in table.to_batches(max_chunksize=ROWS_PER_STEP):
        lines = []
        for row in batch.to_pylist():
            for name in json_columns:  # embedded as JSON, not as a quoted string
                if row[name] is not None:
                    row[name] = orjson.Fragment(row[name])
            lines.append(orjson.dumps(row, default=_json_default))
        if lines:
            stream.write(b"\n".join(lines) + b"\n")


def _write_parquet(table: pa.Table, stream: Any, config: dict[str, Any]) -> None:
    pq.write_table(
        table,
        stream
        if isinstance(stream, pa.NativeFile)
        else pa.PythonFile(stream, mode="w"),
    )


def avro_type(field: pa.Field, *, path: str = "") -> Any:
    """The (nullable) Avro type of an Arrow field.

    Structs become records (named after their path, so names never clash),
    lists arrays and maps with string keys maps, their members typed the same
    way; a nested type Avro cannot name (a member name that is not an Avro
    name, a map with other keys, a union) makes the whole field JSON text.
    """
    nested = _avro_nested(field.type, path or field.name)
    if nested is not None:
        return ["null", nested]
    return _avro_scalar(field)


def _avro_nested(kind: pa.DataType, path: str) -> Any:
    """The Avro type of a nested Arrow type, None when not nested or not
    representable (then the value is written as JSON text)."""
    if pa.types.is_struct(kind):
        members = [kind.field(i) for i in range(kind.num_fields)]
        if not members or any(not _AVRO_NAME.match(m.name) for m in members):
            return None
        fields = []
        for member in members:
            member_type = avro_type(member, path=f"{path}_{member.name}")
            if member_type == ["null", "string"] and not _is_text(member.type):
                return None  # a member that would be JSON text: the whole field is
            fields.append({"name": member.name, "type": member_type, "default": None})
        return {"type": "record", "name": f"r_{path}", "fields": fields}
    if (
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_fixed_size_list(kind)
    ):
        item = kind.value_field
        item_type = avro_type(item, path=f"{path}_item")
        if item_type == ["null", "string"] and not _is_text(item.type):
            return None
        return {"type": "array", "items": item_type}
    if pa.types.is_map(kind):
        if not _is_text(kind.key_type):
            return None
        value = kind.item_field
        value_type = avro_type(value, path=f"{path}_value")
        if value_type == ["null", "string"] and not _is_text(value.type):
            return None
        return {"type": "map", "values": value_type}
    return None


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _avro_scalar(field: pa.Field) -> Any:
    kind = field.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        base: Any = "string"
    elif pa.types.is_boolean(kind):
        base = "boolean"
    elif pa.types.is_int8(kind) or pa.types.is_int16(kind) or pa.types.is_int32(kind):
        base = "int"
    elif pa.types.is_integer(kind):
        base = "long"
    elif pa.types.is_float32(kind):
        base = "float"
    elif pa.types.is_floating(kind):
        base = "double"
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        base = "bytes"
    elif pa.types.is_date(kind):
        base = {"type": "int", "logicalType": "date"}
    elif pa.types.is_timestamp(kind):
        logical = "timestamp-micros" if kind.tz else "local-timestamp-micros"
        base = {"type": "long", "logicalType": logical}
    elif pa.types.is_time(kind):
        base = {"type": "long", "logicalType": "time-micros"}
    elif pa.types.is_decimal(kind):
        base = {
            "type": "bytes",
            "logicalType": "decimal",
            "precision": kind.precision,
            "scale": kind.scale,
        }
    elif pa.types.is_null(kind):
        return "null"
    else:
        base = "string"  # unions, and nested types Avro cannot name: JSON text
    return ["null", base]


def avro_schema(schema: pa.Schema) -> dict[str, Any]:
    """The Avro record schema of an Arrow schema (every field nullable).

    Raises:
        ConfigError: a column name Avro does not allow.
    """
    bad = [name for name in schema.names if not _AVRO_NAME.match(name)]
    if bad:
        raise ConfigError(
            f"column name(s) {', '.join(map(repr, bad))} are not valid Avro names "
            "(letters, digits and _; not starting with a digit): rename them"
        )
    return {
        "type": "record",
        "name": "Record",
        "namespace": "dis",
        "fields": [_avro_field(f) for f in schema],
    }


def _avro_field(field: pa.Field) -> dict[str, Any]:
    kind = avro_type(field)
    out: dict[str, Any] = {"name": field.name, "type": kind}
    if kind != "null":
        out["default"] = None
    if _is_json(field):  # read back as a JSON column by the files source
        out["dis.type"] = "json"
    return out


def _write_avro(table: pa.Table, stream: Any, config: dict[str, Any]) -> None:
    try:
        parsed = fastavro.parse_schema(avro_schema(table.schema))
    except ConfigError as exc:
        raise TerminalError(str(exc)) from exc
    as_text = [
        f.name
        for f in table.schema
        if avro_type(f) == ["null", "string"] and not _is_text(f.type)
    ]
    maps = [f.name for f in table.schema if _has_map(f.type) and f.name not in as_text]

    def records() -> Any:
        for batch in table.to_batches(max_chunksize=ROWS_PER_STEP):
            for row in batch.to_pylist():
                for name in as_text:
                    row[name] = to_json_text(row[name])
                for name in maps:  # Arrow gives maps as (key, value) pairs
                    row[name] = _maps_as_dicts(row[name])
                yield row

    fastavro.writer(stream, parsed, records(), codec="deflate")


def _has_map(kind: pa.DataType) -> bool:
    if pa.types.is_map(kind):
        return True
    if pa.types.is_struct(kind):
        return any(_has_map(kind.field(i).type) for i in range(kind.num_fields))
    if (
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_fixed_size_list(kind)
    ):
        return _has_map(kind.value_type)
    return False


def _maps_as_dicts(value: Any) -> Any:
    """A nested value with Arrow's map values ((key, value) pairs) as dicts."""
    if isinstance(value, dict):
        return {k: _maps_as_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {k: _maps_as_dicts(v) for k, v in value}
        return [_maps_as_dicts(v) for v in value]
    return value


def _nested_as_json(table: pa.Table) -> pa.Table:
    """Struct, list and map columns as JSON text (marked `dis.type: json`)."""
    for index, f in enumerate(table.schema):
        kind = f.type
        if (
            pa.types.is_struct(kind)
            or pa.types.is_list(kind)
            or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)
            or pa.types.is_map(kind)
        ):
            values = [
                to_json_text(_maps_as_dicts(v)) for v in table.column(index).to_pylist()
            ]
            table = table.set_column(
                index,
                pa.field(f.name, pa.string(), metadata=JSON_METADATA),
                pa.array(values, pa.string()),
            )
    return table


_WRITERS: dict[str, Callable[[pa.Table, Any, dict[str, Any]], None]] = {
    "csv": _write_csv,
    "jsonl": _write_jsonl,
    "parquet": _write_parquet,
    "avro": _write_avro,
}
