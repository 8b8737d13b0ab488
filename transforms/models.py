"""The schema registry (subjects and their Avro versions) and versioned mappings."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

from transforms.choices import Compatibility
from transforms.schemas import (
    ParsedSchema,
    avro_to_arrow,
    avro_to_json_schema,
    parse_avro,
)

subject_name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    "letters, digits, '.', '_' and '-', starting with a letter or digit",
)


class SchemaSubject(models.Model):
    """A named record schema whose versions evolve under a compatibility rule."""

    name = models.CharField(
        max_length=200, unique=True, validators=[subject_name_validator]
    )
    compatibility = models.CharField(
        max_length=10, choices=Compatibility.choices, default=Compatibility.BACKWARD
    )
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def latest_version(self) -> SchemaVersion | None:
        """The version with the highest number (None before the first).

        Uses prefetched ``versions`` when there are (no query per subject in lists).
        """
        cache = getattr(self, "_prefetched_objects_cache", {})
        if "versions" in cache:
            return max(cache["versions"], key=lambda v: v.number, default=None)
        return self.versions.order_by("-number").first()


class SchemaVersion(models.Model):
    """One immutable Avro record definition of a subject, numbered from 1.

    ``fingerprint`` is the Avro fingerprint (SHA-256 of the Parsing Canonical
    Form); ``content_hash`` covers the whole definition (docs and defaults too)
    and tells versions apart.
    """

    subject = models.ForeignKey(
        SchemaSubject, on_delete=models.CASCADE, related_name="versions"
    )
    number = models.PositiveIntegerField()
    definition = models.JSONField(help_text="The Avro record schema.")
    fingerprint = models.CharField(max_length=64, db_index=True)
    content_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["subject", "-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["subject", "number"], name="schemaversion_unique_number"
            ),
            models.UniqueConstraint(
                fields=["subject", "content_hash"], name="schemaversion_unique_hash"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.subject.name} v{self.number}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise ValidationError("a schema version is immutable")
        super().save(*args, **kwargs)

    def parsed(self) -> ParsedSchema:
        """The definition parsed by fastavro (it was valid when registered)."""
        return parse_avro(self.definition)

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema derived from the definition."""
        return avro_to_arrow(self.parsed())

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema (Draft 2020-12) derived from the definition."""
        return avro_to_json_schema(self.parsed())

    def required_fields(self) -> list[str]:
        """Top-level fields without a default: what a producer must always give."""
        return [f["name"] for f in self.definition["fields"] if "default" not in f]


class Mapping(models.Model):
    """Declarative rules from a source schema to a target schema, versioned.

    ``rules`` is the list of a map step's fields (``name``, ``expr``, ``type``,
    ``default``, ``required``); each change freezes a new `MappingVersion`.
    """

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    source_subject = models.ForeignKey(
        SchemaSubject,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="source_mappings",
    )
    target_subject = models.ForeignKey(
        SchemaSubject,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="target_mappings",
    )
    rules = models.JSONField(
        default=list, help_text="The map step's fields: name, expr, type, default..."
    )
    current_version = models.ForeignKey(
        "MappingVersion",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        editable=False,
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def steps(self) -> list[dict[str, Any]]:
        """The engine step list of the current rules: one map step."""
        return [{"type": "map", "fields": self.rules}]


class MappingVersion(models.Model):
    """An immutable snapshot of a mapping's rules, identified by their hash."""

    mapping = models.ForeignKey(
        Mapping, on_delete=models.CASCADE, related_name="versions"
    )
    number = models.PositiveIntegerField()
    rules = models.JSONField()
    content_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["mapping", "-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["mapping", "number"], name="mappingversion_unique_number"
            ),
            models.UniqueConstraint(
                fields=["mapping", "content_hash"], name="mappingversion_unique_hash"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.mapping.name} v{self.number} ({self.content_hash[:8]})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise ValidationError("a mapping version is immutable")
        super().save(*args, **kwargs)

    def steps(self) -> list[dict[str, Any]]:
        """The engine step list of this version: one map step."""
        return [{"type": "map", "fields": self.rules}]
