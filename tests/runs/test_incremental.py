"""Incremental PostgreSQL reads: each run reads only rows new since the last
successful run (ties on the cursor included); a failed run does not move it."""

from __future__ import annotations

import time

import psycopg
import pytest

from connectors.models import Connector
from integration import services, tasks
from integration.models import ChunkRun, Pipeline, Run
from tests.helpers import run_chunk_steps, unique

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
            run_chunk_steps(run_id, chunk.seq, chunk.attempt_token)
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


@pytest.fixture
def backfill_pipeline(events, pg_sink, sent):
    source = Connector.objects.create(
        name=unique("pgsrc"), kind="postgres", config=dict(pg_sink.config)
    )
    pipeline = Pipeline.objects.create(
        name=unique("bf"),
        source=source,
        source_options={"table": events.table, "cursor": "updated"},
        steps=STEPS,
        sink=pg_sink,
        sink_options={"table": pg_sink.new_table(), "key": ["id"]},
        chunk_rows=4,
    )
    services.freeze_version(pipeline)
    events([(i, str(i), i) for i in range(1, 21)])
    time.sleep(1.2)  # let PostgreSQL publish the table's counters (the fingerprint)
    first = drive(services.start_run(pipeline.pk).pk)
    assert (first.state, first.records_written) == ("succeeded", 20)
    return pipeline


def sink_rows(pipeline, pg_sink):
    from tests.runs.conftest import sink_query

    table = pipeline.sink_options["table"]
    return dict(sink_query(pg_sink, f'SELECT id, amount FROM "{table}" ORDER BY id'))


def update_source(events, pg_sink, ids, amount):
    cfg = pg_sink.config
    with psycopg.connect(
        host=cfg["host"], dbname=cfg["database"], user=cfg["user"], autocommit=True
    ) as conn:
        conn.execute(
            f'UPDATE "{events.table}" SET amount = %s WHERE id = ANY(%s)', [amount, ids]
        )


@pytest.mark.parametrize(
    ("scope", "ids"),
    [
        ({"cursor_from": 5, "cursor_to": 9}, [5, 6, 7, 8]),
        ({"keys": [[3], [17]]}, [3, 17]),
    ],
    ids=["cursor-range", "keys"],
)
def test_backfill_rereads_its_scope_with_upsert(
    api, backfill_pipeline, events, pg_sink, scope, ids
):
    update_source(events, pg_sink, list(range(1, 21)), "999")
    response = api.post(
        f"/api/v1/pipelines/{backfill_pipeline.pk}/backfills/",
        {"scope": scope},
        format="json",
    )
    assert response.status_code == 202, response.content
    run = drive(response.json()["id"])
    assert (run.kind, run.state, run.records_read) == (
        "backfill",
        "succeeded",
        len(ids),
    )
    rows = sink_rows(backfill_pipeline, pg_sink)
    assert len(rows) == 20  # upsert: replaced in place, nothing duplicated
    assert {i for i, amount in rows.items() if amount == 999} == set(ids)
    # A backfill does not move the incremental cursor.
    backfill_pipeline.refresh_from_db()
    assert backfill_pipeline.cursor_state == {"cursor": 20, "key": [20]}


def test_backfill_of_the_records_of_a_run(api, backfill_pipeline, events, pg_sink):
    first = Run.objects.filter(pipeline=backfill_pipeline).get()
    response = api.post(
        f"/api/v1/pipelines/{backfill_pipeline.pk}/backfills/",
        {"scope": {"run": first.pk}},
        format="json",
    )
    assert response.status_code == 202, response.content
    run = drive(response.json()["id"])
    assert (run.state, run.records_read, run.chunks_total) == (
        "succeeded",
        20,
        first.chunks_total,
    )
    assert len(sink_rows(backfill_pipeline, pg_sink)) == 20


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"scope": {"run": 987654}}, "scope", "no planned run"),
        ({"scope": {"cursor_from": 1, "keys": [[1]]}}, "scope", "one of"),
        ({"scope": {"keys": []}}, "scope", "non-empty"),
        ({"scope": {"keys": [[1, 2]]}}, None, None),
    ],
    ids=["unknown-run", "mixed", "empty-keys", "wrong-width"],
)
def test_bad_backfill_is_400(api, backfill_pipeline, body, field, message):
    response = api.post(
        f"/api/v1/pipelines/{backfill_pipeline.pk}/backfills/", body, format="json"
    )
    if field is None:  # accepted here, refused by the source when it plans
        assert response.status_code == 202
        # The task's failure handler fails the run with the source's reason.
        tasks.plan_run.apply(args=(response.json()["id"],))
        run = Run.objects.get(pk=response.json()["id"])
        assert run.state == "failed"
        assert "scope keys must have 1 value(s) each" in run.error
        return
    assert response.status_code == 400
    assert message in str(response.json()[field])


def test_backfill_needs_a_sink_key(api, backfill_pipeline):
    Pipeline.objects.filter(pk=backfill_pipeline.pk).update(sink_options={"table": "x"})
    backfill_pipeline.refresh_from_db()
    services.freeze_version(backfill_pipeline)
    response = api.post(
        f"/api/v1/pipelines/{backfill_pipeline.pk}/backfills/",
        {"scope": {"keys": [[1]]}},
        format="json",
    )
    assert response.status_code == 400
    assert "need a key" in str(response.json()["sink_options"])


def test_resume_is_refused_after_the_table_changed(
    api, events, pg_sink, sqlite_sink, sent
):
    source = Connector.objects.create(
        name=unique("pgsrc"), kind="postgres", config=dict(pg_sink.config)
    )
    pipeline = Pipeline.objects.create(
        name=unique("tbl"),
        source=source,
        source_options={"table": events.table},
        steps=STEPS,
        sink=sqlite_sink,
        sink_options={"table": "events"},
        chunk_rows=3,
    )
    services.freeze_version(pipeline)
    events([(i, str(i), i) for i in range(1, 8)])
    time.sleep(1.2)  # PostgreSQL publishes table statistics about once a second
    run = services.start_run(pipeline.pk)
    services.plan_run(run.pk)
    services.cancel_run(run.pk)
    assert Run.objects.get(pk=run.pk).source_fingerprint.startswith("pg:")
    events([(100, "1", 1)])
    deadline = time.monotonic() + 10
    plugin_source = source.open_source()
    while time.monotonic() < deadline:
        if plugin_source.fingerprint({"table": events.table}) != (
            Run.objects.get(pk=run.pk).source_fingerprint
        ):
            break
        time.sleep(0.2)
    plugin_source.close()
    response = api.post(f"/api/v1/runs/{run.pk}/resume/", {}, format="json")
    assert response.status_code == 409
    assert "source changed since the run was planned" in response.json()["detail"]
