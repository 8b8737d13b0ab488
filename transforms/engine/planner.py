"""Builds the DuckDB query of a step list for one input schema.

The query is a chain of CTEs over the registered batch, a few per step: a map
is a SELECT list of strict casts, a filter is a WHERE, a validate step adds
rule predicates. Every row carries its input row id (``__engine_rid``), its
error messages (``__engine_err``) and its first failing step
(``__engine_step``), so one query yields both output and rejected rows.

A plan is built in one of two modes. The normal plan runs user expressions as
written. The safe plan wraps each in ``TRY(...)`` and turns a raising
expression into a row error; it is only used for a batch where the normal
plan raised, so well-behaved batches pay nothing for it.
"""

# The whole module renders SQL: identifiers go through quote_ident, literals
# through sql_string/sql_scalar, user expressions through check_expression.
# ruff: noqa: S608

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from transforms.engine.connection import first_line
from transforms.engine.exceptions import InputSchemaError, StepConfigError
from transforms.engine.expressions import (
    INTERNAL_PREFIX,
    bare_column,
    expression_columns,
)
from transforms.engine.fieldtypes import FieldType, field_type_of, strict_cast
from transforms.engine.masking import mask_sql
from transforms.engine.sql import (
    Scalar,
    quote_ident,
    render_scalar,
    sql_scalar,
    sql_string,
)
from transforms.engine.steps import (
    DEDUPE_KEY_COLUMN,
    ERROR_COLUMN,
    SOURCE_REF,
    STEP_COLUMN,
    UNIQUE_PREFIX,
    AggregateStep,
    DeduplicateStep,
    EnrichStep,
    FilterStep,
    MapField,
    MapStep,
    MaskField,
    MaskStep,
    Rule,
    Step,
    ValidateStep,
)

BATCH_VIEW = "__engine_batch"
RID = "__engine_rid"
ERR = "__engine_err"
STEP = "__engine_step"
RAISED = "__engine_raised"
NEW = "__engine_new"
NEW_RAISED = "__engine_new_raised"
INTERNAL_COLUMNS = (RID, ERR, STEP, RAISED)
# Hidden columns: a JSON payload kept for a json_schema rule, checked after
# the query; an aggregate measure's input value.
JSON_PREFIX = f"{INTERNAL_PREFIX}_json_"
MEASURE_PREFIX = f"{INTERNAL_PREFIX}_measure_"
MAX_VALUE_CHARS = 100
# Reference datasets: the registered table, its row position, and the tables
# materialised from it (see reference_tables).
REF_SOURCE = f"{INTERNAL_PREFIX}_ref_source"
REF_POS = f"{INTERNAL_PREFIX}_ref_pos"
REF_VALUE = f"{INTERNAL_PREFIX}_ref_value"
# Hidden columns of deduplicate: the key hash, and how many rows a kept row
# stood for (its dropped duplicates).
DEDUPE_KEY = f"{INTERNAL_PREFIX}_dedupe_key"
DUPES = f"{INTERNAL_PREFIX}_dupes"
# Hidden companion of an input string column the compiler pre-cast with Arrow
# (see precast_candidates), suffixed by the column's position.
PRECAST_PREFIX = f"{INTERNAL_PREFIX}_int_"
#: The field types a pre-cast serves, and the Arrow type of its companion.
PRECAST_TYPES: dict[str, pa.DataType] = {
    "integer": pa.int64(),
    "timestamptz": pa.timestamp("us", tz="UTC"),
}
# Stands for a DuckDB error message until the row is diagnosed.
RAISED_MARK = "the expression raised an error"

# CTE names share the reserved prefix, so no user column can shadow them.
_CTE = f"{INTERNAL_PREFIX}_"
_CARRIED = f"{quote_ident(SOURCE_REF)}, {RID}, {ERR}, {STEP}, {RAISED}"


@dataclass(frozen=True)
class Cte:
    """One CTE of the query."""

    name: str
    sql: str


@dataclass(frozen=True)
class Probe:
    """A user-visible expression that may raise for a row, to diagnose it.

    ``sql`` evaluated over CTE ``source`` reproduces the expression alone.
    """

    step: Step
    path: str
    label: str
    sql: str
    source: str


@dataclass
class Plan:
    """The query of one input schema (normal or safe mode)."""

    ctes: list[Cte]
    final_sql: str = ""
    output_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    probes: list[Probe] = field(default_factory=list)
    # json_schema rules and the hidden column holding their payload text.
    json_checks: list[tuple[Rule, str]] = field(default_factory=list)
    # Fields a last mask step encrypts, with their output column.
    encrypted: list[tuple[MaskField, str]] = field(default_factory=list)
    # Hidden columns appended to the output after _source_ref: (hidden name,
    # output name), e.g. the deduplicate key hash as ``_dedupe_key``.
    exposed: list[tuple[str, str]] = field(default_factory=list)
    # Whether a join or window may reorder rows (the result is then sorted
    # back into input order).
    reorders: bool = False
    # Whether the rows carry DUPES (a deduplicate step).
    counts_dupes: bool = False
    # Per validate step, the hidden column listing (by position in the step's
    # rules) the rules a row violates; NULL for a row that violates none.
    violations: list[tuple[ValidateStep, str]] = field(default_factory=list)

    def query(
        self,
        *,
        upto: str | None = None,
        select: str | None = None,
        stand_ins: Mapping[str, str] | None = None,
    ) -> str:
        """SQL of the whole query, or of the CTEs up to ``upto`` (a CTE name).

        Args:
            upto: stop after this CTE; ``select`` defaults to all its columns.
            select: the final SELECT to use instead of the plan's.
            stand_ins: CTE name -> a table with its columns, read instead of
                the CTE's SQL (binding a plan being built).

        Returns:
            The SQL text.
        """
        ctes = self.ctes
        if upto is not None:
            end = next(i for i, cte in enumerate(ctes) if cte.name == upto)
            ctes = ctes[: end + 1]
            select = select or f"SELECT * FROM {upto}"
        tables = stand_ins or {}
        with_sql = ",\n".join(
            f"{cte.name} AS (\n"
            f"{f'SELECT * FROM {tables[cte.name]}' if cte.name in tables else cte.sql}"
            "\n)"
            for cte in ctes
        )
        return f"WITH {with_sql}\n{select or self.final_sql}"


def message_value(sql: str) -> str:
    """SQL printing a value inside a message, cut to MAX_VALUE_CHARS."""
    text = f"CAST({sql} AS VARCHAR)"
    return (
        f"CASE WHEN length({text}) > {MAX_VALUE_CHARS} "
        f"THEN left({text}, {MAX_VALUE_CHARS}) || '...' ELSE {text} END"
    )


