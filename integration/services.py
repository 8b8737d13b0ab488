"""Run lifecycle: versions, starting, planning, chunk claims, completion, finalize.

Completion is driven by the database: a chunk is done when a conditional UPDATE says
so (exactly once per chunk, whatever the number of attempts); the chunk that finds
nothing left unfinished sends `finalize_run`. No chord, no result backend.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import structlog
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, F
from django.utils import timezone

from config import correlation
from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import RegistryError, TerminalError
from integration import orchestration
from integration.choices import (
    CHUNK_FINISHED,
    CHUNK_IN_FLIGHT,
    CHUNK_RESUMABLE,
    ChunkState,
    DeadLetterState,
    OverlapPolicy,
    RunKind,
    RunState,
    RunTrigger,
)
from integration.exceptions import (
    IdempotencyConflictError,
    PipelinePausedError,
    ResumeRefusedError,
)
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
    from transforms.engine.drift import SchemaDefinitionError, check_schema

    try:
        check_schema(pipeline.source_schema or [])
    except SchemaDefinitionError as exc:
        errors["source_schema"] = str(exc)
    try:
        compiled = compile_steps(pipeline.steps)
    except StepConfigError as exc:
        errors["steps"] = str(exc)
    else:
        try:
            from integration import runkeys

            key_error = runkeys.definition_error(compiled)
            if key_error:
                errors["steps"] = key_error
            reference_errors = _check_references(pipeline, compiled.references)
            if reference_errors:
                errors["references"] = reference_errors
        finally:
            compiled.close()
    if errors:
        raise ValidationError(errors)


def _check_references(pipeline: Pipeline, needed: dict[str, list[str]]) -> str:
    """What is wrong with the pipeline's reference definitions ("" if nothing)."""
    from connectors.models import Connector

    defined = pipeline.references or {}
    if not isinstance(defined, dict):
        return "must be an object: name -> {connector, options, ttl_seconds}"
    missing = sorted(set(needed) - set(defined))
    if missing:
        return f"steps use undefined reference(s): {', '.join(missing)}"
    for name, ref in defined.items():
        if not isinstance(ref, dict) or not isinstance(ref.get("connector"), str):
            return f"{name}: needs a connector name"
        connector = Connector.objects.filter(name=ref["connector"]).first()
        if connector is None:
            return f"{name}: no connector named {ref['connector']!r}"
        if not connector.plugin.capabilities.source:
            return f"{name}: a {connector.kind} connector cannot be read"
        ttl = ref.get("ttl_seconds", 600)
        if not isinstance(ttl, int) or not 0 <= ttl <= 86_400:
            return f"{name}: ttl_seconds must be 0 to 86400"
    return ""


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


#: What `start_run` reads of the pipeline and of its current version (attnames).
_START_RUN_PIPELINE = (
    "id",
    "name",
    "is_paused",
    "overlap_policy",
    "current_version_id",
)
_START_RUN_VERSION = ("id", "number", "content_hash")


def _locked_pipeline(pipeline_id: int) -> Pipeline:
    """The pipeline, its row locked until the transaction ends, with the columns
    `start_run` reads and its current version's number and hash (for the caller's
    answer), not the version's spec: one query.

    The SQL is built once per process (`_locked_pipeline_sql`) and the instances
    come from `Model.from_db` with the other fields deferred, as `.only()` would
    give them: Django compiling the equivalent `select_for_update()` +
    `select_related()` + `only()` query was a tenth of a run request's CPU.

    Raises:
        Pipeline.DoesNotExist: no such pipeline.
    """
    sql, pipeline_fields, version_fields = _locked_pipeline_sql()
    with connection.cursor() as cursor:
        cursor.execute(sql, [pipeline_id])
        row = cursor.fetchone()
    if row is None:
        raise Pipeline.DoesNotExist(f"no pipeline {pipeline_id}")
    count = len(pipeline_fields)
    pipeline = Pipeline.from_db(connection.alias, pipeline_fields, row[:count])
    if pipeline.current_version_id is not None:
        pipeline.current_version = PipelineVersion.from_db(
            connection.alias, version_fields, row[count:]
        )
    return pipeline


@functools.cache
def _locked_pipeline_sql() -> tuple[str, list[str], list[str]]:
    """`_locked_pipeline`'s SQL and the attnames of its columns, per model in the
    model's field order (the order `Model.from_db` takes values in)."""
    quote = connection.ops.quote_name
    pipeline_fields = [
        f for f in Pipeline._meta.concrete_fields if f.attname in _START_RUN_PIPELINE
    ]
    version_fields = [
        f
        for f in PipelineVersion._meta.concrete_fields
        if f.attname in _START_RUN_VERSION
    ]
    select = ", ".join(
        [f"p.{quote(f.column)}" for f in pipeline_fields]
        + [f"v.{quote(f.column)}" for f in version_fields]
    )
    features = connection.features
    if features.has_select_for_update_of:
        lock = " FOR UPDATE OF p"
    elif features.has_select_for_update:
        lock = " FOR UPDATE"
    else:
        lock = ""  # SQLite: one writer at a time anyway
    pipelines = quote(Pipeline._meta.db_table)
    versions = quote(PipelineVersion._meta.db_table)
    current = quote(Pipeline._meta.get_field("current_version").column)
    sql = (
        f"SELECT {select} FROM {pipelines} p LEFT JOIN {versions} v "  # noqa: S608 - model names
        f"ON v.{quote(PipelineVersion._meta.pk.column)} = p.{current} "
        f"WHERE p.{quote(Pipeline._meta.pk.column)} = %s{lock}"
    )
    return (
        sql,
        [f.attname for f in pipeline_fields],
        [f.attname for f in version_fields],
    )


def start_run(
    pipeline_id: int,
    *,
    trigger: str = RunTrigger.API,
    kind: str = RunKind.REGULAR,
    correlation_id: str | None = None,
    requested_by_id: int | None = None,
    params: dict[str, Any] | None = None,
    idempotency_key: str = "",
    request_hash: str = "",
) -> Run | None:
    """Create a queued run of the pipeline's current version and send its plan.

    Returns None when the overlap policy skips it (a scheduled run while one is
    active and the policy is `skip`). With an `idempotency_key` seen before for this
    pipeline, returns that run (its `replayed` attribute set) instead of a new one.

    Raises:
        PipelinePausedError: the pipeline is paused.
        IdempotencyConflictError: the key was used with another request.
    """
    cid = correlation_id or correlation.current() or correlation.new_id()
    values = {
        "kind": kind,
        "trigger": trigger,
        "correlation_id": cid,
        "requested_by_id": requested_by_id,
        "params": params or {},
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
    }
    run = None
    if trigger != RunTrigger.SCHEDULE and connection.vendor == "postgresql":
        run = _insert_queued_run(pipeline_id, values)
    if run is None:
        # Not inserted (no such pipeline, paused, no version yet, a key seen
        # before), a schedule's start (overlap policy) or SQLite: the general
        # path tells which and answers for it.
        run = _start_run_locked(pipeline_id, values)
        if run is None or getattr(run, "replayed", False):
            return run
    orchestration.send_plan(run.pk, cid)
    logger.info(
        "run_queued", run_id=run.pk, pipeline=run.pipeline.name, trigger=trigger
    )
    return run


