"""Preview equals a real run on the same records, and writes nothing.

A CSV with good, malformed, invalid and filtered records goes through a real run
(a Celery worker, Redis, PostgreSQL sink) and through
``POST /api/v1/pipelines/{id}/preview/`` (sampled from the pipeline's source, and
as records in the body): the outputs are equal value for value and type for
type, row for row; the rejected records have the same step and error.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.conf import settings

from integration import services
from integration.models import ChunkRun, DeadLetter, Pipeline, PipelineVersion, Run
from tests.helpers import unique, wait_for_run
from tests.runs.conftest import sink_query

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CSV_TEXT = """id,amount,paid_on,paid_at,status,note,payload,flag
1,10.50,2024-02-29,2024-02-29 10:00:00+01:00,paid,héllo wörld,"{""a"": [1, 2]}",true
2,0.01,2024-03-01,2024-03-01T00:00:00Z,new,,,
x,5,2024-03-01,2024-03-01 00:00,paid,not an id,,
4,517.555,2024-03-01,2024-03-01 00:00,paid,too many decimals,,
5,10,2013-02-30,2024-03-01 00:00,paid,no such day,,
6,-3,2024-03-01,2024-03-01 00:00,paid,negative,,no
7,1,2024-03-01,2024-03-01 00:00,bogus,not a status,,
8,1,2024-03-01,2024-03-01 00:00,void,filtered out,,
9,,2024-03-02,2024-03-02 23:59:59.123456-05:00,new,"quoted, with a comma",,0
10,1,2024-03-01,2024-03-01 00:00,paid,LONG_NOTE,,
11,"1,000",2024-03-01,2024-03-01 00:00,paid,thousands separator,,
12,2,2024-03-03,,new,"{""not"": ""json""}",{bad,
13,99999.99,1999-12-31,1999-12-31 23:59:59,paid,\U0001d518nicode,"{""x"": null}",yes
""".replace("LONG_NOTE", "n" * 300)

STEPS: list[dict[str, Any]] = [
    {
        "type": "map",
        "fields": [
            {"name": "id", "expr": "id", "type": "integer", "required": True},
            {"name": "amount", "expr": "amount", "type": "decimal", "scale": 2},
            {"name": "paid_on", "expr": "paid_on", "type": "date"},
            {"name": "paid_at", "expr": "paid_at", "type": "timestamptz"},
            {"name": "status", "expr": "status", "type": "string"},
            {"name": "note", "expr": "note", "type": "string"},
            {"name": "note_chars", "expr": "length(note)", "type": "integer"},
            {"name": "payload", "expr": "payload", "type": "json"},
            {"name": "flag", "expr": "flag", "type": "boolean", "default": False},
            {"name": "share", "expr": "CAST(amount AS DOUBLE) / 3", "type": "float"},
        ],
    },
    {"type": "filter", "where": "status <> 'void'"},
    {
        "type": "validate",
        "rules": [
            {"field": "amount", "rule": "range", "min": 0},
            {"field": "status", "rule": "enum", "values": ["new", "paid"]},
            {"field": "note", "rule": "length", "max": 200},
        ],
    },
]
# Arrow type of each output column -> the PostgreSQL type the sink gives it.
PG_TYPES = {
    "int64": "bigint",
    "decimal128(18, 2)": "numeric",
    "date32[day]": "date",
    "timestamp[us, tz=UTC]": "timestamp with time zone",
    "string": "text",
    "bool": "boolean",
    "double": "double precision",
    "json": "jsonb",
}


def typed(arrow_type: str, value: Any) -> Any:
    """A preview (JSON) or PostgreSQL value as one comparable Python value."""
    if value is None:
        return None
    if arrow_type == "json":  # JSON text in the preview, jsonb in PostgreSQL
        return json.loads(value) if isinstance(value, str) else value
    if arrow_type.startswith("decimal"):
        return Decimal(value)
    if arrow_type.startswith("timestamp"):
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        assert value.utcoffset() is not None
        return value.astimezone(dt.UTC)
    if arrow_type.startswith("date"):
        return dt.date.fromisoformat(value) if isinstance(value, str) else value
    return value


def row_number(ref: str) -> int:
    return int(ref.rsplit("#", 1)[1])


def redis_footprint() -> dict[str, Any]:
    """Staged batches of this checkout and the length of its task queues."""
    stage = redis.Redis.from_url(settings.REDIS_URL)
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    return {
        "staged": sorted(stage.scan_iter(f"{settings.DIS_STAGING_PREFIX}:*")),
        "queues": {q: broker.llen(f"{prefix}{q}") for q in ("control", "io", "cpu")},
    }


def database_footprint(pipeline: Pipeline, pg_sink: Any, table: str) -> dict:
    (rows,) = sink_query(pg_sink, f'SELECT count(*) FROM "{table}"')
    return {
        "runs": Run.objects.filter(pipeline=pipeline).count(),
        "chunks": ChunkRun.objects.filter(run__pipeline=pipeline).count(),
        "dead_letters": DeadLetter.objects.filter(pipeline=pipeline).count(),
        "versions": PipelineVersion.objects.filter(pipeline=pipeline).count(),
        "sink_rows": rows[0],
    }


@pytest.fixture
def payments(tmp_path, pg_sink):
    """A pipeline from payments.csv (files source) to a PostgreSQL table."""
    from connectors.models import Connector

    (tmp_path / "payments.csv").write_text(CSV_TEXT, encoding="utf-8")
    source = Connector.objects.create(
        name=unique("files"), kind="files", config={"root": str(tmp_path)}
    )
    table = pg_sink.new_table()
    pipeline = Pipeline.objects.create(
        name=unique("payments"),
        source=source,
        source_options={"path": "payments.csv"},
        steps=STEPS,
        sink=pg_sink,
        sink_options={"table": table, "write_mode": "append"},
        chunk_rows=4,
        max_rejected_ratio=1.0,
    )
    services.freeze_version(pipeline)
    return pipeline, table


def test_preview_equals_a_real_run_and_writes_nothing(
    worker_factory, payments, pg_sink, api
):
    pipeline, table = payments
    worker_factory(concurrency=1)
    run = wait_for_run(services.start_run(pipeline.pk, correlation_id=unique("c")).pk)
    assert run.state == "succeeded_with_errors", run.error
    assert run.chunks_total == 4

    before = (database_footprint(pipeline, pg_sink, table), redis_footprint())
    sampled = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/preview/", {"limit": 100}, format="json"
    )
    reader = csv.DictReader(io.StringIO(CSV_TEXT))
    records = [{k: (v if v != "" else None) for k, v in r.items()} for r in reader]
    posted = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/preview/",
        {"records": records},
        format="json",
    )
    after = (database_footprint(pipeline, pg_sink, table), redis_footprint())
    assert sampled.status_code == 200, sampled.json()
    assert posted.status_code == 200, posted.json()
    assert after == before  # no run, chunk, dead letter, version, sink row or key
    preview = sampled.json()

    # Counts: as the run counted them.
    assert preview["version"] == run.version.number
    assert preview["rows_in"] == run.records_read == 13
    assert preview["filtered"] == run.records_filtered == 1
    assert len(preview["errors"]) == run.records_rejected == 8
    assert len(preview["outputs"]) == run.records_written == 4

    # Types: the preview's schema is the sink table's.
    schema = {c["name"]: c["type"] for c in preview["schema"]}
    assert list(schema) == [f["name"] for f in STEPS[0]["fields"]]
    columns = dict(
        sink_query(
            pg_sink,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = %s",
            (table,),
        )
    )
    assert {name: PG_TYPES[t] for name, t in schema.items()} == {
        name: columns[name] for name in schema
    }

    # Values: row for row, in source order.
    names = ", ".join(f'"{n}"' for n in schema)
    sink_rows = sorted(
        sink_query(pg_sink, f'SELECT {names}, _source_ref FROM "{table}"'),
        key=lambda r: row_number(r[-1]),
    )
    from_sink = [
        {
            **{n: typed(schema[n], v) for n, v in zip(schema, r, strict=False)},
            "_source_ref": r[-1],
        }
        for r in sink_rows
    ]
    from_preview = [
        {**{n: typed(schema[n], o[n]) for n in schema}, "_source_ref": o["_source_ref"]}
        for o in preview["outputs"]
    ]
    assert from_preview == from_sink
    assert [r["id"] for r in from_preview] == [1, 2, 9, 13]
    first = from_preview[0]
    assert first["amount"] == Decimal("10.50")
    assert first["paid_at"] == dt.datetime(2024, 2, 29, 9, tzinfo=dt.UTC)
    assert first["payload"] == {"a": [1, 2]}
    assert schema["payload"] == "json"

    # Rejected records: the same step and error as the run's dead letters.
    letters = sorted(
        DeadLetter.objects.filter(run=run).values_list("source_ref", "step", "error"),
        key=lambda letter: row_number(letter[0]),
    )
    assert [(e["source_ref"], e["step"], e["error"]) for e in preview["errors"]] == [
        tuple(letter) for letter in letters
    ]
    assert [row_number(e["source_ref"]) for e in preview["errors"]] == [
        3,
        4,
        5,
        6,
        7,
        10,
        11,
        12,
    ]

    # The records given in the body (as text, as the CSV source reads them) give
    # the same outputs and errors, by position in the sample.
    body = posted.json()
    assert body["schema"] == preview["schema"]
    assert body["filtered"] == preview["filtered"]

    def without_ref(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "_source_ref"} for r in rows]

    assert without_ref(body["outputs"]) == without_ref(preview["outputs"])
    assert [(e["index"], e["step"], e["error"]) for e in body["errors"]] == [
        (row_number(e["source_ref"]) - 1, e["step"], e["error"])
        for e in preview["errors"]
    ]


def test_preview_needs_a_fitting_sample(api, payments):
    pipeline, _ = payments
    response = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/preview/",
        {"records": [{"other": "1"}]},
        format="json",
    )
    assert response.status_code == 400
    assert "id" in response.json()["records"][0]
    response = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/preview/",
        {"records": [], "version": 7},
        format="json",
    )
    assert response.status_code == 400
    assert response.json() == {
        "version": [f"pipeline {pipeline.name} has no version 7"]
    }
