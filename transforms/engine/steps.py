"""Typed step configuration: parses and checks the JSON step list.

Checks that need no database happen here (shape, names, types, expressions);
checks that need DuckDB (defaults, rule literals, regex syntax) happen in the
compiler, which owns the connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transforms.engine.exceptions import StepConfigError
from transforms.engine.expressions import (
    INTERNAL_PREFIX,
    check_expression,
    expression_columns,
)
from transforms.engine.fieldtypes import (
    DEFAULT_PRECISION,
    DEFAULT_SCALE,
    MAX_PRECISION,
    TYPE_NAMES,
    FieldType,
)
from transforms.engine.sql import Scalar, quote_ident

SOURCE_REF = "_source_ref"
ERROR_COLUMN = "_error"
STEP_COLUMN = "_step"
DEDUPE_KEY_COLUMN = "_dedupe_key"
RESERVED_NAMES = frozenset({SOURCE_REF, ERROR_COLUMN, STEP_COLUMN, DEDUPE_KEY_COLUMN})
UNIQUE_PREFIX = "_unique_"
RULE_KINDS = (
    "not_null",
    "range",
    "regex",
    "enum",
    "length",
    "expr",
    "json_schema",
    "referential",
    "unique",
)
KEEP_CHOICES = ("first", "last")
MASK_METHODS = ("redact", "sha256", "encrypt")
MEASURE_FNS = ("count", "sum", "min", "max", "avg", "count_distinct")
# The secret each masking method reads unless the field names another one.
DEFAULT_SECRETS = {"sha256": "mask_salt", "encrypt": "fernet_key"}
REDACTED = "***"

_FIELD_KEYS = frozenset(
    {"name", "expr", "type", "required", "default", "precision", "scale", "description"}
)
_RULE_KEYS: dict[str, frozenset[str]] = {
    "not_null": frozenset({"field", "rule", "description"}),
    "range": frozenset({"field", "rule", "min", "max", "description"}),
    "regex": frozenset({"field", "rule", "pattern", "description"}),
    "enum": frozenset({"field", "rule", "values", "description"}),
    "length": frozenset({"field", "rule", "min", "max", "description"}),
    "expr": frozenset({"field", "rule", "expr", "message", "description"}),
    "json_schema": frozenset({"field", "rule", "schema", "description"}),
    "referential": frozenset({"field", "rule", "reference", "column", "description"}),
    "unique": frozenset({"field", "rule", "description"}),
}
_MASK_KEYS: dict[str, frozenset[str]] = {
    "redact": frozenset({"name", "method", "keep_last", "description"}),
    "sha256": frozenset({"name", "method", "secret", "description"}),
    "encrypt": frozenset({"name", "method", "secret", "description"}),
}
_MEASURE_KEYS = frozenset({"name", "fn", "expr", "description"})
_STEP_KEYS: dict[str, frozenset[str]] = {
    "map": frozenset({"type", "fields", "description"}),
    "filter": frozenset({"type", "where", "description"}),
    "validate": frozenset({"type", "rules", "description"}),
    "mask": frozenset({"type", "fields", "description"}),
    "aggregate": frozenset({"type", "group_by", "measures", "description"}),
    "enrich": frozenset(
        {"type", "reference", "on", "fields", "required", "description"}
    ),
    "deduplicate": frozenset({"type", "key", "keep", "description"}),
}


@dataclass(frozen=True)
class MapField:
    """One output column of a map step: an expression strictly cast to a type."""

    name: str
    sql: str
    type: FieldType
    path: str
    required: bool = False
    default: Scalar | None = None


@dataclass(frozen=True)
class MapStep:
    """Replaces the columns with typed fields computed from the previous step."""

    index: int
    fields: tuple[MapField, ...]
    kind: str = "map"


@dataclass(frozen=True)
class FilterStep:
    """Drops (and counts) rows for which a SQL predicate is not true."""

    index: int
    where: str
    kind: str = "filter"


@dataclass(frozen=True)
class Rule:
    """One validation rule on one field; a failing row gets an error message.

    ``field`` is empty only for an ``expr`` rule that names no field.
    """

    field: str
    kind: str
    path: str
    minimum: Scalar | None = None
    maximum: Scalar | None = None
    pattern: str | None = None
    values: tuple[Scalar, ...] = ()
    sql: str | None = None
    message: str | None = None
    schema: Mapping[str, Any] | bool | None = None
    reference: str | None = None
    column: str | None = None

    @property
    def label(self) -> str:
        """What the rule's messages start with: the field, else ``expr``."""
        return self.field or "expr"


