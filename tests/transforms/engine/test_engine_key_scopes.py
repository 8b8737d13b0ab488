"""The keys a run keeps exact across batches: ``CompiledPipeline.key_scopes``."""

from __future__ import annotations

from typing import Any

from transforms.engine import KeyScope

MAP = {
    "type": "map",
    "fields": [
        {"name": "flight", "expr": "flight", "type": "integer"},
        {"name": "tail", "expr": "tailnum", "type": "string"},
    ],
}


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