def _start_run_locked(pipeline_id: int, values: dict[str, Any]) -> Run | None:
    """`start_run`'s general path: lock the pipeline, check it, create the run.

    Returns:
        The new run; a run seen before with the same key (`replayed` set); None
        when the overlap policy skips a scheduled run.
    """
    key, request_hash = values["idempotency_key"], values["request_hash"]
    trigger = values["trigger"]
    with transaction.atomic():
        # The row lock serialises run requests of one pipeline, so a key cannot
        # race (the unique constraint is the backstop).
        pipeline = _locked_pipeline(pipeline_id)
        if key and (
            pipeline.is_paused or trigger == RunTrigger.SCHEDULE
        ):  # a key seen before answers even where a new run would be refused
            existing = _run_for_key(pipeline, key, request_hash)
            if existing is not None:
                return existing
        if pipeline.is_paused:
            raise PipelinePausedError(f"pipeline {pipeline.name} is paused")
        version = pipeline.current_version or freeze_version(
            Pipeline.objects.get(pk=pipeline.pk)
        )
        if (
            trigger == RunTrigger.SCHEDULE
            and pipeline.overlap_policy == OverlapPolicy.SKIP
            and Run.objects.active_for(pipeline).exists()
        ):
            logger.info("run_skipped_overlap", pipeline=pipeline.name)
            return None
        if not key:
            return Run.objects.create(pipeline=pipeline, version=version, **values)
        # Insert first, in a savepoint: a new key (the usual case) costs no
        # lookup; a key seen before fails the unique index, then is looked up.
        try:
            with transaction.atomic():
                return Run.objects.create(pipeline=pipeline, version=version, **values)
        except IntegrityError:
            existing = _run_for_key(pipeline, key, request_hash)
            if existing is None:
                raise
            return existing


def _insert_queued_run(pipeline_id: int, values: dict[str, Any]) -> Run | None:
    """Insert a queued run of the pipeline's current version in one statement, or
    nothing: `start_run`'s usual case on PostgreSQL (a request that is not a
    schedule's, of a pipeline that is not paused and has a version, with a new
    Idempotency-Key or none).

    The statement locks the pipeline's row as the general path does (a pause
    waits for it, and it sees a pause committed first), and `ON CONFLICT DO
    NOTHING` leaves a key seen before to the general path. Run on its own it is
    its own transaction: no BEGIN, savepoint or COMMIT round trips, and no ORM
    insert compiled per request (a `POST .../runs/` went from 4 statements to 1,
    and from 7.0 to 4.9 ms of CPU: bench/api_profile.py).

    Returns:
        The run, its pipeline and version loaded with the fields the answer
        needs; None when nothing was inserted.
    """
    sql, fields = _insert_queued_run_sql()
    values = {**values, "state": RunState.QUEUED, "created_at": timezone.now()}
    params = [pipeline_id]
    for field in fields:
        value = (
            values[field.attname] if field.attname in values else field.get_default()
        )
        values[field.attname] = value
        params.append(field.get_db_prep_save(value, connection))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    run_id, pipeline_name, version_id, version_number, version_hash = row
    run = _from_db(
        Run,
        {"id": run_id, "pipeline_id": pipeline_id, "version_id": version_id} | values,
    )
    run.pipeline = _from_db(
        Pipeline,
        {"id": pipeline_id, "name": pipeline_name, "current_version_id": version_id},
    )
    run.version = _from_db(
        PipelineVersion,
        {"id": version_id, "number": version_number, "content_hash": version_hash},
    )
    run.pipeline.current_version = run.version
    return run


def _from_db(model: type[Any], values: dict[str, Any]) -> Any:
    """An instance as the database gave it (`Model.from_db`) from attname ->
    value; the model's other fields deferred."""
    fields = [f.attname for f in model._meta.concrete_fields if f.attname in values]
    return model.from_db(connection.alias, fields, [values[n] for n in fields])


@functools.cache
def _insert_queued_run_sql() -> tuple[str, list[Any]]:
    """`_insert_queued_run`'s statement (its first parameter the pipeline's id) and
    the run's fields whose values follow, in order: every concrete field but the
    primary key and the two foreign keys the statement reads from the pipeline."""
    quote = connection.ops.quote_name
    meta = Run._meta
    taken = {meta.pk.attname, "pipeline_id", "version_id"}
    fields = [f for f in meta.concrete_fields if f.attname not in taken]
    pipelines = quote(Pipeline._meta.db_table)
    versions = quote(PipelineVersion._meta.db_table)
    pipeline_pk = quote(Pipeline._meta.pk.column)
    version_pk = quote(PipelineVersion._meta.pk.column)
    current = quote(Pipeline._meta.get_field("current_version").column)
    paused = quote(Pipeline._meta.get_field("is_paused").column)
    name = quote(Pipeline._meta.get_field("name").column)
    number = quote(PipelineVersion._meta.get_field("number").column)
    content_hash = quote(PipelineVersion._meta.get_field("content_hash").column)
    columns = ", ".join(
        [quote(meta.get_field(n).column) for n in ("pipeline", "version")]
        + [quote(f.column) for f in fields]
    )
    placeholders = ", ".join(["%s"] * len(fields))
    sql = (
        "WITH locked AS ("  # noqa: S608 - names from the models
        f"SELECT p.{pipeline_pk} AS pipeline_id, p.{name} AS name, "
        f"v.{version_pk} AS version_id, v.{number} AS number, "
        f"v.{content_hash} AS content_hash "
        f"FROM {pipelines} p JOIN {versions} v ON v.{version_pk} = p.{current} "
        f"WHERE p.{pipeline_pk} = %s AND NOT p.{paused} FOR UPDATE OF p"
        f"), inserted AS (INSERT INTO {quote(meta.db_table)} ({columns}) "
        f"SELECT locked.pipeline_id, locked.version_id, {placeholders} FROM locked "
        f"ON CONFLICT DO NOTHING RETURNING {quote(meta.pk.column)} AS id) "
        "SELECT inserted.id, locked.name, locked.version_id, locked.number, "
        "locked.content_hash FROM inserted CROSS JOIN locked"
    )
    return sql, fields


def _run_for_key(pipeline: Pipeline, key: str, request_hash: str) -> Run | None:
    """The pipeline's run with this Idempotency-Key (`replayed` set), if any.

    Raises:
        IdempotencyConflictError: the key was used with another request.
    """
    existing = Run.objects.filter(pipeline=pipeline, idempotency_key=key).first()
    if existing is None:
        return None
    if existing.request_hash != request_hash:
        raise IdempotencyConflictError(
            "this Idempotency-Key was used with a different request"
        )
    existing.pipeline = pipeline
    existing.replayed = True
    return existing


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
    """Claim the run, plan its chunks once, prepare the sink, fill the window.

    A source's chunks are stored and sent as the plan finds them (see
    `_stream_plan`), so the first chunks run while the rest of the source is
    still being scanned. Safe to run twice: a planned run only gets its window
    topped up (this is also how a resumed run restarts); a run whose planning
    was interrupted is planned again, keeping the chunks already stored (the
    plan of an unchanged source is the same).
    """
    run = Run.objects.select_related("pipeline", "version").get(pk=run_id)
    if run.state == RunState.QUEUED and not claim_run(run_id):
        logger.info("run_waits_for_active_run", run_id=run_id)
        return
    run.refresh_from_db()
    if run.state != RunState.RUNNING:
        return
    if run.planned_at is None:
        if not _plan_chunks(run):
            return  # stopped while it was being planned
    else:
        _prepare_sink(run)
    with transaction.atomic():
        chunks = ChunkRun.objects.filter(run_id=run_id)
        if not chunks.unfinished().exists():
            orchestration.send_finalize(run_id, run.correlation_id)
            return
        _top_up(run)


def _top_up(run: Run) -> None:
    """Send pending chunks until the run's window is full."""
    in_flight = ChunkRun.objects.filter(
        run_id=run.pk, state__in=CHUNK_IN_FLIGHT
    ).count()
    dispatch_chunks(
        run.pk, max(0, run.pipeline.max_in_flight - in_flight), run.correlation_id
    )


def _prepare_sink(run: Run) -> None:
    """Create or check the sink's table before any chunk loads (idempotent)."""
    from integration import runtime
    from integration.drift import passes_through

    spec = run.version.spec
    if passes_through(spec["steps"]):
        # A pass-through pipeline's columns are the source's: its chunks prepare
        # the sink when they load (the first batch tells the schema).
        return
    compiled = runtime.compiled_version(run.version_id)
    sink = runtime.open_sink(spec["sink"]["connector"])
    try:
        sink.prepare(run.sink_options(), compiled.final_schema, run_id=run.pk)
    finally:
        sink.close()


