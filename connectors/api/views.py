"""Views of the connectors API."""

from __future__ import annotations

import dataclasses

from django_filters import rest_framework as filters
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from connectors import services
from connectors.api.serializers import (
    CheckResultSerializer,
    ConnectorSerializer,
    CredentialSerializer,
    StreamSerializer,
)
from connectors.exceptions import ConnectorError
from connectors.models import Connector, Credential


class CredentialViewSet(viewsets.ModelViewSet):
    """Credentials: create, list, update, delete. Secret values are write-only."""

    queryset = Credential.objects.all()
    serializer_class = CredentialSerializer
    filterset_fields = {"name": ["exact", "icontains"], "key_id": ["exact"]}
    ordering_fields = ["name", "created_at", "updated_at"]


class ConnectorFilter(filters.FilterSet):
    name = filters.CharFilter(lookup_expr="icontains")
    credential = filters.CharFilter(field_name="credential__name")

    class Meta:
        model = Connector
        fields = ["name", "kind", "last_check_status", "credential"]


class ConnectorViewSet(viewsets.ModelViewSet):
    """Connectors: instances of a plugin kind with a validated config."""

    queryset = Connector.objects.select_related("credential")
    serializer_class = ConnectorSerializer
    filterset_class = ConnectorFilter
    ordering_fields = ["name", "kind", "created_at"]

    @extend_schema(request=None, responses=CheckResultSerializer)
    @action(detail=True, methods=["post"])
    def test(self, request: Request, pk: str | None = None) -> Response:
        """Check the connection; the message never contains a secret."""
        connector = self.get_object()
        result = services.test_connection(connector.pk)
        return Response(CheckResultSerializer(dataclasses.asdict(result)).data)

    @extend_schema(
        request=None,
        responses={200: StreamSerializer(many=True), 400: OpenApiResponse()},
    )
    @action(detail=True, methods=["post"])
    def discover(self, request: Request, pk: str | None = None) -> Response:
        """The streams (tables, files, topics) the source offers and their fields."""
        connector = self.get_object()
        try:
            streams = services.discover(connector.pk)
        except ConnectorError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(StreamSerializer(streams, many=True).data)

    @extend_schema(request=None, responses=ConnectorSerializer)
    @action(detail=True, methods=["post"], url_path="reset-breaker")
    def reset_breaker(self, request: Request, pk: str | None = None) -> Response:
        """Close the connector's circuit breaker by hand."""
        connector = self.get_object()
        services.reset_breaker(connector)
        return Response(ConnectorSerializer(connector).data)
