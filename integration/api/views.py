"""Views of the integration API: pipelines, runs, dead letters."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict
from typing import Any

import orjson
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connection
from django.db.models import Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response

from integration import drift, services
from integration.api.filtersets import (
    DeadLetterFilter,
    PipelineFilter,
    RunFilter,
    SchemaChangeFilter,
    SchemaChangeProposalFilter,
)
from integration.api.serializers import (
    BackfillSerializer,
    CountSerializer,
    DeadLetterSerializer,
    DiscardOneSerializer,
    DiscardSerializer,
    PipelinePreviewRequestSerializer,
    PipelinePreviewSerializer,
    PipelineSerializer,
    QualityReportSerializer,
    ReplaySerializer,
    ResumeRunSerializer,
    RunListSerializer,
    RunSerializer,
    SchemaChangeProposalSerializer,
    SchemaChangeSerializer,
    StartRunSerializer,
    run_detail,
    run_list_rows,
    run_representation,
)
from integration.choices import HeldState, RunTrigger
from integration.exceptions import (
    IdempotencyConflictError,
    PipelinePausedError,
    ResumeRefusedError,
)
from integration.models import (
    ChunkRun,
    DeadLetter,
    Pipeline,
    Run,
    SchemaChange,
    SchemaChangeProposal,
)
from transforms.exceptions import PreviewError

CONFLICT = OpenApiResponse(description="Refused: the reason is in `detail`.")


def _conflict(exc: Exception) -> Response:
    return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)


def _has_object_permissions(permissions: list[BasePermission]) -> bool:
    """Whether any of these permissions has object rules of its own."""
    default = BasePermission.has_object_permission
    return any(type(p).has_object_permission is not default for p in permissions)


def _pk_or_404(pk: str | None) -> int:
    """A URL's integer primary key; 404 for anything else, as `get_object()` does."""
    try:
        return int(pk)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise Http404 from None


class PipelineViewSet(viewsets.ModelViewSet):
    """Pipelines. Each behaviour change freezes a new PipelineVersion."""

    queryset = Pipeline.objects.select_related("source", "sink", "current_version")
    serializer_class = PipelineSerializer
    filterset_class = PipelineFilter
    ordering_fields = ["name", "created_at", "updated_at"]

    @extend_schema(
        request=StartRunSerializer,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                description="The same key returns the same run (with the same body); "
                "with another body it is a 409.",
            )
        ],
        responses={202: RunSerializer, 200: RunSerializer, 409: CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def runs(self, request: Request, pk: str | None = None) -> Response:
        """Start a run; it waits in `queued` while another regular run is running."""
        # No `get_object()`: `start_run` reads the pipeline once, with its row lock
        # (the viewset's lookup was a second, wider read of the same row). A
        # missing pipeline is still a 404, before any 400 about the body. Should a
        # permission with object rules ever guard this viewset, the lookup is
        # back, so that it is checked.
        if _has_object_permissions(self.get_permissions()):
            pipeline_id = self.get_object().pk
        else:
            pipeline_id = _pk_or_404(pk)
        body = StartRunSerializer(data=request.data)
        if not body.is_valid():
            if not Pipeline.objects.filter(pk=pipeline_id).exists():
                raise Http404
            raise ValidationError(body.errors)
        key = request.headers.get("Idempotency-Key", "").strip()
        if len(key) > 200:
            raise ValidationError({"Idempotency-Key": "at most 200 characters"})
        request_hash = hashlib.sha256(
            orjson.dumps(body.validated_data, option=orjson.OPT_SORT_KEYS)
        ).hexdigest()
        try:
            run = services.start_run(
                pipeline_id,
                trigger=RunTrigger.API,
                correlation_id=getattr(request, "correlation_id", None),
                requested_by_id=request.user.pk,
                params=body.validated_data["params"],
                idempotency_key=key,
                request_hash=request_hash if key else "",
            )
        except Pipeline.DoesNotExist:
            raise Http404 from None
        except (PipelinePausedError, IdempotencyConflictError) as exc:
            return _conflict(exc)
        assert run is not None  # noqa: S101 - only scheduled runs can be skipped
        replayed = getattr(run, "replayed", False)
        response = Response(
            run_representation(run),
            status=status.HTTP_200_OK if replayed else status.HTTP_202_ACCEPTED,
        )
        if replayed:
            response["Idempotent-Replayed"] = "true"
        return response

    @extend_schema(request=BackfillSerializer, responses={202: RunSerializer})
    @action(detail=True, methods=["post"])
    def backfills(self, request: Request, pk: str | None = None) -> Response:
        """Re-run the pipeline for a scope with upsert semantics (kind backfill)."""
        pipeline = self.get_object()
        body = BackfillSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            run = services.start_backfill(
                pipeline.pk,
                body.validated_data["scope"],
                correlation_id=getattr(request, "correlation_id", None),
                requested_by_id=request.user.pk,
            )
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from None
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=PipelinePreviewRequestSerializer,
        responses={200: PipelinePreviewSerializer},
    )
    @action(detail=True, methods=["post"])
    def preview(self, request: Request, pk: str | None = None) -> Response:
        """Run the pipeline's steps (current or given version) over sample records,
        exactly as a run transforms a chunk; writes nothing.

        The records come in the body, or are the first `limit` records of the
        pipeline's source.
        """
        pipeline = self.get_object()
        body = PipelinePreviewRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            result = services.preview_pipeline(
                pipeline.pk,
                records=data.get("records"),
                values=data["values"],
                limit=data["limit"],
                version=data.get("version"),
            )
        except PreviewError as exc:
            field = "source" if exc.field in ("connector", "options") else exc.field
            raise ValidationError({field: [str(exc)]}) from None
        return Response(asdict(result))