#: While a source is being planned, its chunks are stored and the window topped
#: up every `PLAN_FLUSH_CHUNKS` chunks or `PLAN_FLUSH_SECONDS` seconds (the first
#: time as soon as the window's worth is found).
PLAN_FLUSH_CHUNKS = 256
PLAN_FLUSH_SECONDS = 2.0


def _plan_chunks(run: Run) -> bool:
    """Store the run's chunk plan (the source's chunks, or the dead letters
    replayed) and prepare the sink.

    Returns:
        False when the run stopped (cancelled, failed) while it was planned.
    """
    from integration import runtime

    spec = run.version.spec
    fingerprint = ""
    if run.params.get("chunks_of_run"):
        # A backfill of "the records of run X": X's chunk plan, read again.
        chunks = [
            ChunkRun(run_id=run.pk, seq=seq, spec=spec)
            for seq, spec in ChunkRun.objects.filter(run_id=run.params["chunks_of_run"])
            .order_by("seq")
            .values_list("seq", "spec")
        ]
        fingerprint = run.params.get("fingerprint", "")
    elif run.kind == RunKind.REPLAY:
        ids = sorted(run.params.get("dead_letter_ids", []))
        size = spec["chunk_rows"]
        chunks = [
            ChunkRun(
                run_id=run.pk, seq=seq, spec={"dead_letter_ids": ids[i : i + size]}
            )
            for seq, i in enumerate(range(0, len(ids), size))
        ]
    else:
        options = run.source_options()
        if (
            options.get("cursor")
            and run.pipeline.cursor_state
            and run.kind == RunKind.REGULAR
        ):
            # Incremental: start where the last successful run stopped.
            options["cursor_after"] = run.pipeline.cursor_state
        source = runtime.open_source(spec["source"]["connector"])
        try:
            fingerprint = source.fingerprint(options) or ""
            planned = (
                ChunkRun(run_id=run.pk, seq=c.seq, spec=c.spec)
                for c in source.plan(options, chunk_rows=spec["chunk_rows"])
            )
            if _load_order(run.pk) is None:
                return _stream_plan(run, planned, fingerprint)
            # Chunks that load in order (run-wide keys) are sent once the whole
            # plan is known: a run loading last to first starts at the end.
            chunks = list(planned)
        finally:
            source.close()
    with transaction.atomic():
        ChunkRun.objects.filter(run_id=run.pk).delete()
        ChunkRun.objects.bulk_create(chunks, batch_size=1000)
        Run.objects.filter(pk=run.pk).update(
            chunks_total=len(chunks),
            planned_at=timezone.now(),
            source_fingerprint=fingerprint[:200],
        )
    logger.info("run_planned", run_id=run.pk, chunks=len(chunks))
    _prepare_sink(run)
    return True


def _stream_plan(run: Run, planned: Iterator[ChunkRun], fingerprint: str) -> bool:
    """Store and send a source's chunks while its plan is still being found.

    The first chunks go out as soon as the window's worth is found; the rest
    are stored in steps, each topping up the window. `planned_at` (and the
    final `chunks_total`) are set once the plan is complete: until then no
    finished chunk finalizes the run (`complete_chunk` checks it). A plan
    interrupted and run again keeps the chunks already stored and adds the rest.

    Raises:
        TerminalError: the source changed since an interrupted plan began.
    """
    fingerprint = fingerprint[:200]
    if run.source_fingerprint and run.source_fingerprint != fingerprint:
        raise TerminalError(
            "the source changed while the run was being planned "
            f"({run.source_fingerprint} -> {fingerprint}); start a new run"
        )
    batch: list[ChunkRun] = []
    total = 0
    sent = False
    flushed = time.monotonic()
    for chunk in planned:
        batch.append(chunk)
        due = (
            len(batch) >= PLAN_FLUSH_CHUNKS
            or time.monotonic() - flushed >= PLAN_FLUSH_SECONDS
            if sent
            else len(batch) >= run.pipeline.max_in_flight
        )
        if not due:
            continue
        if not sent:
            _prepare_sink(run)
            sent = True
        total += len(batch)
        if not _store_chunks(run, batch, total, fingerprint):
            return False
        batch, flushed = [], time.monotonic()
    total += len(batch)
    if not _store_chunks(run, batch, total, fingerprint, complete=True):
        return False
    logger.info("run_planned", run_id=run.pk, chunks=total)
    if not sent:
        _prepare_sink(run)
    return True


def _store_chunks(
    run: Run,
    batch: list[ChunkRun],
    total: int,
    fingerprint: str,
    *,
    complete: bool = False,
) -> bool:
    """Store a step of a plan and top up the window; the last step (`complete`)
    sets `planned_at` instead (`plan_run` tops up after it).

    Returns:
        False when the run is no longer running (its stored chunks are skipped).
    """
    done = {"planned_at": timezone.now()} if complete else {}
    with transaction.atomic():
        ChunkRun.objects.bulk_create(batch, batch_size=1000, ignore_conflicts=True)
        updated = Run.objects.filter(pk=run.pk, state=RunState.RUNNING).update(
            chunks_total=total, source_fingerprint=fingerprint, **done
        )
        if not updated:
            _skip_pending(run.pk)
            return False
        if not complete:
            _top_up(run)
    return True


def _skip_pending(run_id: int) -> None:
    """Chunks stored for a run that stopped while it was planned never start."""
    ChunkRun.objects.filter(run_id=run_id, state=ChunkState.PENDING).update(
        state=ChunkState.SKIPPED, finished_at=timezone.now()
    )


def _load_order(run_id: int) -> str | None:
    """The order the run's chunks must load in (`runkeys.load_order` of its
    version's run-wide keys), None when each may load as soon as it is ready."""
    from integration import runkeys, runtime

    version_id = Run.objects.values_list("version_id", flat=True).get(pk=run_id)
    return runkeys.load_order(runtime.compiled_version(version_id).key_scopes)


def _fused(run_id: int) -> bool:
    """Whether the run's chunks go as one `process_chunk` task each."""
    return _fused_for(_load_order(run_id))


def _fused_for(order: str | None) -> bool:
    """One `process_chunk` task per chunk: when `DIS_FUSE_CHUNK_STEPS` is on and
    no chunk's load waits for the chunks before it (`order` None: run-wide keys
    load in order, through the chain's `load_chunk`)."""
    return settings.DIS_FUSE_CHUNK_STEPS and order is None


def dispatch_chunks(run_id: int, limit: int, correlation_id: str) -> int:
    """Claim up to `limit` pending chunks (lowest seq first; highest first when the
    run loads last to first) and send their chains.

    Each claim is a conditional UPDATE that issues a fresh attempt token, so a
    chunk is sent once even when two finishing chunks race to refill the window.
    """
    from integration import runkeys

    sent = 0
    # A deduplicate keeping the last row loads last to first: dispatch so too.
    order = _load_order(run_id)
    first = "-seq" if order == runkeys.DESCENDING else "seq"
    fused = _fused_for(order)
    while sent < limit:
        if not Run.objects.filter(pk=run_id, state=RunState.RUNNING).exists():
            break
        candidate = (
            ChunkRun.objects.filter(run_id=run_id, state=ChunkState.PENDING)
            .order_by(first)
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
            touched_at=timezone.now(),
            step_open=False,
        )
        if claimed:
            ids = orchestration.send_chunk(
                run_id, candidate, str(token), correlation_id, fused=fused
            )
            ChunkRun.objects.filter(run_id=run_id, seq=candidate).update(
                task_ids=ids or []
            )
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
    source_options: dict[str, Any]
    sink_options: dict[str, Any]


