"""Admin of pipelines, versions, runs, chunk runs, run keys and dead letters."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from config import correlation
from integration import drift, services, workflows
from integration.choices import RunTrigger
from integration.exceptions import PipelinePausedError, ResumeRefusedError
from integration.models import (
    ChunkRun,
    DeadLetter,
    FileTrigger,
    HeldValues,
    NodeRun,
    Pipeline,
    PipelineVersion,
    Run,
    RunKey,
    SchemaChange,
    SchemaChangeProposal,
    Workflow,
    WorkflowNode,
    WorkflowRun,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the system only: visible, filterable, never edited here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class PipelineForm(forms.ModelForm):
    """Checks the definition and schedule the way the API does."""

    class Meta:
        model = Pipeline
        fields = "__all__"  # noqa: DJ007 - the admin edits every editable field

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if self.errors:
            return data
        probe = Pipeline(**{k: v for k, v in data.items() if hasattr(Pipeline, k)})
        try:
            services.validate_definition(probe)
            services.validate_schedule(probe)
        except ValidationError as exc:
            for field, messages in exc.message_dict.items():
                self.add_error(field if field in self.fields else None, messages)
        return data


@admin.register(Pipeline)
class PipelineAdmin(admin.ModelAdmin):
    form = PipelineForm
    list_display = [
        "name",
        "source",
        "sink",
        "mode",
        "drift_policy",
        "version_number",
        "is_paused",
        "updated_at",
    ]
    list_filter = ["mode", "is_paused", "drift_policy", "source__kind", "sink__kind"]
    search_fields = ["name", "description", "source__name", "sink__name"]
    readonly_fields = ["current_version", "created_at", "updated_at"]
    actions = ["run_now", "pause", "unpause"]

    @admin.display(description="version")
    def version_number(self, obj: Pipeline) -> int | None:
        return obj.current_version.number if obj.current_version else None

    def save_model(
        self, request: HttpRequest, obj: Pipeline, form: Any, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        services.save_pipeline(obj)

    @admin.action(description="Run now")
    def run_now(self, request: HttpRequest, queryset: QuerySet[Pipeline]) -> None:
        for pipeline in queryset:
            try:
                run = services.start_run(
                    pipeline.pk,
                    trigger=RunTrigger.MANUAL,
                    correlation_id=getattr(request, "correlation_id", None)
                    or correlation.new_id(),
                    requested_by_id=request.user.pk,
                )
            except PipelinePausedError as exc:
                self.message_user(request, str(exc), messages.WARNING)
                continue
            self.message_user(request, f"{pipeline.name}: run {run.pk} queued")

    @admin.action(description="Pause (no new runs, schedule disabled)")
    def pause(self, request: HttpRequest, queryset: QuerySet[Pipeline]) -> None:
        self._set_paused(request, queryset, paused=True)

    @admin.action(description="Unpause")
    def unpause(self, request: HttpRequest, queryset: QuerySet[Pipeline]) -> None:
        self._set_paused(request, queryset, paused=False)

    def _set_paused(
        self, request: HttpRequest, queryset: QuerySet[Pipeline], *, paused: bool
    ) -> None:
        for pipeline in queryset:
            pipeline.is_paused = paused
            pipeline.save(update_fields=["is_paused", "updated_at"])
            services.sync_schedule(pipeline)
        self.message_user(
            request,
            f"{queryset.count()} pipeline(s) {'paused' if paused else 'unpaused'}",
        )


@admin.register(PipelineVersion)
class PipelineVersionAdmin(ReadOnlyAdmin):
    list_display = ["pipeline", "number", "content_hash", "created_at"]
    list_filter = ["pipeline"]
    search_fields = ["pipeline__name", "content_hash"]


class ChunkRunInline(admin.TabularInline):
    model = ChunkRun
    extra = 0
    can_delete = False
    fields = [
        "seq",
        "state",
        "attempts",
        "records_read",
        "records_written",
        "records_rejected",
        "started_at",
        "finished_at",
    ]
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "pipeline",
        "state",
        "kind",
        "trigger",
        "chunks_done",
        "chunks_total",
        "records_read",
        "records_written",
        "records_rejected",
        "created_at",
        "duration_seconds",
    ]
    list_filter = ["state", "kind", "trigger", "pipeline"]
    search_fields = ["=id", "pipeline__name", "correlation_id", "error"]
    date_hierarchy = "created_at"
    inlines = [ChunkRunInline]
    actions = ["cancel", "resume", "resume_current"]
    readonly_fields = ["quality_report"]

    @admin.display(description="Data quality")
    def quality_report(self, run: Run) -> str:
        """Violations per validate rule with sample source references."""
        report = services.quality_report(run)
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (r["rule"], r["kind"], r["violations"], ", ".join(r["samples"]))
                for r in report["rules"]
            ),
        )
        steps = ", ".join(f"{k}: {v}" for k, v in report["rejected_by_step"].items())
        return format_html(
            "<table><thead><tr><th>rule</th><th>kind</th><th>violations</th>"
            "<th>sample source references</th></tr></thead><tbody>{}</tbody>"
            "</table><p>Rejected rows by step: {}</p>",
            rows,
            steps or "none",
        )

    @admin.action(description="Cancel")
    def cancel(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        for run in queryset:
            done = services.cancel_run(run.pk, f"cancelled by {request.user}")
            self.message_user(
                request,
                f"run {run.pk}: {'cancelled' if done else 'already ended'}",
                messages.SUCCESS if done else messages.WARNING,
            )

    @admin.action(description="Resume (same version)")
    def resume(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        self._resume(request, queryset, current=False)

    @admin.action(description="Resume with the pipeline's current version")
    def resume_current(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        self._resume(request, queryset, current=True)

    def _resume(
        self, request: HttpRequest, queryset: QuerySet[Run], *, current: bool
    ) -> None:
        for run in queryset:
            try:
                services.resume_run(run.pk, use_current_version=current)
            except ResumeRefusedError as exc:
                self.message_user(request, f"run {run.pk}: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"run {run.pk} resumed")


@admin.register(ChunkRun)
class ChunkRunAdmin(ReadOnlyAdmin):
    list_display = [
        "run",
        "seq",
        "state",
        "attempts",
        "records_read",
        "records_written",
    ]
    list_filter = ["state"]
    search_fields = ["=run__id", "run__pipeline__name"]


@admin.register(RunKey)
class RunKeyAdmin(ReadOnlyAdmin):
    """Which chunk (and row) holds each deduplicate key and unique value of a run:
    why a row was dropped or rejected as a duplicate."""

    list_display = ["run", "scope", "key", "seq", "source_ref"]
    list_filter = ["scope"]
    search_fields = ["=run__id", "source_ref"]
    list_select_related = ["run"]


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "pipeline",
        "run",
        "step",
        "error_short",
        "source_ref",
        "state",
    ]
    list_filter = ["state", "step", "error_class", "pipeline"]
    search_fields = ["error", "source_ref", "=run__id"]
    date_hierarchy = "created_at"
    actions = ["replay", "discard"]

    @admin.action(description="Replay through the pipeline's current version")
    def replay(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        by_pipeline: dict[int, list[int]] = {}
        for pk, pipeline_id in queryset.values_list("pk", "pipeline_id"):
            by_pipeline.setdefault(pipeline_id, []).append(pk)
        for ids in by_pipeline.values():
            try:
                run = services.replay_dead_letters(ids, requested_by_id=request.user.pk)
            except ValidationError as exc:
                self.message_user(request, "; ".join(exc.messages), messages.ERROR)
            else:
                self.message_user(request, f"replay run {run.pk} queued")

    @admin.action(description="Discard (reason: discarded in the admin)")
    def discard(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        count = services.discard_dead_letters(
            list(queryset.values_list("pk", flat=True)),
            f"discarded in the admin by {request.user}",
        )
        self.message_user(request, f"{count} dead letter(s) discarded")

    @admin.display(description="error")
    def error_short(self, obj: DeadLetter) -> str:
        return obj.error[:80]


@admin.register(SchemaChange)
class SchemaChangeAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "pipeline",
        "run",
        "kind",
        "column",
        "old_type",
        "new_type",
        "policy",
        "action",
        "detected_at",
    ]
    list_filter = ["kind", "policy", "pipeline"]
    search_fields = ["column", "pipeline__name", "=run__id"]
    date_hierarchy = "detected_at"


class HeldValuesInline(admin.TabularInline):
    model = HeldValues
    extra = 0
    can_delete = False
    fields = ["run", "chunk_seq", "rows", "state", "created_at"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(SchemaChangeProposal)
class SchemaChangeProposalAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "pipeline",
        "column_key",
        "state",
        "first_run",
        "applied_version",
        "decided_by",
        "created_at",
    ]
    list_filter = ["state", "pipeline"]
    search_fields = ["column_key", "pipeline__name"]
    date_hierarchy = "created_at"
    inlines = [HeldValuesInline]
    actions = ["approve", "reject"]

    @admin.action(description="Approve: add the columns and back-fill held values")
    def approve(
        self, request: HttpRequest, queryset: QuerySet[SchemaChangeProposal]
    ) -> None:
        for proposal in queryset:
            try:
                done = drift.approve(proposal.pk, user_id=request.user.pk)
            except (drift.ProposalDecidedError, ValidationError) as exc:
                text = (
                    "; ".join(exc.messages) if isinstance(exc, ValidationError) else exc
                )
                self.message_user(
                    request, f"proposal {proposal.pk}: {text}", messages.ERROR
                )
            else:
                self.message_user(
                    request, f"proposal {proposal.pk} approved: {done.result}"
                )

    @admin.action(description="Reject: drop the held values")
    def reject(
        self, request: HttpRequest, queryset: QuerySet[SchemaChangeProposal]
    ) -> None:
        for proposal in queryset:
            try:
                drift.reject(proposal.pk, user_id=request.user.pk)
            except drift.ProposalDecidedError as exc:
                self.message_user(
                    request, f"proposal {proposal.pk}: {exc}", messages.ERROR
                )
            else:
                self.message_user(request, f"proposal {proposal.pk} rejected")


class WorkflowNodeFormSet(forms.BaseInlineFormSet):
    """Refuses a graph with unknown dependencies or a cycle."""

    def clean(self) -> None:
        super().clean()
        nodes = [
            {
                "key": form.cleaned_data["key"],
                "kind": form.cleaned_data["kind"],
                "pipeline": form.cleaned_data.get("pipeline"),
                "config": form.cleaned_data.get("config") or {},
                "depends_on": form.cleaned_data.get("depends_on") or [],
            }
            for form in self.forms
            if form.cleaned_data and not form.cleaned_data.get("DELETE")
        ]
        try:
            workflows.validate_nodes(nodes)
        except ValidationError as exc:
            raise forms.ValidationError(exc.message_dict["nodes"]) from None


class WorkflowNodeInline(admin.TabularInline):
    model = WorkflowNode
    formset = WorkflowNodeFormSet
    extra = 1
    fields = [
        "key",
        "kind",
        "pipeline",
        "config",
        "depends_on",
        "max_attempts",
        "retry_delay_seconds",
    ]


class WorkflowForm(forms.ModelForm):
    """Checks the schedule and the event trigger the way the API does."""

    class Meta:
        model = Workflow
        fields = "__all__"  # noqa: DJ007 - the admin edits every editable field

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if self.errors:
            return data
        probe = Workflow(**{k: v for k, v in data.items() if hasattr(Workflow, k)})
        try:
            services.validate_schedule(probe)
            workflows.validate_event_trigger(probe.event_trigger)
        except ValidationError as exc:
            for field, messages in exc.message_dict.items():
                self.add_error(field if field in self.fields else None, messages)
        return data


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    form = WorkflowForm
    list_display = ["name", "failure_policy", "node_count", "is_paused", "updated_at"]
    list_filter = ["failure_policy", "is_paused"]
    search_fields = ["name", "description", "nodes__key"]
    inlines = [WorkflowNodeInline]
    actions = ["run_now"]

    @admin.display(description="nodes")
    def node_count(self, obj: Workflow) -> int:
        return obj.nodes.count()

    def save_related(
        self, request: HttpRequest, form: Any, formsets: Any, change: bool
    ) -> None:
        super().save_related(request, form, formsets, change)
        services.sync_schedule(form.instance)

    @admin.action(description="Run now")
    def run_now(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> None:
        for workflow in queryset:
            try:
                wrun = workflows.start_workflow(workflow.pk, trigger=RunTrigger.MANUAL)
            except PipelinePausedError as exc:
                self.message_user(request, str(exc), messages.WARNING)
            else:
                self.message_user(request, f"{workflow.name}: run {wrun.pk} started")


class NodeRunInline(admin.TabularInline):
    model = NodeRun
    extra = 0
    can_delete = False
    fields = ["node", "state", "attempts", "run", "error", "started_at", "finished_at"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WorkflowRun)
class WorkflowRunAdmin(ReadOnlyAdmin):
    list_display = ["id", "workflow", "state", "trigger", "created_at", "finished_at"]
    list_filter = ["state", "trigger", "workflow"]
    search_fields = ["=id", "workflow__name", "correlation_id"]
    inlines = [NodeRunInline]
    actions = ["cancel"]

    @admin.action(description="Cancel")
    def cancel(self, request: HttpRequest, queryset: QuerySet[WorkflowRun]) -> None:
        for wrun in queryset:
            done = workflows.cancel_workflow(wrun.pk)
            self.message_user(
                request, f"workflow run {wrun.pk}: {'cancelled' if done else 'ended'}"
            )


@admin.register(FileTrigger)
class FileTriggerAdmin(admin.ModelAdmin):
    """File Processing Service bindings: topic + name/type globs -> pipeline."""

    list_display = [
        "name",
        "connector",
        "topic",
        "filename_pattern",
        "content_type",
        "pipeline",
        "is_paused",
        "runs_started",
        "duplicates",
        "refused",
        "topic_malformed",
        "topic_unmatched",
        "last_event_at",
    ]
    list_filter = ["is_paused", "connector", "pipeline"]
    search_fields = [
        "name",
        "description",
        "topic",
        "filename_pattern",
        "content_type",
        "pipeline__name",
    ]
    list_select_related = ["connector", "pipeline"]
    autocomplete_fields = ["pipeline"]
    readonly_fields = [
        "runs_started",
        "duplicates",
        "refused",
        "topic_malformed",
        "topic_unmatched",
        "last_event_at",
        "last_error",
        "created_at",
        "updated_at",
    ]
    actions = ["pause", "resume"]

    @admin.action(description="Pause the selected file triggers")
    def pause(self, request: HttpRequest, queryset: QuerySet[FileTrigger]) -> None:
        self.message_user(request, f"{queryset.update(is_paused=True)} paused")

    @admin.action(description="Resume the selected file triggers")
    def resume(self, request: HttpRequest, queryset: QuerySet[FileTrigger]) -> None:
        self.message_user(request, f"{queryset.update(is_paused=False)} resumed")
