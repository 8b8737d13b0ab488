"""Strict casts of map fields, defaults, required fields and derived values."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

UTC = dt.UTC


def bad(value: str, label: str) -> str:
    return f"v: cannot convert '{value}' to {label}"


STRING_CASTS = [
    # integer
    pytest.param("integer", {}, "12", 12, id="integer-plain"),
    pytest.param("integer", {}, " 12 ", 12, id="integer-spaces-trimmed"),
    pytest.param("integer", {}, "+5", 5, id="integer-plus-sign"),
    pytest.param(
        "integer", {}, "517.5", bad("517.5", "integer"), id="integer-fraction"
    ),
    pytest.param(
        "integer", {}, "517.0", bad("517.0", "integer"), id="integer-dot-zero"
    ),
    pytest.param("integer", {}, "1e3", bad("1e3", "integer"), id="integer-exponent"),
    pytest.param("integer", {}, "abc", bad("abc", "integer"), id="integer-word"),
    pytest.param("integer", {}, "0x1F", bad("0x1F", "integer"), id="integer-hex"),
    pytest.param(
        "integer", {}, "1_000", bad("1_000", "integer"), id="integer-underscore"
    ),
    pytest.param(
        "integer",
        {},
        "99999999999999999999",
        bad("99999999999999999999", "integer"),
        id="integer-overflow",
    ),
    pytest.param("integer", {}, "-9223372036854775808", -(2**63), id="integer-minimum"),
    pytest.param("integer", {}, "", None, id="integer-empty-is-null"),
    pytest.param("integer", {}, "   ", None, id="integer-blank-is-null"),
    pytest.param("integer", {}, None, None, id="integer-null"),
    # float
    pytest.param("float", {}, "1.5", 1.5, id="float-plain"),
    pytest.param("float", {}, "1e3", 1000.0, id="float-exponent"),
    pytest.param("float", {}, ".5", 0.5, id="float-leading-dot"),
    pytest.param("float", {}, "-2.5E-3", -0.0025, id="float-negative-exponent"),
    pytest.param("float", {}, "nan", bad("nan", "float"), id="float-nan"),
    pytest.param("float", {}, "inf", bad("inf", "float"), id="float-inf"),
    pytest.param("float", {}, "1e400", bad("1e400", "float"), id="float-overflow"),
    pytest.param("float", {}, "1,5", bad("1,5", "float"), id="float-comma"),
    # decimal
    pytest.param(
        "decimal",
        {"precision": 10, "scale": 2},
        "1.5",
        Decimal("1.50"),
        id="decimal-plain",
    ),
    pytest.param(
        "decimal",
        {"precision": 10, "scale": 2},
        "1.0500",
        Decimal("1.05"),
        id="decimal-trailing-zeros",
    ),
    pytest.param(
        "decimal",
        {"precision": 10, "scale": 2},
        "1.005",
        bad("1.005", "decimal(10,2)"),
        id="decimal-too-many-decimals",
    ),
    pytest.param(
        "decimal",
        {"precision": 10, "scale": 2},
        "123456789",
        bad("123456789", "decimal(10,2)"),
        id="decimal-overflow",
    ),
    pytest.param(
        "decimal",
        {"precision": 10, "scale": 2},
        "1e2",
        bad("1e2", "decimal(10,2)"),
        id="decimal-exponent",
    ),
    pytest.param(
        "decimal", {}, "-0.000001", Decimal("-0.000001"), id="decimal-default-18-6"
    ),
    # boolean
    pytest.param("boolean", {}, "true", True, id="boolean-true"),
    pytest.param("boolean", {}, "FALSE", False, id="boolean-false-upper"),
    pytest.param("boolean", {}, "t", True, id="boolean-t"),
    pytest.param("boolean", {}, "f", False, id="boolean-f"),
    pytest.param("boolean", {}, "1", True, id="boolean-1"),
    pytest.param("boolean", {}, "0", False, id="boolean-0"),
    pytest.param("boolean", {}, "Yes", True, id="boolean-yes"),
    pytest.param("boolean", {}, "no", False, id="boolean-no"),
    pytest.param("boolean", {}, "y", bad("y", "boolean"), id="boolean-y"),
    pytest.param("boolean", {}, "2", bad("2", "boolean"), id="boolean-2"),
    # date
    pytest.param("date", {}, "2013-02-28", dt.date(2013, 2, 28), id="date-plain"),
    pytest.param(
        "date", {}, "2013-02-30", bad("2013-02-30", "date"), id="date-impossible"
    ),
    pytest.param("date", {}, "2013-2-3", bad("2013-2-3", "date"), id="date-short"),
    pytest.param(
        "date",
        {},
        "2013-02-28 10:00",
        bad("2013-02-28 10:00", "date"),
        id="date-with-time",
    ),
    # timestamp
    pytest.param(
        "timestamp",
        {},
        "2013-01-01 10:00",
        dt.datetime(2013, 1, 1, 10, 0),  # noqa: DTZ001 - a naive timestamp
        id="timestamp-minutes",
    ),
    pytest.param(
        "timestamp",
        {},
        "2013-01-01T10:00:00.123456",
        dt.datetime(2013, 1, 1, 10, 0, 0, 123456),  # noqa: DTZ001
        id="timestamp-iso-micros",
    ),
    pytest.param(
        "timestamp",
        {},
        "2013-01-01",
        dt.datetime(2013, 1, 1),  # noqa: DTZ001
        id="timestamp-date-only",
    ),
    pytest.param(
        "timestamp",
        {},
        "2013-01-01 24:00:00",
        bad("2013-01-01 24:00:00", "timestamp"),
        id="timestamp-hour-24",
    ),
    pytest.param(
        "timestamp",
        {},
        "2013-01-01 10:00:00+02",
        bad("2013-01-01 10:00:00+02", "timestamp"),
        id="timestamp-offset-refused",
    ),
    pytest.param(
        "timestamp",
        {},
        "2013-01-01 10:00:00.1234567",
        bad("2013-01-01 10:00:00.1234567", "timestamp"),
        id="timestamp-nanos-refused",
    ),
    # timestamptz (pipeline time zone UTC here)
    pytest.param(
        "timestamptz",
        {},
        "2013-01-01T10:00:00+02:00",
        dt.datetime(2013, 1, 1, 8, 0, tzinfo=UTC),
        id="timestamptz-offset",
    ),
    pytest.param(
        "timestamptz",
        {},
        "2013-01-01T10:00:00Z",
        dt.datetime(2013, 1, 1, 10, 0, tzinfo=UTC),
        id="timestamptz-zulu",
    ),
    pytest.param(
        "timestamptz",
        {},
        "2013-01-01 10:00 Europe/Paris",
        bad("2013-01-01 10:00 Europe/Paris", "timestamptz"),
        id="timestamptz-zone-name-refused",
    ),
    # json
    pytest.param("json", {}, '{"a": 1}', '{"a": 1}', id="json-object"),
    pytest.param("json", {}, "[1,2]", "[1,2]", id="json-array"),
    pytest.param("json", {}, "{a", bad("{a", "json"), id="json-malformed"),
    # string: kept exactly, blank included
    pytest.param("string", {}, " a ", " a ", id="string-not-trimmed"),
    pytest.param("string", {}, "", "", id="string-empty-kept"),
    pytest.param("string", {}, None, None, id="string-null"),
]


@pytest.mark.parametrize(("field_type", "extra", "value", "expected"), STRING_CASTS)
def test_strict_cast_of_strings(
    convert: Any, field_type: str, extra: dict[str, Any], value: Any, expected: Any
) -> None:
    assert convert(field_type, [value], **extra) == [expected]


@pytest.mark.parametrize(
    ("field_type", "arrow_type", "value", "expected"),
    [
        pytest.param("float", pa.int64(), 3, 3.0, id="int-to-float"),
        pytest.param("integer", pa.float64(), 517.0, 517, id="whole-float-to-int"),
        pytest.param(
            "integer", pa.float64(), 517.5, bad("517.5", "integer"), id="float-to-int"
        ),
        pytest.param(
            "integer",
            pa.float64(),
            1e30,
            bad("1e+30", "integer"),
            id="float-to-int-overflow",
        ),
        pytest.param("boolean", pa.int64(), 0, False, id="int-0-to-boolean"),
        pytest.param(
            "boolean", pa.int64(), 2, bad("2", "boolean"), id="int-2-to-boolean"
        ),
        pytest.param("string", pa.int64(), 42, "42", id="int-to-string"),
        pytest.param(
            "decimal",
            pa.float64(),
            0.25,
            Decimal("0.250000"),
            id="float-to-decimal",
        ),
        pytest.param(
            "date",
            pa.timestamp("us"),
            dt.datetime(2013, 1, 1),  # noqa: DTZ001
            dt.date(2013, 1, 1),
            id="midnight-timestamp-to-date",
        ),
        pytest.param(
            "date",
            pa.timestamp("us"),
            dt.datetime(2013, 1, 1, 10),  # noqa: DTZ001
            bad("2013-01-01 10:00:00", "date"),
            id="timestamp-with-time-to-date",
        ),
        pytest.param("integer", pa.large_string(), "7", 7, id="large-string"),
        pytest.param("integer", pa.string_view(), "7", 7, id="string-view"),
    ],
)
def test_strict_cast_of_typed_values(
    convert: Any, field_type: str, arrow_type: pa.DataType, value: Any, expected: Any
) -> None:
    assert convert(field_type, [value], arrow_type=arrow_type) == [expected]


def test_naive_timestamptz_is_read_in_the_pipeline_time_zone(convert: Any) -> None:
    values = ["2013-01-01 05:15", "2013-07-01 05:15", "2013-01-01"]

    result = convert("timestamptz", values, timezone="America/New_York")

    assert result == [
        dt.datetime(2013, 1, 1, 10, 15, tzinfo=UTC),
        dt.datetime(2013, 7, 1, 9, 15, tzinfo=UTC),
        dt.datetime(2013, 1, 1, 5, 0, tzinfo=UTC),
    ]


def test_timestamptz_built_from_parts_in_new_york(
    compile_pipeline: Any, make_batch: Any
) -> None:
    expr = (
        "make_timestamptz(CAST(year AS INT), CAST(month AS INT), CAST(day AS INT), "
        "CAST(sched_dep_time AS INT) // 100, CAST(sched_dep_time AS INT) % 100, 0, "
        "'America/New_York')"
    )
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "scheduled_departure", "expr": expr, "type": "timestamptz"}
            ],
        }
    ]
    pipeline = compile_pipeline(steps, timezone="America/New_York")
    batch = make_batch(
        year=["2013", "2013"],
        month=["1", "7"],
        day=["1", "4"],
        sched_dep_time=["515", "2359"],
    )

    result = pipeline.run(batch)

    values = result.output["scheduled_departure"].to_pylist()
    assert values == [
        dt.datetime(2013, 1, 1, 10, 15, tzinfo=UTC),
        dt.datetime(2013, 7, 5, 3, 59, tzinfo=UTC),
    ]
    new_york = ZoneInfo("America/New_York")
    assert values[1].astimezone(new_york).isoformat() == "2013-07-04T23:59:00-04:00"
    assert result.output.schema.field("scheduled_departure").type == pa.timestamp(
        "us", tz="UTC"
    )


def test_default_fills_null_and_blank_but_not_bad_values(convert: Any) -> None:
    result = convert("integer", [None, "", "5", "x"], default=0)

    assert result == [0, 0, 5, bad("x", "integer")]


@pytest.mark.parametrize(
    ("field_type", "value", "expected"),
    [
        pytest.param("string", None, "v: required value is missing", id="string-null"),
        pytest.param("string", "", "", id="string-empty-is-a-value"),
        pytest.param("integer", "", "v: required value is missing", id="integer-blank"),
        pytest.param("integer", "3", 3, id="integer-present"),
    ],
)
def test_required(convert: Any, field_type: str, value: Any, expected: Any) -> None:
    assert convert(field_type, [value], required=True) == [expected]


def test_required_with_default_is_never_missing(convert: Any) -> None:
    assert convert("integer", [None], required=True, default=7) == [7]


def test_constant_and_derived_fields(compile_pipeline: Any, make_batch: Any) -> None:
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "source", "expr": "'nyc'", "type": "string"},
                {
                    "name": "distance_km",
                    "expr": "CAST(distance AS DOUBLE) * 1.609344",
                    "type": "float",
                },
                {"name": "flight_code", "expr": "carrier || flight", "type": "string"},
                {"name": "carrier", "type": "string"},
            ],
        }
    ]
    pipeline = compile_pipeline(steps)

    result = pipeline.run(
        make_batch(carrier=["UA", "AA"], flight=["1545", "11"], distance=["1000", "0"])
    )

    assert result.output.to_pydict() == {
        "source": ["nyc", "nyc"],
        "distance_km": [1609.344, 0.0],
        "flight_code": ["UA1545", "AA11"],
        "carrier": ["UA", "AA"],
        "_source_ref": ["/data/flights.csv#0", "/data/flights.csv#1"],
    }


def test_output_schema_is_known_at_compile_time(compile_pipeline: Any) -> None:
    fields = [
        {"name": "s", "type": "string"},
        {"name": "i", "type": "integer"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "decimal", "precision": 12, "scale": 3},
        {"name": "b", "type": "boolean"},
        {"name": "day", "type": "date"},
        {"name": "ts", "type": "timestamp"},
        {"name": "tstz", "type": "timestamptz"},
        {"name": "j", "type": "json"},
    ]

    pipeline = compile_pipeline([{"type": "map", "fields": fields}])

    assert pipeline.output_schema == pa.schema(
        [
            ("s", pa.string()),
            ("i", pa.int64()),
            ("f", pa.float64()),
            ("d", pa.decimal128(12, 3)),
            ("b", pa.bool_()),
            ("day", pa.date32()),
            ("ts", pa.timestamp("us")),
            ("tstz", pa.timestamp("us", tz="UTC")),
            ("j", pa.string()),
        ]
    )
    assert pipeline.output_schema.field("j").metadata == {
        b"logical_type": b"json",
        b"dis.type": b"json",
    }


def test_output_table_has_the_output_schema_then_source_ref(
    compile_pipeline: Any, make_batch: Any
) -> None:
    fields = [
        {"name": "i", "expr": "a", "type": "integer"},
        {"name": "d", "expr": "a", "type": "decimal", "precision": 12, "scale": 3},
        {"name": "tstz", "expr": "t", "type": "timestamptz"},
    ]
    pipeline = compile_pipeline(
        [{"type": "map", "fields": fields}], timezone="Asia/Tokyo"
    )

    result = pipeline.run(make_batch(a=["1"], t=["2013-01-01 09:00"]))

    assert result.output.schema == pipeline.output_schema.append(
        pa.field("_source_ref", pa.string())
    )
    assert result.output.to_pylist() == [
        {
            "i": 1,
            "d": Decimal("1.000"),
            "tstz": dt.datetime(2013, 1, 1, 0, 0, tzinfo=UTC),
            "_source_ref": "/data/flights.csv#0",
        }
    ]


def test_messages_only_for_failing_rows_of_a_mixed_batch(
    compile_pipeline: Any, make_batch: Any
) -> None:
    """Error messages are built only for rows whose flags fail (a cheap OR of
    presence and cast checks): rows that pass keep no message, a row that fails
    several fields lists them in field order, and an optional empty value or a
    required one with a default is no failure."""
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "a", "expr": "a", "type": "integer", "required": True},
                {"name": "b", "expr": "b", "type": "float"},
                {
                    "name": "c",
                    "expr": "c",
                    "type": "integer",
                    "required": True,
                    "default": 0,
                },
                {"name": "d", "expr": "upper(d)", "type": "string"},
            ],
        }
    ]
    batch = make_batch(
        a=["1", None, "x", "4", "5", None, "6"],
        b=["1.5", "2", "y", None, "", "z", "v"],
        c=["7", "8", None, "9", None, "w", "1"],
        d=["p", None, "q", "r", "s", None, "t"],
    )
    result = compile_pipeline(steps).run(batch)
    assert result.output["a"].to_pylist() == [1, 4, 5]
    assert result.output["c"].to_pylist() == [7, 9, 0]
    assert result.rejected["_source_ref"].to_pylist() == [
        "/data/flights.csv#1",
        "/data/flights.csv#2",
        "/data/flights.csv#5",
        "/data/flights.csv#6",
    ]
    assert result.rejected["_error"].to_pylist() == [
        "a: required value is missing",
        "a: cannot convert 'x' to integer; b: cannot convert 'y' to float",
        "a: required value is missing; b: cannot convert 'z' to float; "
        "c: cannot convert 'w' to integer",
        "b: cannot convert 'v' to float",
    ]
