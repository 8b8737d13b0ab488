"""Schema drift services without a worker: a chunk checked as extract checks it,
proposals decided through the admin, sinks that cannot back-fill, validation."""

from __future__ import annotations

import pyarrow as pa
import pytest

from integration import drift, services
from integration.choices import RunState
from integration.models import (
    HeldValues,
    Pipeline,
    Run,
    SchemaChange,
    SchemaChangeProposal,
)
from tests.helpers import unique

pytestmark = pytest.mark.django_db

MAP = [{"type": "map", "fields": [{"name": "id", "expr": "id", "type": "integer"}]}]
KNOWN = [{"name": "id", "type": "integer"}]


@pytest.fixture
def make(generator_connector, sqlite_sink):
    def build(*, policy="quarantine", steps=MAP, sink=sqlite_sink) -> Pipeline:
        pipeline = Pipeline.objects.create(
            name=unique("p"),
            source=generator_connector,
            sink=sink,
            steps=steps,
            sink_options={"table": "t"},
            drift_policy=policy,
            source_schema=KNOWN,
        )
        services.save_pipeline(pipeline)
        return pipeline

    return build


def new_run(pipeline: Pipeline) -> Run:
    return Run.objects.create(
        pipeline=pipeline, version=pipeline.current_version, state=RunState.RUNNING
    )


def chunk(ids, emails) -> pa.Table:
    refs = [f"src#{i + 1}" for i in range(len(ids))]
    return pa.table({"id": ids, "email": emails, "_source_ref": refs})


def test_quarantine_strips_new_columns_and_holds_their_values(make):
    pipeline = make()
    run = new_run(pipeline)
    staged, done = drift.check_chunk(
        run.pk, 0, run.version.spec, chunk(["1", "2"], ["a@x", None])
    )
    assert done.stats() == {
        "policy": "quarantine",
        "new_columns": ["email"],
        "type_changes": [],
        "rejected": 0,
        "held": 1,
        "proposal": done.proposal,
    }
    kept, rejected = drift.split_rejected(staged)
    assert rejected is None
    assert kept.column_names == ["id", "_source_ref"]
    assert kept.schema.metadata is None
    (held,) = HeldValues.objects.filter(run=run)
    from integration.staging import from_ipc

    assert from_ipc(bytes(held.payload)).to_pylist() == [
        {"_source_ref": "src#1", "email": "a@x"}
    ]
    # A retried chunk replaces its held values; another chunk joins the proposal.
    drift.check_chunk(run.pk, 0, run.version.spec, chunk(["1"], ["b@x"]))
    drift.check_chunk(run.pk, 1, run.version.spec, chunk(["3"], ["c@x"]))
    assert sorted(
        HeldValues.objects.filter(run=run).values_list("chunk_seq", "rows")
    ) == [(0, 1), (1, 1)]
    assert SchemaChangeProposal.objects.filter(pipeline=pipeline).count() == 1
    assert SchemaChange.objects.filter(run=run).count() == 1


def test_a_fitting_chunk_and_the_ignore_policy_change_nothing(make):
    pipeline = make(policy="ignore")
    run = new_run(pipeline)
    assert "drift" not in run.version.spec
    table = chunk(["1"], ["a@x"])
    assert drift.check_chunk(run.pk, 0, run.version.spec, table) == (table, None)
    pipeline = make()
    run = new_run(pipeline)
    fits = pa.table({"id": ["1"], "_source_ref": ["src#1"]})
    assert drift.check_chunk(run.pk, 0, run.version.spec, fits) == (fits, None)


def test_approving_with_a_map_step_versions_the_schema_without_backfill(
    make, admin_user_obj, client
):
    pipeline = make()
    run = new_run(pipeline)
    drift.check_chunk(run.pk, 0, run.version.spec, chunk(["1"], ["a@x"]))
    proposal = SchemaChangeProposal.objects.get(pipeline=pipeline)
    client.force_login(admin_user_obj)
    response = client.post(
        "/admin/integration/schemachangeproposal/",
        {"action": "approve", "_selected_action": [proposal.pk]},
    )
    assert response.status_code == 302
    proposal.refresh_from_db()
    pipeline.refresh_from_db()
    assert proposal.state == "approved"
    assert proposal.decided_by == admin_user_obj
    assert proposal.result["backfilled_rows"] == 0
    assert proposal.result["held_rows"] == 1
    assert "map step decides its sink columns" in proposal.result["note"]
    assert pipeline.current_version == proposal.applied_version
    assert pipeline.source_schema == [*KNOWN, {"name": "email", "type": "string"}]
    assert set(HeldValues.objects.values_list("state", flat=True)) == {"dropped"}


def test_admin_reject_marks_held_values_rejected(make, admin_user_obj, client):
    pipeline = make()
    run = new_run(pipeline)
    drift.check_chunk(run.pk, 0, run.version.spec, chunk(["1"], ["a@x"]))
    proposal = SchemaChangeProposal.objects.get(pipeline=pipeline)
    client.force_login(admin_user_obj)
    client.post(
        "/admin/integration/schemachangeproposal/",
        {"action": "reject", "_selected_action": [proposal.pk]},
    )
    proposal.refresh_from_db()
    assert proposal.state == "rejected"
    assert list(HeldValues.objects.values_list("state", flat=True)) == ["rejected"]
    for url in (
        "/admin/integration/schemachangeproposal/?q=email&state=rejected",
        f"/admin/integration/schemachangeproposal/{proposal.pk}/change/",
        "/admin/integration/schemachange/?q=email&kind=added&policy=quarantine",
    ):
        assert client.get(url).status_code == 200


