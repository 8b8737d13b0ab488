"""Filters of the schema registry and mapping API."""

from __future__ import annotations

from django_filters import rest_framework as filters

from transforms.models import Mapping, SchemaSubject


class SchemaSubjectFilter(filters.FilterSet):
    name = filters.CharFilter(lookup_expr="icontains")

    class Meta:
        model = SchemaSubject
        fields = ["name", "compatibility"]


class MappingFilter(filters.FilterSet):
    name = filters.CharFilter(lookup_expr="icontains")
    source_subject = filters.CharFilter(field_name="source_subject__name")
    target_subject = filters.CharFilter(field_name="target_subject__name")

    class Meta:
        model = Mapping
        fields = ["name", "source_subject", "target_subject"]
