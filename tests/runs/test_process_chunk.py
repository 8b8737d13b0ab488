"""`process_chunk`: a chunk's extract, transform and load in one task, the batch in
memory; a transient load failure hands the transformed batch to `load_chunk`.

The task bodies run in this process through Celery's tracer (`apply`), on
PostgreSQL; the broker is replaced by a recorder.
"""

from __future__ import annotations

import pytest

from connectors.exceptions import TransientError
from connectors.plugins.sql.postgres import PostgresSink
from integration import orchestration, services, staging, tasks
from integration.models import ChunkRun, Pipeline
from tests.helpers import ENDLESS_QUERY, signal_during, unique
from tests.runs.conftest import STEPS
from tests.runs.test_chunk_attempts import rows
from transforms.engine import CompiledPipeline

pytestmark = pytest.mark.django_db(transaction=True)


def staged(run_id: int, seq: int, token: str) -> list[str]:
    stage = staging.stage()
    return [
        part
        for part in ("extract", "output", "rejected", "inputs")
        if stage.get(staging.key(run_id, seq, token, part)) is not None
    ]


@pytest.fixture
def source_reads(monkeypatch) -> list[int]:
    """The seq of every chunk the generator source reads."""
    from connectors.registry import get_plugin

    source_class = get_plugin("generator").source_class
    original = source_class.read
    reads: list[int] = []

    def read(self, options, chunk):
        reads.append(chunk.seq)
        return original(self, options, chunk)

    monkeypatch.setattr(source_class, "read", read)
    return reads


def test_a_chunk_runs_in_one_task_without_staging(planned, pg_sink, source_reads):
    run, table, tokens = planned
    tasks.process_chunk.apply(args=(run.pk, 0, tokens[0])).get()

    assert rows(pg_sink, table) == (500, 500, sum(range(1, 501)))
    assert source_reads == [0]
    assert staged(run.pk, 0, tokens[0]) == []
    chunk = ChunkRun.objects.get(run=run, seq=0)
    assert (chunk.state, chunk.step, chunk.step_open, chunk.crashes) == (
        "done",
        "process",
        False,
        0,
    )
    run.refresh_from_db()
    assert (run.records_read, run.records_written, run.chunks_done) == (500, 500, 1)


def test_a_redelivered_process_chunk_changes_nothing(planned, pg_sink):
    run, table, tokens = planned
    for _ in range(2):
        tasks.process_chunk.apply(args=(run.pk, 1, tokens[1])).get()
    assert rows(pg_sink, table) == (500, 500, sum(range(501, 1001)))
    run.refresh_from_db()
    assert (run.records_read, run.records_written, run.chunks_done) == (500, 500, 1)


def test_a_transient_load_failure_is_retried_by_load_chunk_without_reading_again(
    planned, pg_sink, source_reads, monkeypatch
):
    run, table, tokens = planned
    token = tokens[0]
    original = PostgresSink.write
    failures = []

    def write(self, *args, **kwargs):
        if not failures:
            failures.append(1)
            raise TransientError("connection reset")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PostgresSink, "write", write)
    loads: list[tuple] = []
    monkeypatch.setattr(
        orchestration,
        "send_load",
        lambda *args, countdown: loads.append((*args, countdown)),
    )

    tasks.process_chunk.apply(args=(run.pk, 0, token)).get()

    # Nothing written, the transformed batch staged, a delayed load_chunk sent.
    assert rows(pg_sink, table) == (0, 0, None)
    assert staged(run.pk, 0, token) == ["output", "rejected"]
    [(run_id, seq, sent_token, _cid, countdown)] = loads
    assert (run_id, seq, sent_token) == (run.pk, 0, token)
    assert countdown > 0
    assert ChunkRun.objects.get(run=run, seq=0).state == "running"

    tasks.load_chunk.apply(args=(run.pk, 0, token)).get()

    assert rows(pg_sink, table) == (500, 500, sum(range(1, 501)))
    assert source_reads == [0]  # the retry loaded the staged batch
    assert staged(run.pk, 0, token) == []
    run.refresh_from_db()
    assert (run.records_read, run.records_written, run.chunks_done) == (500, 500, 1)


def _interrupt_duckdb(pipeline, *args):
    """What a worker that lost the broker does to its running task: SIGTERM, whose
    handler raises SystemExit; DuckDB turns that into `RuntimeError('Query
    interrupted')`, which once failed the run."""
    with signal_during(0.2):
        pipeline.con.sql(ENDLESS_QUERY).fetchall()


def _hang_past_the_soft_limit(*args):
    """A load that waited past the soft time limit (a pooled connection waiting for
    a restarting database)."""
    from celery.exceptions import SoftTimeLimitExceeded

    raise SoftTimeLimitExceeded()


def _lose_the_metadata_database(*args):
    """The metadata database restarted under the step. The run was once failed
    for it whenever the database was back in time for the task's `on_failure`."""
    from django.db import OperationalError

    raise OperationalError("consuming input failed: server closed the connection")


@pytest.mark.parametrize(
    ("owner", "method", "failure"),
    [
        (CompiledPipeline, "_execute", _interrupt_duckdb),
        (PostgresSink, "write", _hang_past_the_soft_limit),
        (services, "admit_chunk", _lose_the_metadata_database),
    ],
    ids=["duckdb-interrupted", "soft-time-limit", "metadata-database-lost"],
)
def test_an_interrupted_step_is_retried_instead_of_failing_the_run(
    planned, pg_sink, monkeypatch, owner, method, failure
):
    """The first attempt fails as `failure` does; the retry (`apply` runs Celery's
    retry at once, in this process) loads the chunk once."""
    original = getattr(owner, method)
    calls: list[int] = []

    def fails_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            failure(self, *args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, fails_once)
    run, table, tokens = planned
    result = tasks.process_chunk.apply(args=(run.pk, 0, tokens[0]))

    assert result.state == "SUCCESS", result.traceback
    assert len(calls) == 2  # failed, then retried
    run.refresh_from_db()
    assert (run.state, run.error) == ("running", "")
    assert rows(pg_sink, table) == (500, 500, sum(range(1, 501)))
    assert (run.records_written, run.chunks_done) == (500, 1)


def test_chunks_are_fused_unless_disabled_or_their_loads_wait_in_order(
    planned, settings, pg_sink
):
    run, _table, _tokens = planned
    assert services._fused(run.pk) is True
    settings.DIS_FUSE_CHUNK_STEPS = False
    assert services._fused(run.pk) is False
    settings.DIS_FUSE_CHUNK_STEPS = True

    from connectors.models import Connector

    dedupe = Pipeline.objects.create(
        name=unique("p"),
        source=Connector.objects.create(
            name=unique("gen"), kind="generator", config={"rows": 10}
        ),
        sink=pg_sink,
        steps=[*STEPS, {"type": "deduplicate", "key": ["id"], "keep": "first"}],
        sink_options={"table": pg_sink.new_table()},
        chunk_rows=5,
    )
    services.freeze_version(dedupe)
    assert services._fused(services.start_run(dedupe.pk).pk) is False
