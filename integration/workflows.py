"""Workflows: a DAG of pipeline runs and built-in actions, driven by the database.

`advance()` looks at a workflow run's nodes, settles the ones whose work ended,
applies retries and the failure policy, and starts every node whose dependencies
all succeeded. It is idempotent and serialised per workflow run (a row lock), so it
can be sent as often as needed: when a node's pipeline run or action ends, and by
the reconciler — which is how a workflow survives restarts and lost messages.
"""

from __future__ import annotations

from datetime import timedelta
from graphlib import CycleError, TopologicalSorter
from typing import Any

import structlog
from celery import signature
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from config import correlation
from connectors.exceptions import NotReadyError
from integration import orchestration, services
from integration.choices import (
    NODE_FINISHED,
    TERMINAL_STATES,
    FailurePolicy,
    NodeKind,
    NodeState,
    RunState,
    RunTrigger,
    WorkflowRunState,
)
from integration.exceptions import PipelinePausedError
from integration.models import (
    NodeRun,
    Pipeline,
    Run,
    Workflow,
    WorkflowNode,
    WorkflowRun,
)

logger = structlog.get_logger(__name__)

SUCCESSFUL_RUN_STATES = (RunState.SUCCEEDED, RunState.SUCCEEDED_WITH_ERRORS)
ACTION_KINDS = (NodeKind.HTTP, NodeKind.SQL, NodeKind.WAIT_EVENT)
#: How long a wait_event node waits by default before it fails.
DEFAULT_WAIT_SECONDS = 3600


# --- Definition -------------------------------------------------------------------


def validate_nodes(nodes: list[dict[str, Any]]) -> list[str]:
    """Check a workflow's nodes; returns their keys in a dependency order.

    Raises:
        ValidationError: under `nodes`, naming the node: duplicate keys, unknown
            dependencies, a cycle, a kind without what it needs.
    """
    keys = [n["key"] for n in nodes]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValidationError(
            {"nodes": f"duplicate node keys: {', '.join(duplicates)}"}
        )
    graph: dict[str, set[str]] = {}
    for node in nodes:
        deps = set(node.get("depends_on") or [])
        unknown = ", ".join(sorted(deps - set(keys)))
        if unknown:
            raise ValidationError(
                {"nodes": f"node {node['key']}: unknown dependencies {unknown}"}
            )
        if node["key"] in deps:
            raise ValidationError({"nodes": f"node {node['key']} depends on itself"})
        kind = node["kind"]
        if kind == NodeKind.PIPELINE and not node.get("pipeline"):
            raise ValidationError(
                {"nodes": f"node {node['key']}: a pipeline is required"}
            )
        if kind in ACTION_KINDS and not (node.get("config") or {}).get("connector"):
            raise ValidationError(
                {"nodes": f"node {node['key']}: config.connector is required"}
            )
        graph[node["key"]] = deps
    try:
        return list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise ValidationError({"nodes": f"the nodes form a cycle: {cycle}"}) from None


def save_workflow(workflow: Workflow, nodes: list[dict[str, Any]]) -> Workflow:
    """Save a workflow with exactly these nodes (validated first), and keep its
    schedule in step with celery-beat."""
    validate_nodes(nodes)
    services.validate_schedule(workflow)
    validate_event_trigger(workflow.event_trigger)
    with transaction.atomic():
        workflow.save()
        keep = {n["key"] for n in nodes}
        workflow.nodes.exclude(key__in=keep).delete()
        for spec in nodes:
            WorkflowNode.objects.update_or_create(
                workflow=workflow,
                key=spec["key"],
                defaults={
                    "kind": spec["kind"],
                    "pipeline": spec.get("pipeline"),
                    "config": spec.get("config") or {},
                    "depends_on": sorted(spec.get("depends_on") or []),
                    "max_attempts": spec.get("max_attempts", 1),
                    "retry_delay_seconds": spec.get("retry_delay_seconds", 30),
                },
            )
        services.sync_schedule(workflow)
    return workflow


