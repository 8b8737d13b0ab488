"""`GET /metrics`: the service's state for Prometheus (integration/metrics.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import OperationalError
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from config.celery_app import app as celery_app
from integration import metrics, services
from integration.choices import DeadLetterState, RunState
from integration.models import DeadLetter, Pipeline, Run
from tests.conftest import purge_broker
from tests.helpers import unique

pytestmark = pytest.mark.django_db

STEPS = [{"type": "map", "fields": [{"name": "id", "expr": "id", "type": "integer"}]}]
#: Prometheus scrapes a pod by its IP: not a host DJANGO_ALLOWED_HOSTS lists.
POD_HOST = "10.42.7.19:8000"


@pytest.fixture
def make_pipeline(generator_connector, sqlite_sink):
    def make() -> Pipeline:
        pipeline = Pipeline.objects.create(
            name=unique("metrics"),
            source=generator_connector,
            sink=sqlite_sink,
            steps=STEPS,
            sink_options={"table": "t"},
        )
        services.freeze_version(pipeline)
        return pipeline

    return make


def _run(pipeline: Pipeline, state: str, **fields) -> Run:
    return Run.objects.create(
        pipeline=pipeline,
        version=pipeline.current_version,
        state=state,
        correlation_id=unique("cid"),
        **fields,
    )


def _scrape(client: Client | None = None, **headers) -> dict:
    response = (client or Client()).get("/metrics", HTTP_HOST=POD_HOST, **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_active_runs_and_the_age_of_the_oldest(make_pipeline):
    busy, idle = make_pipeline(), make_pipeline()
    now = timezone.now()
    for age in (30, 600):
        run = _run(busy, RunState.QUEUED)
        Run.objects.filter(pk=run.pk).update(created_at=now - dt.timedelta(seconds=age))
    _run(
        busy,
        RunState.RUNNING,
        started_at=now,
        records_read=120,
        records_written=100,
        records_rejected=20,
        records_dead_lettered=20,
        chunks_total=5,
        chunks_done=2,
    )
    _run(idle, RunState.SUCCEEDED, started_at=now, finished_at=now)
    samples = _scrape()
    name = busy.name
    assert _value(samples, "dis_runs_active", pipeline=name, state="queued") == 2
    assert _value(samples, "dis_runs_active", pipeline=name, state="running") == 1
    oldest = _value(
        samples, "dis_runs_active_oldest_age_seconds", pipeline=name, state="queued"
    )
    assert 600 <= oldest < 700
    # The running run's progress: records so far, chunks planned and done.
    progress = {
        outcome: _value(
            samples, "dis_runs_active_records", pipeline=name, outcome=outcome
        )
        for outcome in metrics.OUTCOMES
    }
    assert progress == {
        "read": 120,
        "written": 100,
        "rejected": 20,
        "filtered": 0,
        "deduplicated": 0,
        "dead_lettered": 20,
    }
    for progress_label, n in (("total", 5), ("done", 2)):
        got = _value(
            samples, "dis_runs_active_chunks", pipeline=name, progress=progress_label
        )
        assert got == n
    # A pipeline with nothing active has no active series at all.
    assert not [k for k in samples if k[0] == "dis_runs_active" and idle.name in str(k)]


def test_the_last_finished_run_and_the_last_success(make_pipeline):
    pipeline = make_pipeline()
    t0 = timezone.now().replace(microsecond=0) - dt.timedelta(hours=2)
    _run(
        pipeline,
        RunState.SUCCEEDED,
        started_at=t0,
        finished_at=t0 + dt.timedelta(seconds=90),
        records_read=100,
        records_written=100,
    )
    _run(
        pipeline,
        RunState.FAILED,
        started_at=t0 + dt.timedelta(hours=1),
        finished_at=t0 + dt.timedelta(hours=1, seconds=12),
        records_read=40,
        records_written=25,
        records_rejected=5,
        records_dead_lettered=5,
        records_filtered=10,
    )
    _run(pipeline, RunState.QUEUED)  # not finished: not the last finished run
    samples = _scrape()
    name = pipeline.name
    last = t0 + dt.timedelta(hours=1, seconds=12)
    assert (
        _value(
            samples, "dis_pipeline_last_run_finished_timestamp_seconds", pipeline=name
        )
        == last.timestamp()
    )
    assert _value(samples, "dis_pipeline_last_run_state", pipeline=name, state="failed")
    assert (
        _value(samples, "dis_pipeline_last_run_state", pipeline=name, state="succeeded")
        is None
    )
    assert (
        _value(samples, "dis_pipeline_last_run_duration_seconds", pipeline=name) == 12
    )
    expected = {"read": 40, "written": 25, "rejected": 5, "filtered": 10}
    expected |= {"dead_lettered": 5, "deduplicated": 0}
    for outcome, n in expected.items():
        got = _value(
            samples, "dis_pipeline_last_run_records", pipeline=name, outcome=outcome
        )
        assert got == n, outcome
    success = (t0 + dt.timedelta(seconds=90)).timestamp()
    assert (
        _value(samples, "dis_pipeline_last_success_timestamp_seconds", pipeline=name)
        == success
    )


def test_open_dead_letters_per_pipeline(make_pipeline):
    pipeline = make_pipeline()
    run = _run(pipeline, RunState.SUCCEEDED_WITH_ERRORS)
    for state in (DeadLetterState.OPEN,) * 3 + (
        DeadLetterState.REPLAYED,
        DeadLetterState.DISCARDED,
    ):
        DeadLetter.objects.create(
            run=run,
            pipeline=pipeline,
            chunk_seq=0,
            step="map",
            error="bad",
            payload={"id": "x"},
            state=state,
        )
    samples = _scrape()
    assert _value(samples, "dis_dead_letters_open", pipeline=pipeline.name) == 3


def test_queue_depth_counts_messages_no_worker_took():
    purge_broker()
    try:
        before = _scrape()
        assert _value(before, "dis_broker_up") == 1
        for _ in range(3):
            celery_app.send_task("integration.tests.never_run", queue="io")
        after = _scrape()
        for queue, added in (("io", 3), ("cpu", 0), ("control", 0)):
            was = _value(before, "dis_broker_queue_messages", queue=queue)
            now = _value(after, "dis_broker_queue_messages", queue=queue)
            assert now - was == added, queue
    finally:
        purge_broker()


def test_a_scrape_is_three_queries_and_one_per_pipeline(
    make_pipeline, django_assert_num_queries
):
    for _ in range(3):
        pipeline = make_pipeline()
        _run(pipeline, RunState.SUCCEEDED, finished_at=timezone.now())
        _run(pipeline, RunState.QUEUED)
    client = Client()
    _scrape(client)  # the registry, built once per process
    # Active runs, the pipelines, each one's last run, open dead letters.
    with django_assert_num_queries(3 + Pipeline.objects.count()):
        _scrape(client)


def test_the_database_down_is_a_zero_not_an_error(monkeypatch, make_pipeline):
    _run(make_pipeline(), RunState.QUEUED)

    def down(now):
        raise OperationalError("connection refused")

    monkeypatch.setattr(metrics, "_database_metrics", down)
    samples = _scrape()
    assert _value(samples, "dis_metadata_database_up") == 0
    assert not [k for k in samples if k[0] == "dis_runs_active"]
    assert _value(samples, "dis_broker_up") == 1


def test_the_broker_down_is_a_zero_not_an_error(monkeypatch):
    def down():
        raise ConnectionRefusedError("broker")

    monkeypatch.setattr(metrics, "_queue_depths", down)
    samples = _scrape()
    assert _value(samples, "dis_broker_up") == 0
    assert _value(samples, "dis_metadata_database_up") == 1


def test_a_token_when_configured(settings):
    settings.DIS_METRICS_TOKEN = "scrape-secret"
    client = Client()
    assert client.get("/metrics", HTTP_HOST=POD_HOST).status_code == 401
    wrong = client.get("/metrics", HTTP_HOST=POD_HOST, HTTP_AUTHORIZATION="Bearer nope")
    assert wrong.status_code == 401
    assert wrong["WWW-Authenticate"].startswith("Bearer")
    assert b"scrape-secret" not in wrong.content
    _scrape(client, HTTP_AUTHORIZATION="Bearer scrape-secret")


def test_only_get(settings):
    response = Client().post("/metrics", HTTP_HOST=POD_HOST)
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"


def test_other_paths_still_check_the_host():
    # The exemption is /metrics only: the API still refuses an unknown host.
    assert Client().get("/healthz", HTTP_HOST=POD_HOST).status_code == 400


def test_the_endpoint_is_in_the_openapi_schema(client):
    from config.middleware import MetricsMiddleware

    schema = client.get("/api/schema/?format=json")
    assert schema.status_code == 200, schema.content
    operation = schema.json()["paths"][MetricsMiddleware.PATH]["get"]
    assert set(operation["responses"]) == {"200", "401"}
    assert {"metricsToken": []} in operation["security"]
