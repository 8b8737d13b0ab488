"""States and kinds of the integration app."""

from __future__ import annotations

from django.db import models


class RunState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    SUCCEEDED_WITH_ERRORS = "succeeded_with_errors", "Succeeded with errors"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATES = (RunState.QUEUED, RunState.RUNNING)
TERMINAL_STATES = (
    RunState.SUCCEEDED,
    RunState.SUCCEEDED_WITH_ERRORS,
    RunState.FAILED,
    RunState.CANCELLED,
)


class RunKind(models.TextChoices):
    REGULAR = "regular", "Regular"
    REPLAY = "replay", "Replay"
    BACKFILL = "backfill", "Backfill"


class RunTrigger(models.TextChoices):
    SCHEDULE = "schedule", "Schedule"
    API = "api", "API"
    EVENT = "event", "Event"
    WORKFLOW = "workflow", "Workflow"
    MANUAL = "manual", "Manual (admin or CLI)"


class ChunkState(models.TextChoices):
    PENDING = "pending", "Pending"
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    SKIPPED = "skipped", "Skipped (run stopped)"
    QUARANTINED = "quarantined", "Quarantined (killed its worker too often)"


CHUNK_IN_FLIGHT = (ChunkState.QUEUED, ChunkState.RUNNING)
CHUNK_FINISHED = (ChunkState.DONE, ChunkState.SKIPPED, ChunkState.QUARANTINED)
#: Chunks a resumed run runs again.
CHUNK_RESUMABLE = (ChunkState.SKIPPED, ChunkState.QUARANTINED)


class PipelineMode(models.TextChoices):
    BATCH = "batch", "Batch"
    STREAM = "stream", "Stream"


class OverlapPolicy(models.TextChoices):
    QUEUE = "queue", "Queue the new run"
    SKIP = "skip", "Skip the new run"


class WriteMode(models.TextChoices):
    APPEND = "append", "Append"
    UPSERT = "upsert", "Upsert by key"
    REPLACE = "replace", "Replace"


class DeadLetterState(models.TextChoices):
    OPEN = "open", "Open"
    REPLAYED = "replayed", "Replayed"
    DISCARDED = "discarded", "Discarded"


class FailurePolicy(models.TextChoices):
    STOP_ALL = "stop_all", "Stop all (cancel what runs, start nothing more)"
    CONTINUE = "continue", "Let independent branches finish"


class NodeKind(models.TextChoices):
    PIPELINE = "pipeline", "Pipeline run"
    HTTP = "http", "HTTP call"
    SQL = "sql", "SQL statement"
    WAIT_EVENT = "wait_event", "Wait for an event"


class NodeState(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    SKIPPED = "skipped", "Skipped (an upstream node failed)"
    CANCELLED = "cancelled", "Cancelled"


NODE_FINISHED = (
    NodeState.SUCCEEDED,
    NodeState.FAILED,
    NodeState.SKIPPED,
    NodeState.CANCELLED,
)


class WorkflowRunState(models.TextChoices):
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class DriftPolicy(models.TextChoices):
    """What a run does when source rows no longer fit the pipeline's source schema."""

    IGNORE = "ignore", "Ignore (no schema checks)"
    EVOLVE = "evolve", "Evolve (apply and record the change)"
    FREEZE = "freeze", "Freeze (reject drifting rows to dead letters)"
    QUARANTINE = "quarantine", "Quarantine (hold new values, propose the change)"


class SchemaChangeKind(models.TextChoices):
    ADDED = "added", "Column added"
    TYPE_CHANGED = "type_changed", "Type changed"


class ProposalState(models.TextChoices):
    PENDING = "pending", "Pending"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"


class HeldState(models.TextChoices):
    HELD = "held", "Held"
    LOADED = "loaded", "Loaded (back-filled)"
    DROPPED = "dropped", "Dropped (approved, but the steps do not carry the column)"
    REJECTED = "rejected", "Rejected"
