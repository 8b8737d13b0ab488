"""Pipelines, their immutable versions, runs, chunk runs and dead letters."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import orjson
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from connectors.models import Connector
from integration.choices import (
    TERMINAL_STATES,
    ChunkState,
    DeadLetterState,
    DriftPolicy,
    FailurePolicy,
    HeldState,
    NodeKind,
    NodeState,
    OverlapPolicy,
    PipelineMode,
    ProposalState,
    RunKind,
    RunState,
    RunTrigger,
    SchemaChangeKind,
    WorkflowRunState,
    WriteMode,
)
from integration.querysets import ChunkRunQuerySet, RunQuerySet


def canonical_json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


class Pipeline(models.Model):
    """Source + steps + sink, with the run settings. Its behaviour is versioned.

    Every save that changes what the pipeline does freezes a new `PipelineVersion`;
    runs reference the version they ran.
    """

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    source = models.ForeignKey(
        Connector, on_delete=models.PROTECT, related_name="source_pipelines"
    )
    source_options = models.JSONField(
        default=dict, blank=True, help_text="What to read: path, table, query, topic..."
    )
    steps = models.JSONField(
        default=list, blank=True, help_text="Ordered steps: map, filter, validate..."
    )
    sink = models.ForeignKey(
        Connector, on_delete=models.PROTECT, related_name="sink_pipelines"
    )
    references = models.JSONField(
        default=dict,
        blank=True,
        help_text="Reference datasets for enrich steps and referential rules: "
        '{"airlines": {"connector": "warehouse", "options": {"table": "airlines"}, '
        '"ttl_seconds": 600}}',
    )
    sink_options = models.JSONField(
        default=dict, blank=True, help_text="Where to write: table, write_mode, key..."
    )
    mode = models.CharField(
        max_length=10, choices=PipelineMode.choices, default=PipelineMode.BATCH
    )
    chunk_rows = models.PositiveIntegerField(
        default=50_000,
        validators=[MinValueValidator(1), MaxValueValidator(5_000_000)],
        help_text="Rows per chunk (the unit of parallelism and checkpointing).",
    )
    max_in_flight = models.PositiveIntegerField(
        default=4,
        validators=[MinValueValidator(1), MaxValueValidator(256)],
        help_text="Chunks of one run in flight at once (backpressure window).",
    )
    max_rejected_ratio = models.FloatField(
        default=0.1,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="The run fails when rejected/read over committed chunks exceeds it.",
    )
    overlap_policy = models.CharField(
        max_length=10, choices=OverlapPolicy.choices, default=OverlapPolicy.QUEUE
    )
    is_paused = models.BooleanField(default=False)
    max_run_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="A run still going after this many seconds fails (empty: no limit).",
    )
    schedule_cron = models.CharField(
        max_length=100,
        blank=True,
        help_text="Cron expression (minute hour day month weekday), e.g. '0 2 * * *'.",
    )
    schedule_timezone = models.CharField(max_length=64, default="UTC")
    schedule_interval_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Run every N seconds (instead of cron)."
    )
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        editable=False,
        related_name="+",
    )
    cursor_state = models.JSONField(
        null=True,
        blank=True,
        help_text="Where the last successful incremental run stopped (cursor and "
        "key of its last row). Clear it to read everything again.",
    )
    notify_url = models.URLField(
        blank=True,
        help_text="Webhook called on failed and succeeded_with_errors runs.",
    )
    drift_policy = models.CharField(
        max_length=12,
        choices=DriftPolicy.choices,
        default=DriftPolicy.IGNORE,
        help_text="What a run does with source columns the source schema lacks, or "
        "values that no longer fit a column's type.",
    )
    source_schema = models.JSONField(
        default=list,
        blank=True,
        help_text='The expected source columns: [{"name": "id", "type": "integer"}, '
        "...]. Empty: recorded from the first chunk a run extracts (with a drift "
        "policy other than ignore).",
    )
    current_version = models.ForeignKey(
        "PipelineVersion",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        editable=False,
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        write_mode = (self.sink_options or {}).get("write_mode", WriteMode.APPEND)
        if write_mode not in WriteMode.values:
            raise ValidationError(
                {"sink_options": f"write_mode must be one of {', '.join(WriteMode)}"}
            )
        if not isinstance(self.steps, list):
            raise ValidationError({"steps": "must be a list of steps"})

    def behaviour_spec(self) -> dict[str, Any]:
        """Everything that changes what a run does (what a version freezes).

        The drift policy and source schema are part of it only when the policy is
        not `ignore`, so pipelines that never checked drift keep their versions.
        """
        spec: dict[str, Any] = {
            "source": {"connector": self.source_id, "options": self.source_options},
            "steps": self.steps,
            "references": self.references,
            "sink": {"connector": self.sink_id, "options": self.sink_options},
            "mode": self.mode,
            "chunk_rows": self.chunk_rows,
            "max_rejected_ratio": self.max_rejected_ratio,
        }
        if self.drift_policy != DriftPolicy.IGNORE:
            spec["drift"] = {
                "policy": self.drift_policy,
                "source_schema": self.source_schema or [],
            }
        return spec


class PipelineVersion(models.Model):
    """An immutable snapshot of a pipeline's behaviour, identified by its hash."""

    pipeline = models.ForeignKey(
        Pipeline, on_delete=models.CASCADE, related_name="versions"
    )
    number = models.PositiveIntegerField()
    content_hash = models.CharField(max_length=64)
    spec = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["pipeline", "-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["pipeline", "number"], name="pipelineversion_unique_number"
            ),
            models.UniqueConstraint(
                fields=["pipeline", "content_hash"], name="pipelineversion_unique_hash"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.pipeline.name} v{self.number} ({self.content_hash[:8]})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise ValidationError("a pipeline version is immutable")
        super().save(*args, **kwargs)

    @staticmethod
    def hash_spec(spec: dict[str, Any]) -> str:
        return hashlib.sha256(canonical_json(spec)).hexdigest()


