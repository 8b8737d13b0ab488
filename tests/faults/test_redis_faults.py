"""Redis faults: a restart (with AOF) and a FLUSHALL in the middle of runs.

Each test runs its own `redis-server` as broker and stage, for the test process and
its workers; the machine's shared Redis is never touched.
"""

from __future__ import annotations

import time

import pytest

from integration import housekeeping, services
from integration.models import Run
from tests.faults.conftest import chunk_states, wait_until
from tests.helpers import wait_for_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_redis_restart_with_aof_mid_run_loses_and_duplicates_nothing(
    redis_server, own_redis, redis_workers, numbered, sink_db
):
    """A 500-chunk run survives a Redis restart (SIGTERM: AOF fsynced, then started
    again on the same data directory) while chunks are in flight: queued
    messages, unacked messages and staged batches come back from the AOF, workers
    reconnect, steps that met the outage retry, and the run ends with every number
    once."""
    rows = 5000
    pipeline, table = numbered(rows, chunk_rows=10, window=8)
    redis_workers("restart", concurrency=2)
    run = services.start_run(pipeline.pk)

    wait_until(
        lambda: Run.objects.get(pk=run.pk).chunks_done >= 60,
        timeout=120,
        what="60 committed chunks",
    )
    in_flight = chunk_states(run.pk)
    assert in_flight.get("queued", 0) + in_flight.get("running", 0) > 0
    redis_server.restart()
    assert list((redis_server.directory / "appendonlydir").glob("*.aof"))

    # As beat would, the reconciler runs now and then (a chain step whose message
    # could not be published during the outage is resent from the database).
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.is_terminal:
            break
        time.sleep(2)
        housekeeping.reconcile(stale_seconds=10)
    run = wait_for_run(run.pk, timeout=5)
    assert run.state == "succeeded", run.error
    assert (run.records_read, run.records_written, run.records_rejected) == (
        rows,
        rows,
        0,
    )
    assert run.chunks_done == run.chunks_total == 500
    assert sink_db.missing_and_duplicates(table, rows) == (0, 0)


def test_flushed_redis_is_recovered_by_the_reconciler(
    redis_server, own_redis, redis_workers, numbered, sink_db
):
    """FLUSHALL while chunks are queued and running drops their messages and staged
    batches; PostgreSQL still knows those chunks, and the reconciler sends them
    again with new attempt tokens until the run ends with every number once."""
    rows = 1000
    pipeline, table = numbered(rows, chunk_rows=10, window=8)
    redis_workers("flush", concurrency=2)
    run = services.start_run(pipeline.pk)
    wait_until(
        lambda: Run.objects.get(pk=run.pk).chunks_done >= 20,
        timeout=60,
        what="20 committed chunks",
    )
    redis_server.client().flushall()
    lost = chunk_states(run.pk)
    assert lost.get("queued", 0) + lost.get("running", 0) > 0

    resent: list[tuple[int, int]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.is_terminal:
            break
        time.sleep(2)
        report = housekeeping.reconcile(stale_seconds=3)
        resent += [c for c in report.chunks_resent if c[0] == run.pk]
    run = wait_for_run(run.pk, timeout=5)
    assert run.state == "succeeded", run.error
    assert resent, "the reconciler resent nothing: the flush hit no chunk in flight"
    assert (run.records_read, run.records_written, run.records_rejected) == (
        rows,
        rows,
        0,
    )
    assert run.chunks_done == run.chunks_total == 100
    assert sink_db.missing_and_duplicates(table, rows) == (0, 0)
