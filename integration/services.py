"""Run lifecycle: versions, starting, planning, chunk claims, completion, finalize.

Completion is driven by the database: a chunk is done when a conditional UPDATE says
so (exactly once per chunk, whatever the number of attempts); the chunk that finds
nothing left unfinished sends `finalize_run`. No chord, no result backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import structlog
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Count, F
from django.utils import timezone

from config import correlation
from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import RegistryError
from integration import orchestration
from integration.choices import (
    CHUNK_FINISHED,
    CHUNK_IN_FLIGHT,
    ChunkState,
    OverlapPolicy,
    RunKind,
    RunState,
    RunTrigger,
)
from integration.exceptions import PipelinePausedError
from integration.models import ChunkRun, DeadLetter, Pipeline, PipelineVersion, Run

logger = structlog.get_logger(__name__)

#: Columns of a rejected batch that are not part of the original record.
REJECT_META_COLUMNS = ("_error", "_step", SOURCE_REF_COLUMN, "_read_error", "_raw")


# --- Pipelines and versions -------------------------------------------------------


def validate_definition(pipeline: Pipeline) -> None:
    """Check that the pipeline can run: connector sides and steps compile.

    Raises:
        ValidationError: naming the field (source, sink, steps).
    """
    errors: dict[str, str] = {}
    try:
        if not pipeline.source.plugin.capabilities.source:
            errors["source"] = f"a {pipeline.source.kind} connector cannot be a source"
    except RegistryError as exc:
        errors["source"] = str(exc)
    try:
        if not pipeline.sink.plugin.capabilities.sink:
            errors["sink"] = f"a {pipeline.sink.kind} connector cannot be a sink"
    except RegistryError as exc:
        errors["sink"] = str(exc)
    from transforms.engine import StepConfigError, compile_steps

    try:
        compile_steps(pipeline.steps).close()
    except StepConfigError as exc:
        errors["steps"] = str(exc)
    if errors:
        raise ValidationError(errors)


def freeze_version(pipeline: Pipeline) -> PipelineVersion:
    """Make the pipeline's current behaviour its current version.

    A behaviour seen before reuses its version; a new one gets the next number.
    """
    spec = pipeline.behaviour_spec()
    content_hash = PipelineVersion.hash_spec(spec)
    with transaction.atomic():
        Pipeline.objects.select_for_update().filter(pk=pipeline.pk).first()
        version = PipelineVersion.objects.filter(
            pipeline=pipeline, content_hash=content_hash
        ).first()
        if version is None:
            last = pipeline.versions.order_by("-number").first()
            version = PipelineVersion.objects.create(
                pipeline=pipeline,
                number=(last.number + 1) if last else 1,
                content_hash=content_hash,
                spec=spec,
            )
            logger.info(
                "pipeline_version_created",
                pipeline=pipeline.name,
                version=version.number,
            )
        if pipeline.current_version_id != version.pk:
            pipeline.current_version = version
            Pipeline.objects.filter(pk=pipeline.pk).update(current_version=version)
    return version


# --- Starting runs ----------------------------------------------------------------


def start_run(
    pipeline_id: int,
    *,
    trigger: str = RunTrigger.API,
    kind: str = RunKind.REGULAR,
    correlation_id: str | None = None,
    requested_by_id: int | None = None,
    params: dict[str, Any] | None = None,
) -> Run | None:
    """Create a queued run of the pipeline's current version and send its plan.

    Returns None when the overlap policy skips it (a scheduled run while one is
    active and the policy is `skip`).

    Raises:
        PipelinePausedError: the pipeline is paused.
    """
    cid = correlation_id or correlation.current() or correlation.new_id()
    with transaction.atomic():
        pipeline = Pipeline.objects.select_for_update().get(pk=pipeline_id)
        if pipeline.is_paused:
            raise PipelinePausedError(f"pipeline {pipeline.name} is paused")
        version = pipeline.current_version or freeze_version(pipeline)
        if (
            trigger == RunTrigger.SCHEDULE
            and pipeline.overlap_policy == OverlapPolicy.SKIP
            and Run.objects.active_for(pipeline).exists()
        ):
            logger.info("run_skipped_overlap", pipeline=pipeline.name)
            return None
        run = Run.objects.create(
            pipeline=pipeline,
            version=version,
            kind=kind,
            trigger=trigger,
            correlation_id=cid,
            requested_by_id=requested_by_id,
            params=params or {},
        )
        orchestration.send_plan(run.pk, cid)
    logger.info("run_queued", run_id=run.pk, pipeline=pipeline.name, trigger=trigger)
    return run


def claim_run(run_id: int) -> bool:
    """Move a queued run to running; False while another regular run is running.

    The partial unique index on running regular runs decides, not a prior check.
    """
    try:
        with transaction.atomic():
            updated = Run.objects.filter(pk=run_id, state=RunState.QUEUED).update(
                state=RunState.RUNNING, started_at=timezone.now()
            )
    except IntegrityError:
        return False
    return updated == 1


# --- Planning ---------------------------------------------------------------------


def plan_run(run_id: int) -> None:
    """Ask the source for chunks, store them, prepare the sink, fill the window.

    Safe to run twice: a run that was planned already is left alone; one whose
    planning was interrupted is planned again from scratch (no chunk of it was sent).
    """
    from integration import runtime

    run = Run.objects.select_related("pipeline", "version").get(pk=run_id)
    if run.state == RunState.QUEUED and not claim_run(run_id):
        logger.info("run_waits_for_active_run", run_id=run_id)
        return
    run.refresh_from_db()
    if run.state != RunState.RUNNING or run.planned_at is not None:
        return
    spec = run.version.spec
    compiled = runtime.compiled_version(run.version_id)
    source = runtime.open_source(spec["source"]["connector"])
    sink = runtime.open_sink(spec["sink"]["connector"])
    try:
        fingerprint = source.fingerprint(spec["source"]["options"]) or ""
        chunks = [
            ChunkRun(run_id=run_id, seq=c.seq, spec=c.spec)
            for c in source.plan(
                spec["source"]["options"], chunk_rows=spec["chunk_rows"]
            )
        ]
        sink.prepare(spec["sink"]["options"], compiled.output_schema)
    finally:
        source.close()
        sink.close()
    with transaction.atomic():
        ChunkRun.objects.filter(run_id=run_id).delete()
        ChunkRun.objects.bulk_create(chunks, batch_size=1000)
        Run.objects.filter(pk=run_id).update(
            chunks_total=len(chunks),
            planned_at=timezone.now(),
            source_fingerprint=fingerprint[:200],
        )
        logger.info("run_planned", run_id=run_id, chunks=len(chunks))
        if chunks:
            dispatch_chunks(run_id, run.pipeline.max_in_flight, run.correlation_id)
        else:
            orchestration.send_finalize(run_id, run.correlation_id)


def dispatch_chunks(run_id: int, limit: int, correlation_id: str) -> int:
    """Claim up to `limit` pending chunks (lowest seq first) and send their chains.

    Each claim is a conditional UPDATE that issues a fresh attempt token, so a
    chunk is sent once even when two finishing chunks race to refill the window.
    """
    sent = 0
    while sent < limit:
        if not Run.objects.filter(pk=run_id, state=RunState.RUNNING).exists():
            break
        candidate = (
            ChunkRun.objects.filter(run_id=run_id, state=ChunkState.PENDING)
            .order_by("seq")
            .values_list("seq", flat=True)
            .first()
        )
        if candidate is None:
            break
        token = ChunkRun.new_token()
        claimed = ChunkRun.objects.filter(
            run_id=run_id, seq=candidate, state=ChunkState.PENDING
        ).update(
            state=ChunkState.QUEUED,
            attempt_token=token,
            attempts=F("attempts") + 1,
            queued_at=timezone.now(),
        )
        if claimed:
            orchestration.send_chunk(run_id, candidate, str(token), correlation_id)
            sent += 1
    return sent


# --- Chunk attempts ---------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """The context a chunk task works in (what its row and run said at the start)."""

    run_id: int
    seq: int
    token: str
    chunk_spec: dict[str, Any]
    version_id: int
    version_spec: dict[str, Any]
    correlation_id: str


def begin_attempt(
    run_id: int, seq: int, token: str, *, mark_running: bool
) -> Attempt | None:
    """The attempt's context, or None when it is stale (superseded, finished, stopped).

    A stale attempt returns quietly: a newer attempt or the end of the run owns it.
    """
    chunk = (
        ChunkRun.objects.select_related("run__version")
        .filter(run_id=run_id, seq=seq)
        .first()
    )
    if chunk is None or str(chunk.attempt_token) != token:
        return None
    if chunk.state not in CHUNK_IN_FLIGHT:
        return None
    run = chunk.run
    if run.state != RunState.RUNNING:
        skip_chunk(run_id, seq, token)
        return None
    if mark_running and chunk.state == ChunkState.QUEUED:
        ChunkRun.objects.filter(pk=chunk.pk, attempt_token=token).update(
            state=ChunkState.RUNNING, started_at=timezone.now()
        )
    structlog.contextvars.bind_contextvars(run_id=run_id, chunk_seq=seq)
    return Attempt(
        run_id=run_id,
        seq=seq,
        token=token,
        chunk_spec=chunk.spec,
        version_id=run.version_id,
        version_spec=run.version.spec,
        correlation_id=run.correlation_id,
    )


def token_is_current(run_id: int, seq: int, token: str) -> bool:
    """The sink's fence: is this attempt still the owner of the chunk?"""
    return ChunkRun.objects.filter(
        run_id=run_id,
        seq=seq,
        attempt_token=token,
        state__in=CHUNK_IN_FLIGHT,
        run__state=RunState.RUNNING,
    ).exists()


