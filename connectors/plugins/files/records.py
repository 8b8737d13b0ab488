"""From JSON texts and Avro records to Arrow batches (the REST/Kafka convention).

A JSON record has no fixed shape, so each one travels whole as its JSON text in the
`record` column (field metadata `dis.type: json`); the fields the read options
declare are also pulled out into typed columns, parsed in one go by Arrow's C++ JSON
reader. Only when that fails are the records looked at one by one: an unparsable
text, or a declared field of the wrong type, is that record's error (`_read_error`,
the text in `_raw`, NULL data), never the batch's. Pure Python (no Django).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import uuid
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from connectors.base import SOURCE_REF_COLUMN
from connectors.plugins.jsonrows import ARROW_ERRORS, read_json_isolating, to_dates

RECORD_COLUMN = "record"
READ_ERROR_COLUMN = "_read_error"
RAW_COLUMN = "_raw"
JSON_METADATA = {b"dis.type": b"json"}

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
RESERVED_NAMES = (RECORD_COLUMN, SOURCE_REF_COLUMN, READ_ERROR_COLUMN, RAW_COLUMN)


def json_field(name: str) -> pa.Field:
    """A string field marked as JSON text (`dis.type` metadata)."""
    return pa.field(name, pa.string(), metadata=JSON_METADATA)


def json_batch_schema(fields: dict[str, str]) -> pa.Schema:
    """The schema of every JSON batch: declared fields, `record`, system columns."""
    return pa.schema(
        [
            *(pa.field(name, FIELD_TYPES[kind]) for name, kind in fields.items()),
            json_field(RECORD_COLUMN),
            pa.field(SOURCE_REF_COLUMN, pa.string()),
            pa.field(READ_ERROR_COLUMN, pa.string()),
            pa.field(RAW_COLUMN, pa.string()),
        ]
    )


def texts_from_ranges(
    data: bytes, starts: np.ndarray, stops: np.ndarray, *, trim: bytes = b" \t\r\n"
) -> pa.Array:
    """The records' texts, cut from `data` without a Python loop per record.

    Record i is `data[starts[i]:stops[i]]` less the `trim` bytes around it (ASCII
    whitespace; also the comma between JSON array elements). A record with nothing
    else is empty.

    Returns:
        A large binary array, one text per record.
    """
    n = len(starts)
    if not n:
        return pa.array([], pa.large_binary())
    arr = np.frombuffer(data, dtype=np.uint8)
    keep = np.flatnonzero(~np.isin(arr, np.frombuffer(trim, dtype=np.uint8)))
    ends = np.append(np.asarray(starts[1:], dtype=np.int64), int(stops[-1]))
    index = np.searchsorted(keep, starts)
    first = np.where(index < keep.size, keep[np.minimum(index, keep.size - 1)], ends)
    first = np.minimum(first, ends)
    offsets = np.append(first, int(stops[-1])).astype(np.int64)
    # Each span runs to the next record's first byte: what lies between is only
    # `trim` bytes, cut off from the end (byte-wise: safe for UTF-8).
    spans = pa.Array.from_buffers(
        pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    trimmed = pc.ascii_rtrim(spans, characters=trim.decode("ascii"))
    return trimmed.view(pa.large_binary())


def decode_json(
    texts: pa.Array, *, fields: dict[str, str], refs: pa.Array
) -> pa.RecordBatch:
    """One batch of JSON records; unparsable ones become error rows.

    Args:
        texts: each record's JSON text (binary; UTF-8 expected).
        fields: declared top-level fields and their types (`FIELD_TYPES` names).
        refs: the `_source_ref` of each record.

    Returns:
        A batch with `json_batch_schema(fields)`.
    """
    n = len(texts)
    errors: list[str | None] = [None] * n
    strings = _as_strings(texts, errors)
    schema = pa.schema(
        [
            pa.field(name, pa.string() if kind == "date" else FIELD_TYPES[kind])
            for name, kind in fields.items()
        ]
    )
    good = list(range(n)) if not any(errors) else [i for i in range(n) if not errors[i]]
    table = None
    if len(good) == n:
        table = _read_lines(strings, schema)
    if table is None or table.num_rows != n:
        good, table = _isolate(strings, schema, fields, errors)
    positions = np.full(n, -1, dtype=np.int64)
    positions[good] = np.arange(len(good))
    take = pa.array(positions, mask=positions < 0)
    typed = []
    for name, kind in fields.items():
        column = table.column(name).combine_chunks() if table.num_rows else None
        column = (
            column.take(take)
            if column is not None
            else pa.nulls(n, schema.field(name).type)
        )
        if kind == "date":
            column = to_dates(name, column, errors)
        typed.append(column)
    record = strings.cast(pa.string()) if n else pa.array([], pa.string())
    bad = [i for i, e in enumerate(errors) if e is not None]
    raw = pa.nulls(n, pa.string())
    if bad:
        mask_np = np.zeros(n, dtype=bool)
        mask_np[bad] = True
        mask = pa.array(mask_np)
        raw_values: list[str | None] = [None] * n
        for i in bad:
            raw_values[i] = texts[i].as_py().decode("utf-8", "replace")
        raw = pa.array(raw_values, pa.string())
        record = pc.if_else(mask, pa.nulls(n, pa.string()), record)
        typed = [pc.if_else(mask, pa.nulls(n, c.type), c) for c in typed]
    arrays = [*typed, record, refs, pa.array(errors, pa.string()), raw]
    return pa.RecordBatch.from_arrays(arrays, schema=json_batch_schema(fields))


def _as_strings(texts: pa.Array, errors: list[str | None]) -> pa.Array:
    """UTF-8 text per record; invalid UTF-8 is that record's error."""
    large = texts.cast(pa.large_binary())
    try:
        return large.cast(pa.large_string())
    except pa.ArrowInvalid:
        pass
    values: list[str | None] = []
    for i, value in enumerate(large.to_pylist()):
        try:
            values.append(value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            errors[i] = f"not valid UTF-8: {exc.reason} at byte {exc.start}"
            values.append("")
    return pa.array(values, pa.large_string())


def _one_line_each(strings: pa.Array) -> pa.Buffer:
    """The texts joined by newlines, with their own newlines flattened to spaces.

    Newlines are only ever whitespace in a JSON text (escaped inside strings), so
    flattening them keeps each record on the one line Arrow's reader expects.
    """
    flat = pc.replace_substring(strings, "\n", " ")
    flat = pc.replace_substring(flat, "\r", " ")
    joined = pc.binary_join_element_wise(
        flat,
        pa.scalar("\n", pa.large_string()),
        pa.scalar("", pa.large_string()),
    )
    joined = joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int64)
    start = int(offsets[joined.offset])
    stop = int(offsets[joined.offset + len(joined)])
    return joined.buffers()[2][start:stop]  # type: ignore[no-any-return]


