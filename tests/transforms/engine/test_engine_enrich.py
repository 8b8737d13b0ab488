"""Enrich, referential and unique rules, and the deduplicate step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.engine import EngineError, StepConfigError, compile_steps

ROOT = Path(__file__).resolve().parents[3]
AIRLINES = pa.table(
    {
        "carrier": ["UA", "AA", "B6"],
        "name": ["United Air Lines Inc.", "American Airlines Inc.", "JetBlue Airways"],
        "founded": ["1926", "1930", "x"],
    }
)
FLIGHT_MAP = {
    "type": "map",
    "fields": [
        {"name": "carrier", "expr": "carrier", "type": "string"},
        {"name": "flight", "expr": "flight", "type": "integer"},
    ],
}


def enrich(**overrides: Any) -> dict[str, Any]:
    """An enrich step by carrier adding airline_name."""
    step: dict[str, Any] = {
        "type": "enrich",
        "reference": "airlines",
        "on": {"carrier": "carrier"},
        "fields": [{"name": "airline_name", "expr": "name", "type": "string"}],
    }
    return step | overrides


@pytest.mark.parametrize(
    ("required", "output", "errors"),
    [
        pytest.param(
            False,
            [
                ("UA", "United Air Lines Inc."),
                ("ZZ", None),
                ("B6", "JetBlue Airways"),
                (None, None),
            ],
            [],
            id="optional-miss-is-null",
        ),
        pytest.param(
            True,
            [("UA", "United Air Lines Inc."), ("B6", "JetBlue Airways")],
            [
                ("ZZ", "carrier: 'ZZ' has no match in reference airlines", "enrich"),
                (None, "carrier: NULL has no match in reference airlines", "enrich"),
            ],
            id="required-miss-is-error",
        ),
    ],
)
def test_enrich_hit_and_miss(
    compile_pipeline: Any,
    make_batch: Any,
    required: bool,
    output: list[tuple[str | None, str | None]],
    errors: list[tuple[str | None, str, str]],
) -> None:
    compiled = compile_pipeline([FLIGHT_MAP, enrich(required=required)])
    batch = make_batch(carrier=["UA", "ZZ", "B6", None], flight=["1", "2", "3", "4"])

    result = compiled.run(batch, references={"airlines": AIRLINES})

    assert (
        list(
            zip(
                result.output["carrier"].to_pylist(),
                result.output["airline_name"].to_pylist(),
                strict=True,
            )
        )
        == output
    )
    assert (
        list(
            zip(
                result.rejected["carrier"].to_pylist(),
                result.rejected["_error"].to_pylist(),
                result.rejected["_step"].to_pylist(),
                strict=True,
            )
        )
        == errors
    )
    assert compiled.output_schema.names == ["carrier", "flight", "airline_name"]
    assert compiled.references == {"airlines": ["carrier", "name"]}
    assert compiled.column_lineage == {
        "carrier": ["carrier"],
        "flight": ["flight"],
        "airline_name": ["airlines.name"],
    }


def test_enrich_casts_reference_values_strictly(
    compile_pipeline: Any, make_batch: Any
) -> None:
    step = enrich(fields=[{"name": "founded", "expr": "founded", "type": "integer"}])
    compiled = compile_pipeline([FLIGHT_MAP, step])

    result = compiled.run(
        make_batch(carrier=["AA", "B6"], flight=["1", "2"]),
        references={"airlines": AIRLINES},
    )

    assert result.output["founded"].to_pylist() == [1930]
    assert result.rejected["_error"].to_pylist() == [
        "founded: cannot convert 'x' to integer"
    ]
    assert result.rejected["_step"].to_pylist() == ["enrich"]


def test_enrich_joins_on_several_keys(compile_pipeline: Any, make_batch: Any) -> None:
    routes = pa.table(
        {
            "airline": ["UA", "UA", "AA"],
            "from_airport": ["EWR", "JFK", "EWR"],
            "gate": ["C1", "B7", "A2"],
        }
    )
    step = {
        "type": "enrich",
        "reference": "routes",
        "on": {"carrier": "airline", "origin": "from_airport"},
        "fields": [{"name": "gate", "expr": "lower(gate)", "type": "string"}],
        "required": True,
    }
    compiled = compile_pipeline([step])
    batch = make_batch(
        carrier=["UA", "UA", "AA", "AA"], origin=["JFK", "EWR", "JFK", "EWR"]
    )

    result = compiled.run(batch, references={"routes": routes})

    assert result.output["gate"].to_pylist() == ["b7", "c1", "a2"]
    assert result.rejected["_error"].to_pylist() == [
        "carrier: 'AA', origin: 'JFK' has no match in reference routes"
    ]
    assert compiled.references == {"routes": ["airline", "from_airport", "gate"]}


def test_duplicate_reference_keys_keep_the_first_row(
    compile_pipeline: Any, make_batch: Any
) -> None:
    airlines = pa.table(
        {"carrier": ["UA", "UA", "AA"], "name": ["first", "second", "a"]}
    )
    compiled = compile_pipeline([FLIGHT_MAP, enrich()])

    result = compiled.run(
        make_batch(carrier=["UA", "AA", "UA"], flight=["1", "2", "3"]),
        references={"airlines": airlines},
    )

    assert result.output["airline_name"].to_pylist() == ["first", "a", "first"]
    assert result.output["_source_ref"].to_pylist() == [
        "/data/flights.csv#0",
        "/data/flights.csv#1",
        "/data/flights.csv#2",
    ]


def test_reference_registered_once_per_table_object(
    compile_pipeline: Any, make_batch: Any
) -> None:
    compiled = compile_pipeline([FLIGHT_MAP, enrich()])
    batch = make_batch(carrier=["UA"], flight=["1"])
    compiled.run(batch, references={"airlines": AIRLINES})
    registered = compiled._registered["airlines"][0]

    compiled.run(batch, references={"airlines": AIRLINES})
    assert compiled._registered["airlines"][0] is registered

    renamed = pa.table({"carrier": ["UA"], "name": ["United"]})
    result = compiled.run(batch, references={"airlines": renamed})
    assert result.output["airline_name"].to_pylist() == ["United"]


@pytest.mark.parametrize(
    ("references", "message"),
    [
        pytest.param(
            None,
            "reference dataset 'airlines' is missing: pass it in "
            "run(..., references={'airlines': table})",
            id="missing",
        ),
        pytest.param(
            {"airlines": pa.table({"carrier": ["UA"]})},
            "reference dataset 'airlines' has no column 'name' "
            "(it needs carrier, name)",
            id="missing-column",
        ),
    ],
)
def test_missing_reference_is_an_engine_error(
    compile_pipeline: Any,
    make_batch: Any,
    references: dict[str, pa.Table] | None,
    message: str,
) -> None:
    compiled = compile_pipeline([FLIGHT_MAP, enrich()])

    with pytest.raises(EngineError) as raised:
        compiled.run(make_batch(carrier=["UA"], flight=["1"]), references=references)

    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("step", "message"),
    [
        pytest.param(
            enrich(on={}),
            "steps[1].on: must map pipeline columns to reference columns",
            id="empty-on",
        ),
        pytest.param(
            enrich(on={"tailnum": "carrier"}),
            "steps[1].on (tailnum): unknown column 'tailnum'",
            id="unknown-key",
        ),
        pytest.param(
            enrich(fields=[{"name": "flight", "expr": "name", "type": "string"}]),
            "steps[1].fields[0] (flight): 'flight' is already a column",
            id="field-clash",
        ),
    ],
)
def test_enrich_config_errors(step: dict[str, Any], message: str) -> None:

    with pytest.raises(StepConfigError) as raised:
        compile_steps(
            [FLIGHT_MAP, step],
            input_schema=pa.schema(
                [
                    ("carrier", pa.string()),
                    ("flight", pa.string()),
                    ("_source_ref", pa.string()),
                ]
            ),
        )

    assert str(raised.value) == message


def test_referential_rule(compile_pipeline: Any, make_batch: Any) -> None:
    rule = {
        "field": "carrier",
        "rule": "referential",
        "reference": "airlines",
        "column": "carrier",
    }
    compiled = compile_pipeline([FLIGHT_MAP, {"type": "validate", "rules": [rule]}])

    result = compiled.run(
        make_batch(carrier=["UA", "ZZ", None, "AA"], flight=["1", "2", "3", "4"]),
        references={"airlines": AIRLINES},
    )

    assert result.output["carrier"].to_pylist() == ["UA", None, "AA"]
    assert result.rejected["_error"].to_pylist() == [
        "carrier: 'ZZ' is not in airlines.carrier"
    ]
    assert result.rejected["_step"].to_pylist() == ["validate"]
    assert compiled.references == {"airlines": ["carrier"]}


def test_unique_rule_rejects_second_occurrences(
    compile_pipeline: Any, make_batch: Any
) -> None:
    compiled = compile_pipeline(
        [
            FLIGHT_MAP,
            {"type": "validate", "rules": [{"field": "flight", "rule": "unique"}]},
        ]
    )

    result = compiled.run(
        make_batch(
            carrier=["UA", "AA", "UA", "B6", "AA"],
            flight=["1545", "1714", "1545", None, "bad"],
        )
    )

    assert result.output["flight"].to_pylist() == [1545, 1714, None]
    assert result.rejected["_error"].to_pylist() == [
        "flight: '1545' is not unique",
        "flight: cannot convert 'bad' to integer",
    ]
    assert compiled.unique_columns == {"flight": "_unique_flight"}
    hashes = result.output["_unique_flight"].to_pylist()
    # md5 of the value's text, length-prefixed: "V4:1545".
    assert hashes == ["64a182fd064d41f850ec1a0b22729168", hashes[1], None]
    assert len(hashes[1]) == 32
    assert result.output.column_names[-2:] == ["_source_ref", "_unique_flight"]


DEDUPE_BATCH = {
    "carrier": ["UA", "AA", "UA", "UA", "AA"],
    "flight": ["1", "2", "1", "3", "2"],
    "note": ["a", "b", "c", "d", "e"],
}


@pytest.mark.parametrize(
    ("keep", "notes"),
    [
        pytest.param("first", ["a", "b", "d"], id="first"),
        pytest.param("last", ["c", "d", "e"], id="last"),
    ],
)
def test_deduplicate_within_the_batch(
    compile_pipeline: Any, make_batch: Any, keep: str, notes: list[str]
) -> None:
    compiled = compile_pipeline(
        [{"type": "deduplicate", "key": ["carrier", "flight"], "keep": keep}]
    )

    result = compiled.run(make_batch(**DEDUPE_BATCH))

    assert result.output["note"].to_pylist() == notes
    assert result.deduplicated == 2
    assert result.filtered == 0
    assert compiled.dedupe_key_column == "_dedupe_key"
    keys = result.output["_dedupe_key"].to_pylist()
    assert len(set(keys)) == 3
    assert all(len(k) == 32 for k in keys)


def test_deduplicate_skips_rows_already_in_error(
    compile_pipeline: Any, make_batch: Any
) -> None:
    compiled = compile_pipeline(
        [FLIGHT_MAP, {"type": "deduplicate", "key": ["flight"]}]
    )

    result = compiled.run(
        make_batch(carrier=["UA", "AA", "B6"], flight=["x", "7", "7"])
    )

    assert result.output["carrier"].to_pylist() == ["AA"]
    assert result.rejected["carrier"].to_pylist() == ["UA"]
    assert result.deduplicated == 1


KEY_SCRIPT = """
import pyarrow as pa
from transforms.engine import compile_steps
steps = [{"type": "map", "fields": [
    {"name": "carrier", "expr": "carrier", "type": "string"},
    {"name": "flight", "expr": "flight", "type": "integer"},
    {"name": "time_hour", "expr": "time_hour", "type": "timestamptz"}]},
    {"type": "deduplicate", "key": ["time_hour", "carrier", "flight"]}]
