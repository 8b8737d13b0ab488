"""Property: no input row, however malformed, raises out of the engine.

Hypothesis draws records with wrong types, missing fields, NaN and infinities,
huge and unicode strings, deeply nested JSON, nulls everywhere and empty strings,
and runs them through realistic compiled pipelines (map with every cast, filter,
validate with every rule kind, mask). Every row must be transformed, rejected
with a reason, or filtered: ``output + rejected + filtered == input``, and the
rows keep their identity (each ``_source_ref`` exactly once).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms.engine import CompiledPipeline, compile_steps

SECRETS = {
    "mask_salt": "pepper",
    "fernet_key": "k2ZJv9mTn3yq6Yx8E1b2bH0xQ5pV7rW3aZ4cD6eF8gI=",
}
STEPS: list[dict[str, Any]] = [
    {
        "type": "map",
        "fields": [
            {"name": "id", "expr": "id", "type": "integer"},
            {"name": "amount", "expr": "amount", "type": "decimal", "scale": 2},
            {"name": "ratio", "expr": "ratio", "type": "float"},
            {"name": "active", "expr": "active", "type": "boolean", "default": False},
            {"name": "born", "expr": "born", "type": "date"},
            {"name": "seen_at", "expr": "seen_at", "type": "timestamptz"},
            {"name": "local_at", "expr": "seen_at", "type": "timestamp"},
            {"name": "payload", "expr": "payload", "type": "json"},
            {"name": "name", "expr": "name", "type": "string", "required": True},
            {"name": "email", "expr": "lower(email)", "type": "string"},
            {"name": "status", "expr": "status", "type": "string"},
            {"name": "name_chars", "expr": "length(name)", "type": "integer"},
            {
                "name": "city",
                "expr": "json_extract_string(payload, '$.address.city')",
                "type": "string",
            },
            {
                "name": "level",
                "expr": "CAST(json_extract_string(payload, '$.level') AS INTEGER)",
                "type": "integer",
            },
        ],
    },
    {"type": "filter", "where": "id IS NULL OR id <> 13"},
    {
        "type": "validate",
        "rules": [
            {"field": "id", "rule": "not_null"},
            {"field": "amount", "rule": "range", "min": 0, "max": 1000000},
            {"field": "born", "rule": "range", "min": "1900-01-01"},
            {"field": "email", "rule": "regex", "pattern": "^[^@ ]+@[^@ ]+$"},
            {"field": "status", "rule": "enum", "values": ["new", "paid", "void"]},
            {"field": "name", "rule": "length", "min": 1, "max": 40},
            {
                "rule": "expr",
                "expr": "ratio IS NULL OR ratio < 100",
                "message": "ratio too high",
            },
            {
                "field": "payload",
                "rule": "json_schema",
                "schema": {
                    "type": "object",
                    "properties": {"level": {"type": "integer"}},
                },
            },
            {
                "field": "status",
                "rule": "referential",
                "reference": "statuses",
                "column": "code",
            },
            {"field": "id", "rule": "unique"},
        ],
    },
    {
        "type": "mask",
        "fields": [
            {"name": "email", "method": "sha256"},
            {"name": "name", "method": "redact", "keep_last": 2},
        ],
    },
]
STATUSES = pa.table({"code": ["new", "paid"]})
STEP_KINDS = {"map", "filter", "validate", "enrich", "aggregate", "mask"}
COLUMNS = ["id", "amount", "ratio", "active", "born", "seen_at", "payload"]
COLUMNS += ["name", "email", "status"]

# --- what malformed looks like ----------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


def deep(depth: int) -> str:
    """JSON text nested ``depth`` levels deep (objects and lists alternating)."""
    return '{"a": [' * (depth // 2) + "1" + "]}" * (depth // 2)


tricky_text = st.sampled_from(
    [
        "",
        " ",
        "\t\n",
        "null",
        "NULL",
        "NaN",
        "nan",
        "inf",
        "-Infinity",
        "1e400",
        "-0",
        "0x1F",
        "1_000",
        "517.5",
        "99999999999999999999",
        "-9223372036854775809",
        "2013-02-30",
        "2024-02-29",
        "0000-01-01",
        "9999-12-31 23:59:59.9999999",
        "2024-01-01T24:00",
        "2024-01-01 10:00:00+25:00",
        "2024-01-01 10:00 Europe/Paris",
        "yes",
        "t",
        "2",
        "'; DROP TABLE x; --",
        "{",
        '{"level": "7"}',
        '{"level": 99999999999}',
        '{"address": {"city": 5}}',
        '{"address": []}',
        "[1, 2",
        "\x00",
        "\ud7ff\ue000",
        "é" * 3,
        "\U0001d518\U0001d52b\U0001d526",  # math letters, 4 bytes each
        "a@b",
        "A@B",
        "@",
        "x" * 100_000,
        deep(300),
        deep(5000),
        "new",
        "paid",
        "void",
        "13",
    ]
)
values = tricky_text | st.text(max_size=50) | json_values
# A record: any subset of the columns (missing ones are null), any values.
records = st.dictionaries(st.sampled_from(COLUMNS), values, max_size=len(COLUMNS))


def as_text(value: Any) -> str | None:
    """A JSON value as a string column value (as CSV and JSON sources give it)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict | list):
        # The stdlib writes big integers and NaN (not JSON): malformed on purpose.
        return json.dumps(value)
    return str(value)


