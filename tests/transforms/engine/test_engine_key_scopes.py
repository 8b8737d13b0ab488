"""The keys a run keeps exact across batches: ``CompiledPipeline.key_scopes``."""

from __future__ import annotations

import hashlib
from typing import Any

from transforms.engine import KeyScope

MAP = {
    "type": "map",
    "fields": [
        {"name": "flight", "expr": "flight", "type": "integer"},
        {"name": "tail", "expr": "tailnum", "type": "string"},
    ],
}


def key_hash(text: str) -> str:
    """The engine's key hash of one string value (see docs/transforms.md)."""
    return hashlib.md5(f"V{len(text)}:{text}".encode()).hexdigest()  # noqa: S324


def test_scopes_in_step_order_with_their_output_columns(
    compile_pipeline: Any, make_batch: Any
) -> None:
    pipeline = compile_pipeline(
        [
            MAP,
            {
                "type": "validate",
                "rules": [
                    {"field": "tail", "rule": "unique"},
                    {"field": "flight", "rule": "not_null"},
                ],
            },
            {"type": "deduplicate", "key": ["flight", "tail"], "keep": "last"},
            {"type": "validate", "rules": [{"field": "tail", "rule": "unique"}]},
        ]
    )

    assert pipeline.key_scopes == [
        KeyScope("unique:tail", "unique", "_unique_tail", "first", ("tail",), 1),
        KeyScope(
            "deduplicate", "deduplicate", "_dedupe_key", "last", ("flight", "tail"), 2
        ),
    ]
    result = pipeline.run(make_batch(flight=["1", "1", "2"], tailnum=["A", "B", "A"]))
    # Every scope's column is in the output, after _source_ref.
    assert result.output.column_names == [
        "flight",
        "tail",
        "_source_ref",
        "_unique_tail",
        "_dedupe_key",
    ]


def test_no_scopes_without_keys_or_in_an_aggregate(compile_pipeline: Any) -> None:
    assert compile_pipeline([MAP]).key_scopes == []
    aggregate = compile_pipeline(
        [
            MAP,
            {"type": "deduplicate", "key": ["flight"]},
            {
                "type": "aggregate",
                "group_by": ["tail"],
                "measures": [{"name": "n", "fn": "count"}],
            },
        ]
    )
    assert aggregate.key_scopes == []


def test_rejected_rows_that_hold_a_key_carry_its_hash(
    compile_pipeline: Any, make_batch: Any
) -> None:
    """The first row of a unique value fails another rule of the step; the row a
    deduplicate kept fails a later rule: both still hold their key in the batch."""
    pipeline = compile_pipeline(
        [
            MAP,
            {
                "type": "validate",
                "rules": [
                    {"field": "flight", "rule": "range", "max": 100},
                    {"field": "tail", "rule": "unique"},
                ],
            },
        ]
    )
    result = pipeline.run(
        make_batch(flight=["500", "1", "2", "bad"], tailnum=["A", "A", "B", "C"])
    )
    assert result.output.column("flight").to_pylist() == [2]
    keys = dict(
        zip(
            result.rejected.column("flight").to_pylist(),
            result.rejected_keys.column("_unique_tail").to_pylist(),
            strict=True,
        )
    )
    # 500 holds A (first, fails the range); 1 repeats A; 'bad' failed the map.
    assert keys["500"] == key_hash("A")
    assert (keys["1"], keys["bad"]) == (None, None)

    dedupe = compile_pipeline(
        [
            MAP,
            {"type": "deduplicate", "key": ["tail"]},
            {
                "type": "validate",
                "rules": [{"field": "flight", "rule": "range", "max": 100}],
            },
        ]
    )
    result = dedupe.run(make_batch(flight=["500", "1", "2"], tailnum=["A", "A", "B"]))
    assert result.output.column("flight").to_pylist() == [2]
    assert result.deduplicated == 1
    assert result.rejected.column("flight").to_pylist() == ["500"]
    assert result.rejected_keys.column("_dedupe_key").to_pylist() == [key_hash("A")]
    assert result.output.column("_dedupe_key").to_pylist() == [key_hash("B")]


def test_no_rejected_keys_without_scopes(
    compile_pipeline: Any, make_batch: Any
) -> None:
    result = compile_pipeline([MAP]).run(make_batch(flight=["x"], tailnum=["A"]))
    assert result.rejected.num_rows == 1
    assert result.rejected_keys is None
