"""Field types of the map step and their strict casts, rendered as DuckDB SQL.

A strict cast turns a value into the field's type only when it converts
exactly; otherwise the value becomes NULL and the caller reports a row error.
Every cast is one vectorised SQL expression: no per-record Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from transforms.engine.sql import sql_string

TYPE_NAMES = (
    "string",
    "integer",
    "float",
    "decimal",
    "boolean",
    "date",
    "timestamp",
    "timestamptz",
    "json",
)
DEFAULT_PRECISION = 18
DEFAULT_SCALE = 6
MAX_PRECISION = 38

TRUE_WORDS = ("true", "t", "1", "yes")
FALSE_WORDS = ("false", "f", "0", "no")

# RE2 patterns, matched in full against the value after trimming spaces.
_INTEGER_RE = r"[+-]?[0-9]+"
_FLOAT_RE = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_DATE_RE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_TIME_RE = r"(?:[T ](?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,6})?)?)"
_OFFSET_RE = r"(?:Z|[+-](?:[01][0-9]|2[0-3])(?::?[0-5][0-9])?)"
_TIMESTAMP_RE = rf"{_DATE_RE}{_TIME_RE}?"
_TIMESTAMPTZ_RE = rf"{_DATE_RE}(?:{_TIME_RE}{_OFFSET_RE}?)?"

_NUMERIC_SOURCE = re.compile(
    r"^(?:U?(?:TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT)|FLOAT|DOUBLE|DECIMAL\(.*\))$"
)
_INTEGER_SOURCE = re.compile(r"^U?(?:TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT)$")
_TEMPORAL_SOURCE = ("DATE", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE")
_STRING_SOURCE = ("VARCHAR",)


def _decimal_re(scale: int) -> str:
    """Pattern of a plain decimal with at most ``scale`` significant decimals.

    Trailing zeros beyond the scale are exact and therefore allowed.
    """
    if scale == 0:
        return r"[+-]?(?:[0-9]+(?:\.0*)?|\.0+)"
    return rf"[+-]?(?:[0-9]+(?:\.[0-9]{{0,{scale}}}0*)?|\.[0-9]{{1,{scale}}}0*)"


#: Metadata of a JSON output field: our logical type, and the tag connectors
#: read (JSON Lines embeds the value, SQL sinks create json/jsonb columns, Avro
#: marks the field).
JSON_FIELD_METADATA = {"logical_type": "json", "dis.type": "json"}


@dataclass(frozen=True)
class FieldType:
    """A map field's declared type: its config name, DuckDB type and Arrow type."""

    name: str
    precision: int = DEFAULT_PRECISION
    scale: int = DEFAULT_SCALE

    @property
    def label(self) -> str:
        """Name used in messages: ``integer``, ``decimal(10,2)``."""
        if self.name == "decimal":
            return f"decimal({self.precision},{self.scale})"
        return self.name

    @property
    def sql(self) -> str:
        """The DuckDB type the field is cast to."""
        return {
            "string": "VARCHAR",
            "integer": "BIGINT",
            "float": "DOUBLE",
            "decimal": f"DECIMAL({self.precision},{self.scale})",
            "boolean": "BOOLEAN",
            "date": "DATE",
            "timestamp": "TIMESTAMP",
            "timestamptz": "TIMESTAMPTZ",
            "json": "JSON",
        }[self.name]

    @property
    def arrow(self) -> pa.DataType:
        """The Arrow type of the field in the engine's output."""
        return {
            "string": pa.string(),
            "integer": pa.int64(),
            "float": pa.float64(),
            "decimal": pa.decimal128(self.precision, self.scale),
            "boolean": pa.bool_(),
            "date": pa.date32(),
            "timestamp": pa.timestamp("us"),
            "timestamptz": pa.timestamp("us", tz="UTC"),
            "json": pa.string(),
        }[self.name]

    @property
    def is_numeric(self) -> bool:
        """Whether range bounds of this type are numbers."""
        return self.name in ("integer", "float", "decimal")

    @property
    def is_temporal(self) -> bool:
        """Whether range bounds of this type are ISO date/time strings."""
        return self.name in ("date", "timestamp", "timestamptz")

    def arrow_field(self, name: str) -> pa.Field:
        """The output Arrow field; JSON is a string tagged in the metadata
        (``dis.type: json`` too: the tag sinks read to write JSON natively)."""
        metadata = JSON_FIELD_METADATA if self.name == "json" else None
        return pa.field(name, self.arrow, nullable=True, metadata=metadata)


