"""Expressions that raise for some rows: only those rows are rejected."""

from __future__ import annotations

from typing import Any

import pytest

from transforms.engine import EngineError, StepConfigError
from transforms.engine.compiler import MAX_BISECTED_ROWS, MAX_DIAGNOSED_ROWS
from transforms.engine.planner import RAISED_MARK

CAST_MESSAGE = (
    "n: Conversion Error: Could not convert string 'bad' to INT32 "
    "when casting from source column x"
)


def test_a_raising_expression_rejects_only_its_rows(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "n", "expr": "CAST(x AS INT) + 1", "type": "integer"},
                {"name": "y", "expr": "y", "type": "integer"},
            ],
        }
    ]
    pipeline = compile_pipeline(steps)
    batch = make_batch(x=["1", "bad", "3", "bad"], y=["1", "2", "3", "x"])

    result = pipeline.run(batch)

    assert result.output["n"].to_pylist() == [2, 4]
    assert result.rejected.select(
        ["x", "y", "_source_ref", "_error", "_step"]
    ).to_pylist() == [
        {
            "x": "bad",
            "y": "2",
            "_source_ref": "/data/flights.csv#1",
            "_error": CAST_MESSAGE,
            "_step": "map",
        },
        {
            "x": "bad",
            "y": "x",
            "_source_ref": "/data/flights.csv#3",
            "_error": f"{CAST_MESSAGE}; y: cannot convert 'x' to integer",
            "_step": "map",
        },
    ]


def test_a_raising_filter_rejects_the_row_with_step_filter(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        {
            "type": "filter",
            "where": "CASE WHEN x = 'boom' THEN error('bad x') ELSE x <> 'skip' END",
        }
    ]
    pipeline = compile_pipeline(steps)

    result = pipeline.run(make_batch(x=["a", "boom", "skip"]))

    assert result.output["x"].to_pylist() == ["a"]
    assert result.filtered == 1
    assert result.rejected.select(["_error", "_step"]).to_pylist() == [
        {"_error": "where: Invalid Input Error: bad x", "_step": "filter"}
    ]


def test_volatile_expressions_fall_back_to_bisection(
    compile_pipeline: Any, make_batch: Any
) -> None:
    # TRY() refuses volatile functions such as random(), so the safe plan
    # cannot be built and the batch is bisected instead.
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "n", "expr": "CAST(x AS INT)", "type": "integer"},
                {"name": "lucky", "expr": "random() < 2", "type": "boolean"},
            ],
        }
    ]
    pipeline = compile_pipeline(steps)
    batch = make_batch(x=[str(n) for n in range(20)] + ["bad"] + ["21", "22"])

    result = pipeline.run(batch)

    assert result.output["n"].to_pylist() == [*range(20), 21, 22]
    assert result.output["lucky"].to_pylist() == [True] * 22
    assert result.rejected.select(["_source_ref", "_error", "_step"]).to_pylist() == [
        {
            "_source_ref": "/data/flights.csv#20",
            "_error": "n: Conversion Error: Could not convert string 'bad' to INT32 "
            "when casting from source column x",
            "_step": "map",
        }
    ]


def test_bisection_gives_up_when_too_many_rows_raise(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "n", "expr": "CAST(x AS INT)", "type": "integer"},
                {"name": "lucky", "expr": "random() < 2", "type": "boolean"},
            ],
        }
    ]
    pipeline = compile_pipeline(steps)

    with pytest.raises(EngineError, match=f"more than {MAX_BISECTED_ROWS} rows"):
        pipeline.run(make_batch(x=["bad"] * (MAX_BISECTED_ROWS + 1)))


def test_many_raising_rows_after_the_first_ones_get_a_generic_message(
    compile_pipeline: Any, make_batch: Any
) -> None:
    pipeline = compile_pipeline(
        [
            {
                "type": "map",
                "fields": [{"name": "n", "expr": "CAST(x AS INT)", "type": "integer"}],
            }
        ]
    )
    count = MAX_DIAGNOSED_ROWS + 5

    result = pipeline.run(make_batch(x=["bad"] * count + ["1"]))

    errors = result.rejected["_error"].to_pylist()
    assert result.output["n"].to_pylist() == [1]
    assert errors[0] == CAST_MESSAGE
    assert errors.count(CAST_MESSAGE) == MAX_DIAGNOSED_ROWS
    assert errors[-1] == f"n: {RAISED_MARK}"


def test_an_error_no_row_explains_is_a_config_error(
    compile_pipeline: Any, make_batch: Any
) -> None:
    # A query that fails even without rows is the pipeline's problem, not a
    # row's: it is reported when the batch's schema is first planned.
    steps = [{"type": "filter", "where": "regexp_matches(x, '(')"}]
    pipeline = compile_pipeline(steps)

    with pytest.raises(StepConfigError) as raised:
        pipeline.run(make_batch(x=["a"]))

    assert str(raised.value) == "steps[0].where: Invalid Input Error: missing ): ("


@pytest.mark.parametrize("volatile", [False, True], ids=["try", "bisect"])
def test_a_message_cutting_a_character_in_two_is_a_row_error(
    compile_pipeline: Any, make_batch: Any, volatile: bool
) -> None:
    # Regression (found by hypothesis): DuckDB quotes malformed JSON in its
    # message cut to a byte length; cut inside 'é' the binding raised
    # UnicodeDecodeError out of run().
    expr = "json_extract_string(p, '$.a')"
    if volatile:  # TRY cannot wrap random(): the batch is bisected instead
        expr = f"CASE WHEN random() < 2 THEN {expr} END"
    steps = [{"type": "map", "fields": [{"name": "a", "expr": expr, "type": "string"}]}]
    pipeline = compile_pipeline(steps)
    batch = make_batch(p=['{"a": "x"}', "é" * 60, '{"a": "y"}'])

    result = pipeline.run(batch)

    assert result.output["a"].to_pylist() == ["x", "y"]
    assert result.rejected["p"].to_pylist() == ["é" * 60]
    assert result.rejected["_step"].to_pylist() == ["map"]
    assert result.rejected["_error"].to_pylist() == [f"a: {RAISED_MARK}"]
