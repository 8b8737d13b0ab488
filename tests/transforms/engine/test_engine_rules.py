"""The length and expr (cross-field) validate rules, and parse-error positions."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from tests.transforms.engine.conftest import source_refs
from transforms.engine import StepConfigError, compile_steps

TIMES_MAP = {
    "type": "map",
    "fields": [
        {"name": "carrier", "expr": "carrier", "type": "string"},
        {"name": "dep_time", "expr": "dep_time", "type": "integer"},
        {"name": "arr_time", "expr": "arr_time", "type": "integer"},
    ],
}


@pytest.mark.parametrize(
    ("rule", "value", "expected"),
    [
        pytest.param({"min": 2, "max": 3}, "UA", None, id="within"),
        pytest.param({"min": 2, "max": 3}, "UAL", None, id="at-max"),
        pytest.param(
            {"min": 2, "max": 3},
            "U",
            "carrier: 'U' is shorter than 2 characters",
            id="too-short",
        ),
        pytest.param(
            {"max": 3},
            "UALX",
            "carrier: 'UALX' is longer than 3 characters",
            id="too-long",
        ),
        pytest.param(
            {"min": 1}, "", "carrier: '' is shorter than 1 characters", id="empty"
        ),
        pytest.param({"max": 2}, "Äé", None, id="counts-characters-not-bytes"),
        pytest.param({"min": 5}, None, None, id="null-passes"),
    ],
)
def test_length_rule(
    compile_pipeline: Any,
    make_batch: Any,
    rule: dict[str, Any],
    value: str | None,
    expected: str | None,
) -> None:
    steps = [
        {"type": "validate", "rules": [{"field": "carrier", "rule": "length", **rule}]}
    ]

    result = compile_pipeline(steps).run(make_batch(carrier=[value]))

    errors = result.rejected["_error"].to_pylist()
    assert errors == ([] if expected is None else [expected])
    assert result.output.num_rows == (1 if expected is None else 0)


def test_expr_rule_names_its_message_and_the_values_it_read(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        TIMES_MAP,
        {
            "type": "validate",
            "rules": [
                {
                    "rule": "expr",
                    "expr": "arr_time IS NULL OR dep_time IS NOT NULL",
                    "message": "arrival without departure",
                },
                {
                    "field": "arr_time",
                    "rule": "expr",
                    "expr": "arr_time > dep_time",
                    "message": "arrives before it departs",
                },
            ],
        },
    ]
    batch = make_batch(
        carrier=["UA", "AA", "B6", "DL"],
        dep_time=["100", None, "500", "300"],
        arr_time=["200", "300", "400", None],
    )

    result = compile_pipeline(steps).run(batch)

    assert result.output["carrier"].to_pylist() == ["UA", "DL"]  # NULL passes
    assert result.rejected["_error"].to_pylist() == [
        "arrival without departure (arr_time=300, dep_time=NULL)",
        "arr_time: arrives before it departs (arr_time=400, dep_time=500)",
    ]
    assert result.rejected["_step"].to_pylist() == ["validate", "validate"]
    assert result.rejected["arr_time"].to_pylist() == ["300", "400"]


def test_expr_rule_without_message_shows_the_expression(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [{"type": "validate", "rules": [{"rule": "expr", "expr": "a < b"}]}]

    result = compile_pipeline(steps).run(make_batch(a=["2", "1"], b=["1", "2"]))

    assert result.rejected["_error"].to_pylist() == ["a < b is false (a=2, b=1)"]


def test_expr_rule_over_nested_values(compile_pipeline: Any) -> None:
    batch = pa.table(
        {
            "payload": pa.array(
                [{"user": {"id": 1}}, {"user": {"id": -5}}],
                pa.struct([("user", pa.struct([("id", pa.int64())]))]),
            ),
            "_source_ref": ["a", "b"],
        }
    )
    steps = [
        {
            "type": "validate",
            "rules": [
                {"rule": "expr", "expr": "payload.user.id > 0", "message": "bad id"}
            ],
        }
    ]

    result = compile_pipeline(steps).run(batch)

    assert result.rejected["_error"].to_pylist() == [
        "bad id (payload={'user': {'id': -5}})"
    ]


def test_a_raising_expr_rule_rejects_only_its_row(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        {
            "type": "validate",
            "rules": [{"rule": "expr", "expr": "CAST(n AS INTEGER) > 0"}],
        }
    ]

    result = compile_pipeline(steps).run(make_batch(n=["1", "bad", "2"]))

    assert result.output["n"].to_pylist() == ["1", "2"]
    assert (
        result.rejected["_error"]
        .to_pylist()[0]
        .startswith("expr: Conversion Error: Could not convert string 'bad' to INT32")
    )


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        pytest.param(
            {"field": "carrier", "rule": "length"},
            "steps[1].rules[0] (carrier): length needs min, max or both",
            id="length-without-bounds",
        ),
        pytest.param(
            {"field": "carrier", "rule": "length", "min": -1},
            "steps[1].rules[0] (carrier): min must be an integer >= 0",
            id="length-negative",
        ),
        pytest.param(
            {"field": "carrier", "rule": "length", "min": 3, "max": 2},
            "steps[1].rules[0] (carrier): min must not be above max",
            id="length-min-above-max",
        ),
        pytest.param(
            {"field": "dep_time", "rule": "length", "max": 2},
            "steps[1].rules[0] (dep_time): length applies to string fields, "
            "not to a integer field",
            id="length-on-integer",
        ),
        pytest.param(
            {"rule": "expr"},
            "steps[1].rules[0]: expression must be a non-empty string",
            id="expr-missing",
        ),
        pytest.param(
            {"rule": "expr", "expr": "arr_time > (SELECT 1)"},
            "steps[1].rules[0]: subqueries are not allowed",
            id="expr-subquery",
        ),
        pytest.param(
            {"rule": "expr", "expr": "origin = 'EWR'"},
            "steps[1].rules[0]: unknown column 'origin'",
            id="expr-unknown-column",
        ),
        pytest.param(
            {"rule": "expr", "expr": "arr_time > 0", "message": ""},
            "steps[1].rules[0]: message must be a non-empty string",
            id="expr-empty-message",
        ),
        pytest.param(
            {"rule": "expr", "expr": "arr_time + 1"},
            "steps[1].rules[0]: expr must be a true/false predicate, not BIGINT",
            id="expr-not-boolean",
        ),
    ],
)
def test_invalid_new_rules_are_refused(rule: dict[str, Any], message: str) -> None:
    schema = pa.schema(
        [(n, pa.string()) for n in ("carrier", "dep_time", "arr_time", "_source_ref")]
    )

    with pytest.raises(StepConfigError) as raised:
        compile_steps(
            [TIMES_MAP, {"type": "validate", "rules": [rule]}], input_schema=schema
        )

    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        pytest.param(
            "a +\n  (b *",
            "invalid SQL expression: Required keyword: 'expression' missing for "
            "<class 'sqlglot.expressions.core.Mul'>. Line 2, Col: 6.",
            id="second-line",
        ),
        pytest.param(
            "carrier = 'EWR",
            "invalid SQL expression: unterminated string or quoted name "
            "starting at Line 1, Col: 11.",
            id="unterminated-string",
        ),
        pytest.param(
            'a +\n "b',
            "invalid SQL expression: unterminated string or quoted name "
            "starting at Line 2, Col: 2.",
            id="unterminated-name",
        ),
    ],
)
def test_parse_errors_give_the_position(expr: str, message: str) -> None:
    with pytest.raises(StepConfigError) as raised:
        compile_steps([{"type": "filter", "where": expr}])

    assert str(raised.value) == f"steps[0].where: {message}"


def test_violations_name_each_failing_rule_of_each_rejected_row(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "a", "expr": "a", "type": "integer"},
                {"name": "s", "expr": "s", "type": "string"},
                {"name": "j", "expr": "j", "type": "json"},
            ],
        },
        {
            "type": "validate",
            "rules": [
                {"field": "a", "rule": "not_null"},
                {"field": "a", "rule": "range", "min": 0},
                {"field": "s", "rule": "enum", "values": ["x"]},
                {"field": "j", "rule": "json_schema", "schema": {"type": "object"}},
            ],
        },
        {"type": "validate", "rules": [{"rule": "expr", "expr": "a < 100"}]},
    ]
    pipeline = compile_pipeline(steps)
    batch = make_batch(
        a=["1", None, "-5", "200", "x", "2"],
        s=["x", "y", "x", "x", "x", "x"],
        j=["{}", "{}", "[]", "{}", "{}", "[]"],
    )

    result = pipeline.run(batch)

    refs = source_refs(6)
    assert result.violations.to_pylist() == [
        {"rule": "steps[1].rules[0] (a)", "_source_ref": refs[1]},
        {"rule": "steps[1].rules[2] (s)", "_source_ref": refs[1]},
        {"rule": "steps[1].rules[1] (a)", "_source_ref": refs[2]},
        {"rule": "steps[2].rules[0]", "_source_ref": refs[3]},
        # A value that does not convert is NULL for the rules.
        {"rule": "steps[1].rules[0] (a)", "_source_ref": refs[4]},
        # json_schema runs on the rows the query kept.
        {"rule": "steps[1].rules[3] (j)", "_source_ref": refs[5]},
    ]
    assert result.rejected["_source_ref"].to_pylist() == refs[1:]
    assert pipeline.rules == {
        "steps[1].rules[0] (a)": {"step": 1, "field": "a", "kind": "not_null"},
        "steps[1].rules[1] (a)": {"step": 1, "field": "a", "kind": "range"},
        "steps[1].rules[2] (s)": {"step": 1, "field": "s", "kind": "enum"},
        "steps[1].rules[3] (j)": {"step": 1, "field": "j", "kind": "json_schema"},
        "steps[2].rules[0]": {"step": 2, "field": "", "kind": "expr"},
    }


def test_no_violations_without_rejected_rows(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [{"type": "validate", "rules": [{"field": "a", "rule": "not_null"}]}]
    result = compile_pipeline(steps).run(make_batch(a=["1", "2"]))
    assert result.violations.num_rows == 0
    assert result.violations.schema.names == ["rule", "_source_ref"]