def begin_attempt(
    run_id: int,
    seq: int,
    token: str,
    *,
    step: str,
    task_id: str = "",
    mark_running: bool = False,
) -> Attempt | None:
    """The attempt's context, or None when it is stale (superseded, finished, stopped)
    or quarantined.

    A stale attempt returns quietly: a newer attempt or the end of the run owns it.
    The step is recorded as open until `end_step`; finding it still open means its
    last execution killed the worker (SIGKILL, OOM, `os._exit`): after
    `DIS_MAX_CHUNK_CRASHES` such crashes the chunk is quarantined, not retried.
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
    now = timezone.now()
    crashed = (
        bool(task_id)
        and chunk.step == step
        and chunk.step_open
        and chunk.step_task_id == task_id
        and _owner_gone(chunk.step_owner, chunk.touched_at, now)
    )
    ChunkRun.objects.filter(pk=chunk.pk, attempt_token=token).update(
        crashes=F("crashes") + 1 if crashed else F("crashes"),
        step=step,
        step_open=True,
        step_task_id=task_id,
        step_owner=_THIS_PROCESS(),
        touched_at=now,
        **(
            {"state": ChunkState.RUNNING, "started_at": now}
            if mark_running and chunk.state == ChunkState.QUEUED
            else {}
        ),
    )
    structlog.contextvars.bind_contextvars(run_id=run_id, chunk_seq=seq)
    crashes = ChunkRun.objects.values_list("crashes", flat=True).get(pk=chunk.pk)
    if crashes >= settings.DIS_MAX_CHUNK_CRASHES:
        quarantine_chunk(run_id, seq, token, step=step, crashes=crashes)
        return None
    return Attempt(
        run_id=run_id,
        seq=seq,
        token=token,
        chunk_spec=chunk.spec,
        version_id=run.version_id,
        version_spec=run.version.spec,
        correlation_id=run.correlation_id,
        source_options=run.source_options(),
        sink_options=run.sink_options(),
    )


def _THIS_PROCESS() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    """Whether a process of this host runs (a zombie, dead but not yet reaped by
    its pool, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _owner_gone(owner: str, touched_at: Any, now: Any) -> bool:
    """Did the process that opened a step die (rather than still run it)?

    The same message coming back while its step is open is either a crash (the
    worker died and the broker redelivered) or a redelivery to a live worker (its
    visibility timeout passed while it waited or ran). On the same host the pid
    tells; on another host, an opener quiet for longer than the hard time limit is
    gone (the limit would have killed it).
    """
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not _alive(int(pid))
    if touched_at is None:
        return True
    return (now - touched_at).total_seconds() > settings.CELERY_TASK_TIME_LIMIT


def loading_elsewhere(run_id: int, seq: int, token: str, task_id: str) -> bool:
    """Is another live task loading this attempt's chunk right now, in a pipeline
    whose chunks load in order? A load sent to wake a waiting chunk and the chunk's
    own later check may both arrive: the second then leaves the work to the first
    (were the first's worker to die, its message comes back)."""
    from integration import runkeys, runtime

    chunk = (
        ChunkRun.objects.filter(
            run_id=run_id, seq=seq, attempt_token=token, step="load", step_open=True
        )
        .exclude(step_task_id__in=("", task_id))
        .select_related("run")
        .first()
    )
    if chunk is None:
        return False
    scopes = runtime.compiled_version(chunk.run.version_id).key_scopes
    if runkeys.load_order(scopes) is None:
        return False
    return not _owner_gone(chunk.step_owner, chunk.touched_at, timezone.now())


def end_step(run_id: int, seq: int, token: str) -> None:
    """The step of this attempt returned or raised: it did not kill its worker."""
    ChunkRun.objects.filter(run_id=run_id, seq=seq, attempt_token=token).update(
        step_open=False, touched_at=timezone.now()
    )


def quarantine_chunk(
    run_id: int, seq: int, token: str, *, step: str, crashes: int
) -> bool:
    """Stop retrying a chunk that keeps killing its worker; record why.

    The chunk gets a dead letter (step `chunk`, class `quarantine`) holding its
    plan, and counts as finished; the run then ends `failed`, naming it, and can be
    resumed once the cause is fixed.
    """
    with transaction.atomic():
        updated = ChunkRun.objects.filter(
            run_id=run_id, seq=seq, attempt_token=token, state__in=CHUNK_IN_FLIGHT
        ).update(
            state=ChunkState.QUARANTINED, step_open=False, finished_at=timezone.now()
        )
        if not updated:
            return False
        run = Run.objects.get(pk=run_id)
        chunk = ChunkRun.objects.get(run_id=run_id, seq=seq)
        DeadLetter.objects.create(
            run_id=run_id,
            pipeline_id=run.pipeline_id,
            chunk_seq=seq,
            step="chunk",
            error_class="quarantine",
            error=(
                f"chunk {seq} killed its worker {crashes} times during {step}; "
                "quarantined instead of retried"
            ),
            payload={"chunk": chunk.spec},
            attempts=crashes,
        )
        logger.error("chunk_quarantined", run_id=run_id, chunk_seq=seq, step=step)
        run = Run.objects.select_for_update().get(pk=run_id)  # see complete_chunk
        if (
            run.planned_at is not None
            and not ChunkRun.objects.filter(run_id=run_id).unfinished().exists()
        ):
            orchestration.send_finalize(run_id, run.correlation_id)
        else:
            dispatch_chunks(run_id, 1, run.correlation_id)
    return True


def record_chunk_stats(
    run_id: int, seq: int, token: str, stats: dict[str, Any]
) -> None:
    """Keep the statistics of the chunk's current attempt (merged by key: extract
    records drift, transform the reference caches)."""
    with transaction.atomic():
        chunk = (
            ChunkRun.objects.select_for_update()
            .filter(run_id=run_id, seq=seq, attempt_token=token)
            .only("stats")
            .first()
        )
        if chunk is not None:
            ChunkRun.objects.filter(pk=chunk.pk).update(
                stats={**(chunk.stats or {}), **stats}
            )


def prepare_options(attempt: Attempt) -> dict[str, Any]:
    """The sink options a pass-through chunk prepares the target with.

    With a drift policy other than `ignore`, a SQL sink adds the columns it lacks
    (`evolve: add_columns`): only columns of the source schema reach it (`freeze`
    and `quarantine` leave new ones out; `evolve` takes them into the schema).
    """
    options = dict(attempt.sink_options)
    drift = attempt.version_spec.get("drift") or {}
    if drift.get("policy", "ignore") != "ignore":
        from connectors.models import Connector

        connector = Connector.objects.get(pk=attempt.version_spec["sink"]["connector"])
        schema = connector.plugin.write_options_schema
        if schema is not None and "evolve" in schema._declared_fields:
            options["evolve"] = "add_columns"
    return options


def run_stats(run: Run) -> dict[str, Any]:
    """A run's engine statistics: reference cache hits/misses and the oldest age,
    and the schema drift its chunks found (`drift`, when any)."""
    return stats_of_chunks(list(run.chunks.values_list("stats", flat=True)))


def stats_of_chunks(all_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """`run_stats` from the `stats` of every chunk of the run."""
    from integration.drift import run_drift_stats

    refs: dict[str, dict[str, Any]] = {}
    for stats in all_stats:
        for name, ref in (stats or {}).get("references", {}).items():
            agg = refs.setdefault(
                name, {"hits": 0, "misses": 0, "max_age_seconds": 0.0}
            )
            agg["misses" if ref["source"] == "miss" else "hits"] += 1
            agg["max_age_seconds"] = max(agg["max_age_seconds"], ref["age_seconds"])
    found = run_drift_stats(all_stats)
    return {"references": refs, **({"drift": found} if found else {})}


#: Source references kept per rule as samples in the data-quality report.
QUALITY_SAMPLES = 10


def chunk_quality(violations: pa.Table, rejected: pa.Table) -> dict[str, Any]:
    """A chunk's data-quality figures, kept in its stats.

    Args:
        violations: the engine's rule violations (``rule``, ``_source_ref``).
        rejected: the rejected rows (with ``_step``).

    Returns:
        ``rules``: rule path -> ``violations`` and up to ``QUALITY_SAMPLES``
        ``samples`` (source references, in source order); ``rejected_by_step``:
        step -> rejected rows.
    """
    rules: dict[str, dict[str, Any]] = {}
    for rule, ref in zip(
        violations.column("rule").to_pylist(),
        violations.column(SOURCE_REF_COLUMN).to_pylist(),
        strict=True,
    ):
        entry = rules.setdefault(rule, {"violations": 0, "samples": []})
        entry["violations"] += 1
        if len(entry["samples"]) < QUALITY_SAMPLES:
            entry["samples"].append(ref)
    by_step: dict[str, int] = {}
    if rejected.num_rows and "_step" in rejected.column_names:
        for step in rejected.column("_step").to_pylist():
            by_step[step or "unknown"] = by_step.get(step or "unknown", 0) + 1
    return {"rules": rules, "rejected_by_step": by_step}


def quality_report(run: Run) -> dict[str, Any]:
    """A run's data-quality report, from its committed chunks.

    Every validate rule of the run's version is listed (in step order) with its
    violations and up to ``QUALITY_SAMPLES`` sample source references (the
    first, in chunk order); a rule counts every rejected row it fails, also
    when another rule or step rejected the row too.
    """
    from transforms.engine.compiler import rule_index
    from transforms.engine.steps import parse_steps

    try:
        known = rule_index(parse_steps(run.version.spec["steps"]))
    except Exception:  # noqa: BLE001 - an old version that no longer parses
        known = {}
    rules = {
        path: {**meta, "rule": path, "violations": 0, "samples": []}
        for path, meta in known.items()
    }
    by_step: dict[str, int] = {}
    chunks = run.chunks.filter(state=ChunkState.DONE).order_by("seq")
    for stats in chunks.values_list("stats", flat=True):
        quality = (stats or {}).get("quality") or {}
        for path, figures in quality.get("rules", {}).items():
            entry = rules.setdefault(
                path,
                {"step": None, "field": "", "kind": "", "rule": path},
            )
            entry.setdefault("violations", 0)
            entry.setdefault("samples", [])
            entry["violations"] += figures["violations"]
            room = QUALITY_SAMPLES - len(entry["samples"])
            entry["samples"].extend(figures["samples"][: max(room, 0)])
        for step, count in quality.get("rejected_by_step", {}).items():
            by_step[step] = by_step.get(step, 0) + count
    return {
        "run": run.pk,
        "records_read": run.records_read,
        "records_rejected": run.records_rejected,
        "rules": list(rules.values()),
        "rejected_by_step": by_step,
    }


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
            touched_at=timezone.now(),
            step_open=False,
        )
        if updated:
            cid = Run.objects.values_list("correlation_id", flat=True).get(pk=run_id)
            ids = orchestration.send_chunk(
                run_id, seq, str(new_token), cid, fused=_fused(run_id)
            )
            ChunkRun.objects.filter(run_id=run_id, seq=seq).update(task_ids=ids or [])
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
    deduplicated: int = 0


def dead_letters_from(
    rejected: pa.Table, *, run_id: int, pipeline_id: int, seq: int
) -> list[DeadLetter]:
    """DeadLetter rows for a rejected batch: original values, step, error, source."""
    if rejected.num_rows == 0:
        return []
    payload_cols = [c for c in rejected.column_names if c not in REJECT_META_COLUMNS]
    payloads = rejected.select(payload_cols).to_pylist()
    if "_raw" in rejected.column_names:
        # A row the reader could not split into fields: its raw text is the record.
        for i, raw in enumerate(rejected.column("_raw").to_pylist()):
            if raw is not None:
                payloads[i] = {"_raw": raw}
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


def admit_chunk(attempt: Attempt, *, read: int, rejected: pa.Table) -> bool:
    """The error policy, before a chunk commits: False stops the run as failed.

    The ratio counts committed chunks plus this one. A chunk that would push it
    above the pipeline's limit is not written; its rejected rows still become dead
    letters so operators see why, and a resumed run processes it again.
    """
    if rejected.num_rows == 0:
        return True
    run = Run.objects.get(pk=attempt.run_id)
    limit = attempt.version_spec["max_rejected_ratio"]
    total_read = run.records_read + read
    ratio = (run.records_rejected + rejected.num_rows) / total_read if total_read else 1
    if ratio <= limit:
        return True
    reason = (
        f"chunk {attempt.seq} has {rejected.num_rows} rejected of {read} rows: the "
        f"rejected ratio would be {ratio:.4f}, above the pipeline's limit {limit}. "
        f"No new chunk starts; {run.records_written} rows committed by "
        f"{run.chunks_done} earlier chunk(s) stay in the sink. The dead letters "
        "show why; fix the pipeline and resume the run."
    )
    with transaction.atomic():
        if stop_run(attempt.run_id, RunState.FAILED, reason):
            DeadLetter.objects.filter(
                run_id=attempt.run_id, chunk_seq=attempt.seq
            ).delete()
            DeadLetter.objects.bulk_create(
                dead_letters_from(
                    rejected,
                    run_id=attempt.run_id,
                    pipeline_id=run.pipeline_id,
                    seq=attempt.seq,
                ),
                batch_size=1000,
            )
    return False


def complete_chunk(
    attempt: Attempt,
    counts: ChunkCounts,
    rejected: pa.Table,
    *,
    partial: bytes | None = None,
) -> bool:
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
            records_deduplicated=counts.deduplicated,
            partial=partial,
        )
        if not updated:
            return False
        run = Run.objects.select_related("pipeline").get(pk=run_id)
        if run.kind == RunKind.REPLAY:
            letters = _settle_replayed(run, attempt.chunk_spec, rejected)
        else:
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
            records_deduplicated=F("records_deduplicated") + counts.deduplicated,
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
        elif (
            run.planned_at is not None
            and not ChunkRun.objects.filter(run_id=run_id).unfinished().exists()
        ):
            # `run` was read after this transaction updated (and locked) its row:
            # a plan completed before that is seen here, one completed after it
            # sees this chunk done and finalizes itself (see `_stream_plan`).
            orchestration.send_finalize(run_id, run.correlation_id)
        else:
            dispatch_chunks(run_id, 1, run.correlation_id)
    # After the commit: the next chunk's load either sees this one done or is seen
    # waiting here.
    from integration import runkeys

    runkeys.wake_next(attempt.version_id, run_id, seq, attempt.correlation_id)
    return True


