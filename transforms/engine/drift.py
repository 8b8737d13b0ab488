"""Schema drift: how a batch's columns differ from a pipeline's source schema.

A source schema is a list of ``{"name": ..., "type": ...}`` where the type is a
map field type label (``string``, ``integer``, ``float``, ``decimal(p,s)``,
``boolean``, ``date``, ``timestamp``, ``timestamptz``, ``json``) or, for a
column no field type describes (lists, structs...), DuckDB's own type name in
lower case. ``detect`` finds the batch's new columns and the known columns
whose values no longer fit their known type (a value fits when the map step's
strict cast converts it exactly: ``'12'`` fits ``integer``, ``'n/a'`` does
not; a blank string counts as missing). Vectorised: one DuckDB query per
column whose type differs, none when nothing does. Pure Python (no Django).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from transforms.engine.connection import connect
from transforms.engine.fieldtypes import TYPE_NAMES, FieldType, strict_cast
from transforms.engine.sql import quote_ident

#: Columns a source or the service adds next to the data: never drift.
META_COLUMNS = ("_source_ref", "_read_error", "_raw", "_run_id", "_chunk_seq")

_DECIMAL_LABEL = re.compile(r"^decimal\((\d+),(\d+)\)$")
_VIEW = "dis_drift_batch"


class SchemaDefinitionError(ValueError):
    """A source schema that is not a list of ``{"name", "type"}`` objects."""


@dataclass(frozen=True)
class TypeChange:
    """A known column whose values in the batch do not all fit its known type.

    Attributes:
        name: the column.
        old_type: its type in the source schema.
        new_type: the type the batch gives it.
        misfits: per row, whether its value does not fit ``old_type``.
    """

    name: str
    old_type: str
    new_type: str
    misfits: pa.BooleanArray


@dataclass(frozen=True)
class Drift:
    """How a batch differs from a source schema.

    Attributes:
        new_columns: columns the schema lacks, with the type the batch gives
            them, in batch order.
        type_changes: known columns with values that do not fit their type.
    """

    new_columns: list[dict[str, str]] = field(default_factory=list)
    type_changes: list[TypeChange] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.new_columns or self.type_changes)

    @property
    def new_names(self) -> list[str]:
        return [c["name"] for c in self.new_columns]


def check_schema(schema: Any) -> list[dict[str, str]]:
    """Validate a source schema definition and return it normalised.

    Raises:
        SchemaDefinitionError: naming the entry that is wrong.
    """
    if not isinstance(schema, list):
        raise SchemaDefinitionError('must be a list of {"name": ..., "type": ...}')
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    for i, entry in enumerate(schema):
        if not isinstance(entry, dict) or set(entry) != {"name", "type"}:
            raise SchemaDefinitionError(f"entry {i}: needs exactly name and type")
        name, type_ = entry["name"], entry["type"]
        if not isinstance(name, str) or not name or name in META_COLUMNS:
            raise SchemaDefinitionError(f"entry {i}: bad column name {name!r}")
        if not isinstance(type_, str) or not type_:
            raise SchemaDefinitionError(f"entry {i}: bad type {type_!r}")
        if name in seen:
            raise SchemaDefinitionError(f"entry {i}: column {name!r} named twice")
        seen.add(name)
        out.append({"name": name, "type": type_.lower()})
    return out


def _field_type(label: str) -> FieldType | None:
    """The map field type a type label names, None for other (nested) types."""
    if label in TYPE_NAMES and label != "decimal":
        return FieldType(label)
    match = _DECIMAL_LABEL.match(label)
    if match:
        return FieldType("decimal", int(match.group(1)), int(match.group(2)))
    return None


def _data_columns(table: pa.Table) -> list[str]:
    return [name for name in table.column_names if name not in META_COLUMNS]


def _duckdb_types(
    con: duckdb.DuckDBPyConnection, table: pa.Table, names: Sequence[str]
) -> dict[str, str]:
    if not names:
        return {}
    relation = con.from_arrow(table.select(list(names)).slice(0, 0))
    return {name: str(type_) for name, type_ in zip(names, relation.types, strict=True)}


def _label(duckdb_type: str) -> str:
    """The type label of a DuckDB column type (see the module doc)."""
    from transforms.engine.fieldtypes import field_type_of

    found = field_type_of(duckdb_type)
    if found is None:
        return duckdb_type.lower()
    return found.label


def infer_schema(table: pa.Table) -> list[dict[str, str]]:
    """The source schema a batch has: its data columns and their type labels."""
    con = connect(timezone="UTC", threads=1, memory_limit="256MB")
    try:
        types = _duckdb_types(con, table, _data_columns(table))
    finally:
        con.close()
    return [{"name": name, "type": _label(t)} for name, t in types.items()]


def detect(table: pa.Table, schema: Sequence[dict[str, str]]) -> Drift:
    """Compare a batch with a source schema.

    Args:
        table: the batch as the source read it.
        schema: the known source schema (``check_schema``'s form).

    Returns:
        The new columns and the type changes (empty when the batch fits).
    """
    known = {c["name"]: c["type"] for c in schema}
    names = _data_columns(table)
    if not names:
        return Drift()
    con = connect(timezone="UTC", threads=1, memory_limit="256MB")
    try:
        types = _duckdb_types(con, table, names)
        new_columns = [
            {"name": n, "type": _label(types[n])} for n in names if n not in known
        ]
        changes: list[TypeChange] = []
        differing = [n for n in names if n in known and _label(types[n]) != known[n]]
        if differing:
            con.register(_VIEW, table.select(differing))
            for name in differing:
                misfits = _misfits(con, name, types[name], known[name])
                if pc.any(misfits).as_py():
                    changes.append(
                        TypeChange(name, known[name], _label(types[name]), misfits)
                    )
    finally:
        con.close()
    return Drift(new_columns, changes)


def _misfits(
    con: duckdb.DuckDBPyConnection, name: str, source_type: str, known: str
) -> pa.BooleanArray:
    """Per row: the value is present and does not convert exactly to ``known``."""
    column = quote_ident(name)
    target = _field_type(known)
    if target is None:
        # No strict cast to a nested type: every present value misfits.
        sql = f"SELECT {column} IS NOT NULL FROM {_VIEW}"  # noqa: S608 - quoted
    else:
        cast = strict_cast(source_type, target, raw=column, present="p")
        # Identifiers are quoted and literals escaped by quote_ident/strict_cast.
        sql = (
            f"SELECT p IS NOT NULL AND ({cast.value}) IS NULL "  # noqa: S608
            f"FROM (SELECT {cast.present} AS p FROM {_VIEW})"
        )
    result = con.sql(sql).to_arrow_table()
    array = result.column(0).combine_chunks()
    return pc.fill_null(array, False)


def carries_values(table: pa.Table, names: Sequence[str]) -> pa.BooleanArray:
    """Per row: whether any of the columns ``names`` holds a value (not NULL,
    not a blank string)."""
    mask = pa.array([False] * table.num_rows, pa.bool_())
    for name in names:
        column = table.column(name).combine_chunks()
        present = pc.is_valid(column)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), False)
            present = pc.and_(present, pc.invert(blank))
        mask = pc.or_(mask, present)
    return mask


def widen(schema: Sequence[dict[str, str]], drift: Drift) -> list[dict[str, str]]:
    """The source schema with the drift applied: new columns appended, changed
    columns given the batch's type."""
    changed = {c.name: c.new_type for c in drift.type_changes}
    out = [
        {"name": c["name"], "type": changed.get(c["name"], c["type"])} for c in schema
    ]
    have = {c["name"] for c in out}
    out += [dict(c) for c in drift.new_columns if c["name"] not in have]
    return out
