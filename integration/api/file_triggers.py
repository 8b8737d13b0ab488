"""File trigger API: bind File Processing Service events to pipelines."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django_filters import rest_framework as filters
from rest_framework import serializers, viewsets

from connectors.models import Connector
from integration.models import FileTrigger, Pipeline


class FileTriggerSerializer(serializers.ModelSerializer):
    """A binding of a kafka topic's file events to a pipeline; counters read-only."""

    connector = serializers.SlugRelatedField(
        slug_field="name", queryset=Connector.objects.all()
    )
    pipeline = serializers.SlugRelatedField(
        slug_field="name", queryset=Pipeline.objects.select_related("source")
    )

    class Meta:
        model = FileTrigger
        fields = [
            "id",
            "name",
            "description",
            "connector",
            "topic",
            "pipeline",
            "filename_pattern",
            "content_type",
            "is_paused",
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
        read_only_fields = [
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

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        probe = FileTrigger(
            **{
                name: attrs.get(name, getattr(self.instance, name, None))
                for name in (
                    "connector",
                    "topic",
                    "pipeline",
                    "filename_pattern",
                    "content_type",
                )
            }
        )
        probe.filename_pattern = probe.filename_pattern or ""
        probe.content_type = probe.content_type or ""
        try:
            probe.clean()
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from None
        return attrs


class FileTriggerFilter(filters.FilterSet):
    connector = filters.CharFilter(field_name="connector__name")
    pipeline = filters.CharFilter(field_name="pipeline__name")

    class Meta:
        model = FileTrigger
        fields = ["connector", "pipeline", "topic", "is_paused"]


class FileTriggerViewSet(viewsets.ModelViewSet):
    """File triggers: which pipeline a File Processing Service event starts."""

    queryset = FileTrigger.objects.select_related("connector", "pipeline")
    serializer_class = FileTriggerSerializer
    filterset_class = FileTriggerFilter
    ordering_fields = ["name", "created_at", "last_event_at"]