#: Query parameters of a plain run list page (no filter, no ordering).
_PAGE_PARAMETERS = frozenset({"page", "page_size"})


class _RunRows:
    """The run list as the paginator sees it: counted on the filtered runs alone,
    sliced as rows of `list_rows()` (which adds the pipeline's and version's values
    by subqueries: the count needs neither).

    `plain` (no filter, no ordering asked for): the count and the page run as SQL
    Django compiled once in this process (`_plain_run_list_sql`): building and
    compiling the two querysets was half of an unfiltered page's CPU.
    """

    def __init__(self, queryset: QuerySet[Run], *, plain: bool = False) -> None:
        self.queryset = queryset
        self.plain = plain

    @property
    def ordered(self) -> bool:
        return self.queryset.ordered

    def count(self) -> int:
        if not self.plain:
            return self.queryset.count()
        count_sql, _page_sql, _params = _plain_run_list_sql()
        with connection.cursor() as cursor:
            cursor.execute(count_sql)
            return cursor.fetchone()[0]

    def __getitem__(self, key: slice) -> Any:
        if not self.plain:
            return self.queryset.list_rows()[key]
        start, stop = key.start or 0, key.stop
        _count_sql, page_sql, params = _plain_run_list_sql()
        return _dict_rows(page_sql, [*params, stop - start, start])


def _raw_rows_typed() -> bool:
    """Whether raw SQL rows come back as the querysets give them: on PostgreSQL
    (psycopg with Django's time-zone loader) a timestamp is an aware datetime; on
    SQLite (local mode) it is naive until Django's converters run, so the run
    views take the querysets there."""
    return connection.vendor == "postgresql"


