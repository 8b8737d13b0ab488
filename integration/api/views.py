"""Views of the integration API: pipelines, runs, dead letters."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from integration import services
from integration.api.filtersets import DeadLetterFilter, PipelineFilter, RunFilter
from integration.api.serializers import (
    DeadLetterSerializer,
    PipelineSerializer,
    RunListSerializer,
    RunSerializer,
    StartRunSerializer,
)
from integration.choices import RunTrigger
from integration.exceptions import PipelinePausedError
from integration.models import DeadLetter, Pipeline, Run


class PipelineViewSet(viewsets.ModelViewSet):
    """Pipelines. Each behaviour change freezes a new PipelineVersion."""

    queryset = Pipeline.objects.select_related("source", "sink", "current_version")
    serializer_class = PipelineSerializer
    filterset_class = PipelineFilter
    ordering_fields = ["name", "created_at", "updated_at"]

    @extend_schema(
        request=StartRunSerializer,
        responses={202: RunSerializer, 409: OpenApiResponse(description="paused")},
    )
    @action(detail=True, methods=["post"])
    def runs(self, request: Request, pk: str | None = None) -> Response:
        """Start a run; it waits in `queued` while another regular run is running."""
        pipeline = self.get_object()
        body = StartRunSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            run = services.start_run(
                pipeline.pk,
                trigger=RunTrigger.API,
                correlation_id=getattr(request, "correlation_id", None),
                requested_by_id=request.user.pk,
                params=body.validated_data["params"],
            )
        except PipelinePausedError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        assert run is not None  # noqa: S101 - only scheduled runs can be skipped
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED)


class RunViewSet(viewsets.ReadOnlyModelViewSet):
    """Runs: state, counts, chunk progress; their dead letters."""

    queryset = Run.objects.select_related("pipeline", "version")
    filterset_class = RunFilter
    ordering_fields = ["id", "created_at", "finished_at", "state"]

    def get_serializer_class(self) -> type:
        return RunListSerializer if self.action == "list" else RunSerializer

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


class DeadLetterViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Dead letters: rejected records with their error, step and source reference."""

    queryset = DeadLetter.objects.select_related("pipeline")
    serializer_class = DeadLetterSerializer
    filterset_class = DeadLetterFilter
    ordering_fields = ["id", "created_at"]
