"""The aggregate step: partial aggregates per batch, merged exactly."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from transforms.engine import EngineError, StepConfigError, merge_partials

FLIGHTS_MAP = {
    "type": "map",
    "fields": [
        {"name": "carrier", "expr": "carrier", "type": "string"},
        {"name": "origin", "expr": "origin", "type": "string"},
        {"name": "distance_km", "expr": "distance", "type": "decimal", "scale": 2},
        {"name": "dep_delay_min", "expr": "dep_delay", "type": "integer"},
        {"name": "tail_number", "expr": "tailnum", "type": "string"},
        {"name": "speed", "expr": "speed", "type": "float"},
    ],
}
MEASURES = [
    {"name": "flights", "fn": "count"},
    {"name": "delayed", "fn": "count", "expr": "dep_delay_min"},
    {"name": "total_distance", "fn": "sum", "expr": "distance_km"},
    {"name": "total_delay", "fn": "sum", "expr": "dep_delay_min"},
    {"name": "min_delay", "fn": "min", "expr": "dep_delay_min"},
    {"name": "max_delay", "fn": "max", "expr": "dep_delay_min"},
    {"name": "avg_delay", "fn": "avg", "expr": "dep_delay_min"},
    {"name": "tails", "fn": "count_distinct", "expr": "tail_number"},
    {"name": "avg_speed", "fn": "avg", "expr": "speed"},
]
FLOAT_MEASURES = ("avg_speed",)


def aggregate(group_by: list[str], measures: list[dict[str, Any]] = MEASURES) -> Any:
    return {"type": "aggregate", "group_by": group_by, "measures": measures}


def flights(rows: int, seed: int) -> pa.Table:
    """Random string rows with NULLs in every column, and some bad delays."""
    rnd = random.Random(seed)

    def maybe(value: str) -> str | None:
        return None if rnd.random() < 0.1 else value

    return pa.table(
        {
            "carrier": [maybe(rnd.choice(["UA", "AA", "B6"])) for _ in range(rows)],
            "origin": [maybe(rnd.choice(["EWR", "JFK"])) for _ in range(rows)],
            "distance": [
                maybe(f"{rnd.randint(80, 4983)}.{rnd.randint(0, 99)}")
                for _ in range(rows)
            ],
            "dep_delay": [
                maybe("bad" if rnd.random() < 0.02 else str(rnd.randint(-20, 300)))
                for _ in range(rows)
            ],
            "tailnum": [maybe(f"N{rnd.randint(1, 40)}") for _ in range(rows)],
            "speed": [maybe(str(rnd.uniform(100, 600))) for _ in range(rows)],
            "_source_ref": [f"#{n}" for n in range(rows)],
        }
    )


def random_chunks(table: pa.Table, rnd: random.Random) -> list[pa.Table]:
    """Split into chunks of random sizes, some empty, in random order."""
    cuts = sorted(rnd.choices(range(table.num_rows + 1), k=6))
    bounds = [0, *cuts, cuts[-1], table.num_rows]  # repeated cut: an empty chunk
    chunks = [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    rnd.shuffle(chunks)
    return chunks


def expected_groups(
    table: pa.Table, group_by: list[str]
) -> dict[tuple, dict[str, Any]]:
    """The aggregates computed in plain Python, skipping rows with a bad delay."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        if row["dep_delay"] == "bad":
            continue
        groups[tuple(row[k] for k in group_by)].append(row)
    out = {}
    for key, rows in groups.items():
        delays = [int(r["dep_delay"]) for r in rows if r["dep_delay"] is not None]
        distances = [Decimal(r["distance"]) for r in rows if r["distance"] is not None]
        tails = {r["tailnum"] for r in rows if r["tailnum"] is not None}
        speeds = [float(r["speed"]) for r in rows if r["speed"] is not None]
        out[key] = {
            "flights": len(rows),
            "delayed": len(delays),
            "total_distance": sum(distances) if distances else None,
            "total_delay": sum(delays) if delays else None,
            "min_delay": min(delays, default=None),
            "max_delay": max(delays, default=None),
            "avg_delay": sum(delays) / len(delays) if delays else None,
            "tails": len(tails),
            "avg_speed": sum(speeds) / len(speeds) if speeds else None,
        }
    return out


def by_key(table: pa.Table, group_by: list[str]) -> dict[tuple, dict[str, Any]]:
    return {tuple(row.pop(k) for k in group_by): row for row in table.to_pylist()}


