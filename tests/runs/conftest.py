"""Fixtures for runs: the flights CSV (with and without broken rows), sinks."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from integration.examples.flights import flights_table, write_flights_csv

#: Rows appended to the pristine flights: each must become exactly one dead letter.
#: (row number after the pristine rows, reason)
BROKEN_ROWS = [
    # flight 517.5 is not an integer
    "2013,1,1,517,515,2,830,819,11,UA,517.5,N14228,EWR,IAH,227,1400,5,15,"
    "2013-01-01T10:00:00Z",
    # dep_delay 1e3 is not an integer
    "2013,1,1,517,515,1e3,830,819,11,UA,90001,N14228,EWR,IAH,227,1400,5,15,"
    "2013-01-01T10:00:00Z",
    # month 13 is out of range (validate)
    "2013,13,1,517,515,2,830,819,11,UA,90002,N14228,EWR,IAH,227,1400,5,15,"
    "2013-01-01T10:00:00Z",
    # carrier fails the regex (validate)
    "2013,1,1,517,515,2,830,819,11,toolong,90003,N14228,EWR,IAH,227,1400,5,15,"
    "2013-01-01T10:00:00Z",
    # origin not in the enum (validate)
    "2013,1,1,517,515,2,830,819,11,UA,90004,N14228,XXX,IAH,227,1400,5,15,"
    "2013-01-01T10:00:00Z",
    # time_hour is not a timestamp
    "2013,1,1,517,515,2,830,819,11,UA,90005,N14228,EWR,IAH,227,1400,5,15,yesterday-ish",
    # a ragged row: too few fields
    "2013,1,1,517,515",
]


@pytest.fixture
def sent(monkeypatch):
    """Record what would go to the broker instead of sending it, so a test drives
    every step itself: ("plan" | "chunk" | "finalize" | "notify" | "advance", ...)."""
    from integration import orchestration, workflows

    calls: list[tuple] = []
    for name, label in [
        ("send_plan", "plan"),
        ("send_finalize", "finalize"),
        ("send_notification", "notify"),
    ]:
        monkeypatch.setattr(
            orchestration, name, lambda *a, _label=label: calls.append((_label, *a))
        )

    def send_chunk(
        run_id: int, seq: int, token: str, cid: str, *, fused: bool = False
    ) -> list[str]:
        calls.append(("chunk", run_id, seq, token, cid))
        return [f"{token}-{step}" for step in ("extract", "transform", "load")]

    monkeypatch.setattr(orchestration, "send_chunk", send_chunk)
    monkeypatch.setattr(
        orchestration, "revoke", lambda ids: calls.append(("revoke", sorted(ids)))
    )
    monkeypatch.setattr(
        workflows, "send_advance", lambda wr, **kw: calls.append(("advance", wr))
    )
    return calls


@pytest.fixture(scope="session")
def flights_dir(tmp_path_factory) -> Path:
    """A folder with flights.csv (pristine) and flights_broken.csv (+ broken rows)."""
    root = tmp_path_factory.mktemp("flights")
    table = flights_table()
    write_flights_csv(root / "flights.csv", table)
    broken = root / "flights_broken.csv"
    # The broken rows go in the middle and at the end, so two chunks see them.
    text = (root / "flights.csv").read_text()
    lines = text.splitlines()
    middle = len(lines) // 2
    lines[middle:middle] = BROKEN_ROWS[:3]
    lines.extend(BROKEN_ROWS[3:])
    broken.write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def pg_sink(db):
    """A postgres connector on the test database; the tables it gets are dropped."""
    from django.db import connection

    from connectors.models import Connector
    from tests.helpers import unique

    s = connection.settings_dict
    connector = Connector.objects.create(
        name=unique("pg"),
        kind="postgres",
        config={
            "host": s["HOST"] or "127.0.0.1",
            "port": int(s["PORT"] or 5432),
            "database": s["NAME"],
            "user": s["USER"] or "postgres",
        },
    )
    tables: list[str] = []
    connector.new_table = lambda: (
        tables.append(unique("t").replace("-", "_")) or tables[-1]
    )
    yield connector
    # The sink's pool holds connections to the test database: close them so the
    # database can be dropped at the end of the session.
    from connectors.plugins.sql.postgres import close_pools

    close_pools()
    with psycopg.connect(
        host=s["HOST"] or "127.0.0.1",
        dbname=s["NAME"],
        user=s["USER"] or "postgres",
        autocommit=True,
    ) as conn:
        for table in tables:
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')


def sink_query(connector, sql: str, params=()):
    cfg = connector.config
    with psycopg.connect(
        host=cfg["host"], port=cfg["port"], dbname=cfg["database"], user=cfg["user"]
    ) as conn:
        return conn.execute(sql, params).fetchall()


#: Two generated columns mapped (chunk attempt and process_chunk tests).
STEPS = [
    {
        "type": "map",
        "fields": [
            {"name": "id", "expr": "id", "type": "integer", "required": True},
            {"name": "label", "expr": "label", "type": "string"},
        ],
    }
]


@pytest.fixture
def planned(pg_sink, sent):
    """A planned run of 1,000 generated rows in 2 chunks of 500; window 2:
    (run, sink table, {seq: attempt token})."""
    from connectors.models import Connector
    from integration import services
    from integration.models import ChunkRun, Pipeline
    from tests.helpers import unique

    source = Connector.objects.create(
        name=unique("gen"), kind="generator", config={"rows": 1000}
    )
    table = pg_sink.new_table()
    pipeline = Pipeline.objects.create(
        name=unique("p"),
        source=source,
        sink=pg_sink,
        steps=STEPS,
        sink_options={"table": table},
        chunk_rows=500,
        max_in_flight=2,
    )
    services.freeze_version(pipeline)
    run = services.start_run(pipeline.pk)
    services.plan_run(run.pk)
    chunks = {c.seq: str(c.attempt_token) for c in ChunkRun.objects.filter(run=run)}
    return run, table, chunks


#: A 100-row generator pipeline's steps: rows with id > 95 are rejected.
WINDOW_STEPS = [
    {"type": "map", "fields": [{"name": "id", "expr": "id", "type": "integer"}]},
    {"type": "validate", "rules": [{"field": "id", "rule": "range", "max": 95}]},
]


@pytest.fixture
def window_pipeline(sqlite_sink):
    """100 generated rows in 10 chunks of 10, a window of 3 chunks, into SQLite;
    5 rows rejected."""
    from connectors.models import Connector
    from integration import services
    from integration.models import Pipeline
    from tests.helpers import unique

    source = Connector.objects.create(
        name=unique("gen"), kind="generator", config={"rows": 100}
    )
    p = Pipeline.objects.create(
        name=unique("p"),
        source=source,
        sink=sqlite_sink,
        steps=WINDOW_STEPS,
        sink_options={"table": "t"},
        chunk_rows=10,
        max_in_flight=3,
        max_rejected_ratio=0.5,
    )
    services.freeze_version(p)
    return p


def finalize_window_run(run, sent) -> None:
    """Run the one finalize that was sent (by the last chunk, or by the plan) and
    check the window pipeline's outcome: 100 rows read, 95 written, 5 rejected."""
    from integration import tasks

    assert [c for c in sent if c[0] == "finalize"] == [
        ("finalize", run.pk, run.correlation_id)
    ]
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert run.state == "succeeded_with_errors"
    assert (run.records_read, run.records_written, run.records_rejected) == (100, 95, 5)