def _settle_replayed(
    run: Run, chunk_spec: dict[str, Any], rejected: pa.Table
) -> list[DeadLetter]:
    """After a replay chunk committed: its records that passed are `replayed` by this
    run; those rejected again stay open with the new error and one more attempt."""
    ids = chunk_spec["dead_letter_ids"]
    again = {
        ref: (error, step)
        for ref, error, step in zip(
            rejected.column(SOURCE_REF_COLUMN).to_pylist(),
            rejected.column("_error").to_pylist(),
            rejected.column("_step").to_pylist(),
            strict=True,
        )
    }
    letters = list(DeadLetter.objects.filter(pk__in=ids, state=DeadLetterState.OPEN))
    failed = []
    for letter in letters:
        if letter.source_ref in again:
            letter.error, letter.step = again[letter.source_ref]
            letter.attempts += 1
            failed.append(letter)
        else:
            letter.state = DeadLetterState.REPLAYED
            letter.replay_run = run
    DeadLetter.objects.bulk_update(
        letters, ["state", "replay_run", "error", "step", "attempts", "updated_at"]
    )
    return failed


# --- Dead letters -----------------------------------------------------------------


def replay_dead_letters(
    ids: list[int],
    *,
    version_id: int | None = None,
    correlation_id: str | None = None,
    requested_by_id: int | None = None,
) -> Run:
    """Start a replay run of open dead letters of one pipeline.

    The records go through the pipeline's current version (or `version_id`) into its
    sink; each one that passes is marked replayed by the new run.

    Raises:
        ValidationError: no open dead letters, several pipelines, a foreign version.
    """
    letters = DeadLetter.objects.filter(pk__in=ids, state=DeadLetterState.OPEN)
    pipelines = set(letters.values_list("pipeline_id", flat=True))
    if not pipelines:
        raise ValidationError({"ids": "no open dead letters among these"})
    if len(pipelines) > 1:
        raise ValidationError(
            {
                "ids": "dead letters of several pipelines: replay "
                "each pipeline's separately"
            }
        )
    (pipeline_id,) = pipelines
    cid = correlation_id or correlation.current() or correlation.new_id()
    with transaction.atomic():
        pipeline = Pipeline.objects.select_for_update().get(pk=pipeline_id)
        if version_id is None:
            version = pipeline.current_version or freeze_version(pipeline)
        else:
            version = PipelineVersion.objects.filter(
                pk=version_id, pipeline=pipeline
            ).first()
            if version is None:
                raise ValidationError(
                    {"version": f"not a version of pipeline {pipeline.name}"}
                )
        run = Run.objects.create(
            pipeline=pipeline,
            version=version,
            kind=RunKind.REPLAY,
            trigger=RunTrigger.API,
            correlation_id=cid,
            requested_by_id=requested_by_id,
            params={"dead_letter_ids": sorted(letters.values_list("pk", flat=True))},
        )
        orchestration.send_plan(run.pk, cid)
    logger.info(
        "replay_queued", run_id=run.pk, dead_letters=len(run.params["dead_letter_ids"])
    )
    return run


