"""Workflow API: define DAGs, run them, follow each node."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from integration import workflows
from integration.choices import NodeKind, RunTrigger
from integration.exceptions import PipelinePausedError
from integration.models import NodeRun, Pipeline, Workflow, WorkflowNode, WorkflowRun


class WorkflowNodeSerializer(serializers.ModelSerializer):
    """A node: a pipeline run (`pipeline`) or an action (`config.connector`...)."""

    pipeline = serializers.SlugRelatedField(
        slug_field="name",
        queryset=Pipeline.objects.all(),
        required=False,
        allow_null=True,
    )
    kind = serializers.ChoiceField(choices=NodeKind.choices)
    depends_on = serializers.ListField(
        child=serializers.SlugField(), required=False, default=list
    )

    class Meta:
        model = WorkflowNode
        fields = [
            "key",
            "kind",
            "pipeline",
            "config",
            "depends_on",
            "max_attempts",
            "retry_delay_seconds",
        ]
        # Node keys are unique per workflow; the workflow serializer checks them.
        validators: list[Any] = []


class WorkflowSerializer(serializers.ModelSerializer):
    """A workflow with its nodes; saving checks the graph (no cycles)."""

    nodes = WorkflowNodeSerializer(many=True)

    class Meta:
        model = Workflow
        fields = [
            "id",
            "name",
            "description",
            "failure_policy",
            "is_paused",
            "schedule_cron",
            "schedule_timezone",
            "schedule_interval_seconds",
            "event_trigger",
            "nodes",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]

    def validate_nodes(self, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not value:
            raise serializers.ValidationError("a workflow needs at least one node")
        try:
            workflows.validate_nodes(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict["nodes"]) from None
        return value

    def create(self, validated_data: dict[str, Any]) -> Workflow:
        nodes = validated_data.pop("nodes")
        return workflows.save_workflow(Workflow(**validated_data), nodes)

    def update(self, instance: Workflow, validated_data: dict[str, Any]) -> Workflow:
        nodes = validated_data.pop("nodes", None)
        for key, value in validated_data.items():
            setattr(instance, key, value)
        if nodes is None:
            nodes = [
                {
                    "key": n.key,
                    "kind": n.kind,
                    "pipeline": n.pipeline,
                    "config": n.config,
                    "depends_on": n.depends_on,
                    "max_attempts": n.max_attempts,
                    "retry_delay_seconds": n.retry_delay_seconds,
                }
                for n in instance.nodes.all()
            ]
        return workflows.save_workflow(instance, nodes)


class NodeRunSerializer(serializers.ModelSerializer):
    key = serializers.CharField(source="node.key", read_only=True)
    kind = serializers.CharField(source="node.kind", read_only=True)

    class Meta:
        model = NodeRun
        fields = [
            "key",
            "kind",
            "state",
            "attempts",
            "run",
            "result",
            "error",
            "not_before",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class WorkflowRunSerializer(serializers.ModelSerializer):
    workflow = serializers.SlugRelatedField(slug_field="name", read_only=True)
    nodes = NodeRunSerializer(many=True, read_only=True)

    class Meta:
        model = WorkflowRun
        fields = [
            "id",
            "workflow",
            "state",
            "trigger",
            "correlation_id",
            "error",
            "nodes",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields


class WorkflowViewSet(viewsets.ModelViewSet):
    """Workflows: DAGs of pipeline runs and actions."""

    queryset = Workflow.objects.prefetch_related("nodes__pipeline")
    serializer_class = WorkflowSerializer
    filterset_fields = ["name", "failure_policy", "is_paused"]
    ordering_fields = ["name", "created_at"]

    @extend_schema(
        request=None,
        responses={
            202: WorkflowRunSerializer,
            409: OpenApiResponse(description="paused"),
        },
    )
    @action(detail=True, methods=["post"])
    def runs(self, request: Request, pk: str | None = None) -> Response:
        """Start a run of the workflow."""
        workflow = self.get_object()
        try:
            wrun = workflows.start_workflow(
                workflow.pk,
                trigger=RunTrigger.API,
                correlation_id=getattr(request, "correlation_id", None),
            )
        except PipelinePausedError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(
            WorkflowRunSerializer(wrun).data, status=status.HTTP_202_ACCEPTED
        )


class WorkflowRunViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Workflow runs with the state of each node."""

    queryset = WorkflowRun.objects.select_related("workflow").prefetch_related(
        "nodes__node"
    )
    serializer_class = WorkflowRunSerializer
    filterset_fields = ["workflow", "state", "trigger"]
    ordering_fields = ["id", "created_at"]

    @extend_schema(
        request=None,
        responses={
            202: WorkflowRunSerializer,
            409: OpenApiResponse(description="already ended"),
        },
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        """Cancel the workflow run and the pipeline runs it started."""
        wrun = self.get_object()
        if not workflows.cancel_workflow(wrun.pk):
            return Response(
                {"detail": f"workflow run {wrun.pk} already ended ({wrun.state})"},
                status=status.HTTP_409_CONFLICT,
            )
        wrun.refresh_from_db()
        return Response(
            WorkflowRunSerializer(wrun).data, status=status.HTTP_202_ACCEPTED
        )