def validate_event_trigger(trigger: dict[str, Any]) -> None:
    """An event trigger names a kafka connector, a topic and the fields to match.

    Raises:
        ValidationError: under `event_trigger`.
    """
    from connectors.models import Connector

    if not trigger:
        return
    if not isinstance(trigger, dict) or not trigger.get("topic"):
        raise ValidationError({"event_trigger": "needs a connector and a topic"})
    connector = Connector.objects.filter(name=trigger.get("connector")).first()
    if connector is None or connector.kind != "kafka":
        raise ValidationError(
            {"event_trigger": "connector must name a kafka connector"}
        )
    if not isinstance(trigger.get("match", {}), dict):
        raise ValidationError({"event_trigger": "match must be an object"})


def fire_event_triggers() -> list[int]:
    """Start a run of each workflow whose trigger event arrived (one per event).

    Called periodically by beat; the event is in the run's first log lines and the
    kafka group's offsets keep each event from starting two runs.
    """
    from connectors.exceptions import ConnectorError
    from connectors.models import Connector

    started = []
    for workflow in Workflow.objects.filter(is_paused=False).exclude(event_trigger={}):
        trigger = workflow.event_trigger
        connector = Connector.objects.filter(name=trigger.get("connector")).first()
        if connector is None:
            continue
        params = {
            "topic": trigger["topic"],
            "group_id": f"dis-workflow-{workflow.pk}",
            "match": trigger.get("match", {}),
        }
        try:
            result = connector.plugin.run_action(
                connector.loaded_config(), "wait_event", params, connector.context()
            )
        except NotReadyError:
            continue
        except ConnectorError as exc:
            logger.warning(
                "event_trigger_failed", workflow=workflow.name, error=str(exc)
            )
            continue
        wrun = start_workflow(workflow.pk, trigger=RunTrigger.EVENT)
        logger.info(
            "workflow_triggered_by_event",
            workflow=workflow.name,
            workflow_run=wrun.pk,
            event_ref=result.get("source_ref"),
        )
        started.append(wrun.pk)
    return started


# --- Running ----------------------------------------------------------------------


def send_advance(workflow_run_id: int, *, countdown: float = 0) -> None:
    sig = signature(
        "integration.advance_workflow", args=(workflow_run_id,), immutable=True
    )
    transaction.on_commit(lambda: orchestration.publish(sig, countdown=countdown))


def start_workflow(
    workflow_id: int,
    *,
    trigger: str = RunTrigger.API,
    correlation_id: str | None = None,
) -> WorkflowRun:
    """Create a workflow run with every node pending and send its first advance."""
    cid = correlation_id or correlation.current() or correlation.new_id()
    with transaction.atomic():
        workflow = Workflow.objects.select_for_update().get(pk=workflow_id)
        if workflow.is_paused:
            raise PipelinePausedError(f"workflow {workflow.name} is paused")
        wrun = WorkflowRun.objects.create(
            workflow=workflow, trigger=trigger, correlation_id=cid
        )
        NodeRun.objects.bulk_create(
            NodeRun(workflow_run=wrun, node=node) for node in workflow.nodes.all()
        )
        send_advance(wrun.pk)
    logger.info("workflow_started", workflow=workflow.name, workflow_run=wrun.pk)
    return wrun


