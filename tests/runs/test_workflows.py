"""Workflows: graph checks, the advance logic and failure policies, and a DAG that
survives a worker SIGKILL."""

from __future__ import annotations

import time

import pytest

from connectors.models import Connector
from integration import services, workflows
from integration.models import NodeRun, Pipeline, Run, Workflow, WorkflowRun
from tests.helpers import unique

STEPS = [{"type": "map", "fields": [{"name": "id", "expr": "id", "type": "integer"}]}]


def pipeline(sink, rows=20):
    source = Connector.objects.create(
        name=unique("gen"), kind="generator", config={"rows": rows}
    )
    p = Pipeline.objects.create(
        name=unique("p"),
        source=source,
        sink=sink,
        steps=STEPS,
        sink_options={"table": unique("t").replace("-", "_")},
        chunk_rows=10,
    )
    services.freeze_version(p)
    return p


def diamond(api, sink, **extra):
    """a -> (b, c) -> d"""
    names = {k: pipeline(sink).name for k in "abcd"}
    body = {
        "name": unique("wf"),
        "nodes": [
            {"key": "a", "kind": "pipeline", "pipeline": names["a"]},
            {
                "key": "b",
                "kind": "pipeline",
                "pipeline": names["b"],
                "depends_on": ["a"],
            },
            {
                "key": "c",
                "kind": "pipeline",
                "pipeline": names["c"],
                "depends_on": ["a"],
            },
            {
                "key": "d",
                "kind": "pipeline",
                "pipeline": names["d"],
                "depends_on": ["b", "c"],
            },
        ],
        **extra,
    }
    response = api.post("/api/v1/workflows/", body, format="json")
    assert response.status_code == 201, response.content
    return Workflow.objects.get(pk=response.json()["id"])


def states(wrun) -> dict[str, str]:
    return dict(
        NodeRun.objects.filter(workflow_run=wrun).values_list("node__key", "state")
    )


def end_run_of(wrun, key, state):
    nr = NodeRun.objects.get(workflow_run=wrun, node__key=key)
    Run.objects.filter(pk=nr.run_id).update(state=state)
    workflows.advance(wrun.pk)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (
            [
                {
                    "key": "a",
                    "kind": "http",
                    "config": {"connector": "x"},
                    "depends_on": ["b"],
                },
                {
                    "key": "b",
                    "kind": "http",
                    "config": {"connector": "x"},
                    "depends_on": ["a"],
                },
            ],
            "the nodes form a cycle",
        ),
        (
            [
                {
                    "key": "a",
                    "kind": "http",
                    "config": {"connector": "x"},
                    "depends_on": ["z"],
                }
            ],
            "node a: unknown dependencies z",
        ),
        (
            [
                {"key": "a", "kind": "http", "config": {"connector": "x"}},
                {"key": "a", "kind": "http", "config": {"connector": "x"}},
            ],
            "duplicate node keys: a",
        ),
        ([{"key": "a", "kind": "pipeline"}], "node a: a pipeline is required"),
        ([{"key": "a", "kind": "http", "config": {}}], "config.connector is required"),
        ([], "at least one node"),
    ],
    ids=["cycle", "unknown-dep", "duplicate", "no-pipeline", "no-connector", "empty"],
)
def test_bad_graph_is_400(api, nodes, message):
    response = api.post(
        "/api/v1/workflows/", {"name": unique("wf"), "nodes": nodes}, format="json"
    )
    assert response.status_code == 400
    assert message in str(response.json()["nodes"])


