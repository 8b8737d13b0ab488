"""Views of the schema registry and mapping API."""

from __future__ import annotations

from dataclasses import asdict

from django.db.models import Prefetch, ProtectedError
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from transforms import services
from transforms.api.filtersets import MappingFilter, SchemaSubjectFilter
from transforms.api.serializers import (
    CompatibilitySerializer,
    InferredSchemaSerializer,
    InferSerializer,
    MappingSerializer,
    MappingVersionSerializer,
    PreviewRequestSerializer,
    PreviewResponseSerializer,
    RegisterVersionSerializer,
    SchemaSubjectSerializer,
    SchemaVersionSerializer,
)
from transforms.exceptions import IncompatibleSchemaError, PreviewError
from transforms.models import Mapping, SchemaSubject, SchemaVersion
from transforms.schemas import InferenceError, infer_avro

IN_USE = OpenApiResponse(description="Refused: mappings use it (see `detail`).")


def _in_use(exc: ProtectedError) -> Response:
    names = sorted({str(obj) for obj in exc.protected_objects})
    return Response(
        {"detail": f"in use by {', '.join(names)}"}, status=status.HTTP_409_CONFLICT
    )


class SchemaSubjectViewSet(viewsets.ModelViewSet):
    """Schema subjects and their Avro versions (the schema registry).

    A new version is checked against the latest one under the subject's
    compatibility mode; an incompatible one is refused with the reasons.
    """

    queryset = SchemaSubject.objects.prefetch_related(
        Prefetch("versions", queryset=SchemaVersion.objects.order_by("number"))
    )
    serializer_class = SchemaSubjectSerializer
    filterset_class = SchemaSubjectFilter
    ordering_fields = ["name", "created_at", "updated_at"]

    @extend_schema(responses={204: None, 409: IN_USE})
    def destroy(self, request: Request, *args: object, **kwargs: object) -> Response:
        """Delete a subject and its versions, unless a mapping uses it."""
        try:
            return super().destroy(request, *args, **kwargs)
        except ProtectedError as exc:
            return _in_use(exc)

    @extend_schema(
        methods=["GET"],
        request=None,
        responses=SchemaVersionSerializer(many=True),
        operation_id="api_v1_schemas_versions_list",
    )
    @extend_schema(
        methods=["POST"],
        request=RegisterVersionSerializer,
        responses={201: SchemaVersionSerializer, 200: SchemaVersionSerializer},
        operation_id="api_v1_schemas_versions_create",
    )
    @action(detail=True, methods=["get", "post"])
    def versions(self, request: Request, pk: str | None = None) -> Response:
        """List the versions (newest first), or register a new one.

        Registering a definition seen before returns its version (200); a new
        compatible one is created (201); an incompatible one is a 400 whose
        `definition` gives the reasons.
        """
        subject = self.get_object()
        if request.method == "GET":
            page = self.paginate_queryset(subject.versions.order_by("-number"))
            return self.get_paginated_response(
                SchemaVersionSerializer(page, many=True).data
            )
        body = RegisterVersionSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            version, created = services.register_schema_version(
                subject.pk, body.validated_data["definition"]
            )
        except IncompatibleSchemaError as exc:
            raise ValidationError(
                {
                    "definition": [
                        f"incompatible under {subject.compatibility} "
                        f"compatibility: {problem}"
                        for problem in exc.problems
                    ]
                }
            ) from None
        return Response(
            SchemaVersionSerializer(version).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )

    @extend_schema(responses={200: SchemaVersionSerializer})
    @action(
        detail=True,
        methods=["get"],
        url_path=r"versions/(?P<number>[0-9]+)",
        url_name="version-detail",
    )
    def version(
        self, request: Request, pk: str | None = None, number: str = ""
    ) -> Response:
        """One version by number, with its Arrow schema and JSON Schema."""
        subject = self.get_object()
        version = subject.versions.filter(number=int(number)).first()
        if version is None:
            raise NotFound(f"{subject.name} has no version {number}")
        return Response(SchemaVersionSerializer(version).data)

    @extend_schema(
        request=RegisterVersionSerializer, responses={200: CompatibilitySerializer}
    )
    @action(detail=True, methods=["post"])
    def compatibility(self, request: Request, pk: str | None = None) -> Response:
        """Check a candidate against the latest version without registering it."""
        subject = self.get_object()
        body = RegisterVersionSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        problems = services.check_compatibility(
            subject, body.validated_data["definition"]
        )
        latest = subject.latest_version
        return Response(
            {
                "compatible": not problems,
                "compatibility": subject.compatibility,
                "latest_version": latest.number if latest else None,
                "problems": problems,
            }
        )

    @extend_schema(request=InferSerializer, responses={200: InferredSchemaSerializer})
    @action(detail=False, methods=["post"])
    def infer(self, request: Request) -> Response:
        """Infer an Avro record schema from sample JSON records."""
        body = InferSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            definition = infer_avro(
                body.validated_data["records"], name=body.validated_data["name"]
            )
        except InferenceError as exc:
            raise ValidationError({"records": [str(exc)]}) from None
        return Response({"definition": definition})


class MappingViewSet(viewsets.ModelViewSet):
    """Mappings: field rules from a source schema to a target schema, versioned.

    Rules are checked with the engine when saved; `preview` runs a version over
    sample records and writes nothing.
    """

    queryset = Mapping.objects.select_related(
        "source_subject", "target_subject", "current_version"
    )
    serializer_class = MappingSerializer
    filterset_class = MappingFilter
    ordering_fields = ["name", "created_at", "updated_at"]

    @extend_schema(responses=MappingVersionSerializer(many=True))
    @action(detail=True, methods=["get"])
    def versions(self, request: Request, pk: str | None = None) -> Response:
        """The mapping's versions, newest first, paginated."""
        mapping = self.get_object()
        page = self.paginate_queryset(mapping.versions.order_by("-number"))
        return self.get_paginated_response(
            MappingVersionSerializer(page, many=True).data
        )

    @extend_schema(
        request=PreviewRequestSerializer, responses={200: PreviewResponseSerializer}
    )
    @action(detail=True, methods=["post"])
    def preview(self, request: Request, pk: str | None = None) -> Response:
        """Run the mapping (current or given version) over sample records.

        Returns the outputs, the per-record errors and the column lineage; no
        side effects.
        """
        mapping = self.get_object()
        body = PreviewRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            table = None
            if "connector" in data:
                table = services.sample_connector(
                    data["connector"], data["options"], limit=data["limit"]
                )
            result = services.preview_mapping(
                mapping,
                records=data.get("records"),
                table=table,
                version=data.get("version"),
                values=data["values"],
            )
        except PreviewError as exc:
            raise ValidationError({exc.field: [str(exc)]}) from None
        return Response(asdict(result))