def discard_dead_letters(ids: list[int], reason: str) -> int:
    """Mark open dead letters discarded with a reason; returns how many."""
    return DeadLetter.objects.filter(pk__in=ids, state=DeadLetterState.OPEN).update(
        state=DeadLetterState.DISCARDED,
        discard_reason=reason,
        updated_at=timezone.now(),
    )


def replay_table(chunk_spec: dict[str, Any]) -> pa.Table:
    """The records of a replay chunk: the dead letters' payloads as they were read."""
    rows = list(
        DeadLetter.objects.filter(pk__in=chunk_spec["dead_letter_ids"])
        .order_by("pk")
        .values_list("payload", "source_ref")
    )
    payloads = [dict(p) for p, _ in rows]
    raws = [p.pop("_raw", None) for p in payloads]
    columns: dict[str, None] = {}
    for p in payloads:
        columns.update(dict.fromkeys(p))
    # Payload values are the source's values as read: text, or null.
    payloads = [
        {k: None if v is None else str(v) for k, v in p.items()} for p in payloads
    ]
    table = pa.table(
        {
            **{c: pa.array([p.get(c) for p in payloads], pa.string()) for c in columns},
            SOURCE_REF_COLUMN: pa.array([ref for _, ref in rows], pa.string()),
        }
    )
    if any(raw is not None for raw in raws):
        # Records the reader could not split stay unreadable until edited.
        unreadable = "the record could not be read into fields: edit its payload"
        table = table.append_column(
            "_read_error",
            pa.array(
                [unreadable if r is not None else None for r in raws], pa.string()
            ),
        ).append_column("_raw", pa.array(raws, pa.string()))
    return table


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
        # Chunks in flight are skipped too: their queued tasks are revoked, any
        # that still run find them finished and stop, and the sink's fence refuses
        # a commit of a stopped run.
        unfinished = ChunkRun.objects.filter(run_id=run_id).unfinished()
        orchestration.revoke(
            [i for ids in unfinished.values_list("task_ids", flat=True) for i in ids]
        )
        unfinished.update(state=ChunkState.SKIPPED, finished_at=timezone.now())
        run = Run.objects.get(pk=run_id)
        promote_next(run.pipeline_id)
        run_ended(run)
    logger.warning("run_stopped", run_id=run_id, state=state, reason=reason)
    return True


def cancel_run(run_id: int, reason: str = "cancelled by an operator") -> bool:
    """Cancel a queued or running run: no new chunk starts, none commits any more.

    Returns False when the run had already ended.
    """
    with transaction.atomic():
        if Run.objects.filter(pk=run_id, state=RunState.QUEUED).update(
            state=RunState.CANCELLED, error=reason, finished_at=timezone.now()
        ):
            run_ended(Run.objects.get(pk=run_id))
            logger.info("run_cancelled", run_id=run_id, reason=reason)
            return True
    return stop_run(run_id, RunState.CANCELLED, reason)


def resume_run(run_id: int, *, use_current_version: bool = False) -> Run:
    """Run again the chunks of a failed or cancelled run that were not committed.

    The stored chunk plan is reused, so the source must be unchanged since the plan
    (its fingerprint is compared). With `use_current_version` the pipeline's current
    version (a corrected mapping, say) processes the remaining chunks, provided it
    reads the source the same way.

    Raises:
        ResumeRefusedError: with the reason.
    """
    from integration import runtime

    run = Run.objects.select_related("pipeline", "version").get(pk=run_id)
    if run.state not in (RunState.FAILED, RunState.CANCELLED):
        raise ResumeRefusedError(
            f"run {run_id} is {run.state}; only failed or cancelled runs can be resumed"
        )
    if run.planned_at is None:
        raise ResumeRefusedError(f"run {run_id} was never planned; start a new run")
    version = run.version
    if use_current_version:
        pipeline = run.pipeline
        version = pipeline.current_version or freeze_version(pipeline)
        for key in ("source", "chunk_rows"):
            if version.spec[key] != run.version.spec[key]:
                raise ResumeRefusedError(
                    f"version {version.number} reads the source differently "
                    f"({key} changed): the stored chunk plan does not fit it"
                )
        from integration import runkeys

        keys_error = runkeys.resume_error(
            runtime.compiled_version(run.version_id),
            runtime.compiled_version(version.pk),
        )
        if keys_error:
            raise ResumeRefusedError(f"version {version.number}: {keys_error}")
    spec = version.spec["source"]
    source = runtime.open_source(spec["connector"])
    try:
        fingerprint = (source.fingerprint(spec["options"]) or "")[:200]
    finally:
        source.close()
    if fingerprint != run.source_fingerprint:
        raise ResumeRefusedError(
            "the source changed since the run was planned "
            f"(fingerprint {run.source_fingerprint or '-'} -> {fingerprint or '-'}); "
            "start a new run instead"
        )
    with transaction.atomic():
        reopened = ChunkRun.objects.filter(
            run_id=run_id, state__in=CHUNK_RESUMABLE
        ).update(state=ChunkState.PENDING, step_open=False, crashes=0)
        updated = Run.objects.filter(
            pk=run_id, state__in=(RunState.FAILED, RunState.CANCELLED)
        ).update(
            state=RunState.QUEUED,
            version=version,
            error="",
            finished_at=None,
            resumed_count=F("resumed_count") + 1,
        )
        if not updated:
            raise ResumeRefusedError(f"run {run_id} changed state meanwhile")
        orchestration.send_plan(run_id, run.correlation_id)
    logger.info("run_resumed", run_id=run_id, chunks=reopened, version=version.number)
    run.refresh_from_db()
    return run


def fail_run(run_id: int, reason: str) -> bool:
    """Fail a queued or running run with `reason` (shown to operators)."""
    with transaction.atomic():
        if Run.objects.filter(pk=run_id, state=RunState.QUEUED).update(
            state=RunState.FAILED, error=reason, finished_at=timezone.now()
        ):
            run_ended(Run.objects.get(pk=run_id))
            logger.warning("run_failed", run_id=run_id, reason=reason)
            return True
    return stop_run(run_id, RunState.FAILED, reason)