def advance(workflow_run_id: int) -> None:
    """Move a workflow run on as far as its nodes allow. Idempotent."""
    with transaction.atomic():
        wrun = (
            WorkflowRun.objects.select_for_update()
            .select_related("workflow")
            .filter(pk=workflow_run_id)
            .first()
        )
        if wrun is None or wrun.state != WorkflowRunState.RUNNING:
            return
        node_runs = list(wrun.nodes.select_related("node", "run"))
        for nr in node_runs:
            if (
                nr.state == NodeState.RUNNING
                and nr.run
                and nr.run.state in TERMINAL_STATES
            ):
                if nr.run.state in SUCCESSFUL_RUN_STATES:
                    _finish(nr, NodeState.SUCCEEDED, result={"run": nr.run_id})
                else:
                    _attempt_failed(
                        wrun, nr, f"run {nr.run_id} {nr.run.state}: {nr.run.error}"
                    )
        failed = [nr for nr in node_runs if nr.state == NodeState.FAILED]
        if failed and wrun.workflow.failure_policy == FailurePolicy.STOP_ALL:
            _stop_all(wrun, node_runs, failed)
        else:
            _skip_downstream_of(failed, node_runs)
            _start_ready(wrun, node_runs)
        if all(nr.state in NODE_FINISHED for nr in node_runs):
            ok = all(nr.state == NodeState.SUCCEEDED for nr in node_runs)
            wrun.state = WorkflowRunState.SUCCEEDED if ok else WorkflowRunState.FAILED
            if not ok and not wrun.error:
                wrun.error = "failed nodes: " + ", ".join(
                    nr.node.key for nr in node_runs if nr.state == NodeState.FAILED
                )
            wrun.finished_at = timezone.now()
            wrun.save(update_fields=["state", "error", "finished_at"])
            logger.info("workflow_finished", workflow_run=wrun.pk, state=wrun.state)


def _finish(
    nr: NodeRun, state: str, *, result: dict | None = None, error: str = ""
) -> None:
    nr.state = state
    nr.result = result or nr.result
    nr.error = error
    nr.finished_at = timezone.now()
    nr.save(update_fields=["state", "result", "error", "finished_at"])


def _attempt_failed(wrun: WorkflowRun, nr: NodeRun, error: str) -> None:
    """Retry the node later if its policy allows, else mark it failed."""
    if nr.attempts < nr.node.max_attempts:
        delay = nr.node.retry_delay_seconds
        nr.state = NodeState.PENDING
        nr.error = error
        nr.run = None
        nr.not_before = timezone.now() + timedelta(seconds=delay)
        nr.save(update_fields=["state", "error", "run", "not_before"])
        send_advance(wrun.pk, countdown=delay)
        logger.warning("workflow_node_retry", node=nr.node.key, in_seconds=delay)
    else:
        _finish(nr, NodeState.FAILED, error=error)
        logger.warning("workflow_node_failed", node=nr.node.key, error=error)


def _stop_all(
    wrun: WorkflowRun, node_runs: list[NodeRun], failed: list[NodeRun]
) -> None:
    for nr in node_runs:
        if nr.state == NodeState.RUNNING and nr.run_id:
            services.cancel_run(nr.run_id, f"workflow run {wrun.pk} stopped")
        if nr.state in (NodeState.PENDING, NodeState.RUNNING):
            _finish(nr, NodeState.CANCELLED, error="stopped: another node failed")
    wrun.error = "stopped after node(s) failed: " + ", ".join(
        n.node.key for n in failed
    )


def _skip_downstream_of(failed: list[NodeRun], node_runs: list[NodeRun]) -> None:
    blocked = {nr.node.key for nr in failed}
    blocked |= {
        nr.node.key
        for nr in node_runs
        if nr.state in (NodeState.SKIPPED, NodeState.CANCELLED)
    }
    changed = True
    while changed:
        changed = False
        for nr in node_runs:
            if nr.state == NodeState.PENDING and blocked & set(nr.node.depends_on):
                _finish(nr, NodeState.SKIPPED, error="an upstream node did not succeed")
                blocked.add(nr.node.key)
                changed = True


