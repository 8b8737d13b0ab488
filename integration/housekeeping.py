"""Periodic housekeeping: the reconciler, run time limits, retention.

PostgreSQL is the source of truth for runs and chunks; the broker and Redis are
transient. The reconciler rebuilds what they lost from the database: a chunk queued
or running with no sign of life for longer than any task may run is sent again
(with a new attempt token, so a late original is fenced out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import structlog
from django.conf import settings
from django.db.models import DurationField, ExpressionWrapper, F, Q
from django.utils import timezone
from knox.models import AuthToken

from integration import orchestration, services, staging
from integration.choices import (
    CHUNK_IN_FLIGHT,
    TERMINAL_STATES,
    HeldState,
    RunState,
    WorkflowRunState,
)
from integration.models import (
    ChunkRun,
    DeadLetter,
    HeldValues,
    Run,
    RunKey,
    WorkflowRun,
)

logger = structlog.get_logger(__name__)


@dataclass
class ReconcileReport:
    """What one reconciler pass did."""

    chunks_resent: list[tuple[int, int]] = field(default_factory=list)
    plans_resent: list[int] = field(default_factory=list)
    finalizes_resent: list[int] = field(default_factory=list)
    runs_timed_out: list[int] = field(default_factory=list)
    workflows_advanced: list[int] = field(default_factory=list)


def reconcile(*, stale_seconds: int | None = None) -> ReconcileReport:
    """Resend lost work and fail runs over their time limit. Idempotent."""
    report = ReconcileReport()
    now = timezone.now()
    stale = now - timedelta(
        seconds=stale_seconds
        if stale_seconds is not None
        else settings.DIS_RECONCILE_STALE_SECONDS
    )
    _time_out_runs(now, report)
    quiet_chunks = ChunkRun.objects.filter(
        run__state=RunState.RUNNING, state__in=CHUNK_IN_FLIGHT
    ).filter(Q(touched_at__lt=stale) | Q(touched_at__isnull=True, queued_at__lt=stale))
    for run_id, seq, token in quiet_chunks.values_list(
        "run_id", "seq", "attempt_token"
    ):
        if services.restart_chunk(run_id, seq, str(token), "no sign of life"):
            report.chunks_resent.append((run_id, seq))
    for run in Run.objects.filter(
        state=RunState.RUNNING, planned_at__isnull=True
    ).filter(started_at__lt=stale):
        orchestration.send_plan(run.pk, run.correlation_id)
        report.plans_resent.append(run.pk)
    for run in Run.objects.filter(state=RunState.QUEUED, created_at__lt=stale):
        if not Run.objects.running_regular(run.pipeline_id).exists():
            orchestration.send_plan(run.pk, run.correlation_id)
            report.plans_resent.append(run.pk)
    for run in Run.objects.filter(state=RunState.RUNNING, planned_at__lt=stale).exclude(
        chunks__state__in=[*CHUNK_IN_FLIGHT, "pending"]
    ):
        orchestration.send_finalize(run.pk, run.correlation_id)
        report.finalizes_resent.append(run.pk)
    # Workflow runs move on when their nodes change; a pass here covers any
    # advance message that was lost (advance is idempotent).
    from integration import workflows

    for wrun_id in WorkflowRun.objects.filter(
        state=WorkflowRunState.RUNNING
    ).values_list("pk", flat=True):
        workflows.send_advance(wrun_id)
        report.workflows_advanced.append(wrun_id)
    if any(v for k, v in vars(report).items() if k != "workflows_advanced"):
        logger.warning("reconciled", **vars(report))
    return report


def _time_out_runs(now, report: ReconcileReport) -> None:
    limited = (
        Run.objects.filter(
            state=RunState.RUNNING,
            pipeline__max_run_seconds__isnull=False,
            started_at__isnull=False,
        )
        .annotate(
            elapsed=ExpressionWrapper(
                now - F("started_at"), output_field=DurationField()
            )
        )
        .select_related("pipeline")
    )
    for run in limited:
        limit = run.pipeline.max_run_seconds
        if run.elapsed > timedelta(seconds=limit):
            reason = (
                f"the run exceeded the pipeline's time limit of {limit} s; "
                f"{run.records_written} rows of {run.chunks_done} committed chunk(s) "
                "stay in the sink"
            )
            if services.stop_run(run.pk, RunState.FAILED, reason):
                report.runs_timed_out.append(run.pk)


@dataclass
class PurgeReport:
    runs: int = 0
    chunk_runs: int = 0
    run_keys: int = 0
    dead_letters: int = 0
    staged_files: int = 0
    held_values: int = 0
    api_tokens: int = 0


def purge(now=None) -> PurgeReport:
    """Delete what outlived its retention setting (runs, chunk runs, run keys, dead
    letters, decided held drift values) and expired API tokens."""
    now = now or timezone.now()
    report = PurgeReport()
    # The API's token check rejects an expired token without purging the user's
    # other expired tokens (knox's own check did that on every request).
    report.api_tokens, _ = AuthToken.objects.filter(expiry__lt=now).delete()
    report.dead_letters, _ = DeadLetter.objects.filter(
        created_at__lt=now - timedelta(days=settings.DIS_RETENTION_DEAD_LETTERS_DAYS)
    ).delete()
    # Held drift values an operator decided on (rejected, loaded or dropped).
    report.held_values, _ = (
        HeldValues.objects.exclude(state=HeldState.HELD)
        .filter(
            updated_at__lt=now
            - timedelta(days=settings.DIS_RETENTION_DEAD_LETTERS_DAYS)
        )
        .delete()
    )
    # A run's keys serve a resume only: kept as long as its chunk plan, and not
    # past the end of a run that cannot be resumed (finalize deletes them then).
    report.run_keys, _ = RunKey.objects.filter(
        Q(run__state__in=(RunState.SUCCEEDED, RunState.SUCCEEDED_WITH_ERRORS))
        | Q(
            run__state__in=TERMINAL_STATES,
            run__finished_at__lt=now
            - timedelta(days=settings.DIS_RETENTION_CHUNK_RUNS_DAYS),
        )
    ).delete()
    report.chunk_runs, _ = ChunkRun.objects.filter(
        run__state__in=TERMINAL_STATES,
        run__finished_at__lt=now
        - timedelta(days=settings.DIS_RETENTION_CHUNK_RUNS_DAYS),
    ).delete()
    old_runs = Run.objects.filter(
        state__in=TERMINAL_STATES,
        finished_at__lt=now - timedelta(days=settings.DIS_RETENTION_RUNS_DAYS),
    )
    DeadLetter.objects.filter(run__in=old_runs).delete()
    report.runs, _ = old_runs.delete()
    stage = staging.stage()
    if isinstance(stage, staging.FileStage):
        report.staged_files = stage.purge_expired()
    logger.info("purged", **vars(report))
    return report
