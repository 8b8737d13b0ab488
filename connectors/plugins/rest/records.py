"""From JSON responses to Arrow batches: record paths, typed fields, Link headers.

A REST record has no fixed shape, so each one travels whole as compact JSON in the
`record` column (field metadata `dis.type: json`); the fields a pipeline declares
are also pulled out into typed columns. A declared field with a value of the wrong
type is that record's error (`_read_error`, with the record in `_raw`), never the
batch's. Pure Python (no Django).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pyarrow as pa

from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import TerminalError

#: The whole record as compact JSON.
RECORD_COLUMN = "record"
#: Set on records a declared field could not be read from (see the files source).
READ_ERROR_COLUMN = "_read_error"
#: The record's JSON when `_read_error` is set, for dead-lettering.
RAW_COLUMN = "_raw"
JSON_FIELD_METADATA = {b"dis.type": b"json"}

FIELD_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "float": pa.float64(),
    "boolean": pa.bool_(),
}
RESERVED_NAMES = (RECORD_COLUMN, SOURCE_REF_COLUMN, READ_ERROR_COLUMN, RAW_COLUMN)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MISSING = object()
_LINK = re.compile(r"<([^>]*)>\s*((?:;\s*[^;,]*)*)")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_path(path: str | None) -> list[str | int]:
    """Split a record path (`data.items`, `$.data.items`, `results[0].rows`).

    Returns:
        Keys (str) and list indexes (int); empty for the document itself.
    """
    if not path:
        return []
    text = path.strip()
    if text.startswith("$"):
        text = text[1:].lstrip(".")
    parts: list[str | int] = []
    for key, index in _PATH_PART.findall(text):
        parts.append(int(index) if index else key)
    return parts


def dig(document: Any, path: list[str | int], default: Any = _MISSING) -> Any:
    """The value at `path` in `document`; `default` (or KeyError) when missing."""
    value = document
    for part in path:
        if (
            isinstance(part, int) and isinstance(value, list) and part < len(value)
        ) or (isinstance(part, str) and isinstance(value, dict) and part in value):
            value = value[part]
        elif (
            isinstance(part, str)
            and part.isdigit()
            and isinstance(value, list)
            and int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            if default is _MISSING:
                raise KeyError(part)
            return default
    return value


def extract_records(document: Any, path: str | None) -> list[Any]:
    """The records of a response: the list at `path` (null = no records).

    An object at the path is one record; a missing path is an error (a wrong path
    would otherwise read nothing, silently).

    Raises:
        TerminalError: the path is missing or leads to a scalar.
    """
    try:
        value = dig(document, parse_path(path))
    except KeyError:
        raise TerminalError(f"records_path {path!r} is not in the response") from None
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value]
    raise TerminalError(
        f"records_path {path or '$'!r} leads to a {type(value).__name__}, "
        "not a list of records"
    )


def next_link(header: str | None) -> str | None:
    """The `rel="next"` target of an RFC 8288 (5988) `Link` header, if any."""
    if not header:
        return None
    for match in _LINK.finditer(header):
        target, params = match.group(1), match.group(2)
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "rel":
                rels = value.strip().strip('"').lower().split()
                if "next" in rels:
                    return target.strip()
    return None


def _type_error(name: str, kind: str, value: Any) -> str | None:
    """Why `value` cannot be a `kind` field, or None when it can."""
    if kind == "string":
        ok = isinstance(value, str)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not _INT64_MIN <= value <= _INT64_MAX:
            return f"field {name!r}: integer out of the 64-bit range"
    else:  # float
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        return None
    return f"field {name!r}: expected {kind}, got {_json_type(value)}"


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
    return "object"


def batch_schema(fields: dict[str, str]) -> pa.Schema:
    """The schema of every batch: declared fields, `record`, then system columns."""
    columns = [pa.field(name, FIELD_TYPES[kind]) for name, kind in fields.items()]
    columns += [
        pa.field(RECORD_COLUMN, pa.string(), metadata=JSON_FIELD_METADATA),
        pa.field(SOURCE_REF_COLUMN, pa.string()),
        pa.field(READ_ERROR_COLUMN, pa.string()),
        pa.field(RAW_COLUMN, pa.string()),
    ]
    return pa.schema(columns)


def records_to_batch(
    records: list[Any], *, ref_prefix: str, fields: dict[str, str]
) -> pa.RecordBatch:
    """One Arrow batch of a page's records.

    Args:
        records: the page's records (any JSON values; objects expected).
        ref_prefix: `_source_ref` of record i is `f"{ref_prefix}#{i}"`.
        fields: declared top-level fields and their types (`string`, `integer`,
            `float`, `boolean`).

    Returns:
        A batch with the schema of `batch_schema(fields)`.
    """
    texts = [orjson.dumps(record).decode() for record in records]
    columns: dict[str, list[Any]] = {name: [] for name in fields}
    errors: list[str | None] = []
    for record in records:
        problems: list[str] = []
        if fields and not isinstance(record, dict):
            problems.append(f"record is a JSON {_json_type(record)}, not an object")
        for name, kind in fields.items():
            value = record.get(name) if isinstance(record, dict) else None
            if value is not None:
                problem = _type_error(name, kind, value)
                if problem:
                    problems.append(problem)
                    value = None
            columns[name].append(value)
        errors.append("; ".join(problems) or None)
    raw = [text if error else None for text, error in zip(texts, errors, strict=True)]
    schema = batch_schema(fields)
    arrays = [
        pa.array(columns[name], FIELD_TYPES[kind]) for name, kind in fields.items()
    ]
    arrays += [
        pa.array(texts, pa.string()),
        pa.array([f"{ref_prefix}#{i}" for i in range(len(records))], pa.string()),
        pa.array(errors, pa.string()),
        pa.array(raw, pa.string()),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def max_cursor(records: list[Any], field: str, current: Any) -> Any:
    """The largest `field` value among the records and `current` (None ignored).

    Values of another type than the running maximum (a string among numbers) are
    ignored rather than compared.
    """
    best = current
    for record in records:
        if not isinstance(record, dict):
            continue
        value = record.get(field)
        if value is None or isinstance(value, bool | dict | list):
            continue
        if best is None:
            best = value
            continue
        both_numbers = isinstance(value, int | float) and isinstance(best, int | float)
        if (both_numbers or type(value) is type(best)) and value > best:
            best = value
    return best
