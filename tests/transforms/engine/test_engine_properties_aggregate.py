"""Property: merged partial aggregates equal one pass, for any split of the rows.

Hypothesis draws a table (group keys with NULLs, integer, float or decimal values
with NULLs) and a split into chunks (empty ones too, in any order). Each chunk runs
through the compiled engine as a run's chunk does; its partial travels as Arrow IPC
(as ``load_chunk`` stores it); the partials are merged the way ``finalize_run``
merges them (``compiled.merge_partials``), sometimes in two levels. The result is
compared with the same figures computed independently in plain Python.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms.engine import CompiledPipeline, compile_steps

MEASURES = [
    {"name": "rows", "fn": "count"},
    {"name": "values", "fn": "count", "expr": "v"},
    {"name": "total", "fn": "sum", "expr": "v"},
    {"name": "smallest", "fn": "min", "expr": "v"},
    {"name": "largest", "fn": "max", "expr": "v"},
    {"name": "mean", "fn": "avg", "expr": "v"},
    {"name": "distinct_values", "fn": "count_distinct", "expr": "v"},
    {"name": "distinct_keys", "fn": "count_distinct", "expr": "k"},
]
INT_BOUND = 2**40  # 200 of them still sum within int64
FLOAT_BOUND = 1e12

# Per value type: the map field, the Arrow input type and the value strategy.
VALUE_KINDS: dict[str, tuple[dict[str, Any], pa.DataType, st.SearchStrategy[Any]]] = {
    "integer": (
        {"type": "integer"},
        pa.int64(),
        st.integers(-INT_BOUND, INT_BOUND),
    ),
    "float": (
        {"type": "float"},
        pa.float64(),
        st.floats(-FLOAT_BOUND, FLOAT_BOUND, allow_nan=False, allow_infinity=False),
    ),
    "decimal": (
        {"type": "decimal", "precision": 18, "scale": 4},
        pa.decimal128(18, 4),
        st.decimals(
            min_value=Decimal("-99999999999999.9999"),
            max_value=Decimal("99999999999999.9999"),
            places=4,
            allow_nan=False,
            allow_infinity=False,
        ),
    ),
}


def ipc_round_trip(table: pa.Table) -> pa.Table:
    """The partial as ``load_chunk`` stores it and ``finalize_run`` reads it."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


@pytest.fixture(scope="module")
def pipelines() -> Iterator[dict[tuple[str, bool], CompiledPipeline]]:
    """One compiled aggregate pipeline per value kind, with and without keys."""
    made: dict[tuple[str, bool], CompiledPipeline] = {}
    for kind, (field, _, _) in VALUE_KINDS.items():
        for grouped in (True, False):
            steps = [
                {
                    "type": "map",
                    "fields": [
                        {"name": "g", "expr": "g", "type": "string"},
                        {"name": "k", "expr": "k", "type": "integer"},
                        {"name": "v", "expr": "v", **field},
                    ],
                },
                {
                    "type": "aggregate",
                    "group_by": ["g", "k"] if grouped else [],
                    "measures": MEASURES,
                },
            ]
            made[kind, grouped] = compile_steps(steps)
    yield made
    for pipeline in made.values():
        pipeline.close()


@st.composite
def tables_and_splits(draw: st.DrawFn, kind: str) -> tuple[list[dict[str, Any]], list]:
    """Rows of (g, k, v) and a split of them into chunks, in a random order."""
    values = VALUE_KINDS[kind][2]
    row = st.fixed_dictionaries(
        {
            "g": st.none() | st.sampled_from(["a", "b", "é", ""]),
            "k": st.none() | st.integers(-2, 2),
            "v": st.none() | values,
        }
    )
    rows = draw(st.lists(row, max_size=60))
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=6)))
    bounds = [0, *cuts, len(rows)]
    chunks = list(itertools.pairwise(bounds))
    order = draw(st.permutations(range(len(chunks))))
    return rows, [chunks[i] for i in order]


def one_pass(rows: list[dict[str, Any]], *, grouped: bool) -> dict[tuple, dict]:
    """The figures of one pass over all rows, in plain Python."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["g"], r["k"]) if grouped else ()].append(r)
    if not grouped and not groups:
        groups[()] = []
    expected = {}
    for key, members in groups.items():
        values = [r["v"] for r in members if r["v"] is not None]
        keys = {r["k"] for r in members if r["k"] is not None}
        expected[key] = {
            "rows": len(members),
            "values": len(values),
            "total": sum(values) if values else None,
            "smallest": min(values) if values else None,
            "largest": max(values) if values else None,
            "mean": (sum(values) / len(values)) if values else None,
            "distinct_values": len(set(values)),
            "distinct_keys": len(keys),
            "scale": sum(abs(v) for v in values),
        }
    return expected


def chunk_table(rows: list[dict[str, Any]], kind: str, start: int) -> pa.Table:
    """A chunk as a source gives it: typed columns and ``_source_ref``."""
    arrow_type = VALUE_KINDS[kind][1]
    return pa.table(
        {
            "g": pa.array([r["g"] for r in rows], pa.string()),
            "k": pa.array([r["k"] for r in rows], pa.int64()),
            "v": pa.array([r["v"] for r in rows], arrow_type),
            "_source_ref": [f"#{start + n}" for n in range(len(rows))],
        }
    )


def assert_equal(actual: dict[str, Any], expected: dict[str, Any], kind: str) -> None:
    exact = ("rows", "values", "distinct_values", "distinct_keys")
    for name in exact:
        assert actual[name] == expected[name], name
    for name in ("total", "smallest", "largest", "mean"):
        got, want = actual[name], expected[name]
        if want is None:
            assert got is None, name
        elif kind == "float" or name == "mean":
            # Float sums depend on the order of the additions: allow the
            # rounding error such a sum can have.
            tolerance = 1e-9 * float(expected["scale"]) + 1e-9
            assert math.isclose(float(got), float(want), abs_tol=tolerance), name
        else:
            assert got == want, name


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "one-group"])
@pytest.mark.parametrize("kind", list(VALUE_KINDS))
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_merged_partials_equal_one_pass_for_any_split(
    pipelines: dict[tuple[str, bool], CompiledPipeline],
    kind: str,
    grouped: bool,
    data: st.DataObject,
) -> None:
    rows, chunks = data.draw(tables_and_splits(kind))
    compiled = pipelines[kind, grouped]
    partials = []
    for start, end in chunks:
        result = compiled.run(chunk_table(rows[start:end], kind, start))
        assert result.rejected.num_rows == 0
        partials.append(ipc_round_trip(result.output))
    # finalize_run merges all partials at once; a tree merge must agree.
    two_level = data.draw(st.booleans())
    if two_level and partials:
        half = len(partials) // 2
        partials = [
            compiled.merge_partials(partials[:half], final=False),
            *partials[half:],
        ]
    final = compiled.merge_partials(partials)

    expected = one_pass(rows, grouped=grouped)
    key_names = ["g", "k"] if grouped else []
    actual = {tuple(r[k] for k in key_names): r for r in final.to_pylist()}
    assert set(actual) == set(expected)
    assert final.schema == compiled.final_schema
    for key, figures in expected.items():
        assert_equal(actual[key], figures, kind)