def restart_chunk(run_id: int, seq: int, token: str, reason: str) -> bool:
    """Send the chunk again from extract with a new token (its staged batch is gone)."""
    new_token = ChunkRun.new_token()
    with transaction.atomic():
        updated = ChunkRun.objects.filter(
            run_id=run_id, seq=seq, attempt_token=token, state__in=CHUNK_IN_FLIGHT
        ).update(
            state=ChunkState.QUEUED,
            attempt_token=new_token,
            attempts=F("attempts") + 1,
            queued_at=timezone.now(),
        )
        if updated:
            cid = Run.objects.values_list("correlation_id", flat=True).get(pk=run_id)
            orchestration.send_chunk(run_id, seq, str(new_token), cid)
    logger.warning("chunk_restarted", run_id=run_id, chunk_seq=seq, reason=reason)
    return bool(updated)


def skip_chunk(run_id: int, seq: int, token: str | None = None) -> None:
    """Mark a chunk of a stopped run as skipped (nothing of it is committed by us)."""
    qs = ChunkRun.objects.filter(run_id=run_id, seq=seq).exclude(
        state__in=CHUNK_FINISHED
    )
    if token is not None:
        qs = qs.filter(attempt_token=token)
    qs.update(state=ChunkState.SKIPPED, finished_at=timezone.now())