def _read_lines(strings: pa.Array, schema: pa.Schema) -> pa.Table | None:
    """Parse every text with Arrow's reader; None when any of them fails."""
    if not len(strings):
        return schema.empty_table()
    if pc.any(pc.equal(pc.utf8_length(strings), 0)).as_py():
        return None  # an empty text: a blank element (`[1,,2]`)
    try:
        return pajson.read_json(
            _one_line_each(strings),
            read_options=pajson.ReadOptions(block_size=1 << 24),
            parse_options=pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"
            ),
        )
    except ARROW_ERRORS:
        return None


def _isolate(
    strings: pa.Array,
    schema: pa.Schema,
    fields: dict[str, str],
    errors: list[str | None],
) -> tuple[list[int], pa.Table]:
    """Find the bad records one by one; parse the good ones as on the fast path."""
    objects: list[tuple[int, str]] = []
    for i, text in enumerate(strings.to_pylist()):
        if errors[i] is not None:
            continue
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            errors[i] = f"invalid JSON: {exc}"
            continue
        if isinstance(parsed, dict):
            objects.append((i, text))
        elif fields:
            errors[i] = f"expected a JSON object, got {_json_type(parsed)}"
    lines = [(i, t.replace("\n", " ").replace("\r", " ").encode()) for i, t in objects]
    table = read_json_isolating(lines, schema, errors)
    # Records that are valid JSON but not objects (no declared fields) have no row
    # in `table`: they keep NULL typed columns (there are none).
    good = [i for i, _ in objects if errors[i] is None]
    return good, table


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "null" if value is None else "object"


# -- Avro ---------------------------------------------------------------------------


class _NotNative(Exception):
    """A nested Avro type with no Arrow counterpart here (a union of several
    types, a reference to a named type): the field travels as JSON text."""


def _nested_arrow_type(kind: Any) -> pa.DataType:
    """The Arrow type of an Avro type inside a record, array or map.

    Raises:
        _NotNative: a union of several types or a named-type reference.
    """
    if isinstance(kind, list):
        others = [k for k in kind if k != "null"]
        if len(others) != 1:
            raise _NotNative
        return _nested_arrow_type(others[0])
    if isinstance(kind, dict):
        base = kind.get("type")
        if base == "record" and not kind.get("logicalType"):
            return pa.struct(
                [
                    pa.field(f["name"], _nested_arrow_type(f["type"]))
                    for f in kind["fields"]
                ]
            )
        if base == "array":
            return pa.list_(_nested_arrow_type(kind["items"]))
        if base == "map":
            return pa.map_(pa.string(), _nested_arrow_type(kind["values"]))
        arrow, is_json = avro_to_arrow_type(kind)
    elif kind in _AVRO_PRIMITIVES:
        arrow, is_json = _AVRO_PRIMITIVES[kind]
    else:
        raise _NotNative  # a named type's reference
    if is_json:
        raise _NotNative
    return arrow