def _merge(step_kind: str, drop: Sequence[str] = ()) -> str:
    """Select list folding the NEW/NEW_RAISED columns into the carried ones
    (and leaving out the step's scratch columns ``drop``)."""
    excluded = ", ".join([NEW, NEW_RAISED, *drop])
    return (
        f"* EXCLUDE ({excluded}) REPLACE ("
        f"CASE WHEN {NEW} IS NULL THEN {ERR} "
        f"ELSE NULLIF(concat_ws('; ', {ERR}, {NEW}), '') END AS {ERR}, "
        f"coalesce({STEP}, CASE WHEN {NEW} IS NOT NULL "
        f"THEN {sql_string(step_kind)} END) AS {STEP}, "
        f"coalesce({RAISED}, {NEW_RAISED}) AS {RAISED})"
    )


def _raises(sql: str) -> str:
    """True when ``sql`` raises for the row: ``x IS NULL`` is never NULL."""
    return f"(TRY(({sql}) IS NULL) IS NULL)"


def _first_raised(flags: Sequence[tuple[str, int]]) -> str:
    """SQL of the id of the first raising expression, NULL when none."""
    if not flags:
        return "CAST(NULL AS INTEGER)"
    branches = " ".join(f"WHEN {flag} THEN {probe_id}" for flag, probe_id in flags)
    return f"CASE {branches} END"


def _raised_message(label: str) -> str:
    return sql_string(f"{label}: {RAISED_MARK}")


def key_text(sql: str, duckdb_type: str) -> str:
    """SQL of one key value's stable text: ``N`` for NULL, else
    ``V<length>:<text>`` (length-prefixed, so concatenations are unambiguous).

    The text is DuckDB's VARCHAR cast; a ``timestamptz`` is first converted
    to UTC so the text does not depend on the session time zone.
    """
    value = sql
    if duckdb_type.upper() == "TIMESTAMP WITH TIME ZONE":
        value = f"timezone('UTC', {sql})"
    text = f"CAST({value} AS VARCHAR)"
    return (
        f"CASE WHEN {sql} IS NULL THEN 'N' "
        f"ELSE 'V' || CAST(length({text}) AS VARCHAR) || ':' || {text} END"
    )


def stable_hash(parts: Sequence[tuple[str, str]]) -> str:
    """SQL of the hex MD5 of key values ((SQL, DuckDB type) pairs): the same
    in every process and DuckDB version (unlike DuckDB's ``hash()``)."""
    return f"md5({' || '.join(key_text(sql, typ) for sql, typ in parts)})"


@dataclass(frozen=True)
class ReferenceTable:
    """A DuckDB table materialised from a reference dataset when registered.

    ``sql`` selects it from the registered dataset (``REF_SOURCE``, with its
    row position ``REF_POS``): an enrich step's columns, one row per key
    (the first); or a referential rule's distinct non-NULL values.
    """

    name: str
    reference: str
    sql: str


def enrich_table(step: EnrichStep) -> str:
    """Name of the table an enrich step joins."""
    return f"{INTERNAL_PREFIX}_ref_e{step.index}"


def referential_table(step: ValidateStep, position: int) -> str:
    """Name of the table of a referential rule's allowed values."""
    return f"{INTERNAL_PREFIX}_ref_v{step.index}_{position}"


def reference_tables(steps: Sequence[Step]) -> list[ReferenceTable]:
    """The tables to materialise from the reference datasets, in step order."""
    tables: list[ReferenceTable] = []
    for step in steps:
        if isinstance(step, EnrichStep):
            keys = ", ".join(quote_ident(ref) for _, ref in step.on)
            columns = ", ".join(quote_ident(c) for c in step.reference_columns)
            tables.append(
                ReferenceTable(
                    enrich_table(step),
                    step.reference,
                    f"SELECT {columns} FROM {REF_SOURCE} QUALIFY row_number() "
                    f"OVER (PARTITION BY {keys} ORDER BY {REF_POS}) = 1",
                )
            )
        elif isinstance(step, ValidateStep):
            for position, rule in enumerate(step.rules):
                if rule.kind != "referential" or not rule.reference:
                    continue
                column = quote_ident(rule.column or "")
                tables.append(
                    ReferenceTable(
                        referential_table(step, position),
                        rule.reference,
                        f"SELECT DISTINCT {column} AS {REF_VALUE} "
                        f"FROM {REF_SOURCE} WHERE {column} IS NOT NULL",
                    )
                )
    return tables


