"""Fixtures of the record engine tests: batches and compiled pipelines."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pytest

from transforms.engine import CompiledPipeline, compile_steps

BatchFactory = Callable[..., pa.Table]
Compile = Callable[..., CompiledPipeline]


def source_refs(count: int) -> list[str]:
    """The _source_ref values make_batch gives ``count`` rows."""
    return [f"/data/flights.csv#{n}" for n in range(count)]


@pytest.fixture
def make_batch() -> BatchFactory:
    """Build a source batch: all columns strings, then ``_source_ref``."""

    def make(**columns: Sequence[str | None]) -> pa.Table:
        count = len(next(iter(columns.values())))
        arrays = {
            name: pa.array(values, pa.string()) for name, values in columns.items()
        }
        return pa.table({**arrays, "_source_ref": source_refs(count)})

    return make


@pytest.fixture
def compile_pipeline() -> Iterator[Compile]:
    """compile_steps, closing every pipeline it made at teardown."""
    made: list[CompiledPipeline] = []

    def compile_(steps: Sequence[Mapping[str, Any]], **kwargs: Any) -> CompiledPipeline:
        pipeline = compile_steps(steps, **kwargs)
        made.append(pipeline)
        return pipeline

    yield compile_
    for pipeline in made:
        pipeline.close()


@pytest.fixture
def convert(compile_pipeline: Compile) -> Callable[..., list[Any]]:
    """Run values through a one-field map; per row, the value or the error."""

    def run(
        field_type: str,
        values: Sequence[Any],
        *,
        arrow_type: pa.DataType | None = None,
        timezone: str = "UTC",
        **field: Any,
    ) -> list[Any]:
        steps = [
            {
                "type": "map",
                "fields": [{"name": "v", "expr": "x", "type": field_type, **field}],
            }
        ]
        pipeline = compile_pipeline(steps, timezone=timezone)
        refs = source_refs(len(values))
        batch = pa.table(
            {"x": pa.array(values, arrow_type or pa.string()), "_source_ref": refs}
        )
        result = pipeline.run(batch)
        by_ref = dict(
            zip(
                result.output["_source_ref"].to_pylist(),
                result.output["v"].to_pylist(),
                strict=True,
            )
        )
        by_ref |= dict(
            zip(
                result.rejected["_source_ref"].to_pylist(),
                result.rejected["_error"].to_pylist(),
                strict=True,
            )
        )
        return [by_ref[ref] for ref in refs]

    return run