def without_floats(groups: dict[tuple, dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {
        key: {k: v for k, v in row.items() if k not in FLOAT_MEASURES}
        for key, row in groups.items()
    }


@pytest.mark.parametrize("seed", range(5), ids=lambda seed: f"seed-{seed}")
@pytest.mark.parametrize(
    "group_by",
    [["carrier", "origin"], ["carrier"], []],
    ids=["carrier-origin", "carrier", "no-keys"],
)
def test_merged_partials_equal_one_pass_for_any_split(
    compile_pipeline: Any, seed: int, group_by: list[str]
) -> None:
    rnd = random.Random(seed)
    table = flights(rnd.randint(0, 400), seed)
    pipeline = compile_pipeline([FLIGHTS_MAP, aggregate(group_by)])

    partials = [pipeline.run(chunk).output for chunk in random_chunks(table, rnd)]
    merged = merge_partials(pipeline, partials)
    one_pass = merge_partials(pipeline, [pipeline.run(table).output])

    assert merged.schema == pipeline.final_schema
    got, once = by_key(merged, group_by), by_key(one_pass, group_by)
    assert without_floats(got) == without_floats(once)
    assert_floats_close(got, once)
    want = expected_groups(table, group_by)
    if not group_by and not want:  # no rows: one row of empty aggregates
        want = {(): {**dict.fromkeys(got[()]), "flights": 0, "delayed": 0, "tails": 0}}
    assert without_floats(got) == without_floats(want)
    assert_floats_close(got, want)


def assert_floats_close(
    got: dict[tuple, dict[str, Any]], want: dict[tuple, dict[str, Any]]
) -> None:
    """Float sums depend on the summation order: equal up to rounding."""
    assert got.keys() == want.keys()
    for key, row in want.items():
        for name in FLOAT_MEASURES:
            if row[name] is None:
                assert got[key][name] is None
            else:
                assert got[key][name] == pytest.approx(row[name], rel=1e-12)


def test_merge_of_merged_partials_and_re_merge(compile_pipeline: Any) -> None:
    table = flights(300, 11)
    pipeline = compile_pipeline([FLIGHTS_MAP, aggregate(["carrier"])])
    parts = [pipeline.run(table.slice(n, 50)).output for n in range(0, 300, 50)]

    halves = [
        pipeline.merge_partials(parts[:3], final=False),
        pipeline.merge_partials(parts[3:], final=False),
    ]

    assert halves[0].schema == pipeline.output_schema
    assert without_floats(by_key(merge_partials(pipeline, halves), ["carrier"])) == (
        without_floats(by_key(merge_partials(pipeline, parts), ["carrier"]))
    )


def test_partials_and_rejected_rows_of_one_batch(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        FLIGHTS_MAP,
        aggregate(
            ["carrier"],
            [
                {"name": "flights", "fn": "count"},
                {"name": "avg_delay", "fn": "avg", "expr": "dep_delay_min"},
                {"name": "tails", "fn": "count_distinct", "expr": "tail_number"},
            ],
        ),
    ]
    batch = make_batch(
        carrier=["UA", "UA", "AA", "UA"],
        origin=["EWR"] * 4,
        distance=["1"] * 4,
        dep_delay=["10", "20", "oops", None],
        tailnum=["N1", "N1", "N2", None],
        speed=["1"] * 4,
    )
    pipeline = compile_pipeline(steps)

    result = pipeline.run(batch)

    assert result.output.to_pylist() == [
        {
            "carrier": "UA",
            "flights": 3,
            "avg_delay__sum": 30,
            "avg_delay__count": 2,
            "tails__distinct": ["N1"],
        }
    ]
    assert result.rejected["_error"].to_pylist() == [
        "dep_delay_min: cannot convert 'oops' to integer"
    ]
    assert merge_partials(pipeline, [result.output]).to_pylist() == [
        {"carrier": "UA", "flights": 3, "avg_delay": 15.0, "tails": 1}
    ]


def test_a_raising_measure_expression_rejects_its_row_with_step_aggregate(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        aggregate(["g"], [{"name": "total", "fn": "sum", "expr": "CAST(n AS INTEGER)"}])
    ]
    pipeline = compile_pipeline(steps)

    result = pipeline.run(make_batch(g=["a", "a", "b"], n=["1", "x", "2"]))

    assert sorted(result.output.to_pylist(), key=lambda r: r["g"]) == [
        {"g": "a", "total": 1},
        {"g": "b", "total": 2},
    ]
    assert result.rejected["_step"].to_pylist() == ["aggregate"]
    assert (
        result.rejected["_error"]
        .to_pylist()[0]
        .startswith("total: Conversion Error: Could not convert string 'x' to INT32")
    )


def test_schemas_are_known_at_compile_time_after_a_map(compile_pipeline: Any) -> None:
    pipeline = compile_pipeline(
        [
            FLIGHTS_MAP,
            aggregate(
                ["carrier"],
                [
                    {"name": "flights", "fn": "count"},
                    {"name": "total_distance", "fn": "sum", "expr": "distance_km"},
                    {"name": "max_delay", "fn": "max", "expr": "dep_delay_min"},
                    {"name": "avg_delay", "fn": "avg", "expr": "dep_delay_min"},
                    {"name": "tails", "fn": "count_distinct", "expr": "tail_number"},
                ],
            ),
        ]
    )

    assert pipeline.is_aggregate is True
    assert pipeline.output_schema == pa.schema(
        [
            ("carrier", pa.string()),
            ("flights", pa.int64()),
            ("total_distance", pa.decimal128(38, 2)),
            ("max_delay", pa.int64()),
            ("avg_delay__sum", pa.int64()),
            ("avg_delay__count", pa.int64()),
            ("tails__distinct", pa.list_(pa.field("l", pa.string()))),
        ]
    )
    assert pipeline.final_schema == pa.schema(
        [
            ("carrier", pa.string()),
            ("flights", pa.int64()),
            ("total_distance", pa.decimal128(38, 2)),
            ("max_delay", pa.int64()),
            ("avg_delay", pa.float64()),
            ("tails", pa.int64()),
        ]
    )
    assert pipeline.merge_partials([]).num_rows == 0


def test_without_a_map_the_schema_comes_with_the_first_batch(
    compile_pipeline: Any, make_batch: Any
) -> None:
    pipeline = compile_pipeline([aggregate(["g"], [{"name": "n", "fn": "count"}])])

    with pytest.raises(EngineError):
        pipeline.final_schema  # noqa: B018
    partial = pipeline.run(make_batch(g=["a", "b", "a"])).output

    assert pipeline.final_schema == pa.schema([("g", pa.string()), ("n", pa.int64())])
    assert sorted(merge_partials(pipeline, [partial]).to_pylist(), key=str) == [
        {"g": "a", "n": 2},
        {"g": "b", "n": 1},
    ]


def test_a_non_aggregate_pipeline_has_no_partials(compile_pipeline: Any) -> None:
    pipeline = compile_pipeline([FLIGHTS_MAP])

    assert pipeline.is_aggregate is False
    assert pipeline.final_schema == pipeline.output_schema
    with pytest.raises(EngineError, match="needs a pipeline ending in aggregate"):
        merge_partials(pipeline, [])


@pytest.mark.parametrize(
    ("step", "message"),
    [
        pytest.param(
            aggregate(["flight"], [{"name": "n", "fn": "count"}]),
            "steps[1].group_by[0] (flight): unknown column 'flight'",
            id="unknown-key",
        ),
        pytest.param(
            aggregate(["carrier"], [{"name": "n", "fn": "median", "expr": "speed"}]),
            "steps[1].measures[0] (n): unknown fn 'median'; "
            "use count, sum, min, max, avg, count_distinct",
            id="unknown-fn",
        ),
        pytest.param(
            aggregate(["carrier"], [{"name": "n", "fn": "sum"}]),
            "steps[1].measures[0] (n): sum needs an expr",
            id="sum-without-expr",
        ),
        pytest.param(
            aggregate(["carrier"], [{"name": "n", "fn": "sum", "expr": "sum(speed)"}]),
            "steps[1].measures[0] (n): aggregate functions are not allowed",
            id="nested-aggregate",
        ),
        pytest.param(
            aggregate(["carrier"], [{"name": "carrier", "fn": "count"}]),
            "steps[1].measures[0] (carrier): duplicate name 'carrier'",
            id="measure-named-like-a-key",
        ),
        pytest.param(
            aggregate(
                [],
                [
                    {"name": "d", "fn": "avg", "expr": "speed"},
                    {"name": "d__sum", "fn": "count"},
                ],
            ),
            "steps[1].measures[1] (d__sum): duplicate name 'd__sum'",
            id="clashes-with-a-partial-column",
        ),
        pytest.param(
            aggregate(["carrier"], [{"name": "n", "fn": "sum", "expr": "carrier"}]),
            "steps[1].measures[0] (n): Binder Error: No function matches the given "
            "name and argument types 'sum(VARCHAR)'. You might need to add explicit "
            "type casts.",
            id="sum-of-strings",
        ),
    ],
)
def test_invalid_aggregate_config(step: dict[str, Any], message: str) -> None:
    from transforms.engine import compile_steps

    with pytest.raises(StepConfigError) as raised:
        compile_steps([FLIGHTS_MAP, step])

    assert str(raised.value) == message


def test_aggregate_must_be_last() -> None:
    from transforms.engine import compile_steps

    with pytest.raises(StepConfigError) as raised:
        compile_steps(
            [
                aggregate([], [{"name": "n", "fn": "count"}]),
                {"type": "filter", "where": "n > 1"},
            ]
        )

    assert str(raised.value) == "steps[1]: aggregate must be the last step"


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        pytest.param(
            [],
            [{"n": 0, "total": None, "tails": 0, "avg_n": None}],
            id="no-keys-one-row",
        ),
        pytest.param(["g"], [], id="keys-no-rows"),
    ],
)
def test_only_empty_chunks(
    compile_pipeline: Any,
    make_batch: Any,
    group_by: list[str],
    expected: list[dict[str, Any]],
) -> None:
    measures = [
        {"name": "n", "fn": "count"},
        {"name": "total", "fn": "sum", "expr": "CAST(x AS INTEGER)"},
        {"name": "tails", "fn": "count_distinct", "expr": "x"},
        {"name": "avg_n", "fn": "avg", "expr": "CAST(x AS INTEGER)"},
    ]
    pipeline = compile_pipeline([aggregate(group_by, measures)])
    empty = make_batch(g=[], x=[])

    partials = [pipeline.run(empty).output, pipeline.run(empty).output]

    merged = merge_partials(pipeline, partials)
    assert [{k: v for k, v in r.items() if k != "g"} for r in merged.to_pylist()] == (
        expected
    )
