"""Celery tasks of a run. Thin: re-read the rows, call a service, return.

Every task is idempotent and returns quietly when its run or chunk is gone,
finished, or owned by a newer attempt.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import structlog
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError

from connectors.exceptions import (
    ConfigError,
    FencedError,
    TerminalError,
    TransientError,
)
from integration import drift, orchestration, runkeys, runtime, services, staging
from integration.choices import RunState
from transforms.engine import EngineError, EngineInterrupted, EngineResult

logger = structlog.get_logger(__name__)

_RETRY = {
    # SoftTimeLimitExceeded: the attempt hung (most often waiting on a dependency
    # that is restarting: a pooled connection waits up to connect_timeout + 20 s);
    # the step is idempotent, so it is retried, and a step that keeps timing out
    # fails the run once its retries are spent. EngineInterrupted: a signal stopped
    # DuckDB mid-query (the soft time limit, or the worker terminating the task
    # after it lost the broker); DuckDB swallows the signal handler's own exception.
    # OperationalError, InterfaceError: the metadata database went away (restart,
    # failover, a dropped connection). Failing the run for it would be a race: the
    # run is failed only when the database is back in time for `on_failure`.
    "autoretry_for": (
        TransientError,
        SoftTimeLimitExceeded,
        EngineInterrupted,
        OperationalError,
        InterfaceError,
    ),
    "retry_backoff": 2,
    # Below the visibility timeout: a delayed retry waits unacknowledged in a
    # worker, and one waiting longer would be redelivered to another.
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 8,
}
_LIMITS = {
    "soft_time_limit": settings.CELERY_TASK_SOFT_TIME_LIMIT,
    "time_limit": settings.CELERY_TASK_TIME_LIMIT,
}


class RunTask(Task):
    """Fails the run when a task gives up (terminal error or retries exhausted)."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        run_id = args[0] if args else kwargs.get("run_id")
        if run_id is None:
            return
        where = f"chunk {args[1]} " if len(args) > 1 else ""
        message = str(exc) if isinstance(exc, ConfigError | TerminalError) else ""
        reason = f"{self.name} {where}failed: {type(exc).__name__}"
        services.fail_run(run_id, f"{reason}: {message}" if message else reason)

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Any,
        kwargs: Any,
        einfo: Any,
    ) -> None:
        # Reached when the step returned or raised (a retry included), never when
        # it killed its worker: that is how crashes are told from errors.
        if len(args) == 3:
            services.end_step(*args)


def _key(attempt: services.Attempt, part: str) -> str:
    return staging.key(attempt.run_id, attempt.seq, attempt.token, part)


@shared_task(name="integration.plan_run", base=RunTask, bind=True, **_RETRY, **_LIMITS)
def plan_run(self: Task, run_id: int) -> None:
    services.plan_run(run_id)


@shared_task(
    name="integration.extract_chunk", base=RunTask, bind=True, **_RETRY, **_LIMITS
)
def extract_chunk(self: Task, run_id: int, seq: int, token: str) -> None:
    attempt = services.begin_attempt(
        run_id,
        seq,
        token,
        step="extract",
        task_id=self.request.id or "",
        mark_running=True,
    )
    if attempt is None:
        return
    table = _extract(attempt)
    size = staging.stage().put(_key(attempt, "extract"), table)
    logger.info("chunk_extracted", rows=table.num_rows, staged_bytes=size)


@shared_task(
    name="integration.transform_chunk", base=RunTask, bind=True, **_RETRY, **_LIMITS
)
def transform_chunk(self: Task, run_id: int, seq: int, token: str) -> None:
    attempt = services.begin_attempt(
        run_id, seq, token, step="transform", task_id=self.request.id or ""
    )
    if attempt is None:
        return
    stage = staging.stage()
    table = stage.get(_key(attempt, "extract"))
    if table is None:
        services.restart_chunk(run_id, seq, token, "extracted batch missing")
        return
    done = _transform(attempt, table)
    _stage_transformed(attempt, done)
    stage.delete(_key(attempt, "extract"))