@dataclass(frozen=True)
class ValidateStep:
    """Checks rules on the previous step's columns; failing rows are rejected."""

    index: int
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    kind: str = "validate"


@dataclass(frozen=True)
class MaskField:
    """One column to mask: redact, salted SHA-256 or Fernet-encrypt it."""

    name: str
    method: str
    path: str
    keep_last: int = 0
    secret: str = ""


@dataclass(frozen=True)
class MaskStep:
    """Replaces chosen columns with masked strings; the others pass unchanged."""

    index: int
    fields: tuple[MaskField, ...]
    kind: str = "mask"

    @property
    def encrypted(self) -> tuple[MaskField, ...]:
        """The fields Fernet-encrypts after the query."""
        return tuple(f for f in self.fields if f.method == "encrypt")


@dataclass(frozen=True)
class Measure:
    """One aggregate column: ``fn`` over the expression ``sql`` (None: rows)."""

    name: str
    fn: str
    path: str
    sql: str | None = None


@dataclass(frozen=True)
class AggregateStep:
    """Groups rows by ``group_by`` and computes ``measures`` (the last step)."""

    index: int
    group_by: tuple[str, ...]
    measures: tuple[Measure, ...]
    kind: str = "aggregate"


@dataclass(frozen=True)
class EnrichStep:
    """Adds fields computed from the matching row of a reference dataset.

    ``on`` pairs each pipeline column with a reference column (all must be
    equal for a match); ``fields`` are expressions over the reference's
    columns, cast strictly like map fields. A row without a match gets NULL
    fields, or a row error when ``required``.
    """

    index: int
    reference: str
    on: tuple[tuple[str, str], ...]
    fields: tuple[MapField, ...]
    required: bool = False
    kind: str = "enrich"

    @property
    def reference_columns(self) -> list[str]:
        """The reference columns the step reads: its keys, then its fields'."""
        return _unique_names(
            [ref for _, ref in self.on]
            + [c for f in self.fields for c in expression_columns(f.sql)]
        )


@dataclass(frozen=True)
class DeduplicateStep:
    """Keeps one row per key within the batch (the first or the last)."""

    index: int
    key: tuple[str, ...]
    keep: str = "first"
    kind: str = "deduplicate"


@dataclass(frozen=True)
class KeyScope:
    """A key the caller keeps exact across the batches of a run.

    A deduplicate step (one row per key survives the run) or the unique rules
    of one field (later occurrences are rejected). The output carries each
    row's key hash in ``column``; the caller records the hashes per run under
    ``name`` and drops or rejects the rows whose key an earlier batch (in
    ``keep`` order) already holds.

    Attributes:
        name: the scope's stable name: ``deduplicate`` or ``unique:<field>``.
        kind: ``deduplicate`` or ``unique``.
        column: the output column of the key hash (NULL: the row takes no part).
        keep: ``first`` or ``last``: which occurrence by source position stays.
        key: the key's columns (for unique, the field).
        step: the index of the step that defines it.
    """

    name: str
    kind: str
    column: str
    keep: str
    key: tuple[str, ...]
    step: int