_AVRO_PRIMITIVES: dict[str, tuple[pa.DataType, bool]] = {
    "string": (pa.string(), False),
    "int": (pa.int32(), False),
    "long": (pa.int64(), False),
    "float": (pa.float32(), False),
    "double": (pa.float64(), False),
    "boolean": (pa.bool_(), False),
    "bytes": (pa.binary(), False),
    "null": (pa.null(), False),
}


def avro_to_arrow_type(kind: Any) -> tuple[pa.DataType, bool]:
    """The Arrow type of an Avro field type, and whether values travel as JSON text.

    `["null", T]` unions are T (nullable); records become structs, arrays lists
    and maps maps (string keys), their members typed the same way. Unions of
    several types, and nested types that contain one or refer to a named type,
    become JSON text columns.
    """
    if isinstance(kind, list):
        others = [k for k in kind if k != "null"]
        if len(others) == 1:
            return avro_to_arrow_type(others[0])
        return pa.string(), True
    if isinstance(kind, dict):
        logical = kind.get("logicalType")
        base = kind.get("type")
        if logical == "date":
            return pa.date32(), False
        if logical == "timestamp-millis":
            return pa.timestamp("ms", tz="UTC"), False
        if logical == "timestamp-micros":
            return pa.timestamp("us", tz="UTC"), False
        if logical == "local-timestamp-millis":
            return pa.timestamp("ms"), False
        if logical == "local-timestamp-micros":
            return pa.timestamp("us"), False
        if logical == "time-millis":
            return pa.time32("ms"), False
        if logical == "time-micros":
            return pa.time64("us"), False
        if logical == "decimal":
            return pa.decimal128(
                int(kind["precision"]), int(kind.get("scale", 0))
            ), False
        if logical == "uuid":
            return pa.string(), False
        if base == "enum":
            return pa.string(), False
        if base == "fixed":
            return pa.binary(), False
        if base in ("record", "array", "map"):
            try:
                return _nested_arrow_type(kind), False
            except _NotNative:
                return pa.string(), True
        return avro_to_arrow_type(base)
    return _AVRO_PRIMITIVES.get(kind, (pa.string(), True))


def avro_arrow_schema(
    writer_schema: Any, rename: Any = None
) -> tuple[pa.Schema, list[str], list[str]]:
    """The Arrow schema of an Avro record's fields, its JSON fields, its field names.

    `rename(name)` gives the column name of a field (the field's own by default).
    """
    if not isinstance(writer_schema, dict) or writer_schema.get("type") != "record":
        raise ValueError("the file's Avro schema is not a record")
    columns = []
    as_json: list[str] = []
    fields: list[str] = []
    for fld in writer_schema["fields"]:
        kind, is_json = avro_to_arrow_type(fld["type"])
        name = rename(fld["name"]) if rename else fld["name"]
        if is_json:  # a nested value: written out as JSON text
            columns.append(json_field(name))
            as_json.append(fld["name"])
        elif fld.get("dis.type") == "json" and kind == pa.string():
            columns.append(json_field(name))  # JSON text already (our sink)
        else:
            columns.append(pa.field(name, kind))
        fields.append(fld["name"])
    return pa.schema(columns), as_json, fields


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.time):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def to_json_text(value: Any) -> str | None:
    """Compact JSON text of a value (bytes as base64, decimals as strings)."""
    if value is None:
        return None
    return orjson.dumps(value, default=_json_default).decode()


def avro_records_to_batch(
    records: list[dict[str, Any]],
    schema: pa.Schema,
    as_json: list[str],
    names: list[str],
    refs: pa.Array,
) -> pa.RecordBatch:
    """Avro records (dicts) as a batch with `schema` plus the system columns.

    `names` are the record fields behind the schema's columns, in order.
    """
    n = len(records)
    arrays = []
    for fld, name in zip(schema, names, strict=True):
        values = [record.get(name) for record in records]
        if name in as_json:
            values = [to_json_text(v) for v in values]
        arrays.append(pa.array(values, fld.type))
    arrays += [refs, pa.nulls(n, pa.string()), pa.nulls(n, pa.string())]
    full = pa.schema(
        [
            *schema,
            pa.field(SOURCE_REF_COLUMN, pa.string()),
            pa.field(READ_ERROR_COLUMN, pa.string()),
            pa.field(RAW_COLUMN, pa.string()),
        ]
    )
    return pa.RecordBatch.from_arrays(arrays, schema=full)
