"""The Arrow pre-cast of integer and timestamp columns changes nothing but speed.

A map field that is a bare input column of type ``integer`` reads an int64
companion that Arrow cast, when every value of the batch's column is plain
digits; one of type ``timestamptz`` reads a UTC timestamp companion when every
value is ``YYYY-MM-DDThh:mm:ssZ`` (see ``CompiledPipeline._precast_batch``).
Every result must equal the one of the same pipeline compiled with
``precast=False``: outputs, rejected rows with their original strings,
messages, ``_step``, violations, keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.transforms.engine.conftest import BatchFactory, Compile, source_refs
from transforms.engine import CompiledPipeline, EngineResult, compile_steps
from transforms.engine.compiler import MAX_PRECAST_VARIANTS

STEPS: list[dict[str, Any]] = [
    {"type": "validate", "rules": [{"field": "b", "rule": "regex", "pattern": "7$"}]},
    {
        "type": "map",
        "fields": [
            {"name": "a", "expr": "a", "type": "integer", "required": True},
            {"name": "b", "expr": '"B"', "type": "integer", "default": -1},
            {"name": "c", "type": "integer"},
            {"name": "a_text", "expr": "a", "type": "string"},
            {"name": "a_twice", "expr": "TRY_CAST(a AS BIGINT) * 2", "type": "integer"},
            {"name": "c_len", "expr": "length(c)", "type": "integer"},
            # Raises for a non-numeric b: the batch then goes the safe-plan way.
            {"name": "b_int", "expr": "CAST(b AS INTEGER)", "type": "integer"},
        ],
    },
    {"type": "filter", "where": "a IS NULL OR a <> 13"},
    {
        "type": "validate",
        "rules": [
            {"field": "a", "rule": "range", "min": -1000, "max": 10**12},
            {"field": "c", "rule": "unique"},
        ],
    },
]
COLUMNS = ("a", "b", "c")


def precast_sets(compiled: CompiledPipeline) -> set[tuple[str, ...]]:
    """The sets of pre-cast columns the pipeline planned (white box: the only
    way to see that the fast path ran, since its results are the same)."""
    return {key[2] for key in compiled._plans}


def assert_same(fast: EngineResult, slow: EngineResult) -> None:
    assert fast.output.equals(slow.output, check_metadata=True)
    assert fast.rejected.equals(slow.rejected, check_metadata=True)
    assert fast.violations.equals(slow.violations)
    assert (fast.filtered, fast.rows_in, fast.deduplicated) == (
        slow.filtered,
        slow.rows_in,
        slow.deduplicated,
    )
    if slow.rejected_keys is None:
        assert fast.rejected_keys is None
    else:
        assert fast.rejected_keys is not None
        assert fast.rejected_keys.equals(slow.rejected_keys)


def batch_of(columns: dict[str, list[str | None]]) -> pa.Table:
    count = len(next(iter(columns.values())))
    arrays = {name: pa.array(values, pa.string()) for name, values in columns.items()}
    return pa.table({**arrays, "_source_ref": source_refs(count)})


# --- the property ------------------------------------------------------------------

edge_text = st.sampled_from(
    [
        "",
        " ",
        " 12",
        "12 ",
        "+5",
        "-5",
        "--5",
        "+-5",
        "-",
        "+",
        "-0",
        "007",
        "0" * 30 + "1",
        "0x1F",
        "0X1f",
        "0b11",
        "1e3",
        "1.0",
        "1_000",
        "1,000",
        "13",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "99999999999999999999",
        "\u0661\u0662",  # Arabic-Indic digits
        "\uff11\uff12",  # fullwidth digits
        "\u00b2",  # superscript two: a digit to str.isdigit
        "12\x00",
        "x",
    ]
)
digits = st.integers(-(2**63), 2**63 - 1).map(str) | st.from_regex(
    r"-?[0-9]{1,25}", fullmatch=True
)
anything = edge_text | digits | st.text(alphabet="0123456789+- x\u0663", max_size=6)
# Values Arrow's int64 cast takes although the strict cast may not (hex).
arrow_castable = digits | st.sampled_from(["0x1F", "0X1f", "-0x10", "0x0", "0" * 30])


@st.composite
def batches(draw: st.DrawFn) -> pa.Table:
    """Columns of plain digits (pre-cast), of what Arrow casts, or of anything."""
    rows = draw(st.integers(1, 12))
    columns: dict[str, list[str | None]] = {}
    for name in COLUMNS:
        values = draw(st.sampled_from([digits, arrow_castable, anything]))
        columns[name] = draw(st.lists(st.none() | values, min_size=rows, max_size=rows))
    return batch_of(columns)


#: The property tests' settings (module-scoped pipelines are reused across examples).
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def pipelines() -> Iterator[tuple[CompiledPipeline, CompiledPipeline]]:
    with (
        compile_steps(STEPS) as fast,
        compile_steps(STEPS, precast=False) as slow,
    ):
        yield fast, slow


@PROPERTY
@given(batch=batches())
def test_precast_gives_the_same_result_as_the_strict_cast(
    pipelines: tuple[CompiledPipeline, CompiledPipeline], batch: pa.Table
) -> None:
    fast, slow = pipelines
    assert_same(fast.run(batch), slow.run(batch))


# --- examples ----------------------------------------------------------------------


def test_a_clean_batch_is_precast_and_keeps_its_strings(
    compile_pipeline: Compile,
) -> None:
    batch = batch_of(
        {"a": ["2013", "-0", "007"], "b": ["17", "27", None], "c": ["1", "2", "3"]}
    )
    fast = compile_pipeline(STEPS)
    slow = compile_pipeline(STEPS, precast=False)

    result = fast.run(batch)

    assert precast_sets(fast) == {("a", "b", "c")}
    assert_same(result, slow.run(batch))
    assert result.output.select(
        ["a", "a_text", "a_twice", "b", "c_len"]
    ).to_pydict() == {
        "a": [2013, 0, 7],
        "a_text": ["2013", "-0", "007"],
        "a_twice": [4026, 0, 14],
        "b": [17, 27, -1],
        "c_len": [1, 1, 1],
    }
    assert result.rejected.num_rows == 0


def test_a_bad_value_dead_letters_its_row_with_the_original_strings(
    compile_pipeline: Compile, make_batch: BatchFactory
) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "year", "expr": "year", "type": "integer", "required": True},
                {"name": "flight", "expr": "flight", "type": "integer"},
                {"name": "carrier", "expr": "carrier", "type": "string"},
            ],
        },
        {"type": "validate", "rules": [{"field": "carrier", "rule": "not_null"}]},
    ]
    batch = make_batch(
        year=["2013", "2013", "2013", "2014"],
        flight=["1545", "0x1F", "11", "7"],
        carrier=["UA", "AA", "B6", None],
    )
    compiled = compile_pipeline(steps)

    result = compiled.run(batch)

    # year pre-casts; flight (0x1F is not plain digits) stays with DuckDB.
    assert precast_sets(compiled) == {("year",)}
    assert result.output.to_pydict() == {
        "year": [2013, 2013],
        "flight": [1545, 11],
        "carrier": ["UA", "B6"],
        "_source_ref": [source_refs(4)[0], source_refs(4)[2]],
    }
    assert result.rejected.schema == batch.schema.append(
        pa.field("_error", pa.string())
    ).append(pa.field("_step", pa.string()))
    assert result.rejected.to_pylist() == [
        {
            "year": "2013",
            "flight": "0x1F",
            "carrier": "AA",
            "_source_ref": source_refs(4)[1],
            "_error": "flight: cannot convert '0x1F' to integer",
            "_step": "map",
        },
        {
            "year": "2014",
            "flight": "7",
            "carrier": None,
            "_source_ref": source_refs(4)[3],
            "_error": "carrier: is null",
            "_step": "validate",
        },
    ]
    assert_same(result, compile_pipeline(steps, precast=False).run(batch))


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(["12", "+5"], id="plus-sign"),
        pytest.param(["12", " 5 "], id="spaces"),
        pytest.param(["12", ""], id="empty-string"),
        pytest.param(["12", "99999999999999999999"], id="overflow"),
        pytest.param(["12", "0x1F"], id="hex"),
        pytest.param(["12", "\u0661"], id="unicode-digit"),
    ],
)
def test_a_column_arrow_would_cast_differently_is_not_precast(
    compile_pipeline: Compile, make_batch: BatchFactory, values: list[str]
) -> None:
    steps = [{"type": "map", "fields": [{"name": "v", "expr": "v", "type": "integer"}]}]
    batch = make_batch(v=values)
    compiled = compile_pipeline(steps)

    result = compiled.run(batch)

    assert precast_sets(compiled) == {()}
    assert_same(result, compile_pipeline(steps, precast=False).run(batch))


def test_a_column_masked_before_the_map_is_not_precast(
    compile_pipeline: Compile, make_batch: BatchFactory
) -> None:
    steps = [
        {"type": "mask", "fields": [{"name": "v", "method": "redact", "keep_last": 2}]},
        {"type": "map", "fields": [{"name": "v", "expr": "v", "type": "integer"}]},
    ]
    compiled = compile_pipeline(steps)

    result = compiled.run(make_batch(v=["1234"]))

    # Pre-cast, the field would read 1234 instead of the masked value.
    assert result.output.num_rows == 0
    assert result.rejected.to_pylist() == [
        {
            "v": "1234",
            "_source_ref": source_refs(1)[0],
            "_error": "v: cannot convert '***34' to integer",
            "_step": "map",
        }
    ]
    assert precast_sets(compiled) == {()}


def test_only_the_first_map_reads_input_columns(
    compile_pipeline: Compile, make_batch: BatchFactory
) -> None:
    steps = [
        {"type": "map", "fields": [{"name": "v", "expr": "w", "type": "string"}]},
        {"type": "map", "fields": [{"name": "w", "expr": "v", "type": "integer"}]},
    ]
    batch = make_batch(v=["1", "2"], w=["x", "5"])
    compiled = compile_pipeline(steps)

    result = compiled.run(batch)

    assert precast_sets(compiled) == {()}
    assert result.output.column("w").to_pylist() == [5]
    assert result.rejected.column("_error").to_pylist() == [
        "w: cannot convert 'x' to integer"
    ]


def test_columns_resolve_case_insensitively_and_large_strings_precast(
    compile_pipeline: Compile,
) -> None:
    steps = [
        {
            "type": "map",
            "fields": [{"name": "n", "expr": '"YEAR"', "type": "integer"}],
        }
    ]
    batch = pa.table(
        {
            "Year": pa.array(["2013", None, "-4"], pa.large_string()),
            "_source_ref": source_refs(3),
        }
    )
    compiled = compile_pipeline(steps)

    result = compiled.run(batch)

    assert precast_sets(compiled) == {("Year",)}
    assert result.output.column("n").to_pylist() == [2013, None, -4]
    assert_same(result, compile_pipeline(steps, precast=False).run(batch))


def test_precast_sets_per_schema_are_bounded(compile_pipeline: Compile) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": name, "expr": name, "type": "integer"} for name in "pqrstu"
            ],
        }
    ]
    fast = compile_pipeline(steps)
    slow = compile_pipeline(steps, precast=False)
    # Each batch has one column Arrow cannot cast: 6 distinct castable sets.
    for bad in "pqrstu":
        batch = batch_of(
            {name: ["1", "x" if name == bad else "2"] for name in "pqrstu"}
        )
        assert_same(fast.run(batch), slow.run(batch))

    # The first sets, then the plain plan (no planned set fits the others).
    planned = precast_sets(fast)
    assert planned == {
        (),
        ("q", "r", "s", "t", "u"),
        ("p", "r", "s", "t", "u"),
        ("p", "q", "s", "t", "u"),
        ("p", "q", "r", "t", "u"),
    }
    assert MAX_PRECAST_VARIANTS == 4
    assert len(fast._prepared) == len(planned)
    # A clean batch reuses a planned set within its castable columns.
    clean = batch_of({name: ["1", "2"] for name in "pqrstu"})
    assert_same(fast.run(clean), slow.run(clean))
    assert precast_sets(fast) == planned


def test_an_aggregate_over_precast_fields_is_unchanged(
    compile_pipeline: Compile,
) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "k", "expr": "k", "type": "string"},
                {"name": "n", "expr": "n", "type": "integer"},
            ],
        },
        {
            "type": "aggregate",
            "group_by": ["k"],
            "measures": [
                {"name": "total", "fn": "sum", "expr": "n"},
                {"name": "rows", "fn": "count"},
            ],
        },
    ]
    batch = batch_of({"k": ["a", "b", "a"], "n": ["1", "20", "300"]})
    fast = compile_pipeline(steps)
    slow = compile_pipeline(steps, precast=False)

    result = fast.run(batch)

    assert precast_sets(fast) == {("n",)}
    assert_same(result, slow.run(batch))
    merged = fast.merge_partials([result.output])
    assert merged.sort_by("k").to_pydict() == {
        "k": ["a", "b"],
        "total": [301, 20],
        "rows": [2, 1],
    }


def test_an_empty_batch_takes_no_precast_set(compile_pipeline: Compile) -> None:
    compiled = compile_pipeline(STEPS)

    result = compiled.run(batch_of({name: [] for name in COLUMNS}))

    assert (result.output.num_rows, result.rejected.num_rows) == (0, 0)
    assert precast_sets(compiled) == {()}


# --- timestamps --------------------------------------------------------------------

TS_STEPS: list[dict[str, Any]] = [
    {
        "type": "map",
        "fields": [
            {"name": "at", "expr": "at", "type": "timestamptz", "required": True},
            {"name": "until", "expr": "until", "type": "timestamptz"},
            {"name": "at_text", "expr": "at", "type": "string"},
            {"name": "at_day", "expr": "TRY_CAST(at AS DATE)", "type": "date"},
        ],
    },
    {
        "type": "validate",
        "rules": [{"field": "until", "rule": "not_null"}],
    },
]

# Naive datetimes (hypothesis's bounds must be naive like its values) written
# as UTC text.
canonical = st.datetimes(
    min_value=datetime(1, 1, 1),  # noqa: DTZ001
    max_value=datetime(9999, 12, 31, 23, 59, 59),  # noqa: DTZ001
).map(lambda d: f"{d.year:04d}-{d:%m-%dT%H:%M:%S}Z")
ts_edge = st.sampled_from(
    [
        "",
        " ",
        "2013-01-01T10:00:00Z ",
        " 2013-01-01T10:00:00Z",
        "2013-01-01 10:00:00Z",
        "2013-01-01t10:00:00Z",
        "2013-01-01T10:00:00z",
        "2013-01-01T10:00:00",
        "2013-01-01 10:00:00",
        "2013-01-01T10:00:00+00:00",
        "2013-01-01T10:00:00-05:00",
        "2013-01-01T10:00:00.5Z",
        "2013-01-01T10:00Z",
        "2013-01-01T10Z",
        "2013-01-01",
        "2013-02-29T00:00:00Z",
        "2012-02-29T00:00:00Z",
        "2013-01-01T23:59:60Z",
        "2013-01-01T24:00:00Z",
        "2013-13-01T00:00:00Z",
        "0000-01-01T00:00:00Z",
        "+013-01-01T00:00:00Z",
        "2013-01-01T10:00:00\u00a0",
        "x" * 20,
    ]
)
ts_anything = ts_edge | canonical | st.text(alphabet="0123456789-:TZ ", max_size=22)


@st.composite
def ts_batches(draw: st.DrawFn) -> pa.Table:
    """Columns of canonical UTC timestamps (pre-cast) or of anything."""
    rows = draw(st.integers(1, 10))
    columns: dict[str, list[str | None]] = {}
    for name in ("at", "until"):
        values = draw(st.sampled_from([canonical, canonical | ts_edge, ts_anything]))
        columns[name] = draw(st.lists(st.none() | values, min_size=rows, max_size=rows))
    return batch_of(columns)


@pytest.fixture(scope="module", params=["UTC", "America/New_York"])
def ts_pipelines(request) -> Iterator[tuple[CompiledPipeline, CompiledPipeline]]:
    with (
        compile_steps(TS_STEPS, timezone=request.param) as fast,
        compile_steps(TS_STEPS, timezone=request.param, precast=False) as slow,
    ):
        yield fast, slow


@PROPERTY
@given(batch=ts_batches())
def test_timestamp_precast_gives_the_same_result_as_the_strict_cast(
    ts_pipelines: tuple[CompiledPipeline, CompiledPipeline], batch: pa.Table
) -> None:
    fast, slow = ts_pipelines
    assert_same(fast.run(batch), slow.run(batch))


def test_a_canonical_utc_column_is_precast_and_keeps_its_strings(
    compile_pipeline: Compile,
) -> None:
    batch = batch_of(
        {
            "at": ["2013-01-01T10:00:00Z", "2024-02-29T23:59:59Z", None],
            "until": ["2013-01-02T00:00:00Z", None, "1999-12-31T00:00:00Z"],
        }
    )
    fast = compile_pipeline(TS_STEPS, timezone="America/New_York")

    result = fast.run(batch)

    assert precast_sets(fast) == {("at", "until")}
    assert_same(
        result,
        compile_pipeline(TS_STEPS, timezone="America/New_York", precast=False).run(
            batch
        ),
    )
    assert result.output.select(["at", "until", "at_text"]).to_pylist() == [
        {
            "at": datetime(2013, 1, 1, 10, tzinfo=UTC),
            "until": datetime(2013, 1, 2, tzinfo=UTC),
            "at_text": "2013-01-01T10:00:00Z",
        }
    ]
    assert [
        (r["at"], r["until"], r["_error"]) for r in result.rejected.to_pylist()
    ] == [
        ("2024-02-29T23:59:59Z", None, "until: is null"),
        (None, "1999-12-31T00:00:00Z", "at: required value is missing"),
    ]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("2013-01-01T10:00:00+00:00", id="offset"),
        pytest.param("2013-01-01 10:00:00", id="no-zone"),
        pytest.param("2013-01-01T10:00:00.5Z", id="fraction"),
        pytest.param(" 2013-01-01T10:00:00Z", id="padded"),
        pytest.param("", id="empty-string"),
        pytest.param("2013-02-29T00:00:00Z", id="no-such-day"),
        pytest.param("2013-01-01T23:59:60Z", id="leap-second"),
        pytest.param("2013-01-01t10:00:00Z", id="lower-case-t"),
    ],
)
def test_a_timestamp_column_not_all_canonical_is_not_precast(
    compile_pipeline: Compile, make_batch: BatchFactory, value: str
) -> None:
    steps = [
        {"type": "map", "fields": [{"name": "v", "expr": "v", "type": "timestamptz"}]}
    ]
    batch = make_batch(v=["2013-01-01T10:00:00Z", value])
    compiled = compile_pipeline(steps, timezone="Europe/Berlin")

    result = compiled.run(batch)

    assert precast_sets(compiled) == {()}
    assert_same(
        result,
        compile_pipeline(steps, timezone="Europe/Berlin", precast=False).run(batch),
    )


def test_a_column_read_as_integer_and_as_timestamp_is_not_precast(
    compile_pipeline: Compile, make_batch: BatchFactory
) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "n", "expr": "v", "type": "integer"},
                {"name": "t", "expr": "v", "type": "timestamptz"},
            ],
        }
    ]
    batch = make_batch(v=["2013-01-01T10:00:00Z", "12"])
    compiled = compile_pipeline(steps)

    result = compiled.run(batch)

    assert precast_sets(compiled) == {()}
    assert_same(result, compile_pipeline(steps, precast=False).run(batch))
