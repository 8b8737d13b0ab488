"""Kafka values <-> Arrow: decoding consumed messages, encoding rows to produce.

Decoding keeps one message per row. JSON values are parsed in one go by Arrow's C++
JSON reader (the declared `fields` only; the whole value stays as the `record` JSON
text); only when that fails are the messages looked at one by one, to find the bad
ones. A value that cannot be decoded becomes a row with `_read_error` and `_raw`
set and NULL data, never the batch's failure. Pure Python (no Django).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from connectors.base import SOURCE_REF_COLUMN
from connectors.plugins.jsonrows import ARROW_ERRORS, read_json_isolating, to_dates
from connectors.plugins.sql.common import JSON_METADATA_KEY, JSON_METADATA_VALUE

KEY_COLUMN = "key"
RECORD_COLUMN = "record"
VALUE_COLUMN = "value"
HEADERS_COLUMN = "headers"
PARTITION_COLUMN = "_partition"
OFFSET_COLUMN = "_offset"
TIMESTAMP_COLUMN = "_timestamp"
#: Same convention as the files connector: set on rows that could not be decoded.
READ_ERROR_COLUMN = "_read_error"
RAW_COLUMN = "_raw"
RESERVED_COLUMNS = (
    KEY_COLUMN,
    RECORD_COLUMN,
    VALUE_COLUMN,
    HEADERS_COLUMN,
    PARTITION_COLUMN,
    OFFSET_COLUMN,
    TIMESTAMP_COLUMN,
    SOURCE_REF_COLUMN,
    READ_ERROR_COLUMN,
    RAW_COLUMN,
)

#: Confluent wire format: magic byte 0, then the schema id (4 bytes, big endian).
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_HEADER_BYTES = 5

#: Declared field types (the map step's names) and their Arrow types.
FIELD_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "float": pa.float64(),
    "boolean": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
}

_JSON_FIELD = pa.field(
    "", pa.string(), metadata={JSON_METADATA_KEY: JSON_METADATA_VALUE}
)


def json_field(name: str) -> pa.Field:
    """A string field marked as JSON text (`dis.type` metadata)."""
    return _JSON_FIELD.with_name(name)


@dataclass
class Messages:
    """Consumed messages of one partition, column-wise, in offset order."""

    topic: str
    partition: int
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]
    headers: list[list[tuple[str, bytes | None]] | None]
    timestamps: list[int | None]

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class ValueFormat:
    """How message values are written: `json`, `avro` or `string`.

    Attributes:
        fields: declared top-level fields to extract as typed columns (name -> type
            name in `FIELD_TYPES`).
        avro_schema: the parsed Avro schema (for `avro`).
        confluent: Avro values carry the Confluent 5-byte header.
    """

    name: str
    fields: tuple[tuple[str, str], ...] = ()
    avro_schema: Any = None
    confluent: bool = False

    def output_schema(self) -> pa.Schema:
        """The Arrow schema of every batch decoded in this format."""
        main = (
            pa.field(VALUE_COLUMN, pa.string())
            if self.name == "string"
            else json_field(RECORD_COLUMN)
        )
        typed = [pa.field(n, FIELD_TYPES[t]) for n, t in self.fields]
        return pa.schema(
            [
                pa.field(KEY_COLUMN, pa.string()),
                main,
                *typed,
                json_field(HEADERS_COLUMN),
                pa.field(PARTITION_COLUMN, pa.int32()),
                pa.field(OFFSET_COLUMN, pa.int64()),
                pa.field(TIMESTAMP_COLUMN, pa.timestamp("ms", tz="UTC")),
                pa.field(SOURCE_REF_COLUMN, pa.string()),
                pa.field(READ_ERROR_COLUMN, pa.string()),
                pa.field(RAW_COLUMN, pa.string()),
            ]
        )


def parse_avro_schema(schema: Any) -> Any:
    """A fastavro-parsed schema from its JSON text or dict.

    Raises:
        ValueError: the schema is not valid Avro.
    """
    if isinstance(schema, str | bytes):
        schema = orjson.loads(schema)
    return parse_schema(schema)


def avro_field_types(schema: Any) -> tuple[tuple[str, str], ...]:
    """Typed columns derived from an Avro record's top-level scalar fields.

    `["null", T]` unions count as T; records, arrays, maps, bytes and decimals are
    left to the `record` JSON column.
    """
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return ()
    derived = []
    for field in schema.get("fields", []):
        kind = field["type"]
        if isinstance(kind, list):
            others = [k for k in kind if k != "null"]
            if len(others) != 1:
                continue
            kind = others[0]
        name = _avro_type_name(kind)
        if name:
            derived.append((field["name"], name))
    return tuple(derived)


def _avro_type_name(kind: Any) -> str | None:
    if isinstance(kind, dict):
        logical = kind.get("logicalType")
        if logical == "date":
            return "date"
        if logical in ("timestamp-millis", "timestamp-micros"):
            return "timestamptz"
        if logical in ("local-timestamp-millis", "local-timestamp-micros"):
            return "timestamp"
        if logical:
            return None
        if kind.get("type") == "enum":
            return "string"
        kind = kind.get("type")
    return (
        {
            "string": "string",
            "int": "integer",
            "long": "integer",
            "float": "float",
            "double": "float",
            "boolean": "boolean",
        }.get(kind)
        if isinstance(kind, str)
        else None
    )


# -- decoding ----------------------------------------------------------------------


def decode(messages: Messages, fmt: ValueFormat) -> pa.RecordBatch:
    """One Arrow batch for `messages`; undecodable values become error rows.

    Args:
        messages: consumed messages of one partition.
        fmt: how their values are written.

    Returns:
        A batch with `fmt.output_schema()`.
    """
    n = len(messages)
    errors: list[str | None] = [None] * n
    present = [i for i, v in enumerate(messages.values) if v is not None]
    if fmt.name == "json":
        main, typed = _decode_json(messages.values, present, fmt, errors)
    elif fmt.name == "avro":
        main, typed = _decode_avro(messages.values, present, fmt, errors)
    else:
        main, typed = _decode_string(messages.values, present, errors), {}
    bad = [i for i, e in enumerate(errors) if e is not None]
    raw: list[str | None] = [None] * n
    for i in bad:
        raw[i] = _raw_text(messages.values[i], fmt)
    if bad:
        keep = np.ones(n, dtype=bool)
        keep[bad] = False
        mask = pa.array(~keep)
        main = pc.if_else(mask, pa.nulls(n, main.type), main)
        typed = {k: pc.if_else(mask, pa.nulls(n, a.type), a) for k, a in typed.items()}
    schema = fmt.output_schema()
    offsets = pa.array(messages.offsets, pa.int64())
    prefix = f"{messages.topic}/{messages.partition}/"
    arrays = [
        _strings(messages.keys),
        main,
        *(typed[name] for name, _ in fmt.fields),
        _headers(messages.headers),
        pa.array(np.full(n, messages.partition, dtype=np.int32)),
        offsets,
        pa.array(messages.timestamps, pa.timestamp("ms", tz="UTC")),
        pc.binary_join_element_wise(prefix, pc.cast(offsets, pa.string()), ""),
        pa.array(errors, pa.string()),
        pa.array(raw, pa.string()),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _strings(values: Sequence[bytes | None]) -> pa.Array:
    """UTF-8 bytes as a string array; invalid UTF-8 is decoded with U+FFFD."""
    binary = pa.array(values, pa.binary())
    try:
        return binary.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array(
            [None if v is None else v.decode("utf-8", "replace") for v in values],
            pa.string(),
        )


def _headers(headers: Sequence[list[tuple[str, bytes | None]] | None]) -> pa.Array:
    """Headers as a JSON object of strings per message (last value of a name wins)."""
    out: list[str | None] = []
    for pairs in headers:
        if not pairs:
            out.append(None)
            continue
        mapping = {
            name: None if value is None else value.decode("utf-8", "replace")
            for name, value in pairs
        }
        out.append(orjson.dumps(mapping).decode())
    return pa.array(out, pa.string())


def _raw_text(value: bytes | None, fmt: ValueFormat) -> str | None:
    if value is None:
        return None
    if fmt.name == "avro":
        return base64.b64encode(value).decode("ascii")
    return value.decode("utf-8", "replace")


def _decode_string(
    values: list[bytes | None], present: list[int], errors: list[str | None]
) -> pa.Array:
    binary = pa.array(values, pa.binary())
    try:
        return binary.cast(pa.string())
    except pa.ArrowInvalid:
        pass
    texts: list[str | None] = [None] * len(values)
    for i in present:
        try:
            texts[i] = values[i].decode("utf-8")  # type: ignore[union-attr]
        except UnicodeDecodeError as exc:
            errors[i] = f"value is not valid UTF-8: {exc.reason} at byte {exc.start}"
    return pa.array(texts, pa.string())


def _decode_json(
    values: list[bytes | None],
    present: list[int],
    fmt: ValueFormat,
    errors: list[str | None],
) -> tuple[pa.Array, dict[str, pa.Array]]:
    n = len(values)
    schema = pa.schema(
        [
            pa.field(name, pa.string() if kind == "date" else FIELD_TYPES[kind])
            for name, kind in fmt.fields
        ]
    )
    # Newlines are only ever whitespace in a JSON text (escaped inside strings), so
    # flattening them keeps each value on the one line Arrow's reader expects.
    lines = [values[i].replace(b"\n", b" ") for i in present]  # type: ignore[union-attr]
    table = None
    good = present
    if all(line.strip() for line in lines):
        table = _read_json_lines(lines, schema)
        if table is not None and table.num_rows != len(lines):
            table = None
    if table is None:  # something is wrong: find out which messages, one by one
        good, good_lines = [], []
        for i, line in zip(present, lines, strict=True):
            try:
                parsed = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                errors[i] = f"invalid JSON: {exc}"
                continue
            if fmt.fields and not isinstance(parsed, dict):
                errors[i] = f"expected a JSON object, got {type(parsed).__name__}"
                continue
            good.append(i)
            good_lines.append(line)
        objects = [
            (i, line)
            for i, line in zip(good, good_lines, strict=True)
            if line.lstrip().startswith(b"{")
        ]
        table = read_json_isolating(objects, schema, errors)
        good = [i for i, _ in objects if errors[i] is None]
    positions = np.full(n, -1, dtype=np.int64)
    positions[good] = np.arange(len(good))
    take = pa.array(positions, mask=positions < 0)
    typed: dict[str, pa.Array] = {}
    for name, kind in fmt.fields:
        column = (
            table.column(name).combine_chunks()
            if table is not None and table.num_rows
            else pa.nulls(0, schema.field(name).type)
        )
        column = column.take(take) if len(column) else pa.nulls(n, column.type)
        if kind == "date":
            column = to_dates(name, column, errors)
        typed[name] = column
    record = _strings(values)
    if not pa.types.is_string(record.type):  # pragma: no cover - _strings guarantees
        record = record.cast(pa.string())
    return record, typed


def _read_json_lines(lines: list[bytes], schema: pa.Schema) -> pa.Table | None:
    """Parse newline-free JSON objects with Arrow's reader; None when any fails."""
    if not lines:
        return schema.empty_table()
    try:
        return pajson.read_json(
            pa.py_buffer(b"\n".join(lines)),
            read_options=pajson.ReadOptions(block_size=1 << 24),
            parse_options=pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"
            ),
        )
    except ARROW_ERRORS:
        return None