def key_scopes(steps: Sequence[Step]) -> list[KeyScope]:
    """The run-wide keys of a step list, in step order (none when it ends in
    an aggregate: its rows never reach a sink one by one)."""
    if steps and isinstance(steps[-1], AggregateStep):
        return []
    scopes: dict[str, KeyScope] = {}
    for step in steps:
        if isinstance(step, DeduplicateStep):
            scopes["deduplicate"] = KeyScope(
                name="deduplicate",
                kind="deduplicate",
                column=DEDUPE_KEY_COLUMN,
                keep=step.keep,
                key=step.key,
                step=step.index,
            )
        elif isinstance(step, ValidateStep):
            for rule in step.rules:
                if rule.kind == "unique" and rule.field:
                    name = f"unique:{rule.field}"
                    scopes.setdefault(
                        name,
                        KeyScope(
                            name=name,
                            kind="unique",
                            column=f"{UNIQUE_PREFIX}{rule.field}",
                            keep="first",
                            key=(rule.field,),
                            step=step.index,
                        ),
                    )
    return list(scopes.values())


Step = (
    MapStep
    | FilterStep
    | ValidateStep
    | MaskStep
    | AggregateStep
    | EnrichStep
    | DeduplicateStep
)


def _unique_names(names: Sequence[str]) -> list[str]:
    """The names in order, each once (compared case-insensitively)."""
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(name.lower(), name)
    return list(seen.values())


def reference_columns(steps: Sequence[Step]) -> dict[str, list[str]]:
    """Each reference dataset the steps read -> the columns they read from it.

    Join keys and the columns enrich fields read, and the columns referential
    rules check; in order of first use, each once.
    """
    needed: dict[str, list[str]] = {}
    for step in steps:
        if isinstance(step, EnrichStep):
            columns = step.reference_columns
            needed[step.reference] = _unique_names(
                [*needed.get(step.reference, []), *columns]
            )
        elif isinstance(step, ValidateStep):
            for rule in step.rules:
                if rule.kind == "referential" and rule.reference and rule.column:
                    needed[rule.reference] = _unique_names(
                        [*needed.get(rule.reference, []), rule.column]
                    )
    return needed


