"""Serializers of the integration API."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from connectors.exceptions import ConfigError
from connectors.models import Connector
from connectors.ssrf import check_url
from integration import services
from integration.choices import ChunkState, WriteMode
from integration.models import (
    DeadLetter,
    Pipeline,
    PipelineVersion,
    Run,
    SchemaChange,
    SchemaChangeProposal,
)
from integration.querysets import RUN_LIST_OWN_COLUMNS
from transforms.choices import PreviewValues
from transforms.services import MAX_PREVIEW_RECORDS


class PipelineVersionSerializer(serializers.ModelSerializer):
    class Meta:
        model = PipelineVersion
        fields = ["id", "number", "content_hash", "spec", "created_at"]
        read_only_fields = fields


class SourceColumnSerializer(serializers.Serializer):
    """One column of a pipeline's source schema."""

    name = serializers.CharField(max_length=200)
    type = serializers.CharField(
        max_length=100,
        help_text="string, integer, float, decimal(p,s), boolean, date, timestamp, "
        "timestamptz, json, or DuckDB's name of a nested type.",
    )


class PipelineSerializer(serializers.ModelSerializer):
    """A pipeline; a change to its behaviour freezes a new version."""

    source_schema = serializers.ListField(
        child=SourceColumnSerializer(),
        required=False,
        help_text="The expected source columns (empty: recorded from the first "
        "chunk a run extracts, when drift_policy is not ignore).",
    )

    source = serializers.SlugRelatedField(
        slug_field="name", queryset=Connector.objects.all()
    )
    sink = serializers.SlugRelatedField(
        slug_field="name", queryset=Connector.objects.all()
    )
    current_version = PipelineVersionSerializer(read_only=True)

    class Meta:
        model = Pipeline
        fields = [
            "id",
            "name",
            "description",
            "source",
            "source_options",
            "steps",
            "references",
            "sink",
            "sink_options",
            "mode",
            "chunk_rows",
            "max_in_flight",
            "max_rejected_ratio",
            "overlap_policy",
            "is_paused",
            "max_run_seconds",
            "schedule_cron",
            "schedule_timezone",
            "schedule_interval_seconds",
            "notify_url",
            "drift_policy",
            "source_schema",
            "cursor_state",
            "current_version",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "current_version",
            "cursor_state",
            "created_at",
            "updated_at",
        ]

    def validate_source_options(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be an object")
        return value

    def validate_sink_options(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be an object")
        mode = value.get("write_mode", WriteMode.APPEND)
        if mode not in WriteMode.values:
            raise serializers.ValidationError(
                {"write_mode": f"must be one of {', '.join(WriteMode.values)}"}
            )
        return value

    def validate_source_schema(self, value: list[Any]) -> list[dict[str, str]]:
        from transforms.engine.drift import SchemaDefinitionError, check_schema

        try:
            return check_schema([dict(column) for column in value])
        except SchemaDefinitionError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_notify_url(self, value: str) -> str:
        if value:
            try:
                check_url(value, tuple(settings.DIS_ALLOWED_NETWORKS))
            except ConfigError as exc:
                raise serializers.ValidationError(str(exc)) from None
        return value

    def validate_steps(self, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise serializers.ValidationError("must be a list of steps")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        checked = (
            "source",
            "sink",
            "steps",
            "references",
            "source_schema",
            "schedule_cron",
            "schedule_timezone",
            "schedule_interval_seconds",
        )
        probe = Pipeline(
            **{
                **{
                    f: getattr(self.instance, f)
                    for f in checked
                    if self.instance is not None
                },
                **{k: v for k, v in attrs.items() if k in checked},
            }
        )
        try:
            services.validate_definition(probe)
            services.validate_schedule(probe)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from None
        errors = {}
        for side in ("source", "sink"):
            connector = attrs.get(side) or getattr(self.instance, side, None)
            options = attrs.get(
                f"{side}_options", getattr(self.instance, f"{side}_options", {})
            )
            try:
                connector.plugin.validate_options(side, options or {})
            except ConfigError as exc:
                errors[f"{side}_options"] = getattr(exc, "errors", None) or str(exc)
        if errors:
            raise serializers.ValidationError(errors)
        return attrs

    def create(self, validated_data: dict[str, Any]) -> Pipeline:
        pipeline = super().create(validated_data)
        services.save_pipeline(pipeline)
        return pipeline

    def update(self, instance: Pipeline, validated_data: dict[str, Any]) -> Pipeline:
        pipeline = super().update(instance, validated_data)
        services.save_pipeline(pipeline)
        return pipeline


class ChunkProgressSerializer(serializers.Serializer):
    pending = serializers.IntegerField()
    queued = serializers.IntegerField()
    running = serializers.IntegerField()
    done = serializers.IntegerField()
    skipped = serializers.IntegerField()
    quarantined = serializers.IntegerField()


class RunSerializer(serializers.ModelSerializer):
    """A run: state, counts and chunk progress."""

    pipeline = serializers.SlugRelatedField(slug_field="name", read_only=True)
    version = serializers.IntegerField(source="version.number", read_only=True)
    version_hash = serializers.CharField(source="version.content_hash", read_only=True)
    rejected_ratio = serializers.FloatField(read_only=True)
    duration_seconds = serializers.FloatField(read_only=True, allow_null=True)
    chunks = serializers.SerializerMethodField()
    stats = serializers.SerializerMethodField(
        help_text="Engine statistics: reference cache hits, misses and oldest age; "
        "`drift`: the schema drift the run found and what its policy did."
    )

    class Meta:
        model = Run
        fields = [
            "id",
            "pipeline",
            "version",
            "version_hash",
            "state",
            "kind",
            "trigger",
            "correlation_id",
            "chunks_total",
            "chunks_done",
            "chunks",
            "stats",
            "records_read",
            "records_written",
            "records_rejected",
            "records_filtered",
            "records_deduplicated",
            "records_dead_lettered",
            "rejected_ratio",
            "error",
            "created_at",
            "started_at",
            "finished_at",
            "duration_seconds",
        ]
        read_only_fields = fields

    @extend_schema_field(ChunkProgressSerializer)
    def get_chunks(self, run: Run) -> dict[str, int]:
        if not run.chunks_total:  # counted as the plan stores chunks: none yet
            return dict.fromkeys(ChunkState.values, 0)
        return services.chunk_progress(run)

    @extend_schema_field(serializers.DictField())
    def get_stats(self, run: Run) -> dict[str, Any]:
        if not run.chunks_total:  # a run just started: no chunk has stats
            return {"references": {}}
        return services.run_stats(run)


class RunListSerializer(RunSerializer):
    """A run in a list (no per-chunk query)."""

    # The list endpoint renders its rows with `run_list_rows` (same fields, same
    # values) from `.values()`: building 150 model instances and running DRF's
    # field machinery per row was most of a page's time. This documents the shape.

    class Meta(RunSerializer.Meta):
        fields = [f for f in RunSerializer.Meta.fields if f not in ("chunks", "stats")]
        read_only_fields = fields


def run_list_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """`RunListSerializer`'s output for rows of `Run.objects.list_rows()`."""
    now = timezone.now()
    iso = _iso_datetime(timezone.get_current_timezone())
    return [_run_item(row, now, iso) for row in rows]


def run_representation(run: Run) -> dict[str, Any]:
    """`RunSerializer(run).data` for a run of a pipeline and version in memory.

    A run just created (not planned yet) needs no chunk or stats query, and no
    serializer fields: building `RunSerializer`'s fields cost more than the rest
    of a `POST .../runs/` answer.
    """
    if run.planned_at is not None:
        return RunSerializer(run).data
    row = {column: getattr(run, column) for column in RUN_LIST_OWN_COLUMNS}
    for choice in ("state", "kind", "trigger"):  # a model's enum member: its value
        row[choice] = str(row[choice])
    row["pipeline_name"] = run.pipeline.name
    row["version_number"] = run.version.number
    row["version_hash"] = run.version.content_hash
    item = _run_item(
        row, timezone.now(), _iso_datetime(timezone.get_current_timezone())
    )
    item["chunks"] = dict.fromkeys(ChunkState.values, 0)
    item["stats"] = {"references": {}}
    return {name: item[name] for name in RunSerializer.Meta.fields}


def _iso_datetime(tz: Any) -> Any:
    """DRF's `DateTimeField().to_representation` with the time zone looked up once
    (ISO 8601 in the current time zone, UTC as `Z`)."""

    def iso(value: Any) -> str | None:
        if not value:
            return None
        text = value.astimezone(tz).isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text

    return iso


def run_detail(
    row: dict[str, Any], chunks: Iterable[tuple[str, Any]]
) -> dict[str, Any]:
    """`RunSerializer`'s output for a row of `Run.objects.list_rows()` and the
    `(state, stats)` of the run's chunks (not read for a run with none yet)."""
    item = _run_item(
        row, timezone.now(), _iso_datetime(timezone.get_current_timezone())
    )
    progress = dict.fromkeys(ChunkState.values, 0)
    stats: dict[str, Any] = {"references": {}}
    if row["chunks_total"]:
        chunk_stats = []
        for state, chunk in chunks:
            progress[state] += 1
            chunk_stats.append(chunk)
        stats = services.stats_of_chunks(chunk_stats)
    out: dict[str, Any] = {}
    for name, value in item.items():  # RunSerializer's order: after chunks_done
        out[name] = value
        if name == "chunks_done":
            out["chunks"], out["stats"] = progress, stats
    return out


def _run_item(row: dict[str, Any], now: Any, iso: Any) -> dict[str, Any]:
    """One run as `RunListSerializer` renders it (its fields, in its order)."""
    started, finished = row["started_at"], row["finished_at"]
    read = row["records_read"]
    return {
        "id": row["id"],
        "pipeline": row["pipeline_name"],
        "version": row["version_number"],
        "version_hash": row["version_hash"],
        "state": row["state"],
        "kind": row["kind"],
        "trigger": row["trigger"],
        "correlation_id": row["correlation_id"],
        "chunks_total": row["chunks_total"],
        "chunks_done": row["chunks_done"],
        "records_read": read,
        "records_written": row["records_written"],
        "records_rejected": row["records_rejected"],
        "records_filtered": row["records_filtered"],
        "records_deduplicated": row["records_deduplicated"],
        "records_dead_lettered": row["records_dead_lettered"],
        "rejected_ratio": row["records_rejected"] / read if read else 0.0,
        "error": row["error"],
        "created_at": iso(row["created_at"]),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_seconds": (
            round(((finished or now) - started).total_seconds(), 3) if started else None
        ),
    }


class StartRunSerializer(serializers.Serializer):
    """Body of a run request (all optional)."""

    params = serializers.DictField(required=False, default=dict)


class BackfillSerializer(serializers.Serializer):
    """A backfill's scope: `{"run": id}`, `{"cursor_from", "cursor_to"}` or
    `{"keys": [[...], ...]}`."""

    scope = serializers.DictField()

    def validate_scope(self, value: dict[str, Any]) -> dict[str, Any]:
        kinds = [
            {"run"} == set(value),
            bool({"cursor_from", "cursor_to"} & set(value))
            and set(value) <= {"cursor_from", "cursor_to"},
            {"keys"} == set(value),
        ]
        if sum(kinds) != 1:
            raise serializers.ValidationError(
                "one of {run}, {cursor_from, cursor_to} or {keys}"
            )
        if "run" in value and not isinstance(value["run"], int):
            raise serializers.ValidationError({"run": "a run id"})
        if "keys" in value and not (
            isinstance(value["keys"], list)
            and value["keys"]
            and all(isinstance(k, list) for k in value["keys"])
        ):
            raise serializers.ValidationError(
                {"keys": "a non-empty list of key value lists"}
            )
        return value


class ResumeRunSerializer(serializers.Serializer):
    """Body of a resume request."""

    use_current_version = serializers.BooleanField(
        default=False,
        help_text="Process the remaining chunks with the pipeline's current version.",
    )


class DeadLetterSerializer(serializers.ModelSerializer):
    """A dead letter; only an open one's `payload` can be edited (then replayed)."""

    pipeline = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = DeadLetter
        fields = [
            "id",
            "run",
            "pipeline",
            "chunk_seq",
            "step",
            "error_class",
            "error",
            "payload",
            "source_ref",
            "attempts",
            "state",
            "replay_run",
            "discard_reason",
            "edited",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [f for f in fields if f != "payload"]

    def validate_payload(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be an object of field values")
        if self.instance is not None and self.instance.state != "open":
            raise serializers.ValidationError(
                f"the dead letter is {self.instance.state}; only open ones can change"
            )
        return value

    def update(
        self, instance: DeadLetter, validated_data: dict[str, Any]
    ) -> DeadLetter:
        if "payload" not in validated_data:  # nothing else is writable
            return instance
        instance.payload = validated_data["payload"]
        instance.edited = True
        instance.save(update_fields=["payload", "edited", "updated_at"])
        return instance


class DeadLetterSelectionSerializer(serializers.Serializer):
    """Which dead letters: explicit ids, or a filter (pipeline, run, step...)."""

    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1), required=False, max_length=100_000
    )
    filter = serializers.DictField(
        required=False,
        help_text='Dead-letter list filters, e.g. {"run": 12, "step": "map"}.',
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if not attrs.get("ids") and not attrs.get("filter"):
            raise serializers.ValidationError({"ids": "give ids or a filter"})
        return attrs


class ReplaySerializer(DeadLetterSelectionSerializer):
    version = serializers.IntegerField(
        required=False,
        help_text="Id of the pipeline version to replay through (default: current).",
    )


class DiscardSerializer(DeadLetterSelectionSerializer):
    reason = serializers.CharField(max_length=2000)


class DiscardOneSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=2000)


class CountSerializer(serializers.Serializer):
    count = serializers.IntegerField()


class SchemaChangeSerializer(serializers.ModelSerializer):
    """A schema drift a run found, and what its pipeline's policy did."""

    pipeline = serializers.SlugRelatedField(slug_field="name", read_only=True)
    version = serializers.IntegerField(source="version.number", read_only=True)
    applied_version = serializers.IntegerField(
        source="applied_version.number", read_only=True, allow_null=True
    )

    class Meta:
        model = SchemaChange
        fields = [
            "id",
            "pipeline",
            "run",
            "version",
            "kind",
            "column",
            "old_type",
            "new_type",
            "policy",
            "action",
            "applied_version",
            "proposal",
            "chunk_seq",
            "detected_at",
        ]
        read_only_fields = fields


class ProposalResultSerializer(serializers.Serializer):
    """What deciding a proposal did."""

    version = serializers.IntegerField(
        required=False, help_text="The pipeline version approval created."
    )
    held_rows = serializers.IntegerField(required=False)
    backfilled_rows = serializers.IntegerField(
        required=False, help_text="Loaded rows that received the held values."
    )
    held_rows_rejected = serializers.IntegerField(required=False)
    note = serializers.CharField(required=False)


class SchemaChangeProposalSerializer(serializers.ModelSerializer):
    """New source columns held by quarantine runs, waiting for a decision."""

    pipeline = serializers.SlugRelatedField(slug_field="name", read_only=True)
    columns = serializers.ListField(child=SourceColumnSerializer(), read_only=True)
    applied_version = serializers.IntegerField(
        source="applied_version.number", read_only=True, allow_null=True
    )
    decided_by = serializers.SlugRelatedField(
        slug_field="username",
        read_only=True,
        allow_null=True,
        help_text="The user who approved or rejected it.",
    )
    held_rows = serializers.SerializerMethodField()
    result = ProposalResultSerializer(read_only=True)

    class Meta:
        model = SchemaChangeProposal
        fields = [
            "id",
            "pipeline",
            "columns",
            "state",
            "first_run",
            "held_rows",
            "applied_version",
            "decided_by",
            "decided_at",
            "result",
            "created_at",
        ]
        read_only_fields = fields

    def get_held_rows(self, proposal: SchemaChangeProposal) -> int:
        """Rows whose values are held (not yet loaded or rejected)."""
        return sum(proposal.held.filter(state="held").values_list("rows", flat=True))


class PipelinePreviewRequestSerializer(serializers.Serializer):
    """Sample records for a pipeline preview: in the body, or read from the
    pipeline's own source."""

    records = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        max_length=MAX_PREVIEW_RECORDS,
        help_text="JSON objects; each gets `_source_ref` = `preview#<index>`. "
        "Leave out to sample the first `limit` records of the pipeline's source.",
    )
    values = serializers.ChoiceField(
        choices=PreviewValues.choices,
        default=PreviewValues.TEXT,
        help_text="`text`: values become strings as a CSV source reads them "
        "(the default); `typed`: Arrow types inferred from the JSON values.",
    )
    version = serializers.IntegerField(
        required=False, min_value=1, help_text="Version number (default: current)."
    )
    limit = serializers.IntegerField(
        required=False,
        default=20,
        min_value=1,
        max_value=MAX_PREVIEW_RECORDS,
        help_text="Records to sample from the source (without `records`).",
    )


class PreviewColumnSerializer(serializers.Serializer):
    """An output column and its Arrow type."""

    name = serializers.CharField()
    type = serializers.CharField(
        help_text="Arrow type, e.g. `decimal128(12, 2)`; `json` for JSON text."
    )


class PipelinePreviewErrorSerializer(serializers.Serializer):
    """A sample record the pipeline rejected, as a run would dead-letter it."""

    index = serializers.IntegerField(allow_null=True)
    source_ref = serializers.CharField()
    error = serializers.CharField()
    step = serializers.CharField()


class PipelinePreviewSerializer(serializers.Serializer):
    """What the pipeline's steps made of the sample; nothing was written."""

    version = serializers.IntegerField(allow_null=True)
    rows_in = serializers.IntegerField()
    filtered = serializers.IntegerField()
    schema = PreviewColumnSerializer(many=True)
    outputs = serializers.ListField(child=serializers.DictField())
    errors = PipelinePreviewErrorSerializer(many=True)
    column_lineage = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField())
    )


class RuleQualitySerializer(serializers.Serializer):
    """One validate rule's violations in a run."""

    rule = serializers.CharField(help_text="The rule's path: `steps[2].rules[0] (f)`.")
    step = serializers.IntegerField(allow_null=True, help_text="The step's index.")
    field = serializers.CharField(allow_blank=True)
    kind = serializers.CharField(allow_blank=True, help_text="not_null, range, ...")
    violations = serializers.IntegerField(help_text="Rejected rows failing the rule.")
    samples = serializers.ListField(
        child=serializers.CharField(),
        help_text="Up to 10 source references of violating rows, in source order.",
    )


class QualityReportSerializer(serializers.Serializer):
    """A run's data-quality report: violations per rule with sample references."""

    run = serializers.IntegerField()
    records_read = serializers.IntegerField()
    records_rejected = serializers.IntegerField()
    rules = RuleQualitySerializer(many=True)
    rejected_by_step = serializers.DictField(
        child=serializers.IntegerField(),
        help_text="Rejected rows by the first step that rejected them.",
    )