def field_type_of(duckdb_type: str) -> FieldType | None:
    """The field type matching a DuckDB column type, or None if none does.

    Used for rules on source columns (no map step before them).
    """
    source = duckdb_type.upper()
    if _INTEGER_SOURCE.match(source):
        return FieldType("integer")
    decimal = re.match(r"^DECIMAL\((\d+),\s*(\d+)\)$", source)
    if decimal:
        return FieldType(
            "decimal", precision=int(decimal.group(1)), scale=int(decimal.group(2))
        )
    names = {
        "FLOAT": "float",
        "DOUBLE": "float",
        "VARCHAR": "string",
        "BOOLEAN": "boolean",
        "DATE": "date",
        "TIMESTAMP": "timestamp",
        "TIMESTAMP WITH TIME ZONE": "timestamptz",
        "JSON": "json",
    }
    return FieldType(names[source]) if source in names else None


@dataclass(frozen=True)
class StrictCast:
    """SQL of one strict cast, in two layers.

    Attributes:
        present: SQL over the raw value: the input normalised to NULL when it
            counts as missing (NULL, or a blank string for a non-string type).
        value: SQL over the ``present`` column: the converted value, NULL when
            missing or not convertible. A row error is
            ``present IS NOT NULL AND value IS NULL``.
    """

    present: str
    value: str


def strict_cast(
    source_type: str, target: FieldType, *, raw: str, present: str
) -> StrictCast:
    """Build the strict cast of a value of ``source_type`` to ``target``.

    Args:
        source_type: DuckDB type of the value as DuckDB prints it (``VARCHAR``).
        target: the field's declared type.
        raw: SQL (a column reference) of the value as the expression gave it.
        present: SQL (a column reference) the ``present`` layer is bound to.

    Returns:
        The SQL of both layers.
    """
    source = source_type.upper()
    x = present
    if source == target.sql.upper() or (
        target.name == "timestamptz" and source == "TIMESTAMP WITH TIME ZONE"
    ):
        return StrictCast(raw, x)
    if source in _STRING_SOURCE:
        return _cast_from_string(raw, x, target)
    if target.name == "string":
        return StrictCast(raw, f"CAST({x} AS VARCHAR)")
    if target.name == "json":
        return StrictCast(raw, f"CAST(to_json({x}) AS JSON)")
    if target.name == "boolean" and _INTEGER_SOURCE.match(source):
        return StrictCast(
            raw, f"CASE WHEN {x} = 1 THEN TRUE WHEN {x} = 0 THEN FALSE END"
        )
    narrowing = (
        target.name in ("integer", "decimal") and _NUMERIC_SOURCE.match(source)
    ) or (target.name == "date" and source in _TEMPORAL_SOURCE)
    if narrowing:
        # Exact only when converting back gives the same value: 517.5 -> 518
        # fails the round trip, 517.0 -> 517 passes it.
        cast = f"TRY_CAST({x} AS {target.sql})"
        return StrictCast(
            raw, f"CASE WHEN CAST({cast} AS {source_type}) = {x} THEN {cast} END"
        )
    if target.name == "float" and source in ("FLOAT", "DOUBLE"):
        return StrictCast(raw, f"CAST({x} AS DOUBLE)")
    return StrictCast(raw, f"TRY_CAST({x} AS {target.sql})")


def _cast_from_string(raw: str, p: str, target: FieldType) -> StrictCast:
    """Strict cast of a VARCHAR: a full-match pattern guards a TRY_CAST."""
    if target.name == "string":
        return StrictCast(raw, p)

    def guarded(pattern: str, sql_type: str) -> str:
        return (
            f"CASE WHEN regexp_full_match({p}, {sql_string(pattern)}) "
            f"THEN TRY_CAST({p} AS {sql_type}) END"
        )

    if target.name == "integer":
        value = guarded(_INTEGER_RE, "BIGINT")
    elif target.name == "float":
        value = (
            f"CASE WHEN regexp_full_match({p}, {sql_string(_FLOAT_RE)}) "
            f"AND isfinite(TRY_CAST({p} AS DOUBLE)) THEN TRY_CAST({p} AS DOUBLE) END"
        )
    elif target.name == "decimal":
        value = guarded(_decimal_re(target.scale), target.sql)
    elif target.name == "boolean":
        trues = ", ".join(sql_string(w) for w in TRUE_WORDS)
        falses = ", ".join(sql_string(w) for w in FALSE_WORDS)
        value = (
            f"CASE WHEN lower({p}) IN ({trues}) THEN TRUE "
            f"WHEN lower({p}) IN ({falses}) THEN FALSE END"
        )
    elif target.name == "date":
        value = guarded(_DATE_RE, "DATE")
    elif target.name == "timestamp":
        value = guarded(_TIMESTAMP_RE, "TIMESTAMP")
    elif target.name == "timestamptz":
        value = guarded(_TIMESTAMPTZ_RE, "TIMESTAMPTZ")
    else:  # json
        value = f"CASE WHEN json_valid({p}) THEN CAST({p} AS JSON) END"
    return StrictCast(f"NULLIF(trim({raw}), '')", value)
