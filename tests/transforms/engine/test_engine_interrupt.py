"""A signal that stops DuckDB mid-query: the engine says so instead of failing the
batch with DuckDB's bare `RuntimeError('Query interrupted')`."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from tests.helpers import ENDLESS_QUERY, Signalled, signal_during
from transforms.engine import CompiledPipeline, EngineInterrupted

STEPS = [{"type": "map", "fields": [{"name": "n", "expr": "x", "type": "integer"}]}]


def test_a_signal_during_the_query_raises_engine_interrupted(
    compile_pipeline: Any, make_batch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = compile_pipeline(STEPS)
    original = CompiledPipeline._execute

    def slow(self: CompiledPipeline, plan: Any, work: pa.Table) -> pa.Table:
        with signal_during(0.2):  # lands while DuckDB runs the endless query
            self.con.sql(ENDLESS_QUERY).fetchall()
        return original(self, plan, work)

    monkeypatch.setattr(CompiledPipeline, "_execute", slow)
    with pytest.raises(EngineInterrupted) as raised:
        pipeline.run(make_batch(x=["1", "2"]))
    # DuckDB swallowed the handler's exception: only its own error is left.
    assert type(raised.value.__cause__) is RuntimeError
    assert not isinstance(raised.value.__cause__, Signalled)

    monkeypatch.undo()  # the same pipeline runs the next batch normally
    assert pipeline.run(make_batch(x=["3"])).output.column("n").to_pylist() == [3]


def test_a_signal_outside_duckdb_is_left_alone(
    compile_pipeline: Any, make_batch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = compile_pipeline(STEPS)

    def python_work(self: CompiledPipeline, plan: Any, work: pa.Table) -> pa.Table:
        with signal_during(0.2):
            while True:  # pure Python: the handler's exception surfaces as it is
                sum(range(1000))

    monkeypatch.setattr(CompiledPipeline, "_execute", python_work)
    with pytest.raises(Signalled):
        pipeline.run(make_batch(x=["1"]))


def test_every_public_entry_that_runs_duckdb_reports_interruptions() -> None:
    # The module-level merge_partials calls the method, so it is covered too.
    for method in (CompiledPipeline.run, CompiledPipeline.merge_partials):
        assert hasattr(method, "__wrapped__"), method
