"""Serializers of the schema registry and mapping API."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from transforms import services
from transforms.choices import PreviewValues
from transforms.exceptions import MappingRulesError
from transforms.models import Mapping, MappingVersion, SchemaSubject, SchemaVersion
from transforms.schemas import (
    SchemaDefinitionError,
    arrow_schema_fields,
    parse_avro,
)


def _definition(value: Any) -> dict[str, Any]:
    try:
        return parse_avro(value).definition
    except SchemaDefinitionError as exc:
        raise serializers.ValidationError(str(exc)) from None


class ArrowFieldSerializer(serializers.Serializer):
    """One field of a derived Arrow schema."""

    name = serializers.CharField()
    type = serializers.CharField(help_text="Arrow's type name, e.g. decimal128(10, 2)")
    nullable = serializers.BooleanField()


class SchemaVersionSerializer(serializers.ModelSerializer):
    """An immutable Avro version, with the Arrow and JSON Schema derived from it."""

    subject = serializers.SlugRelatedField(slug_field="name", read_only=True)
    arrow_schema = serializers.SerializerMethodField()
    json_schema = serializers.SerializerMethodField()

    class Meta:
        model = SchemaVersion
        fields = [
            "id",
            "subject",
            "number",
            "definition",
            "fingerprint",
            "content_hash",
            "arrow_schema",
            "json_schema",
            "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(ArrowFieldSerializer(many=True))
    def get_arrow_schema(self, version: SchemaVersion) -> list[dict[str, Any]]:
        return arrow_schema_fields(version.arrow_schema())

    @extend_schema_field(
        {"type": "object", "description": "JSON Schema (Draft 2020-12)"}
    )
    def get_json_schema(self, version: SchemaVersion) -> dict[str, Any]:
        return version.json_schema()


class SchemaSubjectSerializer(serializers.ModelSerializer):
    """A schema subject; `definition` on create registers version 1."""

    definition = serializers.JSONField(
        write_only=True,
        required=False,
        help_text="Avro record schema of version 1 (create only).",
    )
    latest_version = SchemaVersionSerializer(read_only=True, allow_null=True)

    class Meta:
        model = SchemaSubject
        fields = [
            "id",
            "name",
            "compatibility",
            "description",
            "definition",
            "latest_version",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]

    def validate_definition(self, value: Any) -> dict[str, Any]:
        if self.instance is not None:
            raise serializers.ValidationError(
                "register a new version with POST /api/v1/schemas/{id}/versions/"
            )
        return _definition(value)

    def create(self, validated_data: dict[str, Any]) -> SchemaSubject:
        return services.create_subject(**validated_data)


class RegisterVersionSerializer(serializers.Serializer):
    """A candidate version: an Avro record schema."""

    definition = serializers.JSONField(help_text="Avro record schema (JSON).")

    def validate_definition(self, value: Any) -> dict[str, Any]:
        return _definition(value)


class CompatibilitySerializer(serializers.Serializer):
    """Whether a candidate may become the subject's next version, and why not."""

    compatible = serializers.BooleanField()
    compatibility = serializers.CharField()
    latest_version = serializers.IntegerField(allow_null=True)
    problems = serializers.ListField(child=serializers.CharField())


class InferSerializer(serializers.Serializer):
    """A sample of JSON records to infer an Avro record schema from."""

    records = serializers.ListField(
        child=serializers.DictField(), min_length=1, max_length=10_000
    )
    name = serializers.RegexField(
        r"^[A-Za-z_][A-Za-z0-9_]*$",
        default="Record",
        help_text="The record's Avro name.",
    )


class InferredSchemaSerializer(serializers.Serializer):
    """An inferred Avro record schema (register it as a version as is)."""

    definition = serializers.JSONField()


class MappingVersionSerializer(serializers.ModelSerializer):
    """An immutable snapshot of a mapping's rules."""

    class Meta:
        model = MappingVersion
        fields = ["id", "number", "rules", "content_hash", "created_at"]
        read_only_fields = fields


class MappingSerializer(serializers.ModelSerializer):
    """A mapping; a change to its rules freezes a new version."""

    source_subject = serializers.SlugRelatedField(
        slug_field="name",
        queryset=SchemaSubject.objects.all(),
        allow_null=True,
        required=False,
    )
    target_subject = serializers.SlugRelatedField(
        slug_field="name",
        queryset=SchemaSubject.objects.all(),
        allow_null=True,
        required=False,
    )
    rules = serializers.JSONField(
        help_text="The map step's fields: name, expr, type, default, required."
    )
    current_version = MappingVersionSerializer(read_only=True)

    class Meta:
        model = Mapping
        fields = [
            "id",
            "name",
            "description",
            "source_subject",
            "target_subject",
            "rules",
            "current_version",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["current_version", "created_at", "updated_at"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        def current(name: str) -> Any:
            if name in attrs:
                return attrs[name]
            return getattr(self.instance, name, None)

        try:
            services.validate_rules(
                current("rules"),
                source=current("source_subject"),
                target=current("target_subject"),
            )
        except MappingRulesError as exc:
            raise serializers.ValidationError({"rules": [str(exc)]}) from None
        return attrs

    def create(self, validated_data: dict[str, Any]) -> Mapping:
        mapping = super().create(validated_data)
        services.save_mapping(mapping)
        return mapping

    def update(self, instance: Mapping, validated_data: dict[str, Any]) -> Mapping:
        mapping = super().update(instance, validated_data)
        services.save_mapping(mapping)
        return mapping


class PreviewRequestSerializer(serializers.Serializer):
    """Sample records for a preview: in the body, or read from a source connector."""

    records = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        max_length=services.MAX_PREVIEW_RECORDS,
        help_text="JSON objects; each gets `_source_ref` = `preview#<index>`.",
    )
    values = serializers.ChoiceField(
        choices=PreviewValues.choices,
        default=PreviewValues.TEXT,
        help_text="`text`: values become strings as a CSV source reads them "
        "(the default); `typed`: Arrow types inferred from the JSON values.",
    )
    version = serializers.IntegerField(
        required=False, min_value=1, help_text="Version number (default: current)."
    )
    connector = serializers.CharField(
        required=False, help_text="Sample the first records of this source instead."
    )
    options = serializers.DictField(
        required=False, default=dict, help_text="The connector's read options."
    )
    limit = serializers.IntegerField(
        required=False,
        default=20,
        min_value=1,
        max_value=services.MAX_PREVIEW_RECORDS,
        help_text="Records to sample from the connector.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("records" in attrs) == ("connector" in attrs):
            raise serializers.ValidationError(
                {"records": ["give either records or a connector"]}
            )
        return attrs


class PreviewErrorSerializer(serializers.Serializer):
    """A sample record the mapping rejected."""

    index = serializers.IntegerField(allow_null=True)
    source_ref = serializers.CharField()
    error = serializers.CharField()
    step = serializers.CharField()


class PreviewResponseSerializer(serializers.Serializer):
    """What the mapping made of the sample."""

    version = serializers.IntegerField()
    rows_in = serializers.IntegerField()
    outputs = serializers.ListField(child=serializers.DictField())
    errors = PreviewErrorSerializer(many=True)
    column_lineage = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField())
    )