def _start_ready(wrun: WorkflowRun, node_runs: list[NodeRun]) -> None:
    done = {nr.node.key for nr in node_runs if nr.state == NodeState.SUCCEEDED}
    now = timezone.now()
    for nr in node_runs:
        if nr.state != NodeState.PENDING or not set(nr.node.depends_on) <= done:
            continue
        if nr.not_before and nr.not_before > now:
            continue
        nr.attempts += 1
        nr.state = NodeState.RUNNING
        nr.started_at = now
        nr.not_before = None
        if nr.node.kind == NodeKind.PIPELINE:
            try:
                run = services.start_run(
                    nr.node.pipeline_id,
                    trigger=RunTrigger.WORKFLOW,
                    correlation_id=wrun.correlation_id,
                )
            except PipelinePausedError as exc:
                nr.save(update_fields=["attempts", "state", "started_at", "not_before"])
                _attempt_failed(wrun, nr, str(exc))
                continue
            nr.run = run
            nr.save(
                update_fields=["attempts", "state", "started_at", "not_before", "run"]
            )
        else:
            nr.save(update_fields=["attempts", "state", "started_at", "not_before"])
            sig = signature(
                "integration.workflow_action", args=(nr.pk,), immutable=True
            )
            transaction.on_commit(lambda sig=sig: orchestration.publish(sig))
        logger.info("workflow_node_started", node=nr.node.key, attempt=nr.attempts)


def run_action(node_run_id: int) -> None:
    """Execute an action node (HTTP call, SQL statement) and record its outcome."""
    from connectors.models import Connector

    nr = NodeRun.objects.select_related("node", "workflow_run").get(pk=node_run_id)
    if nr.state != NodeState.RUNNING:
        return
    config = dict(nr.node.config)
    config.pop("timeout_seconds", None)
    try:
        connector = Connector.objects.get(name=config.pop("connector"))
        plugin = connector.plugin
        result = plugin.run_action(
            connector.loaded_config(),
            nr.node.kind,
            config,
            connector.context(nr.workflow_run.correlation_id),
        )
    except NotReadyError as exc:
        # A wait: ask again later, until the node's timeout.
        waited = (
            (timezone.now() - nr.started_at).total_seconds() if nr.started_at else 0
        )
        if waited < float(nr.node.config.get("timeout_seconds", DEFAULT_WAIT_SECONDS)):
            sig = signature(
                "integration.workflow_action", args=(nr.pk,), immutable=True
            )
            orchestration.publish(sig, countdown=exc.retry_after)
            return
        with transaction.atomic():
            nr = (
                NodeRun.objects.select_for_update().select_related("node").get(pk=nr.pk)
            )
            if nr.state == NodeState.RUNNING:
                _attempt_failed(nr.workflow_run, nr, f"timed out waiting: {exc}")
    except Exception as exc:  # noqa: BLE001 - any failure is the node's outcome
        with transaction.atomic():
            nr = (
                NodeRun.objects.select_for_update().select_related("node").get(pk=nr.pk)
            )
            if nr.state == NodeState.RUNNING:
                _attempt_failed(nr.workflow_run, nr, f"{type(exc).__name__}: {exc}")
    else:
        NodeRun.objects.filter(pk=nr.pk, state=NodeState.RUNNING).update(
            state=NodeState.SUCCEEDED, result=result or {}, finished_at=timezone.now()
        )
    send_advance(nr.workflow_run_id)


def on_run_ended(run: Run) -> None:
    """A pipeline run ended: advance the workflow runs waiting on it."""
    for workflow_run_id in run.node_runs.values_list("workflow_run_id", flat=True):
        send_advance(workflow_run_id)


def cancel_workflow(workflow_run_id: int) -> bool:
    with transaction.atomic():
        wrun = WorkflowRun.objects.select_for_update().get(pk=workflow_run_id)
        if wrun.state != WorkflowRunState.RUNNING:
            return False
        for nr in wrun.nodes.all():
            if nr.state == NodeState.RUNNING and nr.run_id:
                services.cancel_run(nr.run_id, f"workflow run {wrun.pk} cancelled")
            if nr.state in (NodeState.PENDING, NodeState.RUNNING):
                _finish(nr, NodeState.CANCELLED, error="workflow cancelled")
        wrun.state = WorkflowRunState.CANCELLED
        wrun.finished_at = timezone.now()
        wrun.save(update_fields=["state", "finished_at"])
    return True


def pipelines_by_name(names: list[str]) -> dict[str, Pipeline]:
    return {p.name: p for p in Pipeline.objects.filter(name__in=names)}
