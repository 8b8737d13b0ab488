"""Admin of pipelines, versions, runs, chunk runs and dead letters."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from config import correlation
from integration import services
from integration.choices import RunTrigger
from integration.exceptions import PipelinePausedError
from integration.models import ChunkRun, DeadLetter, Pipeline, PipelineVersion, Run


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the system only: visible, filterable, never edited here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Pipeline)
class PipelineAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "source",
        "sink",
        "mode",
        "version_number",
        "is_paused",
        "updated_at",
    ]
    list_filter = ["mode", "is_paused", "source__kind", "sink__kind"]
    search_fields = ["name", "description", "source__name", "sink__name"]
    readonly_fields = ["current_version", "created_at", "updated_at"]
    actions = ["run_now"]

    @admin.display(description="version")
    def version_number(self, obj: Pipeline) -> int | None:
        return obj.current_version.number if obj.current_version else None

    def save_model(
        self, request: HttpRequest, obj: Pipeline, form: Any, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        services.freeze_version(obj)

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

    @admin.display(description="error")
    def error_short(self, obj: DeadLetter) -> str:
        return obj.error[:80]
