"""What the SQL sinks share: write options, Arrow type checks, identifier rules.

Pure Python (no Django, no database driver).
"""

from __future__ import annotations

import hashlib
from typing import Any

import marshmallow
import pyarrow as pa
from marshmallow import fields, validate

from connectors.base import CHUNK_SEQ_COLUMN, RUN_ID_COLUMN, SYSTEM_COLUMNS
from connectors.exceptions import ConfigError

#: Field metadata that marks a string column as JSON text (besides `pa.json_()`).
JSON_METADATA_KEY = b"dis.type"
JSON_METADATA_VALUE = b"json"

#: PostgreSQL truncates longer identifiers silently; we refuse them instead.
MAX_IDENTIFIER_BYTES = 63

WRITE_MODES = ("append",)


def _identifier(value: str) -> None:
    if not value or len(value.encode()) > MAX_IDENTIFIER_BYTES or "\x00" in value:
        raise marshmallow.ValidationError(
            f"Must be 1 to {MAX_IDENTIFIER_BYTES} bytes, without NUL."
        )


class SqlWriteOptions(marshmallow.Schema):
    """A pipeline's write options for a SQL sink (`schema` default set per dialect)."""

    table = fields.String(required=True, validate=_identifier)
    schema = fields.String(load_default="public", validate=_identifier)
    write_mode = fields.String(
        load_default="append", validate=validate.OneOf(WRITE_MODES)
    )


def load_write_options(
    options: dict[str, Any], *, default_schema: str
) -> dict[str, Any]:
    """Validate a sink's write options.

    Args:
        options: the pipeline's write options.
        default_schema: the schema used when the options name none.

    Returns:
        The loaded options (`table`, `schema`, `write_mode`).

    Raises:
        ConfigError: with `.errors` from marshmallow.
    """
    try:
        loaded: dict[str, Any] = SqlWriteOptions().load(
            {"schema": default_schema, **options}
        )
    except marshmallow.ValidationError as exc:
        error = ConfigError(f"invalid write options: {exc.normalized_messages()}")
        error.errors = exc.normalized_messages()
        raise error from None
    return loaded


def is_json(field: pa.Field) -> bool:
    """Whether `field` holds JSON text (arrow.json extension or `dis.type` metadata)."""
    if isinstance(field.type, pa.JsonType):
        return True
    return (field.metadata or {}).get(JSON_METADATA_KEY) == JSON_METADATA_VALUE


def data_fields(schema: pa.Schema) -> list[pa.Field]:
    """The fields of `schema` that are data (system columns left out), checked.

    Raises:
        ConfigError: a column name that is empty, too long or repeated.
    """
    names = [f.name for f in schema if f.name not in SYSTEM_COLUMNS]
    bad = [n for n in names if not n or len(n.encode()) > MAX_IDENTIFIER_BYTES]
    if bad:
        raise ConfigError(
            f"column names must be 1 to {MAX_IDENTIFIER_BYTES} bytes: {bad!r}"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"duplicate column names: {', '.join(duplicates)}")
    return [f for f in schema if f.name not in SYSTEM_COLUMNS]


def with_system_columns(table: pa.Table, *, run_id: int, chunk_seq: int) -> pa.Table:
    """`table` plus constant `_run_id` (int64) and `_chunk_seq` (int32) columns.

    Any `_run_id` / `_chunk_seq` the table already carries is replaced.
    """
    stale = [n for n in (RUN_ID_COLUMN, CHUNK_SEQ_COLUMN) if n in table.column_names]
    table = table.drop_columns(stale)
    n = table.num_rows
    table = table.append_column(
        pa.field(RUN_ID_COLUMN, pa.int64()),
        pa.repeat(pa.scalar(run_id, pa.int64()), n),
    )
    return table.append_column(
        pa.field(CHUNK_SEQ_COLUMN, pa.int32()),
        pa.repeat(pa.scalar(chunk_seq, pa.int32()), n),
    )


def lock_key(*parts: object) -> int:
    """A stable signed 32-bit key (for the two-int advisory lock form) from `parts`."""
    text = "\x00".join(map(str, parts)).encode()
    digest = hashlib.blake2b(text, digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def missing_columns(required: list[str], existing: set[str]) -> list[str]:
    """The names in `required` that are not in `existing`, in order."""
    return [name for name in required if name not in existing]


def unsupported(field: pa.Field, dialect: str) -> ConfigError:
    """The error for an Arrow type a dialect cannot store."""
    return ConfigError(
        f"column {field.name!r}: Arrow type {field.type} cannot be stored in {dialect}"
    )
