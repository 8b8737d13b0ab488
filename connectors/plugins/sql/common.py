"""What the SQL connectors share: options, Arrow type checks, identifier rules.

Pure Python (no Django, no database driver).
"""

from __future__ import annotations

import hashlib
from typing import Any

import marshmallow
import pyarrow as pa
import pyarrow.compute as pc
from marshmallow import fields, validate, validates_schema

from connectors.base import (
    CHUNK_SEQ_COLUMN,
    RUN_ID_COLUMN,
    SOURCE_REF_COLUMN,
    SYSTEM_COLUMNS,
)
from connectors.exceptions import ConfigError, TerminalError

#: Field metadata that marks a string column as JSON text (besides `pa.json_()`).
JSON_METADATA_KEY = b"dis.type"
JSON_METADATA_VALUE = b"json"

#: PostgreSQL truncates longer identifiers silently; we refuse them instead.
MAX_IDENTIFIER_BYTES = 63

WRITE_MODES = ("append", "upsert", "replace")
EVOLVE_POLICIES = ("fail", "add_columns")
#: Suffix of the staging table a `replace` run appends into before the swap.
STAGING_INFIX = "__dis_run_"


def _identifier(value: str) -> None:
    if not value or len(value.encode()) > MAX_IDENTIFIER_BYTES or "\x00" in value:
        raise marshmallow.ValidationError(
            f"Must be 1 to {MAX_IDENTIFIER_BYTES} bytes, without NUL."
        )


class KeyList(fields.List):
    """A list of column names; a single name is accepted for a one-column key."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(fields.String(validate=_identifier), **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        names = super()._deserialize(value, attr, data, **kwargs)
        if not names:
            raise marshmallow.ValidationError("Name at least one column.")
        if len(set(names)) != len(names):
            raise marshmallow.ValidationError("A column is named twice.")
        return names


class SqlWriteOptions(marshmallow.Schema):
    """A pipeline's write options for a SQL sink (`schema` default set per dialect).

    `key` names the columns an `upsert` matches rows on (required for it);
    `evolve` says what `prepare` does when an existing table lacks data columns.
    """

    table = fields.String(required=True, validate=_identifier)
    schema = fields.String(load_default="public", validate=_identifier)
    write_mode = fields.String(
        load_default="append", validate=validate.OneOf(WRITE_MODES)
    )
    key = KeyList(load_default=None)
    evolve = fields.String(
        load_default="fail", validate=validate.OneOf(EVOLVE_POLICIES)
    )

    @validates_schema
    def _key_for_upsert(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("write_mode") == "upsert" and not data.get("key"):
            raise marshmallow.ValidationError(
                "Required when write_mode is upsert.", field_name="key"
            )
        system = sorted(set(data.get("key") or ()) & set(SYSTEM_COLUMNS))
        if system:
            raise marshmallow.ValidationError(
                f"System columns cannot be keys: {', '.join(system)}.",
                field_name="key",
            )
        if data.get("table", "").find(STAGING_INFIX) >= 0:
            raise marshmallow.ValidationError(
                f"Must not contain {STAGING_INFIX!r} (reserved for staging tables).",
                field_name="table",
            )


def load_write_options(
    options: dict[str, Any], *, default_schema: str
) -> dict[str, Any]:
    """Validate a sink's write options.

    Args:
        options: the pipeline's write options.
        default_schema: the schema used when the options name none.

    Returns:
        The loaded options (`table`, `schema`, `write_mode`, `key`, `evolve`).

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


def columns_to_add(
    opts: dict[str, Any], types: dict[str, str], existing: set[str], label: str
) -> list[str]:
    """The data columns an existing table must gain (schema drift), in order.

    Args:
        opts: the loaded write options (`evolve` decides).
        types: the wanted data columns and their SQL types.
        existing: the table's column names.
        label: the table as the error names it.

    Raises:
        TerminalError: columns are missing and may not (or, for system columns,
            cannot) be added; the message names them.
    """
    missing = missing_columns([*types, *SYSTEM_COLUMNS], existing)
    addable = [name for name in missing if name in types]
    if opts["evolve"] == "add_columns" and addable == missing:
        return addable
    if missing:
        hint = (
            "add them or write to another table"
            if opts["evolve"] == "add_columns"
            else "add them, set evolve: add_columns, or write to another table"
        )
        raise TerminalError(
            f"table {label} exists but lacks column(s) {', '.join(missing)}: {hint}"
        )
    return []


def unsupported(field: pa.Field, dialect: str) -> ConfigError:
    """The error for an Arrow type a dialect cannot store."""
    return ConfigError(
        f"column {field.name!r}: Arrow type {field.type} cannot be stored in {dialect}"
    )


def staging_table(table: str, run_id: int) -> str:
    """The name of the table a `replace` run stages into: `<table>__dis_run_<run>`.

    A name that would pass the identifier limit keeps a hash of the table name.
    """
    name = f"{table}{STAGING_INFIX}{run_id}"
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        digest = hashlib.blake2b(table.encode(), digest_size=6).hexdigest()
        name = f"dis_{digest}{STAGING_INFIX}{run_id}"
    return name


def index_name(table: str, suffix: str) -> str:
    """`<table>_<suffix>`, or a hashed name when that passes the identifier limit."""
    name = f"{table}_{suffix}"
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        digest = hashlib.blake2b(table.encode(), digest_size=6).hexdigest()
        name = f"dis_{digest}_{suffix}"
    return name


def check_key_columns(key: list[str], names: list[str]) -> None:
    """Refuse an upsert key naming a column the data does not have.

    Raises:
        ConfigError: naming the missing key columns.
    """
    absent = [k for k in key if k not in names]
    if absent:
        raise ConfigError(f"key column(s) {', '.join(absent)} are not in the data")


def last_row_per_key(table: pa.Table, key: list[str]) -> pa.Table:
    """`table` with one row per key (the last by position), sorted by the key.

    Raises:
        TerminalError: a key column holds NULL (it would never match a row).
    """
    for name in key:
        nulls = table.column(name).null_count
        if nulls:
            raise TerminalError(
                f"key column {name!r} is NULL in {nulls} row(s): upsert needs a key"
            )
    if table.num_rows == 0:
        return table
    position = "__dis_position"
    indexed = table.select(key).append_column(
        position, pa.array(range(table.num_rows), pa.int64())
    )
    last = indexed.group_by(key, use_threads=False).aggregate([(position, "max")])
    last = last.sort_by([(name, "ascending") for name in key])
    return table.take(last.column(f"{position}_max"))


def source_refs(prefix: str, table: pa.Table | pa.RecordBatch, key: list[str]) -> Any:
    """`<prefix>#<key>` per row (composite keys joined by `,`), vectorised."""
    parts = [pc.cast(table.column(name), pa.string()) for name in key]
    joined = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, ",")
    return pc.binary_join_element_wise(f"{prefix}#", joined, "")


def without_source_ref(schema: pa.Schema) -> pa.Schema:
    """`schema` without a `_source_ref` field (what a source's data columns are)."""
    index = schema.get_field_index(SOURCE_REF_COLUMN)
    return schema if index < 0 else schema.remove(index)
