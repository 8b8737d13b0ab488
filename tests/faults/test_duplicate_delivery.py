"""Every chunk task delivered twice: the second delivery changes nothing.

In process, each step of a chunk's chain runs twice with the same attempt token in
three orders; with real workers, every chunk's chain is published a second time
with the same token while the run goes on.
"""

from __future__ import annotations

import time

import pytest

from integration import orchestration, services, tasks
from integration.models import ChunkRun, DeadLetter
from tests.helpers import wait_for_broker_to_drain, wait_for_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

E, T, L = tasks.extract_chunk, tasks.transform_chunk, tasks.load_chunk

#: Per chunk, the order its two deliveries' steps arrive in.
ORDERS = {
    0: [E, E, T, T, L, L],  # each step delivered twice, back to back
    1: [E, T, L, E, T, L],  # the whole chain again after the chunk committed
    2: [E, T, E, L, T, L],  # the duplicate chain one step behind the original
}


@pytest.fixture
def sent(monkeypatch) -> list[tuple]:
    """Record what would be sent to the broker instead of sending it."""
    calls: list[tuple] = []
    for name in ("send_plan", "send_chunk", "send_finalize"):
        monkeypatch.setattr(
            orchestration, name, lambda *a, _n=name, **_: calls.append((_n, *a))
        )
    return calls


def test_each_step_delivered_twice_in_process(numbered, sink_db, sent):
    """Steps run through Celery's tracer (`apply`), each twice with the same token,
    in three orders. Whatever the order, the chunk commits once and counts once,
    and from the moment it commits its sink rows stay physically as they were
    (same ctid and xmin): no later delivery rewrites them.

    A duplicate that finds its staged batch already consumed restarts the chunk
    with a new token; that chain (sent to the broker in production) is run here
    too, twice, until the chunk is done.
    """
    rows = 30
    pipeline, table = numbered(rows, chunk_rows=10, window=3)
    run = services.start_run(pipeline.pk)
    services.plan_run(run.pk)
    tokens = dict(ChunkRun.objects.filter(run=run).values_list("seq", "attempt_token"))
    assert sorted(tokens) == [0, 1, 2]

    for seq, order in ORDERS.items():
        deliveries = [(step, str(tokens[seq])) for step in order]
        committed: list | None = None
        for _ in range(5):
            for step, token in deliveries:
                step.apply(args=(run.pk, seq, token), throw=True)
                chunk = ChunkRun.objects.get(run=run, seq=seq)
                if chunk.state == "done" and committed is None:
                    committed = sink_db.row_versions(table)
                if committed is not None:
                    assert sink_db.row_versions(table) == committed, (
                        f"chunk {seq} rewritten by a delivery after it committed"
                    )
            if committed is not None:
                break
            # Restarted with a new token: deliver that attempt's chain twice too.
            token = str(ChunkRun.objects.get(run=run, seq=seq).attempt_token)
            deliveries = [(step, token) for step in (E, T, L, E, T, L)]
        assert committed is not None, f"chunk {seq} never committed"

    assert [c[0] for c in sent].count("send_finalize") == 1
    services.finalize_run(run.pk)
    run.refresh_from_db()
    assert run.state == "succeeded", run.error
    assert (run.records_read, run.records_written, run.chunks_done) == (rows, rows, 3)
    chunks = ChunkRun.objects.filter(run=run)
    assert set(chunks.values_list("state", "crashes")) == {("done", 0)}
    assert sink_db.missing_and_duplicates(table, rows) == (0, 0)


def test_every_chain_published_twice_to_real_workers(numbered, sink_db, worker_factory):
    """Two workers; every attempt's chain goes to the broker a second time with the
    same token while the run goes on. The run counts each chunk once, the sink
    holds every number once, and the late duplicates (drained after the run ended)
    leave the sink rows physically unchanged."""
    rows = 1000
    pipeline, table = numbered(rows, chunk_rows=10, window=4)
    worker_factory("a", concurrency=1)
    worker_factory("b", concurrency=1)
    run = services.start_run(pipeline.pk)

    duplicated: set[tuple[int, str]] = set()

    def duplicate_new_attempts() -> None:
        attempts = ChunkRun.objects.filter(
            run=run, attempt_token__isnull=False
        ).values_list("seq", "attempt_token")
        for seq, token in attempts:
            if (seq, str(token)) not in duplicated:
                orchestration.chunk_chain(run.pk, seq, str(token)).apply_async()
                duplicated.add((seq, str(token)))

    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        duplicate_new_attempts()
        run.refresh_from_db()
        if run.is_terminal:
            break
        time.sleep(0.02)
    duplicate_new_attempts()
    run = wait_for_run(run.pk, timeout=5)
    assert run.state == "succeeded", run.error
    after_run = sink_db.row_versions(table)

    assert {seq for seq, _ in duplicated} == set(range(100))
    wait_for_broker_to_drain()
    assert sink_db.row_versions(table) == after_run
    assert (run.records_read, run.records_written, run.records_rejected) == (
        rows,
        rows,
        0,
    )
    assert run.chunks_done == run.chunks_total == 100
    assert sink_db.missing_and_duplicates(table, rows) == (0, 0)
    assert set(ChunkRun.objects.filter(run=run).values_list("state", flat=True)) == {
        "done"
    }
    assert not DeadLetter.objects.filter(run=run).exists()
