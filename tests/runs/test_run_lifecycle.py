"""Run lifecycle rules that need no worker: versions, the one-running-run index,
starting runs through the API."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from integration import services
from integration.choices import RunState
from integration.models import Pipeline, PipelineVersion, Run
from tests.helpers import unique

pytestmark = pytest.mark.django_db

STEPS = [{"type": "map", "fields": [{"name": "id", "expr": "id", "type": "integer"}]}]


def _unversioned_pipeline(source, sink) -> Pipeline:
    return Pipeline.objects.create(
        name=unique("p"),
        source=source,
        sink=sink,
        steps=STEPS,
        sink_options={"table": "t"},
    )


@pytest.fixture
def pipeline(generator_connector, sqlite_sink):
    p = _unversioned_pipeline(generator_connector, sqlite_sink)
    services.freeze_version(p)
    return p


def test_behaviour_change_freezes_a_new_version(pipeline):
    first = pipeline.current_version
    pipeline.description = "only words"
    pipeline.save()
    assert services.freeze_version(pipeline) == first
    pipeline.chunk_rows = 7
    pipeline.save()
    second = services.freeze_version(pipeline)
    assert second.number == first.number + 1
    assert second.spec["chunk_rows"] == 7
    # Back to the old behaviour: the old version again, no third one.
    pipeline.chunk_rows = first.spec["chunk_rows"]
    pipeline.save()
    assert services.freeze_version(pipeline) == first
    assert pipeline.versions.count() == 2


def test_version_is_immutable(pipeline):
    version = pipeline.current_version
    version.spec = {"changed": True}
    with pytest.raises(ValidationError, match="immutable"):
        version.save()
    assert PipelineVersion.objects.get(pk=version.pk).spec != {"changed": True}


def test_database_allows_one_running_regular_run(pipeline):
    version = pipeline.current_version
    Run.objects.create(pipeline=pipeline, version=version, state=RunState.RUNNING)
    with pytest.raises(IntegrityError), transaction.atomic():
        Run.objects.create(pipeline=pipeline, version=version, state=RunState.RUNNING)
    # Replays and backfills are not limited by it.
    Run.objects.create(
        pipeline=pipeline, version=version, state=RunState.RUNNING, kind="backfill"
    )


def test_second_run_waits_queued_until_the_first_ends(pipeline, sent):
    first = services.start_run(pipeline.pk)
    second = services.start_run(pipeline.pk)
    assert services.claim_run(first.pk) is True
    assert services.claim_run(second.pk) is False
    assert Run.objects.get(pk=second.pk).state == RunState.QUEUED
    services.stop_run(first.pk, RunState.FAILED, "test")
    # The end of the first run sends the plan of the queued one.
    assert ("plan", second.pk, second.correlation_id) in sent
    assert services.claim_run(second.pk) is True


def test_api_start_run_is_202_queued(api, pipeline, sent):
    response = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/runs/",
        {},
        format="json",
        HTTP_X_CORRELATION_ID="corr-1",
    )
    assert response.status_code == 202
    body = response.json()
    assert body["state"] == "queued"
    assert body["correlation_id"] == "corr-1"
    assert body["version"] == pipeline.current_version.number
    assert sent == [("plan", body["id"], "corr-1")]
    detail = api.get(f"/api/v1/runs/{body['id']}/").json()
    assert detail["chunks"] == {
        "pending": 0,
        "queued": 0,
        "running": 0,
        "done": 0,
        "skipped": 0,
        "quarantined": 0,
    }


def test_api_start_run_answers_as_the_run_serializer(api, pipeline, sent):
    from integration.api.serializers import RunSerializer

    response = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/runs/",
        {"params": {"a": 1}},
        format="json",
        HTTP_IDEMPOTENCY_KEY="k",
    )
    assert response.status_code == 202
    body = response.json()
    expected = RunSerializer(Run.objects.get(pk=body["id"])).data
    assert list(body) == list(expected) == RunSerializer.Meta.fields
    assert body == expected
    again = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/runs/",
        {"params": {"a": 1}},
        format="json",
        HTTP_IDEMPOTENCY_KEY="k",
    )
    assert (again.status_code, again.json()) == (200, body)


def test_api_start_run_is_one_statement_that_locks_the_pipeline(api, pipeline, sent):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    api.get("/api/v1/runs/")  # the token is checked (and remembered) first
    with CaptureQueriesContext(connection) as queries:
        response = api.post(
            f"/api/v1/pipelines/{pipeline.pk}/runs/",
            {},
            format="json",
            HTTP_IDEMPOTENCY_KEY="once",
        )
    assert response.status_code == 202
    # No BEGIN, SAVEPOINT or COMMIT: the insert is its own transaction.
    (statement,) = [q["sql"] for q in queries.captured_queries]
    assert 'FROM "integration_pipeline" p' in statement
    assert "FOR UPDATE OF p" in statement
    assert 'INSERT INTO "integration_run"' in statement
    assert "ON CONFLICT DO NOTHING" in statement
    assert '"steps"' not in statement
    assert '"spec"' not in statement
    assert sent == [("plan", response.json()["id"], response.json()["correlation_id"])]


def test_api_start_run_freezes_a_first_version(
    api, generator_connector, sqlite_sink, sent
):
    pipeline = Pipeline.objects.create(
        name=unique("p"),
        source=generator_connector,
        sink=sqlite_sink,
        steps=STEPS,
        sink_options={"table": "t"},
    )
    assert pipeline.current_version is None
    response = api.post(f"/api/v1/pipelines/{pipeline.pk}/runs/", {}, format="json")
    assert response.status_code == 202
    assert response.json()["version"] == 1
    pipeline.refresh_from_db()
    assert response.json()["version_hash"] == pipeline.current_version.content_hash


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("987654", {}, 404),
        ("not-a-number", {}, 404),
        ("987654", {"params": "not an object"}, 404),
        (None, {"params": "not an object"}, 400),
    ],
    ids=["missing", "not-an-id", "missing-and-bad-body", "bad-body"],
)
def test_api_start_run_refusals(api, pipeline, sent, path, body, status):
    url = f"/api/v1/pipelines/{path or pipeline.pk}/runs/"
    response = api.post(url, body, format="json")
    assert response.status_code == status
    if status == 400:
        assert "params" in response.json()
    assert sent == []


def test_api_start_run_on_paused_pipeline_is_409(api, pipeline, sent):
    Pipeline.objects.filter(pk=pipeline.pk).update(is_paused=True)
    response = api.post(f"/api/v1/pipelines/{pipeline.pk}/runs/", {}, format="json")
    assert response.status_code == 409
    assert sent == []


def test_api_unknown_pipeline_is_404(api):
    assert (
        api.post("/api/v1/pipelines/987654/runs/", {}, format="json").status_code == 404
    )
    assert api.get("/api/v1/runs/987654/").status_code == 404
    assert api.get("/api/v1/runs/987654/dead-letters/").status_code == 404


def test_api_pipeline_crud_creates_versions(api, generator_connector, sqlite_sink):
    body = {
        "name": unique("api-p"),
        "source": generator_connector.name,
        "sink": sqlite_sink.name,
        "steps": STEPS,
        "sink_options": {"table": "t"},
    }
    created = api.post("/api/v1/pipelines/", body, format="json")
    assert created.status_code == 201, created.content
    pid = created.json()["id"]
    assert created.json()["current_version"]["number"] == 1
    patched = api.patch(f"/api/v1/pipelines/{pid}/", {"chunk_rows": 3}, format="json")
    assert patched.json()["current_version"]["number"] == 2
    renamed = api.patch(
        f"/api/v1/pipelines/{pid}/", {"description": "d"}, format="json"
    )
    assert renamed.json()["current_version"]["number"] == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"source": "no-such-connector"}, "source"),
        ({"steps": {"type": "map"}}, "steps"),
        ({"steps": [{"type": "explode"}]}, "steps"),
        ({"sink_options": {"table": "t", "write_mode": "merge"}}, "sink_options"),
        ({"sink_options": {}}, "sink_options"),
        ({"source_options": {"unexpected": 1}}, "source_options"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"max_rejected_ratio": 1.5}, "max_rejected_ratio"),
    ],
    ids=[
        "unknown-source",
        "steps-not-list",
        "unknown-step",
        "bad-mode",
        "no-table",
        "unknown-option",
        "zero-chunk",
        "ratio-above-1",
    ],
)
def test_api_bad_pipeline_is_400_naming_the_field(
    api, generator_connector, sqlite_sink, change, field
):
    body = {
        "name": unique("bad-p"),
        "source": generator_connector.name,
        "sink": sqlite_sink.name,
        "steps": STEPS,
        "sink_options": {"table": "t"},
        **change,
    }
    response = api.post("/api/v1/pipelines/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()


def test_generator_cannot_be_a_sink(api, generator_connector):
    response = api.post(
        "/api/v1/pipelines/",
        {
            "name": unique("p"),
            "source": generator_connector.name,
            "sink": generator_connector.name,
            "steps": STEPS,
            "sink_options": {"table": "t"},
        },
        format="json",
    )
    assert response.status_code == 400
    assert "cannot be a sink" in response.json()["sink"][0]


def test_run_list_queries_do_not_grow_and_skip_heavy_json(api, pipeline, sent):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(5):
        services.start_run(pipeline.pk, kind="replay")
    with CaptureQueriesContext(connection) as queries:
        response = api.get("/api/v1/runs/")
    assert response.status_code == 200
    assert response.json()["count"] == 5
    selects = [
        q["sql"] for q in queries.captured_queries if "integration_run" in q["sql"]
    ]
    assert len(selects) == 2  # the count and the page
    assert all('"spec"' not in sql and '"steps"' not in sql for sql in selects)
    (count,) = [sql for sql in selects if "COUNT(" in sql]
    assert "JOIN" not in count  # the runs alone: both foreign keys are required


def test_run_list_rows_equal_the_list_serializer(api, pipeline, sent):
    from datetime import timedelta

    from django.utils import timezone

    from integration.api.serializers import RunListSerializer
    from integration.models import Run

    queued = services.start_run(pipeline.pk, kind="replay")
    ended = services.start_run(pipeline.pk, kind="replay")
    started = timezone.now() - timedelta(seconds=90)
    Run.objects.filter(pk=ended.pk).update(
        state="failed",
        records_read=10,
        records_rejected=3,
        error="boom",
        started_at=started,
        finished_at=started + timedelta(seconds=12.3456),
    )
    running = services.start_run(pipeline.pk, kind="replay")
    Run.objects.filter(pk=running.pk).update(state="running", started_at=started)
    listed = {row["id"]: row for row in api.get("/api/v1/runs/").json()["results"]}
    for run in Run.objects.filter(pk__in=[queued.pk, ended.pk, running.pk]):
        expected = RunListSerializer(run).data
        got = listed[run.pk]
        if run.pk == running.pk:  # still running: its duration grows between calls
            assert got.pop("duration_seconds") >= 90
            expected.pop("duration_seconds")
        assert got == expected
    assert listed[ended.pk]["rejected_ratio"] == 0.3
    assert listed[ended.pk]["duration_seconds"] == 12.346


def test_plain_run_list_pages_equal_the_querysets_pages(api, pipeline, sent):
    """An unfiltered page runs SQL compiled once per process; a filter that keeps
    every run goes through the querysets: same count, same rows, same links."""
    for _ in range(5):
        services.start_run(pipeline.pk, kind="replay")
    for page in (1, 2, 3):
        plain = api.get(f"/api/v1/runs/?page_size=2&page={page}").json()
        filtered = api.get(f"/api/v1/runs/?page_size=2&page={page}&state=queued").json()
        assert plain["count"] == filtered["count"] == 5
        assert plain["results"] == filtered["results"]
        assert len(plain["results"]) == (1 if page == 3 else 2)
    ids = [r["id"] for r in api.get("/api/v1/runs/").json()["results"]]
    assert ids == sorted(ids, reverse=True)  # newest first
    assert api.get("/api/v1/runs/?page=4&page_size=2").status_code == 404


def test_run_list_filters_apply_and_bad_values_are_400(api, pipeline, sent):
    from integration.models import Run

    first = services.start_run(pipeline.pk, kind="replay")
    second = services.start_run(pipeline.pk, kind="replay")
    Run.objects.filter(pk=second.pk).update(state="failed")
    assert api.get("/api/v1/runs/").json()["count"] == 2
    failed = api.get("/api/v1/runs/?state=failed").json()
    assert [r["id"] for r in failed["results"]] == [second.pk]
    assert failed["count"] == 1
    queued = api.get(f"/api/v1/runs/?pipeline={pipeline.name}&state=queued").json()
    assert [r["id"] for r in queued["results"]] == [first.pk]
    response = api.get("/api/v1/runs/?state=nonsense")
    assert response.status_code == 400
    assert "state" in response.json()


def test_api_start_run_checks_object_permissions_when_there_are_some(
    api, pipeline, sent, monkeypatch
):
    from rest_framework.permissions import BasePermission, IsAuthenticated

    from integration.api.views import PipelineViewSet

    class NotThisPipeline(BasePermission):
        def has_object_permission(self, request, view, obj):
            return obj.pk != pipeline.pk

    monkeypatch.setattr(
        PipelineViewSet, "permission_classes", [IsAuthenticated, NotThisPipeline]
    )
    response = api.post(f"/api/v1/pipelines/{pipeline.pk}/runs/", {}, format="json")
    assert response.status_code == 403
    assert sent == []
    assert not Run.objects.filter(pipeline=pipeline).exists()


def test_the_run_start_reads_the_pipeline_and_its_version_in_one_locked_query(
    pipeline, django_assert_num_queries
):
    version = pipeline.current_version
    with transaction.atomic():
        sql, _, _ = services._locked_pipeline_sql()
        assert sql.endswith("FOR UPDATE OF p")  # PostgreSQL: the pipeline row only
        with django_assert_num_queries(1):
            locked = services._locked_pipeline(pipeline.pk)
            assert (locked.pk, locked.name, locked.is_paused) == (
                pipeline.pk,
                pipeline.name,
                False,
            )
            assert locked.overlap_policy == pipeline.overlap_policy
            assert (
                locked.current_version.pk,
                locked.current_version.number,
                locked.current_version.content_hash,
            ) == (version.pk, version.number, version.content_hash)
        # Everything else is deferred, as `.only()` leaves it.
        assert "steps" in locked.get_deferred_fields()
        assert "spec" in locked.current_version.get_deferred_fields()
        with django_assert_num_queries(1):
            assert locked.steps == STEPS


def test_the_run_start_of_a_pipeline_without_a_version_freezes_one(
    generator_connector, sqlite_sink
):
    pipeline = _unversioned_pipeline(generator_connector, sqlite_sink)
    with transaction.atomic():
        assert services._locked_pipeline(pipeline.pk).current_version is None
    run = services.start_run(pipeline.pk)
    assert run.version.number == 1
    assert Pipeline.objects.get(pk=pipeline.pk).current_version_id == run.version_id


def test_the_run_start_of_no_pipeline_is_does_not_exist():
    with transaction.atomic(), pytest.raises(Pipeline.DoesNotExist):
        services._locked_pipeline(987654)


def test_the_inserted_run_is_the_row_the_database_holds(pipeline, sent, admin_user):
    run = services.start_run(
        pipeline.pk,
        correlation_id="corr-row",
        requested_by_id=admin_user.pk,
        params={"a": [1, "x"]},
        idempotency_key="row",
        request_hash="h" * 64,
    )
    stored = Run.objects.get(pk=run.pk)
    for field in Run._meta.concrete_fields:
        assert getattr(run, field.attname) == getattr(stored, field.attname), field
    assert run.get_deferred_fields() == set()
    assert (run.pipeline.name, run.version.number, run.version.content_hash) == (
        pipeline.name,
        pipeline.current_version.number,
        pipeline.current_version.content_hash,
    )
    assert sent == [("plan", run.pk, "corr-row")]


def test_a_schedule_start_takes_the_general_path(pipeline, sent):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        run = services.start_run(pipeline.pk, trigger="schedule")
    assert run.trigger == "schedule"
    assert not any("ON CONFLICT" in q["sql"] for q in queries.captured_queries)
    assert any("FOR UPDATE OF p" in q["sql"] for q in queries.captured_queries)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("same_body", [True, False], ids=["same-body", "other-bodies"])
def test_concurrent_requests_with_one_key_make_one_run(
    generator_connector, sqlite_sink, sent, same_body
):
    """Eight threads, each with its own connection, start the pipeline with one
    Idempotency-Key at once: one run; the others get it back (same body) or a
    conflict (another body)."""
    import threading

    from django.db import connection

    from integration.exceptions import IdempotencyConflictError

    pipeline = _unversioned_pipeline(generator_connector, sqlite_sink)
    services.freeze_version(pipeline)
    barrier = threading.Barrier(8)
    results: list[object] = []

    def start(n: int) -> None:
        try:
            barrier.wait()
            run = services.start_run(
                pipeline.pk,
                idempotency_key="shared",
                request_hash="same" if same_body else f"body-{n}",
            )
            results.append((run.pk, getattr(run, "replayed", False)))
        except IdempotencyConflictError as exc:
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=start, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (run,) = Run.objects.filter(pipeline=pipeline)
    created = [r for r in results if r == (run.pk, False)]
    assert len(results) == 8
    assert len(created) == 1
    if same_body:
        assert sorted(results) == sorted([(run.pk, False)] + [(run.pk, True)] * 7)
    else:
        assert sum(isinstance(r, IdempotencyConflictError) for r in results) == 7
    assert [s for s in sent if s[0] == "plan"] == [("plan", run.pk, run.correlation_id)]