def _decode_avro(
    values: list[bytes | None],
    present: list[int],
    fmt: ValueFormat,
    errors: list[str | None],
) -> tuple[pa.Array, dict[str, pa.Array]]:
    n = len(values)
    records: list[Any] = [None] * n
    texts: list[str | None] = [None] * n
    for i in present:
        data = values[i]
        assert data is not None  # noqa: S101 - `present` holds non-null values only
        if fmt.confluent:
            if len(data) < CONFLUENT_HEADER_BYTES or data[:1] != CONFLUENT_MAGIC:
                errors[i] = "not in the Confluent wire format (no magic byte 0)"
                continue
            data = data[CONFLUENT_HEADER_BYTES:]
        stream = io.BytesIO(data)
        try:
            record = schemaless_reader(stream, fmt.avro_schema, None)
        except Exception as exc:  # noqa: BLE001 - fastavro raises many kinds
            errors[i] = f"invalid Avro value: {type(exc).__name__}: {exc}"
            continue
        if stream.tell() != len(data):
            errors[i] = (
                f"invalid Avro value: {len(data) - stream.tell()} bytes left after "
                "the record (written with another schema?)"
            )
            continue
        records[i] = record
        texts[i] = orjson.dumps(record, default=json_default).decode()
    typed = {}
    for name, kind in fmt.fields:
        column = [r.get(name) if isinstance(r, dict) else None for r in records]
        typed[name] = _typed_array(name, column, FIELD_TYPES[kind], errors)
    return pa.array(texts, pa.string()), typed