class Constants:
    """Config constants (defaults, bounds, enum values) checked and rendered.

    Checked once at compile time with the pipeline's connection, so a bad
    default or bound is a StepConfigError before any batch runs.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, steps: Sequence[Step]) -> None:
        self._con = con
        self.defaults: dict[str, str] = {}
        self.rules: dict[str, dict[str, Any]] = {}
        types: dict[str, FieldType] | None = None  # field types of the last map
        for step in steps:
            if isinstance(step, MapStep):
                for f in step.fields:
                    if f.default is not None:
                        self.defaults[f.path] = self.constant(
                            f.default, f.type, f.path, "default"
                        )
                types = {f.name.lower(): f.type for f in step.fields}
            elif isinstance(step, MaskStep) and types is not None:
                types |= {f.name.lower(): FieldType("string") for f in step.fields}
            elif isinstance(step, EnrichStep) and types is not None:
                types |= {f.name.lower(): f.type for f in step.fields}
            elif isinstance(step, ValidateStep) and types is not None:
                for rule in step.rules:
                    known = types.get(rule.field.lower())
                    if known is not None:
                        self.rules[rule.path] = self._rule(rule, known)

    def constant(self, value: Scalar, target: FieldType, path: str, what: str) -> str:
        """SQL of a config constant strictly cast to ``target``.

        Raises:
            StepConfigError: the constant does not convert exactly.
        """
        literal = sql_scalar(value)
        source = str(self._con.sql(f"SELECT {literal}").types[0])
        present = strict_cast(source, target, raw=literal, present="NULL").present
        sql = strict_cast(source, target, raw=literal, present=f"({present})").value
        try:
            rows = self._con.sql(f"SELECT ({sql}) IS NOT NULL").fetchall()
        except duckdb.Error:
            rows = []
        if not rows or not rows[0][0]:
            raise StepConfigError(
                path, f"{what} {value!r} is not a valid {target.label}"
            )
        return f"CAST({sql} AS {target.sql})"

    def _rule(self, rule: Rule, known: FieldType | None) -> dict[str, Any]:
        if rule.kind == "length" and known is not None and known.name != "string":
            raise StepConfigError(
                rule.path,
                f"length applies to string fields, not to a {known.label} field",
            )
        if rule.kind == "json_schema" and (
            known is not None and known.name not in ("string", "json")
        ):
            raise StepConfigError(
                rule.path,
                "json_schema applies to json, string or nested fields, "
                f"not to a {known.label} field",
            )
        if rule.kind == "regex":
            pattern = sql_string(rule.pattern or "")
            try:
                self._con.sql(f"SELECT regexp_matches('', {pattern})").fetchall()
            except duckdb.Error as error:
                raise StepConfigError(
                    rule.path, f"invalid pattern: {first_line(error)}"
                ) from error
            return {}
        if rule.kind == "range":
            return {
                key: self._bound(rule, bound, known, key)
                for key, bound in (("min", rule.minimum), ("max", rule.maximum))
                if bound is not None
            }
        if rule.kind == "enum":
            if known is None:
                values = [sql_scalar(v) for v in rule.values]
            elif known.name == "string":
                values = [sql_string(render_scalar(v)) for v in rule.values]
            else:
                values = [
                    self.constant(v, known, rule.path, "enum value")
                    for v in rule.values
                ]
            return {"values": values}
        return {}

    def _bound(
        self, rule: Rule, bound: Scalar, known: FieldType | None, key: str
    ) -> str:
        if known is None:
            raise StepConfigError(rule.path, "range does not apply to this field")
        if known.is_numeric:
            if isinstance(bound, str):
                raise StepConfigError(
                    rule.path, f"{key} must be a number for a {known.label} field"
                )
            return sql_scalar(bound)
        if known.is_temporal:
            if not isinstance(bound, str):
                raise StepConfigError(
                    rule.path, f"{key} must be an ISO string for a {known.label} field"
                )
            return self.constant(bound, known, rule.path, key)
        raise StepConfigError(
            rule.path,
            f"range does not apply to a {known.label} field; "
            "map it to a number, date or timestamp first",
        )

    def rule(self, rule: Rule, known: FieldType | None) -> dict[str, Any]:
        """Rendered constants of a rule.

        Rules on map fields are checked at compile time; rules on source
        columns here, once the column's type is known.
        """
        if rule.path in self.rules:
            return self.rules[rule.path]
        return self._rule(rule, known)


def precast_candidates(steps: Sequence[Step]) -> dict[str, str]:
    """Input columns whose fields may read an Arrow pre-cast, with the field type.

    These are the columns (lower case) the first map step reads as a bare
    column reference into an ``integer`` or ``timestamptz`` field (the types
    of PRECAST_TYPES), except those a mask step before it replaces: the only
    places a raw input value reaches a strict cast unchanged. A column read
    into fields of both types is left out. Every other use of the column
    (other fields, rules, rejected rows) keeps reading the original strings.
    """
    masked: set[str] = set()
    for step in steps:
        if isinstance(step, MaskStep):
            masked |= {f.name.lower() for f in step.fields}
        elif isinstance(step, MapStep):
            kinds: dict[str, set[str]] = {}
            for f in step.fields:
                if f.type.name not in PRECAST_TYPES:
                    continue
                name = bare_column(f.sql)
                if name is not None and name.lower() not in masked:
                    kinds.setdefault(name.lower(), set()).add(f.type.name)
            return {name: kind.pop() for name, kind in kinds.items() if len(kind) == 1}
    return {}


def precast_columns(schema: pa.Schema, names: Sequence[str]) -> dict[str, str]:
    """Each pre-cast input column (by name) -> its hidden companion column."""
    return {name: f"{PRECAST_PREFIX}{schema.get_field_index(name)}" for name in names}


def check_input_schema(schema: pa.Schema) -> None:
    """Refuse a batch without ``_source_ref`` or with reserved column names.

    Raises:
        InputSchemaError: naming the column.
    """
    if SOURCE_REF not in schema.names:
        raise InputSchemaError(f"the batch has no {SOURCE_REF!r} column")
    for name in schema.names:
        if name in (ERROR_COLUMN, STEP_COLUMN) or name.lower().startswith(
            INTERNAL_PREFIX
        ):
            raise InputSchemaError(f"the batch uses the reserved column {name!r}")


#: Numbers the plan builds of this process (their stand-in tables' names).
_BUILDS = itertools.count()


class PlanBuilder:
    """Builds the plan of a step list for the batch registered as BATCH_VIEW."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        steps: Sequence[Step],
        constants: Constants,
        *,
        static_schema: pa.Schema | None,
        safe: bool,
        precast: Mapping[str, str] | None = None,
    ) -> None:
        self.con = con
        self.steps = steps
        self.constants = constants
        self.static_schema = static_schema
        self.safe = safe
        self.hidden: list[str] = []
        # Input column (lower case) -> its companion in the batch; read by the
        # first map's integer or timestamptz fields that are that bare column
        # (a candidate's such fields all have one type: see precast_candidates).
        self.precast = {k.lower(): v for k, v in (precast or {}).items()}
        self.first_map = next((s.index for s in steps if isinstance(s, MapStep)), None)
        # CTE name -> its bound column types, and the empty table standing in
        # for it when a later CTE is bound (see `column_types`).
        self._bound: dict[str, dict[str, str]] = {}
        self._stand_ins: dict[str, str] = {}
        self._serial = next(_BUILDS)

    @property
    def carried(self) -> str:
        """Columns every CTE passes on: the row's bookkeeping and hidden ones."""
        return ", ".join([_CARRIED, *self.hidden])

    def build(self) -> Plan:
        """Build and bind the plan.

        Raises:
            StepConfigError: an expression does not bind against the columns.
        """
        try:
            return self._build()
        finally:
            for table in self._stand_ins.values():
                self.con.execute(f"DROP TABLE IF EXISTS {table}")
            self._stand_ins.clear()

    def _build(self) -> Plan:
        plan = Plan(
            ctes=[
                Cte(
                    f"{_CTE}s",
                    f"SELECT *, CAST(NULL AS VARCHAR) AS {ERR}, "
                    f"CAST(NULL AS VARCHAR) AS {STEP}, "
                    f"CAST(NULL AS INTEGER) AS {RAISED} FROM {BATCH_VIEW}",
                )
            ]
        )
        types: dict[str, FieldType] | None = None
        for step in self.steps:
            if isinstance(step, MapStep):
                self._add_map(plan, step)
                types = {f.name.lower(): f.type for f in step.fields}
            elif isinstance(step, FilterStep):
                self._add_filter(plan, step)
            elif isinstance(step, MaskStep):
                self._add_mask(plan, step)
                if types is not None:
                    types |= {f.name.lower(): FieldType("string") for f in step.fields}
            elif isinstance(step, AggregateStep):
                self._add_aggregate(plan, step)
            elif isinstance(step, EnrichStep):
                self._add_enrich(plan, step)
                if types is not None:
                    types |= {f.name.lower(): f.type for f in step.fields}
            elif isinstance(step, DeduplicateStep):
                self._add_deduplicate(plan, step)
            else:
                self._add_validate(plan, step, types)

        last = plan.ctes[-1].name
        data = [
            c
            for c in self.column_types(plan, last)
            if c not in INTERNAL_COLUMNS and c != SOURCE_REF and c not in self.hidden
        ]
        select = ", ".join(quote_ident(c) for c in [*data, SOURCE_REF])
        plan.final_sql = (
            f"SELECT {select}, {RID}, {ERR}, {STEP}, {RAISED}"
            f"{''.join(', ' + h for h in self.hidden)} FROM {last}"
        )
        try:
            # Runs on the registered empty batch: an error here is no row's.
            empty = self.con.sql(plan.query()).to_arrow_table()
        except duckdb.Error as error:
            raise StepConfigError(self._culprit(plan), first_line(error)) from error
        exposed = {name.lower() for _, name in plan.exposed}
        for c in data:
            if c.lower() in exposed:
                raise StepConfigError(
                    "steps", f"column {c!r} clashes with a column the engine adds"
                )
        ref = pa.field(SOURCE_REF, pa.string())
        if self.static_schema is not None:
            plan.output_schema = self.static_schema.append(ref)
        else:
            plan.output_schema = pa.schema(
                [empty.schema.field(c) for c in data]
            ).append(ref)
        return plan

    def _culprit(self, plan: Plan) -> str:
        """Path of the first expression that fails on its own, else ``steps``."""
        for probe in plan.probes:
            select = f"SELECT {probe.sql} FROM {probe.source}"
            try:
                self.con.sql(plan.query(upto=probe.source, select=select)).fetchall()
            except duckdb.Error:
                return probe.path
        return "steps"

    def column_types(self, plan: Plan, name: str) -> dict[str, str]:
        """Column name -> DuckDB type of CTE ``name`` (binds, does not run).

        A CTE is bound once. The CTEs before it that were bound already are read
        from empty temporary tables of their columns and types instead of being
        bound again: binding the whole growing chain for each new CTE cost most
        of a plan's time. A CTE whose types cannot make such a table (a type
        with no SQL name) stays in the chain as its SQL.
        """
        known = self._bound.get(name)
        if known is not None:
            return known
        relation = self.con.sql(plan.query(upto=name, stand_ins=self._stand_ins))
        types = {
            col: str(typ)
            for col, typ in zip(relation.columns, relation.types, strict=True)
        }
        self._bound[name] = types
        self._stand_in(name, types)
        return types

    def _stand_in(self, name: str, types: Mapping[str, str]) -> None:
        """An empty temporary table with CTE ``name``'s columns, if it can be made
        (distinct column names, types DuckDB can name)."""
        if len({c.lower() for c in types}) != len(types):
            return
        table = f"{INTERNAL_PREFIX}_bind{self._serial}_{len(self._stand_ins)}"
        columns = ", ".join(f"{quote_ident(c)} {t}" for c, t in types.items())
        try:
            self.con.execute(f"CREATE TEMPORARY TABLE {table} ({columns})")
        except duckdb.Error:
            return
        made = self.con.sql(f"SELECT * FROM {table}")
        if made.columns != list(types) or [str(t) for t in made.types] != list(
            types.values()
        ):  # a type whose name reads back as another: keep binding the SQL
            self.con.execute(f"DROP TABLE {table}")
            return
        self._stand_ins[name] = table

    def _bind(self, plan: Plan, source: str, probes: Sequence[tuple[str, str]]) -> None:
        """Bind the last CTE; on failure name the (path, SQL) probe that fails.

        Raises:
            StepConfigError: with the failing probe's path.
        """
        try:
            self.column_types(plan, plan.ctes[-1].name)
        except duckdb.Error as error:
            for path, sql in probes:
                try:
                    query = plan.query(
                        upto=source, select=f"SELECT {sql} FROM {source}"
                    )
                    _ = self.con.sql(query).types
                except duckdb.Error as probe_error:
                    raise StepConfigError(path, first_line(probe_error)) from error
            raise StepConfigError(
                probes[0][0] if probes else "steps", first_line(error)
            ) from error

    def _add_probe(self, plan: Plan, probe: Probe) -> int:
        plan.probes.append(probe)
        return len(plan.probes) - 1

    def _add_map(self, plan: Plan, step: MapStep) -> None:
        """CTEs of a map: raw expressions, normalised inputs, casts, checks."""
        prev = plan.ctes[-1].name
        cte = f"{_CTE}m{step.index}"
        count = len(step.fields)
        raw = [f"{INTERNAL_PREFIX}_raw_{n}" for n in range(count)]
        raised = [f"{INTERNAL_PREFIX}_raised_{n}" for n in range(count)]
        present = [f"{INTERNAL_PREFIX}_present_{n}" for n in range(count)]
        value = [f"{INTERNAL_PREFIX}_value_{n}" for n in range(count)]
        flags: list[tuple[str, int]] = []
        select: list[str] = []
        for f, r, flag in zip(step.fields, raw, raised, strict=True):
            probe_id = self._add_probe(plan, Probe(step, f.path, f.name, f.sql, prev))
            sql = self._precast_companion(step, f) or f.sql
            if self.safe:
                select.append(f"TRY({sql}) AS {r}, {_raises(sql)} AS {flag}")
                flags.append((flag, probe_id))
            else:
                select.append(f"({sql}) AS {r}")
        selected = ", ".join(select)
        plan.ctes.append(
            Cte(f"{cte}_raw", f"SELECT {selected}, {self.carried} FROM {prev}")
        )
        self._bind(plan, prev, [(f.path, f.sql) for f in step.fields])
        raw_types = self.column_types(plan, f"{cte}_raw")

        casts = [
            strict_cast(raw_types[r], f.type, raw=r, present=p)
            for f, r, p in zip(step.fields, raw, present, strict=True)
        ]
        selected = ", ".join(
            f"{c.present} AS {p}" for c, p in zip(casts, present, strict=True)
        )
        plan.ctes.append(Cte(f"{cte}_present", f"SELECT *, {selected} FROM {cte}_raw"))
        selected = ", ".join(
            f"{c.value} AS {v}" for c, v in zip(casts, value, strict=True)
        )
        plan.ctes.append(
            Cte(f"{cte}_value", f"SELECT *, {selected} FROM {cte}_present")
        )

        outputs: list[str] = []
        errors: list[tuple[str, str]] = []
        for n, f in enumerate(step.fields):
            default = self.constants.defaults.get(f.path)
            v = value[n]
            outputs.append(
                f"{f'coalesce({v}, {default})' if default else v} "
                f"AS {quote_ident(f.name)}"
            )
            errors.append(
                _field_error(
                    f,
                    raw[n],
                    present[n],
                    v,
                    raised=raised[n] if self.safe else None,
                    has_default=default is not None,
                )
            )
        plan.ctes.append(
            Cte(
                f"{cte}_checked",
                f"SELECT {', '.join(outputs)}, {self.carried}, "
                f"{_field_errors(errors)} AS {NEW}, "
                f"{_first_raised(flags)} AS {NEW_RAISED} FROM {cte}_value",
            )
        )
        plan.ctes.append(Cte(cte, f"SELECT {_merge('map')} FROM {cte}_checked"))
        self.column_types(plan, cte)

    def _precast_companion(self, step: MapStep, f: MapField) -> str | None:
        """The companion an integer or timestamptz field of the first map reads
        instead of its bare input column, when the batch has one: the same
        values the strict cast would give (see the compiler's pre-cast)."""
        if not self.precast or step.index != self.first_map:
            return None
        if f.type.name not in PRECAST_TYPES:
            return None
        column = bare_column(f.sql)
        if column is None:
            return None
        return self.precast.get(column.lower())

    def _add_filter(self, plan: Plan, step: FilterStep) -> None:
        """CTE of a filter: a WHERE that keeps rows already in error."""
        prev = plan.ctes[-1].name
        cte = f"{_CTE}f{step.index}"
        path = f"steps[{step.index}].where"
        probe_id = self._add_probe(plan, Probe(step, path, "where", step.where, prev))
        source, where = prev, step.where
        if self.safe:
            raises = _raises(where)
            plan.ctes.append(
                Cte(
                    f"{cte}_checked",
                    f"SELECT *, CASE WHEN {raises} "
                    f"THEN {_raised_message('where')} END AS {NEW}, "
                    f"CASE WHEN {raises} THEN {probe_id} END AS {NEW_RAISED} "
                    f"FROM {prev}",
                )
            )
            plan.ctes.append(
                Cte(f"{cte}_merged", f"SELECT {_merge('filter')} FROM {cte}_checked")
            )
            source, where = f"{cte}_merged", f"TRY({where})"
        plan.ctes.append(
            Cte(
                cte,
                f"SELECT * FROM {source} WHERE {ERR} IS NOT NULL "
                f"OR coalesce(({where}), FALSE)",
            )
        )
        self._bind(plan, prev, [(path, step.where)])

    def _add_validate(
        self, plan: Plan, step: ValidateStep, types: Mapping[str, FieldType] | None
    ) -> None:
        """CTEs of a validate step: one message expression per rule."""
        prev = plan.ctes[-1].name
        cte = f"{_CTE}v{step.index}"
        column_types = self.column_types(plan, prev)
        columns = {c.lower(): c for c in column_types}
        scratch = self._add_set_checks(plan, step, columns, column_types)
        if scratch:
            prev = plan.ctes[-1].name
        messages: list[str] = []
        positions: list[int] = []  # each message's rule, by position
        flags: list[tuple[str, int]] = []
        paths: list[tuple[str, str]] = []
        hidden: list[tuple[str, str]] = []  # (SQL, name)
        for position, rule in enumerate(step.rules):
            column = columns.get(rule.field.lower())
            if rule.field and (
                column is None or column.lower().startswith(INTERNAL_PREFIX)
            ):
                raise StepConfigError(rule.path, f"unknown field {rule.field!r}")
            if column is None:  # an expr rule that names no field
                constants: dict[str, Any] = {}
            else:
                known = (
                    types.get(rule.field.lower())
                    if types
                    else field_type_of(column_types[column])
                )
                constants = self.constants.rule(rule, known)
            if rule.kind == "json_schema" and column is not None:
                name = f"{JSON_PREFIX}{step.index}_{len(plan.json_checks)}"
                hidden.append((_json_text(column, column_types[column]), name))
                plan.json_checks.append((rule, name))
                continue
            if rule.kind == "unique" and column is not None:
                name = f"{INTERNAL_PREFIX}_unique_{step.index}_{len(hidden)}"
                f = quote_ident(column)
                # The value's hash for the row that holds it in the batch: its
                # first occurrence among the rows not in error before the step
                # (it may still fail another rule); NULL for the others.
                hidden.append(
                    (
                        f"CASE WHEN {f} IS NOT NULL AND {ERR} IS NULL "
                        f"AND {scratch[id(rule)]} = 1 THEN "
                        f"{stable_hash([(f, column_types[column])])} END",
                        name,
                    )
                )
                exposed = f"{UNIQUE_PREFIX}{rule.field}"
                if all(e.lower() != exposed.lower() for _, e in plan.exposed):
                    plan.exposed.append((name, exposed))
            if rule.kind in ("unique", "referential"):
                constants = {"flag": scratch[id(rule)]}
            if rule.kind == "expr":
                self._check_predicate(plan, prev, rule)
                constants = {
                    "columns": [
                        columns.get(c.lower(), c)
                        for c in expression_columns(rule.sql or "TRUE")
                    ]
                }
            sql = _rule_error(rule, column or "", constants)
            probe = Probe(step, rule.path, rule.label, sql, prev)
            probe_id = self._add_probe(plan, probe)
            paths.append((rule.path, sql))
            if self.safe:
                messages.append(
                    f"CASE WHEN {_raises(sql)} THEN {_raised_message(rule.label)} "
                    f"ELSE TRY({sql}) END"
                )
                flags.append((_raises(sql), probe_id))
            else:
                messages.append(sql)
            positions.append(position)
        source = prev
        drop = list(scratch.values())
        new = "CAST(NULL AS VARCHAR)"
        if messages:
            # Each rule's message in its own column, so the row's violations
            # (for the data-quality report) are known by rule, not by text.
            names = [
                f"{INTERNAL_PREFIX}_msg_{step.index}_{n}" for n in range(len(messages))
            ]
            selected = ", ".join(
                f"{m} AS {n}" for m, n in zip(messages, names, strict=True)
            )
            source = f"{cte}_msgs"
            plan.ctes.append(Cte(source, f"SELECT *, {selected} FROM {prev}"))
            drop.extend(names)
            new = f"NULLIF(concat_ws('; ', {', '.join(names)}), '')"
            listed = ", ".join(
                f"CASE WHEN {n} IS NOT NULL THEN {p} END"
                for n, p in zip(names, positions, strict=True)
            )
            violations = f"{INTERNAL_PREFIX}_violations_{step.index}"
            hidden.append(
                (
                    f"CASE WHEN coalesce({', '.join(names)}) IS NOT NULL THEN "
                    f"list_filter([{listed}], lambda x: x IS NOT NULL) END",
                    violations,
                )
            )
            plan.violations.append((step, violations))
        plan.ctes.append(
            Cte(
                f"{cte}_checked",
                f"SELECT *, {''.join(f'{h} AS {n}, ' for h, n in hidden)}{new} "
                f"AS {NEW}, {_first_raised(flags)} AS {NEW_RAISED} FROM {source}",
            )
        )
        self.hidden.extend(n for _, n in hidden)
        self._bind(plan, prev, paths)
        plan.ctes.append(
            Cte(cte, f"SELECT {_merge('validate', drop)} FROM {cte}_checked")
        )

    def _add_set_checks(
        self,
        plan: Plan,
        step: ValidateStep,
        columns: Mapping[str, str],
        column_types: Mapping[str, str],
    ) -> dict[int, str]:
        """CTE computing what unique and referential rules need, per row: the
        occurrence number of the value among the rows not yet in error, and
        whether the value is in the reference. Subqueries and windows stay out
        of the rule expressions, so the safe plan can TRY them.

        Returns:
            ``id(rule)`` -> its scratch column (empty when no such rule).
        """
        prev = plan.ctes[-1].name
        scratch: dict[int, str] = {}
        select: list[str] = []
        for position, rule in enumerate(step.rules):
            if rule.kind not in ("unique", "referential"):
                continue
            column = columns.get(rule.field.lower())
            if column is None or column.lower().startswith(INTERNAL_PREFIX):
                raise StepConfigError(rule.path, f"unknown field {rule.field!r}")
            f = quote_ident(column)
            name = f"{INTERNAL_PREFIX}_set_{step.index}_{position}"
            if rule.kind == "unique":
                select.append(
                    f"row_number() OVER (PARTITION BY {f}, ({ERR} IS NULL) "
                    f"ORDER BY {RID}) AS {name}"
                )
            else:
                table = referential_table(step, position)
                select.append(f"({f} IN (SELECT {REF_VALUE} FROM {table})) AS {name}")
            scratch[id(rule)] = name
        if not scratch:
            return scratch
        plan.reorders = True
        cte = f"{_CTE}v{step.index}_sets"
        plan.ctes.append(Cte(cte, f"SELECT *, {', '.join(select)} FROM {prev}"))
        try:
            self.column_types(plan, cte)
        except duckdb.Error as error:
            for rule in step.rules:
                if id(rule) in scratch:
                    one = f"SELECT {scratch[id(rule)]} FROM {cte}"
                    try:
                        _ = self.con.sql(plan.query(upto=cte, select=one)).types
                    except duckdb.Error as rule_error:
                        raise StepConfigError(
                            rule.path, first_line(rule_error)
                        ) from error
            raise StepConfigError(f"steps[{step.index}]", first_line(error)) from error
        return scratch

    def _add_enrich(self, plan: Plan, step: EnrichStep) -> None:
        """CTEs of an enrich step: the fields computed and strictly cast once
        per reference row, then a LEFT JOIN of the rows on the key."""
        prev = plan.ctes[-1].name
        cte = f"{_CTE}e{step.index}"
        path = f"steps[{step.index}]"
        columns = {c.lower(): c for c in self.column_types(plan, prev)}
        for f in step.fields:
            if f.name.lower() in columns:
                raise StepConfigError(f.path, f"{f.name!r} is already a column")
        table = enrich_table(step)
        plan.ctes.append(Cte(f"{cte}_src", f"SELECT * FROM {table}"))
        count = len(step.fields)
        keys = [f"{INTERNAL_PREFIX}_key_{n}" for n in range(len(step.on))]
        raw = [f"{INTERNAL_PREFIX}_raw_{n}" for n in range(count)]
        raised = [f"{INTERNAL_PREFIX}_raised_{n}" for n in range(count)]
        present = [f"{INTERNAL_PREFIX}_present_{n}" for n in range(count)]
        value = [f"{INTERNAL_PREFIX}_value_{n}" for n in range(count)]
        select = [
            f"{quote_ident(ref)} AS {k}"
            for (_, ref), k in zip(step.on, keys, strict=True)
        ]
        # Fields are computed once per reference row, so they are always
        # TRY-wrapped (a raising value is an error of the rows that match it);
        # a probe recomputes the value of one row's match (run over that one
        # row: a semi join, so only the matching reference row is evaluated).
        match = " AND ".join(
            f"{_CTE}s.{quote_ident(ref)} = {_CTE}q.{quote_ident(column)}"
            for column, ref in step.on
        )
        flags: list[tuple[str, int]] = []
        for f, r, flag in zip(step.fields, raw, raised, strict=True):
            probe_sql = (
                f"(SELECT {f.sql} FROM {table} AS {_CTE}s "
                f"SEMI JOIN {prev} AS {_CTE}q ON {match})"
            )
            probe = Probe(step, f.path, f.name, probe_sql, prev)
            flags.append((flag, self._add_probe(plan, probe)))
            select.append(f"TRY({f.sql}) AS {r}, {_raises(f.sql)} AS {flag}")
        plan.ctes.append(
            Cte(f"{cte}_raw", f"SELECT {', '.join(select)} FROM {cte}_src")
        )
        self._bind(plan, f"{cte}_src", [(f.path, f.sql) for f in step.fields])
        raw_types = self.column_types(plan, f"{cte}_raw")
        casts = [
            strict_cast(raw_types[r], f.type, raw=r, present=p)
            for f, r, p in zip(step.fields, raw, present, strict=True)
        ]
        selected = ", ".join(
            f"{c.present} AS {p}" for c, p in zip(casts, present, strict=True)
        )
        plan.ctes.append(Cte(f"{cte}_present", f"SELECT *, {selected} FROM {cte}_raw"))
        selected = ", ".join(
            f"{c.value} AS {v}" for c, v in zip(casts, value, strict=True)
        )
        plan.ctes.append(
            Cte(f"{cte}_value", f"SELECT *, {selected} FROM {cte}_present")
        )
        errors = [
            _field_error(
                f,
                raw[n],
                present[n],
                value[n],
                raised=raised[n],
                has_default=False,
            )
            for n, f in enumerate(step.fields)
        ]
        ref_err, ref_raised = (
            f"{INTERNAL_PREFIX}_ref_err",
            f"{INTERNAL_PREFIX}_ref_raised",
        )
        fields = ", ".join(
            f"CAST({v} AS {f.type.sql}) AS {v}"
            for f, v in zip(step.fields, value, strict=True)
        )
        plan.ctes.append(
            Cte(
                f"{cte}_ref",
                f"SELECT {', '.join(keys)}, {fields}, "
                f"{_field_errors(errors)} AS {ref_err}, "
                f"{_first_raised(flags)} AS {ref_raised} FROM {cte}_value",
            )
        )
        try:
            self.column_types(plan, f"{cte}_ref")
        except duckdb.Error as error:
            raise StepConfigError(path, first_line(error)) from error

        conditions: list[str] = []
        shown: list[str] = []
        for (column, _ref), k in zip(step.on, keys, strict=True):
            actual = columns.get(column.lower())
            if actual is None or actual.lower().startswith(INTERNAL_PREFIX):
                raise StepConfigError(
                    f"{path}.on ({column})", f"unknown column {column!r}"
                )
            q = f"{_CTE}p.{quote_ident(actual)}"
            conditions.append(f"{q} = {_CTE}r.{k}")
            shown.append(
                f"{sql_string(column + ': ')} || coalesce({sql_string(chr(39))} || "
                f"{message_value(q)} || {sql_string(chr(39))}, 'NULL')"
            )
        missing = "NULL"
        if step.required:
            suffix = sql_string(f" has no match in reference {step.reference}")
            missing = (
                f"{' || '.join(shown)} || {suffix}"
                if len(shown) == 1
                else (f"concat_ws(', ', {', '.join(shown)}) || {suffix}")
            )
        outputs = ", ".join(
            f"{_CTE}r.{v} AS {quote_ident(f.name)}"
            for f, v in zip(step.fields, value, strict=True)
        )
        plan.ctes.append(
            Cte(
                f"{cte}_checked",
                f"SELECT {_CTE}p.*, {outputs}, "
                f"CASE WHEN {_CTE}r.{keys[0]} IS NULL THEN {missing} "
                f"ELSE {_CTE}r.{ref_err} END AS {NEW}, "
                f"{_CTE}r.{ref_raised} AS {NEW_RAISED} "
                f"FROM {prev} AS {_CTE}p LEFT JOIN {cte}_ref AS {_CTE}r "
                f"ON {' AND '.join(conditions)}",
            )
        )
        try:
            self.column_types(plan, f"{cte}_checked")
        except duckdb.Error as error:
            raise StepConfigError(f"{path}.on", first_line(error)) from error
        plan.ctes.append(Cte(cte, f"SELECT {_merge('enrich')} FROM {cte}_checked"))
        plan.reorders = True
        self.column_types(plan, cte)

    def _add_deduplicate(self, plan: Plan, step: DeduplicateStep) -> None:
        """CTEs of a deduplicate step: number each key's rows (not in error)
        in input order, keep the first or last, hash the key."""
        prev = plan.ctes[-1].name
        cte = f"{_CTE}d{step.index}"
        column_types = self.column_types(plan, prev)
        columns = {c.lower(): c for c in column_types}
        keys: list[str] = []
        parts: list[tuple[str, str]] = []
        for position, key in enumerate(step.key):
            column = columns.get(key.lower())
            if column is None or column.lower().startswith(INTERNAL_PREFIX):
                raise StepConfigError(
                    f"steps[{step.index}].key[{position}] ({key})",
                    f"unknown column {key!r}",
                )
            keys.append(quote_ident(column))
            parts.append((quote_ident(column), column_types[column]))
        order = "DESC" if step.keep == "last" else "ASC"
        window = f"PARTITION BY {', '.join(keys)}, ({ERR} IS NULL)"
        rank = f"{INTERNAL_PREFIX}_rank"
        plan.ctes.append(
            Cte(
                f"{cte}_ranked",
                f"SELECT *, row_number() OVER ({window} ORDER BY {RID} {order}) "
                f"AS {rank}, CASE WHEN {ERR} IS NULL THEN count(*) OVER ({window}) "
                f"- 1 ELSE 0 END AS {INTERNAL_PREFIX}_dropped, "
                f"CASE WHEN {ERR} IS NULL THEN {stable_hash(parts)} END "
                f"AS {DEDUPE_KEY} FROM {prev}",
            )
        )
        dupes = f"{INTERNAL_PREFIX}_dropped"
        if plan.counts_dupes:
            raise StepConfigError(
                f"steps[{step.index}]", "only one deduplicate step is allowed"
            )
        plan.ctes.append(
            Cte(
                cte,
                f"SELECT * EXCLUDE ({rank}, {dupes}), {dupes} AS {DUPES} "
                f"FROM {cte}_ranked WHERE {ERR} IS NOT NULL OR {rank} = 1",
            )
        )
        self.hidden.extend([DEDUPE_KEY, DUPES])
        plan.exposed.append((DEDUPE_KEY, DEDUPE_KEY_COLUMN))
        plan.counts_dupes = True
        plan.reorders = True
        self.column_types(plan, cte)

    def _check_predicate(self, plan: Plan, source: str, rule: Rule) -> None:
        """Refuse an expr rule that is not a boolean predicate.

        Raises:
            StepConfigError: it does not bind, or is not BOOLEAN.
        """
        select = f"SELECT ({rule.sql}) FROM {source}"
        try:
            types = self.con.sql(plan.query(upto=source, select=select)).types
        except duckdb.Error as error:
            raise StepConfigError(rule.path, first_line(error)) from error
        if str(types[0]) != "BOOLEAN":
            raise StepConfigError(
                rule.path, f"expr must be a true/false predicate, not {types[0]}"
            )

    def _add_mask(self, plan: Plan, step: MaskStep) -> None:
        """CTE of a mask step: the masked columns replaced in place."""
        prev = plan.ctes[-1].name
        columns = {c.lower(): c for c in self.column_types(plan, prev)}
        replaced: list[str] = []
        for f in step.fields:
            column = columns.get(f.name.lower())
            if column is None or column.lower().startswith(INTERNAL_PREFIX):
                raise StepConfigError(f.path, f"unknown field {f.name!r}")
            if column == SOURCE_REF:
                raise StepConfigError(f.path, f"name {f.name!r} is reserved")
            replaced.append(
                f"{mask_sql(f, quote_ident(column))} AS {quote_ident(column)}"
            )
            if f.method == "encrypt":
                plan.encrypted.append((f, column))
        plan.ctes.append(
            Cte(
                f"{_CTE}k{step.index}",
                f"SELECT * REPLACE ({', '.join(replaced)}) FROM {prev}",
            )
        )
        self.column_types(plan, plan.ctes[-1].name)

    def _add_aggregate(self, plan: Plan, step: AggregateStep) -> None:
        """CTEs of an aggregate step's row part: its group keys and the value
        of each measure's expression, per row (the grouping runs after the
        query, on the rows that passed)."""
        prev = plan.ctes[-1].name
        cte = f"{_CTE}a{step.index}"
        columns = {c.lower(): c for c in self.column_types(plan, prev)}
        select: list[str] = []
        for position, key in enumerate(step.group_by):
            column = columns.get(key.lower())
            if column is None or column.lower().startswith(INTERNAL_PREFIX):
                raise StepConfigError(
                    f"steps[{step.index}].group_by[{position}] ({key})",
                    f"unknown column {key!r}",
                )
            select.append(f"{quote_ident(column)} AS {quote_ident(key)}")
        messages: list[str] = []
        flags: list[tuple[str, int]] = []
        probes: list[tuple[str, str]] = []
        for n, measure in enumerate(step.measures):
            if measure.sql is None:
                continue
            probe = Probe(step, measure.path, measure.name, measure.sql, prev)
            probe_id = self._add_probe(plan, probe)
            probes.append((measure.path, measure.sql))
            if self.safe:
                raises = _raises(measure.sql)
                select.append(f"TRY({measure.sql}) AS {MEASURE_PREFIX}{n}")
                messages.append(
                    f"CASE WHEN {raises} THEN {_raised_message(measure.name)} END"
                )
                flags.append((raises, probe_id))
            else:
                select.append(f"({measure.sql}) AS {MEASURE_PREFIX}{n}")
        selected = "".join(s + ", " for s in select)
        if not self.safe or not messages:
            plan.ctes.append(Cte(cte, f"SELECT {selected}{self.carried} FROM {prev}"))
            self._bind(plan, prev, probes)
            return
        plan.ctes.append(
            Cte(
                f"{cte}_checked",
                f"SELECT {selected}{self.carried}, "
                f"NULLIF(concat_ws('; ', {', '.join(messages)}), '') AS {NEW}, "
                f"{_first_raised(flags)} AS {NEW_RAISED} FROM {prev}",
            )
        )
        self._bind(plan, prev, probes)
        plan.ctes.append(Cte(cte, f"SELECT {_merge('aggregate')} FROM {cte}_checked"))


