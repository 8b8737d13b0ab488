"""Incremental PostgreSQL reads: each run reads only rows new since the last
successful run (ties on the cursor included); a failed run does not move it."""

from __future__ import annotations

import psycopg
import pytest

from connectors.models import Connector
from integration import orchestration, services, tasks
from integration.models import ChunkRun, Pipeline, Run
from tests.helpers import unique

pytestmark = pytest.mark.django_db(transaction=True)

STEPS = [
    {
        "type": "map",
        "fields": [
            {"name": "id", "expr": "id", "type": "integer", "required": True},
            {"name": "amount", "expr": "amount", "type": "integer"},
        ],
    }
]


@pytest.fixture
def sent(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(
        orchestration, "send_plan", lambda *a: calls.append(("plan", *a))
    )
    monkeypatch.setattr(
        orchestration, "send_chunk", lambda *a: calls.append(("chunk", *a))
    )
    monkeypatch.setattr(
        orchestration, "send_finalize", lambda *a: calls.append(("finalize", *a))
    )
    return calls


@pytest.fixture
def events(pg_sink):
    """A source table `events(id, amount, updated)` in the test database."""
    cfg = pg_sink.config
    table = pg_sink.new_table()
    conn = psycopg.connect(
        host=cfg["host"],
        port=cfg["port"],
        dbname=cfg["database"],
        user=cfg["user"],
        autocommit=True,
    )
    conn.execute(
        f'CREATE TABLE "{table}" (id bigint PRIMARY KEY, amount text, updated int)'
    )

    def insert(rows):
        with conn.cursor() as cur:
            cur.executemany(f'INSERT INTO "{table}" VALUES (%s, %s, %s)', rows)

    insert.table = table
    yield insert
    conn.close()


def drive(run_id: int) -> Run:
    """Run every step of a run in this process until it ends."""
    services.plan_run(run_id)
    for _ in range(100):
        pending = ChunkRun.objects.filter(
            run_id=run_id, state__in=["queued", "running"]
        )
        if not pending.exists():
            break
        for chunk in pending:
            token = str(chunk.attempt_token)
            for step in (tasks.extract_chunk, tasks.transform_chunk, tasks.load_chunk):
                step(run_id, chunk.seq, token)
    tasks.finalize_run(run_id)
    return Run.objects.get(pk=run_id)


def test_two_runs_read_only_new_rows_and_a_failed_run_keeps_the_cursor(
    events, pg_sink, sqlite_sink, sent
):
    source = Connector.objects.create(
        name=unique("pgsrc"), kind="postgres", config=dict(pg_sink.config)
    )
    pipeline = Pipeline.objects.create(
        name=unique("inc"),
        source=source,
        source_options={"table": events.table, "cursor": "updated"},
        steps=STEPS,
        sink=sqlite_sink,
        sink_options={"table": "events"},
        chunk_rows=3,
        max_rejected_ratio=0.0,
    )
    services.freeze_version(pipeline)
    events([(i, str(i * 10), 1 + i // 4) for i in range(1, 11)])  # updated 1..3

    first = drive(services.start_run(pipeline.pk).pk)
    assert (first.state, first.records_read) == ("succeeded", 10)
    pipeline.refresh_from_db()
    assert pipeline.cursor_state == {"cursor": 3, "key": [10]}

    # New rows, two of them tying with the saved cursor value 3.
    events([(11, "110", 3), (12, "120", 3), (13, "130", 4)])
    second = drive(services.start_run(pipeline.pk).pk)
    assert (second.state, second.records_read) == ("succeeded", 3)
    pipeline.refresh_from_db()
    assert pipeline.cursor_state == {"cursor": 4, "key": [13]}

    # A failing run (a value the mapping rejects, strict policy) keeps the cursor.
    events([(14, "not-a-number", 5)])
    third = drive(services.start_run(pipeline.pk).pk)
    assert third.state == "failed"
    pipeline.refresh_from_db()
    assert pipeline.cursor_state == {"cursor": 4, "key": [13]}

    # The bad row corrected at the source: the next run reads it, and only it.
    with psycopg.connect(
        host=pg_sink.config["host"],
        dbname=pg_sink.config["database"],
        user=pg_sink.config["user"],
        autocommit=True,
    ) as conn:
        conn.execute(f'UPDATE "{events.table}" SET amount = %s WHERE id = 14', ["140"])
    fourth = drive(services.start_run(pipeline.pk).pk)
    assert (fourth.state, fourth.records_read) == ("succeeded", 1)
    pipeline.refresh_from_db()
    assert pipeline.cursor_state == {"cursor": 5, "key": [14]}
