"""Schema drift policies end to end: CSV files into PostgreSQL through a real worker.

The pipelines pass the source columns through (no map step), so a new source column
is a new sink column once the policy lets it in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.models import Connector
from integration import services
from integration.models import (
    DeadLetter,
    HeldValues,
    Pipeline,
    SchemaChange,
    SchemaChangeProposal,
)
from tests.helpers import unique, wait_for_run
from tests.runs.conftest import sink_query

pytestmark = [pytest.mark.e2e]

FIRST = "id,name\n1,ann\n2,bob\n3,cid\n"
# The second file has a new column; row 2 leaves it empty.
SECOND = "id,name,email\n4,dan,dan@x.org\n5,eve,\n6,fay,fay@x.org\n"


def write(root: Path, name: str, text: str) -> str:
    (root / name).write_text(text)
    return name


def make_pipeline(tmp_path, pg_sink, *, policy, path, source_schema=None):
    source = Connector.objects.create(
        name=unique("files"), kind="files", config={"root": str(tmp_path)}
    )
    table = pg_sink.new_table()
    pipeline = Pipeline.objects.create(
        name=unique("drift"),
        source=source,
        source_options={"path": path},
        steps=[],
        sink=pg_sink,
        sink_options={"table": table, "write_mode": "append"},
        drift_policy=policy,
        source_schema=source_schema or [],
        max_rejected_ratio=0.9,
    )
    services.save_pipeline(pipeline)
    return pipeline, table


def read_from(pipeline: Pipeline, path: str) -> None:
    """Point the pipeline at another file (a new version, as a save would)."""
    pipeline.refresh_from_db()
    pipeline.source_options = {"path": path}
    pipeline.save()
    services.save_pipeline(pipeline)


def run(pipeline: Pipeline):
    return wait_for_run(services.start_run(pipeline.pk).pk, timeout=120)


def columns(pg_sink, table) -> list[str]:
    rows = sink_query(
        pg_sink,
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = %s ORDER BY ordinal_position",
        (table,),
    )
    return [r[0] for r in rows]


def schema_names(version) -> list[str]:
    return [c["name"] for c in version.spec["drift"]["source_schema"]]


def test_quarantine_holds_new_values_until_approved_then_backfills(
    worker_factory, tmp_path, pg_sink, api
):
    write(tmp_path, "first.csv", FIRST)
    write(tmp_path, "second.csv", SECOND)
    pipeline, table = make_pipeline(
        tmp_path, pg_sink, policy="quarantine", path="first.csv"
    )
    worker_factory()

    # The first run records the source schema (a new version includes it).
    first = run(pipeline)
    assert first.state == "succeeded", first.error
    pipeline.refresh_from_db()
    assert pipeline.source_schema == [
        {"name": "id", "type": "string"},
        {"name": "name", "type": "string"},
    ]
    assert schema_names(pipeline.current_version) == ["id", "name"]

    # A file with a new column: known fields load, the values are held.
    read_from(pipeline, "second.csv")
    second = run(pipeline)
    assert second.state == "succeeded", second.error
    assert (second.records_read, second.records_written) == (3, 3)
    assert columns(pg_sink, table) == [
        "id",
        "name",
        "_run_id",
        "_chunk_seq",
        "_source_ref",
    ]
    assert sink_query(
        pg_sink,
        f'SELECT id, name FROM "{table}" WHERE _run_id = %s ORDER BY id',
        (second.pk,),
    ) == [("4", "dan"), ("5", "eve"), ("6", "fay")]
    assert not DeadLetter.objects.filter(run=second).exists()

    listed = api.get(f"/api/v1/schema-proposals/?pipeline={pipeline.name}").json()
    (proposal,) = listed["results"]
    assert proposal["state"] == "pending"
    assert proposal["columns"] == [{"name": "email", "type": "string"}]
    assert proposal["first_run"] == second.pk
    assert proposal["held_rows"] == 2  # eve has no email
    detail = api.get(f"/api/v1/runs/{second.pk}/").json()
    assert detail["stats"]["drift"] == {
        "policy": "quarantine",
        "new_columns": ["email"],
        "type_changes": [],
        "rejected": 0,
        "held": 2,
        "proposals": [proposal["id"]],
    }
    change = SchemaChange.objects.get(run=second)
    assert (change.kind, change.column, change.version_id) == (
        "added",
        "email",
        second.version_id,
    )

    # A second run seeing the same column joins the pending proposal.
    third = run(pipeline)
    assert third.state == "succeeded", third.error
    assert SchemaChangeProposal.objects.filter(pipeline=pipeline).count() == 1
    assert HeldValues.objects.filter(proposal_id=proposal["id"]).count() == 2

    versions_before = pipeline.versions.count()
    approved = api.post(f"/api/v1/schema-proposals/{proposal['id']}/approve/")
    assert approved.status_code == 200, approved.content
    body = approved.json()
    assert body["state"] == "approved"
    assert body["result"] == {
        "version": versions_before + 1,
        "held_rows": 4,
        "backfilled_rows": 4,
    }
    assert body["held_rows"] == 0
    assert "email" in columns(pg_sink, table)
    assert sink_query(
        pg_sink,
        f'SELECT _run_id, id, email FROM "{table}" WHERE _run_id IN (%s, %s) '
        "ORDER BY _run_id, id",
        (second.pk, third.pk),
    ) == [
        (second.pk, "4", "dan@x.org"),
        (second.pk, "5", None),
        (second.pk, "6", "fay@x.org"),
        (third.pk, "4", "dan@x.org"),
        (third.pk, "5", None),
        (third.pk, "6", "fay@x.org"),
    ]
    assert sink_query(
        pg_sink, f'SELECT count(*) FROM "{table}" WHERE email IS NOT NULL'
    ) == [(4,)]
    pipeline.refresh_from_db()
    assert pipeline.current_version.number == body["result"]["version"]
    assert schema_names(pipeline.current_version) == ["id", "name", "email"]

    # Approving again changes nothing; rejecting an approved proposal is refused.
    again = api.post(f"/api/v1/schema-proposals/{proposal['id']}/approve/")
    assert again.status_code == 200
    assert again.json()["result"] == body["result"]
    assert pipeline.versions.count() == versions_before + 1
    refused = api.post(f"/api/v1/schema-proposals/{proposal['id']}/reject/")
    assert refused.status_code == 409

    # The next run loads the column directly: no drift, no proposal.
    fourth = run(pipeline)
    assert fourth.state == "succeeded", fourth.error
    assert fourth.version_id == pipeline.current_version_id
    assert sink_query(
        pg_sink,
        f'SELECT id, email FROM "{table}" WHERE _run_id = %s ORDER BY id',
        (fourth.pk,),
    ) == [("4", "dan@x.org"), ("5", None), ("6", "fay@x.org")]
    assert not SchemaChange.objects.filter(run=fourth).exists()
    assert SchemaChangeProposal.objects.filter(pipeline=pipeline).count() == 1


def test_rejecting_a_proposal_drops_the_held_values(
    worker_factory, tmp_path, pg_sink, api
):
    write(tmp_path, "second.csv", SECOND)
    pipeline, table = make_pipeline(
        tmp_path,
        pg_sink,
        policy="quarantine",
        path="second.csv",
        source_schema=[
            {"name": "id", "type": "integer"},
            {"name": "name", "type": "string"},
        ],
    )
    worker_factory()
    done = run(pipeline)
    assert done.state == "succeeded", done.error
    proposal = SchemaChangeProposal.objects.get(pipeline=pipeline)
    version = pipeline.current_version_id

    for _ in range(2):  # idempotent
        response = api.post(f"/api/v1/schema-proposals/{proposal.pk}/reject/")
        assert response.status_code == 200
        assert response.json()["state"] == "rejected"
        assert response.json()["result"] == {"held_rows_rejected": 1}
    assert set(HeldValues.objects.filter(proposal=proposal).values_list("state")) == {
        ("rejected",)
    }
    assert api.post(f"/api/v1/schema-proposals/{proposal.pk}/approve/").status_code == (
        409
    )
    pipeline.refresh_from_db()
    assert pipeline.current_version_id == version
    assert "email" not in columns(pg_sink, table)


def test_freeze_rejects_rows_with_new_values_or_misfit_types(
    worker_factory, tmp_path, pg_sink, api
):
    write(
        tmp_path,
        "third.csv",
        "id,name,email\n1,ann,\n2,bob,bob@x.org\nx3,cid,\n4,dan,\n",
    )
    pipeline, table = make_pipeline(
        tmp_path,
        pg_sink,
        policy="freeze",
        path="third.csv",
        source_schema=[
            {"name": "id", "type": "integer"},
            {"name": "name", "type": "string"},
        ],
    )
    worker_factory()
    done = run(pipeline)
    assert done.state == "succeeded_with_errors", done.error
    assert (done.records_read, done.records_written, done.records_rejected) == (
        4,
        2,
        2,
    )
    assert sink_query(pg_sink, f'SELECT id, name FROM "{table}" ORDER BY id') == [
        ("1", "ann"),
        ("4", "dan"),
    ]
    assert "email" not in columns(pg_sink, table)
    letters = {
        dl.source_ref: dl for dl in DeadLetter.objects.filter(run=done, step="drift")
    }
    assert sorted(letters) == ["third.csv#2", "third.csv#3"]
    assert "'email' is not in the pipeline's source schema" in (
        letters["third.csv#2"].error
    )
    assert letters["third.csv#2"].payload == {
        "id": "2",
        "name": "bob",
        "email": "bob@x.org",
    }
    assert "column 'id': value 'x3' does not fit its type integer" in (
        letters["third.csv#3"].error
    )
    changes = SchemaChange.objects.filter(run=done).order_by("column")
    assert [(c.kind, c.column, c.old_type, c.new_type, c.policy) for c in changes] == [
        ("added", "email", "", "string", "freeze"),
        ("type_changed", "id", "integer", "string", "freeze"),
    ]
    # Freeze never changes the pipeline.
    pipeline.refresh_from_db()
    assert pipeline.versions.count() == 1
    assert not SchemaChangeProposal.objects.filter(pipeline=pipeline).exists()

    # The operator declares the column and replays the dead letters: bob loads with
    # his email (the table gains the column); 'x3' still does not fit.
    patched = api.patch(
        f"/api/v1/pipelines/{pipeline.pk}/",
        {
            "source_schema": [
                {"name": "id", "type": "integer"},
                {"name": "name", "type": "string"},
                {"name": "email", "type": "string"},
            ]
        },
        format="json",
    )
    assert patched.status_code == 200, patched.content
    replay = api.post(
        "/api/v1/dead-letters/replay/", {"filter": {"run": done.pk}}, format="json"
    )
    assert replay.status_code == 202, replay.content
    replayed = wait_for_run(replay.json()["id"], timeout=120)
    assert replayed.state == "succeeded_with_errors", replayed.error
    assert sink_query(
        pg_sink, f'SELECT id, email FROM "{table}" WHERE _run_id = %s', (replayed.pk,)
    ) == [("2", "bob@x.org")]
    assert DeadLetter.objects.get(source_ref="third.csv#2", run=done).state == (
        "replayed"
    )
    assert DeadLetter.objects.get(source_ref="third.csv#3", run=done).state == "open"


def test_evolve_adds_the_column_in_the_same_run_and_versions_it(
    worker_factory, tmp_path, pg_sink
):
    write(tmp_path, "first.csv", FIRST)
    write(tmp_path, "second.csv", SECOND.replace("\n6,", "\nx6,"))
    pipeline, table = make_pipeline(
        tmp_path,
        pg_sink,
        policy="evolve",
        path="first.csv",
        source_schema=[
            {"name": "id", "type": "integer"},
            {"name": "name", "type": "string"},
        ],
    )
    worker_factory()
    first = run(pipeline)
    assert first.state == "succeeded", first.error
    assert "email" not in columns(pg_sink, table)

    read_from(pipeline, "second.csv")
    second = run(pipeline)
    assert second.state == "succeeded", second.error
    assert second.records_written == 3
    assert sink_query(
        pg_sink,
        f'SELECT id, email FROM "{table}" WHERE _run_id = %s ORDER BY id',
        (second.pk,),
    ) == [("4", "dan@x.org"), ("5", None), ("x6", "fay@x.org")]
    changes = SchemaChange.objects.filter(run=second).order_by("column")
    pipeline.refresh_from_db()
    assert [
        (c.kind, c.column, c.old_type, c.new_type, c.version_id, c.applied_version_id)
        for c in changes
    ] == [
        (
            "added",
            "email",
            "",
            "string",
            second.version_id,
            pipeline.current_version_id,
        ),
        (
            "type_changed",
            "id",
            "integer",
            "string",
            second.version_id,
            pipeline.current_version_id,
        ),
    ]
    assert pipeline.current_version_id != second.version_id
    assert pipeline.current_version.spec["drift"]["source_schema"] == [
        {"name": "id", "type": "string"},
        {"name": "name", "type": "string"},
        {"name": "email", "type": "string"},
    ]
    # The next run runs the evolved version and finds nothing new.
    third = run(pipeline)
    assert third.state == "succeeded", third.error
    assert third.version_id == pipeline.current_version_id
    assert not SchemaChange.objects.filter(run=third).exists()