def _field_error(
    f: MapField,
    raw: str,
    present: str,
    value: str,
    *,
    raised: str | None,
    has_default: bool,
) -> tuple[str, str]:
    """SQL of a map field's failure condition and of its error message (NULL
    when the field is fine)."""
    missing = (
        sql_string(f"{f.name}: required value is missing")
        if f.required and not has_default
        else "NULL"
    )
    convert = (
        f"{sql_string(f'{f.name}: cannot convert ' + chr(39))} || "
        f"{message_value(raw)} || "
        f"{sql_string(chr(39) + f' to {f.type.label}')}"
    )
    raised_branch = f"WHEN {raised} THEN {_raised_message(f.name)} " if raised else ""
    message = (
        f"CASE {raised_branch}WHEN {present} IS NULL THEN {missing} "
        f"WHEN {value} IS NULL THEN {convert} END"
    )
    # True whenever the message is not NULL: the raised flag, a missing value
    # (only when that is an error) or a value that does not convert.
    failed = (
        f"{present} IS NULL OR {value} IS NULL"
        if missing != "NULL"
        else f"({present} IS NOT NULL AND {value} IS NULL)"
    )
    return (f"{raised} OR {failed}" if raised else failed), message


def _field_errors(errors: Sequence[tuple[str, str]]) -> str:
    """SQL of the fields' joined error messages, NULL when every field is fine.

    Each message is built only for the rows whose flags say some field failed:
    the flags are cheap comparisons, the messages string work.
    """
    if not errors:
        return "CAST(NULL AS VARCHAR)"
    failed = " OR ".join(f"({condition})" for condition, _ in errors)
    joined = ", ".join(message for _, message in errors)
    return f"CASE WHEN {failed} THEN NULLIF(concat_ws('; ', {joined}), '') END"