@shared_task(
    name="integration.process_chunk", base=RunTask, bind=True, **_RETRY, **_LIMITS
)
def process_chunk(self: Task, run_id: int, seq: int, token: str) -> None:
    """Extract, transform and load a chunk in one task, the batch held in memory.

    Sent instead of the three-task chain when the chunk's load waits for no other
    chunk (no run-wide keys): it saves staging the batch twice and two task hand-
    overs. A transient failure of the load stages the transformed batch and sends
    `load_chunk` to retry it, so a retried load never re-reads the source; a
    transient failure before that retries this task (extract again). The whole
    task is one step (`process`) for crash counting.
    """
    attempt = services.begin_attempt(
        run_id,
        seq,
        token,
        step="process",
        task_id=self.request.id or "",
        mark_running=True,
    )
    if attempt is None:
        return
    table = _extract(attempt)
    logger.info("chunk_extracted", rows=table.num_rows, staged_bytes=0)
    done = _transform(attempt, table)
    del table
    try:
        _load(attempt, done.output, done.rejected, done.inputs, done.counts())
    except TransientError as exc:
        _stage_transformed(attempt, done)
        countdown = _RETRY["retry_backoff"] * random.uniform(1, 1.5)  # noqa: S311
        logger.warning(
            "chunk_load_deferred",
            error_class=type(exc).__name__,
            countdown=round(countdown, 1),
        )
        orchestration.send_load(
            run_id, seq, token, attempt.correlation_id, countdown=countdown
        )


def _extract(attempt: services.Attempt) -> pa.Table:
    """The chunk's rows as read from its source (or its dead letters, for a replay),
    after the schema-drift check."""
    from connectors.base import Chunk

    if "dead_letter_ids" in attempt.chunk_spec:  # a replay run reads dead letters
        table = services.replay_table(attempt.chunk_spec)
    else:
        spec = attempt.version_spec["source"]
        source = runtime.open_source(spec["connector"])
        try:
            chunk = Chunk(attempt.seq, attempt.chunk_spec)
            batches = list(source.read(attempt.source_options, chunk))
        finally:
            source.close()
        table = pa.Table.from_batches(batches) if batches else pa.table({})
    table, found = drift.check_chunk(
        attempt.run_id, attempt.seq, attempt.version_spec, table
    )
    if found is not None:
        services.record_chunk_stats(
            attempt.run_id, attempt.seq, attempt.token, {"drift": found.stats()}
        )
    return table


def _transform(attempt: services.Attempt, table: pa.Table) -> Transformed:
    """Run the version's steps over an extracted chunk; records its quality stats."""
    references, stats = {}, {}
    needed = runtime.compiled_version(attempt.version_id).references
    if needed:
        from integration import references as reference_cache

        references, stats["references"] = reference_cache.for_version(
            attempt.version_spec, needed
        )
    done = transform_table(attempt.version_id, table, references=references)
    done.rows_in = table.num_rows
    if done.rejected.num_rows:
        stats["quality"] = services.chunk_quality(done.violations, done.rejected)
    if stats:
        services.record_chunk_stats(attempt.run_id, attempt.seq, attempt.token, stats)
    logger.info(
        "chunk_transformed",
        rows_in=table.num_rows,
        rows_out=done.output.num_rows,
        rejected=done.rejected.num_rows,
        filtered=done.filtered,
        deduplicated=done.deduplicated,
    )
    return done


def _stage_transformed(attempt: services.Attempt, done: Transformed) -> None:
    """Stage a transformed chunk for `load_chunk` (its counts in the metadata)."""
    stage = staging.stage()
    meta = {
        b"dis.rows_in": str(done.rows_in).encode(),
        b"dis.filtered": str(done.filtered).encode(),
        b"dis.deduplicated": str(done.deduplicated).encode(),
    }
    stage.put(_key(attempt, "output"), done.output.replace_schema_metadata(meta))
    stage.put(_key(attempt, "rejected"), done.rejected)
    if done.inputs is not None:
        stage.put(_key(attempt, "inputs"), done.inputs)


