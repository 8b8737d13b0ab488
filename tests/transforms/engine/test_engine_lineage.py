"""Column lineage: the source columns each output field reads."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from transforms.engine import EngineError, StepConfigError, expression_columns


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        pytest.param("carrier", ["carrier"], id="column"),
        pytest.param("'nyc'", [], id="constant"),
        pytest.param(
            "CAST(distance AS DOUBLE) * 1.609344 + Distance", ["distance"], id="once"
        ),
        pytest.param(
            "coalesce(arr_time, dep_time) - sched_dep_time",
            ["arr_time", "dep_time", "sched_dep_time"],
            id="order-of-first-use",
        ),
        pytest.param("payload.user.id", ["payload"], id="nested-dot"),
        pytest.param("payload['user']['id']", ["payload"], id="nested-brackets"),
        pytest.param(
            "list_transform(tags, t -> upper(t) || suffix)",
            ["tags", "suffix"],
            id="lambda-parameter-is-not-a-column",
        ),
        pytest.param('"Dep Time" > 3', ["Dep Time"], id="quoted"),
    ],
)
def test_expression_columns(expr: str, expected: list[str]) -> None:
    assert expression_columns(expr) == expected


def test_expression_columns_refuses_what_the_engine_refuses() -> None:
    with pytest.raises(StepConfigError) as raised:
        expression_columns("(SELECT secret FROM t)")

    assert str(raised.value) == "expr: subqueries are not allowed"


def test_lineage_follows_fields_through_maps_and_masks(compile_pipeline: Any) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "carrier", "type": "string"},
                {
                    "name": "distance_km",
                    "expr": "CAST(distance AS DOUBLE) * 1.609344",
                    "type": "float",
                },
                {"name": "delay", "expr": "arr_time - dep_time", "type": "integer"},
                {"name": "user_id", "expr": "payload.user.id", "type": "integer"},
                {"name": "source", "expr": "'nyc'", "type": "string"},
            ],
        },
        {"type": "filter", "where": "delay > 0"},
        {"type": "mask", "fields": [{"name": "carrier", "method": "redact"}]},
        {
            "type": "map",
            "fields": [
                {"name": "carrier", "type": "string"},
                {"name": "speed", "expr": "distance_km / delay", "type": "float"},
                {"name": "user_id", "type": "integer"},
                {"name": "source", "type": "string"},
            ],
        },
    ]

    assert compile_pipeline(steps).column_lineage == {
        "carrier": ["carrier"],
        "speed": ["arr_time", "dep_time", "distance"],
        "user_id": ["payload"],
        "source": [],
    }


def test_lineage_of_an_aggregate(compile_pipeline: Any) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "carrier", "type": "string"},
                {"name": "delay", "expr": "dep_delay", "type": "integer"},
            ],
        },
        {
            "type": "aggregate",
            "group_by": ["carrier"],
            "measures": [
                {"name": "flights", "fn": "count"},
                {"name": "avg_delay", "fn": "avg", "expr": "delay"},
            ],
        },
    ]

    assert compile_pipeline(steps).column_lineage == {
        "carrier": ["carrier"],
        "flights": [],
        "avg_delay": ["dep_delay"],
    }


def test_without_a_map_lineage_needs_the_input_columns(compile_pipeline: Any) -> None:
    steps = [{"type": "filter", "where": "a > b"}]
    schema = pa.schema(
        [("a", pa.string()), ("b", pa.string()), ("_source_ref", pa.string())]
    )

    with pytest.raises(EngineError):
        compile_pipeline(steps).column_lineage  # noqa: B018
    assert compile_pipeline(steps, input_schema=schema).column_lineage == {
        "a": ["a"],
        "b": ["b"],
    }
