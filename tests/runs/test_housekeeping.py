"""Reconciler, quarantine, run time limits, retention, schedules, CLI."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from connectors.models import Connector
from integration import housekeeping, services, tasks
from integration.models import ChunkRun, DeadLetter, Pipeline, Run
from tests.helpers import run_chunk_steps, unique, wait_for_run

STEPS = [{"type": "map", "fields": [{"name": "id", "expr": "id", "type": "integer"}]}]


def generator_pipeline(sink, *, rows=50, chunk_rows=10, kind="generator", **config):
    source = Connector.objects.create(
        name=unique(kind), kind=kind, config={"rows": rows, **config}
    )
    pipeline = Pipeline.objects.create(
        name=unique("p"),
        source=source,
        sink=sink,
        steps=STEPS,
        sink_options={"table": unique("t").replace("-", "_")},
        chunk_rows=chunk_rows,
        max_in_flight=2,
    )
    services.freeze_version(pipeline)
    return pipeline


def run_chunk(run_id: int, seq: int) -> None:
    token = ChunkRun.objects.get(run_id=run_id, seq=seq).attempt_token
    run_chunk_steps(run_id, seq, token)


@pytest.mark.django_db(transaction=True)
def test_reconciler_resends_lost_chunks_and_plans(sqlite_sink, sent):
    pipeline = generator_pipeline(sqlite_sink)
    run = services.start_run(pipeline.pk)
    # The plan message was lost: nothing happens until the reconciler notices.
    assert housekeeping.reconcile(stale_seconds=3600).plans_resent == []
    report = housekeeping.reconcile(stale_seconds=0)
    assert report.plans_resent == [run.pk]
    services.plan_run(run.pk)
    lost = {
        c.seq: str(c.attempt_token)
        for c in ChunkRun.objects.filter(run=run, state="queued")
    }
    assert sorted(lost) == [0, 1]
    # The broker lost both chunk messages too.
    report = housekeeping.reconcile(stale_seconds=0)
    assert sorted(report.chunks_resent) == [(run.pk, 0), (run.pk, 1)]
    fresh = {
        c.seq: str(c.attempt_token)
        for c in ChunkRun.objects.filter(run=run, state="queued")
    }
    assert all(fresh[s] != lost[s] for s in lost)
    # A late original attempt is fenced out; the resent ones complete the run.
    tasks.extract_chunk(run.pk, 0, lost[0])
    assert ChunkRun.objects.get(run=run, seq=0).state == "queued"
    for _ in range(5):
        for chunk in ChunkRun.objects.filter(run=run, state__in=["queued", "running"]):
            run_chunk(run.pk, chunk.seq)
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert (run.state, run.records_written) == ("succeeded", 50)


@pytest.mark.django_db(transaction=True)
def test_run_over_its_time_limit_fails_with_the_reason(sqlite_sink, sent):
    pipeline = generator_pipeline(sqlite_sink)
    Pipeline.objects.filter(pk=pipeline.pk).update(max_run_seconds=60)
    run = services.start_run(pipeline.pk)
    services.plan_run(run.pk)
    Run.objects.filter(pk=run.pk).update(
        started_at=timezone.now() - timedelta(seconds=61)
    )
    report = housekeeping.reconcile()
    assert report.runs_timed_out == [run.pk]
    run.refresh_from_db()
    assert run.state == "failed"
    assert "exceeded the pipeline's time limit of 60 s" in run.error


@pytest.mark.django_db(transaction=True)
def test_purge_honours_retention(sqlite_sink, sent, settings):
    pipeline = generator_pipeline(sqlite_sink)
    old, recent = services.start_run(pipeline.pk), services.start_run(pipeline.pk)
    long_ago = timezone.now() - timedelta(days=100)
    Run.objects.filter(pk=old.pk).update(state="succeeded", finished_at=long_ago)
    Run.objects.filter(pk=recent.pk).update(
        state="succeeded", finished_at=timezone.now()
    )
    stale_letter = DeadLetter.objects.create(
        run=recent, pipeline=pipeline, chunk_seq=0, step="map", error="e", payload={}
    )
    DeadLetter.objects.filter(pk=stale_letter.pk).update(
        created_at=timezone.now() - timedelta(days=31)
    )
    fresh_letter = DeadLetter.objects.create(
        run=recent, pipeline=pipeline, chunk_seq=0, step="map", error="e", payload={}
    )
    report = housekeeping.purge()
    assert (report.runs, report.dead_letters) == (1, 1)
    assert not Run.objects.filter(pk=old.pk).exists()
    assert list(
        DeadLetter.objects.filter(pipeline=pipeline).values_list("pk", flat=True)
    ) == [fresh_letter.pk]


@pytest.mark.django_db
def test_schedule_is_kept_in_step_with_beat(api, generator_connector, sqlite_sink):
    body = {
        "name": unique("sched"),
        "source": generator_connector.name,
        "sink": sqlite_sink.name,
        "steps": STEPS,
        "sink_options": {"table": "t"},
        "schedule_cron": "*/15 2 * * 1-5",
        "schedule_timezone": "Europe/Paris",
    }
    created = api.post("/api/v1/pipelines/", body, format="json")
    assert created.status_code == 201, created.content
    pipeline = Pipeline.objects.get(pk=created.json()["id"])
    task = PeriodicTask.objects.get(pk=pipeline.periodic_task_id)
    assert (task.task, task.args, task.enabled) == (
        "integration.scheduled_run",
        f"[{pipeline.pk}]",
        True,
    )
    assert (task.crontab.minute, task.crontab.hour, task.crontab.day_of_week) == (
        "*/15",
        "2",
        "1-5",
    )
    assert str(task.crontab.timezone) == "Europe/Paris"
    api.patch(f"/api/v1/pipelines/{pipeline.pk}/", {"is_paused": True}, format="json")
    assert PeriodicTask.objects.get(pk=task.pk).enabled is False
    api.patch(
        f"/api/v1/pipelines/{pipeline.pk}/",
        {"schedule_cron": "", "schedule_interval_seconds": 300, "is_paused": False},
        format="json",
    )
    task = PeriodicTask.objects.get(pk=task.pk)
    assert (task.interval.every, task.crontab, task.enabled) == (300, None, True)
    api.patch(
        f"/api/v1/pipelines/{pipeline.pk}/",
        {"schedule_interval_seconds": None},
        format="json",
    )
    assert not PeriodicTask.objects.filter(pk=task.pk).exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schedule_cron": "* * *"}, "schedule_cron"),
        ({"schedule_cron": "99 * * * *"}, "schedule_cron"),
        (
            {"schedule_cron": "* * * * *", "schedule_interval_seconds": 5},
            "schedule_cron",
        ),
        ({"schedule_timezone": "Mars/Olympus"}, "schedule_timezone"),
    ],
    ids=["three-fields", "minute-99", "both", "bad-zone"],
)
def test_bad_schedule_is_400(api, generator_connector, sqlite_sink, change, field):
    body = {
        "name": unique("sched"),
        "source": generator_connector.name,
        "sink": sqlite_sink.name,
        "steps": STEPS,
        "sink_options": {"table": "t"},
        **change,
    }
    response = api.post("/api/v1/pipelines/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.django_db
def test_scheduled_run_skips_on_overlap(generator_connector, sqlite_sink, sent):
    pipeline = generator_pipeline(sqlite_sink)
    Pipeline.objects.filter(pk=pipeline.pk).update(overlap_policy="skip")
    first = tasks.scheduled_run(pipeline.pk)
    assert Run.objects.get(pk=first).trigger == "schedule"
    assert tasks.scheduled_run(pipeline.pk) is None
    Pipeline.objects.filter(pk=pipeline.pk).update(overlap_policy="queue")
    assert tasks.scheduled_run(pipeline.pk) != first


@pytest.mark.e2e
@pytest.mark.slow
def test_chunk_that_kills_its_worker_is_quarantined(
    worker_factory, sqlite_sink, monkeypatch, tmp_path
):
    monkeypatch.setenv(
        "DIS_CONNECTOR_PATHS", "crashing=tests.faults.plugins:CrashingPlugin"
    )
    from connectors import registry

    registry.available_kinds.cache_clear()
    registry.get_plugin.cache_clear()
    try:
        doomed = generator_pipeline(
            sqlite_sink, rows=40, chunk_rows=10, kind="crashing", crash_chunk=1
        )
        healthy = generator_pipeline(sqlite_sink, rows=40, chunk_rows=10)
        worker_factory(concurrency=2)
        bad_run = services.start_run(doomed.pk)
        good_run = services.start_run(healthy.pk)
        good_run = wait_for_run(good_run.pk, timeout=120)
        bad_run = wait_for_run(bad_run.pk, timeout=120)
    finally:
        registry.available_kinds.cache_clear()
        registry.get_plugin.cache_clear()
    assert (good_run.state, good_run.records_written) == ("succeeded", 40)
    assert bad_run.state == "failed"
    assert "chunk(s) 1 quarantined" in bad_run.error
    states = dict(ChunkRun.objects.filter(run=bad_run).values_list("seq", "state"))
    assert states == {0: "done", 1: "quarantined", 2: "done", 3: "done"}
    (letter,) = DeadLetter.objects.filter(run=bad_run, error_class="quarantine")
    assert letter.step == "chunk"
    assert "killed its worker 3 times during process" in letter.error


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_run_pipeline_wait_and_exit_status(worker_factory, sqlite_sink, capsys):
    good = generator_pipeline(sqlite_sink, rows=30)
    worker_factory(concurrency=1)
    call_command("run_pipeline", good.name, "--wait", "--timeout", "120")
    out = capsys.readouterr().out
    assert "succeeded: read 30, written 30, rejected 0" in out
    bad = generator_pipeline(sqlite_sink, rows=30)
    bad.steps = [
        {"type": "map", "fields": [{"name": "id", "expr": "label", "type": "integer"}]}
    ]
    bad.max_rejected_ratio = 0.0
    bad.save()
    services.freeze_version(bad)
    with pytest.raises(CommandError, match=r"run \d+ failed"):
        call_command("run_pipeline", bad.name, "--wait", "--timeout", "120")
    run = Run.objects.filter(pipeline=bad).get()
    with pytest.raises(CommandError, match="already ended"):
        call_command("cancel_run", str(run.pk))
    bad.steps = STEPS
    bad.save()
    services.freeze_version(bad)
    call_command(
        "resume_run", str(run.pk), "--current-version", "--wait", "--timeout", "120"
    )
    assert "succeeded: read 30, written 30" in capsys.readouterr().out