@dataclass(frozen=True)
class ChunkCounts:
    read: int
    written: int
    rejected: int
    filtered: int


def dead_letters_from(
    rejected: pa.Table, *, run_id: int, pipeline_id: int, seq: int
) -> list[DeadLetter]:
    """DeadLetter rows for a rejected batch: original values, step, error, source."""
    if rejected.num_rows == 0:
        return []
    payload_cols = [c for c in rejected.column_names if c not in REJECT_META_COLUMNS]
    payloads = rejected.select(payload_cols).to_pylist()
    errors = rejected.column("_error").to_pylist()
    steps = rejected.column("_step").to_pylist()
    refs = (
        rejected.column(SOURCE_REF_COLUMN).to_pylist()
        if SOURCE_REF_COLUMN in rejected.column_names
        else [""] * rejected.num_rows
    )
    return [
        DeadLetter(
            run_id=run_id,
            pipeline_id=pipeline_id,
            chunk_seq=seq,
            step=step or "unknown",
            error=error or "",
            payload=payload,
            source_ref=(ref or "")[:500],
        )
        for payload, error, step, ref in zip(payloads, errors, steps, refs, strict=True)
    ]


def complete_chunk(attempt: Attempt, counts: ChunkCounts, rejected: pa.Table) -> bool:
    """Record a committed chunk exactly once; refill the window or finalize.

    Returns False when another attempt already completed the chunk (or this one was
    superseded): nothing is counted twice.
    """
    run_id, seq = attempt.run_id, attempt.seq
    with transaction.atomic():
        updated = ChunkRun.objects.filter(
            run_id=run_id,
            seq=seq,
            attempt_token=attempt.token,
            state__in=CHUNK_IN_FLIGHT,
        ).update(
            state=ChunkState.DONE,
            finished_at=timezone.now(),
            records_read=counts.read,
            records_written=counts.written,
            records_rejected=counts.rejected,
            records_filtered=counts.filtered,
        )
        if not updated:
            return False
        run = Run.objects.select_related("pipeline").get(pk=run_id)
        DeadLetter.objects.filter(run_id=run_id, chunk_seq=seq).delete()
        letters = dead_letters_from(
            rejected, run_id=run_id, pipeline_id=run.pipeline_id, seq=seq
        )
        DeadLetter.objects.bulk_create(letters, batch_size=1000)
        Run.objects.filter(pk=run_id).update(
            chunks_done=F("chunks_done") + 1,
            records_read=F("records_read") + counts.read,
            records_written=F("records_written") + counts.written,
            records_rejected=F("records_rejected") + counts.rejected,
            records_filtered=F("records_filtered") + counts.filtered,
            records_dead_lettered=F("records_dead_lettered") + len(letters),
        )
        run.refresh_from_db()
        logger.info(
            "chunk_committed",
            run_id=run_id,
            chunk_seq=seq,
            read=counts.read,
            written=counts.written,
            rejected=counts.rejected,
        )
        limit = attempt.version_spec["max_rejected_ratio"]
        if run.state == RunState.RUNNING and run.rejected_ratio > limit:
            stop_run(
                run_id,
                RunState.FAILED,
                f"rejected ratio {run.rejected_ratio:.4f} is above the pipeline's "
                f"limit {limit} after {run.chunks_done} of {run.chunks_total} chunks; "
                f"{run.records_written} rows committed by those chunks stay in the "
                "sink",
            )
        elif not ChunkRun.objects.filter(run_id=run_id).unfinished().exists():
            orchestration.send_finalize(run_id, run.correlation_id)
        else:
            dispatch_chunks(run_id, 1, run.correlation_id)
    return True


