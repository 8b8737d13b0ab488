"""The window of chunks in flight, task settings, dead-letter listing, the admin."""

from __future__ import annotations

import pytest

from integration import services, tasks
from integration.models import ChunkRun, DeadLetter, Run
from tests.helpers import run_chunk_steps
from tests.runs.conftest import finalize_window_run

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def pipeline(window_pipeline):
    return window_pipeline


def in_flight(run) -> int:
    return ChunkRun.objects.filter(run=run, state__in=["queued", "running"]).count()


def test_window_keeps_at_most_n_chunks_in_flight(pipeline, sent):
    run = services.start_run(pipeline.pk)
    services.plan_run(run.pk)
    assert ChunkRun.objects.filter(run=run).count() == 10
    assert in_flight(run) == 3
    assert [c[2] for c in sent if c[0] == "chunk"] == [0, 1, 2]
    # Every finished chunk lets exactly one more in, lowest seq first.
    for _ in range(10):
        chunk = (
            ChunkRun.objects.filter(run=run, state__in=["queued", "running"])
            .order_by("seq")
            .first()
        )
        run_chunk_steps(run.pk, chunk.seq, chunk.attempt_token)
        assert in_flight(run) <= 3
    assert [c[2] for c in sent if c[0] == "chunk"] == list(range(10))
    finalize_window_run(run, sent)


def test_dead_letters_api_lists_the_runs_rejects(api, pipeline, sent):
    run = services.start_run(pipeline.pk)
    services.plan_run(run.pk)
    services.dispatch_chunks(run.pk, 10, run.correlation_id)
    for chunk in ChunkRun.objects.filter(run=run):
        run_chunk_steps(run.pk, chunk.seq, chunk.attempt_token)
    body = api.get(f"/api/v1/runs/{run.pk}/dead-letters/").json()
    assert body["count"] == 5
    first = body["results"][0]
    assert first["step"] == "validate"
    assert first["payload"] == {"id": "96", "label": "row-96"}
    assert first["source_ref"] == "gen#96"
    assert "id" in first["error"]
    assert "96" in first["error"]
    filtered = api.get("/api/v1/dead-letters/", {"run": run.pk, "step": "map"}).json()
    assert filtered["count"] == 0
    assert api.get("/api/v1/dead-letters/", {"state": "bogus"}).status_code == 400
    detail = api.get(f"/api/v1/runs/{run.pk}/").json()
    assert detail["chunks"]["done"] == 10
    assert detail["records_dead_lettered"] == 5


def test_chunk_tasks_are_crash_safe_and_retry_transient_errors():
    from celery.exceptions import SoftTimeLimitExceeded
    from django.db import InterfaceError, OperationalError

    from connectors.exceptions import TransientError
    from transforms.engine import EngineInterrupted

    chunk_tasks = (
        tasks.process_chunk,
        tasks.extract_chunk,
        tasks.transform_chunk,
        tasks.load_chunk,
    )
    for task in chunk_tasks:
        assert task.acks_late is True
        assert task.reject_on_worker_lost is True
        assert TransientError in task.autoretry_for
        assert EngineInterrupted in task.autoretry_for
        assert SoftTimeLimitExceeded in task.autoretry_for
        assert {OperationalError, InterfaceError} <= set(task.autoretry_for)
        assert task.retry_jitter is True
        assert task.retry_backoff
        assert 0 < task.soft_time_limit < task.time_limit


def test_admin_run_now_queues_a_run(client, admin_user_obj, pipeline, sent):
    client.force_login(admin_user_obj)
    response = client.post(
        "/admin/integration/pipeline/",
        {"action": "run_now", "_selected_action": [pipeline.pk]},
    )
    assert response.status_code == 302
    run = Run.objects.get(pipeline=pipeline)
    assert (run.state, run.trigger, run.requested_by_id) == (
        "queued",
        "manual",
        admin_user_obj.pk,
    )
    assert sent == [("plan", run.pk, run.correlation_id)]