def _check_keys(raw: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise StepConfigError(path, f"unknown key {unknown[0]!r}")


def _is_scalar(value: object) -> bool:
    return isinstance(value, (str, int, float, bool))


def parse_steps(
    steps: Sequence[Mapping[str, Any]], *, input_columns: Sequence[str] | None = None
) -> list[Step]:
    """Parse and check a step list.

    Args:
        steps: the JSON step config.
        input_columns: the source column names, when known; expressions of the
            first steps are then checked against them.

    Returns:
        The typed steps, in order.

    Raises:
        StepConfigError: naming the first problem found.
    """
    if not isinstance(steps, Sequence) or isinstance(steps, (str, bytes)):
        raise StepConfigError("steps", "must be a list of steps")
    # Column names visible to the next step; None while they are unknown.
    columns: list[str] | None = None
    if input_columns is not None:
        columns = [*input_columns, SOURCE_REF]
    parsed: list[Step] = []
    for index, raw in enumerate(steps):
        path = f"steps[{index}]"
        if not isinstance(raw, Mapping):
            raise StepConfigError(path, "must be an object")
        kind = raw.get("type")
        if kind not in _STEP_KEYS:
            raise StepConfigError(
                f"{path}.type",
                f"unknown step type {kind!r}; use {', '.join(_STEP_KEYS)}",
            )
        _check_keys(raw, _STEP_KEYS[kind], path)
        if parsed and isinstance(parsed[-1], AggregateStep):
            raise StepConfigError(path, "aggregate must be the last step")
        if parsed and isinstance(parsed[-1], MaskStep) and parsed[-1].encrypted:
            raise StepConfigError(
                path, "a mask step that encrypts must be the last step"
            )
        step: Step
        if kind == "map":
            step = _parse_map(index, raw, columns)
            columns = [*(f.name for f in step.fields), SOURCE_REF]
        elif kind == "filter":
            where = check_expression(
                raw.get("where"), path=f"{path}.where", columns=columns
            )
            step = FilterStep(index=index, where=where)
        elif kind == "mask":
            step = _parse_mask(index, raw, columns)
        elif kind == "aggregate":
            step = _parse_aggregate(index, raw, columns)
        elif kind == "enrich":
            step = _parse_enrich(index, raw, columns)
            if columns is not None:
                columns = [*columns, *(f.name for f in step.fields)]
        elif kind == "deduplicate":
            if any(isinstance(p, DeduplicateStep) for p in parsed):
                raise StepConfigError(path, "only one deduplicate step is allowed")
            step = _parse_deduplicate(index, raw, columns)
        else:
            step = _parse_validate(index, raw, columns)
        parsed.append(step)
    return parsed


def _parse_map(
    index: int, raw: Mapping[str, Any], columns: Sequence[str] | None
) -> MapStep:
    path = f"steps[{index}]"
    fields = raw.get("fields")
    if not isinstance(fields, list) or not fields:
        raise StepConfigError(f"{path}.fields", "must be a non-empty list")
    seen: set[str] = set()
    out: list[MapField] = []
    for position, spec in enumerate(fields):
        out.append(_parse_field(f"{path}.fields[{position}]", spec, columns, seen))
    return MapStep(index=index, fields=tuple(out))


def _parse_field(
    path: str, spec: object, columns: Sequence[str] | None, seen: set[str]
) -> MapField:
    if not isinstance(spec, Mapping):
        raise StepConfigError(path, "must be an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise StepConfigError(path, "name must be a non-empty string")
    path = f"{path} ({name})"
    _check_keys(spec, _FIELD_KEYS, path)
    if name in RESERVED_NAMES or name.lower().startswith(INTERNAL_PREFIX):
        raise StepConfigError(path, f"name {name!r} is reserved")
    if name.lower() in seen:
        raise StepConfigError(path, f"duplicate field name {name!r}")
    seen.add(name.lower())

    field_type = _parse_type(path, spec)
    # A field without expr copies the source column of the same name.
    expr = spec.get("expr", quote_ident(name))
    sql = check_expression(expr, path=path, columns=columns)

    required = spec.get("required", False)
    if not isinstance(required, bool):
        raise StepConfigError(path, "required must be true or false")
    default = spec.get("default")
    if default is not None and not _is_scalar(default):
        raise StepConfigError(path, "default must be a string, number or boolean")
    return MapField(
        name=name,
        sql=sql,
        type=field_type,
        path=path,
        required=required,
        default=default,
    )


def _parse_type(path: str, spec: Mapping[str, Any]) -> FieldType:
    type_name = spec.get("type")
    if type_name is None:
        raise StepConfigError(path, "missing type")
    if type_name not in TYPE_NAMES:
        raise StepConfigError(path, f"unknown type {type_name!r}")
    if type_name != "decimal":
        for key in ("precision", "scale"):
            if key in spec:
                raise StepConfigError(path, f"{key} applies to decimal only")
        return FieldType(type_name)
    precision = spec.get("precision", DEFAULT_PRECISION)
    scale = spec.get("scale", DEFAULT_SCALE)
    if (
        not isinstance(precision, int)
        or isinstance(precision, bool)
        or not 1 <= precision <= MAX_PRECISION
    ):
        raise StepConfigError(
            path, f"precision must be an integer from 1 to {MAX_PRECISION}"
        )
    if not isinstance(scale, int) or isinstance(scale, bool):
        raise StepConfigError(path, "scale must be an integer")
    if not 0 <= scale <= precision:
        raise StepConfigError(path, f"scale must be from 0 to precision ({precision})")
    return FieldType("decimal", precision=precision, scale=scale)


def _parse_validate(
    index: int, raw: Mapping[str, Any], columns: Sequence[str] | None
) -> ValidateStep:
    path = f"steps[{index}]"
    rules = raw.get("rules")
    if not isinstance(rules, list) or not rules:
        raise StepConfigError(f"{path}.rules", "must be a non-empty list")
    known = {c.lower() for c in columns} if columns is not None else None
    out: list[Rule] = []
    for position, spec in enumerate(rules):
        rule_path = f"{path}.rules[{position}]"
        if not isinstance(spec, Mapping):
            raise StepConfigError(rule_path, "must be an object")
        field_name = spec.get("field")
        # A cross-field expr rule may leave the field out.
        if not (spec.get("rule") == "expr" and field_name is None):
            if not isinstance(field_name, str) or not field_name:
                raise StepConfigError(rule_path, "field must be a non-empty string")
            rule_path = f"{rule_path} ({field_name})"
            if known is not None and field_name.lower() not in known:
                raise StepConfigError(rule_path, f"unknown field {field_name!r}")
        kind = spec.get("rule")
        if kind not in _RULE_KEYS:
            raise StepConfigError(
                rule_path, f"unknown rule {kind!r}; use {', '.join(RULE_KINDS)}"
            )
        _check_keys(spec, _RULE_KEYS[kind], rule_path)
        out.append(_parse_rule(rule_path, field_name or "", kind, spec, columns))
    return ValidateStep(index=index, rules=tuple(out))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_rule(
    path: str,
    field_name: str,
    kind: str,
    spec: Mapping[str, Any],
    columns: Sequence[str] | None,
) -> Rule:
    if kind == "length":
        minimum, maximum = spec.get("min"), spec.get("max")
        if minimum is None and maximum is None:
            raise StepConfigError(path, "length needs min, max or both")
        for key, bound in (("min", minimum), ("max", maximum)):
            if bound is not None and not _is_count(bound):
                raise StepConfigError(path, f"{key} must be an integer >= 0")
        if minimum is not None and maximum is not None and minimum > maximum:
            raise StepConfigError(path, "min must not be above max")
        return Rule(
            field=field_name, kind=kind, path=path, minimum=minimum, maximum=maximum
        )
    if kind == "expr":
        sql = check_expression(spec.get("expr"), path=path, columns=columns)
        message = spec.get("message")
        if message is not None and (not isinstance(message, str) or not message):
            raise StepConfigError(path, "message must be a non-empty string")
        return Rule(field=field_name, kind=kind, path=path, sql=sql, message=message)
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, (Mapping, bool)):
            raise StepConfigError(path, "schema must be a JSON Schema object")
        # The compiler checks the schema itself (Draft 2020-12).
        return Rule(field=field_name, kind=kind, path=path, schema=schema)
    if kind in ("not_null", "unique"):
        return Rule(field=field_name, kind=kind, path=path)
    if kind == "referential":
        reference, column = spec.get("reference"), spec.get("column")
        if not isinstance(reference, str) or not reference:
            raise StepConfigError(path, "reference must be a reference dataset's name")
        if not isinstance(column, str) or not column:
            raise StepConfigError(path, "column must be a non-empty string")
        return Rule(
            field=field_name, kind=kind, path=path, reference=reference, column=column
        )
    if kind == "range":
        minimum, maximum = spec.get("min"), spec.get("max")
        if minimum is None and maximum is None:
            raise StepConfigError(path, "range needs min, max or both")
        for key, bound in (("min", minimum), ("max", maximum)):
            if bound is not None and (
                isinstance(bound, bool) or not isinstance(bound, (int, float, str))
            ):
                raise StepConfigError(path, f"{key} must be a number or a string")
        return Rule(
            field=field_name, kind=kind, path=path, minimum=minimum, maximum=maximum
        )
    if kind == "regex":
        pattern = spec.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise StepConfigError(path, "pattern must be a non-empty string")
        # The pattern is RE2 syntax; the compiler checks it with DuckDB.
        return Rule(field=field_name, kind=kind, path=path, pattern=pattern)
    values = spec.get("values")
    if (
        not isinstance(values, list)
        or not values
        or not all(_is_scalar(v) for v in values)
    ):
        raise StepConfigError(
            path, "values must be a non-empty list of strings, numbers or booleans"
        )
    return Rule(field=field_name, kind=kind, path=path, values=tuple(values))


def _parse_mask(
    index: int, raw: Mapping[str, Any], columns: Sequence[str] | None
) -> MaskStep:
    path = f"steps[{index}]"
    fields = raw.get("fields")
    if not isinstance(fields, list) or not fields:
        raise StepConfigError(f"{path}.fields", "must be a non-empty list")
    known = {c.lower() for c in columns} if columns is not None else None
    seen: set[str] = set()
    out: list[MaskField] = []
    for position, spec in enumerate(fields):
        field_path = f"{path}.fields[{position}]"
        if not isinstance(spec, Mapping):
            raise StepConfigError(field_path, "must be an object")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise StepConfigError(field_path, "name must be a non-empty string")
        field_path = f"{field_path} ({name})"
        if name in RESERVED_NAMES or name.lower().startswith(INTERNAL_PREFIX):
            raise StepConfigError(field_path, f"name {name!r} is reserved")
        if known is not None and name.lower() not in known:
            raise StepConfigError(field_path, f"unknown field {name!r}")
        if name.lower() in seen:
            raise StepConfigError(field_path, f"{name!r} is masked twice")
        seen.add(name.lower())
        method = spec.get("method")
        if method not in _MASK_KEYS:
            raise StepConfigError(
                field_path,
                f"unknown method {method!r}; use {', '.join(MASK_METHODS)}",
            )
        _check_keys(spec, _MASK_KEYS[method], field_path)
        keep_last = spec.get("keep_last", 0)
        if not _is_count(keep_last):
            raise StepConfigError(field_path, "keep_last must be an integer >= 0")
        secret = spec.get("secret", DEFAULT_SECRETS.get(method, ""))
        if not isinstance(secret, str) or (method != "redact" and not secret):
            raise StepConfigError(field_path, "secret must be a secret's name")
        out.append(
            MaskField(
                name=name,
                method=method,
                path=field_path,
                keep_last=keep_last,
                secret=secret,
            )
        )
    return MaskStep(index=index, fields=tuple(out))


def partial_columns(name: str, fn: str) -> tuple[str, ...]:
    """The partial-aggregate columns of one measure.

    ``avg`` keeps a sum and a count, ``count_distinct`` the list of distinct
    values; the other functions keep one column named like the measure.
    """
    if fn == "avg":
        return (f"{name}__sum", f"{name}__count")
    if fn == "count_distinct":
        return (f"{name}__distinct",)
    return (name,)


def _parse_aggregate(
    index: int, raw: Mapping[str, Any], columns: Sequence[str] | None
) -> AggregateStep:
    path = f"steps[{index}]"
    group_by = raw.get("group_by", [])
    if not isinstance(group_by, list) or not all(
        isinstance(g, str) and g for g in group_by
    ):
        raise StepConfigError(f"{path}.group_by", "must be a list of column names")
    known = {c.lower() for c in columns} if columns is not None else None
    names: set[str] = set()
    for position, key in enumerate(group_by):
        key_path = f"{path}.group_by[{position}] ({key})"
        if key.lower().startswith(INTERNAL_PREFIX) or key == SOURCE_REF:
            raise StepConfigError(key_path, f"column {key!r} is reserved")
        if known is not None and key.lower() not in known:
            raise StepConfigError(key_path, f"unknown column {key!r}")
        if key.lower() in names:
            raise StepConfigError(key_path, f"duplicate column {key!r}")
        names.add(key.lower())
    measures = raw.get("measures")
    if not isinstance(measures, list) or not measures:
        raise StepConfigError(f"{path}.measures", "must be a non-empty list")
    out: list[Measure] = []
    for position, spec in enumerate(measures):
        measure_path = f"{path}.measures[{position}]"
        if not isinstance(spec, Mapping):
            raise StepConfigError(measure_path, "must be an object")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise StepConfigError(measure_path, "name must be a non-empty string")
        measure_path = f"{measure_path} ({name})"
        _check_keys(spec, _MEASURE_KEYS, measure_path)
        if name in RESERVED_NAMES or name.lower().startswith(INTERNAL_PREFIX):
            raise StepConfigError(measure_path, f"name {name!r} is reserved")
        fn = spec.get("fn")
        if fn not in MEASURE_FNS:
            raise StepConfigError(
                measure_path, f"unknown fn {fn!r}; use {', '.join(MEASURE_FNS)}"
            )
        for column in partial_columns(name, fn):
            if column.lower() in names:
                raise StepConfigError(measure_path, f"duplicate name {column!r}")
            names.add(column.lower())
        expr = spec.get("expr")
        sql = None
        if expr is not None or fn != "count":
            if expr is None:
                raise StepConfigError(measure_path, f"{fn} needs an expr")
            sql = check_expression(expr, path=measure_path, columns=columns)
        out.append(Measure(name=name, fn=fn, path=measure_path, sql=sql))
    return AggregateStep(index=index, group_by=tuple(group_by), measures=tuple(out))


def _parse_enrich(
    index: int, raw: Mapping[str, Any], columns: Sequence[str] | None
) -> EnrichStep:
    path = f"steps[{index}]"
    reference = raw.get("reference")
    if not isinstance(reference, str) or not reference:
        raise StepConfigError(f"{path}.reference", "must be a reference dataset's name")
    on = raw.get("on")
    if not isinstance(on, Mapping) or not on:
        raise StepConfigError(
            f"{path}.on", "must map pipeline columns to reference columns"
        )
    known = {c.lower() for c in columns} if columns is not None else None
    pairs: list[tuple[str, str]] = []
    for column, ref_column in on.items():
        key_path = f"{path}.on ({column})"
        if not isinstance(column, str) or not column:
            raise StepConfigError(key_path, "keys must be column names")
        if not isinstance(ref_column, str) or not ref_column:
            raise StepConfigError(key_path, "must name a reference column")
        if column.lower().startswith(INTERNAL_PREFIX) or column == SOURCE_REF:
            raise StepConfigError(key_path, f"column {column!r} is reserved")
        if known is not None and column.lower() not in known:
            raise StepConfigError(key_path, f"unknown column {column!r}")
        pairs.append((column, ref_column))
    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise StepConfigError(f"{path}.required", "must be true or false")
    fields = raw.get("fields")
    if not isinstance(fields, list) or not fields:
        raise StepConfigError(f"{path}.fields", "must be a non-empty list")
    seen: set[str] = set()
    out: list[MapField] = []
    for position, spec in enumerate(fields):
        field_path = f"{path}.fields[{position}]"
        # Expressions read the reference's columns, not known before run time.
        parsed = _parse_field(field_path, spec, None, seen)
        if parsed.required or parsed.default is not None:
            raise StepConfigError(
                parsed.path,
                "enrich fields take no required or default; use the step's required",
            )
        if known is not None and parsed.name.lower() in known:
            raise StepConfigError(parsed.path, f"{parsed.name!r} is already a column")
        out.append(parsed)
    return EnrichStep(
        index=index,
        reference=reference,
        on=tuple(pairs),
        fields=tuple(out),
        required=required,
    )


def _parse_deduplicate(
    index: int, raw: Mapping[str, Any], columns: Sequence[str] | None
) -> DeduplicateStep:
    path = f"steps[{index}]"
    key = raw.get("key")
    if (
        not isinstance(key, list)
        or not key
        or not all(isinstance(k, str) and k for k in key)
    ):
        raise StepConfigError(f"{path}.key", "must be a non-empty list of columns")
    known = {c.lower() for c in columns} if columns is not None else None
    seen: set[str] = set()
    for position, column in enumerate(key):
        key_path = f"{path}.key[{position}] ({column})"
        if column.lower().startswith(INTERNAL_PREFIX) or column == SOURCE_REF:
            raise StepConfigError(key_path, f"column {column!r} is reserved")
        if known is not None and column.lower() not in known:
            raise StepConfigError(key_path, f"unknown column {column!r}")
        if column.lower() in seen:
            raise StepConfigError(key_path, f"duplicate column {column!r}")
        seen.add(column.lower())
    keep = raw.get("keep", "first")
    if keep not in KEEP_CHOICES:
        raise StepConfigError(f"{path}.keep", "must be 'first' or 'last'")
    return DeduplicateStep(index=index, key=tuple(key), keep=keep)