batch = pa.table({"carrier": ["UA", None], "flight": ["1545", "1"],
    "time_hour": ["2013-01-01T10:00:00Z", "2013-01-01T10:00:00Z"],
    "_source_ref": ["a", "b"]})
with compile_steps(steps, timezone=TZ) as compiled:
    print(",".join(compiled.run(batch).output["_dedupe_key"].to_pylist()))
"""


def test_dedupe_key_is_stable_across_processes_and_time_zones() -> None:
    keys = {
        subprocess.run(
            [sys.executable, "-c", KEY_SCRIPT.replace("TZ", repr(zone))],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for zone in ("UTC", "America/New_York")
    }

    # md5 of "V19:2013-01-01 10:00:00" "V2:UA" "V4:1545" (UTC text, whatever
    # the session zone); NULL is "N".
    assert keys == {"fbbce8bfeb5777fed7368e8ab7c51895,cefa793d63a7fac6d1a05183956fa19e"}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 10_000), min_size=2, max_size=300, unique=True),
    st.lists(st.tuples(st.integers(0, 299), st.integers(0, 299), st.integers(0, 299))),
)
def test_rows_a_join_moved_come_back_in_input_order(rids, moves):
    """`_in_input_order` (slices for a few moved blocks, a take otherwise) gives
    exactly the rows sorted by row id, whatever the disorder."""
    from transforms.engine.compiler import RID, _in_input_order

    order = sorted(rids)
    for a, b, at in moves:  # move blocks, as a hash join does
        a, b = sorted((a % len(order), b % len(order)))
        block, rest = order[a:b], order[:a] + order[b:]
        order = rest[: at % (len(rest) + 1)] + block + rest[at % (len(rest) + 1) :]
    table = pa.table({RID: pa.array(order, pa.int64()), "v": [str(r) for r in order]})
    result = _in_input_order(table)
    assert result.column(RID).to_pylist() == sorted(rids)
    assert result.column("v").to_pylist() == [str(r) for r in sorted(rids)]