def _dict_rows(sql: str, params: list[Any]) -> list[dict[str, Any]]:
    """The rows of raw SQL as dicts by column name (as `.values()` gives them)."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@functools.cache
def _plain_run_list_sql() -> tuple[str, str, tuple[Any, ...]]:
    """The unfiltered run list's count and page SQL (the page with LIMIT and
    OFFSET placeholders), compiled once per process from the same querysets the
    filtered path runs."""
    page_sql, params = RunViewSet.queryset.all().list_rows().query.sql_with_params()
    table = connection.ops.quote_name(Run._meta.db_table)
    count_sql = f"SELECT COUNT(*) FROM {table}"  # noqa: S608 - a quoted model table
    return count_sql, f"{page_sql} LIMIT %s OFFSET %s", tuple(params)


@functools.cache
def _run_detail_sql() -> tuple[str, tuple[Any, ...]]:
    """One run's `list_rows()` SQL, its id the last parameter, compiled once per
    process from the queryset the filtered path runs."""
    sql, params = RunViewSet.queryset.filter(pk=-1).list_rows().query.sql_with_params()
    if not params or params[-1] != -1:  # pragma: no cover - Django changed its SQL
        raise RuntimeError("the run detail query does not end with the run's id")
    return sql, tuple(params)


class RunViewSet(viewsets.ReadOnlyModelViewSet):
    """Runs: state, counts, chunk progress; cancel, resume; their dead letters."""

    queryset = Run.objects.select_related("pipeline", "version")
    filterset_class = RunFilter
    ordering_fields = ["id", "created_at", "finished_at", "state"]

    def get_serializer_class(self) -> type:
        return RunListSerializer if self.action == "list" else RunSerializer

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Runs, newest first, filtered and paginated."""
        # Rendered from `.values()` (see `run_list_rows`): the page's time was
        # mostly building model instances and DRF fields (bench/api.py).
        queryset = self.filter_queryset(self.get_queryset())
        plain = _raw_rows_typed() and set(request.query_params) <= _PAGE_PARAMETERS
        page = self.paginate_queryset(_RunRows(queryset, plain=plain))
        return self.get_paginated_response(run_list_rows(page or []))

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """A run: state, counts, chunk progress and engine statistics."""
        # What clients poll while a run works. Rendered from `.values()` like the
        # list, with the chunks' states and stats in one query (`run_detail`): the
        # model instance with its joins, two chunk queries and DRF's field
        # machinery were three quarters of a poll's CPU (bench/api_profile.py).
        if _has_object_permissions(self.get_permissions()):
            return super().retrieve(request, *args, **kwargs)
        pk = _pk_or_404(kwargs.get("pk"))
        if request.query_params or not _raw_rows_typed():
            rows = self.filter_queryset(self.get_queryset()).filter(pk=pk).list_rows()
            found = next(iter(rows), None)
        else:
            sql, params = _run_detail_sql()
            found = next(iter(_dict_rows(sql, [*params[:-1], pk])), None)
        if found is None:
            raise Http404
        # Lazy: read only when the run has chunks (`run_detail` checks).
        chunks = ChunkRun.objects.filter(run_id=pk).values_list("state", "stats")
        return Response(run_detail(found, chunks))

    @extend_schema(responses=DeadLetterSerializer(many=True))
    @action(detail=True, methods=["get"], url_path="dead-letters")
    def dead_letters(self, request: Request, pk: str | None = None) -> Response:
        """The run's dead letters, paginated."""
        run = self.get_object()
        qs = (
            DeadLetter.objects.filter(run=run).select_related("pipeline").order_by("id")
        )
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(DeadLetterSerializer(page, many=True).data)

    @extend_schema(responses=QualityReportSerializer)
    @action(detail=True, methods=["get"])
    def quality(self, request: Request, pk: str | None = None) -> Response:
        """The run's data-quality report: violations per validate rule, with
        sample source references, and rejected rows per step."""
        run = self.get_object()
        return Response(services.quality_report(run))

    @extend_schema(request=None, responses={202: RunSerializer, 409: CONFLICT})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        """Cancel a queued or running run; committed chunks stay committed."""
        run = self.get_object()
        if not services.cancel_run(run.pk, f"cancelled by {request.user}"):
            return _conflict(ValueError(f"run {run.pk} already ended ({run.state})"))
        run.refresh_from_db()
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=ResumeRunSerializer, responses={202: RunSerializer, 409: CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        """Run again only the chunks of a failed or cancelled run not committed."""
        run = self.get_object()
        body = ResumeRunSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            run = services.resume_run(
                run.pk, use_current_version=body.validated_data["use_current_version"]
            )
        except ResumeRefusedError as exc:
            return _conflict(exc)
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED)


class DeadLetterViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """Dead letters: rejected records with their error, step and source reference.

    Edit an open one's payload, replay them through a pipeline version as a new run,
    or discard them with a reason.
    """

    queryset = DeadLetter.objects.select_related("pipeline")
    serializer_class = DeadLetterSerializer
    filterset_class = DeadLetterFilter
    ordering_fields = ["id", "created_at"]
    http_method_names = ["get", "patch", "post", "head", "options"]

    def _selected(self, data: dict) -> QuerySet[DeadLetter]:
        if data.get("ids"):
            return DeadLetter.objects.filter(pk__in=data["ids"])
        filterset = DeadLetterFilter(data["filter"], queryset=DeadLetter.objects.all())
        if not filterset.is_valid():
            raise ValidationError({"filter": filterset.errors})
        return filterset.qs

    @extend_schema(request=ReplaySerializer, responses={202: RunSerializer})
    @action(detail=False, methods=["post"])
    def replay(self, request: Request) -> Response:
        """Replay open dead letters (by ids or filter) as a new run of kind replay."""
        body = ReplaySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        ids = list(self._selected(body.validated_data).values_list("pk", flat=True))
        try:
            run = services.replay_dead_letters(
                ids,
                version_id=body.validated_data.get("version"),
                correlation_id=getattr(request, "correlation_id", None),
                requested_by_id=request.user.pk,
            )
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from None
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=DiscardSerializer,
        responses=CountSerializer,
        operation_id="api_v1_dead_letters_discard_many",
    )
    @action(detail=False, methods=["post"], url_path="discard")
    def discard_many(self, request: Request) -> Response:
        """Discard open dead letters (by ids or filter) with a reason."""
        body = DiscardSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        ids = list(self._selected(body.validated_data).values_list("pk", flat=True))
        count = services.discard_dead_letters(ids, body.validated_data["reason"])
        return Response({"count": count})

    @extend_schema(request=DiscardOneSerializer, responses={200: DeadLetterSerializer})
    @action(detail=True, methods=["post"])
    def discard(self, request: Request, pk: str | None = None) -> Response:
        """Discard one open dead letter with a reason."""
        letter = self.get_object()
        body = DiscardOneSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        if not services.discard_dead_letters(
            [letter.pk], body.validated_data["reason"]
        ):
            return _conflict(ValueError(f"the dead letter is {letter.state}"))
        letter.refresh_from_db()
        return Response(DeadLetterSerializer(letter).data)


class SchemaChangeViewSet(viewsets.ReadOnlyModelViewSet):
    """Schema drift runs found: new columns and type changes, with what the
    pipeline's drift policy did."""

    queryset = SchemaChange.objects.select_related(
        "pipeline", "version", "applied_version"
    )
    serializer_class = SchemaChangeSerializer
    filterset_class = SchemaChangeFilter
    ordering_fields = ["id", "detected_at"]


class SchemaChangeProposalViewSet(viewsets.ReadOnlyModelViewSet):
    """Schema change proposals of quarantine pipelines: approve applies the change
    and back-fills the held values; reject drops them. Both are idempotent."""

    queryset = (
        SchemaChangeProposal.objects.select_related(
            "pipeline", "applied_version", "decided_by"
        )
        .annotate(
            held_rows_now=Coalesce(
                Sum("held__rows", filter=Q(held__state=HeldState.HELD)), 0
            )
        )
        .order_by("-id")
    )
    serializer_class = SchemaChangeProposalSerializer
    filterset_class = SchemaChangeProposalFilter
    ordering_fields = ["id", "created_at"]

    @extend_schema(
        request=None,
        responses={
            200: SchemaChangeProposalSerializer,
            400: OpenApiResponse(
                description="The sink cannot take the change (`sink` says why)."
            ),
            409: CONFLICT,
        },
    )
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str | None = None) -> Response:
        """Add the columns (new pipeline version, sink column) and back-fill the
        held values into the rows already loaded."""
        proposal = self.get_object()
        try:
            proposal = drift.approve(proposal.pk, user_id=request.user.pk)
        except drift.ProposalDecidedError as exc:
            return _conflict(exc)
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from None
        return Response(SchemaChangeProposalSerializer(proposal).data)

    @extend_schema(
        request=None,
        responses={200: SchemaChangeProposalSerializer, 409: CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def reject(self, request: Request, pk: str | None = None) -> Response:
        """Refuse the change: the held values are marked rejected (and purged)."""
        proposal = self.get_object()
        try:
            proposal = drift.reject(proposal.pk, user_id=request.user.pk)
        except drift.ProposalDecidedError as exc:
            return _conflict(exc)
        return Response(SchemaChangeProposalSerializer(proposal).data)