def text_batch(rows: list[dict[str, Any]]) -> pa.Table:
    columns = {
        c: pa.array([as_text(r.get(c)) for r in rows], pa.string()) for c in COLUMNS
    }
    refs = [f"row#{n}" for n in range(len(rows))]
    return pa.table({**columns, "_source_ref": refs})


# Typed input: a source with a real schema (Parquet, Avro, PostgreSQL, typed JSON)
# whose values are at the edges of their types.
TYPED_SCHEMA = pa.schema(
    [
        ("id", pa.float64()),
        ("amount", pa.float64()),
        ("ratio", pa.float64()),
        ("active", pa.int64()),
        ("born", pa.timestamp("us")),
        ("seen_at", pa.timestamp("us", tz="Asia/Kolkata")),
        (
            "payload",
            pa.struct([("level", pa.int64()), ("tags", pa.list_(pa.string()))]),
        ),
        ("name", pa.string()),
        ("email", pa.string()),
        ("status", pa.large_string()),
    ]
)
any_float = st.none() | st.floats(allow_nan=True, allow_infinity=True)
# Naive on purpose: the column is a timestamp without a zone.
any_time = st.none() | st.datetimes(
    min_value=dt.datetime(1, 1, 1),  # noqa: DTZ001
    max_value=dt.datetime(9999, 12, 31, 23, 59),  # noqa: DTZ001
)
typed_records = st.fixed_dictionaries(
    {
        "id": any_float,
        "amount": any_float | st.sampled_from([1e17, -0.0, 0.005, 123.456]),
        "ratio": any_float,
        "active": st.none()
        | st.integers(-(2**63), 2**63 - 1)
        | st.sampled_from([0, 1]),
        "born": any_time,
        "seen_at": any_time.map(lambda t: t if t is None else t.replace(tzinfo=dt.UTC)),
        "payload": st.none()
        | st.fixed_dictionaries(
            {
                "level": st.none() | st.integers(-(2**63), 2**63 - 1),
                "tags": st.none() | st.lists(st.none() | st.text(max_size=5)),
            }
        ),
        "name": st.none() | st.text(max_size=60) | tricky_text,
        "email": st.none() | tricky_text,
        "status": st.none() | tricky_text,
    }
)


def typed_batch(rows: list[dict[str, Any]]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=TYPED_SCHEMA)
    refs = pa.array([f"row#{n}" for n in range(len(rows))], pa.string())
    return table.append_column("_source_ref", refs)


# --- the property ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> Iterator[CompiledPipeline]:
    with compile_steps(STEPS, secrets=SECRETS, timezone="America/New_York") as p:
        yield p


def assert_accounted(compiled: CompiledPipeline, batch: pa.Table) -> None:
    """Run the batch: nothing raises, every row is in exactly one outcome."""
    result = compiled.run(batch, references={"statuses": STATUSES})
    rows_in = batch.num_rows
    assert result.rows_in == rows_in
    assert (
        result.output.num_rows
        + result.rejected.num_rows
        + result.filtered
        + result.deduplicated
        == rows_in
    )
    assert result.filtered >= 0
    out_refs = result.output.column("_source_ref").to_pylist()
    bad_refs = result.rejected.column("_source_ref").to_pylist()
    assert len(set(out_refs)) == len(out_refs)
    assert not set(out_refs) & set(bad_refs)
    assert set(out_refs) | set(bad_refs) <= set(batch.column("_source_ref").to_pylist())
    # Rejected rows keep their input exactly and say why.
    assert result.rejected.schema.names == [*batch.schema.names, "_error", "_step"]
    by_ref = {r: n for n, r in enumerate(batch.column("_source_ref").to_pylist())}
    for row in result.rejected.to_pylist():
        assert row.pop("_error")
        assert row.pop("_step") in STEP_KINDS
        given = batch.slice(by_ref[row["_source_ref"]], 1).to_pylist()[0]
        assert repr(row) == repr(given)  # repr: NaN equals NaN
    # Rule violations are of rejected rows, by known rules.
    violations = result.violations
    assert set(violations.column("_source_ref").to_pylist()) <= set(bad_refs)
    assert set(violations.column("rule").to_pylist()) <= set(compiled.rules)
    data = result.output.drop_columns(
        [c for c in result.output.column_names if c.startswith("_")]
    )
    assert data.schema == compiled.output_schema


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=st.lists(records, max_size=12))
def test_no_text_row_raises_out_of_the_engine(
    pipeline: CompiledPipeline, rows: list[dict[str, Any]]
) -> None:
    assert_accounted(pipeline, text_batch(rows))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=st.lists(typed_records, max_size=12))
def test_no_typed_row_raises_out_of_the_engine(
    pipeline: CompiledPipeline, rows: list[dict[str, Any]]
) -> None:
    assert_accounted(pipeline, typed_batch(rows))