@pytest.mark.parametrize(
    "url",
    [
        "/admin/connectors/connector/?q=x&kind=generator",
        "/admin/connectors/credential/?q=x",
        "/admin/integration/pipeline/?q=x&mode=batch",
        "/admin/integration/pipelineversion/?q=x",
        "/admin/integration/run/?q=x&state=running",
        "/admin/integration/chunkrun/?state=done",
        "/admin/integration/deadletter/?q=x&state=open",
        "/admin/knox/authtoken/",
        "/admin/integration/pipeline/add/",
        "/admin/connectors/connector/add/",
    ],
)
def test_admin_pages_load(client, admin_user_obj, pipeline, url):
    client.force_login(admin_user_obj)
    assert client.get(url).status_code == 200


def test_admin_run_page_shows_chunks(client, admin_user_obj, pipeline, sent):
    run = services.start_run(pipeline.pk)
    services.plan_run(run.pk)
    DeadLetter.objects.create(
        run=run, pipeline=pipeline, chunk_seq=0, step="map", error="e", payload={}
    )
    client.force_login(admin_user_obj)
    page = client.get(f"/admin/integration/run/{run.pk}/change/")
    assert page.status_code == 200
    assert b"Chunk run" in page.content


def test_run_detail_is_what_the_run_serializer_gives(api, pipeline, sent):
    """`GET /api/v1/runs/{id}/` renders from plain rows (a poll's fast path):
    the same fields, values and order as `RunSerializer`, before planning, while
    chunks run (with reference and drift stats) and for a missing run."""
    from integration.api.serializers import RunSerializer

    run = services.start_run(pipeline.pk)

    def serialized() -> dict:
        return dict(RunSerializer(Run.objects.get(pk=run.pk)).data)

    def same(body: dict, expected: dict) -> bool:
        """Equal, in the same order; a running run's duration is read twice."""
        ran, should = body.pop("duration_seconds"), expected.pop("duration_seconds")
        close = (ran is None and should is None) or abs(ran - should) < 5
        return close and body == expected and list(body) == list(expected)

    body = api.get(f"/api/v1/runs/{run.pk}/").json()
    assert same(body, serialized())
    assert body["chunks"]["pending"] == 0
    assert body["stats"] == {"references": {}}

    services.plan_run(run.pk)
    first = ChunkRun.objects.filter(run=run).order_by("seq").first()
    run_chunk_steps(run.pk, first.seq, first.attempt_token)
    ChunkRun.objects.filter(run=run, seq=1).update(
        stats={
            "references": {"airlines": {"source": "miss", "age_seconds": 2.5}},
            "drift": {
                "policy": "evolve",
                "new_columns": ["extra"],
                "type_changes": [],
                "rejected": 0,
                "held": 0,
            },
        }
    )
    ChunkRun.objects.filter(run=run, seq=2).update(
        stats={"references": {"airlines": {"source": "hit", "age_seconds": 7.0}}}
    )
    body = api.get(f"/api/v1/runs/{run.pk}/").json()
    assert same(body, serialized())
    assert body["chunks"] == {
        "pending": 6,
        "queued": 3,
        "running": 0,
        "done": 1,
        "skipped": 0,
        "quarantined": 0,
    }
    assert body["stats"]["references"] == {
        "airlines": {"hits": 1, "misses": 1, "max_age_seconds": 7.0}
    }
    assert body["stats"]["drift"]["new_columns"] == ["extra"]
    assert body["records_read"] == 10
    # With a filter the detail is read through the filtered queryset, as DRF's
    # get_object() does: a run the filter excludes is a 404.
    filtered = api.get(f"/api/v1/runs/{run.pk}/?state=running").json()
    assert same(filtered, serialized())
    assert api.get(f"/api/v1/runs/{run.pk}/?state=failed").status_code == 404
    assert api.get("/api/v1/runs/999999999/").status_code == 404
    assert api.get("/api/v1/runs/x/").status_code == 404
