"""Step config checks: every error names the step, the field and the problem."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from transforms.engine import StepConfigError, compile_steps


def flight_map(*extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "map",
        "fields": [
            {"name": "carrier", "expr": "carrier", "type": "string"},
            {"name": "flight", "expr": "flight", "type": "integer"},
            {"name": "dep_delay", "expr": "dep_delay", "type": "integer"},
            *extra,
        ],
    }


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        pytest.param(
            [flight_map({"name": "distance_km", "expr": "distance", "type": "flot"})],
            "steps[0].fields[3] (distance_km): unknown type 'flot'",
            id="unknown-type",
        ),
        pytest.param(
            [flight_map({"name": "x", "expr": "x"})],
            "steps[0].fields[3] (x): missing type",
            id="missing-type",
        ),
        pytest.param(
            [flight_map({"name": "Flight", "expr": "x", "type": "string"})],
            "steps[0].fields[3] (Flight): duplicate field name 'Flight'",
            id="duplicate-name",
        ),
        pytest.param(
            [flight_map({"name": "_source_ref", "type": "string"})],
            "steps[0].fields[3] (_source_ref): name '_source_ref' is reserved",
            id="reserved-name",
        ),
        pytest.param(
            [flight_map({"name": "x", "type": "string", "exprr": "x"})],
            "steps[0].fields[3] (x): unknown key 'exprr'",
            id="unknown-field-key",
        ),
        pytest.param(
            [flight_map({"name": "x", "type": "integer", "precision": 3})],
            "steps[0].fields[3] (x): precision applies to decimal only",
            id="precision-not-decimal",
        ),
        pytest.param(
            [flight_map({"name": "x", "type": "decimal", "precision": 40})],
            "steps[0].fields[3] (x): precision must be an integer from 1 to 38",
            id="precision-too-big",
        ),
        pytest.param(
            [flight_map({"name": "x", "type": "decimal", "precision": 4, "scale": 5})],
            "steps[0].fields[3] (x): scale must be from 0 to precision (4)",
            id="scale-above-precision",
        ),
        pytest.param(
            [flight_map({"name": "x", "type": "integer", "default": "abc"})],
            "steps[0].fields[3] (x): default 'abc' is not a valid integer",
            id="bad-default",
        ),
        pytest.param(
            [flight_map({"name": "x", "type": "integer", "default": 1.5})],
            "steps[0].fields[3] (x): default 1.5 is not a valid integer",
            id="fractional-default",
        ),
        pytest.param(
            [flight_map({"name": "x", "type": "integer", "required": "yes"})],
            "steps[0].fields[3] (x): required must be true or false",
            id="required-not-boolean",
        ),
        pytest.param(
            [{"type": "mapp", "fields": []}],
            "steps[0].type: unknown step type 'mapp'; "
            "use map, filter, validate, mask, aggregate, enrich, deduplicate",
            id="unknown-step",
        ),
        pytest.param(
            [{"type": "map", "fields": []}],
            "steps[0].fields: must be a non-empty list",
            id="empty-fields",
        ),
        pytest.param(
            [{"type": "filter"}],
            "steps[0].where: expression must be a non-empty string",
            id="filter-without-where",
        ),
        pytest.param(
            [
                flight_map(),
                {
                    "type": "validate",
                    "rules": [{"field": "origin", "rule": "not_null"}],
                },
            ],
            "steps[1].rules[0] (origin): unknown field 'origin'",
            id="rule-on-unknown-field",
        ),
        pytest.param(
            [
                flight_map(),
                {"type": "validate", "rules": [{"field": "flight", "rule": "max"}]},
            ],
            "steps[1].rules[0] (flight): unknown rule 'max'; "
            "use not_null, range, regex, enum, length, expr, json_schema, "
            "referential, unique",
            id="unknown-rule",
        ),
        pytest.param(
            [
                flight_map(),
                {"type": "validate", "rules": [{"field": "flight", "rule": "range"}]},
            ],
            "steps[1].rules[0] (flight): range needs min, max or both",
            id="range-without-bounds",
        ),
        pytest.param(
            [
                flight_map(),
                {
                    "type": "validate",
                    "rules": [{"field": "flight", "rule": "range", "min": "0"}],
                },
            ],
            "steps[1].rules[0] (flight): min must be a number for a integer field",
            id="range-string-bound",
        ),
        pytest.param(
            [
                flight_map(),
                {
                    "type": "validate",
                    "rules": [{"field": "carrier", "rule": "range", "max": 5}],
                },
            ],
            "steps[1].rules[0] (carrier): range does not apply to a string field; "
            "map it to a number, date or timestamp first",
            id="range-on-string",
        ),
        pytest.param(
            [
                flight_map(),
                {
                    "type": "validate",
                    "rules": [{"field": "carrier", "rule": "regex", "pattern": "(a"}],
                },
            ],
            "steps[1].rules[0] (carrier): invalid pattern: "
            "Invalid Input Error: missing ): (a",
            id="bad-regex",
        ),
        pytest.param(
            [
                flight_map(),
                {
                    "type": "validate",
                    "rules": [{"field": "flight", "rule": "enum", "values": ["one"]}],
                },
            ],
            "steps[1].rules[0] (flight): enum value 'one' is not a valid integer",
            id="enum-value-of-wrong-type",
        ),
        pytest.param(
            [
                flight_map(),
                {
                    "type": "validate",
                    "rules": [{"field": "flight", "rule": "enum", "values": []}],
                },
            ],
            "steps[1].rules[0] (flight): values must be a non-empty list of "
            "strings, numbers or booleans",
            id="enum-without-values",
        ),
    ],
)
def test_invalid_config_is_refused(steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(StepConfigError) as raised:
        compile_steps(steps)

    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        pytest.param("(SELECT 1)", "subqueries are not allowed", id="subquery"),
        pytest.param(
            "x IN (SELECT a FROM t)", "subqueries are not allowed", id="in-subquery"
        ),
        pytest.param("EXISTS (SELECT 1)", "subqueries are not allowed", id="exists"),
        pytest.param(
            "read_csv('/etc/passwd')",
            "function read_csv() is not allowed",
            id="read_csv",
        ),
        pytest.param(
            "read_parquet('s3://bucket/x.parquet')",
            "function read_parquet() is not allowed",
            id="read_parquet",
        ),
        pytest.param(
            "read_text('/etc/passwd')",
            "function read_text() is not allowed",
            id="read_text",
        ),
        pytest.param("getenv('HOME')", "function getenv() is not allowed", id="getenv"),
        pytest.param("SET threads = 8", "statements are not allowed (SET)", id="set"),
        pytest.param(
            "COPY t TO '/tmp/out.csv'", "statements are not allowed (COPY)", id="copy"
        ),
        pytest.param(
            "INSTALL httpfs", "statements are not allowed (INSTALL)", id="install"
        ),
        pytest.param("LOAD httpfs", "statements are not allowed (LOAD)", id="load"),
        pytest.param(
            "ATTACH '/tmp/x.db' AS x",
            "statements are not allowed (ATTACH)",
            id="attach",
        ),
        pytest.param("DROP TABLE t", "statements are not allowed (DROP)", id="drop"),
        pytest.param("x; DROP TABLE t", "must be exactly one SQL expression", id="two"),
        pytest.param("sum(x)", "aggregate functions are not allowed", id="aggregate"),
        pytest.param(
            "row_number() OVER ()", "window functions are not allowed", id="window"
        ),
        pytest.param(
            "unnest([1, 2])",
            "unnest changes the number of rows and is not allowed",
            id="unnest",
        ),
        pytest.param("$1", "parameters are not allowed", id="parameter"),
        pytest.param(
            "__engine_rid", "column '__engine_rid' is reserved", id="internal"
        ),
        pytest.param(
            "x +",
            "invalid SQL expression: Required keyword: 'expression' missing for "
            "<class 'sqlglot.expressions.core.Add'>. Line 1, Col: 3.",
            id="syntax",
        ),
    ],
)
def test_forbidden_sql_is_refused_naming_the_field(expr: str, message: str) -> None:
    steps = [flight_map({"name": "evil", "expr": expr, "type": "string"})]

    with pytest.raises(StepConfigError) as raised:
        compile_steps(steps)

    assert str(raised.value) == f"steps[0].fields[3] (evil): {message}"


def test_forbidden_sql_in_a_filter_names_the_filter() -> None:
    with pytest.raises(StepConfigError) as raised:
        compile_steps(
            [{"type": "filter", "where": "x IN (SELECT * FROM read_csv('a'))"}]
        )

    assert str(raised.value) == "steps[0].where: subqueries are not allowed"


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        pytest.param(
            [flight_map({"name": "d", "expr": "distance", "type": "float"})],
            "steps[0].fields[3] (d): unknown column 'distance'",
            id="unknown-column",
        ),
        pytest.param(
            [flight_map({"name": "d", "expr": "carrier + 1", "type": "float"})],
            "steps[0].fields[3] (d): Binder Error: No function matches the given name "
            "and argument types '+(VARCHAR, INTEGER_LITERAL)'. You might need to add "
            "explicit type casts.",
            id="does-not-bind",
        ),
        pytest.param(
            [flight_map(), {"type": "filter", "where": "origin = 'EWR'"}],
            "steps[1].where: unknown column 'origin'",
            id="filter-after-map-sees-map-fields",
        ),
    ],
)
def test_with_an_input_schema_expressions_are_bound_at_compile_time(
    steps: list[dict[str, Any]], message: str
) -> None:
    schema = pa.schema(
        [
            (name, pa.string())
            for name in ("carrier", "flight", "dep_delay", "_source_ref")
        ]
    )

    with pytest.raises(StepConfigError) as raised:
        compile_steps(steps, input_schema=schema)

    assert str(raised.value) == message


def test_without_an_input_schema_binding_errors_come_with_the_first_batch(
    make_batch: Any, compile_pipeline: Any
) -> None:
    pipeline = compile_pipeline(
        [flight_map({"name": "d", "expr": "distance", "type": "float"})]
    )

    with pytest.raises(StepConfigError) as raised:
        pipeline.run(make_batch(carrier=["UA"], flight=["1"], dep_delay=["0"]))

    assert str(raised.value).startswith(
        'steps[0].fields[3] (d): Binder Error: Referenced column "distance" not found'
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(
            {"timezone": "Mars/Olympus"},
            "timezone: unknown time zone 'Mars/Olympus'",
            id="timezone",
        ),
        pytest.param(
            {"threads": 0}, "threads: must be a positive integer", id="threads"
        ),
    ],
)
def test_invalid_engine_parameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(StepConfigError) as raised:
        compile_steps([], **kwargs)

    assert str(raised.value) == message