class Run(models.Model):
    """One execution of a pipeline version, with its counts and state."""

    pipeline = models.ForeignKey(
        Pipeline, on_delete=models.PROTECT, related_name="runs"
    )
    version = models.ForeignKey(
        PipelineVersion, on_delete=models.PROTECT, related_name="runs"
    )
    state = models.CharField(
        max_length=24, choices=RunState.choices, default=RunState.QUEUED, db_index=True
    )
    kind = models.CharField(
        max_length=10, choices=RunKind.choices, default=RunKind.REGULAR
    )
    trigger = models.CharField(
        max_length=10, choices=RunTrigger.choices, default=RunTrigger.API
    )
    correlation_id = models.CharField(max_length=128, db_index=True)
    requested_by = models.ForeignKey(
        "auth.User", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    params = models.JSONField(default=dict, blank=True)
    idempotency_key = models.CharField(max_length=200, blank=True, default="")
    request_hash = models.CharField(max_length=64, blank=True, default="")
    resumed_count = models.PositiveIntegerField(default=0)
    source_fingerprint = models.CharField(max_length=200, blank=True)
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_done = models.PositiveIntegerField(default=0)
    records_read = models.BigIntegerField(default=0)
    records_written = models.BigIntegerField(default=0)
    records_rejected = models.BigIntegerField(default=0)
    records_filtered = models.BigIntegerField(default=0)
    #: Rows a deduplicate step dropped (within a chunk and across the run).
    records_deduplicated = models.BigIntegerField(default=0)
    records_dead_lettered = models.BigIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    planned_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        constraints = [
            # One running regular run per pipeline, enforced by the database.
            models.UniqueConstraint(
                fields=["pipeline"],
                condition=Q(state="running", kind="regular"),
                name="run_one_running_regular_per_pipeline",
            ),
            # The same Idempotency-Key returns the same run.
            models.UniqueConstraint(
                fields=["pipeline", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="run_unique_idempotency_key",
            ),
        ]
        indexes = [
            models.Index(fields=["pipeline", "state"]),
            # A pipeline's runs newest first: its last finished run and its last
            # success are each one short backward scan (integration/metrics.py).
            models.Index(fields=["pipeline", "id"], name="run_pipeline_newest"),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.pipeline_id} ({self.state})"

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def rejected_ratio(self) -> float:
        return self.records_rejected / self.records_read if self.records_read else 0.0

    @property
    def duration_seconds(self) -> float | None:
        if not self.started_at:
            return None
        end = self.finished_at or timezone.now()
        return round((end - self.started_at).total_seconds(), 3)

    def source_options(self) -> dict[str, Any]:
        """What this run reads: the version's options, with the run's overrides (a
        backfill's scope)."""
        return {
            **self.version.spec["source"]["options"],
            **self.params.get("source_options", {}),
        }

    def sink_options(self) -> dict[str, Any]:
        """Where this run writes: the version's options, with the run's overrides
        (a backfill writes with upsert)."""
        return {
            **self.version.spec["sink"]["options"],
            **self.params.get("sink_options", {}),
        }

    def outcome_state(self) -> RunState:
        """The terminal state a finished run earns from its counts."""
        if self.rejected_ratio > self.version.spec["max_rejected_ratio"]:
            return RunState.FAILED
        if self.records_rejected:
            return RunState.SUCCEEDED_WITH_ERRORS
        return RunState.SUCCEEDED


class ChunkRun(models.Model):
    """One chunk of a run: its plan, its state, its attempt token and its counts.

    The checkpoint of the run: a chunk in state `done` is committed in the sink.
    """

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="chunks")
    seq = models.PositiveIntegerField()
    spec = models.JSONField()
    state = models.CharField(
        max_length=12, choices=ChunkState.choices, default=ChunkState.PENDING
    )
    attempt_token = models.UUIDField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    #: The task step last started and whether it finished: a step found still open
    #: when it starts again killed its worker (counted in `crashes`).
    step = models.CharField(max_length=20, blank=True)
    step_open = models.BooleanField(default=False)
    #: The Celery task id of the open step: only the same message coming back
    #: counts as a crash (a duplicate delivery has another id).
    step_task_id = models.CharField(max_length=64, blank=True)
    #: `host:pid` of the process running the open step.
    step_owner = models.CharField(max_length=200, blank=True)
    #: Celery ids of the current attempt's tasks (revoked when the run stops).
    task_ids = models.JSONField(default=list, blank=True)
    crashes = models.PositiveIntegerField(default=0)
    #: Last sign of life of an attempt (claim, step start or end): the reconciler
    #: resends chunks whose attempt went quiet for too long.
    touched_at = models.DateTimeField(null=True, blank=True)
    #: An aggregate pipeline's partial aggregates of this chunk (Arrow IPC), merged
    #: by finalize: small (one row per group), and durable unlike staged batches.
    partial = models.BinaryField(null=True, blank=True, editable=False)
    records_read = models.BigIntegerField(default=0)
    records_written = models.BigIntegerField(default=0)
    records_rejected = models.BigIntegerField(default=0)
    records_filtered = models.BigIntegerField(default=0)
    records_deduplicated = models.BigIntegerField(default=0)
    #: Engine statistics of the chunk (reference cache hits and misses...).
    stats = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = ChunkRunQuerySet.as_manager()

    class Meta:
        ordering = ["run", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["run", "seq"], name="chunkrun_unique_seq")
        ]
        indexes = [models.Index(fields=["run", "state"])]

    def __str__(self) -> str:
        return f"run {self.run_id} chunk {self.seq} ({self.state})"

    @staticmethod
    def new_token() -> uuid.UUID:
        return uuid.uuid4()