@pytest.mark.django_db
def test_diamond_runs_in_dependency_order(api, sqlite_sink, sent):
    workflow = diamond(api, sqlite_sink)
    response = api.post(f"/api/v1/workflows/{workflow.pk}/runs/")
    assert response.status_code == 202
    wrun = WorkflowRun.objects.get(pk=response.json()["id"])
    workflows.advance(wrun.pk)
    assert states(wrun) == {
        "a": "running",
        "b": "pending",
        "c": "pending",
        "d": "pending",
    }
    run_a = NodeRun.objects.get(workflow_run=wrun, node__key="a").run
    assert (run_a.trigger, run_a.correlation_id) == ("workflow", wrun.correlation_id)
    end_run_of(wrun, "a", "succeeded")
    assert states(wrun) == {
        "a": "succeeded",
        "b": "running",
        "c": "running",
        "d": "pending",
    }
    end_run_of(wrun, "b", "succeeded_with_errors")
    assert states(wrun)["d"] == "pending"
    end_run_of(wrun, "c", "succeeded")
    end_run_of(wrun, "d", "succeeded")
    wrun.refresh_from_db()
    assert wrun.state == "succeeded"
    detail = api.get(f"/api/v1/workflow-runs/{wrun.pk}/").json()
    assert [(n["key"], n["state"]) for n in detail["nodes"]] == [
        ("a", "succeeded"),
        ("b", "succeeded"),
        ("c", "succeeded"),
        ("d", "succeeded"),
    ]


@pytest.mark.django_db
def test_stop_all_cancels_the_parallel_branch(api, sqlite_sink, sent):
    workflow = diamond(api, sqlite_sink, failure_policy="stop_all")
    wrun = workflows.start_workflow(workflow.pk)
    workflows.advance(wrun.pk)
    end_run_of(wrun, "a", "succeeded")
    run_c = NodeRun.objects.get(workflow_run=wrun, node__key="c").run
    end_run_of(wrun, "b", "failed")
    assert states(wrun) == {
        "a": "succeeded",
        "b": "failed",
        "c": "cancelled",
        "d": "cancelled",
    }
    assert Run.objects.get(pk=run_c.pk).state == "cancelled"
    wrun.refresh_from_db()
    assert wrun.state == "failed"
    assert "b" in wrun.error


@pytest.mark.django_db
def test_continue_policy_lets_independent_branches_finish(api, sqlite_sink, sent):
    workflow = diamond(api, sqlite_sink, failure_policy="continue")
    wrun = workflows.start_workflow(workflow.pk)
    workflows.advance(wrun.pk)
    end_run_of(wrun, "a", "succeeded")
    end_run_of(wrun, "b", "failed")
    assert states(wrun) == {
        "a": "succeeded",
        "b": "failed",
        "c": "running",
        "d": "skipped",
    }
    end_run_of(wrun, "c", "succeeded")
    wrun.refresh_from_db()
    assert (wrun.state, wrun.error) == ("failed", "failed nodes: b")


@pytest.mark.django_db
def test_node_retry_policy(api, sqlite_sink, sent):
    workflow = diamond(api, sqlite_sink)
    workflow.nodes.filter(key="a").update(max_attempts=2, retry_delay_seconds=60)
    wrun = workflows.start_workflow(workflow.pk)
    workflows.advance(wrun.pk)
    end_run_of(wrun, "a", "failed")
    a = NodeRun.objects.get(workflow_run=wrun, node__key="a")
    assert (a.state, a.attempts, a.run_id) == ("pending", 1, None)
    assert a.not_before is not None
    workflows.advance(wrun.pk)  # too early: waits
    assert NodeRun.objects.get(pk=a.pk).state == "pending"
    NodeRun.objects.filter(pk=a.pk).update(not_before=None)
    workflows.advance(wrun.pk)
    a.refresh_from_db()
    assert (a.state, a.attempts) == ("running", 2)
    end_run_of(wrun, "a", "failed")
    assert states(wrun)["a"] == "failed"


