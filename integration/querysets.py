"""Reused reads of the integration models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import models

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


class ChunkRunQuerySet(models.QuerySet):
    def unfinished(self) -> ChunkRunQuerySet:
        return self.exclude(state__in=CHUNK_FINISHED)
