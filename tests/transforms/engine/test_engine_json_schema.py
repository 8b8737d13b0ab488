"""The json_schema validate rule (Draft 2020-12), applied after the query."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest

from transforms.engine import StepConfigError, compile_steps

USER_SCHEMA = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["id"],
        }
    },
    "required": ["user"],
}


def json_rule(field: str = "record", schema: Any = USER_SCHEMA) -> dict[str, Any]:
    return {
        "type": "validate",
        "rules": [{"field": field, "rule": "json_schema", "schema": schema}],
    }


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param('{"user": {"id": 1, "tags": ["a"]}}', None, id="valid"),
        pytest.param(None, None, id="null-passes"),
        pytest.param(
            '{"user": {"id": "7"}}',
            "record: $.user.id: '7' is not of type 'integer'",
            id="wrong-type",
        ),
        pytest.param(
            '{"user": {"id": 1, "tags": ["a", 2]}}',
            "record: $.user.tags[1]: 2 is not of type 'string'",
            id="nested-path",
        ),
        pytest.param("{}", "record: $: 'user' is a required property", id="missing"),
        pytest.param("{not json", "record: not valid JSON", id="not-json"),
        pytest.param('{"user": NaN}', "record: not valid JSON", id="nan"),
        pytest.param(
            "[" * 100_000 + "]" * 100_000,
            "record: not valid JSON",
            id="too-deep",
        ),
        pytest.param(
            json.dumps({"user": {"id": "x" * 1000}}),
            "record: $.user.id: '" + "x" * 199 + "...",
            id="long-message-cut",
        ),
    ],
)
def test_json_schema_rule(
    compile_pipeline: Any, make_batch: Any, payload: str | None, expected: str | None
) -> None:
    pipeline = compile_pipeline([json_rule()])

    result = pipeline.run(make_batch(record=[payload], other=["x"]))

    assert result.rejected["_error"].to_pylist() == (
        [] if expected is None else [expected]
    )
    assert result.output.num_rows == (1 if expected is None else 0)


def test_rejected_rows_keep_input_order_and_other_errors(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "record", "expr": "payload", "type": "json"},
                {"name": "n", "expr": "n", "type": "integer"},
            ],
        },
        {
            "type": "validate",
            "rules": [
                {"field": "record", "rule": "json_schema", "schema": USER_SCHEMA},
                {"field": "n", "rule": "range", "max": 10},
            ],
        },
        {"type": "filter", "where": "n > 0"},
    ]
    batch = make_batch(
        payload=['{"user": {"id": 1}}', "{}", "oops", "{}", '{"user": {"id": 2}}'],
        n=["1", "2", "3", "99", "0"],
    )

    result = compile_pipeline(steps).run(batch)

    assert result.output["n"].to_pylist() == [1]
    assert result.filtered == 1
    assert result.rejected.select(["payload", "_error", "_step"]).to_pylist() == [
        {
            "payload": "{}",
            "_error": "record: $: 'user' is a required property",
            "_step": "validate",
        },
        {
            "payload": "oops",
            "_error": "record: cannot convert 'oops' to json",
            "_step": "map",
        },
        {
            "payload": "{}",
            "_error": "n: 99 is above the maximum 10",
            "_step": "validate",
        },
    ]


def test_nested_struct_columns_are_validated_as_json(compile_pipeline: Any) -> None:
    batch = pa.table(
        {
            "record": pa.array(
                [{"user": {"id": 1}}, {"user": {"id": None}}],
                pa.struct([("user", pa.struct([("id", pa.int64())]))]),
            ),
            "_source_ref": ["a", "b"],
        }
    )

    result = compile_pipeline([json_rule()]).run(batch)

    assert result.rejected.select(["_source_ref", "_error"]).to_pylist() == [
        {
            "_source_ref": "b",
            "_error": "record: $.user.id: None is not of type 'integer'",
        }
    ]


def test_two_schema_rules_on_one_row_list_both_messages(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        {
            "type": "validate",
            "rules": [
                {"field": "a", "rule": "json_schema", "schema": {"type": "object"}},
                {"field": "b", "rule": "json_schema", "schema": {"type": "array"}},
            ],
        }
    ]

    result = compile_pipeline(steps).run(make_batch(a=["1"], b=["2"]))

    assert result.rejected["_error"].to_pylist() == [
        "a: $: 1 is not of type 'object'; b: $: 2 is not of type 'array'"
    ]


def test_remote_references_are_not_fetched(
    compile_pipeline: Any, make_batch: Any
) -> None:
    schema = {"$ref": "https://example.com/user.json"}

    result = compile_pipeline([json_rule(schema=schema)]).run(make_batch(record=["{}"]))

    assert result.rejected["_error"].to_pylist() == [
        "record: the schema's reference cannot be resolved: "
        "Unresolvable: https://example.com/user.json"
    ]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        pytest.param(
            [json_rule(schema={"type": "objekt"})],
            "steps[0].rules[0] (record): invalid JSON Schema: 'objekt' is not valid "
            "under any of the given schemas",
            id="invalid-schema",
        ),
        pytest.param(
            [json_rule(schema=[1])],
            "steps[0].rules[0] (record): schema must be a JSON Schema object",
            id="not-an-object",
        ),
        pytest.param(
            [
                {"type": "map", "fields": [{"name": "n", "type": "integer"}]},
                json_rule(field="n", schema={}),
            ],
            "steps[1].rules[0] (n): json_schema applies to json, string or nested "
            "fields, not to a integer field",
            id="integer-field",
        ),
    ],
)
def test_invalid_json_schema_config(steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(StepConfigError) as raised:
        compile_steps(steps)

    assert str(raised.value) == message


def test_validation_cost_on_50k_rows(compile_pipeline: Any) -> None:
    # Each distinct payload is parsed and validated once (about 1 s measured
    # for 50k distinct payloads, see bench/engine.py).
    rows = 50_000
    payloads = [
        json.dumps({"user": {"id": n if n % 100 else str(n), "tags": ["a"]}})
        for n in range(rows)
    ]
    batch = pa.table({"record": payloads, "_source_ref": [str(n) for n in range(rows)]})

    result = compile_pipeline([json_rule()]).run(batch)

    assert result.rejected.num_rows == 500
    assert result.rejected["_error"][0].as_py() == (
        "record: $.user.id: '0' is not of type 'integer'"
    )