@pytest.mark.e2e
@pytest.mark.slow
def test_diamond_survives_a_worker_sigkill(
    api, sqlite_sink, worker_factory, monkeypatch
):
    monkeypatch.setenv("CELERY_TASK_TIME_LIMIT", "20")
    monkeypatch.setenv("CELERY_VISIBILITY_TIMEOUT", "25")
    monkeypatch.setenv("CELERY_UNACKED_RESTORE_INTERVAL", "1")
    workflow = diamond(api, sqlite_sink)
    Pipeline.objects.filter(workflow_nodes__workflow=workflow).update(
        chunk_rows=2, max_in_flight=1
    )
    for p in Pipeline.objects.filter(workflow_nodes__workflow=workflow):
        services.freeze_version(p)
    first = worker_factory("doomed", concurrency=1)
    wrun = workflows.start_workflow(workflow.pk)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and states(wrun)["a"] != "succeeded":
        time.sleep(0.05)
    first.kill()
    assert WorkflowRun.objects.get(pk=wrun.pk).state == "running"
    worker_factory("rescuer", concurrency=2)
    # A message the killed worker had reserved comes back after the visibility
    # timeout; one it was about to publish when it died is resent by the
    # reconciler, which beat runs in production (here, like beat, every 5 s).
    from integration import housekeeping

    deadline = time.monotonic() + 180
    next_reconcile = time.monotonic() + 5
    while time.monotonic() < deadline:
        wrun.refresh_from_db()
        if wrun.state != "running":
            break
        if time.monotonic() > next_reconcile:
            housekeeping.reconcile(stale_seconds=40)
            next_reconcile = time.monotonic() + 5
        time.sleep(0.25)
    assert wrun.state == "succeeded", (wrun.error, states(wrun))
    for nr in NodeRun.objects.filter(workflow_run=wrun).select_related("run"):
        assert (nr.run.state, nr.run.records_written) == ("succeeded", 20)


@pytest.mark.django_db
def test_workflow_schedule_is_kept_in_step_with_beat(api, sqlite_sink, sent):
    from django_celery_beat.models import PeriodicTask

    workflow = diamond(api, sqlite_sink)
    response = api.patch(
        f"/api/v1/workflows/{workflow.pk}/",
        {"schedule_cron": "0 3 * * *", "schedule_timezone": "America/New_York"},
        format="json",
    )
    assert response.status_code == 200, response.content
    workflow.refresh_from_db()
    task = PeriodicTask.objects.get(pk=workflow.periodic_task_id)
    assert (task.task, task.args, task.crontab.hour) == (
        "integration.scheduled_workflow",
        f"[{workflow.pk}]",
        "3",
    )
    assert NodeRun.objects.filter(workflow_run__workflow=workflow).count() == 0
    bad = api.patch(
        f"/api/v1/workflows/{workflow.pk}/",
        {"schedule_cron": "61 * * * *"},
        format="json",
    )
    assert bad.status_code == 400
    assert "schedule_cron" in bad.json()


@pytest.mark.django_db
def test_event_trigger_starts_a_run_per_matching_event(
    api, sqlite_sink, sent, monkeypatch
):
    from connectors.exceptions import NotReadyError
    from connectors.plugins.kafka import KafkaPlugin

    events = Connector.objects.create(
        name=unique("events"),
        kind="kafka",
        config={"bootstrap_servers": "127.0.0.1:9"},
    )
    workflow = diamond(api, sqlite_sink)
    response = api.patch(
        f"/api/v1/workflows/{workflow.pk}/",
        {
            "event_trigger": {
                "connector": events.name,
                "topic": "files",
                "match": {"content_type": "text/csv"},
            }
        },
        format="json",
    )
    assert response.status_code == 200, response.content
    answers = [{"event": {"file_id": "f1"}, "source_ref": "files/0/4"}]
    calls = []

    def fake(cls, config, action, params, context=None):
        calls.append((action, params))
        if answers:
            return answers.pop(0)
        raise NotReadyError("nothing", retry_after=1)

    monkeypatch.setattr(KafkaPlugin, "run_action", classmethod(fake))
    from integration import tasks

    first = tasks.event_triggers()
    assert len(first) == 1
    assert WorkflowRun.objects.get(pk=first[0]).trigger == "event"
    assert tasks.event_triggers() == []
    assert calls[0] == (
        "wait_event",
        {
            "topic": "files",
            "group_id": f"dis-workflow-{workflow.pk}",
            "match": {"content_type": "text/csv"},
        },
    )
    bad = api.patch(
        f"/api/v1/workflows/{workflow.pk}/",
        {"event_trigger": {"connector": sqlite_sink.name, "topic": "x"}},
        format="json",
    )
    assert bad.status_code == 400
    assert "kafka connector" in str(bad.json())