@dataclass
class Transformed:
    """What the engine made of a chunk.

    Attributes:
        output: the rows to load (with the key hash columns of run-wide keys).
        rejected: the rejected input rows with `_error` and `_step`.
        filtered: rows filter steps dropped.
        deduplicated: rows a deduplicate step dropped within the chunk.
        inputs: with unique rules, the input rows of `output` (aligned with it),
            for the dead letters of values an earlier chunk holds; else None.
        violations: one row per (rejected row, validate rule it violates), for
            the run's data-quality report (``EngineResult.violations``).
    """

    output: pa.Table
    rejected: pa.Table
    filtered: int
    deduplicated: int = 0
    inputs: pa.Table | None = None
    violations: pa.Table | None = None
    rows_in: int = 0

    def counts(self) -> services.ChunkCounts:
        """The chunk's counts before the load (written is the sink's to say)."""
        return services.ChunkCounts(
            read=self.rows_in,
            written=0,
            rejected=0,
            filtered=self.filtered,
            deduplicated=self.deduplicated,
        )


def transform_table(
    version_id: int | None,
    table: pa.Table,
    *,
    references: dict[str, pa.Table] | None = None,
    compiled: Any = None,
) -> Transformed:
    """Run the compiled version over a chunk; rows the reader flagged are rejected.

    ``compiled`` replaces the version's cached compiled pipeline (a preview runs
    its own, with the same settings).
    """
    if compiled is None:
        compiled = runtime.compiled_version(version_id)
    table, drifted = drift.split_rejected(table)
    unreadable = None
    if "_read_error" in table.column_names:
        import pyarrow.compute as pc

        bad = pc.is_valid(table.column("_read_error"))
        if pc.any(bad).as_py():
            unreadable = table.filter(bad)
            table = table.filter(pc.invert(bad))
        table = table.drop_columns(
            [c for c in ("_read_error", "_raw") if c in table.column_names]
        )
    if table.num_rows == 0 and unreadable is not None:
        # Nothing readable: the engine has no columns to bind its steps to.
        try:
            schema = compiled.output_schema
        except EngineError:  # pass-through: the output's columns are the input's
            schema = table.drop_columns(["_source_ref"]).schema
        output = schema.empty_table().append_column(
            "_source_ref", pa.array([], pa.string())
        )
        for scope in compiled.key_scopes:
            output = output.append_column(scope.column, pa.array([], pa.string()))
        result = EngineResult(output, pa.table({}), 0, 0)
    else:
        result = compiled.run(table, references=references or None)
    rejected = runkeys.attach_held(result.rejected, result.rejected_keys)
    if unreadable is not None and unreadable.num_rows:
        errors = unreadable.column("_read_error")
        keep = [c for c in unreadable.column_names if c not in ("_read_error",)]
        extra = unreadable.select(keep).append_column("_error", errors)
        extra = extra.append_column(
            "_step", pa.array(["read"] * unreadable.num_rows, pa.string())
        )
        rejected = pa.concat_tables([rejected, extra], promote_options="permissive")
    if drifted is not None and drifted.num_rows:
        rejected = pa.concat_tables([rejected, drifted], promote_options="permissive")
    inputs = None
    if any(scope.kind == "unique" for scope in compiled.key_scopes):
        inputs = runkeys.aligned_inputs(table, result.output)
    return Transformed(
        result.output,
        rejected,
        result.filtered,
        result.deduplicated,
        inputs,
        result.violations,
    )


