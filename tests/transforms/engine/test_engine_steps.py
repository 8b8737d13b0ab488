"""Filter and validate steps, rejected rows, step order and batch handling."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from transforms.engine import EngineError, InputSchemaError, StepConfigError

FLIGHT_MAP = {
    "type": "map",
    "fields": [
        {"name": "carrier", "expr": "carrier", "type": "string", "required": True},
        {"name": "flight", "expr": "flight", "type": "integer"},
        {
            "name": "distance_km",
            "expr": "CAST(distance AS DOUBLE) * 1.609344",
            "type": "float",
        },
        {"name": "origin", "expr": "origin", "type": "string"},
    ],
}


def test_filter_counts_dropped_rows_and_does_not_reject_them(
    compile_pipeline: Any, make_batch: Any
) -> None:
    pipeline = compile_pipeline([{"type": "filter", "where": "origin <> 'XXX'"}])
    batch = make_batch(origin=["EWR", "XXX", None, "JFK"])

    result = pipeline.run(batch)

    assert result.output["origin"].to_pylist() == ["EWR", "JFK"]
    assert result.filtered == 2  # 'XXX', and NULL (the predicate is not true)
    assert result.rejected.num_rows == 0
    assert result.rows_in == 4


def test_filter_reads_map_output_and_keeps_rows_already_in_error(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        {"type": "map", "fields": [{"name": "n", "expr": "x", "type": "integer"}]},
        {"type": "filter", "where": "n > 1"},
    ]
    pipeline = compile_pipeline(steps)

    result = pipeline.run(make_batch(x=["1", "2", "oops"]))

    assert result.output["n"].to_pylist() == [2]
    assert result.filtered == 1
    assert result.rejected["_error"].to_pylist() == [
        "n: cannot convert 'oops' to integer"
    ]


@pytest.mark.parametrize(
    ("rule", "value", "expected"),
    [
        pytest.param(
            {"field": "carrier", "rule": "not_null"},
            None,
            "carrier: is null",
            id="not_null",
        ),
        pytest.param(
            {"field": "carrier", "rule": "regex", "pattern": "^[A-Z0-9]{2}$"},
            "x1",
            "carrier: 'x1' does not match ^[A-Z0-9]{2}$",
            id="regex",
        ),
        pytest.param(
            {"field": "carrier", "rule": "regex", "pattern": "^[A-Z0-9]{2}$"},
            "B6",
            None,
            id="regex-passes",
        ),
        pytest.param(
            {"field": "carrier", "rule": "enum", "values": ["EWR", "JFK", "LGA"]},
            "XXX",
            "carrier: 'XXX' is not one of EWR, JFK, LGA",
            id="enum",
        ),
        pytest.param(
            {"field": "carrier", "rule": "enum", "values": ["EWR", "JFK", "LGA"]},
            None,
            None,
            id="enum-null-passes",
        ),
    ],
)
def test_string_rules(
    compile_pipeline: Any,
    make_batch: Any,
    rule: dict[str, Any],
    value: Any,
    expected: Any,
) -> None:
    pipeline = compile_pipeline([{"type": "validate", "rules": [rule]}])

    result = pipeline.run(make_batch(carrier=[value]))

    errors = result.rejected["_error"].to_pylist()
    assert errors == ([expected] if expected else [])
    assert result.output.num_rows == (0 if expected else 1)


@pytest.mark.parametrize(
    ("distance", "expected"),
    [
        pytest.param(
            "25000", "distance_km: 25000.0 is above the maximum 20000", id="above"
        ),
        pytest.param("-1", "distance_km: -1.0 is below the minimum 0", id="below"),
        pytest.param("20000", None, id="at-maximum"),
        pytest.param("0", None, id="at-minimum"),
        pytest.param(None, None, id="null-passes"),
    ],
)
def test_range_rule(
    compile_pipeline: Any, make_batch: Any, distance: Any, expected: Any
) -> None:
    steps = [
        {
            "type": "map",
            "fields": [{"name": "distance_km", "expr": "distance", "type": "float"}],
        },
        {
            "type": "validate",
            "rules": [
                {"field": "distance_km", "rule": "range", "min": 0, "max": 20000}
            ],
        },
    ]
    pipeline = compile_pipeline(steps)

    result = pipeline.run(make_batch(distance=[distance]))

    assert result.rejected["_error"].to_pylist() == ([expected] if expected else [])


def test_range_and_enum_on_typed_fields(compile_pipeline: Any, make_batch: Any) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "day", "expr": "day", "type": "date"},
                {"name": "n", "expr": "n", "type": "integer"},
            ],
        },
        {
            "type": "validate",
            "rules": [
                {"field": "day", "rule": "range", "min": "2013-01-01"},
                {"field": "n", "rule": "enum", "values": [1, 2]},
            ],
        },
    ]
    pipeline = compile_pipeline(steps)

    result = pipeline.run(make_batch(day=["2012-12-31", "2013-01-01"], n=["1", "3"]))

    assert result.rejected["_error"].to_pylist() == [
        "day: 2012-12-31 is below the minimum 2013-01-01",
        "n: '3' is not one of 1, 2",
    ]


def test_map_and_validate_errors_reject_the_row_once(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        FLIGHT_MAP,
        {
            "type": "validate",
            "rules": [
                {"field": "distance_km", "rule": "range", "min": 0, "max": 20000},
                {"field": "origin", "rule": "enum", "values": ["EWR", "JFK", "LGA"]},
            ],
        },
    ]
    pipeline = compile_pipeline(steps)
    batch = make_batch(
        carrier=["UA", "AA", "B6"],
        flight=["1545", "517.5", "11"],
        distance=["1400", "20000", "100"],
        origin=["EWR", "ZZZ", "LGA"],
    )

    result = pipeline.run(batch)

    assert result.output["flight"].to_pylist() == [1545, 11]
    assert result.rejected.select(["_error", "_step"]).to_pylist() == [
        {
            "_error": "flight: cannot convert '517.5' to integer; "
            "distance_km: 32186.88 is above the maximum 20000; "
            "origin: 'ZZZ' is not one of EWR, JFK, LGA",
            "_step": "map",
        }
    ]


def test_rejected_rows_keep_their_original_values(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        FLIGHT_MAP,
        {
            "type": "validate",
            "rules": [
                {"field": "carrier", "rule": "regex", "pattern": "^[A-Z0-9]{2}$"}
            ],
        },
    ]
    pipeline = compile_pipeline(steps)
    batch = make_batch(
        carrier=["x1", "UA", None],
        flight=[" 0012 ", "1", "7"],
        distance=["10", "20", "30"],
        origin=["EWR", "JFK", "LGA"],
        extra=["kept", "as", "is"],
    )

    result = pipeline.run(batch)

    assert result.rejected.schema.names == [*batch.schema.names, "_error", "_step"]
    assert result.rejected.to_pylist() == [
        {
            "carrier": "x1",
            "flight": " 0012 ",
            "distance": "10",
            "origin": "EWR",
            "extra": "kept",
            "_source_ref": "/data/flights.csv#0",
            "_error": "carrier: 'x1' does not match ^[A-Z0-9]{2}$",
            "_step": "validate",
        },
        {
            "carrier": None,
            "flight": "7",
            "distance": "30",
            "origin": "LGA",
            "extra": "is",
            "_source_ref": "/data/flights.csv#2",
            "_error": "carrier: required value is missing",
            "_step": "map",
        },
    ]


def test_without_map_all_source_columns_are_kept(
    compile_pipeline: Any, make_batch: Any
) -> None:
    pipeline = compile_pipeline(
        [{"type": "validate", "rules": [{"field": "b", "rule": "not_null"}]}]
    )
    with pytest.raises(EngineError, match="without a map step"):
        _ = pipeline.output_schema

    result = pipeline.run(make_batch(a=["1", "2"], b=["x", None]))

    assert result.output.to_pylist() == [
        {"a": "1", "b": "x", "_source_ref": "/data/flights.csv#0"}
    ]
    assert pipeline.output_schema == pa.schema([("a", pa.string()), ("b", pa.string())])


def test_without_map_output_schema_comes_from_input_schema(
    compile_pipeline: Any, make_batch: Any
) -> None:
    schema = make_batch(a=["1"]).schema

    pipeline = compile_pipeline([], input_schema=schema)

    assert pipeline.output_schema == pa.schema([("a", pa.string())])


def test_a_second_map_reads_the_first_maps_fields(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        {"type": "map", "fields": [{"name": "n", "expr": "x", "type": "integer"}]},
        {
            "type": "map",
            "fields": [
                {"name": "twice", "expr": "n * 2", "type": "float"},
                {"name": "ref", "expr": "_source_ref", "type": "string"},
            ],
        },
    ]
    pipeline = compile_pipeline(steps)

    result = pipeline.run(make_batch(x=["21"]))

    assert result.output.to_pylist() == [
        {
            "twice": 42.0,
            "ref": "/data/flights.csv#0",
            "_source_ref": "/data/flights.csv#0",
        }
    ]


def test_one_pipeline_runs_many_batches_and_schemas(
    compile_pipeline: Any, make_batch: Any
) -> None:
    pipeline = compile_pipeline(
        [{"type": "map", "fields": [{"name": "n", "expr": "x", "type": "integer"}]}]
    )
    typed = pa.table({"x": pa.array([5], pa.int32()), "_source_ref": ["r"]})

    first = pipeline.run(make_batch(x=["1", "2"]))
    second = pipeline.run(make_batch(x=["3"]).to_batches()[0])
    third = pipeline.run(typed)

    assert first.output["n"].to_pylist() == [1, 2]
    assert second.output["n"].to_pylist() == [3]
    assert third.output["n"].to_pylist() == [5]


def test_empty_batch(compile_pipeline: Any, make_batch: Any) -> None:
    pipeline = compile_pipeline([FLIGHT_MAP])
    empty = make_batch(carrier=[], flight=[], distance=[], origin=[])

    result = pipeline.run(empty)

    assert (result.output.num_rows, result.rejected.num_rows) == (0, 0)
    assert (result.filtered, result.rows_in) == (0, 0)
    assert result.output.schema.names == [
        "carrier",
        "flight",
        "distance_km",
        "origin",
        "_source_ref",
    ]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        pytest.param({"a": ["1"]}, "no '_source_ref' column", id="no-source-ref"),
        pytest.param(
            {"a": ["1"], "_source_ref": ["r"], "_error": ["e"]},
            "reserved column '_error'",
            id="reserved-error",
        ),
        pytest.param(
            {"__engine_rid": ["1"], "_source_ref": ["r"]},
            "reserved column '__engine_rid'",
            id="reserved-internal",
        ),
    ],
)
def test_batch_schema_is_checked(
    compile_pipeline: Any, columns: dict[str, list[str]], message: str
) -> None:
    pipeline = compile_pipeline([])

    with pytest.raises(InputSchemaError, match=message):
        pipeline.run(pa.table(columns))


def test_closed_pipeline_refuses_to_run(compile_pipeline: Any, make_batch: Any) -> None:
    pipeline = compile_pipeline([])
    pipeline.close()

    with pytest.raises(EngineError, match="closed"):
        pipeline.run(make_batch(a=["1"]))


def test_planning_leaves_no_stand_in_tables_and_keeps_nested_types(
    compile_pipeline: Any, make_batch: Any
) -> None:
    """Each CTE is bound once against empty stand-in tables of the CTEs before
    it: nested and parameterised types survive the round trip through a table,
    and the tables are gone once the plan is built (also when it fails)."""
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "n", "expr": "n", "type": "integer"},
                {
                    "name": "d",
                    "expr": "d",
                    "type": "decimal",
                    "precision": 9,
                    "scale": 2,
                },
                {"name": "tags", "expr": "string_split(t, ',')", "type": "json"},
                {"name": "pair", "expr": "{'a': n, 'b c': t}", "type": "json"},
            ],
        },
        {"type": "filter", "where": "n > 1"},
        {"type": "validate", "rules": [{"field": "d", "rule": "range", "max": 50}]},
    ]
    pipeline = compile_pipeline(steps)
    result = pipeline.run(
        make_batch(n=["1", "2", "3"], d=["1.5", "2.25", "99"], t=["x,y", "z", "w"])
    )
    assert result.output["n"].to_pylist() == [2]
    assert str(result.output["d"].to_pylist()[0]) == "2.25"
    assert result.rejected["_error"].to_pylist() == ["d: 99.00 is above the maximum 50"]
    temporary = "SELECT count(*) FROM duckdb_tables() WHERE temporary"
    assert pipeline.con.sql(temporary).fetchall() == [(0,)]
    broken = compile_pipeline(
        [
            {
                "type": "map",
                "fields": [{"name": "v", "expr": "nope + 1", "type": "integer"}],
            }
        ]
    )
    with pytest.raises(StepConfigError, match="nope"):
        broken.run(make_batch(x=["1"]))
    assert broken.con.sql(temporary).fetchall() == [(0,)]