# --- Ending runs ------------------------------------------------------------------


def stop_run(run_id: int, state: str, reason: str) -> bool:
    """End a running run now (failed or cancelled): no new chunk starts.

    Chunks in flight find the run stopped and skip their load; committed rows stay
    and the reason says so.
    """
    with transaction.atomic():
        updated = Run.objects.filter(pk=run_id, state=RunState.RUNNING).update(
            state=state, error=reason, finished_at=timezone.now()
        )
        if not updated:
            return False
        ChunkRun.objects.filter(run_id=run_id, state=ChunkState.PENDING).update(
            state=ChunkState.SKIPPED, finished_at=timezone.now()
        )
        run = Run.objects.get(pk=run_id)
        promote_next(run.pipeline_id)
    logger.warning("run_stopped", run_id=run_id, state=state, reason=reason)
    return True


def fail_run(run_id: int, reason: str) -> bool:
    """Fail a queued or running run with `reason` (shown to operators)."""
    with transaction.atomic():
        if Run.objects.filter(pk=run_id, state=RunState.QUEUED).update(
            state=RunState.FAILED, error=reason, finished_at=timezone.now()
        ):
            logger.warning("run_failed", run_id=run_id, reason=reason)
            return True
    return stop_run(run_id, RunState.FAILED, reason)


def finalize_run(run_id: int) -> None:
    """Give a run whose chunks are all finished its terminal state, then start the
    next queued run of the pipeline. Idempotent."""
    from integration import runtime

    run = Run.objects.select_related("version").get(pk=run_id)
    if run.state != RunState.RUNNING:
        return
    if ChunkRun.objects.filter(run_id=run_id).unfinished().exists():
        return
    state = run.outcome_state()
    reason = ""
    if state == RunState.FAILED:
        reason = (
            f"rejected ratio {run.rejected_ratio:.4f} is above the pipeline's limit "
            f"{run.version.spec['max_rejected_ratio']}; "
            f"{run.records_written} committed rows stay in the sink"
        )
    else:
        spec = run.version.spec
        sink = runtime.open_sink(spec["sink"]["connector"])
        try:
            sink.finalize(spec["sink"]["options"], run_id=run_id)
        finally:
            sink.close()
    with transaction.atomic():
        updated = Run.objects.filter(pk=run_id, state=RunState.RUNNING).update(
            state=state, error=reason, finished_at=timezone.now()
        )
        if updated:
            promote_next(run.pipeline_id)
    if updated:
        run.refresh_from_db()
        logger.info(
            "run_finished",
            run_id=run_id,
            state=state,
            read=run.records_read,
            written=run.records_written,
            rejected=run.records_rejected,
            filtered=run.records_filtered,
            seconds=run.duration_seconds,
        )


def promote_next(pipeline_id: int) -> None:
    """Send the plan of the pipeline's oldest queued run (after commit)."""
    nxt = Run.objects.next_queued(pipeline_id).first()
    if nxt is not None:
        orchestration.send_plan(nxt.pk, nxt.correlation_id)


def chunk_progress(run: Run) -> dict[str, int]:
    """Chunks of a run by state."""
    counts = dict.fromkeys(ChunkState.values, 0)
    for row in run.chunks.values("state").annotate(n=Count("id")):
        counts[row["state"]] = row["n"]
    return counts