@shared_task(
    name="integration.load_chunk", base=RunTask, bind=True, **_RETRY, **_LIMITS
)
def load_chunk(self: Task, run_id: int, seq: int, token: str) -> None:
    if services.loading_elsewhere(run_id, seq, token, self.request.id or ""):
        return
    attempt = services.begin_attempt(
        run_id, seq, token, step="load", task_id=self.request.id or ""
    )
    if attempt is None:
        return
    compiled = runtime.compiled_version(attempt.version_id)
    scopes = compiled.key_scopes
    if scopes and not _my_turn(attempt, runkeys.load_order(scopes)):
        return
    stage = staging.stage()
    keys = [_key(attempt, "output"), _key(attempt, "rejected")]
    output, rejected = stage.get(keys[0]), stage.get(keys[1])
    inputs = None
    if any(scope.kind == "unique" for scope in scopes):
        keys.append(_key(attempt, "inputs"))
        inputs = stage.get(keys[2])
        if inputs is None:
            output = None
    if output is None or rejected is None:
        services.restart_chunk(run_id, seq, token, "transformed batch missing")
        return
    meta = output.schema.metadata or {}
    before = services.ChunkCounts(
        read=int(meta.get(b"dis.rows_in", b"0")),
        written=0,
        rejected=0,
        filtered=int(meta.get(b"dis.filtered", b"0")),
        deduplicated=int(meta.get(b"dis.deduplicated", b"0")),
    )
    output = output.replace_schema_metadata(None)
    _load(attempt, output, rejected, inputs, before)
    stage.delete(*keys)


def _load(
    attempt: services.Attempt,
    output: pa.Table,
    rejected: pa.Table,
    inputs: pa.Table | None,
    before: services.ChunkCounts,
) -> None:
    """Claim run-wide keys, apply the error policy, write the sink and complete the
    chunk. `before` holds the counts of extract and transform."""
    run_id, seq, token = attempt.run_id, attempt.seq, attempt.token
    compiled = runtime.compiled_version(attempt.version_id)
    scopes = compiled.key_scopes
    rows_in, filtered = before.read, before.filtered
    deduplicated = before.deduplicated
    rejected, held = runkeys.detach_held(rejected)
    if scopes:
        started = time.perf_counter()
        claimed = runkeys.claim(run_id, seq, token, scopes, output, inputs, held)
        if claimed is None:
            logger.info("chunk_claim_superseded")
            return
        logger.info(
            "chunk_keys_claimed",
            rows=output.num_rows,
            kept=claimed.output.num_rows,
            deduplicated=claimed.deduplicated,
            rejected=claimed.rejected.num_rows,
            seconds=round(time.perf_counter() - started, 3),
        )
        output = claimed.output
        deduplicated += claimed.deduplicated
        if claimed.rejected.num_rows:
            rejected = pa.concat_tables(
                [rejected, claimed.rejected], promote_options="permissive"
            )
    if not services.admit_chunk(attempt, read=rows_in, rejected=rejected):
        return
    if compiled.is_aggregate:
        # Partial aggregates wait in the database; finalize merges and writes them.
        counts = services.ChunkCounts(rows_in, 0, rejected.num_rows, filtered)
        partial = staging.to_ipc(output)
        services.complete_chunk(attempt, counts, rejected, partial=partial)
        return
    spec = attempt.version_spec["sink"]
    sink = runtime.open_sink(spec["connector"])
    try:
        if drift.passes_through(attempt.version_spec["steps"]):
            # The output's columns are the source's, known only now: prepare the
            # target for them (adding new ones when the drift policy evolves).
            sink.prepare(
                services.prepare_options(attempt),
                output.schema.remove(output.schema.get_field_index("_source_ref")),
                run_id=run_id,
            )
        result = sink.write(
            attempt.sink_options,
            output,
            run_id=run_id,
            chunk_seq=seq,
            fence=lambda: services.token_is_current(run_id, seq, token),
        )
    except FencedError:
        logger.info("chunk_write_fenced")
        return
    finally:
        sink.close()
    counts = services.ChunkCounts(
        read=rows_in,
        written=result.rows_written,
        rejected=rejected.num_rows,
        filtered=filtered,
        deduplicated=deduplicated,
    )
    services.complete_chunk(attempt, counts, rejected)


