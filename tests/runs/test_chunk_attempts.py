"""Attempts of one chunk at the same time, redeliveries and stale attempts: the sink
holds each row once and the run counts each chunk once.

The task bodies run in this process (threads for concurrency), on PostgreSQL; the
broker is replaced by a recorder so the test drives every step itself.
"""

from __future__ import annotations

import threading

import pytest

from integration import services, staging, tasks
from integration.models import ChunkRun, Run
from tests.helpers import run_chunk_steps
from tests.runs.conftest import sink_query

pytestmark = pytest.mark.django_db(transaction=True)


def rows(pg_sink, table):
    (row,) = sink_query(
        pg_sink, f'SELECT count(*), count(DISTINCT id), sum(id) FROM "{table}"'
    )
    return tuple(row)


def test_two_concurrent_loads_of_one_chunk_write_each_row_once(planned, pg_sink):
    run, table, tokens = planned
    token = tokens[0]
    tasks.extract_chunk(run.pk, 0, token)
    tasks.transform_chunk(run.pk, 0, token)
    # Both attempts read the staged batch before either deletes it.
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def load() -> None:
        from django.db import connection

        try:
            barrier.wait(5)
            tasks.load_chunk(run.pk, 0, token)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert rows(pg_sink, table) == (500, 500, sum(range(1, 501)))
    run.refresh_from_db()
    assert (run.chunks_done, run.records_written, run.records_read) == (1, 500, 500)


def test_redelivered_tasks_after_commit_change_nothing(planned, pg_sink, sent):
    run, table, tokens = planned
    token = tokens[1]
    run_chunk_steps(run.pk, 1, token)
    before = rows(pg_sink, table)
    # The whole chain delivered again (acks_late redelivery after a lost ack).
    run_chunk_steps(run.pk, 1, token)
    assert rows(pg_sink, table) == before == (500, 500, sum(range(501, 1001)))
    run.refresh_from_db()
    assert (run.chunks_done, run.records_written) == (1, 500)


def test_stale_attempt_is_fenced_and_newer_attempt_commits(planned, pg_sink, sent):
    run, table, tokens = planned
    old = tokens[0]
    tasks.extract_chunk(run.pk, 0, old)
    tasks.transform_chunk(run.pk, 0, old)
    # A resend (reconciler, lost batch) issues a new token while the old attempt
    # still holds its staged batch.
    assert services.restart_chunk(run.pk, 0, old, "test resend")
    new = str(ChunkRun.objects.get(run=run, seq=0).attempt_token)
    assert new != old
    assert sent[-1][:4] == ("chunk", run.pk, 0, new)
    tasks.load_chunk(run.pk, 0, old)  # stale: returns quietly, writes nothing
    assert rows(pg_sink, table) == (0, 0, None)
    run_chunk_steps(run.pk, 0, new)
    assert rows(pg_sink, table) == (500, 500, sum(range(1, 501)))


def test_fence_rolls_back_a_write_whose_attempt_was_superseded(planned, pg_sink):
    run, table, tokens = planned
    token = tokens[0]
    tasks.extract_chunk(run.pk, 0, token)
    tasks.transform_chunk(run.pk, 0, token)
    # Superseded between the task's start and the sink's commit.
    original = services.token_is_current
    calls = []

    def superseded(run_id, seq, tok):
        calls.append(tok)
        services.restart_chunk(run_id, seq, tok, "superseded mid-write")
        return original(run_id, seq, tok)

    services.token_is_current = superseded
    try:
        tasks.load_chunk(run.pk, 0, token)
    finally:
        services.token_is_current = original
    assert calls == [token]
    assert rows(pg_sink, table) == (0, 0, None)
    assert ChunkRun.objects.get(run=run, seq=0).state == "queued"


def test_missing_staged_batch_restarts_the_chunk_at_extract(planned, sent):
    run, _, tokens = planned
    token = tokens[0]
    tasks.extract_chunk(run.pk, 0, token)
    staging.stage().delete(staging.key(run.pk, 0, token, "extract"))
    tasks.transform_chunk(run.pk, 0, token)
    chunk = ChunkRun.objects.get(run=run, seq=0)
    assert str(chunk.attempt_token) != token
    assert chunk.state == "queued"
    assert sent[-1][:4] == ("chunk", run.pk, 0, str(chunk.attempt_token))
    assert Run.objects.get(pk=run.pk).state == "running"


def test_last_chunk_sends_finalize_and_run_succeeds(planned, pg_sink, sent):
    run, table, tokens = planned
    for seq, token in tokens.items():
        run_chunk_steps(run.pk, seq, token)
    assert ("finalize", run.pk, run.correlation_id) in sent
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert run.state == "succeeded"
    assert (run.records_read, run.records_written, run.chunks_done) == (1000, 1000, 2)
    assert rows(pg_sink, table) == (1000, 1000, sum(range(1, 1001)))
