"""Reused reads of the integration models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import models
from django.db.models import OuterRef, Subquery

from integration.choices import ACTIVE_STATES, CHUNK_FINISHED, RunKind, RunState

if TYPE_CHECKING:
    from integration.models import Pipeline


class RunQuerySet(models.QuerySet):
    def active_for(self, pipeline: Pipeline | int) -> RunQuerySet:
        return self.filter(pipeline=pipeline, state__in=ACTIVE_STATES)

    def running_regular(self, pipeline: Pipeline | int) -> RunQuerySet:
        return self.filter(
            pipeline=pipeline, state=RunState.RUNNING, kind=RunKind.REGULAR
        )

    def next_queued(self, pipeline: Pipeline | int) -> RunQuerySet:
        return self.filter(pipeline=pipeline, state=RunState.QUEUED).order_by("id")

    def list_rows(self) -> models.QuerySet:
        """The run list's rows: `RUN_LIST_OWN_COLUMNS` and `pipeline_name`,
        `version_number`, `version_hash`.

        The pipeline's and version's values come from subqueries on their primary
        keys, not joins: with joins, PostgreSQL picks the plan for a page by its
        statistics of the runs table, and while those are missing or stale (a
        table filled since its last ANALYZE) it hash-joins every run to sort them
        for one page. A page of runs by a primary-key index then 3 lookups per
        run does not depend on them.
        """
        pipelines = self.model._meta.get_field("pipeline").related_model
        versions = self.model._meta.get_field("version").related_model
        version = versions.objects.filter(pk=OuterRef("version_id")).order_by()
        return self.annotate(
            pipeline_name=Subquery(
                pipelines.objects.filter(pk=OuterRef("pipeline_id"))
                .order_by()
                .values("name")
            ),
            version_number=Subquery(version.values("number")),
            version_hash=Subquery(version.values("content_hash")),
        ).values(
            *RUN_LIST_OWN_COLUMNS, "pipeline_name", "version_number", "version_hash"
        )


#: The run's own columns in the run list (`RunQuerySet.list_rows`).
RUN_LIST_OWN_COLUMNS = (
    "id",
    "state",
    "kind",
    "trigger",
    "correlation_id",
    "chunks_total",
    "chunks_done",
    "records_read",
    "records_written",
    "records_rejected",
    "records_filtered",
    "records_deduplicated",
    "records_dead_lettered",
    "error",
    "created_at",
    "started_at",
    "finished_at",
)


class ChunkRunQuerySet(models.QuerySet):
    def unfinished(self) -> ChunkRunQuerySet:
        return self.exclude(state__in=CHUNK_FINISHED)