def finalize_run(run_id: int) -> None:
    """Give a run whose chunks are all finished its terminal state, then start the
    next queued run of the pipeline. Idempotent."""
    from integration import runtime

    run = Run.objects.select_related("version").get(pk=run_id)
    if run.state != RunState.RUNNING or run.planned_at is None:
        return  # a run still being planned is finalized by its plan_run
    if ChunkRun.objects.filter(run_id=run_id).unfinished().exists():
        return
    state = run.outcome_state()
    reason = ""
    quarantined = list(
        ChunkRun.objects.filter(run_id=run_id, state=ChunkState.QUARANTINED)
        .order_by("seq")
        .values_list("seq", flat=True)
    )
    if quarantined:
        state = RunState.FAILED
        reason = (
            f"chunk(s) {', '.join(map(str, quarantined))} quarantined after killing "
            f"their worker; {run.records_written} rows of the other chunks are "
            "committed. Fix the cause and resume the run."
        )
    elif state == RunState.FAILED:
        reason = (
            f"rejected ratio {run.rejected_ratio:.4f} is above the pipeline's limit "
            f"{run.version.spec['max_rejected_ratio']}; "
            f"{run.records_written} committed rows stay in the sink"
        )
    else:
        spec = run.version.spec
        sink = runtime.open_sink(spec["sink"]["connector"])
        try:
            compiled = runtime.compiled_version(run.version_id)
            if compiled.is_aggregate:
                written = _write_aggregate(run, compiled, sink)
                Run.objects.filter(pk=run_id).update(records_written=written)
            sink.finalize(run.sink_options(), run_id=run_id)
        finally:
            sink.close()
    with transaction.atomic():
        updated = Run.objects.filter(pk=run_id, state=RunState.RUNNING).update(
            state=state, error=reason, finished_at=timezone.now()
        )
        if updated and state != RunState.FAILED and run.kind == RunKind.REGULAR:
            _advance_cursor(run)
        if updated:
            promote_next(run.pipeline_id)
            run.refresh_from_db()
            run_ended(run)
    if updated and state != RunState.FAILED:
        # Only a failed or cancelled run can be resumed: nothing needs the keys.
        from integration import runkeys

        runkeys.forget(run_id)
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


def _write_aggregate(run: Run, compiled: Any, sink: Any) -> int:
    """Merge the chunks' partial aggregates and write the result, as one more
    chunk (seq = chunks_total) so a repeated finalize replaces, never duplicates."""
    from integration.staging import from_ipc

    partials = [
        from_ipc(bytes(blob))
        for blob in ChunkRun.objects.filter(run_id=run.pk, state=ChunkState.DONE)
        .exclude(partial=None)
        .values_list("partial", flat=True)
    ]
    final = compiled.merge_partials(partials)
    final = final.append_column(
        SOURCE_REF_COLUMN,
        pa.array([f"aggregate:run-{run.pk}"] * final.num_rows, pa.string()),
    )
    result = sink.write(
        run.sink_options(),
        final,
        run_id=run.pk,
        chunk_seq=run.chunks_total,
        fence=lambda: Run.objects.filter(pk=run.pk, state=RunState.RUNNING).exists(),
    )
    logger.info("aggregate_written", run_id=run.pk, groups=result.rows_written)
    return result.rows_written


def _advance_cursor(run: Run) -> None:
    """Save where an incremental run stopped: only a run that succeeded moves it."""
    # Every chunk of an incremental plan carries the same upper position.
    spec = ChunkRun.objects.filter(run_id=run.pk).values_list("spec", flat=True).first()
    if spec and spec.get("cursor_upto") is not None:
        Pipeline.objects.filter(pk=run.pipeline_id).update(
            cursor_state=spec["cursor_upto"]
        )
        logger.info("cursor_advanced", run_id=run.pk, cursor=spec["cursor_upto"])


def run_ended(run: Run) -> None:
    """A run reached its terminal state: tell the workflows waiting on it, and the
    pipeline's webhook when it failed or has errors (both after commit)."""
    from integration import workflows

    if run.trigger == RunTrigger.WORKFLOW:
        workflows.on_run_ended(run)
    if run.pipeline.notify_url and run.state in (
        RunState.FAILED,
        RunState.SUCCEEDED_WITH_ERRORS,
    ):
        orchestration.send_notification(run.pk, run.correlation_id)


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


# --- Schedules --------------------------------------------------------------------

#: The task beat sends for a schedule, by the kind of object scheduled.
SCHEDULE_TASKS = {
    "Pipeline": "integration.scheduled_run",
    "Workflow": "integration.scheduled_workflow",
}