def test_approve_is_refused_with_400_when_the_sink_cannot_backfill(make, api):
    pipeline = make(steps=[])  # pass-through into a sqlite sink
    run = new_run(pipeline)
    drift.check_chunk(run.pk, 0, run.version.spec, chunk(["1"], ["a@x"]))
    proposal = SchemaChangeProposal.objects.get(pipeline=pipeline)
    version = pipeline.current_version_id
    response = api.post(f"/api/v1/schema-proposals/{proposal.pk}/approve/")
    assert response.status_code == 400
    assert "cannot add columns to loaded rows" in response.json()["sink"][0]
    proposal.refresh_from_db()
    pipeline.refresh_from_db()
    assert proposal.state == "pending"
    assert pipeline.current_version_id == version  # rolled back with the refusal
    assert list(HeldValues.objects.values_list("state", flat=True)) == ["held"]


def test_freeze_marks_rows_and_keeps_the_others(make):
    pipeline = make(policy="freeze")
    run = new_run(pipeline)
    staged, done = drift.check_chunk(
        run.pk,
        0,
        run.version.spec,
        chunk(["1", "2", "x", "y", " 5 "], [None, "b@x", None, "d@x", " "]),
    )
    assert (done.rejected, done.held, done.proposal) == (3, 0, None)
    kept, rejected = drift.split_rejected(staged)
    assert kept.to_pylist() == [
        {"id": "1", "_source_ref": "src#1"},
        {"id": " 5 ", "_source_ref": "src#5"},
    ]
    assert rejected.column("_source_ref").to_pylist() == ["src#2", "src#3", "src#4"]
    assert rejected.column("_step").to_pylist() == ["drift"] * 3
    new_column = (
        "column 'email' is not in the pipeline's source schema (drift policy freeze)"
    )
    misfit = (
        "column 'id': value '{}' does not fit its type integer "
        "(drift: the source now gives string)"
    )
    assert rejected.column("_error").to_pylist() == [
        new_column,
        misfit.format("x"),
        f"{new_column}; {misfit.format('y')}",
    ]
    assert not SchemaChangeProposal.objects.exists()


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"id": "integer"}, "Expected a list of items"),
        ([{"name": "id"}], "This field is required"),
        (
            [{"name": "a", "type": "string"}, {"name": "a", "type": "integer"}],
            "entry 1: column 'a' named twice",
        ),
        ([{"name": "_source_ref", "type": "string"}], "bad column name"),
    ],
    ids=["object", "no-type", "twice", "system-column"],
)
def test_api_refuses_a_bad_source_schema_with_400(
    api, generator_connector, sqlite_sink, schema, message
):
    body = {
        "name": unique("p"),
        "source": generator_connector.name,
        "sink": sqlite_sink.name,
        "steps": MAP,
        "sink_options": {"table": "t"},
        "drift_policy": "freeze",
        "source_schema": schema,
    }
    response = api.post("/api/v1/pipelines/", body, format="json")
    assert response.status_code == 400
    assert message in str(response.json()["source_schema"])
    assert not Pipeline.objects.filter(name=body["name"]).exists()


def test_drift_policy_and_schema_are_part_of_the_version_only_when_checked(make, api):
    pipeline = make(policy="ignore")
    assert "drift" not in pipeline.current_version.spec
    response = api.patch(
        f"/api/v1/pipelines/{pipeline.pk}/",
        {"drift_policy": "evolve"},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["current_version"]["spec"]["drift"] == {
        "policy": "evolve",
        "source_schema": KNOWN,
    }


def test_purge_deletes_decided_held_values_past_retention_only(make, settings):
    from datetime import timedelta

    from django.utils import timezone

    from integration import housekeeping

    pipeline = make()
    run = new_run(pipeline)
    drift.check_chunk(run.pk, 0, run.version.spec, chunk(["1"], ["a@x"]))
    drift.check_chunk(run.pk, 1, run.version.spec, chunk(["2"], ["b@x"]))
    first, second = HeldValues.objects.order_by("chunk_seq")
    old = timezone.now() - timedelta(days=settings.DIS_RETENTION_DEAD_LETTERS_DAYS + 1)
    HeldValues.objects.filter(pk=first.pk).update(state="rejected", updated_at=old)
    HeldValues.objects.filter(pk=second.pk).update(updated_at=old)  # still held
    report = housekeeping.purge()
    assert report.held_values == 1
    assert list(HeldValues.objects.values_list("pk", flat=True)) == [second.pk]


def test_a_pass_through_chunk_with_only_unreadable_rows_rejects_them(make):
    from integration import runtime, tasks

    pipeline = make(steps=[])
    runtime.reset()
    table = pa.table(
        {
            "id": pa.array([None], pa.string()),
            "_source_ref": ["src#1"],
            "_read_error": ["expected 2 fields, got 1"],
            "_raw": ["1"],
        }
    )
    done = tasks.transform_table(pipeline.current_version_id, table)
    assert done.output.schema.names == ["id", "_source_ref"]
    assert done.output.num_rows == 0
    assert done.rejected.column("_step").to_pylist() == ["read"]
    assert done.filtered == 0