def _my_turn(attempt: services.Attempt, order: str | None) -> bool:
    """Whether the chunk may load now, in a pipeline whose chunks load in order.

    Not yet: the load returns; the chunk before it sends it again once committed,
    and so does a delayed message (a safety net), a new one so the wait uses no
    retry of the task's budget. Never (a chunk before it was skipped or
    quarantined): the run stops, to be resumed once that chunk can run.
    """
    if order is None:
        return True
    turn = runkeys.turn(attempt.run_id, attempt.seq, order)
    if turn.go:
        return True
    if turn.blocked_by is not None:
        blocker, state = turn.blocked_by
        services.stop_run(
            attempt.run_id,
            RunState.FAILED,
            f"chunk {blocker} is {state}: with a deduplicate step or unique rules "
            f"the chunks load in order, so chunk {attempt.seq} and the ones after "
            "it cannot load before it. Fix the cause and resume the run.",
        )
        return False
    orchestration.send_load(
        attempt.run_id,
        attempt.seq,
        attempt.token,
        attempt.correlation_id,
        countdown=settings.DIS_LOAD_TURN_POLL_SECONDS * random.uniform(0.8, 1.2),  # noqa: S311
    )
    return False


@shared_task(
    name="integration.finalize_run", base=RunTask, bind=True, **_RETRY, **_LIMITS
)
def finalize_run(self: Task, run_id: int) -> None:
    services.finalize_run(run_id)


@shared_task(name="integration.reconcile", **_LIMITS)
def reconcile() -> dict[str, Any]:
    """Periodic: resend lost chunks, plans and finalizes; enforce run time limits."""
    from integration import housekeeping

    return vars(housekeeping.reconcile())


@shared_task(name="integration.purge", **_LIMITS)
def purge() -> dict[str, int]:
    """Periodic: delete runs, chunk runs and dead letters past their retention."""
    from integration import housekeeping

    return vars(housekeeping.purge())


@shared_task(name="integration.scheduled_run", **_LIMITS)
def scheduled_run(pipeline_id: int) -> int | None:
    """Fired by beat for a pipeline's schedule; honours its overlap policy."""
    from integration.choices import RunTrigger
    from integration.exceptions import PipelinePausedError

    try:
        run = services.start_run(pipeline_id, trigger=RunTrigger.SCHEDULE)
    except PipelinePausedError:
        return None
    return run.pk if run else None


@shared_task(name="integration.advance_workflow", acks_late=True, **_RETRY, **_LIMITS)
def advance_workflow(workflow_run_id: int) -> None:
    """Move a workflow run on (idempotent; sent on every node change)."""
    from integration import workflows

    workflows.advance(workflow_run_id)


@shared_task(name="integration.workflow_action", acks_late=True, **_LIMITS)
def workflow_action(node_run_id: int) -> None:
    """Execute an action node of a workflow."""
    from integration import workflows

    workflows.run_action(node_run_id)


@shared_task(name="integration.notify_run", acks_late=True, **_RETRY, **_LIMITS)
def notify_run(run_id: int) -> None:
    """POST the run's outcome to its pipeline's webhook (through the SSRF guard)."""
    from integration import notifications

    notifications.notify(run_id)


@shared_task(name="integration.scheduled_workflow", **_LIMITS)
def scheduled_workflow(workflow_id: int) -> int | None:
    """Fired by beat for a workflow's schedule."""
    from integration import workflows
    from integration.choices import RunTrigger
    from integration.exceptions import PipelinePausedError

    try:
        return workflows.start_workflow(workflow_id, trigger=RunTrigger.SCHEDULE).pk
    except PipelinePausedError:
        return None


@shared_task(name="integration.event_triggers", **_LIMITS)
def event_triggers() -> list[int]:
    """Periodic: start the workflows whose trigger event arrived."""
    from integration import workflows

    return workflows.fire_event_triggers()


@shared_task(name="integration.file_triggers", **_LIMITS)
def file_triggers() -> dict[str, int]:
    """Periodic: start the runs that File Processing Service events ask for."""
    from integration import file_triggers as triggers

    return triggers.consume_file_events()