def _rule_error(rule: Rule, column: str, constants: Mapping[str, Any]) -> str:
    """SQL of a rule's error message; NULL when the rule holds or the value is
    NULL (only ``not_null`` rejects NULL)."""
    f = quote_ident(column)
    name = rule.field
    shown = message_value(f)
    quote = chr(39)
    if rule.kind == "not_null":
        return f"CASE WHEN {f} IS NULL THEN {sql_string(f'{name}: is null')} END"
    if rule.kind == "unique":
        # Only rows not in error count; the first occurrence passes.
        return (
            f"CASE WHEN {f} IS NOT NULL AND {ERR} IS NULL "
            f"AND {constants['flag']} > 1 THEN {sql_string(f'{name}: {quote}')} "
            f"|| {shown} || {sql_string(f'{quote} is not unique')} END"
        )
    if rule.kind == "referential":
        target = f"{rule.reference}.{rule.column}"
        return (
            f"CASE WHEN {f} IS NOT NULL AND NOT {constants['flag']} "
            f"THEN {sql_string(f'{name}: {quote}')} || {shown} || "
            f"{sql_string(f'{quote} is not in {target}')} END"
        )
    if rule.kind == "length":
        branches = []
        for bound, op, word in (
            (rule.minimum, "<", "shorter"),
            (rule.maximum, ">", "longer"),
        ):
            if bound is not None:
                suffix = sql_string(f"{quote} is {word} than {bound} characters")
                branches.append(
                    f"WHEN length({f}) {op} {bound} "
                    f"THEN {sql_string(f'{name}: {quote}')} || {shown} || {suffix}"
                )
        return f"CASE {' '.join(branches)} END"
    if rule.kind == "expr":
        text = rule.message or f"{rule.sql} is false"
        values = " || ', ' || ".join(
            f"{sql_string(c + '=')} || coalesce({message_value(quote_ident(c))}, "
            "'NULL')"
            for c in constants["columns"]
        )
        message = sql_string(f"{name}: {text}" if rule.field else text)
        if values:
            message = f"{message} || ' (' || {values} || ')'"
        # CHECK semantics: only FALSE fails; NULL (unknown) passes.
        return f"CASE WHEN NOT coalesce(({rule.sql}), TRUE) THEN {message} END"
    if rule.kind == "range":
        branches = []
        for key, bound, op, word in (
            ("min", rule.minimum, "<", "below the minimum"),
            ("max", rule.maximum, ">", "above the maximum"),
        ):
            if key in constants and bound is not None:
                suffix = sql_string(f" is {word} {render_scalar(bound)}")
                branches.append(
                    f"WHEN {f} {op} {constants[key]} "
                    f"THEN {sql_string(f'{name}: ')} || {shown} || {suffix}"
                )
        return f"CASE {' '.join(branches)} END"
    if rule.kind == "regex":
        pattern = rule.pattern or ""
        message = (
            f"{sql_string(f'{name}: {quote}')} || {shown} || "
            f"{sql_string(f'{quote} does not match {pattern}')}"
        )
        return (
            f"CASE WHEN NOT regexp_matches(CAST({f} AS VARCHAR), "
            f"{sql_string(pattern)}) THEN {message} END"
        )
    listed = ", ".join(render_scalar(v) for v in rule.values)
    message = (
        f"{sql_string(f'{name}: {quote}')} || {shown} || "
        f"{sql_string(f'{quote} is not one of {listed}')}"
    )
    return f"CASE WHEN {f} NOT IN ({', '.join(constants['values'])}) THEN {message} END"


def _json_text(column: str, duckdb_type: str) -> str:
    """SQL of a column's JSON text: strings as they are, nested values as JSON."""
    if duckdb_type.upper() in ("VARCHAR", "JSON"):
        return f"CAST({quote_ident(column)} AS VARCHAR)"
    return f"CAST(to_json({quote_ident(column)}) AS VARCHAR)"