def _typed_array(
    name: str, values: list[Any], arrow_type: pa.DataType, errors: list[str | None]
) -> pa.Array:
    """Python values as one Arrow array; a value that does not convert is an error."""
    try:
        return pa.array(values, arrow_type)
    except (*ARROW_ERRORS, OverflowError):
        pass
    converted: list[Any] = []
    for i, value in enumerate(values):
        try:
            pa.array([value], arrow_type)
        except (*ARROW_ERRORS, OverflowError):
            if errors[i] is None:
                errors[i] = f"field {name!r}: {value!r} is not a {arrow_type}"
            value = None
        converted.append(value)
    return pa.array(converted, arrow_type)


# -- encoding ----------------------------------------------------------------------


def json_default(value: Any) -> Any:
    """orjson fallback for values it does not serialise natively."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} as JSON")


def encode_json(row: dict[str, Any]) -> bytes:
    """A row as compact JSON (columns holding JSON text are embedded as JSON)."""
    return orjson.dumps(row, default=json_default)


def encode_avro(row: dict[str, Any], schema: Any, header: bytes = b"") -> bytes:
    """A row as schemaless Avro, after `header` (the Confluent prefix, if any)."""
    stream = io.BytesIO()
    stream.write(header)
    schemaless_writer(stream, schema, row)
    return stream.getvalue()