def validate_schedule(pipeline: Pipeline | Any) -> None:
    """Check the cron expression / interval / time zone of a pipeline or workflow.

    Raises:
        ValidationError: naming the field.
    """
    import zoneinfo

    from celery.schedules import crontab_parser

    if pipeline.schedule_cron and pipeline.schedule_interval_seconds:
        raise ValidationError(
            {"schedule_cron": "give a cron expression or an interval, not both"}
        )
    if pipeline.schedule_cron:
        parts = pipeline.schedule_cron.split()
        if len(parts) != 5:
            raise ValidationError(
                {"schedule_cron": "five fields: minute hour day month weekday"}
            )
        limits = [(60, 0), (24, 0), (31, 1), (12, 1), (7, 0)]
        for part, (size, start) in zip(parts, limits, strict=True):
            try:
                crontab_parser(size, start).parse(part)
            except ValueError as exc:
                raise ValidationError({"schedule_cron": f"{part!r}: {exc}"}) from None
    try:
        zoneinfo.ZoneInfo(pipeline.schedule_timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValidationError(
            {"schedule_timezone": f"unknown time zone {pipeline.schedule_timezone!r}"}
        ) from None


def sync_schedule(pipeline: Pipeline | Any) -> None:
    """Keep a pipeline's (or workflow's) django-celery-beat PeriodicTask in step with
    its schedule.

    No schedule: the task is deleted. A paused one keeps its task, disabled.
    """
    from django_celery_beat.models import (
        CrontabSchedule,
        IntervalSchedule,
        PeriodicTask,
    )

    kind = type(pipeline).__name__
    task = pipeline.periodic_task
    if not pipeline.schedule_cron and not pipeline.schedule_interval_seconds:
        if task is not None:
            type(pipeline).objects.filter(pk=pipeline.pk).update(periodic_task=None)
            task.delete()
            pipeline.periodic_task = None
        return
    schedule: dict[str, Any] = {"crontab": None, "interval": None}
    if pipeline.schedule_cron:
        minute, hour, day, month, weekday = pipeline.schedule_cron.split()
        schedule["crontab"], _ = CrontabSchedule.objects.get_or_create(
            minute=minute,
            hour=hour,
            day_of_month=day,
            month_of_year=month,
            day_of_week=weekday,
            timezone=pipeline.schedule_timezone,
        )
    else:
        schedule["interval"], _ = IntervalSchedule.objects.get_or_create(
            every=pipeline.schedule_interval_seconds, period=IntervalSchedule.SECONDS
        )
    values = {
        "name": f"{kind.lower()}:{pipeline.pk}:{pipeline.name}"[:200],
        "task": SCHEDULE_TASKS[kind],
        "args": f"[{pipeline.pk}]",
        "enabled": not pipeline.is_paused,
        **schedule,
    }
    if task is None:
        task = PeriodicTask.objects.create(**values)
        type(pipeline).objects.filter(pk=pipeline.pk).update(periodic_task=task)
        pipeline.periodic_task = task
    else:
        for key, value in values.items():
            setattr(task, key, value)
        task.save()
    logger.info(
        "schedule_synced",
        kind=kind,
        name=pipeline.name,
        enabled=task.enabled,
        cron=pipeline.schedule_cron,
        interval=pipeline.schedule_interval_seconds,
    )


def save_pipeline(pipeline: Pipeline) -> PipelineVersion:
    """After a pipeline was saved: freeze its version and sync its schedule."""
    version = freeze_version(pipeline)
    sync_schedule(pipeline)
    return version


# --- Backfills --------------------------------------------------------------------


def start_backfill(
    pipeline_id: int,
    scope: dict[str, Any],
    *,
    correlation_id: str | None = None,
    requested_by_id: int | None = None,
) -> Run:
    """Re-run a pipeline for a scope, writing with upsert, as a run of kind backfill.

    `scope` is `{"run": id}` (the records of that run: its chunk plan again, the
    source unchanged), `{"cursor_from": a, "cursor_to": b}` (a half-open range of
    the source's cursor) or `{"keys": [[...], ...]}` (those keys) — the last two for
    sources that can scope a read (PostgreSQL).

    Raises:
        ValidationError: naming `scope` or `sink_options`, with the reason.
    """
    from integration import runtime

    pipeline = Pipeline.objects.select_related("sink", "source").get(pk=pipeline_id)
    version = pipeline.current_version or freeze_version(pipeline)
    sink_options = {**version.spec["sink"]["options"], "write_mode": "upsert"}
    if not sink_options.get("key"):
        raise ValidationError(
            {
                "sink_options": "a backfill writes with upsert: the pipeline's "
                "sink_options need a key"
            }
        )
    if not pipeline.sink.plugin.capabilities.upsert:
        raise ValidationError(
            {"sink_options": f"a {pipeline.sink.kind} sink cannot upsert"}
        )
    params: dict[str, Any] = {"sink_options": sink_options, "scope": scope}
    if set(scope) == {"run"}:
        source_run = Run.objects.filter(pk=scope["run"], pipeline=pipeline).first()
        if source_run is None or source_run.planned_at is None:
            raise ValidationError(
                {"scope": f"no planned run {scope['run']} of this pipeline"}
            )
        if source_run.version.spec["source"] != version.spec["source"] or (
            source_run.version.spec["chunk_rows"] != version.spec["chunk_rows"]
        ):
            raise ValidationError(
                {
                    "scope": f"run {source_run.pk} read the source "
                    "differently from the current version"
                }
            )
        if source_run.kind == RunKind.REPLAY:
            raise ValidationError({"scope": "a replay run has no source records"})
        source = runtime.open_source(version.spec["source"]["connector"])
        try:
            fingerprint = (source.fingerprint(source_run.source_options()) or "")[:200]
        finally:
            source.close()
        if fingerprint != source_run.source_fingerprint:
            raise ValidationError(
                {
                    "scope": "the source changed since run "
                    f"{source_run.pk}; its records cannot be read again"
                }
            )
        params.update(chunks_of_run=source_run.pk, fingerprint=fingerprint)
    else:
        source_options = {**version.spec["source"]["options"], "scope": scope}
        from connectors.exceptions import ConfigError

        try:
            pipeline.source.plugin.validate_options("source", source_options)
        except ConfigError as exc:
            raise ValidationError(
                {"scope": f"this source cannot read that scope: {exc}"}
            ) from None
        params["source_options"] = {"scope": scope}
    cid = correlation_id or correlation.current() or correlation.new_id()
    with transaction.atomic():
        run = Run.objects.create(
            pipeline=pipeline,
            version=version,
            kind=RunKind.BACKFILL,
            trigger=RunTrigger.API,
            correlation_id=cid,
            requested_by_id=requested_by_id,
            params=params,
        )
        orchestration.send_plan(run.pk, cid)
    logger.info("backfill_queued", run_id=run.pk, scope=scope)
    return run


# --- Preview ----------------------------------------------------------------------


@dataclass
class PipelinePreview:
    """What a pipeline version made of a sample, computed as a run computes it.

    Attributes:
        version: the pipeline version number that ran (None: the pipeline has
            no version yet and its unsaved behaviour ran).
        rows_in: records in the sample.
        filtered: records a filter step dropped.
        schema: the output columns and their Arrow types, in order.
        outputs: the output records (JSON values), in sample order; for an
            aggregate pipeline, the merged groups.
        errors: one per rejected record: ``index`` (in the sample),
            ``source_ref``, ``error`` and ``step``, in sample order.
        column_lineage: each output field -> the source columns it reads.
    """

    version: int | None
    rows_in: int
    filtered: int
    schema: list[dict[str, str]]
    outputs: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    column_lineage: dict[str, list[str]]


def preview_pipeline(
    pipeline_id: int,
    *,
    records: list[Any] | None = None,
    values: str = "text",
    limit: int = 20,
    version: int | None = None,
) -> PipelinePreview:
    """Run a pipeline version's steps over a sample; writes nothing.

    The steps compile with the workers' settings and the chunk goes through the
    run's own transform (``tasks.transform_table``), so the outputs and errors
    are the ones a run gives for the same records. Nothing is planned, staged,
    written or dead-lettered; reference datasets are read through the caches
    without filling them.

    Args:
        pipeline_id: the pipeline.
        records: sample JSON objects (see ``transforms.services.records_table``
            for ``values``); None samples the first ``limit`` records of the
            pipeline's source (read only).
        values: ``text`` or ``typed``.
        limit: records to sample from the source.
        version: the version number; the current version by default.

    Returns:
        The preview.

    Raises:
        PreviewError: no such version, the source cannot be sampled, or the
            sample does not fit the steps (``field`` names the request field).
    """
    from integration import references as reference_cache
    from integration import runtime
    from integration.tasks import transform_table
    from transforms.engine import EngineError, StepConfigError
    from transforms.engine.steps import ERROR_COLUMN, STEP_COLUMN
    from transforms.exceptions import PreviewError
    from transforms.services import jsonable, records_table, sample_connector

    pipeline = Pipeline.objects.select_related("source", "current_version").get(
        pk=pipeline_id
    )
    if version is not None:
        chosen = pipeline.versions.filter(number=version).first()
        if chosen is None:
            raise PreviewError(
                f"pipeline {pipeline.name} has no version {version}", field="version"
            )
    else:
        chosen = pipeline.current_version
    spec = chosen.spec if chosen is not None else pipeline.behaviour_spec()
    if records is None:
        table = sample_connector(
            pipeline.source.name, spec["source"]["options"], limit=limit
        )
    else:
        table = records_table(records, values=values)
    refs = table.column(SOURCE_REF_COLUMN).to_pylist()
    index_of = {ref: n for n, ref in enumerate(refs)}
    try:
        compiled = runtime.compile_spec(spec)
    except StepConfigError as exc:
        raise PreviewError(str(exc), field="steps") from None
    try:
        references = None
        if compiled.references:
            references, _ = reference_cache.for_version(
                spec, compiled.references, read_only=True
            )
        done = transform_table(None, table, references=references, compiled=compiled)
        output, rejected, filtered = done.output, done.rejected, done.filtered
        # Run-wide key hashes travel to the load step, never to the sink.
        hashes = [
            s.column for s in compiled.key_scopes if s.column in output.schema.names
        ]
        output = output.drop_columns(hashes)
        if compiled.is_aggregate:
            output = compiled.merge_partials([output])
        lineage = compiled.column_lineage
    except StepConfigError as exc:
        raise PreviewError(f"the sample does not fit the steps: {exc}") from None
    except EngineError as exc:
        raise PreviewError(str(exc)) from None
    finally:
        compiled.close()
    errors = []
    if rejected.num_rows:
        errors = [
            {
                "index": index_of.get(ref),
                "source_ref": ref,
                "error": error,
                "step": step,
            }
            for ref, error, step in zip(
                rejected.column(SOURCE_REF_COLUMN).to_pylist(),
                rejected.column(ERROR_COLUMN).to_pylist(),
                rejected.column(STEP_COLUMN).to_pylist(),
                strict=True,
            )
        ]
        errors.sort(key=lambda e: (e["index"] is None, e["index"] or 0))
    data = [f for f in output.schema if f.name != SOURCE_REF_COLUMN]
    return PipelinePreview(
        version=chosen.number if chosen is not None else None,
        rows_in=table.num_rows,
        filtered=filtered,
        schema=[{"name": f.name, "type": _type_name(f)} for f in data],
        outputs=[jsonable(row) for row in output.to_pylist()],
        errors=errors,
        column_lineage=lineage,
    )


def _type_name(field: pa.Field) -> str:
    """An output column's type for people: the Arrow type, ``json`` for JSON
    text (a string tagged ``dis.type: json``)."""
    if (field.metadata or {}).get(b"dis.type") == b"json":
        return "json"
    return str(field.type)