class DeadLetter(models.Model):
    """One rejected record: what it was, where it came from and why it failed."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="dead_letters")
    pipeline = models.ForeignKey(
        Pipeline, on_delete=models.CASCADE, related_name="dead_letters"
    )
    chunk_seq = models.PositiveIntegerField()
    step = models.CharField(max_length=50, db_index=True)
    error_class = models.CharField(max_length=50, default="record", db_index=True)
    error = models.TextField()
    payload = models.JSONField(help_text="The record's original source values.")
    source_ref = models.CharField(max_length=500, blank=True, db_index=True)
    attempts = models.PositiveIntegerField(default=1)
    state = models.CharField(
        max_length=10,
        choices=DeadLetterState.choices,
        default=DeadLetterState.OPEN,
        db_index=True,
    )
    replay_run = models.ForeignKey(
        Run,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="replayed_dead_letters",
        help_text="The run that replayed this record successfully.",
    )
    discard_reason = models.TextField(blank=True)
    edited = models.BooleanField(
        default=False, help_text="The payload was edited after the rejection."
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["run", "chunk_seq"])]

    def __str__(self) -> str:
        return f"dead letter {self.pk} ({self.step}: {self.error[:40]})"


class RunKey(models.Model):
    """A key a run's output holds: which chunk kept it, for exact deduplicate steps
    and unique rules across the chunks of the run.

    `scope` is the deduplicate step (`deduplicate`) or a unique field
    (`unique:<field>`); `key` is the engine's MD5 of the key values. The chunk
    that loads first (in the pipeline's load order) owns a key; a later chunk's
    row with it is dropped (deduplicate) or rejected (unique). Kept while the run
    can be resumed; see `integration.runkeys`.
    """

    # The unique constraint's index (run first) serves lookups by run. No database
    # constraint: a load inserts tens of thousands of keys and each would queue a
    # foreign key check; deleting a run deletes its keys (Django's cascade).
    run = models.ForeignKey(
        Run,
        on_delete=models.CASCADE,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    scope = models.CharField(max_length=200)
    key = models.UUIDField()
    seq = models.PositiveIntegerField(help_text="The chunk that holds the key.")
    source_ref = models.CharField(
        max_length=500, blank=True, help_text="The row that holds it."
    )

    class Meta:
        ordering = ["run", "scope", "seq"]
        constraints = [
            models.UniqueConstraint(
                fields=["run", "scope", "key"], name="runkey_unique_key"
            )
        ]
        indexes = [models.Index(fields=["run", "seq"], name="runkey_run_seq")]

    def __str__(self) -> str:
        return f"run {self.run_id} {self.scope} {self.key} (chunk {self.seq})"


class Workflow(models.Model):
    """A DAG of nodes (pipeline runs and built-in actions) run together.

    Its state lives in the database (WorkflowRun, NodeRun), so a restarted worker
    or beat carries a workflow on where it was.
    """

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    failure_policy = models.CharField(
        max_length=10, choices=FailurePolicy.choices, default=FailurePolicy.STOP_ALL
    )
    is_paused = models.BooleanField(default=False)
    schedule_cron = models.CharField(
        max_length=100, blank=True, help_text="Cron expression, e.g. '0 2 * * *'."
    )
    schedule_timezone = models.CharField(max_length=64, default="UTC")
    schedule_interval_seconds = models.PositiveIntegerField(null=True, blank=True)
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        editable=False,
        related_name="+",
    )
    event_trigger = models.JSONField(
        default=dict,
        blank=True,
        help_text='Start a run when an event arrives: {"connector": "events", '
        '"topic": "files", "match": {"content_type": "text/csv"}} (a kafka '
        "connector; checked by beat every DIS_EVENT_TRIGGER_INTERVAL_SECONDS).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class WorkflowNode(models.Model):
    """One node of a workflow: what it does, what it waits for, how it retries."""

    workflow = models.ForeignKey(
        Workflow, on_delete=models.CASCADE, related_name="nodes"
    )
    key = models.SlugField(max_length=100)
    kind = models.CharField(max_length=12, choices=NodeKind.choices)
    pipeline = models.ForeignKey(
        Pipeline,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="workflow_nodes",
    )
    config = models.JSONField(default=dict, blank=True)
    depends_on = models.JSONField(
        default=list, blank=True, help_text="Keys of the nodes this one waits for."
    )
    max_attempts = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(20)]
    )
    retry_delay_seconds = models.PositiveIntegerField(default=30)

    class Meta:
        ordering = ["workflow", "key"]
        constraints = [
            models.UniqueConstraint(
                fields=["workflow", "key"], name="workflownode_unique_key"
            )
        ]

    def __str__(self) -> str:
        return f"{self.workflow.name}.{self.key}"


class WorkflowRun(models.Model):
    """One execution of a workflow."""

    workflow = models.ForeignKey(
        Workflow, on_delete=models.PROTECT, related_name="runs"
    )
    state = models.CharField(
        max_length=10,
        choices=WorkflowRunState.choices,
        default=WorkflowRunState.RUNNING,
        db_index=True,
    )
    trigger = models.CharField(
        max_length=10, choices=RunTrigger.choices, default=RunTrigger.API
    )
    correlation_id = models.CharField(max_length=128, db_index=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"workflow run {self.pk} of {self.workflow_id} ({self.state})"


class NodeRun(models.Model):
    """The state of one node in one workflow run."""

    workflow_run = models.ForeignKey(
        WorkflowRun, on_delete=models.CASCADE, related_name="nodes"
    )
    node = models.ForeignKey(WorkflowNode, on_delete=models.PROTECT, related_name="+")
    state = models.CharField(
        max_length=10, choices=NodeState.choices, default=NodeState.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    run = models.ForeignKey(
        Run, on_delete=models.SET_NULL, null=True, blank=True, related_name="node_runs"
    )
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    not_before = models.DateTimeField(
        null=True, blank=True, help_text="A retry waits until then."
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["workflow_run", "node__key"]
        constraints = [
            models.UniqueConstraint(
                fields=["workflow_run", "node"], name="noderun_unique_node"
            )
        ]

    def __str__(self) -> str:
        return f"{self.node} in workflow run {self.workflow_run_id} ({self.state})"


class FileTrigger(models.Model):
    """Binds File Processing Service events on a Kafka topic to a pipeline.

    An event whose file name matches `filename_pattern` (a glob; matched against
    the whole URL path when the pattern contains `/`) and whose media type matches
    `content_type` (a glob such as `text/csv` or `application/*`) starts one run of
    `pipeline` with the event in the run's source options. The counters are kept
    by the consumer: the topic's malformed and unmatched events count on every
    active binding of that topic.
    """

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    connector = models.ForeignKey(
        Connector,
        on_delete=models.PROTECT,
        related_name="file_triggers",
        help_text="The kafka connector of the topic the events arrive on.",
    )
    topic = models.CharField(max_length=249)
    pipeline = models.ForeignKey(
        Pipeline,
        on_delete=models.CASCADE,
        related_name="file_triggers",
        help_text="Its source must be a file_processing connector.",
    )
    filename_pattern = models.CharField(
        max_length=200,
        blank=True,
        help_text="Glob on the file name, e.g. `orders-*.csv` (blank: any name).",
    )
    content_type = models.CharField(
        max_length=100,
        blank=True,
        help_text="Glob on the media type, e.g. `text/csv` (blank: any type).",
    )
    is_paused = models.BooleanField(default=False)
    runs_started = models.PositiveBigIntegerField(default=0, editable=False)
    duplicates = models.PositiveBigIntegerField(
        default=0, editable=False, help_text="Redelivered events (no second run)."
    )
    refused = models.PositiveBigIntegerField(
        default=0,
        editable=False,
        help_text="Matching events no run was started for (pipeline paused...).",
    )
    topic_malformed = models.PositiveBigIntegerField(default=0, editable=False)
    topic_unmatched = models.PositiveBigIntegerField(default=0, editable=False)
    last_event_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["connector", "topic"])]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from connectors.plugins.kafka.client import TOPIC_RE

        errors: dict[str, str] = {}
        if not (self.filename_pattern or self.content_type):
            errors["filename_pattern"] = (
                "Give a file name pattern, a content type or both (`*` matches any "
                "name)."
            )
        if self.connector_id and self.connector.kind != "kafka":
            errors["connector"] = "Must be a kafka connector."
        if self.topic and (not TOPIC_RE.match(self.topic) or self.topic in (".", "..")):
            errors["topic"] = "Not a valid Kafka topic name."
        if self.pipeline_id and self.pipeline.source.kind != "file_processing":
            errors["pipeline"] = (
                "The pipeline's source must be a file_processing connector."
            )
        if errors:
            raise ValidationError(errors)


class SchemaChange(models.Model):
    """A drift a run found in its source: a new column or a changed type.

    Recorded against the run's pipeline version whatever the policy; `action` says
    what the policy did (applied in a new version, rows rejected, values held).
    """

    pipeline = models.ForeignKey(
        Pipeline, on_delete=models.CASCADE, related_name="schema_changes"
    )
    run = models.ForeignKey(
        Run, on_delete=models.CASCADE, related_name="schema_changes"
    )
    version = models.ForeignKey(
        PipelineVersion,
        on_delete=models.CASCADE,
        related_name="schema_changes",
        help_text="The version the run ran (the one that lacked the change).",
    )
    kind = models.CharField(max_length=12, choices=SchemaChangeKind.choices)
    column = models.CharField(max_length=200)
    old_type = models.CharField(max_length=100, blank=True)
    new_type = models.CharField(max_length=100)
    policy = models.CharField(max_length=12, choices=DriftPolicy.choices)
    action = models.CharField(max_length=200, help_text="What the policy did with it.")
    applied_version = models.ForeignKey(
        PipelineVersion,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The version that includes the change (evolve).",
    )
    proposal = models.ForeignKey(
        "SchemaChangeProposal",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="changes",
    )
    chunk_seq = models.PositiveIntegerField(help_text="The first chunk that saw it.")
    detected_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["run", "column", "kind"], name="schemachange_unique_per_run"
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.column} in run {self.run_id}"


class SchemaChangeProposal(models.Model):
    """New source columns a quarantine run held back, for an operator to decide.

    One pending proposal per pipeline and column set, whatever the number of
    chunks and runs that saw it. Approval applies the change (a new pipeline
    version, the sink column) and back-fills the held values; rejection drops them.
    """

    pipeline = models.ForeignKey(
        Pipeline, on_delete=models.CASCADE, related_name="schema_proposals"
    )
    columns = models.JSONField(help_text='The new columns: [{"name", "type"}, ...].')
    column_key = models.CharField(
        max_length=500, help_text="The sorted column names (the dedupe key)."
    )
    state = models.CharField(
        max_length=10,
        choices=ProposalState.choices,
        default=ProposalState.PENDING,
        db_index=True,
    )
    first_run = models.ForeignKey(
        Run, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    applied_version = models.ForeignKey(
        PipelineVersion,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The version approval created.",
    )
    decided_by = models.ForeignKey(
        "auth.User", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(
        default=dict, blank=True, help_text="What approval did (rows back-filled...)."
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["pipeline", "column_key"],
                condition=Q(state="pending"),
                name="schemaproposal_one_pending_per_columns",
            )
        ]

    def __str__(self) -> str:
        return f"proposal {self.pk}: {self.column_key} ({self.state})"


class HeldValues(models.Model):
    """The values of a chunk's new columns, held while their proposal is pending.

    `payload` is Arrow IPC: `_source_ref` plus the new columns, one row per source
    row that carried a value. Keyed by (proposal, run, chunk), so a retried chunk
    replaces its earlier attempt's values.
    """

    proposal = models.ForeignKey(
        SchemaChangeProposal, on_delete=models.CASCADE, related_name="held"
    )
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="held_values")
    chunk_seq = models.PositiveIntegerField()
    rows = models.PositiveIntegerField()
    payload = models.BinaryField(editable=False)
    state = models.CharField(
        max_length=10,
        choices=HeldState.choices,
        default=HeldState.HELD,
        db_index=True,
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["proposal", "run", "chunk_seq"]
        verbose_name_plural = "held values"
        constraints = [
            models.UniqueConstraint(
                fields=["proposal", "run", "chunk_seq"], name="heldvalues_unique_chunk"
            )
        ]

    def __str__(self) -> str:
        return f"{self.rows} held row(s) of run {self.run_id} chunk {self.chunk_seq}"
